"""Hand-derived backward kernels: the adjoint field ``G`` and the gradient map ``g`` (docs/spec.md section 4).

With ``p_i = (1/m_i) d ell / d x_i`` the rescaled adjoint of token ``i`` and one layer's heads
(or parameter particles) ``theta_h``, the adjoint field is the average over heads of

    G_i = J(x_i)^T p_i  +  sum_j m_j (d_mu Gamma(mu, x_j)(x_i))^T p_j

(token Jacobian plus the Lions-derivative coupling), and the rescaled gradient map of one head is

    g(theta, pi) = sum_i m_i grad_theta Gamma(mu, x_i, theta)^T p_i.

Both are evaluated in ``O(N^2 k)`` work per head through the ``k``-dimensional projections, without
forming ``d x d`` or ``N x N x d x d`` objects. Notation per head (all ``(N, k)`` unless stated)::

    Q = X W_Q,  K = Xk W_K,  V = Xk W_V       (Xk = Pi_R(X): keys/values see the projected measure)
    S = beta Q K^T,  U_ij = exp(S_ij) / sum_l m_l exp(S_il)  (N, N),  W_ij = m_j U_ij = w_j(x_i)
    a = P W_O   (a_i = W_O^T p_i),  E = a V^T (N, N),  D_ij = E_ij - sum_l W_il E_il
    Delta = W * D (the delta_j of docs/spec.md section 4)

    J(x_i)^T p_i                         = beta [Delta K]_i W_Q^T
    sum_j m_j (d_mu Gamma(x_j)(x_i))^T p_j = [U^T (m a)]_i W_V^T + beta [(U * D)^T (m Q)]_i W_K^T
    g:  dW_O = (m P)^T (W V),  dW_V = Xk^T (m U^T (m a)),
        dW_Q = beta X^T (m Delta K),  dW_K = beta Xk^T (m (U * D)^T (m Q)).

``U_ij = w_j(x_i) / m_j`` is the softmax kernel *without* the key's mass; it makes the ``1/m_i`` of the
Lions term exact, and at a token of weight 0 it gives the Lions derivative's value there (the adjoint
of a zero-weight query token, which the rates experiment needs). Zero-weight tokens never influence
the others: their rows are masked with ``where`` (not multiplied by 0), so even a huge adjoint at a
padding token cannot leak into real tokens.

Cost per head: six ``N x N x k`` matrix products (two score-like, four transposed or weighted) and two
materialised ``N x N`` arrays, the same matrix-product count as ``jax.vjp`` of the forward pass.

The other closed-form kernels of :class:`~mfattn.Attention` (unnormalised, L2, sigmoid, causal masking)
follow the same scheme with their own kernel ``u``, row scaling ``r`` and score derivative ``ud`` (see
:func:`_head_backward`); Sinkhorn attention, which has no closed form, gets ``G`` and ``g`` by autodiff of
one layer (:func:`_autodiff_backward`). ``Attention(chunk=C)`` runs the rows in blocks of ``C``;
``Attention(remat=False)`` reuses the forward pass's kernel (:func:`cached_forward_layer`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _checks, lanes
from .attention import (
    Attention,
    _causal_allowed,
    _matmul,
    _scores,
    as_attention,
    exp_cap,
    over_heads,
    project_ball,
    project_ball_vjp,
    velocity,
)

__all__ = ["adjoint_field", "grad_map", "adjoint_field_and_grad_map"]


def _head_backward(spec, wq, wk, wv, wo, tokens, keys, weights, adjoints, beta, *, field, grad, cache=None):
    """One head's contribution to ``G`` (term1, term2 before ``DPi_R``) and its gradient map.

    Only two ``N x N`` arrays are formed besides the two score matrices: the kernel ``u`` and ``u * dev``;
    every product with the weights ``W = diag(r) u diag(m)`` (``r = 1/z`` when normalised, else 1) moves
    the diagonal scalings onto the ``(N, k)`` operands.

    In general ``w_ij = m_j phi(s_ij) r_i``; with ``e_ij = <a_i, W_V^T x_j>`` the derivative of
    ``sum_j w_ij e_ij`` in ``s_ij`` is ``m_j ud_ij r_i`` with ``ud = u * (e - ebar)`` for the normalised
    exponential kernels, ``u * e`` for the unnormalised one and ``sigma'(s + b) * e`` for the sigmoid.
    For ``"l2"`` the score also depends on the key through ``-beta |K_j|^2 / 2``, which adds
    ``-beta (ud^T (m r))_j K_j`` to the key term.
    """
    n = tokens.shape[0]
    live = weights > 0
    m = weights[:, None]
    mm, proj = _matmul(spec), _matmul(spec, shared=True)  # mixed precision when asked
    kk = proj(keys, wk)
    v = proj(keys, wv)
    rows = dict(x=tokens, p=adjoints, w=weights, i=jnp.arange(n))
    chunk = spec.chunk
    if cache is not None or chunk is None or chunk >= n:
        acc, out_rows = _backward_rows(spec, wq, wo, rows, kk, v, weights, beta, mm, cache)
    else:
        # Query rows in blocks of `chunk` (padded with dead rows): memory O(chunk N) per head. The
        # transposed (Lions) products and the gradients accumulate over the blocks.
        nb = -(-n // chunk)
        pad = nb * chunk - n
        blocks = jax.tree.map(
            lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(nb, chunk, *a.shape[1:]), rows
        )

        def body(acc, block):
            add, out = _backward_rows(spec, wq, wo, block, kk, v, weights, beta, mm)
            return jax.tree.map(jnp.add, acc, add), out

        zeros = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(
                lambda: _backward_rows(spec, wq, wo, jax.tree.map(lambda a: a[0], blocks), kk, v, weights, beta, mm)[0]
            ),
        )
        acc, out_rows = jax.lax.scan(body, zeros, blocks)
        out_rows = jax.tree.map(lambda a: a.reshape(nb * chunk, *a.shape[2:])[:n], out_rows)
    key_term = acc["key_term"]
    if spec.kind == "l2":
        key_term = key_term - acc["colsum"] * kk
    live_keys = live[:, None]
    out = {}
    if field:
        out["term1"] = beta * proj(out_rows["delta_k"], wq.T)
        out["term2"] = proj(acc["ut_ma"], wv.T) + beta * proj(key_term, wk.T)
    if grad:
        out["grad"] = (
            beta * acc["dwq"],  # dW_Q
            beta * proj(keys.T, jnp.where(live_keys, m * key_term, 0)),  # dW_K
            proj(keys.T, jnp.where(live_keys, m * acc["ut_ma"], 0)),  # dW_V
            acc["dwo"],  # dW_O
        )
    return out


def _kernel_rows(spec, q, kk, v, weights, beta, idx, mm):
    """For a block of query rows (projected queries ``q``, row indices ``idx``): the kernel ``u``
    (``(R, N)``), the row scalings ``r`` (``(R, 1)``; ``1/z`` when normalised) and ``vbar = W_V^T ybar``
    (``(R, k)``), so that the head's output is ``vbar W_O^T``."""
    live = weights > 0
    m = weights[:, None]
    s = _scores(spec, q, kk, beta)
    causal = _causal_allowed(idx, kk.shape[0]) if spec.causal else None
    if spec.normalized:
        # Shift by the largest score over live (allowed) keys: u <= 1 on live keys and z_i >= the top
        # key's mass. A padding key may score far higher; its exponent is clamped so that u stays finite
        # (this can only saturate the Lions derivative *at* such a zero-weight token, never touch a live one).
        allowed = live[None, :] if causal is None else live[None, :] & causal
        top = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
        top = jnp.where(jnp.isfinite(top), top, 0)
        u = jnp.exp(jnp.minimum(s - top, exp_cap(s.dtype)))  # (R, N): U_ij = u_ij / z_i
    elif spec.kind == "unnormalized":
        u = jnp.exp(jnp.where(live[None, :], s, jnp.minimum(s, exp_cap(s.dtype))))
    else:  # sigmoid
        u = jax.nn.sigmoid(s + spec.bias)
    if causal is not None:
        u = jnp.where(causal, u, 0)
    if spec.normalized:
        z = u @ m  # (R, 1); 0 only for a zero-weight token with an empty (causal) prefix
        rz = jnp.where(z > 0, 1 / jnp.where(z > 0, z, 1), 0)
    else:
        rz = jnp.ones((q.shape[0], 1), u.dtype)
    vbar = mm(u, m * v) * rz  # (R, k): W_V^T ybar_i
    return u, rz, vbar


def _backward_rows(spec, wq, wo, rows, kk, v, weights, beta, mm, cache=None):
    """The backward pass restricted to a block of query rows: the row-local ``delta_k`` and the block's
    additive contributions to the transposed products and to ``dW_Q``, ``dW_O``. ``cache`` holds the
    forward pass's ``(u, r, vbar)`` for these rows (then no score is recomputed)."""
    m = weights[:, None]
    x, p, w, idx = rows["x"], rows["p"], rows["w"], rows["i"]
    m_rows = w[:, None]
    live_rows = (w > 0)[:, None]
    proj = _matmul(spec, shared=True)
    q = proj(x, wq)
    u, rz, vbar = _kernel_rows(spec, q, kk, v, weights, beta, idx, mm) if cache is None else cache
    a = proj(p, wo)  # (R, k): a_i = W_O^T p_i
    e = mm(a, v.T)  # (R, N): <a_i, W_V^T x_j>
    if spec.normalized:
        # dev_ij = e_ij - ebar_i by one step of iterative refinement: centre at c_i = <a_i, vbar_i>, then
        # subtract sum_l w_il (e_il - c_i). When the softmax is nearly one-hot (large beta) the plain
        # e - ebar cancels catastrophically; the correction is a sum of small, accurate terms.
        shifted = e - jnp.sum(a * vbar, axis=-1, keepdims=True)
        ud = u * (shifted - ((u * shifted) @ m) * rz)
    elif spec.kind == "unnormalized":
        ud = u * e
    else:
        ud = (u * (1 - u)) * e  # zero where masked, as u is
    delta_k = mm(ud, m * kk) * rz  # (R, k): sum_j delta_ij W_K^T x_j
    # Transposed (Lions) products sum over query rows i with mass m_i r_i; dead rows are masked with
    # where (not multiplied by 0), so a non-finite adjoint at a padding token cannot leak.
    ma = jnp.where(live_rows, m_rows * a, 0) * rz
    mq = jnp.where(live_rows, m_rows * q, 0) * rz
    udl = jnp.where(live_rows, ud, 0)
    acc = {
        "ut_ma": mm(u.T, ma),  # (N, k): [U^T (m a)]
        "key_term": mm(udl.T, mq),  # (N, k): [(U * D)^T (m Q)], the score's derivative in the key
        "dwq": proj(x.T, jnp.where(live_rows, m_rows * delta_k, 0)),
        "dwo": proj(jnp.where(live_rows, m_rows * p, 0).T, vbar),
    }
    if spec.kind == "l2":
        acc["colsum"] = udl.T @ (jnp.where(live_rows, m_rows, 0) * rz)  # (N, 1)
    return acc, {"delta_k": delta_k}


def _backward(theta, tokens, adjoints, weights, beta, radius, *, field, grad, attention=None, cache=None):
    spec = as_attention(attention)
    beta = beta * spec.scale(theta.wq.shape[-1])
    if spec.kind == "sinkhorn":
        return _autodiff_backward(spec, theta, tokens, adjoints, weights, beta, radius, field=field, grad=grad)
    if cache is None and lanes.applies(spec, tokens.shape[0], theta.wq.shape[0], theta.wq.shape[-2:]):
        g_field, g = lanes.backward(
            theta, tokens, adjoints, weights, beta=beta, radius=radius, spec=spec, field=field, grad=grad
        )
        return g_field, None if g is None else _like(theta, *g)
    keys = project_ball(tokens, radius)
    per_head = over_heads(
        lambda wq, wk, wv, wo, c: _head_backward(
            spec, wq, wk, wv, wo, tokens, keys, weights, adjoints, beta, field=field, grad=grad, cache=c
        ),
        (theta.wq, theta.wk, theta.wv, theta.wo, cache),
        tokens.shape[0],
        spec.heads,
    )
    g_field = None
    if field:
        term2 = jnp.mean(per_head["term2"], axis=0)
        g_field = jnp.mean(per_head["term1"], axis=0) + project_ball_vjp(tokens, term2, radius)
    g_map = None
    if grad:
        dq, dk, dv, do = per_head["grad"]
        g_map = _like(theta, dq, dk, dv, do)
    return g_field, g_map


def _autodiff_backward(spec, theta, tokens, adjoints, weights, beta, radius, *, field, grad):
    """``G`` and ``g`` by autodiff of one layer's velocity, for kernels without a closed-form backward.

    * ``J(x_i)^T p_i``: ``jax.vjp`` in the queries (held apart from the atoms of ``mu``) with cotangent ``p``;
    * the Lions term at a live atom: ``(1/m_i) d/dx_i sum_j m_j <p_j, F(mu, x_j)>`` by ``jax.vjp`` in the
      atoms, queries held fixed; at a zero-weight atom the ``1/m_i`` limit is the mixed derivative
      ``d/dx_i d/dm_i`` of the same sum (forward mode in the masses, then reverse mode in the atoms),
      which the kernels support because they are differentiable in ``m`` at ``m_i = 0``;
    * ``g``: ``P`` times ``jax.vjp`` in the heads with cotangent ``m p`` (``F`` averages over heads).

    ``beta`` already includes the logit scale.
    """
    live = weights > 0
    live_rows = live[:, None]
    mp = jnp.where(live_rows, weights[:, None] * adjoints, 0)
    unscaled = dataclasses.replace(spec, logit_scale=None)

    def vel(th, xq, xk, mk):
        return velocity(th, xq, xk, mk, beta=beta, radius=radius, attention=unscaled, check=False)

    g_field = g_map = None
    if field:
        _, vjp_q = jax.vjp(lambda xq: vel(theta, xq, tokens, weights), tokens)
        jt_p = vjp_q(adjoints)[0]
        _, vjp_k = jax.vjp(lambda xk: vel(theta, tokens, xk, weights), tokens)
        lions_live = vjp_k(mp)[0] / jnp.where(live_rows, weights[:, None], 1)

        def first_variation(xk):
            dead = jnp.where(live, 0, 1).astype(weights.dtype)
            return jax.jvp(lambda mk: jnp.sum(mp * vel(theta, tokens, xk, mk)), (weights,), (dead,))[1]

        lions_dead = jax.grad(first_variation)(tokens)
        g_field = jt_p + jnp.where(live_rows, lions_live, lions_dead)
    if grad:
        _, vjp_t = jax.vjp(lambda th: vel(th, tokens, tokens, weights), theta)
        heads = theta.wq.shape[0]
        g = vjp_t(mp)[0]
        g_map = _like(theta, *(heads * x for x in (g.wq, g.wk, g.wv, g.wo)))
    return g_field, g_map


def _like(theta, wq, wk, wv, wo):
    """A pytree of ``theta``'s type holding the given leaves (bypassing ``Params``' 4-D check)."""
    ref = (theta.wq, theta.wk, theta.wv, theta.wo)
    leaves = [x.astype(r.dtype) for x, r in zip((wq, wk, wv, wo), ref)]
    return jax.tree.unflatten(jax.tree.structure(theta), leaves)


def adjoint_field(
    theta,
    tokens: Float[Array, "N d"],
    adjoints: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
    attention: Attention | str | None = None,
    check: bool = True,
) -> Float[Array, "N d"]:
    """The adjoint field ``G(pi, x_i, p_i; nu)`` at every token (docs/spec.md section 4).

    Args:
        theta: one layer's heads (or one grid time's particles), leaves ``(P, d, k)``.
        tokens: ``(N, d)`` token positions ``x_i`` (the layer's input).
        adjoints: ``(N, d)`` rescaled adjoints ``p_i`` (the layer's output adjoints ``p^{l+1}``).
        weights: ``(N,)`` token masses.
        beta: inverse temperature.
        radius: optional projection radius ``R``.
        attention: the kernel (:class:`~mfattn.Attention` or a kind string; default softmax). Closed-form
            backward for every kind but ``"sinkhorn"``, whose ``G`` and ``g`` come from autodiff of the
            layer's velocity (through the unrolled Sinkhorn iterations).
        check: validate the arguments, as :func:`mfattn.velocity` does (the library's own layers pass
            ``False``).

    Returns:
        ``(N, d)``: ``(1/P) sum_h [J_h(x_i)^T p_i + sum_j m_j (d_mu Gamma_h(x_j)(x_i))^T p_j]``. The
        discrete backward step is ``p^l = p^{l+1} + G / L``; the limit's is ``dp/dt = -G``.
    """
    if check:
        attention = as_attention(attention, "adjoint_field")
        theta, _, tokens, adjoints, weights, beta, radius = _checks.kernel_args(
            "adjoint_field", theta, None, tokens, weights, beta, radius, adjoints
        )
    return _backward(theta, tokens, adjoints, weights, beta, radius, field=True, grad=False, attention=attention)[0]


def grad_map(
    theta,
    tokens: Float[Array, "N d"],
    adjoints: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
    attention: Attention | str | None = None,
    check: bool = True,
):
    """The rescaled gradient map ``g(theta_h, pi) = sum_i m_i grad_theta Gamma(mu, x_i, theta_h)^T p_i``
    for every head (particle) ``h`` of one layer (docs/spec.md, paper eq. 20).

    Returns a pytree like ``theta`` (leaves ``(P, d, k)``). The true gradient of the loss with respect
    to head ``h`` of layer ``l`` in an ``L``-layer, ``H``-head model is ``g / (L H)``. Arguments as in
    :func:`adjoint_field` (``check``: validate them, the default).
    """
    if check:
        attention = as_attention(attention, "grad_map")
        theta, _, tokens, adjoints, weights, beta, radius = _checks.kernel_args(
            "grad_map", theta, None, tokens, weights, beta, radius, adjoints
        )
    return _backward(theta, tokens, adjoints, weights, beta, radius, field=False, grad=True, attention=attention)[1]


def cached_forward_layer(theta, tokens, weights, *, beta, radius=None, attention=None):
    """One layer's velocity ``F`` (``(N, d)``) together with the per-head kernels ``(u, r, vbar)``
    (leaves ``(P, N, N)``, ``(P, N, 1)``, ``(P, N, k)``) that :func:`adjoint_field_and_grad_map` accepts
    as ``cache`` -- the backward pass then recomputes no score (``Attention(remat=False)``)."""
    spec = as_attention(attention)
    beta = beta * spec.scale(theta.wq.shape[-1])
    keys = project_ball(tokens, radius)
    mm, proj = _matmul(spec), _matmul(spec, shared=True)

    def head(wq, wk, wv, wo):
        kk, v = proj(keys, wk), proj(keys, wv)
        u, rz, vbar = _kernel_rows(spec, proj(tokens, wq), kk, v, weights, beta, jnp.arange(tokens.shape[0]), mm)
        return proj(vbar, wo.T), (u, rz, vbar)

    out, cache = over_heads(head, (theta.wq, theta.wk, theta.wv, theta.wo), tokens.shape[0], spec.heads)
    return jnp.mean(out, axis=0), cache


def adjoint_field_and_grad_map(
    theta,
    tokens: Float[Array, "N d"],
    adjoints: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
    attention: Attention | str | None = None,
    cache=None,
):
    """``(adjoint_field(...), grad_map(...))`` sharing one evaluation of the attention weights (or none,
    given the forward pass's ``cache`` from :func:`cached_forward_layer`)."""
    return _backward(
        theta, tokens, adjoints, weights, beta, radius, field=True, grad=True, attention=attention, cache=cache
    )
