"""Float64 checks of every attention variant's backward pass against autodiff of the naive oracle.

For each :class:`mfattn.Attention` variant (issue 6) and each case -- non-uniform weights with a padding
token and the projection Pi_R; N = 1 with H = 1; large beta with padding -- one test compares the forward
trajectory, every adjoint p^l (which the adjoint field G -- Jacobian plus Lions term -- produces layer by
layer; at the zero-weight token against the mixed derivative d/dx_i d/dm_i) and the gradient of
``loss_and_grad`` (the gradient maps scaled by h / H) with autodiff of ``reference.forward_variant``.
Relative errors (Frobenius norm) must be <= 1e-10. The layer-level split of G into its two terms is
checked for softmax in test_core.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import mfattn
from mfattn import Attention
from mfattn.losses import TokenRegression

RTOL = 1e-10
MEASURED: dict = {}  # (variant, case) -> errors, for reports (see the closing note)

VARIANTS = {
    "unnormalized": Attention("unnormalized"),
    "l2": Attention("l2"),
    "sigmoid": Attention("sigmoid", bias=-0.5),
    "sinkhorn": Attention("sinkhorn", sinkhorn_iters=6),
    "causal-softmax": Attention(causal=True),
    "causal-l2": Attention("l2", causal=True),
    "causal-sigmoid": Attention("sigmoid", causal=True),
    "causal-unnormalized": Attention("unnormalized", causal=True),
    "sphere": Attention(residual="sphere"),
    "sqrt-depth-sqrt-k": Attention(depth_exponent=0.5, logit_scale="1/sqrt(k)"),
    "l2-1/k-sphere": Attention("l2", logit_scale="1/k", residual="sphere"),
    "sinkhorn-sphere": Attention("sinkhorn", sinkhorn_iters=3, residual="sphere"),
}
# The lanes kernels (mfattn.lanes: head axis innermost, token loops unrolled) for every closed-form variant, forced
# with heads="lanes" whatever the sizes: the same oracle, the same tolerance.
VARIANTS.update(
    {
        f"lanes-{name}": dataclasses.replace(spec, heads="lanes")
        for name, spec in {"softmax": Attention(), **VARIANTS}.items()
        if spec.kind != "sinkhorn"
    }
)


@dataclasses.dataclass(frozen=True)
class Case:
    depth: int = 2
    heads: int = 2
    tokens: int = 5
    dim: int = 3
    head_dim: int = 3
    beta: float = 1.5
    padding: bool = True
    radius: float | None = None
    seed: int = 0
    unnormalized_beta: float = 3.0  # the cap on beta for e^{s} without normalisation, which grows fast

    def __str__(self):
        return f"L{self.depth}H{self.heads}N{self.tokens}-beta{self.beta}-pad{int(self.padding)}-R{self.radius}"


CASES = [
    Case(beta=30.0, tokens=6, radius=1.2),  # large beta, padding, the projection, non-uniform weights
    Case(tokens=1, heads=1, padding=False, seed=1),  # N = 1, H = 1
    # the rates experiment's sizes: on CPU every per-head product is a broadcast sum (attention.TINY_PRODUCT)
    Case(tokens=4, dim=2, head_dim=2, beta=8.0, seed=2, unnormalized_beta=1.0),
]


def instance(c: Case, spec: Attention):
    k = jax.random.split(jax.random.key(c.seed), 4)
    params = mfattn.init_params(
        k[0], c.depth, c.heads, c.dim, c.head_dim, init="mean_noise", scale=0.5, dtype=jnp.float64
    )
    x0 = jax.random.normal(k[1], (c.tokens, c.dim), jnp.float64)
    if spec.residual == "sphere":
        x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    if spec.kind == "unnormalized":  # e^{s} unnormalised grows fast: keep scores moderate
        x0 = 0.5 * x0
    m = jax.random.uniform(k[2], (c.tokens,), jnp.float64, 0.1, 1.0)
    if c.padding:
        m = m.at[c.tokens // 2].set(0.0)
    m = m / m.sum()
    targets = jax.random.normal(k[3], (c.tokens, c.dim), jnp.float64)
    return params, x0, m, targets


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a - b)


# The lanes variants run the first case (large beta with padding and Pi_R): N = 1 and the rates sizes are covered
# for them by test_lanes_layer_kernels_equal_vmapped and the limit's lanes test, and each oracle case costs a
# compile of its mixed second derivatives (CI time).
ORACLE_CASES = [(n, c) for n in VARIANTS for c in CASES if not (n.startswith("lanes-") and c is not CASES[0])]


@pytest.mark.parametrize("name, c", ORACLE_CASES, ids=lambda v: str(v))
def test_variant_against_oracle(name, c):
    spec = VARIANTS[name]
    if spec.kind == "unnormalized":  # e^{s} without normalisation overflows at large beta by design
        c = dataclasses.replace(c, beta=min(c.beta, c.unnormalized_beta))
    params, x0, m, targets = instance(c, spec)
    kw = dict(beta=c.beta, weights=m, radius=c.radius, attention=spec)
    loss = TokenRegression()

    traj = mfattn.forward(params, x0, **kw)
    ps = mfattn.adjoint(params, traj, loss.lions(traj[-1], m, targets), **kw)
    value, grads = mfattn.loss_and_grad(params, x0, loss, targets=targets, **kw)
    assert np.all(np.isfinite(np.asarray(traj)))

    # The oracle, in one compiled function: its trajectory, d ell / d x^l for every l (through additive
    # perturbations of each layer's state) and d ell / d theta; at the zero-weight token the adjoint is
    # the mixed derivative d/dx_i d/dm_i of ell.
    def objective(eps, prm, masses):
        traj = ref.forward_variant(spec, prm, x0, masses, c.beta, c.radius, perturb=eps)
        return loss(traj[-1], masses, targets), traj

    eps0 = jnp.zeros_like(traj)
    (expect_v, expect_traj), (g_eps, expect_g) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        eps0, params, m
    )
    expect_p = g_eps / jnp.where(m > 0, m, 1)[None, :, None]
    dead = np.flatnonzero(np.asarray(m) == 0)
    if dead.size:
        mixed = jax.jit(jax.jacrev(jax.grad(lambda e, ms: objective(e, params, ms)[0], argnums=1)))(eps0, m)
        for i in dead:  # mixed[i] = d/dx (d ell / d m_i): (L+1, N, d)
            expect_p = expect_p.at[:, i].set(mixed[i, :, i])

    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
    errors = {
        "forward": rel(traj, expect_traj),
        "value": rel(value, expect_v),
        "adjoints": rel(ps, expect_p),
        "loss_and_grad": rel(flat(grads), flat(expect_g)),
    }
    MEASURED[name, str(c)] = errors
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not bad, f"{name} {c}: relative errors above {RTOL:.0e}: {bad} (all: {errors})"


def test_mixed_precision_bfloat16_against_float32():
    """bfloat16 matrix products with float32 softmax statistics and accumulation: the trajectory within
    5e-3 and the gradient within 5e-2 (relative) of float32 at beta = 1 -- bfloat16 keeps 8 significant
    bits (unit roundoff 3.9e-3); measured 1.5e-3 and 1.9e-2 -- and the hand backward no worse than autodiff
    through the same bfloat16 forward pass. The option must change the numbers (it is not a no-op)."""
    k = jax.random.split(jax.random.key(0), 3)
    params = mfattn.init_params(k[0], 4, 4, 32, 32, dtype=jnp.float32)
    x = jax.random.normal(k[1], (64, 32), jnp.float32)
    y = jax.random.normal(k[2], (64, 32), jnp.float32)
    loss = TokenRegression()
    mixed = Attention(matmul_dtype="bfloat16")
    traj32 = mfattn.forward(params, x, beta=1.0)
    v32, g32 = mfattn.loss_and_grad(params, x, loss, beta=1.0, targets=y)
    traj = mfattn.forward(params, x, beta=1.0, attention=mixed)
    v, g = mfattn.loss_and_grad(params, x, loss, beta=1.0, targets=y, attention=mixed)
    _, g_ad = mfattn.loss_and_grad(params, x, loss, beta=1.0, targets=y, attention=mixed, method="autodiff")
    assert traj.dtype == jnp.float32 and g.wq.dtype == jnp.float32
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
    err_traj, err_grad, err_ad = rel(traj, traj32), rel(flat(g), flat(g32)), rel(flat(g_ad), flat(g32))
    assert 1e-5 < err_traj <= 5e-3, err_traj
    assert abs(float(v - v32)) <= 1e-3 * abs(float(v32))
    assert 1e-5 < err_grad <= 5e-2, err_grad
    assert err_grad <= 1.5 * err_ad, (err_grad, err_ad)
    with pytest.raises(ValueError, match="matmul_dtype"):
        Attention(matmul_dtype="int8")


@pytest.mark.parametrize(
    "spec",
    [Attention(), Attention("l2", causal=True), Attention("sigmoid", causal=True, bias=0.2), Attention("unnormalized")],
    ids=["softmax", "causal-l2", "causal-sigmoid", "unnormalized"],
)
def test_query_chunks_and_kept_attention_give_the_same_numbers(spec):
    """Query rows in blocks (N = 7 in blocks of 3: a padded last block) and the forward's attention kept
    for the backward pass (remat=False) equal the default kernels: forward, adjoints and gradient maps,
    with a padding token, to 1e-12."""
    c = Case(depth=2, heads=2, tokens=7, beta=2.0, radius=1.5)
    params, x0, m, targets = instance(c, spec)
    loss = TokenRegression()
    chunked = dataclasses.replace(spec, chunk=3)
    kept = dataclasses.replace(spec, remat=False, residual="sphere" if spec.causal else "euler")
    results = []
    for s in (spec, chunked):
        traj = mfattn.forward(params, x0, beta=c.beta, weights=m, radius=c.radius, attention=s)
        value, g, p0 = mfattn.value_and_grad_map(
            params, x0, loss, beta=c.beta, weights=m, targets=targets, radius=c.radius, attention=s
        )
        results.append((traj, value, g, p0))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        assert rel(b, a) <= 1e-12
    # remat=False: the fused path keeps each layer's attention from the forward pass (with the normalised
    # residual for the causal kinds, to cover its pullback); same numbers as recomputing it.
    if kept.residual == "sphere":
        x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
    kw = dict(beta=c.beta, weights=m, targets=targets, radius=c.radius)
    expect = mfattn.value_and_grad_map(params, x0, loss, attention=dataclasses.replace(kept, remat=True), **kw)
    got = mfattn.value_and_grad_map(params, x0, loss, attention=kept, **kw)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expect)):
        assert rel(a, b) <= 1e-12
    with pytest.raises(ValueError, match="chunk"):
        Attention(chunk=0)
    with pytest.raises(ValueError, match="remat"):
        Attention(chunk=4, remat=False)


def _attention_module():
    import importlib

    return importlib.import_module("mfattn.attention")  # (mfattn.attention is also a function)


def _layer_kernels_under(monkeypatch, setting: str, values, c: Case) -> list:
    """One layer's velocity, adjoint field and gradient maps (softmax, float64, ``c``'s instance) with the
    module setting ``mfattn.attention.<setting>`` set to each of ``values`` (a fresh jit traces each)."""
    from mfattn.adjoint import adjoint_field_and_grad_map

    params, x0, m, _ = instance(c, Attention())
    theta = jax.tree.map(lambda a: a[0], params)
    p = jax.random.normal(jax.random.key(3), x0.shape, jnp.float64)
    spec = Attention(heads="auto" if setting == "SEQUENTIAL_HEADS_FROM" else "vmap")  # not the lanes kernels
    results = []
    for value in values:
        monkeypatch.setattr(_attention_module(), setting, value)
        run = jax.jit(
            lambda th, x, p: (
                mfattn.velocity(th, x, x, m, beta=c.beta, attention=spec),
                adjoint_field_and_grad_map(th, x, p, m, beta=c.beta, attention=spec),
            )
        )
        results.append(run(theta, x0, p))
    return results


def test_sequential_and_vectorised_heads_agree(monkeypatch):
    """On CPU, from SEQUENTIAL_HEADS_FROM tokens on, heads run one after the other (lax.map) instead of
    vmapped: the same velocity, adjoint field and gradient maps to 1e-12 (float64, N = 130, padding)."""
    c = Case(depth=1, heads=3, tokens=130, dim=3, head_dim=2, beta=2.0)
    vmapped, sequential = _layer_kernels_under(monkeypatch, "SEQUENTIAL_HEADS_FROM", (10**9, 1), c)
    for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(sequential)):
        assert rel(b, a) <= 1e-12


@pytest.mark.parametrize(
    "kind, causal, tokens, remat", [("softmax", False, 5, True), ("l2", True, 5, False), ("sigmoid", False, 1, True)]
)
def test_blocked_heads_agree_with_vectorised(monkeypatch, kind, causal, tokens, remat):
    """``heads="blocked"``: ``lax.map`` over blocks of heads, each block vmapped (7 heads in blocks of 3, so the
    last block is a remainder): the velocity, the adjoint field and the gradient maps equal ``vmap``'s to 1e-12
    (float64, padding, large beta, N = 1; ``remat=False``: the forward pass's per-head cache through the blocks)."""
    from mfattn.adjoint import adjoint_field_and_grad_map, cached_forward_layer

    attention_module = _attention_module()
    monkeypatch.setattr(attention_module, "HEAD_BLOCK_ENTRIES", 3 * tokens**2)
    assert attention_module.head_block(tokens, 7) == 3 and attention_module.head_block(tokens, 2) == 2
    c = Case(depth=1, heads=7, tokens=tokens, dim=3, head_dim=2, beta=6.0, padding=tokens > 1)
    params, x0, m, _ = instance(c, Attention(kind, causal=causal))
    theta = jax.tree.map(lambda a: a[0], params)
    p = jax.random.normal(jax.random.key(3), x0.shape, jnp.float64)
    out = {}
    for loop in ("vmap", "blocked", "auto"):  # auto: blocked on CPU from BLOCKED_HEADS_FROM tokens (set to 1 here)
        spec = Attention(kind, causal=causal, heads=loop, remat=remat)
        monkeypatch.setattr(attention_module, "BLOCKED_HEADS_FROM", 1)

        def run(th, x, p, spec=spec):
            f = mfattn.velocity(th, x, x, m, beta=c.beta, attention=spec)
            cache = None if remat else cached_forward_layer(th, x, m, beta=c.beta, attention=spec)[1]
            return f, adjoint_field_and_grad_map(th, x, p, m, beta=c.beta, attention=spec, cache=cache)

        out[loop] = jax.jit(run)(theta, x0, p)
        loops = "scan" in str(jax.make_jaxpr(run)(theta, x0, p))
        assert loops == (loop == "blocked" or (loop == "auto" and jax.default_backend() == "cpu")), loop
    for loop in ("blocked", "auto"):
        for a, b in zip(jax.tree.leaves(out[loop]), jax.tree.leaves(out["vmap"]), strict=True):
            assert rel(a, b) <= 1e-12


def test_tiny_products_without_dots_agree_with_dots(monkeypatch):
    """On CPU, tiny per-head products are broadcast sums (TINY_PRODUCT): no dot is left in them,
    larger ones stay dots, and the velocity, adjoint field and gradient maps equal the all-dots path to 1e-13
    (float64, N = 4, d = k = 2, padding, 16 heads)."""
    attention_module = _attention_module()
    a, b = jnp.ones((4, 2)), jnp.ones((2, 4))
    dots = lambda f, *args: "dot_general" in str(jax.make_jaxpr(f)(*args))  # noqa: E731
    on_cpu = jax.default_backend() == "cpu"
    assert dots(attention_module._per_head_matmul, a, b) != on_cpu
    assert dots(attention_module._per_head_matmul, jnp.ones((8, 4)), jnp.ones((4, 8)))  # 256 > 64: a dot
    assert dots(attention_module._matmul(Attention(), shared=True), a, b)  # projections stay dots
    c = Case(depth=1, heads=16, tokens=4, dim=2, head_dim=2, beta=3.0)
    fused, dotted = _layer_kernels_under(monkeypatch, "TINY_PRODUCT", (attention_module.TINY_PRODUCT, 0), c)
    for u, d in zip(jax.tree.leaves(fused), jax.tree.leaves(dotted)):
        assert rel(u, d) <= 1e-13


FLOAT32_VARIANTS = {
    "softmax": Attention(),
    "lanes-softmax": Attention(heads="lanes"),
    "lanes-causal-l2": Attention("l2", causal=True, heads="lanes"),
    "l2": Attention("l2"),
    "sigmoid": Attention("sigmoid", bias=-0.5),
    "causal-l2": Attention("l2", causal=True),
    "sinkhorn": Attention("sinkhorn", sinkhorn_iters=6),
    "sinkhorn-sphere": Attention("sinkhorn", sinkhorn_iters=3, residual="sphere"),
}

#: Float32 against float64, relative (Frobenius norm; the gradient over all its entries together: per leaf, a
#: block whose gradient vanishes -- W_Q, W_K of a saturated Sinkhorn kernel at beta = 1e4 -- has no meaningful
#: relative error), ``(name, beta) -> (trajectory, gradient)`` for L = 3, H = 2, N = 8, d = k = 4 with padding.
#: Each bound is about 3 to 5 times the worst of seeds 0, 1, 2 measured (in brackets). The error grows with
#: beta: scores are beta-times magnified, so float32's rounding of them (6e-8 relative) is too.
FLOAT32_TOL = {
    ("softmax", 2.0): (1e-6, 5e-6),  # (8.0e-8, 3.7e-7)
    ("softmax", 50.0): (1e-6, 1e-5),  # (1.4e-7, 2.9e-6)
    ("lanes-softmax", 2.0): (1e-6, 5e-6),  # (lanes: as softmax)
    ("lanes-softmax", 50.0): (1e-6, 1e-5),
    ("lanes-causal-l2", 2.0): (1e-6, 5e-6),
    ("lanes-causal-l2", 50.0): (1e-6, 5e-6),
    ("l2", 2.0): (1e-6, 5e-6),  # (7.4e-8, 1.4e-6)
    ("l2", 50.0): (2e-6, 1e-4),  # (3.6e-7, 3.0e-5)
    ("sigmoid", 2.0): (1e-6, 5e-6),  # (4.6e-8, 2.0e-7)
    ("sigmoid", 50.0): (1e-6, 5e-5),  # (8.4e-8, 8.2e-6)
    ("causal-l2", 2.0): (1e-6, 5e-6),  # (9.2e-8, 6.5e-7)
    ("causal-l2", 50.0): (1e-6, 5e-6),  # (1.8e-7, 8.1e-7)
    ("sinkhorn", 2.0): (1e-6, 1e-5),  # (2.4e-7, 2.2e-6)
    ("sinkhorn", 50.0): (5e-5, 5e-3),  # (1.1e-5, 1.8e-3)
    ("sinkhorn", 1e4): (5e-3, 2e-2),  # (1.2e-3, 3.7e-3)
    ("sinkhorn-sphere", 2.0): (1e-6, 5e-6),  # (5.6e-8, 1.8e-7)
    ("sinkhorn-sphere", 50.0): (1e-6, 1e-5),  # (2.5e-7, 2.7e-6)
    ("sinkhorn-sphere", 1e4): (2e-4, 2e-3),  # (5.8e-5, 3.7e-4)
}


@pytest.mark.parametrize("name, beta", list(FLOAT32_TOL), ids=lambda v: str(v))
def test_float32_matches_float64(name, beta):
    """Float32 trajectories and gradients within the per-kind, per-beta relative tolerance of float64
    (:data:`FLOAT32_TOL`): 1e-6 and 5e-6 at beta = 2 for every kind, up to 1e-4 (l2) at beta = 50 and 2e-2
    (Sinkhorn) at beta = 1e4."""
    spec = FLOAT32_VARIANTS[name]
    c = Case(depth=3, heads=2, tokens=8, dim=4, head_dim=4, beta=beta)
    params, x0, m, targets = instance(c, spec)
    loss = TokenRegression()
    out = {}
    for dtype in (jnp.float64, jnp.float32):
        cast = lambda a, dtype=dtype: jax.tree.map(lambda t: t.astype(dtype), a)
        kw = dict(beta=c.beta, weights=cast(m), attention=spec)
        traj = mfattn.forward(cast(params), cast(x0), **kw)
        _, g = mfattn.loss_and_grad(cast(params), cast(x0), loss, targets=cast(targets), **kw)
        assert traj.dtype == dtype and g.wq.dtype == dtype
        out[dtype] = (traj, g)
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])  # noqa: E731
    traj_tol, grad_tol = FLOAT32_TOL[name, beta]
    assert rel(out[jnp.float32][0], out[jnp.float64][0]) <= traj_tol
    assert rel(flat(out[jnp.float32][1]), flat(out[jnp.float64][1])) <= grad_tol


LAYER_KINDS = {
    "softmax": Attention(),
    "unnormalized": Attention("unnormalized"),
    "l2": Attention("l2", logit_scale="1/k"),
    "sigmoid": Attention("sigmoid", bias=0.3),
    "causal-softmax": Attention(causal=True),
    "causal-l2": Attention("l2", causal=True),
    "causal-sigmoid": Attention("sigmoid", causal=True),
    "causal-unnormalized": Attention("unnormalized", causal=True),
}


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("name", list(LAYER_KINDS))
def test_lanes_layer_kernels_equal_vmapped(name, tokens):
    """One layer's velocity (also at queries that are not the tokens), adjoint field and gradient maps of the lanes
    kernels equal the vmapped kernels' to 1e-12 relative (float64, N = 1 and N = 5, 9 heads, non-uniform weights,
    a padding token whose adjoint is 1e30 -- it must not leak -- and the projection Pi_R). The padding token's own
    adjoint field is compared where it is well conditioned (its adjoint 1)."""
    from mfattn.adjoint import adjoint_field_and_grad_map

    spec = LAYER_KINDS[name]
    keys = jax.random.split(jax.random.key(tokens), 7)
    theta = mfattn.init_params(keys[0], 1, 9, 3, 2, init="mean_noise", scale=0.7, dtype=jnp.float64)
    theta = jax.tree.map(lambda a: a[0], theta)
    scale = 0.5 if spec.kind == "unnormalized" else 1.0
    x = scale * jax.random.normal(keys[1], (tokens, 3), jnp.float64)
    queries = jax.random.normal(keys[2], (5, 3), jnp.float64)
    m = jax.random.uniform(keys[3], (tokens,), jnp.float64, 0.1, 1.0)
    pad = tokens // 2 if tokens > 1 else None
    if pad is not None:
        m = m.at[pad].set(0.0)
    m = m / m.sum()
    p = jax.random.normal(keys[4], (tokens, 3), jnp.float64)
    kw = dict(beta=2.5, radius=0.9)
    out = {}
    for loop in ("vmap", "lanes"):
        a = dataclasses.replace(spec, heads=loop)
        vel = mfattn.velocity(theta, x, x, m, attention=a, **kw)
        vel_q = None if spec.causal else mfattn.velocity(theta, queries, x, m, attention=a, **kw)
        field, grads = adjoint_field_and_grad_map(theta, x, p, m, attention=a, **kw)
        big = field
        if pad is not None:
            big, _ = adjoint_field_and_grad_map(theta, x, p.at[pad].set(1e30), m, attention=a, **kw)
        out[loop] = (vel, vel_q, field, grads, big)
    (v0, q0, f0, g0, _), (v1, q1, f1, g1, b1) = out["vmap"], out["lanes"]
    assert rel(v1, v0) <= 1e-12
    if q0 is not None:
        assert rel(q1, q0) <= 1e-12
    assert rel(f1, f0) <= 1e-12
    for u, w in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel(u, w) <= 1e-12
    live = np.asarray(m) > 0
    assert np.all(np.isfinite(np.asarray(b1)[live]))
    assert rel(np.asarray(b1)[live], np.asarray(f0)[live]) <= 1e-12  # nothing leaks from the padding token


def test_lanes_choice():
    """The lanes kernels run when asked for (``heads="lanes"``) and supported -- never for Sinkhorn, mixed precision
    or query chunks -- and under ``heads="auto"`` on CPU for few tokens, many heads and small d, k only; a bad
    choice is refused."""
    from mfattn import lanes

    assert lanes.applies(Attention(heads="lanes"))
    assert lanes.applies(Attention("l2", causal=True, heads="lanes"))
    for spec in (Attention(), Attention(heads="vmap"), Attention(heads="sequential")):
        assert not lanes.applies(spec)  # sizes not given
        assert not lanes.applies(spec, 4, 32, (2, 2)) and not lanes.applies(spec, 16, 32768, (2, 2))
    cpu = jax.default_backend() == "cpu"
    assert lanes.applies(Attention(), 4, 32768, (2, 2)) == cpu
    assert lanes.applies(Attention("l2", causal=True), 1, 1024, (4, 4)) == cpu
    assert not lanes.applies(Attention(), 4, 32768, (8, 2))
    assert not lanes.applies(Attention(heads="vmap"), 4, 32768, (2, 2))
    assert not lanes.applies(Attention("sinkhorn"), 4, 32768, (2, 2))
    assert not lanes.applies(Attention("sinkhorn", heads="lanes"))
    assert not lanes.applies(Attention(matmul_dtype="bfloat16", heads="lanes"))
    assert not lanes.applies(Attention(chunk=2, heads="lanes"))
    with pytest.raises((ValueError, TypeError), match="heads"):  # TypeError: the suite's runtime type checker
        Attention(heads="fast")
