"""Mean-field softmax attention: the forward velocity ``F(mu, x, nu)`` (SPEC section 2).

For one head ``theta = (W_Q, W_K, W_V, W_O)`` (each ``d x k``), a query point ``x`` and the weighted
empirical measure ``mu = sum_j m_j delta_{x_j}``::

    s_j(x)  = beta <W_Q^T x, W_K^T x_j>
    w_j(x)  = m_j exp(s_j) / sum_i m_i exp(s_i)          (softmax of s_j + log m_j)
    Gamma(mu, x, theta) = W_O W_V^T sum_j w_j(x) x_j

and the velocity is the average over the heads (parameter particles) ``F = (1/P) sum_h Gamma_h``.
Everything is computed through the ``k``-dimensional projections ``x W_Q``, ``x W_K``, ``x W_V``; the
``d x d`` matrices ``A = W_Q W_K^T`` and ``B = W_O W_V^T`` are never formed. A token of weight 0 has
exactly no influence (its log-weight is ``-inf``).

With a radius ``R`` the measure is first pushed through the projection ``Pi_R`` onto the closed ball
(SPEC section 2, paper eq. 6-7): keys and values use ``Pi_R(x_j)``, queries are not projected.

The kernels here take one layer's (or one grid time's) parameters, a pytree with leaves ``(P, d, k)``,
and have no batch axis: batch with ``jax.vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["attention", "velocity", "project_ball", "project_ball_vjp", "log_weights"]


def log_weights(weights: Float[Array, " N"]) -> Float[Array, " N"]:
    """``log m_j``, with ``-inf`` (not NaN) for padding tokens of weight 0."""
    positive = weights > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, weights, 1)), -jnp.inf)


def project_ball(tokens: Float[Array, "N d"], radius) -> Float[Array, "N d"]:
    """``Pi_R(x) = x`` if ``|x| <= R`` else ``R x / |x|``, row-wise. ``radius=None`` is the identity."""
    if radius is None:
        return tokens
    norm = jnp.linalg.norm(tokens, axis=-1, keepdims=True)
    outside = norm > radius
    return jnp.where(outside, tokens * (radius / jnp.where(outside, norm, 1)), tokens)


def project_ball_vjp(tokens: Float[Array, "N d"], cotangent: Float[Array, "N d"], radius) -> Float[Array, "N d"]:
    """``DPi_R(x_i)^T v_i`` row-wise (the Jacobian is symmetric): ``v`` inside the ball, and
    ``(R/|x|) (v - x <x, v>/|x|^2)`` outside."""
    if radius is None:
        return cotangent
    norm = jnp.linalg.norm(tokens, axis=-1, keepdims=True)
    outside = norm > radius
    safe = jnp.where(outside, norm, 1)
    u = tokens / safe
    radial = jnp.sum(u * cotangent, axis=-1, keepdims=True)
    return jnp.where(outside, (radius / safe) * (cotangent - u * radial), cotangent)


def _head_forward(wq, wk, wv, wo, queries, keys, logm, beta):
    """One head, all queries: ``(Nq, d)``. Work ``O(Nq N k)``."""
    q = queries @ wq  # (Nq, k)
    kk = keys @ wk  # (N, k)
    v = keys @ wv  # (N, k)
    scores = beta * (q @ kk.T) + logm[None, :]  # (Nq, N)
    w = jax.nn.softmax(scores, axis=-1)
    return (w @ v) @ wo.T


def velocity(
    theta,
    queries: Float[Array, "Nq d"],
    tokens: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
) -> Float[Array, "Nq d"]:
    """Multi-head mean-field velocity ``F(mu, x, nu) = (1/P) sum_h Gamma(mu, x, theta_h)``.

    Args:
        theta: one layer's parameters (a :class:`~mfattn.Params`-like pytree ``wq, wk, wv, wo`` with
            leaves ``(P, d, k)``): the heads, or the parameter particles of ``nu``.
        queries: ``(Nq, d)`` points ``x`` at which ``F`` is evaluated.
        tokens: ``(N, d)`` atoms ``x_j`` of ``mu``.
        weights: ``(N,)`` masses ``m_j >= 0`` summing to 1 (not checked here).
        beta: inverse temperature.
        radius: optional ball radius ``R`` of the projection ``Pi_R`` applied to ``mu``.

    Returns:
        ``(Nq, d)``. Work ``O(P Nq N k)``, memory ``O(P Nq N)``.
    """
    keys = project_ball(tokens, radius)
    logm = log_weights(weights)
    heads = jax.vmap(_head_forward, in_axes=(0, 0, 0, 0, None, None, None, None))(
        theta.wq, theta.wk, theta.wv, theta.wo, queries, keys, logm, beta
    )
    return jnp.mean(heads, axis=0)


def attention(
    wq: Float[Array, "d k"],
    wk: Float[Array, "d k"],
    wv: Float[Array, "d k"],
    wo: Float[Array, "d k"],
    x: Float[Array, " d"],
    tokens: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
) -> Float[Array, " d"]:
    """One head at one query point: ``Gamma(mu, x, theta)`` (SPEC eq. 2-3).

    Example::

        y = attention(wq, wk, wv, wo, x, tokens, jnp.full(N, 1 / N), beta=1.0)   # (d,)
        Y = jax.vmap(attention, in_axes=(None,) * 4 + (0, None, None))(...)    # many queries
    """
    keys = project_ball(tokens, radius)
    return _head_forward(wq, wk, wv, wo, x[None, :], keys, log_weights(weights), beta)[0]
