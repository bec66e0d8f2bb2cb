"""The particle-major kernels (issue 13): velocity, adjoint field and gradient map for many particles, few tokens
and small d, k, checked in float64 against the per-head kernels (``Attention(kernel="heads")``, the code they
replace at these sizes) and against ``jax.grad`` (rel 1e-12), with padding (zero weights), N = 1, the
projection, causal masks and every closed-form attention kind; both forms (lanes for the smallest sizes, arrays
above ``LANES_UP_TO``); the size-based choice; and the limit's solves and gradient maps through them."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn import Attention, limit
from mfattn.adjoint import adjoint_field_and_grad_map
from mfattn.losses import TokenRegression

A = importlib.import_module("mfattn.attention")  # (mfattn.attention is also a function)
RTOL = 1e-12

KINDS = {
    "softmax": Attention(),
    "unnormalized": Attention("unnormalized"),
    "l2": Attention("l2", logit_scale="1/k"),
    "sigmoid": Attention("sigmoid", bias=-0.5),
    "causal-softmax": Attention(causal=True),
    "causal-l2": Attention("l2", causal=True),
    "causal-sigmoid": Attention("sigmoid", causal=True),
    "causal-unnormalized": Attention("unnormalized", causal=True),
}

# (particles, tokens, d, k, radius): lanes (N^2 max(d, k) <= 128), N = 1, and the array form (N = 12: 288 > 128)
SIZES = [(40, 4, 3, 2, 1.0), (33, 1, 2, 2, None), (36, 12, 2, 2, 1.5)]


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a - b)


def _instance(p, n, d, k, seed=0, padding=True, scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 4)
    theta = mfattn.init_params(ks[0], 1, p, d, k, init="mean_noise", scale=0.5, dtype=jnp.float64)
    theta = jax.tree.map(lambda a: a[0], theta)
    x = scale * jax.random.normal(ks[1], (n, d), jnp.float64)
    m = jax.random.uniform(ks[2], (n,), jnp.float64, 0.2, 1.0)
    if padding and n > 2:
        m = m.at[n // 2].set(0.0)
    m = m / m.sum()
    adj = jax.random.normal(ks[3], (n, d), jnp.float64)
    return theta, x, m, adj


def _layer(theta, x, m, adj, spec, radius, beta=2.0):
    kw = dict(beta=beta, radius=radius, attention=spec)
    f = mfattn.velocity(theta, x, x, m, **kw)
    g_field, g_map = adjoint_field_and_grad_map(theta, x, adj, m, **kw)
    return f, g_field, g_map, mfattn.adjoint_field(theta, x, adj, m, **kw), mfattn.grad_map(theta, x, adj, m, **kw)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"P{s[0]}N{s[1]}d{s[2]}k{s[3]}R{s[4]}")
@pytest.mark.parametrize("name", list(KINDS))
def test_particle_kernels_match_per_head_kernels(name, size):
    p, n, d, k, radius = size
    spec = KINDS[name]
    theta, x, m, adj = _instance(p, n, d, k, scale=0.5 if spec.kind == "unnormalized" else 1.0)
    assert A.kernel_strategy(dataclasses.replace(spec, kernel="auto"), p, n, d, k) == "particles"
    fast = jax.jit(lambda *a: _layer(*a, dataclasses.replace(spec, kernel="particles"), radius))(theta, x, m, adj)
    ref = jax.jit(lambda *a: _layer(*a, dataclasses.replace(spec, kernel="heads"), radius))(theta, x, m, adj)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        assert a.shape == b.shape and np.all(np.isfinite(np.asarray(a)))
        assert rel(a, b) <= RTOL, (name, size, rel(a, b))
    # the particle-major layout in and out
    pm = A.to_particle_major(theta)
    f_pm = mfattn.velocity(pm, x, x, m, beta=2.0, radius=radius, attention=spec)
    g_pm = mfattn.grad_map(pm, x, adj, m, beta=2.0, radius=radius, attention=spec)
    assert isinstance(g_pm, A.ParticleMajor) and g_pm.wq.shape == (d, k, p)
    assert rel(f_pm, ref[0]) <= RTOL
    for a, b in zip(A.from_particle_major(g_pm), jax.tree.leaves(ref[4])):
        assert rel(a, b) <= RTOL


@pytest.mark.parametrize("size", [(40, 4, 2, 2), (36, 12, 2, 2), (40, 1, 2, 3)], ids=str)
@pytest.mark.parametrize("name", ["softmax", "l2", "sigmoid", "causal-softmax", "unnormalized"])
def test_particle_kernels_match_autodiff(name, size):
    """``G_i = (1/m_i) d/dx_i sum_j m_j <p_j, F(mu, x_j)>`` at live tokens and ``g = P d/dtheta sum_i m_i <p_i, F>``
    (``F`` averages over the ``P`` particles), by ``jax.grad`` through the particle-major velocity."""
    p, n, d, k = size
    spec = dataclasses.replace(KINDS[name], kernel="particles")
    theta, x, m, adj = _instance(p, n, d, k, seed=1, scale=0.5 if spec.kind == "unnormalized" else 1.0)
    beta = 1.5

    def objective(th, xx):
        return jnp.sum(m[:, None] * adj * mfattn.velocity(th, xx, xx, m, beta=beta, attention=spec))

    g_th, g_x = jax.grad(objective, argnums=(0, 1))(theta, x)
    live = np.asarray(m > 0)
    expect_field = g_x / jnp.where(m > 0, m, 1)[:, None]
    field = mfattn.adjoint_field(theta, x, adj, m, beta=beta, attention=spec)
    assert rel(field[live], expect_field[live]) <= RTOL
    gmap = mfattn.grad_map(theta, x, adj, m, beta=beta, attention=spec)
    for a, b in zip(jax.tree.leaves(gmap), jax.tree.leaves(g_th)):
        assert rel(a, p * b) <= RTOL


def test_strategy_by_size_and_fallbacks():
    """The particle-major kernels at the limit's sizes only: the discrete model's sizes keep the per-head path
    (sequential heads on CPU from SEQUENTIAL_HEADS_FROM tokens), Sinkhorn, chunks and mixed precision fall back."""
    soft = Attention()
    assert A.kernel_strategy(soft, 32768, 4, 2, 2) == "particles"
    assert A.kernel_strategy(soft, 1024, 16, 4, 4) == "particles"
    assert A.kernel_strategy(soft, 8, 1024, 64, 64) == ("sequential" if jax.default_backend() == "cpu" else "heads")
    assert A.kernel_strategy(soft, 4, 256, 16, 16) in ("sequential", "heads")
    assert A.kernel_strategy(soft, 8, 4, 2, 2) == "heads"  # few heads
    assert A.kernel_strategy(Attention("sinkhorn"), 4096, 4, 2, 2) == "heads"
    assert A.kernel_strategy(Attention(kernel="particles", chunk=2), 4096, 4, 2, 2) == "heads"
    assert A.kernel_strategy(Attention(kernel="particles", matmul_dtype="bfloat16"), 8, 4, 2, 2) == "heads"
    assert A.kernel_strategy(Attention(kernel="sequential"), 4096, 4, 2, 2) == "sequential"
    assert A.use_lanes(4, 4, 2, 2) and not A.use_lanes(16, 16, 4, 4)
    with pytest.raises((ValueError, TypeError), match="kernel"):
        Attention(kernel="fast")


def test_sinkhorn_with_particle_major_input():
    """A particle-major ensemble with a kind the particle kernels do not implement uses the per-head path."""
    theta, x, m, adj = _instance(40, 4, 2, 2)
    spec = Attention("sinkhorn", sinkhorn_iters=3)
    pm = A.to_particle_major(theta)
    assert rel(mfattn.velocity(pm, x, x, m, beta=1.0, attention=spec), mfattn.velocity(theta, x, x, m, beta=1.0,
               attention=spec)) <= RTOL  # fmt: skip
    g = mfattn.grad_map(pm, x, adj, m, beta=1.0, attention=spec)
    g_ref = mfattn.grad_map(theta, x, adj, m, beta=1.0, attention=spec)
    for a, b in zip(A.from_particle_major(g), jax.tree.leaves(g_ref)):
        assert rel(a, b) <= RTOL


def test_float32_particle_kernels_close_to_float64():
    theta, x, m, adj = _instance(64, 4, 2, 2)
    out = {}
    for dt in (jnp.float64, jnp.float32):
        cast = lambda t, dt=dt: jax.tree.map(lambda a: a.astype(dt), t)  # noqa: E731
        out[dt] = _layer(cast(theta), cast(x), cast(m), cast(adj), Attention(), None)
        assert all(a.dtype == dt for a in jax.tree.leaves(out[dt]))
    for a, b in zip(jax.tree.leaves(out[jnp.float32]), jax.tree.leaves(out[jnp.float64])):
        assert rel(a, b) <= 1e-5


def _ensemble(particles=40, n=4, d=2, k=2, grid_size=5, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    ens = limit.init_ensemble(ks[0], grid_size, particles, d, k, init="mean_noise", scale=0.5, dtype=jnp.float64)
    ens = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(ks[4], a.shape, a.dtype), ens)
    x = jax.random.normal(ks[1], (2, n, d), jnp.float64)
    w = jax.random.uniform(ks[2], (2, n), jnp.float64, 0.2, 1.0).at[:, 1].set(0.0)
    w = w / w.sum(axis=1, keepdims=True)
    y = jax.random.normal(ks[3], (2, n, d), jnp.float64)
    return ens, x, w, y


@pytest.mark.parametrize("spec", [Attention(), Attention("l2", causal=True)], ids=["softmax", "causal-l2"])
def test_limit_solves_through_particle_kernels(spec):
    """``forward_backward`` and ``batch_grad_map`` (fixed Tsit5 steps as in the rates experiment) with the
    particle-major kernels equal the per-head kernels' to 1e-12."""
    ens, x, w, y = _ensemble()
    loss = TokenRegression()
    solve = dict(solver=mfattn.limit.diffrax.Tsit5(), stepsize_controller=mfattn.limit.diffrax.ConstantStepSize(),
                 dt0=1 / 8, max_steps=9)  # fmt: skip
    out = {}
    for kernel in ("particles", "heads"):
        s = dataclasses.replace(spec, kernel=kernel)
        fb = limit.forward_backward(ens, x[0], loss, beta=1.5, ts=jnp.linspace(0, 1, 5), weights=w[0], targets=y[0],
                                    attention=s, **solve)  # fmt: skip
        bg = limit.batch_grad_map(ens, x, w, y, loss, beta=1.5, attention=s, **solve)
        out[kernel] = (fb, bg)
    for a, b in zip(jax.tree.leaves(out["particles"]), jax.tree.leaves(out["heads"])):
        assert rel(a, b) <= RTOL
