"""Float64 checks of :mod:`mfattn.folded` (heads folded into ``A = W_Q W_K^T``, ``B = W_O W_V^T``) against the
per-head kernels of :mod:`mfattn.attention` / :mod:`mfattn.adjoint` and against autodiff.

Every supported kind (softmax, unnormalised, sigmoid; causal or not; the logit scalings), N = 1 and N = 5,
d != k, non-uniform weights with a padding token (whose adjoint 1e30 must not leak), the projection Pi_R and
large beta. The supremum search's value and input-gradient through the folded paths is checked against the
per-head paths (which the rates tests check against ``jax.grad`` of the naive oracle).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn import Attention, folded
from mfattn.losses import TokenRegression

KINDS = {
    "softmax": Attention(),
    "unnormalized": Attention("unnormalized"),
    "sigmoid": Attention("sigmoid", bias=-0.5),
    "causal-softmax": Attention(causal=True),
    "causal-unnormalized": Attention("unnormalized", causal=True),
    "causal-sigmoid": Attention("sigmoid", causal=True),
    "softmax-1/sqrt(k)": Attention(logit_scale="1/sqrt(k)"),
}


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a - b)


def instance(spec: Attention, tokens: int, *, depth=1, heads=9, dim=3, head_dim=2, seed=0):
    keys = jax.random.split(jax.random.key(seed + tokens), 5)
    params = mfattn.init_params(keys[0], depth, heads, dim, head_dim, init="mean_noise", scale=0.7, dtype=jnp.float64)
    scale = 0.5 if spec.kind == "unnormalized" else 1.0
    x = scale * jax.random.normal(keys[1], (tokens, dim), jnp.float64)
    m = jax.random.uniform(keys[2], (tokens,), jnp.float64, 0.1, 1.0)
    pad = tokens // 2 if tokens > 1 else None
    if pad is not None:
        m = m.at[pad].set(0.0)
    m = m / m.sum()
    p = jax.random.normal(keys[3], (tokens, dim), jnp.float64)
    y = jax.random.normal(keys[4], (tokens, dim), jnp.float64)
    return params, x, m, p, y, pad


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("name", list(KINDS))
def test_layer_kernels_equal_per_head(name, tokens):
    """One layer's velocity and adjoint field from folded heads equal the per-head kernels' to 1e-12 relative
    (9 heads, d = 3, k = 2, beta = 2.5, R = 0.9); nothing leaks from a padding token whose adjoint is 1e30."""
    spec = KINDS[name]
    params, x, m, p, _, pad = instance(spec, tokens)
    theta = jax.tree.map(lambda a: a[0], params)
    layer = jax.tree.map(lambda a: a[0], folded.fold(params))
    kw = dict(beta=2.5, radius=0.9, attention=spec)
    assert rel(folded.velocity(layer, x, m, **kw), mfattn.velocity(theta, x, x, m, **kw)) <= 1e-12
    g_ref = mfattn.adjoint_field(theta, x, p, m, **kw)
    assert rel(folded.adjoint_field(layer, x, p, m, **kw), g_ref) <= 1e-12
    if pad is not None:
        big = folded.adjoint_field(layer, x, p.at[pad].set(1e30), m, **kw)
        live = np.asarray(m) > 0
        assert np.all(np.isfinite(np.asarray(big)[live]))
        assert rel(np.asarray(big)[live], np.asarray(g_ref)[live]) <= 1e-12


@pytest.mark.parametrize("beta", [1.0, 30.0])
@pytest.mark.parametrize("name", ["softmax", "causal-sigmoid", "unnormalized"])
def test_model_paths_equal_per_head_and_autodiff(name, beta):
    """The folded model's trajectory and adjoints equal :func:`mfattn.forward` / :func:`mfattn.adjoint` to 1e-12
    (3 layers, 4 heads, N = 6 with padding, large beta included), and the adjoints equal ``jax.grad`` of the loss
    through the folded forward pass (the rescaled adjoint ``p^l = (1/m) d loss / d x^l`` at live tokens)."""
    spec = KINDS[name]
    if spec.kind == "unnormalized":
        beta = min(beta, 3.0)  # e^{s} unnormalised grows fast
    params, x, m, _, y, pad = instance(spec, 6, depth=3, heads=4)
    f = folded.fold(params)
    kw = dict(beta=beta, weights=m, radius=1.2, attention=spec)
    traj = folded.forward(f, x, **kw)
    ref = mfattn.forward(params, x, **kw)
    assert traj.shape == (4, 6, 3) and rel(traj, ref) <= 1e-12
    loss = TokenRegression()
    ps = folded.adjoint(f, traj, loss.lions(traj[-1], m, y), **kw)
    assert rel(ps, mfattn.adjoint(params, ref, loss.lions(ref[-1], m, y), **kw)) <= 1e-12
    grad = jax.grad(lambda x0: loss(folded.forward(f, x0, **kw)[-1], m, y))(x)
    live = np.asarray(m) > 0
    assert rel(np.asarray(ps[0])[live], np.asarray(grad)[live] / np.asarray(m)[live, None]) <= 1e-10


def test_the_search_gradient_equals_the_per_head_paths(getkey):
    """The supremum search's corrected surrogate error and its gradient in the input through folded paths
    (``Problem.fold_heads``, the default) equal those through the per-head paths to 1e-10 (float64), and the
    gradient equals a central difference of the value; an attention kind it does not fold takes the per-head
    paths."""
    from test_rates import _search_problem  # the rates tests' instance (cheap limit, depth groups, candidates)

    from mfattn.rates import core

    problem, _, disc, cand, w, _, paths, sur, _ = _search_problem(getkey, [0, 1])
    assert problem.fold_heads
    per_head = dataclasses.replace(problem, fold_heads=False)
    rows, gidx = jnp.asarray([0, 1, 1]), jnp.asarray([1, 0, 1])
    xs = cand[:3]
    offsets = tuple(0.01 * jax.random.normal(getkey(), (3, *a.shape[1:]), a.dtype) for a in paths)
    v1, g1 = core.surrogate_values_and_grads(problem, sur, disc[0], xs, w, rows, gidx, offsets, 4)
    v0, g0 = core.surrogate_values_and_grads(per_head, sur, disc[0], xs, w, rows, gidx, offsets, 4)
    assert rel(v1, v0) <= 1e-10 and rel(g1, g0) <= 1e-10
    assert float(jnp.linalg.norm(g1)) > 0
    direction = jax.random.normal(getkey(), xs.shape[1:], xs.dtype)
    eps = 1e-6

    def value(x):
        one = tuple(o[:1] for o in offsets)
        return core.surrogate_values_and_grads(problem, sur, disc[0], x[None], w, rows[:1], gidx[:1], one, 4)[0][0]

    fd = (value(xs[0] + eps * direction) - value(xs[0] - eps * direction)) / (2 * eps)
    assert abs(float(fd) - float(jnp.sum(g1[0] * direction))) <= 1e-6 * max(1.0, abs(float(fd)))
    # A kind mfattn.folded does not compute (l2) takes the per-head paths: the very same numbers.
    l2 = dataclasses.replace(problem, spec=Attention("l2"))
    y = problem.task.target(xs[0], w)
    for a, b in zip(l2.discrete_paths(sur, xs[0], w, y, fold=True), l2.discrete_paths(sur, xs[0], w, y)):
        np.testing.assert_array_equal(a, b)


def test_float32_within_stated_tolerance():
    """In float32 the folded kernels agree with the per-head ones to 1e-5 relative at the rates sizes (128 heads,
    N = 4, d = k = 2, beta = 1): the contraction order differs, nothing else."""
    spec = Attention()
    params, x, m, p, _, _ = instance(spec, 4, heads=128, dim=2, head_dim=2)
    params, x, m, p = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, m, p))
    theta = jax.tree.map(lambda a: a[0], params)
    layer = jax.tree.map(lambda a: a[0], folded.fold(params))
    assert rel(folded.velocity(layer, x, m, beta=1.0), mfattn.velocity(theta, x, x, m, beta=1.0)) <= 1e-5
    g = folded.adjoint_field(layer, x, p, m, beta=1.0)
    assert g.dtype == jnp.float32 and rel(g, mfattn.adjoint_field(theta, x, p, m, beta=1.0)) <= 1e-5


def test_supports_and_bad_input(no_jaxtyping):
    """Sinkhorn, l2, the sphere residual and mixed precision are not folded (``supports`` is False and the
    kernels refuse them naming the function); mis-shaped heads, tokens or weights, weights that do not sum to 1, a
    negative beta and a zero radius are refused naming the function and the argument, also under jit."""
    assert folded.supports(Attention()) and folded.supports("sigmoid")
    for spec in (Attention("sinkhorn"), Attention("l2"), Attention(residual="sphere"),
                 Attention(matmul_dtype="bfloat16")):  # fmt: skip
        assert not folded.supports(spec)
    params, x, m, p, _, _ = instance(Attention(), 4)
    layer = jax.tree.map(lambda a: a[0], folded.fold(params))
    with pytest.raises(ValueError, match="folded.velocity: attention"):
        folded.velocity(layer, x, m, beta=1.0, attention="l2")
    with pytest.raises(ValueError, match="folded.velocity: tokens"):
        folded.velocity(layer, x[:, :2], m, beta=1.0)
    with pytest.raises(ValueError, match="folded.adjoint_field: adjoints"):
        folded.adjoint_field(layer, x, p[:2], m, beta=1.0)
    with pytest.raises(ValueError, match="folded.forward: folded"):
        folded.forward(layer, x, beta=1.0)
    with pytest.raises(ValueError, match="folded.adjoint: trajectory"):
        folded.adjoint(folded.fold(params), x[None], p, beta=1.0)
    with pytest.raises(ValueError, match="folded.velocity: weights must have shape"):
        folded.velocity(layer, x, m[:2], beta=1.0)
    with pytest.raises(ValueError, match="folded.adjoint_field: weights must sum to 1"):
        folded.adjoint_field(layer, x, p, 2 * m, beta=1.0)
    with pytest.raises(ValueError, match="folded.forward: beta"):
        folded.forward(folded.fold(params), x, beta=-1.0)
    with pytest.raises(ValueError, match="folded.forward: radius"):
        folded.forward(folded.fold(params), x, beta=1.0, radius=0.0)
    # Under jit the values are checked too (equinox.error_if), naming the function and the argument.
    with pytest.raises(Exception, match="folded.velocity: beta"):
        jax.jit(lambda b: folded.velocity(layer, x, m, beta=b))(-1.0)
