"""Discrepancies between the discrete model and its limit, and their supremum over inputs (SPEC section 7).

For one input sequence (tokens ``X`` in the ball of radius ``R``, masses ``m``), with ``x^l, p^l`` the discrete
model's tokens and adjoints and ``x(t_l), p(t_l)`` the limit's at ``t_l = l / L``::

    err(X) = max_l max_{i: m_i > 0} (|x_i^l - x_i(t_l)|^2 + |p_i^l - p_i(t_l)|^2)^(1/2)

The *pointwise* error is the mean of ``err`` over a fixed test set; the *uniform* error is its supremum
over inputs, estimated by (a) the maximum over a large test set mixing several families of inputs and
(b) projected gradient ascent on the inputs from the worst candidates of (a) (:func:`sup_search`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .attention import project_ball

__all__ = ["discrepancy", "sup_search", "sup_search_fn", "projected_ascent", "input_families"]


def discrepancy(
    x_disc: Float[Array, "L1 N d"],
    p_disc: Float[Array, "L1 N d"],
    x_lim: Float[Array, "L1 N d"],
    p_lim: Float[Array, "L1 N d"],
    weights: Float[Array, " N"],
) -> Scalar:
    """``max_l max_{i live} (|dx_i^l|^2 + |dp_i^l|^2)^(1/2)`` over layers ``l = 0..L`` and tokens of
    positive mass."""
    sq = jnp.sum((x_disc - x_lim) ** 2, axis=-1) + jnp.sum((p_disc - p_lim) ** 2, axis=-1)  # (L+1, N)
    sq = jnp.where((weights > 0)[None, :], sq, 0.0)
    return jnp.sqrt(jnp.max(sq))


def sup_search(
    values_fn: Callable[[Array], Array],
    value_and_grad_fn: Callable[[Array], tuple[Array, Array]],
    candidates: Float[Array, "C N d"],
    *,
    radius: float,
    starts: int = 2,
    steps: int = 3,
    step_size: float = 0.1,
    values: Array | None = None,
) -> dict:
    """Estimate ``sup_X err(X)`` over token sequences in the ball of radius ``radius``.

    (a) ``err`` on every candidate; (b) from the ``starts`` worst candidates, ``steps`` steps of projected
    normalised gradient ascent ``X <- Pi_R(X + step_size R g / |g|_F)`` (``g = grad err``), keeping the best
    value seen along each path.

    Args:
        values_fn: ``(C, N, d) -> (C,)``, ``err`` of each input (batched, typically jitted).
        value_and_grad_fn: ``(S, N, d) -> ((S,), (S, N, d))``, ``err`` and its gradient in the input.
        candidates: ``(C, N, d)`` inputs, each token in the ball.
        radius: ``R``; starts, steps, step_size: the ascent's budget.
        values: ``values_fn(candidates)`` if already computed.

    Returns:
        ``{"test_set": max over candidates, "ascent": best value found by ascent (``-inf`` without ascent),
        "value": the larger, "source": "test_set" | "ascent", "argmax": the best input (N, d),
        "per_candidate": (C,) values}``.
    """
    values = values_fn(candidates) if values is None else values
    best_set = float(jnp.max(values))
    out = {
        "test_set": best_set,
        "ascent": float("-inf"),
        "per_candidate": values,
        "argmax": candidates[int(jnp.argmax(values))],
    }
    if starts > 0 and steps > 0:
        order = jnp.argsort(-values)[:starts]
        best_vals, best_x = projected_ascent(
            value_and_grad_fn, candidates[order], radius=radius, steps=steps, step_size=step_size
        )
        out["ascent"] = float(jnp.max(best_vals))
        if out["ascent"] > best_set:
            out["argmax"] = best_x[int(jnp.argmax(best_vals))]
    out["value"] = max(out["test_set"], out["ascent"])
    out["source"] = "ascent" if out["ascent"] > out["test_set"] else "test_set"
    return out


def projected_ascent(
    value_and_grad_fn: Callable[[Array], tuple[Array, Array]],
    x: Float[Array, "S N d"],
    *,
    radius: float,
    steps: int,
    step_size: float,
) -> tuple[Array, Array]:
    """``steps`` steps of ``X <- Pi_R(X + step_size R g / |g|_F)`` from each of the ``S`` starts ``x``; returns
    the best value seen on each path (the start included) and the input attaining it. Uses ``steps + 1``
    calls of ``value_and_grad_fn: (S, N, d) -> ((S,), (S, N, d))`` and nothing else."""
    vals, g = value_and_grad_fn(x)
    best_vals, best_x = vals, x
    for _ in range(steps):
        gnorm = jnp.sqrt(jnp.sum(g * g, axis=(-2, -1), keepdims=True))
        x = jax.vmap(lambda z: project_ball(z, radius))(x + step_size * radius * g / jnp.maximum(gnorm, 1e-30))
        vals, g = value_and_grad_fn(x)
        improved = vals > best_vals
        best_vals = jnp.where(improved, vals, best_vals)
        best_x = jnp.where(improved[:, None, None], x, best_x)
    return best_vals, best_x


def sup_search_fn(err_fn: Callable[[Array], Array], candidates: Float[Array, "C N d"], **kwargs) -> dict:
    """:func:`sup_search` for a single-input ``err_fn: (N, d) -> scalar`` (vmapped and jitted here)."""
    return sup_search(jax.jit(jax.vmap(err_fn)), jax.jit(jax.vmap(jax.value_and_grad(err_fn))), candidates, **kwargs)


def input_families(key, per_family: int, num_tokens: int, dim: int, radius: float, dtype=None) -> dict:
    """Test inputs in the ball of radius ``radius``, ``(per_family, N, d)`` each, from four families:

    * ``uniform``: every token uniform in the ball;
    * ``clustered``: tokens in 2 tight clusters at random points of the ball;
    * ``degenerate``: all tokens within ``1e-3 R`` of one random point (a nearly collapsed measure);
    * ``sphere``: tokens uniform on the sphere of radius ``R`` (the boundary, where the bound is tightest).
    """
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    k = jax.random.split(key, 6)
    shape = (per_family, num_tokens, dim)

    def in_ball(key, shape, r):
        g = jax.random.normal(key, shape, dtype)
        u = jax.random.uniform(jax.random.fold_in(key, 1), shape[:-1] + (1,), dtype)
        return r * g / jnp.linalg.norm(g, axis=-1, keepdims=True) * u ** (1.0 / dim)

    def on_sphere(key, shape):
        g = jax.random.normal(key, shape, dtype)
        return radius * g / jnp.linalg.norm(g, axis=-1, keepdims=True)

    centres = in_ball(k[1], (per_family, 2, dim), 0.8 * radius)
    which = jax.random.bernoulli(k[2], 0.5, (per_family, num_tokens))
    clustered = jnp.where(which[..., None], centres[:, :1], centres[:, 1:]) + in_ball(k[3], shape, 0.1 * radius)
    point = in_ball(k[4], (per_family, 1, dim), 0.9 * radius)
    degenerate = point + in_ball(k[5], shape, 1e-3 * radius)
    fams = {
        "uniform": in_ball(k[0], shape, radius),
        "clustered": clustered,
        "degenerate": degenerate,
        "sphere": on_sphere(jax.random.fold_in(k[0], 7), shape),
    }
    return {name: jax.vmap(lambda x: project_ball(x, radius))(x) for name, x in fams.items()}
