"""Input validation for the public entry points: one layer, used by every one of them.

Every error names the function and the argument (``"limit.forward: rtol must be > 0, got -1"``):

* types (a string where a number belongs, an int where a bool belongs, ``True`` where a count belongs) are
  ``TypeError``, raised in Python before anything is traced;
* shapes are ``ValueError``, raised in Python before anything is traced or compiled (shapes are static, also
  under ``jit`` and ``vmap``);
* values (negative or non-normalised weights, ``beta < 0``, NaN or inf in tokens, parameters or targets) are
  ``ValueError`` when the inputs are concrete arrays; when they are traced (the caller wrapped mfattn in
  ``jax.jit``/``jax.vmap``) the same checks are attached with :func:`equinox.error_if` and raise at run
  time, before the result is returned.

Seeing the message under ``jax.jit``: JAX reports a failed run-time check as a ``JaxRuntimeError`` whose
first line is ``INTERNAL: CpuCallback error calling callback: Traceback ...``; the mfattn message is the line
that starts after ``EquinoxRuntimeError: `` (``str(e).split("EquinoxRuntimeError: ")[-1].splitlines()[0]``).
Under ``equinox.filter_jit`` it is an ``equinox.EquinoxRuntimeError`` that shows the message after a short
stack. The one-line way to get it as the first line: rerun with ``JAX_DISABLE_JIT=1`` in the environment --
the inputs are then concrete and the same check raises a plain ``ValueError`` with the mfattn message. (Or
``EQX_ON_ERROR=breakpoint``: a debugger opens at the failed check, the message printed first;
``EQX_ON_ERROR=nan``: failed checks return NaN instead of raising.)
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class Heads(NamedTuple):
    """One layer's heads ``(P, d, k)`` each, when the caller's ``theta`` is not a pytree of the four."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_traced(x) -> bool:
    """Whether ``x`` is a JAX tracer (its values cannot be read in Python)."""
    return _traced(x)


def _tol(dtype) -> float:
    return float(np.sqrt(np.finfo(dtype).eps)) * 4


# ------------------------------------------------------------------------------------------ Python scalars


def check_bool(fn: str, name: str, value) -> bool:
    """``value`` if it is a real ``bool`` (``numpy.bool_`` too), else ``TypeError`` (``"no"`` and ``1`` are not
    bools: ``Attention(causal="no")`` must not turn masking on)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{fn}: {name} must be a bool (True or False), got {type(value).__name__} {value!r}.")


def check_int(fn: str, name: str, value, *, minimum: int | None = None, allow_none: bool = False):
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``; ``TypeError`` for other types,
    ``ValueError`` below the minimum."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{fn}: {name} must be an integer, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_real(
    fn: str,
    name: str,
    value,
    *,
    minimum: float | int | None = None,
    positive: bool = False,
    maximum: float | int | None = None,
    allow_none: bool = False,
    finite: bool = True,
) -> float | None:
    """``value`` as a Python ``float`` if it is a real number (a Python or NumPy scalar, or a concrete 0-d
    array; not a bool or a string), finite, ``>= minimum`` (``> 0`` with ``positive``) and ``<= maximum``.
    ``TypeError`` for the wrong type, ``ValueError`` for a bad value."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{fn}: {name} is required (a real number), got None.")
    if isinstance(value, (bool, np.bool_, str, bytes)) or _traced(value):
        what = "a traced value" if _traced(value) else f"{type(value).__name__} {value!r}"
        raise TypeError(f"{fn}: {name} must be a real number, got {what}.")
    if not isinstance(value, numbers.Real):
        arr = np.asarray(value) if hasattr(value, "shape") and hasattr(value, "dtype") else None
        if arr is None or arr.shape != () or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}.")
        value = arr.item()
    v = float(value)
    if np.isnan(v) or (finite and not np.isfinite(v)):
        raise ValueError(f"{fn}: {name} must be finite, got {value!r}.")
    if positive and not v > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}.")
    if minimum is not None and not v >= minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value!r}.")
    if maximum is not None and not v <= maximum:
        raise ValueError(f"{fn}: {name} must be <= {maximum}, got {value!r}.")
    return v


def check_choice(fn: str, name: str, value, choices: tuple):
    """``value`` if it is one of ``choices`` (strings), else ``TypeError`` (not a string) or ``ValueError``."""
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {name} must be one of {choices}, got {type(value).__name__} {value!r}.")
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}.")
    return value


# ------------------------------------------------------------------------------------------------- arrays


def as_array(fn: str, name: str, x):
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__} {x!r}.")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: {name} must be an array of numbers, got {type(x).__name__} ({e}).") from None


def _check_float(fn: str, name: str, x):
    if jnp.issubdtype(x.dtype, jnp.complexfloating) or not jnp.issubdtype(x.dtype, jnp.floating):
        kind = "integer" if jnp.issubdtype(x.dtype, jnp.integer) else str(x.dtype)
        raise TypeError(
            f"{fn}: {name} must be a floating-point array, got dtype {x.dtype} ({kind}; cast it, e.g. "
            f"{name}.astype(float))."
        )


def check_params(fn: str, params):
    from .params import Params  # params.py uses these checks too

    if not isinstance(params, Params):
        raise TypeError(f"{fn}: params must be an mfattn.Params, got {type(params).__name__}.")
    shapes = {tuple(x.shape) for x in (params.wq, params.wk, params.wv, params.wo)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"{fn}: params leaves must all be (T, P, d, k); got shapes {sorted(shapes)}.")
    shape = next(iter(shapes))
    if min(shape) < 1:
        raise ValueError(f"{fn}: params must have T, P, d, k >= 1 (depth, heads, dim, head_dim), got {shape}.")
    for name in ("wq", "wk", "wv", "wo"):
        _check_float(fn, f"params.{name}", getattr(params, name))
    return params


def check_head_params(fn: str, theta):
    """One layer's heads: a pytree with fields ``wq, wk, wv, wo`` of equal shape ``(P, d, k)``, floating."""
    leaves = []
    for name in ("wq", "wk", "wv", "wo"):
        if not hasattr(theta, name):
            raise TypeError(
                f"{fn}: theta must have fields wq, wk, wv, wo (one layer of an mfattn.Params, e.g. "
                f"jax.tree.map(lambda a: a[l], params)), got {type(theta).__name__}."
            )
        leaves.append(as_array(fn, f"theta.{name}", getattr(theta, name)))
    shapes = {tuple(x.shape) for x in leaves}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        hint = " (a whole Params? pass one layer, params[l])" if any(x.ndim == 4 for x in leaves) else ""
        raise ValueError(f"{fn}: theta leaves must all be (P, d, k); got shapes {sorted(shapes)}{hint}.")
    if min(next(iter(shapes))) < 1:
        raise ValueError(f"{fn}: theta must have P, d, k >= 1, got {next(iter(shapes))}.")
    for name, x in zip(("wq", "wk", "wv", "wo"), leaves):
        _check_float(fn, f"theta.{name}", x)
    return leaves


def check_finite(fn: str, name: str, x, hint: str = ""):
    """``x`` unchanged, or an error if it holds NaN or inf (``eqx.error_if`` when traced)."""
    bad = ~jnp.all(jnp.isfinite(x))
    msg = f"{fn}: {name} contains NaN or inf{hint}."
    if _traced(bad):  # inside jit/vmap (even a closed-over constant is traced there)
        return eqx.error_if(x, bad, msg)
    if bool(bad):
        raise ValueError(msg)
    return x


_PARAMS_HINT = " (parameters of a diverged training run? lower the learning rate or beta)"


def check_array(fn: str, name: str, x, shape: tuple, dims: str):
    x = as_array(fn, name, x)
    if x.shape != tuple(shape):
        hint = ""
        if x.ndim == len(shape) + 1 and x.shape[1:] == tuple(shape):
            hint = " (a leading batch axis? batch with jax.vmap)"
        raise ValueError(f"{fn}: {name} must have shape {dims} = {tuple(shape)}, got {x.shape}{hint}.")
    _check_float(fn, name, x)
    return x


def check_points(fn: str, name: str, x, dim: int | None = None, *, finite: bool = True):
    """An ``(N, d)`` floating array with ``N >= 1`` (and ``d = dim`` if given), checked finite."""
    x = as_array(fn, name, x)
    if x.ndim != 2:
        hint = " (a leading batch axis? batch with jax.vmap)" if x.ndim == 3 else ""
        raise ValueError(f"{fn}: {name} must have shape (N, d), got {x.shape}{hint}.")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{fn}: {name} must hold at least one point of dimension >= 1, got shape {x.shape}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{fn}: {name} must have dimension d = {dim}, got shape {x.shape}.")
    _check_float(fn, name, x)
    return check_finite(fn, name, x) if finite else x


def check_weights(fn: str, weights, n: int, dtype, *, name: str = "weights", normalized: bool = True):
    """Uniform ``1/N`` if ``weights`` is None, else checked: shape ``(N,)``, finite, ``>= 0`` and summing to 1
    (``normalized``) or with a positive total (``normalized=False``)."""
    if weights is None:
        return jnp.full((n,), 1.0 / n, dtype)
    weights = as_array(fn, name, weights)
    if weights.shape != (n,):
        raise ValueError(f"{fn}: {name} must have shape (N,) = ({n},) to match the tokens, got {weights.shape}.")
    if jnp.issubdtype(weights.dtype, jnp.complexfloating) or weights.dtype == jnp.bool_:
        raise TypeError(f"{fn}: {name} must be real numbers, got dtype {weights.dtype}.")
    weights = weights.astype(dtype)
    tol = _tol(dtype)
    sum_msg = f"{fn}: {name} must sum to 1 (tolerance {tol:.1e})." if normalized else f"{fn}: {name} sum to 0."
    if _traced(weights):
        weights = eqx.error_if(weights, ~jnp.all(jnp.isfinite(weights)), f"{fn}: {name} contains NaN or inf.")
        weights = eqx.error_if(weights, jnp.any(weights < 0), f"{fn}: {name} must be >= 0.")
        total = jnp.sum(weights)
        bad_sum = jnp.abs(total - 1) > tol if normalized else ~(total > 0)
        return eqx.error_if(weights, bad_sum, sum_msg)
    w = np.asarray(weights)
    if not np.all(np.isfinite(w)):
        i = int(np.argmin(np.isfinite(w)))
        raise ValueError(f"{fn}: {name} contains NaN or inf ({name}[{i}] = {float(w[i])}).")
    if np.any(w < 0):
        i = int(np.argmin(w))
        raise ValueError(f"{fn}: {name} must be >= 0, got {name}[{i}] = {float(w[i])}.")
    if normalized and abs(float(w.sum()) - 1) > tol:
        raise ValueError(f"{fn}: {name} must sum to 1 (tolerance {tol:.1e}), got sum {float(w.sum())!r}.")
    if not normalized and not float(w.sum()) > 0:
        raise ValueError(f"{fn}: {name} must have a positive total mass (not all 0), got sum {float(w.sum())!r}.")
    return weights


def check_scalar(fn: str, name: str, value, dtype, *, allow_none: bool = False, positive: bool = False):
    """A non-negative (``positive``: positive) finite scalar as an array of ``dtype`` (None passes through when
    allowed). A Python number, NumPy scalar or 0-d array; strings and bools are ``TypeError``."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{fn}: {name} is required (a number), got None.")
    bound = "> 0" if positive else ">= 0"
    if _traced(value):
        if value.shape != ():
            raise ValueError(f"{fn}: {name} must be a scalar, got shape {value.shape}.")
        value = jnp.asarray(value, dtype)
        bad = ~(value > 0) if positive else ~(value >= 0)
        return eqx.error_if(value, bad | ~jnp.isfinite(value), f"{fn}: {name} must be {bound} and finite.")
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}.")
    try:
        v = np.asarray(value)
    except Exception:  # noqa: BLE001 - any unconvertible object
        v = np.asarray(None)
    if v.dtype == object or v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}.")
    if v.shape != ():
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {v.shape}.")
    if not np.isfinite(v) or not (v > 0 if positive else v >= 0):
        raise ValueError(f"{fn}: {name} must be {bound} and finite, got {value!r}.")
    return jnp.asarray(value, dtype)


def prepare(fn: str, params, tokens, weights, beta, radius):
    """Validate the common arguments; return them cast to one floating dtype."""
    params = check_params(fn, params)
    tokens = as_array(fn, "tokens", tokens)
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
    params = jax.tree.map(lambda x: check_finite(fn, "params", x.astype(dtype), _PARAMS_HINT), params)
    weights = check_weights(fn, weights, tokens.shape[0], dtype)
    beta = check_scalar(fn, "beta", beta, dtype)
    radius = check_scalar(fn, "radius", radius, dtype, allow_none=True, positive=True)
    return params, tokens, weights, beta, radius


def kernel_args(fn: str, theta, queries, tokens, weights, beta, radius, adjoints=None):
    """Validate the arguments of the one-layer kernels (:func:`mfattn.velocity`, :func:`mfattn.adjoint_field`,
    :func:`mfattn.grad_map`): ``theta`` leaves ``(P, d, k)``, ``queries`` ``(Nq, d)``, ``tokens`` ``(N, d)``,
    ``adjoints`` ``(N, d)``, ``weights`` ``(N,)`` summing to 1, ``beta >= 0``, ``radius > 0`` or None.
    Returns them cast to one floating dtype (``theta`` with its own type)."""
    leaves = check_head_params(fn, theta)
    d = leaves[0].shape[1]
    tokens = check_points(fn, "tokens", tokens, d, finite=False)
    queries = check_points(fn, "queries", queries, d, finite=False) if queries is not None else None
    if adjoints is not None:
        adjoints = check_array(fn, "adjoints", adjoints, tokens.shape, "(N, d) like tokens")
    if weights is None:
        raise TypeError(f"{fn}: weights is required (an (N,) array of masses summing to 1), got None.")
    dtype = jnp.result_type(tokens.dtype, leaves[0].dtype)
    tokens = check_finite(fn, "tokens", tokens.astype(dtype))
    if queries is not None:
        queries = check_finite(fn, "queries", queries.astype(dtype))
    if adjoints is not None:
        adjoints = check_finite(fn, "adjoints", adjoints.astype(dtype))
    cast = lambda x: check_finite(fn, "theta", jnp.asarray(x).astype(dtype), _PARAMS_HINT)  # noqa: E731
    if jax.tree.structure(theta).num_leaves == 4:  # a Params, a NamedTuple of the four: keep its type
        theta = jax.tree.map(cast, theta)
    else:
        theta = Heads(*(cast(x) for x in leaves))
    weights = check_weights(fn, weights, tokens.shape[0], dtype)
    beta = check_scalar(fn, "beta", beta, dtype)
    radius = check_scalar(fn, "radius", radius, dtype, allow_none=True, positive=True)
    return theta, queries, tokens, adjoints, weights, beta, radius


def check_dynamics(fn: str, trajectory, why: str = ""):
    """``trajectory`` (``(L + 1, N, d)``) unchanged if finite; otherwise an error naming the first layer whose
    output is NaN or inf (``eqx.branched_error_if`` when traced): the dynamics overflowed."""
    finite = jnp.all(jnp.isfinite(trajectory), axis=tuple(range(1, trajectory.ndim)))  # (L + 1,)
    layers = trajectory.shape[0] - 1

    def msg(layer):
        return (
            f"{fn}: the dynamics overflowed: the tokens are NaN or inf after layer {layer} of {layers} (the "
            f"inputs were finite){why}."
        )

    if _traced(finite):
        first = jnp.argmin(finite)
        return eqx.branched_error_if(
            trajectory, ~jnp.all(finite), jnp.maximum(first, 1) - 1, [msg(i + 1) for i in range(max(layers, 1))]
        )
    finite = np.asarray(finite)
    if not finite.all():
        first = int(np.argmin(finite))
        norm = float(np.max(np.linalg.norm(np.asarray(trajectory[max(first - 1, 0)]), axis=-1)))
        raise ValueError(msg(first).rstrip(".") + f"; the largest token norm before it was {norm:.3g}.")
    return trajectory


def overflow_reason(spec, beta) -> str:
    """Why the forward dynamics of attention ``spec`` at ``beta`` may overflow (for :func:`check_dynamics`)."""
    b = "" if _traced(beta) else f" (beta = {float(beta):.3g})"
    if spec.kind in ("unnormalized", "sigmoid"):
        return (
            f". {spec.kind!r} attention is not normalised: its weights m_j e^(beta <W_Q^T x, W_K^T x_j>){b} "
            "grow exponentially with the token norms and the velocity then grows with them; lower beta, the "
            "token norm or the parameter scale, or use a normalised kind (softmax, l2) or residual='sphere'"
        )
    return f"{b}; check the parameter scale and beta"


# ------------------------------------------------------------------------------------------ ODE solves


def check_solve(fn: str, dt0, max_steps, rtol, atol) -> None:
    """Settings of a Diffrax solve, checked before Diffrax sees them: ``dt0 > 0`` or None, ``max_steps`` a
    positive integer, ``rtol, atol >= 0`` finite and not both 0."""
    if dt0 is not None and not _traced(dt0):
        check_real(fn, "dt0", dt0, positive=True)
    check_int(fn, "max_steps", max_steps, minimum=1)
    r = check_real(fn, "rtol", rtol, minimum=0) if not _traced(rtol) else None
    a = check_real(fn, "atol", atol, minimum=0) if not _traced(atol) else None
    if r == 0 and a == 0:
        raise ValueError(f"{fn}: rtol and atol cannot both be 0 (no step would ever be accepted).")


def check_times(fn: str, ts, grid, dtype):
    """Save times ``ts``: a non-empty 1-D finite, non-decreasing array within ``[grid[0], grid[-1]]``."""
    ts = as_array(fn, "ts", ts)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"{fn}: ts must be a non-empty 1-D array of save times, got shape {ts.shape}.")
    if not (jnp.issubdtype(ts.dtype, jnp.floating) or jnp.issubdtype(ts.dtype, jnp.integer)) or ts.dtype == jnp.bool_:
        raise TypeError(f"{fn}: ts must be real numbers, got dtype {ts.dtype}.")
    ts = ts.astype(dtype)
    if _traced(ts) or _traced(grid):
        return ts
    t, g = np.asarray(ts), np.asarray(grid)
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{fn}: ts contains NaN or inf, got {t!r}.")
    if np.any(np.diff(t) < 0):
        raise ValueError(f"{fn}: ts must be non-decreasing, got {t!r}.")
    span = float(g[-1] - g[0])
    slack = 1e3 * float(np.finfo(t.dtype).eps) * max(span, 1.0)
    if t[0] < g[0] - slack or t[-1] > g[-1] + slack:
        raise ValueError(f"{fn}: ts must lie in the grid's [t_0, t_K] = [{g[0]:.6g}, {g[-1]:.6g}], got {t!r}.")
    return ts


def solve_failed(fn: str, error: Exception, max_steps: int):
    """A clearer error for a Diffrax solve that ran out of steps (``None`` for any other failure)."""
    if "maximum number of" not in str(error) and "max_steps" not in str(error):
        return None
    return RuntimeError(
        f"{fn}: the ODE solve took more than max_steps = {max_steps} steps: the dynamics overflowed (the tokens "
        "grew without bound, e.g. unnormalised attention at a large beta or token norm: the discrete model's "
        "mfattn.forward names the layer) or the problem is stiff at these tolerances; lower beta or the token "
        "norm, or raise max_steps."
    )
