"""Input validation for the public entry points.

Shape errors are raised as ``ValueError`` in Python, before anything is traced or compiled (shapes are
static, also under ``jit`` and ``vmap``). Value errors (negative or non-normalised weights, ``beta < 0``,
NaN or inf in tokens or parameters) are raised as ``ValueError`` when the inputs are concrete arrays;
when they are traced (the caller wrapped mfattn in ``jax.jit``/``jax.vmap``) the same checks are
attached with :func:`equinox.error_if` and raise at run time, before the result is returned.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .params import Params


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _tol(dtype) -> float:
    return float(np.sqrt(np.finfo(dtype).eps)) * 4


def check_params(fn: str, params) -> Params:
    if not isinstance(params, Params):
        raise ValueError(f"{fn}: params must be an mfattn.Params, got {type(params).__name__}.")
    shapes = {tuple(x.shape) for x in (params.wq, params.wk, params.wv, params.wo)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"{fn}: params leaves must all be (T, P, d, k); got shapes {sorted(shapes)}.")
    for name in ("wq", "wk", "wv", "wo"):
        if not jnp.issubdtype(getattr(params, name).dtype, jnp.floating):
            raise ValueError(f"{fn}: params.{name} must be floating point, got {getattr(params, name).dtype}.")
    return params


def check_finite(fn: str, name: str, x):
    """``x`` unchanged, or an error if it holds NaN or inf (``eqx.error_if`` when traced)."""
    bad = ~jnp.all(jnp.isfinite(x))
    if _traced(bad):  # inside jit/vmap (even a closed-over constant is traced there)
        return eqx.error_if(x, bad, f"{fn}: {name} contains NaN or inf.")
    if bool(bad):
        raise ValueError(f"{fn}: {name} contains NaN or inf.")
    return x


def check_array(fn: str, name: str, x, shape: tuple, dims: str):
    x = jnp.asarray(x)
    if x.shape != tuple(shape):
        hint = ""
        if x.ndim == len(shape) + 1 and x.shape[1:] == tuple(shape):
            hint = " (a leading batch axis? batch with jax.vmap)"
        raise ValueError(f"{fn}: {name} must have shape {dims} = {tuple(shape)}, got {x.shape}{hint}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} must be floating point, got dtype {x.dtype}.")
    return x


def check_weights(fn: str, weights, n: int, dtype):
    """Uniform ``1/N`` if ``weights`` is None, else checked: shape ``(N,)``, ``>= 0``, summing to 1."""
    if weights is None:
        return jnp.full((n,), 1.0 / n, dtype)
    weights = jnp.asarray(weights)
    if weights.shape != (n,):
        raise ValueError(f"{fn}: weights must have shape (N,) = ({n},) to match tokens, got {weights.shape}.")
    weights = weights.astype(dtype)
    tol = _tol(dtype)
    if _traced(weights):
        weights = eqx.error_if(
            weights, jnp.any(weights < 0) | ~jnp.all(jnp.isfinite(weights)), f"{fn}: weights must be >= 0."
        )
        return eqx.error_if(
            weights,
            jnp.abs(jnp.sum(weights) - 1) > tol,
            f"{fn}: weights must sum to 1 (tolerance {tol:.1e}).",
        )
    w = np.asarray(weights)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{fn}: weights must be finite and >= 0, got min {w.min()!r}.")
    if abs(float(w.sum()) - 1) > tol:
        raise ValueError(f"{fn}: weights must sum to 1 (tolerance {tol:.1e}), got sum {float(w.sum())!r}.")
    return weights


def check_scalar(fn: str, name: str, value, dtype, *, allow_none: bool = False):
    """A non-negative finite scalar as an array of ``dtype`` (None passes through when allowed)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{fn}: {name} is required.")
    if _traced(value):
        value = jnp.asarray(value, dtype)
        return eqx.error_if(value, ~(value >= 0) | ~jnp.isfinite(value), f"{fn}: {name} must be >= 0 and finite.")
    v = np.asarray(value)
    if v.shape != ():
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {v.shape}.")
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{fn}: {name} must be >= 0 and finite, got {value!r}.")
    return jnp.asarray(value, dtype)


def prepare(fn: str, params, tokens, weights, beta, radius):
    """Validate the common arguments; return them cast to one floating dtype."""
    params = check_params(fn, params)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        hint = " (a leading batch axis? batch with jax.vmap)" if tokens.ndim == 3 else ""
        raise ValueError(f"{fn}: tokens must have shape (N, d), got {tokens.shape}{hint}.")
    if tokens.shape[0] < 1:
        raise ValueError(f"{fn}: tokens must hold at least one token, got shape {tokens.shape}.")
    if tokens.shape[1] != params.dim:
        raise ValueError(
            f"{fn}: tokens have dimension d = {tokens.shape[1]} but params have d = {params.dim} "
            f"(params leaves are (T, P, d, k) = {tuple(params.wq.shape)})."
        )
    tokens = check_array(fn, "tokens", tokens, tokens.shape, "(N, d)")
    dtype = jnp.result_type(tokens.dtype, params.wq.dtype)
    tokens = check_finite(fn, "tokens", tokens.astype(dtype))
    params = jax.tree.map(lambda x: check_finite(fn, "params", x.astype(dtype)), params)
    weights = check_weights(fn, weights, tokens.shape[0], dtype)
    beta = check_scalar(fn, "beta", beta, dtype)
    radius = check_scalar(fn, "radius", radius, dtype, allow_none=True)
    return params, tokens, weights, beta, radius
