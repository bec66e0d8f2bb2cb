"""The fixed-step loop of :mod:`mfattn.rk` (``limit.FixedSteps``) against Diffrax's ``ConstantStepSize`` solves:
the same numbers to 1e-12 in float64 for every attention kind, padding, N = 1, causal masks, the normalised
residual, the lanes kernels, piecewise fields and other explicit solvers; gradients through it against
``jax.grad`` through Diffrax."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn import limit, rk
from mfattn.losses import TokenRegression

BETA = 1.5
STEPS = 8  # two steps per grid interval of a 5-point grid


def _instance(n=5, d=3, k=2, particles=6, seed=0):
    key = jax.random.split(jax.random.key(seed), 5)
    ens = limit.init_ensemble(key[0], 5, particles, d, k, init="mean_noise", scale=0.5, dtype=jnp.float64)
    ens = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(key[4], x.shape, x.dtype), ens)
    x0 = jax.random.normal(key[1], (n, d), jnp.float64)
    m = jax.random.uniform(key[2], (n,), jnp.float64, 0.2, 1.0)
    if n > 1:
        m = m.at[n // 2].set(0.0)  # a padding token
    m = m / m.sum()
    y = jax.random.normal(key[3], (n, d), jnp.float64)
    return ens, x0, m, y


def _kwargs(fixed: bool, steps=STEPS, solver=None, **extra):
    solver = diffrax.Tsit5() if solver is None else solver
    if fixed:
        return dict(solver=solver, stepsize_controller=limit.FixedSteps(steps), **extra)
    return dict(solver=solver, stepsize_controller=diffrax.ConstantStepSize(), dt0=1.0 / steps, **extra)


def _close(a, b, tol=1e-12):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


SPECS = {
    "softmax": mfattn.Attention(),
    "l2": mfattn.Attention("l2"),
    "sigmoid-causal": mfattn.Attention("sigmoid", causal=True),
    "sinkhorn": mfattn.Attention("sinkhorn", sinkhorn_iters=3),
    "sphere": mfattn.Attention(residual="sphere"),
    "lanes-causal-l2": mfattn.Attention("l2", causal=True, heads="lanes"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_fixed_loop_equals_diffrax_constant_steps(name):
    """forward_backward (tokens and adjoints between the steps), batch_grad_map with coupled heads, and (softmax)
    forward."""
    spec = SPECS[name]
    ens, x0, m, y = _instance()
    if spec.residual == "sphere":
        x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    ts = jnp.linspace(0.0, 1.0, 13)  # off the step times
    loss = TokenRegression()
    coupled = mfattn.init_params(jax.random.key(7), 3, 2, 3, 2, init="mean_noise", scale=0.5, dtype=jnp.float64)
    out = {}
    for fixed in (False, True):
        kw = _kwargs(fixed, attention=spec)
        out[fixed] = (
            limit.forward(ens, x0, beta=BETA, ts=ts, weights=m, **kw) if name == "softmax" else None,
            limit.forward_backward(ens, x0, loss, beta=BETA, ts=ts, weights=m, targets=y, **kw),
            limit.batch_grad_map(
                ens,
                jnp.stack([x0, x0[::-1]]),
                jnp.stack([m, m[::-1]]),
                jnp.stack([y, -y]),
                loss,
                beta=BETA,
                coupled=coupled,
                **kw,
            ),
        )
    _close(out[True], out[False])


@pytest.mark.parametrize(
    ("solver", "interpolation"),
    [
        (diffrax.Tsit5(), "piecewise"),
        (diffrax.Dopri5(), "linear"),
        (diffrax.Heun(), "linear"),
        (diffrax.Euler(), "piecewise"),
    ],
    ids=["tsit5-piecewise", "dopri5", "heun", "euler-piecewise"],
)
def test_fixed_loop_uses_the_solvers_tableau_and_interpolation(solver, interpolation):
    ens, x0, m, y = _instance()
    ts = jnp.linspace(0.0, 1.0, 7)
    loss = TokenRegression()
    res = [
        limit.forward_backward(
            ens,
            x0,
            loss,
            beta=BETA,
            ts=ts,
            weights=m,
            targets=y,
            interpolation=interpolation,
            **_kwargs(fixed, solver=solver),
        )
        for fixed in (False, True)
    ]
    _close(res[1], res[0], tol=1e-11)


def test_fixed_loop_one_token_and_batches():
    ens, x0, m, y = _instance(n=1)
    ts = jnp.linspace(0.0, 1.0, 5)
    loss = TokenRegression()
    res = [limit.forward_backward(ens, x0, loss, beta=BETA, ts=ts, weights=m, targets=y, **_kwargs(f)) for f in (0, 1)]
    _close(res[1], res[0])
    ens, x0, m, y = _instance()

    def one(x):
        return limit.forward_backward(ens, x, loss, beta=BETA, ts=ts, weights=m, targets=y, **_kwargs(True))[2]

    xb = jnp.stack([x0, 2 * x0, -x0])
    _close(jax.vmap(one)(xb), jnp.stack([one(x) for x in xb]))


def test_gradients_through_the_fixed_loop_match_diffrax_and_the_hand_adjoint():
    """jax.grad through the fixed-step forward solve (in the tokens and in the ensemble) equals jax.grad through
    Diffrax's, and the hand adjoint ODE's p(0) equals it (the adjoint of the discretised forward only to the
    solver's accuracy: 1e-5 here, at 32 steps)."""
    ens, x0, m, y = _instance()
    loss = TokenRegression()
    ts = jnp.array([1.0])

    def f(x, e, fixed, steps=STEPS):
        return loss(limit.forward(e, x, beta=BETA, ts=ts, weights=m, **_kwargs(fixed, steps))[-1], m, y)

    gx = [jax.grad(f, argnums=(0, 1))(x0, ens, fixed) for fixed in (False, True)]
    _close(gx[1], gx[0])
    kw = _kwargs(True, steps=32)
    _, _, ps = limit.forward_backward(ens, x0, loss, beta=BETA, ts=jnp.array([0.0]), weights=m, targets=y, **kw)
    g32 = jax.grad(f)(x0, ens, True, 32)
    live = np.asarray(m > 0)
    expect = np.asarray(g32) / np.where(live, np.asarray(m), 1)[:, None]
    np.testing.assert_allclose(np.asarray(ps[0])[live], expect[live], rtol=1e-4, atol=2e-5)


def test_dense_output_is_continuous_and_hits_the_step_values():
    ens, x0, m, _ = _instance()
    sol = rk.solve(
        diffrax.Tsit5(),
        lambda theta, t, x: mfattn.velocity(theta, x, x, m, beta=BETA),
        lambda t: limit.param_at(ens, t, limit.uniform_grid(5, jnp.float64)),
        x0,
        1.0,
        0.0,  # backwards in time
        STEPS,
    )
    assert sol.ys.shape == (STEPS + 1, *x0.shape)
    times = 1.0 - jnp.arange(STEPS + 1) / STEPS
    _close(jax.vmap(sol.evaluate)(times), sol.ys, tol=1e-13)
    eps = 1e-9
    _close(jax.vmap(sol.evaluate)(times[1:-1] + eps), jax.vmap(sol.evaluate)(times[1:-1] - eps), tol=1e-7)


def test_fixed_steps_rejects_bad_settings(no_jaxtyping):
    ens, x0, m, _ = _instance()
    with pytest.raises(ValueError, match="FixedSteps: steps must be a positive integer"):
        limit.FixedSteps(0)
    with pytest.raises(ValueError, match="pass dt0=None"):
        limit.forward(ens, x0, beta=BETA, ts=jnp.array([1.0]), stepsize_controller=limit.FixedSteps(4), dt0=0.25)
    with pytest.raises(TypeError, match="explicit Runge-Kutta"):
        rk.solve(diffrax.Kvaerno5(), lambda th, t, y: y, lambda t: None, x0, 0.0, 1.0, 4)


def test_fixed_steps_with_another_adjoint_falls_back_to_diffrax():
    """BacksolveAdjoint (or an implicit solver) keeps Diffrax's loop, with dt0 = span / steps: the same numbers."""
    ens, x0, m, y = _instance()
    ts = jnp.array([0.5, 1.0])
    kw = dict(stepsize_controller=limit.FixedSteps(STEPS))
    a = limit.forward(ens, x0, beta=BETA, ts=ts, weights=m, adjoint=diffrax.BacksolveAdjoint(), **kw)
    b = limit.forward(ens, x0, beta=BETA, ts=ts, weights=m, **kw)
    _close(a, b)
