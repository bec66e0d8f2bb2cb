"""Many heads, few tokens, small ``d``: the heads folded into ``d x d`` matrices and contracted in matrix products.

For one head ``theta = (W_Q, W_K, W_V, W_O)`` the softmax-family attention of :mod:`mfattn.attention` depends on
the head only through the two ``d x d`` matrices

    A = W_Q W_K^T   (scores  s_ij = beta x_i^T A y_j,  y_j = Pi_R(x_j) the key/value atoms)
    B = W_O W_V^T   (output  Gamma_i = B sum_j w_ij y_j)

so with ``H`` heads (the mean-field limit's parameter particles, or a cheap limit's hundreds of heads per layer)
every product over the head axis is one matrix product of the ``(N^2, d^2)`` token pairs ``x_i (x) y_j`` with the
``(H, d^2)`` stacked matrices. The velocity ``F`` costs two such products; the adjoint field ``G`` (the same
formulas as :mod:`mfattn.adjoint`, with the kernel ``u_ij = w_ij / (m_j r_i)`` without the key's mass and its score
derivative ``ud``)::

    e_ij   = p_i^T B y_j                                   (one product)
    G_i    = beta/H sum_h A_h sum_j m_j r_i ud_ij y_j      (the token Jacobian, one product)
           + DPi_R(x_i)^T 1/H sum_h sum_{j live} m_j r_j [u_ji B_h^T p_j + beta ud_ji A_h^T x_j]
                                                            (the Lions term at atom i, two products)

Work ``O(H N^2 d^2)`` and memory ``O(H N^2)`` per layer against the per-head form's ``O(H N^2 k)`` in ``H`` batched
products of ``N x k`` matrices: the same flops at ``d = k``, but XLA:CPU runs the per-head form under ``vmap`` as
one tiny product per head, and this form as a handful of real products. Measured side by side
(``benchmarks/folded.py``, 2-core CPU, float32): the rates experiment's cheap limit (32 layers x 128 heads, N = 4,
d = k = 2) runs its forward and adjoint paths 6.4x faster and the supremum search's value and gradient in the
input 5.7x faster; one layer of M = 1024 heads: 0.9-2.8x (the adjoint field 2.0-2.8x for N = 16 or d = k = 4).
It does not pay for the limit's large ensembles: at M = 32768 particles the ``(N^2, M)`` intermediates leave the
caches and :mod:`mfattn.lanes` is faster (the velocity 0.2-0.7x, the adjoint field 0.3-1.7x), so
:mod:`mfattn.attention`'s kernels stay the general path and only the search uses this module.

Kinds: ``"softmax"``, ``"unnormalized"``, ``"sigmoid"``, causal or not, with or without the radius ``R``, the
Euler residual (:func:`supports`). Tokens of weight 0 influence nothing and get the Lions derivative's value
there, as in :mod:`mfattn.adjoint` (the kernels agree with it to rounding, float64 tests).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _checks
from .attention import Attention, as_attention, exp_cap, project_ball, project_ball_vjp
from .params import Params

__all__ = ["Folded", "fold", "supports", "velocity", "adjoint_field", "forward", "adjoint"]

KINDS = ("softmax", "unnormalized", "sigmoid")


class Folded(eqx.Module):
    """Heads folded into ``a = W_Q W_K^T`` and ``b = W_O W_V^T``: leaves ``(..., H, d, d)`` (one layer:
    ``(H, d, d)``; a model: ``(L, H, d, d)``), and the head dimension ``k`` (for the logit scalings)."""

    a: Float[Array, "... H d d"]
    b: Float[Array, "... H d d"]
    head_dim: int = eqx.field(static=True)


def _outer_k(u, v):
    """``u v^T`` over the last axis of ``(..., d, k)`` operands: ``(..., d, d)`` (one fused loop, no batched dot)."""
    return jnp.sum(u[..., :, None, :] * v[..., None, :, :], axis=-1)


def fold(params: Params) -> Folded:
    """:class:`Folded` heads of ``params`` (leaves ``(..., H, d, k)``): ``A = W_Q W_K^T``, ``B = W_O W_V^T``."""
    return Folded(_outer_k(params.wq, params.wk), _outer_k(params.wo, params.wv), int(params.wq.shape[-1]))


def supports(attention: Attention | str | None = None) -> bool:
    """Whether this module computes ``attention``: the softmax, unnormalised and sigmoid kernels with the Euler
    residual and products in the inputs' dtype (``Attention.chunk``, ``remat`` and ``heads`` are loop choices of
    the per-head kernels and do not apply)."""
    spec = as_attention(attention, "folded.supports")
    return spec.kind in KINDS and spec.residual == "euler" and spec.matmul_dtype is None


def _spec(fn: str, attention) -> Attention:
    spec = as_attention(attention, fn)
    if not supports(spec):
        raise ValueError(
            f"{fn}: attention must be softmax, unnormalized or sigmoid with the Euler residual and no matmul_dtype "
            f"(mfattn.folded.supports), got {spec!r}; use the per-head kernels of mfattn.attention."
        )
    return spec


def _args(fn: str, tokens, weights, beta, radius):
    """``weights`` (uniform if None; else ``(N,)``, ``>= 0``, summing to 1), ``beta >= 0`` and ``radius > 0`` or
    None, checked as :func:`mfattn.forward` checks them (values under ``jit`` by ``equinox.error_if``) and cast to
    the tokens' dtype."""
    weights = _checks.check_weights(fn, weights, tokens.shape[0], tokens.dtype)
    beta = _checks.check_scalar(fn, "beta", beta, tokens.dtype)
    radius = _checks.check_scalar(fn, "radius", radius, tokens.dtype, allow_none=True, positive=True)
    return weights, beta, radius


def _check_layer(fn: str, layer: Folded, tokens):
    if layer.a.ndim != 3 or layer.a.shape != layer.b.shape or layer.a.shape[-1] != layer.a.shape[-2]:
        raise ValueError(f"{fn}: layer must hold a and b of one shape (H, d, d), got {layer.a.shape}, {layer.b.shape}.")
    if tokens.ndim != 2 or tokens.shape[-1] != layer.a.shape[-1]:
        raise ValueError(f"{fn}: tokens must be (N, d) with d = {layer.a.shape[-1]}, got shape {tokens.shape}.")


def _kernel(spec: Attention, a, x, keys, weights, beta):
    """Per query ``i``, atom ``j``, head ``h`` (axes ``(N, N, H)``): the kernel ``u`` without the key's mass, the
    row scaling ``r`` (``(N, 1, H)``: ``1/z`` when normalised, else 1) and the weights ``w_ij = m_j u_ij r_i``."""
    n, d = x.shape
    heads = a.shape[0]
    pairs = (x[:, None, :, None] * keys[None, :, None, :]).reshape(n * n, d * d)  # x_i (x) y_j
    s = beta * (pairs @ a.reshape(heads, d * d).T).reshape(n, n, heads)
    live = (weights > 0)[None, :, None]
    causal = (jnp.arange(n)[None, :] <= jnp.arange(n)[:, None])[:, :, None] if spec.causal else None
    if spec.normalized:
        # Shifted by the largest score over live (allowed) atoms; a padding atom's exponent is capped (as in
        # mfattn.adjoint: this can only saturate the Lions derivative at such a zero-weight token).
        allowed = live if causal is None else live & causal
        top = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=1, keepdims=True)
        top = jnp.where(jnp.isfinite(top), top, 0)
        u = jnp.exp(jnp.minimum(s - top, exp_cap(s.dtype)))
    elif spec.kind == "unnormalized":
        u = jnp.exp(jnp.where(live, s, jnp.minimum(s, exp_cap(s.dtype))))
    else:  # sigmoid
        u = jax.nn.sigmoid(s + spec.bias)
    if causal is not None:
        u = jnp.where(causal, u, 0)
    m = weights[None, :, None]
    if spec.normalized:
        z = jnp.sum(m * u, axis=1, keepdims=True)  # 0 only for a zero-weight token with an empty (causal) prefix
        r = jnp.where(z > 0, 1 / jnp.where(z > 0, z, 1), 0)
    else:
        r = jnp.ones((n, 1, heads), u.dtype)
    return u, r, m * u * r


def _mix(coef, mats, vecs, axis: int):
    """``sum_h coef_ijh M_h`` (one matrix product over the heads), applied to ``vecs``: on the right and summed
    over ``j`` (``axis = 1``, ``(N, d)`` indexed by ``i``), or transposed and summed over ``i`` (``axis = 0``,
    indexed by ``j``)."""
    n, _, heads = coef.shape
    d = mats.shape[-1]
    c = (coef.reshape(n * n, heads) @ mats.reshape(heads, d * d)).reshape(n, n, d, d)  # (i, j, a, b)
    if axis == 1:
        return jnp.sum(c * vecs[None, :, None, :], axis=(1, 3))  # sum_j C_ij y_j
    return jnp.sum(c * vecs[:, None, :, None], axis=(0, 2))  # sum_i C_ij^T v_i


def _beta(spec: Attention, layer: Folded, beta):
    return beta * spec.scale(layer.head_dim)


def _velocity(spec, layer, tokens, weights, beta, radius):
    keys = project_ball(tokens, radius)
    _, _, w = _kernel(spec, layer.a, tokens, keys, weights, _beta(spec, layer, beta))
    return _mix(w, layer.b, keys, 1) / layer.a.shape[0]


def _adjoint_field(spec, layer, tokens, adjoints, weights, beta, radius):
    n, d = tokens.shape
    heads = layer.a.shape[0]
    beta = _beta(spec, layer, beta)
    keys = project_ball(tokens, radius)
    u, r, w = _kernel(spec, layer.a, tokens, keys, weights, beta)
    pairs = (adjoints[:, None, :, None] * keys[None, :, None, :]).reshape(n * n, d * d)  # p_i (x) y_j
    e = (pairs @ layer.b.reshape(heads, d * d).T).reshape(n, n, heads)  # e_ij = p_i^T B y_j
    m = weights[None, :, None]
    if spec.normalized:
        # e_ij - ebar_i with one step of iterative refinement (see mfattn.adjoint): centre at sum_j w_ij e_ij,
        # then subtract the weighted mean of what is left.
        shifted = e - jnp.sum(w * e, axis=1, keepdims=True)
        ud = u * (shifted - jnp.sum(w * shifted, axis=1, keepdims=True))
    elif spec.kind == "unnormalized":
        ud = u * e
    else:
        ud = (u * (1 - u)) * e
    term1 = beta * _mix(m * ud * r, layer.a, keys, 1)
    # The Lions term sums over live query rows i with mass m_i r_i; dead rows are masked with where (not
    # multiplied by 0), so a non-finite adjoint at a padding token cannot leak.
    live = (weights > 0)[:, None, None]
    row = jnp.where(live, weights[:, None, None] * r, 0)
    p_live = jnp.where(live[:, :, 0], adjoints, 0)
    term2 = _mix(u * row, layer.b, p_live, 0) + beta * _mix(jnp.where(live, ud, 0) * row, layer.a, tokens, 0)
    return (term1 + project_ball_vjp(tokens, term2, radius)) / heads


def velocity(
    layer: Folded, tokens: Float[Array, "N d"], weights: Float[Array, " N"], *, beta, radius=None, attention=None
) -> Float[Array, "N d"]:
    """The velocity ``F(mu, x_i, nu) = (1/H) sum_h Gamma(mu, x_i, theta_h)`` at every token, from one layer's
    folded heads (leaves ``(H, d, d)``): :func:`mfattn.velocity` with the tokens as queries."""
    spec = _spec("folded.velocity", attention)
    _check_layer("folded.velocity", layer, tokens)
    weights, beta, radius = _args("folded.velocity", tokens, weights, beta, radius)
    return _velocity(spec, layer, tokens, weights, beta, radius)


def adjoint_field(
    layer: Folded,
    tokens: Float[Array, "N d"],
    adjoints: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
    attention=None,
) -> Float[Array, "N d"]:
    """The adjoint field ``G`` (docs/spec.md section 4) from one layer's folded heads: :func:`mfattn.adjoint_field`."""
    spec = _spec("folded.adjoint_field", attention)
    _check_layer("folded.adjoint_field", layer, tokens)
    if adjoints.shape != tokens.shape:
        raise ValueError(
            f"folded.adjoint_field: adjoints must have the tokens' shape {tokens.shape}, got {adjoints.shape}."
        )
    weights, beta, radius = _args("folded.adjoint_field", tokens, weights, beta, radius)
    return _adjoint_field(spec, layer, tokens, adjoints, weights, beta, radius)


def _layers(fn: str, folded: Folded, tokens):
    if folded.a.ndim != 4 or folded.a.shape != folded.b.shape:
        raise ValueError(f"{fn}: folded must hold a and b of one shape (L, H, d, d), got {folded.a.shape}.")
    _check_layer(fn, Folded(folded.a[0], folded.b[0], folded.head_dim), tokens)
    return folded.a.shape[0]


def forward(
    folded: Folded, tokens: Float[Array, "N d"], *, beta, weights=None, radius=None, attention=None
) -> Float[Array, "L1 N d"]:
    """:func:`mfattn.forward` of the folded model (leaves ``(L, H, d, d)``): the trajectory ``(L + 1, N, d)``."""
    spec = _spec("folded.forward", attention)
    depth = _layers("folded.forward", folded, tokens)
    weights, beta, radius = _args("folded.forward", tokens, weights, beta, radius)
    step = spec.step(depth)

    def layer(x, ab):
        x = x + step * _velocity(spec, Folded(*ab, folded.head_dim), x, weights, beta, radius)
        return x, x

    _, traj = jax.lax.scan(layer, tokens, (folded.a, folded.b))
    return jnp.concatenate([tokens[None], traj], axis=0)


def adjoint(
    folded: Folded,
    trajectory: Float[Array, "L1 N d"],
    terminal: Float[Array, "N d"],
    *,
    beta,
    weights=None,
    radius=None,
    attention=None,
) -> Float[Array, "L1 N d"]:
    """:func:`mfattn.adjoint` of the folded model: ``p^l = p^{l+1} + G(x^l, p^{l+1}) / L``, ``(L + 1, N, d)``."""
    spec = _spec("folded.adjoint", attention)
    depth = _layers("folded.adjoint", folded, terminal)
    if trajectory.shape != (depth + 1, *terminal.shape):
        raise ValueError(
            f"folded.adjoint: trajectory must be (L + 1, N, d) = {(depth + 1, *terminal.shape)}, "
            f"got {trajectory.shape}."
        )
    weights, beta, radius = _args("folded.adjoint", terminal, weights, beta, radius)
    step = spec.step(depth)

    def layer(p, inp):
        a, b, x = inp
        p = p + step * _adjoint_field(spec, Folded(a, b, folded.head_dim), x, p, weights, beta, radius)
        return p, p

    _, ps = jax.lax.scan(layer, terminal, (folded.a, folded.b, trajectory[:-1]), reverse=True)
    return jnp.concatenate([ps, terminal[None]], axis=0)
