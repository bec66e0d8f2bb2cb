"""Hand-derived backward kernels: the adjoint field ``G`` and the gradient map ``g`` (SPEC section 4).

With ``p_i = (1/m_i) d ell / d x_i`` the rescaled adjoint of token ``i`` and one layer's heads
(or parameter particles) ``theta_h``, the adjoint field is the average over heads of

    G_i = J(x_i)^T p_i  +  sum_j m_j (d_mu Gamma(mu, x_j)(x_i))^T p_j

(token Jacobian plus the Lions-derivative coupling), and the rescaled gradient map of one head is

    g(theta, pi) = sum_i m_i grad_theta Gamma(mu, x_i, theta)^T p_i.

Both are evaluated in ``O(N^2 k)`` work per head through the ``k``-dimensional projections, without
forming ``d x d`` or ``N x N x d x d`` objects. Notation per head (all ``(N, k)`` unless stated)::

    Q = X W_Q,  K = Xk W_K,  V = Xk W_V       (Xk = Pi_R(X): keys/values see the projected measure)
    S = beta Q K^T,  U_ij = exp(S_ij - lse_i) (N, N),  W_ij = m_j U_ij   (softmax weights w_j(x_i))
    a = P W_O   (a_i = W_O^T p_i),  E = a V^T (N, N),  D_ij = E_ij - sum_l W_il E_il  (computed
    centred at each row's largest weight, which keeps it accurate when the softmax is nearly one-hot)
    Delta = W * D (the delta_j of SPEC section 4)

    J(x_i)^T p_i                         = beta [Delta K]_i W_Q^T
    sum_j m_j (d_mu Gamma(x_j)(x_i))^T p_j = [U^T (m a)]_i W_V^T + beta [(U * D)^T (m Q)]_i W_K^T
    g:  dW_O = (m P)^T (W V),  dW_V = Xk^T (m U^T (m a)),
        dW_Q = beta X^T (m Delta K),  dW_K = beta Xk^T (m (U * D)^T (m Q)).

``U_ij = w_j(x_i) / m_j`` is the softmax kernel *without* the key's mass; it makes the ``1/m_i`` of the
Lions term exact, and at a token of weight 0 it gives the Lions derivative's value there (the adjoint
of a zero-weight query token, which the rates experiment needs). Zero-weight tokens never influence
the others: their rows and columns are masked with ``where`` (not multiplied by 0), so even an
overflowing adjoint at a padding token cannot leak into real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .attention import log_weights, project_ball, project_ball_vjp

__all__ = ["adjoint_field", "grad_map", "adjoint_field_and_grad_map"]


def _head_backward(wq, wk, wv, wo, tokens, keys, weights, logm, adjoints, beta, *, field, grad):
    """One head's contribution to ``G`` (term1, term2 before ``DPi_R``) and its gradient map."""
    live = weights > 0
    q = tokens @ wq
    kk = keys @ wk
    v = keys @ wv
    s = beta * (q @ kk.T)
    lse = jax.nn.logsumexp(s + logm[None, :], axis=-1, keepdims=True)
    u = jnp.exp(s - lse)  # U_ij = w_j(x_i) / m_j, finite for live j
    w = jnp.where(live[None, :], u * weights[None, :], 0)  # softmax weights, exactly 0 on padding
    a = adjoints @ wo  # (N, k): a_i = W_O^T p_i
    e = a @ v.T  # (N, N): <a_i, W_V^T x_j>
    # dev_ij = e_ij - ebar_i, centred at each row's largest weight j*: with e* = e_{i j*},
    # dev = (e - e*) - sum_l w_il (e_il - e*). When the softmax is nearly one-hot (large beta) every
    # term is then small and exact, where e - ebar would cancel catastrophically.
    anchor = jnp.argmax(s + logm[None, :], axis=-1)
    shifted = e - jnp.take_along_axis(e, anchor[:, None], axis=-1)
    dev = shifted - jnp.sum(w * shifted, axis=-1, keepdims=True)
    delta_k = (w * dev) @ kk  # (N, k): sum_j delta_ij W_K^T x_j
    # Transposed (Lions) products sum over query rows j with mass m_j: mask dead rows with where.
    live_rows = live[:, None]
    ma = jnp.where(live_rows, weights[:, None] * a, 0)
    mq = jnp.where(live_rows, weights[:, None] * q, 0)
    ut_ma = jnp.where(live_rows, u, 0).T @ ma  # (N, k)
    udt_mq = jnp.where(live_rows, u * dev, 0).T @ mq  # (N, k)
    out = {}
    if field:
        out["term1"] = beta * (delta_k @ wq.T)
        out["term2"] = ut_ma @ wv.T + beta * (udt_mq @ wk.T)
    if grad:
        mp = jnp.where(live_rows, weights[:, None] * adjoints, 0)
        vbar = w @ v  # (N, k): W_V^T ybar_i
        out["grad"] = (
            beta * (tokens.T @ jnp.where(live_rows, weights[:, None] * delta_k, 0)),  # dW_Q
            beta * (keys.T @ jnp.where(live_rows, weights[:, None] * udt_mq, 0)),  # dW_K
            keys.T @ jnp.where(live_rows, weights[:, None] * ut_ma, 0),  # dW_V
            mp.T @ vbar,  # dW_O
        )
    return out


def _backward(theta, tokens, adjoints, weights, beta, radius, *, field, grad):
    keys = project_ball(tokens, radius)
    logm = log_weights(weights)
    per_head = jax.vmap(
        lambda wq, wk, wv, wo: _head_backward(
            wq, wk, wv, wo, tokens, keys, weights, logm, adjoints, beta, field=field, grad=grad
        )
    )(theta.wq, theta.wk, theta.wv, theta.wo)
    g_field = None
    if field:
        term2 = jnp.mean(per_head["term2"], axis=0)
        g_field = jnp.mean(per_head["term1"], axis=0) + project_ball_vjp(tokens, term2, radius)
    g_map = None
    if grad:
        dq, dk, dv, do = per_head["grad"]
        g_map = _like(theta, dq, dk, dv, do)
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
) -> Float[Array, "N d"]:
    """The adjoint field ``G(pi, x_i, p_i; nu)`` at every token (SPEC section 4).

    Args:
        theta: one layer's heads (or one grid time's particles), leaves ``(P, d, k)``.
        tokens: ``(N, d)`` token positions ``x_i`` (the layer's input).
        adjoints: ``(N, d)`` rescaled adjoints ``p_i`` (the layer's output adjoints ``p^{l+1}``).
        weights: ``(N,)`` token masses.
        beta: inverse temperature.
        radius: optional projection radius ``R``.

    Returns:
        ``(N, d)``: ``(1/P) sum_h [J_h(x_i)^T p_i + sum_j m_j (d_mu Gamma_h(x_j)(x_i))^T p_j]``. The
        discrete backward step is ``p^l = p^{l+1} + G / L``; the limit's is ``dp/dt = -G``.
    """
    return _backward(theta, tokens, adjoints, weights, beta, radius, field=True, grad=False)[0]


def grad_map(
    theta,
    tokens: Float[Array, "N d"],
    adjoints: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
):
    """The rescaled gradient map ``g(theta_h, pi) = sum_i m_i grad_theta Gamma(mu, x_i, theta_h)^T p_i``
    for every head (particle) ``h`` of one layer (SPEC eq. 20).

    Returns a pytree like ``theta`` (leaves ``(P, d, k)``). The true gradient of the loss with respect
    to head ``h`` of layer ``l`` in an ``L``-layer, ``H``-head model is ``g / (L H)``.
    """
    return _backward(theta, tokens, adjoints, weights, beta, radius, field=False, grad=True)[1]


def adjoint_field_and_grad_map(
    theta,
    tokens: Float[Array, "N d"],
    adjoints: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
):
    """``(adjoint_field(...), grad_map(...))`` sharing one evaluation of the attention weights."""
    return _backward(theta, tokens, adjoints, weights, beta, radius, field=True, grad=True)
