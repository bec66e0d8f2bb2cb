"""Optax optimizers of the paper (Algorithm 1, eq. 26-28) and the flow map that iterates them.

For the gradients ``g_1, g_2, ...`` of one parameter block, learning rates ``eta_k`` and weight decay
``lambda``, every optimizer here runs::

    m_k     = b1 m_{k-1} + (1 - b1) g_k
    v_k     = b2 v_{k-1} + (1 - b2) phi(g_k * g_k)
    theta_k = (1 - eta_k lambda) theta_{k-1} - eta_k (m_k / (1 - b1^k)) / (sqrt(v_k / (1 - b2^k)) + eps)

* :func:`adamw`: ``phi`` is the identity (entrywise Adam); it agrees with ``optax.adamw``.
* :func:`blockwise_adamw`: ``phi`` replaces ``g * g``, within each matrix block, by the block's squared
  Frobenius norm (``normalize="sum"``) or its mean square (``normalize="mean"``) on every entry. A block
  is the trailing two axes of a leaf: for a :class:`mfattn.Params` with leaves ``(T, P, d, k)`` it is one
  ``d x k`` matrix ``W_Q, W_K, W_V`` or ``W_O`` of one head (layer ``l``, head ``h``) or of one parameter
  particle (grid time ``t_j``, particle ``m``).

Both are built the way Optax builds its own optimizers: a scaling transform followed by
``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``, so the step is
``theta_k = theta_{k-1} - eta_k (direction_k + lambda theta_{k-1})``, exactly ``optax.adamw``'s, and
``learning_rate`` may be a float or an Optax schedule (the ``k``-th update uses ``schedule(k - 1)``).

Bounded updates (paper Lemma 43, :func:`adam_direction_bound`): if ``b1 < sqrt(b2)`` the direction
``m_hat / (sqrt(v_hat) + eps)`` is bounded by a constant ``C(b1, b2)`` entrywise (AdamW) and in Frobenius
norm per block (blockwise, ``normalize="sum"``). With ``0 <= eta_k lambda <= 1`` the parameters then stay
in the compact set ``|theta| <= max(|theta_0|, C / lambda)`` for every step (paper Lemma 26).

:func:`flow` iterates an optimizer for a given number of steps with ``lax.scan`` (the discrete-time
gradient flow of the parameters); :func:`apply_step` is one step of it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Int, PyTree

__all__ = [
    "FlowResult",
    "ScaleByBlockwiseAdamState",
    "adam_direction_bound",
    "adamw",
    "apply_step",
    "blockwise_adamw",
    "flow",
    "scale_by_blockwise_adam",
]


# ---------------------------------------------------------------------------------------------------------
# Validation of hyperparameters
# ---------------------------------------------------------------------------------------------------------


def _concrete(value: Any) -> float | None:
    """``float(value)`` for a concrete scalar; ``None`` for a tracer, a schedule or a non-scalar array.

    Hyperparameters may arrive traced (``optax.inject_hyperparams`` calls the factory inside ``update``,
    possibly under ``jit``); those cannot be checked and are passed through.
    """
    if callable(value):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_type(fn: str, name: str, value: Any, schedule: bool = False) -> None:
    """``TypeError`` unless ``value`` is a real number (a Python or NumPy scalar, a 0-d array, a tracer) or,
    with ``schedule``, a callable: a string ``"0.1"`` is refused here, not at the first ``update``."""
    if schedule and callable(value):
        return
    ok = not isinstance(value, (bool, np.bool_, str, bytes)) and (
        isinstance(value, (numbers.Real, np.number))
        or (
            hasattr(value, "dtype")
            and hasattr(value, "shape")
            and jnp.issubdtype(value.dtype, jnp.number)
            and not jnp.issubdtype(value.dtype, jnp.complexfloating)
            and jnp.ndim(value) == 0
        )
    )
    if not ok:
        what = "a real number or an Optax schedule" if schedule else "a real number"
        raise TypeError(f"{fn}: {name} must be {what}, got {type(value).__name__} {value!r}.")


def _validate(
    fn: str,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    learning_rate: Any = 1.0,
    weight_decay: Any = 0.0,
    normalize: str = "sum",
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument; warn if ``b1 >= sqrt(b2)`` or a
    schedule's first learning rate times ``weight_decay`` exceeds 1."""
    _check_type(fn, "learning_rate", learning_rate, schedule=True)
    for name, value in (("b1", b1), ("b2", b2), ("eps", eps), ("weight_decay", weight_decay)):
        _check_type(fn, name, value)
    lr = _concrete(learning_rate)
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{fn}: learning_rate must be > 0 and finite (or an Optax schedule), got {learning_rate!r}.")
    b1_, b2_ = _concrete(b1), _concrete(b2)
    for name, value, concrete in (("b1", b1, b1_), ("b2", b2, b2_)):
        if concrete is not None and not 0 <= concrete < 1:
            raise ValueError(f"{fn}: {name} must lie in [0, 1), got {value!r}.")
    eps_ = _concrete(eps)
    if eps_ is not None and not (eps_ >= 0 and math.isfinite(eps_)):
        raise ValueError(f"{fn}: eps must be >= 0 and finite, got {eps!r}.")
    wd = _concrete(weight_decay)
    if wd is not None and not (wd >= 0 and math.isfinite(wd)):
        raise ValueError(f"{fn}: weight_decay must be >= 0 and finite, got {weight_decay!r}.")
    if not isinstance(normalize, str) or normalize not in ("sum", "mean"):
        raise ValueError(f"{fn}: normalize must be 'sum' or 'mean', got {normalize!r}.")
    if wd is not None and wd > 0:
        if lr is not None and lr * wd > 1:
            raise ValueError(
                f"{fn}: learning_rate * weight_decay = {lr * wd:.4g} > 1: the decay factor 1 - eta lambda is "
                "negative and the parameters grow without bound; the compact-set bound (paper Lemma 26) needs "
                "0 <= learning_rate * weight_decay <= 1."
            )
        if callable(learning_rate):
            try:
                lr0 = float(learning_rate(0))
            except Exception:  # noqa: BLE001 - a schedule that cannot be evaluated here is not checked
                lr0 = None
            if lr0 is not None and lr0 * wd > 1:
                warnings.warn(
                    f"{fn}: the schedule's learning rate at step 0 times weight_decay is {lr0 * wd:.4g} > 1: "
                    "while eta_k lambda > 1 the parameters grow (paper Lemma 26 needs eta_k lambda <= 1).",
                    UserWarning,
                    stacklevel=3,
                )
    if b1_ is not None and b2_ is not None and b1_ > 0 and b1_ >= math.sqrt(b2_):
        warnings.warn(
            f"{fn}: b1={b1_!r} >= sqrt(b2)={math.sqrt(b2_)!r}; the Adam direction is then not bounded "
            "by a constant, so the bounded-update property (paper Lemma 43) and the compact-set bound "
            "(Lemma 26) do not apply.",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------
# The bound of paper Lemma 43
# ---------------------------------------------------------------------------------------------------------


def adam_direction_bound(b1: float | int, b2: float | int) -> float:
    r"""The constant ``C(b1, b2)`` bounding the Adam direction ``|m_hat| / (sqrt(v_hat) + eps)``.

    ``C(b1, b2) = (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2))`` for ``0 < b1 < sqrt(b2)``;
    ``C(0, b2) = 1 / sqrt(1 - b2)``; ``inf`` if ``b1 >= sqrt(b2) > 0`` (no bound exists).

    Derivation (paper Lemma 43, made explicit). With zero initial moments and bias corrections, after
    ``k >= 1`` steps::

        m_hat_k = (1 - b1) / (1 - b1^k) * sum_{j<=k} b1^{k-j} g_j
        v_hat_k = (1 - b2) / (1 - b2^k) * sum_{j<=k} b2^{k-j} g_j^2.

    Write ``b1^{k-j} g_j = (b1 / sqrt(b2))^{k-j} * (sqrt(b2)^{k-j} g_j)`` and apply Cauchy-Schwarz, with
    ``r = b1^2 / b2 < 1``::

        |sum_j b1^{k-j} g_j| <= sqrt(sum_j r^{k-j}) sqrt(sum_j b2^{k-j} g_j^2)
                              = sqrt((1 - r^k) / (1 - r)) sqrt(sum_j b2^{k-j} g_j^2),

    so, since ``sqrt(v_hat) + eps >= sqrt(v_hat)`` (and ``m_hat = 0`` whenever ``v_hat = 0``)::

        |m_hat_k| / (sqrt(v_hat_k) + eps) <= R_k
            := (1 - b1) / (1 - b1^k) * sqrt((1 - b2^k) (1 - r^k) / ((1 - b2) (1 - r))).

    ``R_k <= R_inf = C`` for every ``k``: with ``x = b2^k`` and ``y = r^k`` one has ``b1^k = sqrt(x y)``,
    and ``(1 - x)(1 - y) <= (1 - sqrt(x y))^2`` is ``x + y >= 2 sqrt(x y)`` (AM-GM). The bound is sharp:
    Cauchy-Schwarz is an equality for ``g_j = (b1 / b2)^{k-j}``, for which the ratio (with ``eps = 0``)
    is exactly ``R_k``, and ``R_k -> C`` as ``k -> inf``. ``C(0.9, 0.999) = 7.2702918...``.

    The same ``C`` bounds, for blockwise Adam with ``normalize="sum"``, the Frobenius norm of each block
    of the direction: the block ``M_hat_k`` is the same weighted sum of gradient blocks ``G_j``, so by
    the triangle inequality ``||M_hat_k||_F <= (1 - b1) / (1 - b1^k) sum_j b1^{k-j} ||G_j||_F``, and the
    scalar argument above applies with ``g_j^2`` replaced by ``||G_j||_F^2``, which is what that ``v``
    accumulates. Hence also ``|entry| <= C``. With ``normalize="mean"`` the denominator is divided by
    ``sqrt(n)``, ``n = d * k`` the block size, so the bound is ``sqrt(n) * C`` on the block's Frobenius
    norm (equivalently ``C`` on its root-mean-square entry), and ``sqrt(n) * C`` entrywise.

    Args:
        b1: first-moment decay, in ``[0, 1)``.
        b2: second-moment decay, in ``[0, 1)``.

    Returns:
        ``C(b1, b2)`` as a Python float (``math.inf`` when ``b1 >= sqrt(b2) > 0``).

    Raises:
        ValueError: if ``b1`` or ``b2`` is outside ``[0, 1)``.

    Example::

        C = adam_direction_bound(0.9, 0.999)   # 7.2702918...
        # with weight decay lam and eta * lam <= 1: |theta_k| <= max(|theta_0|, C / lam)
    """
    b1, b2 = float(b1), float(b2)
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0 <= value < 1:
            raise ValueError(f"adam_direction_bound: {name} must lie in [0, 1), got {value!r}.")
    if b1 == 0:
        return 1.0 / math.sqrt(1.0 - b2)
    if b1 >= math.sqrt(b2):
        return math.inf
    # (1 - b1) / sqrt((1 - b2)(1 - b1^2/b2)), written to avoid cancellation in 1 - b1^2/b2.
    return (1.0 - b1) * math.sqrt(b2) / math.sqrt((1.0 - b2) * (b2 - b1 * b1))


# ---------------------------------------------------------------------------------------------------------
# Blockwise Adam
# ---------------------------------------------------------------------------------------------------------


class ScaleByBlockwiseAdamState(NamedTuple):
    """State of :func:`scale_by_blockwise_adam`.

    Attributes:
        count: number of updates made, int32 scalar (saturating, as in Optax).
        mu: first moment, a pytree like the parameters (dtype ``mu_dtype`` or the parameters').
        nu: second moment, one value per block: a leaf shaped ``(..., d, k)`` has ``nu`` shaped
            ``(..., 1, 1)``; a leaf with fewer than two axes is one block, so ``nu`` has its shape with
            every axis set to 1. Storing one value per block (not per entry) saves a factor ``d * k``.
    """

    count: ArrayLike
    mu: optax.Updates
    nu: optax.Updates


def _block_axes(ndim: int) -> tuple[int, ...]:
    """Axes reduced to form one block: the trailing two, or all of them for a leaf of ndim < 2."""
    return tuple(range(max(ndim - 2, 0), ndim))


def _block_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = _block_axes(len(shape))
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _block_mean_square(g: Array, normalize: str) -> Array:
    """``phi(g * g)`` stored once per block: squared Frobenius norm (``"sum"``) or mean square."""
    axes = _block_axes(g.ndim)
    sq = jnp.sum(g * g, axis=axes, keepdims=True)
    if normalize == "mean":
        sq = sq / math.prod(g.shape[i] for i in axes)
    return sq


def scale_by_blockwise_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    *,
    normalize: str = "sum",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by blockwise Adam: one second moment per matrix block.

    ``m`` is Adam's first moment, entrywise; ``v`` is the exponential average of the block's squared
    Frobenius norm ``||G||_F^2`` (``normalize="sum"``) or of its mean square ``||G||_F^2 / (d k)``
    (``normalize="mean"``), shared by every entry of the block. The output is the bias-corrected
    direction ``m_hat / (sqrt(v_hat) + eps)``, block by block.

    Blocks are the trailing two axes of every leaf (a ``Params`` leaf ``(T, P, d, k)`` has ``T * P``
    blocks ``d x k``); a leaf with fewer than two axes (a scalar or a vector) is a single block. With
    blocks ``1 x 1`` this is exactly ``optax.scale_by_adam``.

    Args:
        b1: decay rate of the first moment, in ``[0, 1)``.
        b2: decay rate of the block second moment, in ``[0, 1)``.
        eps: added to ``sqrt(v_hat)`` in the denominator, ``>= 0``.
        normalize: ``"sum"`` (squared Frobenius norm; the direction's Frobenius norm per block is then
            at most :func:`adam_direction_bound`, independently of the block size) or ``"mean"``.
        mu_dtype: optional dtype of the first moment; default: the parameters' dtype.

    Returns:
        An ``optax.GradientTransformation`` with state :class:`ScaleByBlockwiseAdamState`.

    Raises:
        ValueError: for ``b1``, ``b2`` outside ``[0, 1)``, negative ``eps`` or unknown ``normalize``.

    Example::

        tx = optax.chain(scale_by_blockwise_adam(), optax.scale(-1e-3))
        state = tx.init(params)            # params: Params with leaves (T, P, d, k)
        updates, state = tx.update(grads, state, params)
    """
    _validate("scale_by_blockwise_adam", b1=b1, b2=b2, eps=eps, normalize=normalize)
    return _scale_by_blockwise_adam(b1, b2, eps, normalize, mu_dtype)


def _scale_by_blockwise_adam(b1, b2, eps, normalize, mu_dtype) -> optax.GradientTransformation:
    """:func:`scale_by_blockwise_adam` without validation (the public factories validate once)."""
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        nu = jax.tree.map(lambda p: jnp.zeros(_block_shape(jnp.shape(p)), jnp.result_type(p)), params)
        return ScaleByBlockwiseAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = jax.tree.map(
            lambda g, t: (1 - b2) * _block_mean_square(g, normalize) + b2 * t,
            updates,
            state.nu,
        )
        count_inc = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, count_inc)

        # nu_hat (..., 1, 1) broadcasts against mu_hat (..., d, k): same rank, no rank promotion.
        def direction(m, v, g):
            return (m / (jnp.sqrt(v) + eps)).astype(g.dtype)

        new_updates = jax.tree.map(direction, mu_hat, nu_hat, updates)
        mu = optax.tree.cast_like(mu, state.mu)
        nu = optax.tree.cast_like(nu, state.nu)
        return new_updates, ScaleByBlockwiseAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------
# Public optimizers
# ---------------------------------------------------------------------------------------------------------


def adamw(
    learning_rate: ArrayLike | optax.Schedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 1e-4,
    *,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW (paper Algorithm 1 with ``phi`` the identity); the same updates as ``optax.adamw``.

    ``theta_k = (1 - eta_k lambda) theta_{k-1} - eta_k m_hat_k / (sqrt(v_hat_k) + eps)``, entrywise.

    Args:
        learning_rate: ``eta``: a positive float or an Optax schedule ``step -> eta`` (the ``k``-th
            update uses ``schedule(k - 1)``).
        b1: first-moment decay, in ``[0, 1)``.
        b2: second-moment decay, in ``[0, 1)``. If ``b1 >= sqrt(b2)`` a ``UserWarning`` says that the
            bounded-update property (Lemma 43) does not apply.
        eps: added to ``sqrt(v_hat)``, ``>= 0``.
        weight_decay: ``lambda >= 0`` (decoupled, multiplied by the learning rate).
        mask: as in ``optax.add_decayed_weights``: a pytree of bools, or a callable returning one, that
            selects the leaves to decay; ``None`` decays every leaf.

    Returns:
        An ``optax.GradientTransformation`` (``optax.chain`` of ``optax.scale_by_adam``,
        ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``).

    Raises:
        TypeError: for a hyperparameter that is not a number (``learning_rate``: or a schedule).
        ValueError: for a non-positive constant ``learning_rate``, ``b1`` or ``b2`` outside ``[0, 1)``,
            negative ``eps``, negative ``weight_decay``, or ``learning_rate * weight_decay > 1`` (paper
            Lemma 26; for a schedule, a ``UserWarning`` if its value at step 0 is such).

    Example::

        opt = adamw(1e-3, weight_decay=1e-2)
        opt_state = opt.init(params)
        params, opt_state = apply_step(opt, params, grads, opt_state)
    """
    _validate("adamw", b1=b1, b2=b2, eps=eps, learning_rate=learning_rate, weight_decay=weight_decay)
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def blockwise_adamw(
    learning_rate: ArrayLike | optax.Schedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 1e-4,
    *,
    normalize: str = "sum",
    mask: Any = None,
) -> optax.GradientTransformation:
    """Blockwise AdamW (paper Algorithm 1, eq. 26-28): one second moment per ``d x k`` matrix block.

    ``theta_k = (1 - eta_k lambda) theta_{k-1} - eta_k M_hat_k / (sqrt(v_hat_k) + eps)`` per block,
    where ``v`` averages the block's squared Frobenius norm (see :func:`scale_by_blockwise_adam`). With
    ``normalize="sum"`` and ``b1 < sqrt(b2)`` each block moves by at most ``eta_k C`` in Frobenius norm
    besides the decay, ``C = adam_direction_bound(b1, b2)``, whatever ``d`` and ``k``.

    Args:
        learning_rate: ``eta``: a positive float or an Optax schedule ``step -> eta`` (the ``k``-th
            update uses ``schedule(k - 1)``).
        b1: first-moment decay, in ``[0, 1)``.
        b2: second-moment decay, in ``[0, 1)``. If ``b1 >= sqrt(b2)`` a ``UserWarning`` says that the
            bounded-update property (Lemma 43) does not apply.
        eps: added to ``sqrt(v_hat)``, ``>= 0``.
        weight_decay: ``lambda >= 0`` (decoupled, multiplied by the learning rate).
        normalize: ``"sum"`` (default, squared Frobenius norm) or ``"mean"`` (divided by ``d * k``).
        mask: as in ``optax.add_decayed_weights``; ``None`` decays every leaf.

    Returns:
        An ``optax.GradientTransformation`` (``optax.chain`` of :func:`scale_by_blockwise_adam`,
        ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``).

    Raises:
        TypeError: for a hyperparameter that is not a number (``learning_rate``: or a schedule).
        ValueError: for a non-positive constant ``learning_rate``, ``b1`` or ``b2`` outside ``[0, 1)``,
            negative ``eps``, negative ``weight_decay``, unknown ``normalize``, or
            ``learning_rate * weight_decay > 1`` (paper Lemma 26; for a schedule, a ``UserWarning`` if its
            value at step 0 is such).

    Example::

        opt = blockwise_adamw(optax.cosine_decay_schedule(1e-2, 1000), weight_decay=1e-2)
        opt_state = opt.init(params)       # params: Params, leaves (T, P, d, k)
        params, opt_state = apply_step(opt, params, grads, opt_state)
    """
    _validate(
        "blockwise_adamw",
        b1=b1,
        b2=b2,
        eps=eps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        normalize=normalize,
    )
    return optax.chain(
        _scale_by_blockwise_adam(b1, b2, eps, normalize, None),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# ---------------------------------------------------------------------------------------------------------
# Iterating an optimizer
# ---------------------------------------------------------------------------------------------------------


def apply_step(
    optimizer: optax.GradientTransformation,
    params: PyTree,
    grads: PyTree,
    opt_state: PyTree,
) -> tuple[PyTree, PyTree]:
    """One optimizer step: ``updates, opt_state = optimizer.update(grads, opt_state, params)``, applied.

    Args:
        optimizer: any ``optax.GradientTransformation``.
        params: parameter pytree (e.g. a :class:`mfattn.Params`).
        grads: gradients, a pytree like ``params``.
        opt_state: the optimizer's state for ``params``.

    Returns:
        ``(params, opt_state)`` after the step; parameter dtypes are preserved (``optax.apply_updates``).

    Example::

        opt_state = opt.init(params)
        for step in range(n):
            params, opt_state = apply_step(opt, params, grad(params), opt_state)
    """
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class FlowResult(NamedTuple):
    """Output of :func:`flow`.

    Attributes:
        params: parameters after the last step.
        opt_state: optimizer state after the last step (pass it back to continue the flow).
        trajectory: if ``save_trajectory``, the parameters after each step, stacked on a new leading
            axis (leaves ``(num_steps, *leaf.shape)``; the initial parameters are not included);
            otherwise ``None``.
        aux: if ``has_aux``, ``grad_fn``'s auxiliary outputs stacked on a leading ``num_steps`` axis
            (evaluated at the parameters *before* each step); otherwise ``None``.
    """

    params: PyTree
    opt_state: PyTree
    trajectory: PyTree | None
    aux: PyTree | None


def flow(
    optimizer: optax.GradientTransformation,
    params: PyTree,
    grad_fn: Callable[..., Any],
    num_steps: int,
    *,
    opt_state: PyTree | None = None,
    first_step: int | Int[Array, ""] = 0,
    has_aux: bool = False,
    save_trajectory: bool = False,
    unroll: int | bool = 1,
) -> FlowResult:
    """Apply ``num_steps`` optimizer steps with ``lax.scan``: the discrete flow of the parameters.

    Step ``i = 0, ..., num_steps - 1`` computes ``grads = grad_fn(params, first_step + i)`` and
    ``params, opt_state = apply_step(optimizer, params, grads, opt_state)``. The result equals that
    Python loop; the loop body is traced once. ``flow`` is a pure function: wrap it in ``jax.jit``
    (``optimizer``, ``grad_fn``, ``num_steps``, ``has_aux``, ``save_trajectory`` and ``unroll``
    static, e.g. closed over) to compile the whole run once.

    Args:
        optimizer: any ``optax.GradientTransformation`` (e.g. :func:`blockwise_adamw`).
        params: initial parameter pytree, e.g. a :class:`mfattn.Params` ensemble ``(K+1, M, d, k)``.
        grad_fn: ``grad_fn(params, step) -> grads`` (or ``(grads, aux)`` if ``has_aux``), with ``step``
            an integer scalar array; ``grads`` is a pytree like ``params``. Use ``step`` to draw fresh
            data, e.g. ``jax.random.fold_in(key, step)``.
        num_steps: number of steps, a non-negative Python int.
        opt_state: the optimizer state to start from; default ``optimizer.init(params)``.
        first_step: index passed to ``grad_fn`` at the first step (to continue an earlier flow).
        has_aux: whether ``grad_fn`` returns ``(grads, aux)``; ``aux`` (e.g. the loss) is stacked.
        save_trajectory: whether to return the parameters after every step.
        unroll: passed to ``lax.scan``.

    Returns:
        A :class:`FlowResult` ``(params, opt_state, trajectory, aux)``.

    Raises:
        ValueError: if ``num_steps`` is not a non-negative integer.

    Example::

        opt = blockwise_adamw(1e-2, weight_decay=1e-3)
        grad_fn = lambda p, step: jax.grad(loss)(p, jax.random.fold_in(key, step))
        run = jax.jit(lambda p: flow(opt, p, grad_fn, 1000))
        params, opt_state, _, _ = run(params)
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"flow: num_steps must be a non-negative Python int, got {num_steps!r}.")
    if opt_state is None:
        opt_state = optimizer.init(params)

    def body(carry, step):
        params, opt_state = carry
        out = grad_fn(params, step)
        grads, aux = out if has_aux else (out, None)
        params, opt_state = apply_step(optimizer, params, grads, opt_state)
        return (params, opt_state), (params if save_trajectory else None, aux)

    steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
    (params, opt_state), (trajectory, aux) = jax.lax.scan(
        body, (params, opt_state), steps, length=num_steps, unroll=unroll
    )
    return FlowResult(params=params, opt_state=opt_state, trajectory=trajectory, aux=aux)
