"""Float64 comparison of the hand-derived backward pass against ``jax`` autodiff on a random instance.

``mfattn gradcheck`` prints the result; tests use the same quantities against an independent naive
implementation. Each error is ``|hand - autodiff| / |autodiff|`` in the Frobenius norm over all entries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .adjoint import _backward
from .attention import as_attention, velocity
from .losses import TokenRegression
from .params import init_params
from .particles import _adjoint, _forward, _param_grad

__all__ = ["gradcheck"]


def _x64():
    """Context manager enabling float64 (``jax.enable_x64`` in new JAX, ``jax.experimental`` in old)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / den) if den > 0 else float(num)


def gradcheck(
    *,
    depth: int = 4,
    heads: int = 3,
    tokens: int = 7,
    dim: int = 5,
    head_dim: int = 3,
    beta: float = 1.0,
    seed: int = 0,
    padding: bool = True,
    attention=None,
) -> dict[str, float]:
    """Largest relative errors of the hand path against autodiff, in float64.

    Quantities: ``jacobian`` (``J(x_i)^T p_i`` vs ``jax.vjp`` in the query), ``lions`` (the coupling term
    vs ``(1/m_i) jax.vjp`` in atom ``i``), ``adjoint`` (every ``p^l`` vs ``(1/m_i) d ell / d x_i^l``),
    ``param_grad`` (every ``g_{l,h}`` vs ``L H d ell / d theta_{l,h}``) and ``loss_and_grad``.
    Weights are random and non-uniform; with ``padding`` one token has weight 0 (when ``tokens > 1``).
    ``attention`` selects the variant (:class:`~mfattn.Attention` or a kind string); the per-term split
    ``jacobian``/``lions`` is reported for the closed-form kinds. With ``residual="sphere"`` the input
    tokens are normalised onto the sphere.

    Raises:
        ValueError: for a non-positive size, a non-integer seed, a negative or non-finite ``beta``
            (``TypeError`` if it is not a number), before anything is computed.
    """
    for name, value in (("depth", depth), ("heads", heads), ("tokens", tokens), ("dim", dim), ("head_dim", head_dim)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"gradcheck: {name} must be a positive integer, got {value!r}.")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"gradcheck: seed must be an integer, got {seed!r}.")
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"gradcheck: beta must be a real number, got {type(beta).__name__} {beta!r}.")
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"gradcheck: beta must be finite and >= 0, got {beta!r}.")
    if not isinstance(padding, bool):
        raise ValueError(f"gradcheck: padding must be True or False, got {padding!r}.")
    spec = as_attention(attention)
    with _x64():
        f64 = jnp.float64
        k = jax.random.split(jax.random.key(seed), 6)
        params = init_params(k[0], depth, heads, dim, head_dim, init="mean_noise", scale=0.5, dtype=f64)
        x0 = jax.random.normal(k[1], (tokens, dim), f64)
        m = jax.random.uniform(k[2], (tokens,), f64, 0.2, 1.0)
        if padding and tokens > 1:
            m = m.at[tokens // 2].set(0.0)
        m = m / m.sum()
        live = np.asarray(m > 0)
        targets = jax.random.normal(k[3], (tokens, dim), f64)
        p_rand = jax.random.normal(k[4], (tokens, dim), f64)
        beta = jnp.asarray(beta, f64)
        loss = TokenRegression()
        out = {}

        if spec.residual == "sphere":
            x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
        kernel = dataclasses.replace(spec, residual="euler", depth_exponent=1.0)
        theta = jax.tree.map(lambda x: x[0], params)
        hand = _backward(theta, x0, p_rand, m, beta, None, field=True, grad=False, attention=kernel)[0]
        # J^T p at every query, by autodiff in the query argument only.
        _, vjp_q = jax.vjp(lambda q: velocity(theta, q, x0, m, beta=beta, attention=kernel), x0)
        jac = vjp_q(p_rand)[0]
        # Coupling term: (1/m_i) d/dx_i of sum_j m_j <p_j, F(mu, x_j)> with the queries held fixed.
        _, vjp_k = jax.vjp(lambda t: velocity(theta, x0, t, m, beta=beta, attention=kernel), x0)
        lions = vjp_k(m[:, None] * p_rand)[0] / jnp.where(m > 0, m, 1)[:, None]
        if spec.kind != "sinkhorn":  # Sinkhorn's G *is* these vjps: comparing would be vacuous
            out["jacobian+lions"] = _rel(hand[live], (jac + lions)[live])
            scaled = beta * kernel.scale(head_dim)
            term = jax.vmap(lambda wq, wk, wv, wo: _head_terms(kernel, wq, wk, wv, wo, x0, m, p_rand, scaled))(
                theta.wq, theta.wk, theta.wv, theta.wo
            )
            out["jacobian"] = _rel(jnp.mean(term[0], 0), jac)
            out["lions"] = _rel(jnp.mean(term[1], 0)[live], lions[live])

        traj = _forward(params, x0, m, beta, None, spec)
        terminal = loss.lions(traj[-1], m, targets)
        ps = _adjoint(params, traj, terminal, m, beta, None, spec)
        step = spec.step(depth)

        def from_perturbation(eps):
            x = x0 + eps[0]
            for l in range(depth):
                th = jax.tree.map(lambda a, l=l: a[l], params)
                x = x + step * velocity(th, x, x, m, beta=beta, attention=spec)
                if spec.residual == "sphere":
                    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
                x = x + eps[l + 1]
            return loss(x, m, targets)

        g_tokens = jax.grad(from_perturbation)(jnp.zeros((depth + 1, tokens, dim), f64))
        ref_p = g_tokens / jnp.where(m > 0, m, 1)[None, :, None]
        out["adjoint"] = _rel(ps[:, live], ref_p[:, live])

        g = _param_grad(params, traj, ps, m, beta, None, spec)
        ref_g = jax.grad(lambda p: loss(_forward(p, x0, m, beta, None, spec)[-1], m, targets))(params)
        scale = heads / step
        out["param_grad"] = max(_rel(a, scale * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
        return out


def _head_terms(spec, wq, wk, wv, wo, x0, m, p, beta):
    from .adjoint import _head_backward

    o = _head_backward(spec, wq, wk, wv, wo, x0, x0, m, p, beta, field=True, grad=False)
    return o["term1"], o["term2"]
