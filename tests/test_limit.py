"""The mean-field limit: hand adjoint ODE against autodiff through Diffrax, 1/L convergence of the
discrete model, explicit Euler = the discrete model, Monte-Carlo error, ensemble and coupled training."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn import limit, optim
from mfattn.limit import _dense_forward_backward, _settings
from mfattn.losses import MMD, TokenRegression

BETA = 1.5


def _instance(grid_size=5, particles=6, n=5, d=3, k=2, seed=0, padding=True, variation=0.3):
    key = jax.random.split(jax.random.key(seed), 5)
    ens = limit.init_ensemble(key[0], grid_size, particles, d, k, init="mean_noise", scale=0.5, dtype=jnp.float64)
    # a field that varies along the depth
    ens = jax.tree.map(lambda x: x + variation * jax.random.normal(key[4], x.shape, x.dtype), ens)
    x0 = jax.random.normal(key[1], (n, d), jnp.float64)
    m = jax.random.uniform(key[2], (n,), jnp.float64, 0.2, 1.0)
    if padding:
        m = m.at[n // 2].set(0.0)
    m = m / m.sum()
    y = jax.random.normal(key[3], (n, d), jnp.float64)
    return ens, x0, m, y


@pytest.mark.parametrize(
    "adjoint", [diffrax.RecursiveCheckpointAdjoint(), diffrax.BacksolveAdjoint()], ids=["checkpoint", "backsolve"]
)
@pytest.mark.parametrize("loss", [TokenRegression(), MMD(1.0)], ids=["regression", "mmd"])
def test_adjoint_ode_matches_autodiff_through_diffrax(adjoint, loss):
    ens, x0, m, y = _instance()
    targets = y if isinstance(loss, TokenRegression) else (y, jnp.full(y.shape[0], 1.0 / y.shape[0]))
    tol = dict(rtol=1e-11, atol=1e-12)
    value, xs, ps = limit.forward_backward(
        ens, x0, loss, beta=BETA, ts=jnp.array([0.0, 0.5, 1.0]), weights=m, targets=targets, **tol
    )

    def f(x):
        x1 = limit.forward(ens, x, beta=BETA, ts=jnp.array([1.0]), weights=m, adjoint=adjoint, **tol)[-1]
        return loss(x1, m, targets)

    live = np.asarray(m > 0)
    expect = jax.grad(f)(x0) / jnp.where(m > 0, m, 1)[:, None]
    np.testing.assert_allclose(value, f(x0), rtol=1e-12)
    err = np.linalg.norm(ps[0][live] - expect[live]) / np.linalg.norm(expect[live])
    assert err < 1e-8, err  # the solver tolerance
    np.testing.assert_allclose(xs[0], x0, rtol=0, atol=0)


def test_explicit_euler_on_piecewise_field_is_the_discrete_model():
    depth = 6
    ens, x0, m, _ = _instance(grid_size=depth + 1)
    xs = limit.forward(
        ens,
        x0,
        beta=BETA,
        ts=jnp.linspace(0, 1, depth + 1),
        weights=m,
        interpolation="piecewise",
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=1.0 / depth,
    )
    discrete = jax.tree.map(lambda a: a[:depth], ens)
    np.testing.assert_allclose(xs, mfattn.forward(discrete, x0, beta=BETA, weights=m), rtol=0, atol=1e-12)
    # with a SaveAt of our own: the whole diffrax Solution, here every Euler step
    sol = limit.forward(
        ens,
        x0,
        beta=BETA,
        ts=None,
        weights=m,
        interpolation="piecewise",
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=1.0 / depth,
        saveat=diffrax.SaveAt(t0=True, steps=True),
    )
    np.testing.assert_allclose(sol.ys[: depth + 1], xs, rtol=0, atol=1e-12)
    # discretize() builds that same model from the field
    np.testing.assert_array_equal(limit.discretize(ens, depth, interpolation="piecewise").wq, discrete.wq)


def _fit_slope(ls, errs):
    return np.polyfit(np.log(ls), np.log(errs), 1)[0]


def test_discrete_model_converges_to_the_limit_like_one_over_L():
    """The discrete model whose layer-l heads are the ensemble at t_l: errors in x, p and g are O(1/L)."""
    # A field that moves the tokens by ~0.7 and varies moderately in t, so that L = 8 is already in the
    # asymptotic regime (with a rougher field, variation=0.3, the fitted slopes are -0.85 to -0.9: the
    # error ratios per doubling of L climb 1.65, 1.8, 1.9, 1.95, 1.98 towards 2, but too slowly).
    ens, x0, m, y = _instance(grid_size=5, particles=6, n=5, padding=True, variation=0.1)
    ens = jax.tree.map(lambda a: 0.7 * a, ens)
    loss = TokenRegression()
    s = _settings(None, None, None, 4096, None, 1e-12, 1e-13)
    grid = limit.uniform_grid(5)
    _, xsol, psol = _dense_forward_backward(ens, x0, m, y, loss, jnp.asarray(BETA), None, grid, "linear", s)
    ls = [8, 16, 32, 64, 128, 256]
    ex, ep, eg = [], [], []
    for depth in ls:
        params = limit.discretize(ens, depth)
        traj = mfattn.forward(params, x0, beta=BETA, weights=m)
        p = mfattn.adjoint(params, traj, loss.lions(traj[-1], m, y), beta=BETA, weights=m)
        g = mfattn.param_grad(params, traj, p, beta=BETA, weights=m)
        t = jnp.arange(depth + 1) / depth
        x_lim, p_lim = jax.vmap(xsol.evaluate)(t), jax.vmap(psol.evaluate)(t)
        g_lim = limit.grad_map_on_grid(params, x_lim[:-1], p_lim[:-1], beta=BETA, weights=m)
        ex.append(float(jnp.max(jnp.linalg.norm(traj - x_lim, axis=-1))))
        ep.append(float(jnp.max(jnp.linalg.norm(p - p_lim, axis=-1))))
        # largest Frobenius error over the blocks (layer, head, matrix)
        sq = sum(jnp.sum((a - b) ** 2, axis=(-2, -1)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_lim)))
        eg.append(float(jnp.sqrt(jnp.max(sq))))
    for name, errs in (("x", ex), ("p", ep), ("g", eg)):
        slope = _fit_slope(ls, errs)
        assert -1.1 <= slope <= -0.9, (name, slope, errs)
        ratios = np.asarray(errs[:-1]) / np.asarray(errs[1:])
        assert np.all(ratios > 1.6), (name, ratios)  # roughly halving at every doubling of L


def test_monte_carlo_error_shrinks_like_inverse_sqrt_M():
    _, x0, m, _ = _instance(n=6, padding=False)
    ms = [8, 32, 128, 512]
    rms = []
    for M in ms:
        make = lambda k, M=M: limit.init_ensemble(k, 3, M, 3, 2, init="mean_noise", scale=1.0, dtype=jnp.float64)
        rms.append(
            limit.monte_carlo_error(jax.random.key(M), make, x0, beta=BETA, pairs=6, weights=m, rtol=1e-6, atol=1e-8)[
                "rms"
            ]
        )
    slope = _fit_slope(ms, rms)
    assert -0.65 <= slope <= -0.35, (slope, rms)


def test_coupled_heads_follow_the_ensemble_flow_map():
    """Coupled heads that start equal to the ensemble's particles at the grid times t_l = l / L are moved
    by the same flow map, so they stay equal to them (paper eq. 23); and the limit's loss decreases."""
    depth = 4
    ens, x0, m, y = _instance(grid_size=depth + 1, particles=3, n=4, padding=False)
    coupled = jax.tree.map(lambda a: a[:depth], ens)
    opt = optim.blockwise_adamw(3e-2, weight_decay=1e-3)
    state = limit.init_state(opt, ens, coupled)
    batch = (jnp.stack([x0, -x0]), jnp.stack([m, m]), jnp.stack([y, y]))
    losses = []
    for _ in range(5):
        state, metrics = limit.train_step(
            state, batch, loss=TokenRegression(), optimizer=opt, beta=BETA, rtol=1e-10, atol=1e-12
        )
        losses.append(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(state.coupled), jax.tree.leaves(state.ensemble)):
        np.testing.assert_allclose(a, b[:depth], rtol=0, atol=1e-9)
    assert not np.allclose(state.ensemble.wq, ens.wq)
    assert losses[-1] < losses[0], losses


def test_limit_rejects_bad_input(no_jaxtyping):
    ens, x0, m, y = _instance()
    with pytest.raises(ValueError, match="interpolation"):
        limit.forward(ens, x0, beta=1.0, ts=jnp.array([1.0]), interpolation="cubic")
    with pytest.raises(ValueError, match="grid must be strictly increasing"):
        limit.forward(ens, x0, beta=1.0, ts=jnp.array([1.0]), grid=jnp.array([0, 0.5, 0.4, 0.9, 1.0]))
    with pytest.raises(ValueError, match="grid must have shape"):
        limit.forward(ens, x0, beta=1.0, ts=jnp.array([1.0]), grid=jnp.linspace(0, 1, 3))
    # A concrete grid closed over by a jitted caller is still checked (and a good one accepted), not a tracer error.
    bad, good = jnp.array([0, 0.5, 0.4, 0.9, 1.0]), limit.uniform_grid(5, x0.dtype)
    with pytest.raises(ValueError, match="grid must be strictly increasing"):
        jax.jit(lambda x: limit.forward(ens, x, beta=1.0, ts=jnp.array([1.0]), grid=bad))(x0)
    out = jax.jit(lambda x: limit.forward(ens, x, beta=1.0, ts=jnp.array([1.0]), grid=good))(x0)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(out))
    with pytest.raises(ValueError, match="ts must be"):
        limit.forward(ens, x0, beta=1.0, ts=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="weights must sum to 1"):
        limit.forward(ens, x0, beta=1.0, ts=jnp.array([1.0]), weights=2 * m)
    with pytest.raises(ValueError, match="at least 2 grid times"):
        limit.forward(jax.tree.map(lambda a: a[:1], ens), x0, beta=1.0, ts=jnp.array([1.0]))
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, N, d\)"):
        limit.batch_grad_map(ens, x0, m, y, TokenRegression(), beta=1.0)


LIMIT_VARIANTS = {
    "causal-sigmoid": mfattn.Attention("sigmoid", causal=True, bias=0.3),
    "sinkhorn": mfattn.Attention("sinkhorn", sinkhorn_iters=3),
    "sphere": mfattn.Attention(residual="sphere"),
}


@pytest.mark.parametrize("name", list(LIMIT_VARIANTS))
def test_variant_adjoint_ode_matches_autodiff_through_diffrax(name):
    """The hand adjoint ODE of each kind of variant (closed form, autodiff Lions term, the normalised
    residual's projected field) against jax.grad through the forward solve."""
    spec = LIMIT_VARIANTS[name]
    ens, x0, m, y = _instance(grid_size=3, particles=3, n=4)
    if spec.residual == "sphere":
        x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    loss = TokenRegression()
    tol = dict(rtol=1e-11, atol=1e-12, attention=spec)
    value, xs, ps = limit.forward_backward(
        ens, x0, loss, beta=BETA, ts=jnp.array([0.0, 1.0]), weights=m, targets=y, **tol
    )

    def f(x):
        return loss(limit.forward(ens, x, beta=BETA, ts=jnp.array([1.0]), weights=m, **tol)[-1], m, y)

    live = np.asarray(m > 0)
    expect = jax.grad(f)(x0) / jnp.where(m > 0, m, 1)[:, None]
    err = np.linalg.norm(ps[0][live] - expect[live]) / np.linalg.norm(expect[live])
    assert err < 1e-8, err
    if spec.residual == "sphere":  # the projected field keeps the tokens on the sphere
        np.testing.assert_allclose(np.linalg.norm(xs[-1], axis=-1), 1.0, atol=1e-9)


def test_normalised_residual_converges_to_the_projected_limit():
    """Discrete x^{l+1} = N(x^l + F/L) against the limit dx/dt = F - <x, F> x: error O(1/L)."""
    spec = mfattn.Attention(residual="sphere")
    ens, x0, m, _ = _instance(grid_size=3, particles=4, n=5, variation=0.1)
    x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    x1 = limit.forward(ens, x0, beta=BETA, ts=jnp.array([1.0]), weights=m, rtol=1e-10, atol=1e-12, attention=spec)[-1]
    errs = []
    for depth in (8, 32):
        disc = mfattn.forward(limit.discretize(ens, depth), x0, beta=BETA, weights=m, attention=spec)[-1]
        errs.append(float(np.max(np.linalg.norm(disc - x1, axis=-1))))
    assert errs[0] / errs[1] > 3.0, errs  # 4 for an exact first-order rate


def test_limit_rejects_depth_exponent_other_than_one(no_jaxtyping):
    ens, x0, m, _ = _instance()
    with pytest.raises(ValueError, match="depth_exponent"):
        limit.forward(ens, x0, beta=BETA, ts=jnp.array([1.0]), attention=mfattn.Attention(depth_exponent=0.5))


def test_lanes_kernels_in_the_limit_match_vmapped():
    """The limit's solves, gradient maps and coupled heads on the lanes kernels (``Attention(heads="lanes")``)
    equal those on the vmapped kernels to 1e-12 (float64, fixed Tsit5 steps, padding, 12 particles, 2 inputs), and
    the hand adjoint ODE on the lanes kernels matches autodiff through Diffrax (through the lanes kernels)."""
    ens, x0, m, y = _instance(particles=12)
    loss = TokenRegression()
    fixed = dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=0.125, max_steps=9)
    xb = jnp.stack([x0, 0.5 * x0[::-1]])
    wb, yb = jnp.stack([m, m[::-1]]), jnp.stack([y, -y])
    coupled = mfattn.init_params(jax.random.key(7), 4, 3, 3, 2, init="mean_noise", scale=0.5, dtype=jnp.float64)
    out = {}
    for loop in ("vmap", "lanes"):
        spec = mfattn.Attention(heads=loop)
        out[loop] = limit.batch_grad_map(ens, xb, wb, yb, loss, beta=BETA, coupled=coupled, attention=spec, **fixed)
    for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out["lanes"])):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    lanes = mfattn.Attention(heads="lanes")
    tol = dict(rtol=1e-11, atol=1e-12)
    _, _, ps = limit.forward_backward(
        ens, x0, loss, beta=BETA, ts=jnp.array([0.0, 1.0]), weights=m, targets=y, attention=lanes, **tol
    )

    def f(x):
        x1 = limit.forward(ens, x, beta=BETA, ts=jnp.array([1.0]), weights=m, attention=lanes, **tol)[-1]
        return loss(x1, m, y)

    live = np.asarray(m > 0)
    expect = jax.grad(f)(x0) / jnp.where(m > 0, m, 1)[:, None]
    err = np.linalg.norm(ps[0][live] - expect[live]) / np.linalg.norm(expect[live])
    assert err < 1e-8, err  # the solver tolerance, as for the vmapped kernels above
