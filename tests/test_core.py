"""Float64 checks of every hand-derived derivative against autodiff of an independent naive oracle.

Each case is a random instance with non-uniform weights; the grid covers padding (weight 0), N = 1,
H = 1, L = 1, k < d, k > d, beta in {0, 1, 50} and the projection Pi_R. Relative errors are in the
Frobenius norm over all entries and must be <= 1e-10 (the issue's bound).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import mfattn
from mfattn.losses import MMD, TokenRegression

RTOL = 1e-10


@dataclasses.dataclass(frozen=True)
class Case:
    depth: int = 3
    heads: int = 2
    tokens: int = 6
    dim: int = 4
    head_dim: int = 3
    beta: float = 1.0
    padding: bool = False
    radius: float | None = None
    seed: int = 0

    def __str__(self):
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


CASES = [
    Case(),
    Case(padding=True),
    Case(tokens=1),
    Case(heads=1),
    Case(depth=1),
    Case(dim=5, head_dim=2),  # k < d
    Case(dim=3, head_dim=6),  # k > d
    Case(beta=0.0, padding=True),
    Case(beta=50.0, padding=True, seed=1),
    Case(radius=1.2, padding=True, seed=2),
    Case(depth=2, heads=3, tokens=9, dim=2, head_dim=2, beta=5.0, padding=True, radius=2.0, seed=3),
]


def instance(c: Case):
    k = jax.random.split(jax.random.key(c.seed), 5)
    params = mfattn.init_params(
        k[0], c.depth, c.heads, c.dim, c.head_dim, init="mean_noise", scale=0.5, dtype=jnp.float64
    )
    x0 = jax.random.normal(k[1], (c.tokens, c.dim), jnp.float64)
    m = jax.random.uniform(k[2], (c.tokens,), jnp.float64, 0.1, 1.0)
    if c.padding:
        m = m.at[c.tokens // 2].set(0.0)
    m = m / m.sum()
    targets = jax.random.normal(k[3], (c.tokens, c.dim), jnp.float64)
    p = jax.random.normal(k[4], (c.tokens, c.dim), jnp.float64)
    return params, x0, m, targets, p


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a - b)


def assert_rel(a, b, rtol=RTOL, what=""):
    err = rel(a, b)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def layer(params, l):
    return jax.tree.map(lambda x: x[l], params)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_forward_matches_naive_oracle(c):
    params, x0, m, _, _ = instance(c)
    traj = mfattn.forward(params, x0, beta=c.beta, weights=m, radius=c.radius)
    assert traj.shape == (c.depth + 1, c.tokens, c.dim)
    assert_rel(traj, ref.forward(params, x0, m, c.beta, c.radius), 1e-13, "trajectory")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_jacobian_and_lions_terms(c):
    """J(x_i)^T p_i against jax.jacfwd in the query, and the coupling term against (1/m_i) times the
    derivative in atom i (at a zero-weight atom: d/dx_i d/dm_i, through the oracle)."""
    params, x0, m, _, p = instance(c)
    theta = layer(params, 0)
    field = mfattn.adjoint_field(theta, x0, p, m, beta=c.beta, radius=c.radius)

    # Jacobian in the query: full (d x d) Jacobians by jacfwd, then J^T p.
    jac = jax.vmap(jax.jacfwd(lambda x: ref.velocity(theta, x[None], x0, m, c.beta, c.radius)[0]))(x0)
    jt_p = jnp.einsum("nij,ni->nj", jac, p)

    # Coupling: d/dx_i sum_j m_j <p_j, F(mu, x_j)> with queries held fixed, through the masses so that
    # the zero-weight atom is covered: d/dx_i d/dm_i sum_j n_j <p_j, F(mu_m, x_j)>, n = m held fixed.
    def coupling(keys, masses):
        return jnp.sum(m[:, None] * p * ref.velocity(theta, x0, keys, masses, c.beta, c.radius))

    lions_live = jax.grad(coupling)(x0, m) / jnp.where(m > 0, m, 1)[:, None]
    mixed = jax.jacfwd(jax.grad(coupling, argnums=1), argnums=0)(x0, m)  # (N, N, d): d/dx_j d/dm_i
    lions_all = jnp.where((m > 0)[:, None], lions_live, jnp.einsum("iid->id", mixed))
    assert_rel(field, jt_p + lions_all, RTOL, "adjoint field")

    # The two terms separately (through the per-head internals).
    out = jax.vmap(lambda th: _head_terms(th, x0, m, p, c))(theta)
    if c.radius is None:
        assert_rel(jnp.mean(out[0], 0), jt_p, RTOL, "Jacobian term")
        assert_rel(jnp.mean(out[1], 0), lions_all, RTOL, "Lions term")


def _head_terms(theta, x0, m, p, c):
    from mfattn.adjoint import _head_backward
    from mfattn.attention import SOFTMAX, project_ball

    keys = project_ball(x0, c.radius)
    o = _head_backward(SOFTMAX, theta.wq, theta.wk, theta.wv, theta.wo, x0, keys, m, p, c.beta, field=True, grad=False)
    return o["term1"], o["term2"]


def _loss_through_oracle(params, x0, m, targets, c, loss):
    def f(eps, masses):
        traj = ref.forward(params, x0, masses, c.beta, c.radius, perturb=eps)
        return loss(traj[-1], masses, targets)

    return f


@pytest.mark.parametrize("loss", [TokenRegression(), MMD(bandwidth=1.5)], ids=["regression", "mmd"])
@pytest.mark.parametrize("c", CASES, ids=str)
def test_adjoints_are_rescaled_gradients(c, loss):
    """Every p^l against (1/m_i) d ell / d x_i^l; at a zero-weight token, against d/dx_i d/dm_i ell."""
    params, x0, m, targets, _ = instance(c)
    if isinstance(loss, MMD):
        targets = (targets, jnp.full(c.tokens, 1.0 / c.tokens))
    traj = mfattn.forward(params, x0, beta=c.beta, weights=m, radius=c.radius)
    ps = mfattn.adjoint(params, traj, loss.lions(traj[-1], m, targets), beta=c.beta, weights=m, radius=c.radius)
    assert ps.shape == traj.shape

    f = _loss_through_oracle(params, x0, m, targets, c, loss)
    eps0 = jnp.zeros_like(traj)
    expect = jax.grad(f)(eps0, m) / jnp.where(m > 0, m, 1)[None, :, None]
    for i in np.flatnonzero(np.asarray(m) == 0):
        expect = expect.at[:, i].set(jax.grad(lambda e, i=i: jax.grad(f, argnums=1)(e, m)[i])(eps0)[:, i])
    assert_rel(ps, expect, RTOL, "adjoints")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_param_grad_is_LH_times_gradient(c):
    params, x0, m, targets, _ = instance(c)
    loss = TokenRegression()
    traj = mfattn.forward(params, x0, beta=c.beta, weights=m, radius=c.radius)
    ps = mfattn.adjoint(params, traj, loss.lions(traj[-1], m, targets), beta=c.beta, weights=m, radius=c.radius)
    g = mfattn.param_grad(params, traj, ps, beta=c.beta, weights=m, radius=c.radius)
    expect = jax.grad(lambda prm: loss(ref.forward(prm, x0, m, c.beta, c.radius)[-1], m, targets))(params)
    scale = c.depth * c.heads
    total = np.sqrt(sum(np.sum(np.asarray(e) ** 2) for e in jax.tree.leaves(expect)))
    for name in ("wq", "wk", "wv", "wo"):
        a, b = getattr(g, name), scale * getattr(expect, name)
        err = np.linalg.norm(np.asarray(a - b))
        # Per block relative to the block's own norm, or to the whole gradient for blocks that vanish
        # identically (W_Q, W_K at beta = 0).
        assert err <= RTOL * max(np.linalg.norm(np.asarray(b)), 1e-3 * scale * total), (name, err)


@pytest.mark.parametrize("method", ["adjoint", "autodiff"])
@pytest.mark.parametrize("c", [CASES[1], CASES[8], CASES[9]], ids=str)
def test_loss_and_grad(c, method):
    params, x0, m, targets, _ = instance(c)
    loss = TokenRegression()
    value, grads = mfattn.loss_and_grad(
        params, x0, loss, beta=c.beta, weights=m, targets=targets, radius=c.radius, method=method
    )
    expect_v, expect_g = jax.value_and_grad(lambda p: loss(ref.forward(p, x0, m, c.beta, c.radius)[-1], m, targets))(
        params
    )
    assert abs(float(value - expect_v)) <= 1e-12 * abs(float(expect_v))
    assert isinstance(grads, mfattn.Params)
    assert_rel(
        jnp.concatenate([x.ravel() for x in jax.tree.leaves(grads)]),
        jnp.concatenate([x.ravel() for x in jax.tree.leaves(expect_g)]),
        RTOL,
        "grads",
    )


@pytest.mark.parametrize("loss", [TokenRegression(), TokenRegression(readout=jnp.eye(2, 4) + 0.3), MMD(0.7)])
def test_losses_lions_derivative(loss):
    k = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k[0], (7, 4), jnp.float64)
    m = jax.random.uniform(k[1], (7,), jnp.float64).at[2].set(0.0)
    m = m / m.sum()
    if isinstance(loss, MMD):
        y = (jax.random.normal(k[2], (5, 4), jnp.float64), jax.random.dirichlet(k[3], jnp.ones(5)))
    else:
        y = jax.random.normal(k[2], (7, loss.readout.shape[0] if loss.readout is not None else 4), jnp.float64)
    got = loss.lions(x, m, y)
    live = jax.grad(loss)(x, m, y) / jnp.where(m > 0, m, 1)[:, None]
    mixed = jax.jacfwd(jax.grad(loss, argnums=1), argnums=0)(x, m, y)
    expect = jnp.where((m > 0)[:, None], live, jnp.einsum("iid->id", mixed))
    assert_rel(got, expect, 1e-12, "lions")


@pytest.mark.parametrize("padding", ["zero", "exact"])
def test_autodiff_loss(padding):
    fn = lambda x, m, y: jnp.sum(m * jnp.sum((x - y) ** 4, -1)) + jnp.sum(m @ jnp.tanh(x @ x.T) @ m)
    loss = mfattn.losses.AutodiffLoss(fn, padding=padding)
    k = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k[0], (6, 3), jnp.float64)
    m = jax.random.uniform(k[1], (6,), jnp.float64).at[4].set(0.0)
    m = m / m.sum()
    y = jax.random.normal(k[2], (6, 3), jnp.float64)
    got = loss.lions(x, m, y)
    live = np.asarray(m > 0)
    assert_rel(got[live], (jax.grad(fn)(x, m, y) / m[:, None])[live], 1e-12, "live atoms")
    if padding == "zero":
        assert np.all(np.asarray(got[~live]) == 0)
    else:
        mixed = jax.jacfwd(jax.grad(fn, argnums=1), argnums=0)(x, m, y)
        assert_rel(got[~live], jnp.einsum("iid->id", mixed)[~live], 1e-12, "zero-weight atom")
    assert float(loss(x, m, y)) == float(fn(x, m, y))


def test_float32_matches_float64():
    """Float32 forward, adjoints and gradients within a stated relative tolerance of float64."""
    c = Case(depth=4, heads=3, tokens=16, dim=8, head_dim=8, beta=2.0, padding=True)
    params, x0, m, targets, _ = instance(c)
    loss = TokenRegression()
    v64, g64 = mfattn.loss_and_grad(params, x0, loss, beta=c.beta, weights=m, targets=targets)
    p32 = params.astype(jnp.float32)
    v32, g32 = mfattn.loss_and_grad(
        p32,
        x0.astype(jnp.float32),
        loss,
        beta=c.beta,
        weights=m.astype(jnp.float32),
        targets=targets.astype(jnp.float32),
    )
    traj32 = mfattn.forward(p32, x0.astype(jnp.float32), beta=c.beta, weights=m.astype(jnp.float32))
    traj64 = mfattn.forward(params, x0, beta=c.beta, weights=m)
    assert traj32.dtype == jnp.float32 and g32.wq.dtype == jnp.float32
    # float32 unit roundoff is 6e-8; a few hundred operations deep, 1e-5 relative is a safe statement.
    assert_rel(traj32, traj64, 1e-5, "float32 trajectory")
    assert abs(float(v32) - float(v64)) <= 1e-5 * abs(float(v64))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64)):
        assert_rel(a, b, 1e-4, "float32 gradient")


def test_permutation_equivariance():
    c = Case(tokens=7, padding=True, beta=3.0)
    params, x0, m, targets, _ = instance(c)
    perm = np.random.default_rng(0).permutation(c.tokens)
    loss = TokenRegression()
    traj = mfattn.forward(params, x0, beta=c.beta, weights=m)
    traj_p = mfattn.forward(params, x0[perm], beta=c.beta, weights=m[perm])
    np.testing.assert_allclose(traj_p, traj[:, perm], rtol=1e-13, atol=1e-13)
    v, g = mfattn.loss_and_grad(params, x0, loss, beta=c.beta, weights=m, targets=targets)
    vp, gp = mfattn.loss_and_grad(params, x0[perm], loss, beta=c.beta, weights=m[perm], targets=targets[perm])
    np.testing.assert_allclose(vp, v, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)


def test_beta_zero_closed_form():
    """beta = 0: Gamma = B (mean of mu), so the weighted mean obeys xbar^{l+1} = (I + Bbar_l / L) xbar^l
    with Bbar_l the layer's average of W_O W_V^T, and every token moves by the same vector."""
    c = Case(depth=5, heads=3, tokens=8, dim=4, head_dim=3, beta=0.0, padding=True)
    params, x0, m, _, _ = instance(c)
    traj = mfattn.forward(params, x0, beta=0.0, weights=m)
    xbar = m @ x0
    for l in range(c.depth):
        bbar = jnp.mean(jnp.einsum("hik,hjk->hij", params.wo[l], params.wv[l]), axis=0)
        np.testing.assert_allclose(traj[l + 1] - traj[l], jnp.broadcast_to(bbar @ xbar / c.depth, x0.shape), rtol=1e-12)
        xbar = xbar + bbar @ xbar / c.depth
        np.testing.assert_allclose(m @ traj[l + 1], xbar, rtol=1e-12)


def test_padding_has_exactly_no_influence():
    c = Case(tokens=6, padding=True, beta=50.0)
    params, x0, m, targets, _ = instance(c)
    loss = TokenRegression()
    i = c.tokens // 2
    moved = x0.at[i].set(jnp.array([30.0, -20.0, 10.0, 5.0]))  # far away: huge scores against it
    t1 = mfattn.forward(params, x0, beta=c.beta, weights=m)
    t2 = mfattn.forward(params, moved, beta=c.beta, weights=m)
    live = np.asarray(m > 0)
    assert np.array_equal(np.asarray(t1[:, live]), np.asarray(t2[:, live]))
    _, g1 = mfattn.loss_and_grad(params, x0, loss, beta=c.beta, weights=m, targets=targets)
    _, g2 = mfattn.loss_and_grad(params, moved, loss, beta=c.beta, weights=m, targets=targets.at[i].set(1e3))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.all(np.isfinite(np.asarray(a)))


def test_projection_identity_inside_ball():
    c = Case(padding=True, beta=2.0)
    params, x0, m, targets, _ = instance(c)
    loss = TokenRegression()
    v1, g1 = mfattn.loss_and_grad(params, x0, loss, beta=c.beta, weights=m, targets=targets)
    v2, g2 = mfattn.loss_and_grad(params, x0, loss, beta=c.beta, weights=m, targets=targets, radius=1e6)
    np.testing.assert_allclose(v1, v2, rtol=1e-14)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_vmap_and_jit_match_unbatched_without_retracing():
    c = Case(tokens=5, padding=False)
    params, _, _, _, _ = instance(c)
    k = jax.random.split(jax.random.key(9), 3)
    xs = jax.random.normal(k[0], (4, c.tokens, c.dim), jnp.float64)
    ws = jax.random.dirichlet(k[1], jnp.ones(c.tokens), (4,)).at[1, 2].set(0.0)
    ws = ws / ws.sum(-1, keepdims=True)
    ys = jax.random.normal(k[2], (4, c.tokens, c.dim), jnp.float64)
    loss = TokenRegression()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def batched(params, xs, ws, ys):
        return jax.vmap(lambda x, w, y: mfattn.loss_and_grad(params, x, loss, beta=1.5, weights=w, targets=y))(
            xs, ws, ys
        )

    values, grads = batched(params, xs, ws, ys)
    values2, _ = batched(params, xs * 1.1, ws, ys)  # same shapes: no new trace
    assert not np.allclose(values, values2)
    for b in range(4):
        v, g = mfattn.loss_and_grad(params, xs[b], loss, beta=1.5, weights=ws[b], targets=ys[b])
        np.testing.assert_allclose(values[b], v, rtol=1e-13)
        for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(g)):
            np.testing.assert_allclose(a[b], e, rtol=1e-12, atol=1e-15)
    traj = jax.jit(jax.vmap(lambda x, w: mfattn.forward(params, x, beta=1.5, weights=w)))(xs, ws)
    np.testing.assert_allclose(traj[3], mfattn.forward(params, xs[3], beta=1.5, weights=ws[3]), rtol=1e-13)


def test_compiles_once_for_new_values():
    c = Case()
    params, x0, m, _, _ = instance(c)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, x, beta):
        return mfattn.forward(params, x, beta=beta, weights=m)

    run(params, x0, 1.0)
    run(jax.tree.map(lambda a: a * 0.5, params), x0 + 1, 2.0)


@pytest.mark.parametrize("init", ["xavier_uniform", "truncated_normal", "mean_noise"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 2, 3), (8, 64, 2, 2), (1, 4096, 2, 2)])
def test_init_params_are_the_direct_draws(init, shape):
    # init_params draws each block as a prefix of a power-of-two draw (one compiled program per size class):
    # the numbers must be those of jax.random at the block's own shape, eagerly and under jit, in both precisions.
    depth, heads, dim, head_dim = shape
    key = jax.random.key(7)
    a = 0.7 * np.sqrt(6.0 / (dim + head_dim))
    std = 0.7 * np.sqrt(2.0 / (dim + head_dim))
    for dtype in (jnp.float64, jnp.float32):
        got = mfattn.init_params(key, depth, heads, dim, head_dim, init=init, scale=0.7, dtype=dtype)
        jitted = jax.jit(
            lambda k, dtype=dtype: mfattn.init_params(k, depth, heads, dim, head_dim, init=init, scale=0.7, dtype=dtype)
        )(key)
        for i, k in enumerate(jax.random.split(key, 4)):
            if init == "truncated_normal":
                want = std * jax.random.truncated_normal(k, -2.0, 2.0, shape, dtype)
            else:
                want = jax.random.uniform(k, shape, dtype, -a, a)
                if init == "mean_noise":
                    want = jnp.eye(dim, head_dim, dtype=dtype)[None, None] + want
            np.testing.assert_array_equal(np.asarray(jax.tree.leaves(got)[i]), np.asarray(want))
            np.testing.assert_array_equal(np.asarray(jax.tree.leaves(jitted)[i]), np.asarray(want))


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(no_jaxtyping):
    c = Case(tokens=5)
    params, x0, m, _, _ = instance(c)
    f = lambda **kw: mfattn.forward(**{"params": params, "tokens": x0, "beta": 1.0, "weights": m, **kw})
    with pytest.raises(ValueError, match="dimension d = 3 but params have d = 4"):
        f(tokens=x0[:, :3])
    with pytest.raises(ValueError, match="leading batch axis"):
        f(tokens=x0[None])
    with pytest.raises(ValueError, match=r"weights must have shape \(N,\) = \(5,\)"):
        f(weights=m[:4])
    with pytest.raises(ValueError, match=r"forward: weights must be >= 0, got weights\[0\] = -0.1"):
        f(weights=m.at[0].set(-0.1))
    with pytest.raises(ValueError, match="weights must sum to 1"):
        f(weights=m * 2)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        f(beta=-1.0)
    with pytest.raises(ValueError, match="tokens contains NaN"):
        f(tokens=x0.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="params contains NaN"):
        f(params=jax.tree.map(lambda a: a.at[0, 0, 0, 0].set(jnp.inf), params))
    with pytest.raises(ValueError, match="same shape"):
        mfattn.Params(params.wq, params.wk, params.wv, params.wo[:, :, :, :2])
    with pytest.raises(TypeError, match="forward: params must be an mfattn.Params"):
        mfattn.forward((params.wq, params.wk, params.wv, params.wo), x0, beta=1.0)
    traj = mfattn.forward(params, x0, beta=1.0, weights=m)
    with pytest.raises(ValueError, match="trajectory must have shape"):
        mfattn.adjoint(params, traj[1:], traj[-1], beta=1.0, weights=m)
    with pytest.raises(ValueError, match="terminal must have shape"):
        mfattn.adjoint(params, traj, traj[-1, :4], beta=1.0, weights=m)
    with pytest.raises(ValueError, match="method must be"):
        mfattn.loss_and_grad(params, x0, TokenRegression(), beta=1.0, targets=x0, method="finite-differences")
    with pytest.raises(ValueError, match="init"):
        mfattn.init_params(jax.random.key(0), 2, 2, 3, 3, init="orthogonal")


def test_bad_values_under_jit_are_reported(no_jaxtyping):
    """Traced inputs cannot be inspected in Python: the checks run inside the computation
    (equinox.error_if) and raise before a result is returned."""
    c = Case(tokens=5)
    params, x0, m, _, _ = instance(c)
    run = jax.jit(lambda x, w, b: mfattn.forward(params, x, beta=b, weights=w))
    run(x0, m, 1.0)
    for args, msg in [
        ((x0.at[1, 1].set(jnp.nan), m, 1.0), "tokens contains NaN"),
        ((x0, m * 2, 1.0), "weights must sum to 1"),
        ((x0, m.at[0].set(-m[0]), 1.0), "weights must be >= 0"),
        ((x0, m, -2.0), "beta must be >= 0"),
    ]:
        with pytest.raises(Exception, match=msg):
            jax.block_until_ready(run(*args))
