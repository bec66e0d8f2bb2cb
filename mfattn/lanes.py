"""Ensemble kernels in the *lanes* layout: many heads (the limit's parameter particles), few tokens.

The forward velocity ``F``, the adjoint field ``G`` and the gradient map ``g`` of :mod:`mfattn.attention` and
:mod:`mfattn.adjoint`, the same formulas (docs/spec.md sections 2 and 4), written for the sizes of the mean-field
limit: ``P`` (thousands of particles) large, ``N`` (tokens), ``d`` and ``k`` small.

Layout. The heads arrive in the library's layout (leaves ``(P, d, k)``) and are transposed once to ``(d, k, P)``, so
that each entry ``W[:, a, c]`` is a contiguous vector over the heads. The token, coordinate and head-dimension loops
(``N``, ``d``, ``k``) are unrolled in Python, so each quantity of the kernel (a score ``s_ij``, a weight, an
attended value) is one elementwise operation on ``(Nq, P)`` or ``(P,)`` arrays, which XLA fuses into a few loops
over the heads: no batched tiny matrix product (one GEMM call per head), no reduction over a small axis. The heads'
mean (the velocity and the adjoint field) is the only reduction, over the head axis.

Measured (``mfattn bench --only limit_kernels``, ``benchmarks/results/limit_kernels.json``; 2-core CPU, float32,
``P = 32768``, ``N = 4``, ``d = k = 2``): the layer kernels alone run 2.3-4.1x faster than the vmapped ones (velocity,
adjoint field, gradient map), and compile 2-3 times as slowly (each solver stage inlines its own copy). Inside a
``while`` loop whose heads are a *dynamic slice* (Diffrax's loop reading ``param_at`` of the ensemble at a traced
time, or a ``lax.scan`` over stacked heads) XLA fuses the slice into the kernel's loops and they lose it (a velocity
7-10 ms there against 1.4-2.2 ms on a loop-carried buffer; an optimisation barrier does not help). The fixed-step
loop of :mod:`mfattn.rk` (:class:`mfattn.limit.FixedSteps`) carries each stage's heads instead, and so do the
layer scans of :mod:`mfattn.particles` (the Euler limits' thousands of heads per layer); there they pay;
so ``Attention(heads="auto")`` picks them on CPU for the limit's sizes (:data:`AUTO_MAX_TOKENS` and the rule
below), and ``heads="lanes"`` forces them. At ``N = 16`` they are slower than the vmapped kernels and compile in
tens of seconds (``O(N^2 k)`` unrolled operations).

Scope: the closed-form kinds (softmax, unnormalised, L2, sigmoid), causal masking, padding tokens of weight 0, the
projection ``Pi_R`` of the measure. Sinkhorn, ``matmul_dtype``, ``chunk`` and kept attention (``remat=False``) use
the vmapped kernels. ``beta`` here already includes the logit scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .attention import Attention, exp_cap, project_ball, project_ball_vjp

__all__ = ["supported", "applies", "velocity", "backward"]


def supported(spec: Attention) -> bool:
    """Whether the lanes kernels implement ``spec`` (closed-form kind, no mixed precision, no query chunks)."""
    return spec.kind != "sinkhorn" and spec.matmul_dtype is None and spec.chunk is None


#: ``heads="auto"`` picks the lanes kernels on CPU for layers of at most ``AUTO_MAX_TOKENS`` tokens, at least
#: ``AUTO_MIN_HEADS`` heads and ``d, k <= AUTO_MAX_DIM`` (the limit's ensembles at the rates experiment's sizes),
#: where they are measured faster inside the fixed-step solves (``mfattn bench --only limit_kernels``); elsewhere
#: (more tokens: ``O(N^2 k)`` unrolled operations; few heads; accelerators, unmeasured) the vmapped kernels.
AUTO_MAX_TOKENS = 4
AUTO_MIN_HEADS = 1024
AUTO_MAX_DIM = 4


def applies(spec: Attention, n_tokens: int | None = None, n_heads: int | None = None, dims=(None, None)) -> bool:
    """Whether a layer of ``n_tokens`` tokens, ``n_heads`` heads and ``dims = (d, k)`` runs on the lanes kernels:
    when :func:`supported` and either asked for (``spec.heads == "lanes"``) or chosen by ``heads="auto"``'s size
    rule (``AUTO_MAX_TOKENS``, ``AUTO_MIN_HEADS``, ``AUTO_MAX_DIM``, CPU only; sizes not given: not chosen)."""
    if not supported(spec):
        return False
    if spec.heads == "lanes":
        return True
    if spec.heads != "auto" or n_tokens is None or n_heads is None or None in dims:
        return False
    return (
        jax.default_backend() == "cpu"
        and n_tokens <= AUTO_MAX_TOKENS
        and n_heads >= AUTO_MIN_HEADS
        and max(dims) <= AUTO_MAX_DIM
    )


# --------------------------------------------------------------------------------------------------- helpers


def _dot(vectors, coefficients):
    """``sum_c vectors[c] * coefficients[c]`` over Python lists (an unrolled contraction)."""
    out = vectors[0] * coefficients[0]
    for v, c in zip(vectors[1:], coefficients[1:]):
        out = out + v * c
    return out


def _rows_sum(a):
    """``sum_i a[i]`` of an ``(N, P)`` array, unrolled (XLA:CPU runs small-axis reductions poorly)."""
    out = a[0]
    for i in range(1, a.shape[0]):
        out = out + a[i]
    return out


def _entries(w):
    """``[a][c]``: the entries ``W[:, a, c]`` of every head, each a ``(P,)`` vector."""
    t = jnp.moveaxis(w, 0, -1)  # (d, k, P): each entry contiguous
    return [[t[a, c] for c in range(w.shape[2])] for a in range(w.shape[1])]


def _project(points, w):
    """``points @ W`` per head: ``points (Nq, d)``, ``w [a][c]`` (:func:`_entries`) -> ``k`` arrays ``(Nq, P)``."""
    d, k = len(w), len(w[0])
    return [_dot([points[:, a, None] for a in range(d)], [w[a][c][None] for a in range(d)]) for c in range(k)]


def _key_project(points, w):
    """``points @ W`` per head for the keys: ``[j][c]`` lists of ``(P,)`` arrays."""
    d, k = len(w), len(w[0])
    return [
        [_dot([points[j, a] for a in range(d)], [w[a][c] for a in range(d)]) for c in range(k)]
        for j in range(points.shape[0])
    ]


def _out(vecs, w):
    """``sum_c vecs[c] W[:, a, c]`` for each ``a``: ``d`` arrays ``(Nq, P)`` (``vecs``: ``k`` arrays ``(Nq, P)``)."""
    return [_dot(vecs, [w[a][c][None] for c in range(len(w[0]))]) for a in range(len(w))]


def _head_mean(parts):
    """``d`` arrays ``(Nq, P)`` -> ``(Nq, d)``: the mean over heads of each coordinate."""
    return jnp.stack([jnp.mean(p, axis=-1) for p in parts], axis=-1)


def _kernel(spec: Attention, q, kk, weights, beta):
    """The kernel ``u_j`` (one ``(Nq, P)`` array per key ``j``) and the row scaling ``rz`` (``(Nq, P)``; ``1/z``
    when normalised, ``None`` otherwise): the lanes form of :mod:`mfattn.adjoint`'s kernel rows, with the same
    shift (the largest live, allowed score) and the same cap on a zero-weight key's exponent."""
    n, nq = len(kk), q[0].shape[0]
    cap = exp_cap(q[0].dtype)
    live = [weights[j] > 0 for j in range(n)]
    kb = [[c[None] for c in row] for row in kk]
    s = [beta * _dot(q, kb[j]) for j in range(n)]
    if spec.kind == "l2":
        s = [s[j] - (0.5 * beta) * _dot(kb[j], kb[j]) for j in range(n)]
    rows = np.arange(nq)[:, None]
    allowed = [rows >= j for j in range(n)] if spec.causal else [None] * n
    if spec.normalized:
        top = None
        for j in range(n):
            ok = live[j] if allowed[j] is None else live[j] & allowed[j]
            sj = jnp.where(ok, s[j], -jnp.inf)
            top = sj if top is None else jnp.maximum(top, sj)
        top = jnp.where(jnp.isfinite(top), top, 0)
        u = [jnp.exp(jnp.minimum(s[j] - top, cap)) for j in range(n)]
    elif spec.kind == "unnormalized":
        u = [jnp.exp(jnp.where(live[j], s[j], jnp.minimum(s[j], cap))) for j in range(n)]
    else:  # sigmoid
        u = [jax.nn.sigmoid(s[j] + spec.bias) for j in range(n)]
    if spec.causal:
        u = [jnp.where(allowed[j], u[j], 0) for j in range(n)]
    if not spec.normalized:
        return u, None
    z = _dot(u, [weights[j] for j in range(n)])
    return u, jnp.where(z > 0, 1 / jnp.where(z > 0, z, 1), 0)


def _attended(u, rz, v, weights):
    """``vbar_c = rz sum_j m_j u_j V_j[c]`` (``W_V^T`` of the attended point): ``k`` arrays ``(Nq, P)``."""
    n, k = len(u), len(v[0])
    out = [_dot([u[j] * weights[j] for j in range(n)], [v[j][c][None] for j in range(n)]) for c in range(k)]
    return out if rz is None else [o * rz for o in out]


# ----------------------------------------------------------------------------------------------------- kernels


def velocity(theta, queries, tokens, weights, *, beta, radius=None, spec: Attention):
    """``F(mu, x, nu) = (1/P) sum_h Gamma(mu, x, theta_h)`` (:func:`mfattn.velocity`'s formula).

    Args:
        theta: the heads, leaves ``(P, d, k)`` (``wq, wk, wv, wo``).
        queries: ``(Nq, d)``; tokens: ``(N, d)``; weights: ``(N,)``.
        beta: inverse temperature times the logit scale; radius: optional ``R`` of ``Pi_R``.

    Returns:
        ``(Nq, d)``. Work ``O(P Nq N k)``.
    """
    wq, wk, wv, wo = (_entries(w) for w in (theta.wq, theta.wk, theta.wv, theta.wo))
    keys = project_ball(tokens, radius)
    u, rz = _kernel(spec, _project(queries, wq), _key_project(keys, wk), weights, beta)
    return _head_mean(_out(_attended(u, rz, _key_project(keys, wv), weights), wo))


def backward(theta, tokens, adjoints, weights, *, beta, radius=None, spec: Attention, field=True, grad=True):
    """The adjoint field ``G`` (``(N, d)``) and the gradient map ``g`` (leaves ``(P, d, k)``) of one layer:
    :func:`mfattn.adjoint_field` and :func:`mfattn.grad_map`'s formulas, in the notation of :mod:`mfattn.adjoint`.

    Zero-weight tokens influence nothing: their rows are masked with ``where`` (a non-finite adjoint there cannot
    leak); their own adjoint field is the Lions derivative's value at them.

    Returns:
        ``(G or None, (dwq, dwk, dwv, dwo) or None)``.
    """
    wq, wk, wv, wo = (_entries(w) for w in (theta.wq, theta.wk, theta.wv, theta.wo))
    d, k = len(wq), len(wq[0])
    n = tokens.shape[0]
    keys = project_ball(tokens, radius)
    q = _project(tokens, wq)  # k x (N, P)
    kk, v = _key_project(keys, wk), _key_project(keys, wv)  # [j][c] (P,)
    u, rz = _kernel(spec, q, kk, weights, beta)
    vbar = _attended(u, rz, v, weights)
    scale = (lambda x: x) if rz is None else (lambda x: x * rz)
    a = _project(adjoints, wo)  # k x (N, P): a_i = W_O^T p_i
    e = [_dot(a, [c[None] for c in v[j]]) for j in range(n)]  # <a_i, W_V^T x_j>
    mu = [u[j] * weights[j] for j in range(n)]
    if spec.normalized:
        # one step of iterative refinement of e - ebar (as in mfattn.adjoint): centre at <a_i, vbar_i>
        shifted = [ej - _dot(a, vbar) for ej in e]
        corr = _dot(mu, shifted) * rz
        ud = [u[j] * (shifted[j] - corr) for j in range(n)]
    elif spec.kind == "unnormalized":
        ud = [u[j] * e[j] for j in range(n)]
    else:
        ud = [(u[j] * (1 - u[j])) * e[j] for j in range(n)]
    delta_k = [
        scale(_dot([ud[j] * weights[j] for j in range(n)], [kk[j][c][None] for j in range(n)])) for c in range(k)
    ]
    live_rows = (weights > 0)[:, None]  # (N, 1)
    m_rows = weights[:, None]
    ma = [scale(jnp.where(live_rows, m_rows * x, 0)) for x in a]
    mq = [scale(jnp.where(live_rows, m_rows * x, 0)) for x in q]
    udl = [jnp.where(live_rows, x, 0) for x in ud]
    ut_ma = [[_rows_sum(u[j] * ma[c]) for c in range(k)] for j in range(n)]  # [j][c] (P,): [U^T (m a)]_j
    key_term = [[_rows_sum(udl[j] * mq[c]) for c in range(k)] for j in range(n)]  # [(U * D)^T (m Q)]_j
    if spec.kind == "l2":
        mr = scale(jnp.where(live_rows, m_rows, 0))
        colsum = [_rows_sum(udl[j] * mr) for j in range(n)]
        key_term = [[key_term[j][c] - colsum[j] * kk[j][c] for c in range(k)] for j in range(n)]
    g_field = g_map = None
    if field:
        term1 = [beta * x for x in _out(delta_k, wq)]
        per_key = [_out([x[None] for x in ut_ma[j]], wv) for j in range(n)]  # [j][a] (1, P)
        key_part = [_out([x[None] for x in key_term[j]], wk) for j in range(n)]
        term2 = [jnp.concatenate([per_key[j][ax] + beta * key_part[j][ax] for j in range(n)]) for ax in range(d)]
        g_field = _head_mean(term1) + project_ball_vjp(tokens, _head_mean(term2), radius)
    if grad:
        live = [weights[j] > 0 for j in range(n)]
        wkey = [[jnp.where(live[j], weights[j] * key_term[j][c], 0) for c in range(k)] for j in range(n)]
        wval = [[jnp.where(live[j], weights[j] * ut_ma[j][c], 0) for c in range(k)] for j in range(n)]
        mdk = [jnp.where(live_rows, m_rows * x, 0) for x in delta_k]
        mp = jnp.where(live_rows, m_rows * adjoints, 0)

        def stack(entries):  # [a][c] (P,) -> (P, d, k)
            return jnp.stack([jnp.stack(row, axis=-1) for row in entries], axis=-2)

        def rows_grad(points, per_c):  # sum_i points[i, a] per_c[c][i]
            return stack([[_rows_sum(points[:, ax, None] * per_c[c]) for c in range(k)] for ax in range(d)])

        def keys_grad(per_jc):  # sum_j Xk[j, a] per_jc[j][c]
            return stack(
                [
                    [_dot([keys[j, ax] for j in range(n)], [per_jc[j][c] for j in range(n)]) for c in range(k)]
                    for ax in range(d)
                ]
            )

        g_map = (beta * rows_grad(tokens, mdk), beta * keys_grad(wkey), keys_grad(wval), rows_grad(mp, vbar))
    return g_field, g_map
