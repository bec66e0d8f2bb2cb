"""The discrete transformer as an interacting particle system (docs/spec.md sections 3-4).

Forward (explicit Euler on the piecewise-constant parameter field, one step per layer)::

    x_i^{l+1} = x_i^l + (1/L) F(mu^l, x_i^l, nu^l),   mu^l = sum_j m_j delta_{x_j^l},  l = 0..L-1

Backward (hand-derived, docs/spec.md section 4), with ``p^L`` the loss's Lions derivative at ``x^L``::

    p^l = p^{l+1} + (1/L) G(pi^l, x^l, p^{l+1}; nu^l),    d ell / d theta_{l,h} = g(theta_{l,h}, pi^l) / (L H)

(with ``attention=``: residual step ``h = L^-alpha`` in place of ``1/L``, the true gradient ``(h / H) g``, and
for the normalised residual the output adjoint pulled back through the normalisation first).

Depth is a ``lax.scan`` (compile time does not grow with ``L``); heads are a ``vmap`` (on CPU from 128 tokens a
``lax.map``, see :func:`mfattn.attention.over_heads`). The backward
scan recomputes each layer's attention from the stored trajectory, so its memory is ``O(L N d)`` plus
one layer's ``H x N x N`` weights, never ``(L, H, N, N)``.

All public functions validate their arguments (``ValueError`` naming the argument) and work under
``jax.jit`` and ``jax.vmap`` over a leading batch axis of ``tokens``/``weights``.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from . import _checks
from .adjoint import adjoint_field, adjoint_field_and_grad_map, cached_forward_layer, grad_map
from .attention import SOFTMAX, Attention, as_attention, velocity
from .losses import Loss
from .params import Params

__all__ = ["forward", "adjoint", "param_grad", "loss_and_grad", "value_and_grad_map", "grad_scale"]


def _normalize(y):
    norm = jnp.linalg.norm(y, axis=-1, keepdims=True)
    return y / jnp.where(norm > 0, norm, 1)


def _pullback(spec: Attention, theta, x, p, weights, beta, radius, step, f=None):
    """The adjoint of a layer's *velocity* given the adjoint ``p`` of its output: ``p`` itself for the plain
    residual; for the normalised residual ``x' = y / |y|``, ``y = x + h F``, it is
    ``DN(y)^T p = (p - x' <x', p>) / |y|`` (``F`` recomputed from the stored input unless given as ``f``)."""
    if spec.residual == "euler":
        return p
    if f is None:
        f = velocity(theta, x, x, weights, beta=beta, radius=radius, attention=spec, check=False)
    y = x + step * f
    norm = jnp.linalg.norm(y, axis=-1, keepdims=True)
    norm = jnp.where(norm > 0, norm, 1)
    unit = y / norm
    return (p - unit * jnp.sum(unit * p, axis=-1, keepdims=True)) / norm


def grad_scale(params: Params, attention: Attention | str | None = None) -> float:
    """``h / H`` with ``h = L^-alpha`` the residual step: ``d ell / d theta_{l,h} = (h / H) g(theta_{l,h}, pi^l)``
    (``1 / (L H)`` for the paper's scaling)."""
    params = _checks.check_params("grad_scale", params)
    return as_attention(attention, "grad_scale").step(params.depth) / params.heads


def _scan_layers(body, carry, params, xs=None, *, reverse=False):
    """``lax.scan`` of ``body(carry, theta_l, xs_l) -> (carry, y_l)`` over the layers (in reverse with
    ``reverse``), with each layer's heads ``theta_l`` a loop-carried buffer: the scan's input at step ``l`` is the
    *next* step's heads, handed on in the carry. Read as a dynamic slice of the stacked heads, XLA fuses the slice
    into the kernels' loops, and the lanes kernels (the Euler limits' thousands of heads per layer,
    :mod:`mfattn.lanes`) ran 3-5x slower (measured: 32 layers of 2048 heads, N = 4, d = k = 2, forward 39-65 ms
    against 12 ms carried, 11-12 ms unrolled; ``benchmarks/layer_scan.py``: 1.7-3.2x at the Euler limits' sizes,
    0.97-1.23x at a discrete model's; compile 0.4-0.8 s longer, still flat in depth). Costs one copy of the heads
    (``jnp.roll``), whose transpose under autodiff is a roll again."""
    shift = 1 if reverse else -1  # nxt[l]: the heads of the step after l
    first = jax.tree.map(lambda a: a[-1 if reverse else 0], params)
    nxt = jax.tree.map(lambda a: jnp.roll(a, shift, axis=0), params)

    def step(c, inp):
        c, theta = c
        t_next, x_l = inp
        c, y = body(c, theta, x_l)
        return (c, t_next), y

    (carry, _), ys = jax.lax.scan(step, (carry, first), (nxt, xs), reverse=reverse)
    return carry, ys


@eqx.filter_jit
def _forward(params, tokens, weights, beta, radius, spec: Attention = SOFTMAX):
    step = spec.step(params.depth)

    def layer(x, theta, _):
        x = x + step * velocity(theta, x, x, weights, beta=beta, radius=radius, attention=spec, check=False)
        if spec.residual == "sphere":
            x = _normalize(x)
        return x, x

    _, traj = _scan_layers(layer, tokens, params)
    return jnp.concatenate([tokens[None], traj], axis=0)


@eqx.filter_jit
def _adjoint(params, trajectory, terminal, weights, beta, radius, spec: Attention = SOFTMAX):
    step = spec.step(params.depth)

    def layer(p, theta, x):
        q = _pullback(spec, theta, x, p, weights, beta, radius, step)
        p = q + step * adjoint_field(theta, x, q, weights, beta=beta, radius=radius, attention=spec, check=False)
        return p, p

    _, ps = _scan_layers(layer, terminal, params, trajectory[:-1], reverse=True)
    return jnp.concatenate([ps, terminal[None]], axis=0)


@eqx.filter_jit
def _param_grad(params, trajectory, adjoints, weights, beta, radius, spec: Attention = SOFTMAX):
    step = spec.step(params.depth)

    def one(c, theta, xs):
        x, p = xs
        q = _pullback(spec, theta, x, p, weights, beta, radius, step)
        return c, grad_map(theta, x, q, weights, beta=beta, radius=radius, attention=spec, check=False)

    return _scan_layers(one, None, params, (trajectory[:-1], adjoints[1:]))[1]


@eqx.filter_jit
def _value_and_grad_map(params, tokens, weights, targets, loss, beta, radius, spec: Attention = SOFTMAX):
    if not spec.remat:
        return _value_and_grad_map_kept(params, tokens, weights, targets, loss, beta, radius, spec)
    trajectory = _forward(params, tokens, weights, beta, radius, spec)
    terminal = trajectory[-1]
    value = loss(terminal, weights, targets)
    step = spec.step(params.depth)

    def layer(p, theta, x):
        q = _pullback(spec, theta, x, p, weights, beta, radius, step)
        field, g = adjoint_field_and_grad_map(theta, x, q, weights, beta=beta, radius=radius, attention=spec)
        return q + step * field, g

    p0, g = _scan_layers(layer, loss.lions(terminal, weights, targets), params, trajectory[:-1], reverse=True)
    return value, g, p0


def _value_and_grad_map_kept(params, tokens, weights, targets, loss, beta, radius, spec):
    """The fused path with each layer's attention kept from the forward pass (``remat=False``)."""
    step = spec.step(params.depth)

    def layer(x, theta, _):
        f, cache = cached_forward_layer(theta, x, weights, beta=beta, radius=radius, attention=spec)
        y = x + step * f
        return (_normalize(y) if spec.residual == "sphere" else y), (x, cache, f)

    terminal, (xs, caches, fs) = _scan_layers(layer, tokens, params)
    value = loss(terminal, weights, targets)

    def back(p, theta, inputs):
        x, cache, f = inputs
        q = _pullback(spec, theta, x, p, weights, beta, radius, step, f)
        field, g = adjoint_field_and_grad_map(
            theta, x, q, weights, beta=beta, radius=radius, attention=spec, cache=cache
        )
        return q + step * field, g

    p0, g = _scan_layers(back, loss.lions(terminal, weights, targets), params, (xs, caches, fs), reverse=True)
    return value, g, p0


def _check_loss(fn, loss):
    if not isinstance(loss, Loss):
        raise TypeError(
            f"{fn}: loss must be an mfattn.losses.Loss (e.g. TokenRegression(), MMD(), "
            f"AutodiffLoss(fn)), got {type(loss).__name__}."
        )


def forward(
    params: Params,
    tokens: Float[Array, "N d"],
    *,
    beta,
    weights: Float[Array, " N"] | None = None,
    radius=None,
    attention: Attention | str | None = None,
) -> Float[Array, "L1 N d"]:
    """Run the ``L``-layer, ``H``-head attention-only transformer on one token sequence.

    Args:
        params: :class:`~mfattn.Params` with leaves ``(L, H, d, k)``.
        tokens: ``(N, d)`` input tokens ``x^0``.
        beta: inverse temperature ``>= 0``.
        weights: ``(N,)`` token masses ``m_i >= 0`` summing to 1 (default uniform ``1/N``); ``m_i = 0``
            marks padding, which is moved by attention but influences nothing.
        radius: optional radius ``R`` of the projection ``Pi_R`` applied to the measure (docs/spec.md sec. 2, eq. 6-7).
        attention: the kernel, normalisation and scalings (:class:`~mfattn.Attention` or a kind string;
            default softmax with the residual step ``1/L``). Every entry point takes the same keyword.

    Returns:
        The trajectory ``(L + 1, N, d)``: ``x^0, ..., x^L``.

    Example::

        params = mfattn.init_params(jax.random.key(0), depth=8, heads=4, dim=16, head_dim=16)
        traj = mfattn.forward(params, tokens, beta=1.0)            # (9, N, 16)
        batch = jax.vmap(lambda x: mfattn.forward(params, x, beta=1.0))(tokens_batch)
    """
    spec = as_attention(attention, "forward")
    params, tokens, weights, beta, radius = _checks.prepare("forward", params, tokens, weights, beta, radius)
    trajectory = _forward(params, tokens, weights, beta, radius, spec)
    return _checks.check_dynamics("forward", trajectory, _checks.overflow_reason(spec, beta))


def adjoint(
    params: Params,
    trajectory: Float[Array, "L1 N d"],
    terminal: Float[Array, "N d"],
    *,
    beta,
    weights: Float[Array, " N"] | None = None,
    radius=None,
    attention: Attention | str | None = None,
) -> Float[Array, "L1 N d"]:
    """The rescaled adjoints ``p^l = (1/m) d ell / d x^l`` by the hand-derived backward recursion.

    Args:
        params: ``(L, H, d, k)`` parameters.
        trajectory: ``(L + 1, N, d)`` from :func:`forward`.
        terminal: ``(N, d)`` the terminal condition ``p^L`` (a loss's ``lions(x^L, ...)``).
        beta, weights, radius, attention: as in :func:`forward`.

    Returns:
        ``(L + 1, N, d)``: ``p^0, ..., p^L`` with ``p^L = terminal``. For a token of weight 0, ``p`` is the
        Lions derivative of the loss (as a function of the input measure) at that token.
    """
    spec = as_attention(attention, "adjoint")
    x0 = _first("adjoint", params, trajectory)
    params, x0, weights, beta, radius = _checks.prepare("adjoint", params, x0, weights, beta, radius)
    trajectory, terminal = _check_traj("adjoint", params, x0, trajectory, terminal, "terminal", "(N, d)")
    return _adjoint(params, trajectory, terminal, weights, beta, radius, spec)


def param_grad(
    params: Params,
    trajectory: Float[Array, "L1 N d"],
    adjoints: Float[Array, "L1 N d"],
    *,
    beta,
    weights: Float[Array, " N"] | None = None,
    radius=None,
    attention: Attention | str | None = None,
) -> Params:
    """The rescaled gradient map ``g(theta_{l,h}, pi^l)`` of every layer and head (docs/spec.md, paper eq. 20).

    ``pi^l`` is the joint measure of ``(x^l, p^{l+1})``. Returns a :class:`~mfattn.Params` shaped like
    ``params``; the true gradient is ``(h / H) g`` with ``h = L^-alpha`` the residual step, ``g / (L H)`` by
    default (:func:`grad_scale`; :func:`loss_and_grad` returns it). For the normalised residual the
    adjoint in ``pi^l`` is ``p^{l+1}`` pulled back through the normalisation.
    """
    spec = as_attention(attention, "param_grad")
    x0 = _first("param_grad", params, trajectory)
    params, x0, weights, beta, radius = _checks.prepare("param_grad", params, x0, weights, beta, radius)
    trajectory, adjoints = _check_traj("param_grad", params, x0, trajectory, adjoints, "adjoints", "(L+1, N, d)")
    return _param_grad(params, trajectory, adjoints, weights, beta, radius, spec)


def value_and_grad_map(
    params: Params,
    tokens: Float[Array, "N d"],
    loss: Loss,
    *,
    beta,
    weights: Float[Array, " N"] | None = None,
    targets=None,
    radius=None,
    attention: Attention | str | None = None,
) -> tuple[Scalar, Params, Float[Array, "N d"]]:
    """Loss value, rescaled gradient map ``g`` (shaped like ``params``) and input adjoint ``p^0``, in one
    forward scan and one fused backward scan (the memory-lean hand path used for training)."""
    fn = "value_and_grad_map"
    _check_loss(fn, loss)
    spec = as_attention(attention, fn)
    params, tokens, weights, beta, radius = _checks.prepare(fn, params, tokens, weights, beta, radius)
    targets = loss.check_targets(fn, tokens, targets)
    value, g, p0 = _value_and_grad_map(params, tokens, weights, targets, loss, beta, radius, spec)
    value, g = _check_result(fn, value, g, params, tokens, weights, beta, radius, spec)
    return value, g, p0


def loss_and_grad(
    params: Params,
    tokens: Float[Array, "N d"],
    loss: Loss,
    *,
    beta,
    weights: Float[Array, " N"] | None = None,
    targets=None,
    radius=None,
    method: Literal["adjoint", "autodiff"] = "adjoint",
    attention: Attention | str | None = None,
) -> tuple[Scalar, Params]:
    """The loss ``ell(mu^L)`` and its true gradient with respect to ``params``.

    Args:
        params, tokens, beta, weights, radius, attention: as in :func:`forward`.
        loss: an :class:`mfattn.losses.Loss`, evaluated as ``loss(x^L, weights, targets)``.
        targets: whatever ``loss`` takes as targets (e.g. ``(N, d_out)`` for token regression).
        method: ``"adjoint"`` (default) -- forward scan plus the hand-derived backward scan, memory
            ``O(L N d + H N^2)``; ``"autodiff"`` -- ``jax.value_and_grad`` through the forward scan
            (the reference; stores every layer's attention, memory ``O(L H N^2)``).

    Returns:
        ``(value, grads)`` with ``grads`` a :class:`~mfattn.Params` like ``params``.
    """
    fn = "loss_and_grad"
    _check_loss(fn, loss)
    _checks.check_choice(fn, "method", method, ("adjoint", "autodiff"))
    spec = as_attention(attention, fn)
    params, tokens, weights, beta, radius = _checks.prepare(fn, params, tokens, weights, beta, radius)
    targets = loss.check_targets(fn, tokens, targets)
    if method == "adjoint":
        value, g, _ = _value_and_grad_map(params, tokens, weights, targets, loss, beta, radius, spec)
        scale = grad_scale(params, spec)
        g = jax.tree.map(lambda x: x * scale, g)
    else:
        value, g = _autodiff_loss_and_grad(params, tokens, weights, targets, loss, beta, radius, spec)
    return _check_result(fn, value, g, params, tokens, weights, beta, radius, spec)


@eqx.filter_jit
def _autodiff_loss_and_grad(params, tokens, weights, targets, loss, beta, radius, spec: Attention = SOFTMAX):
    def objective(p):
        return loss(_forward(p, tokens, weights, beta, radius, spec)[-1], weights, targets)

    return jax.value_and_grad(objective)(params)


def _first(fn, params, trajectory):
    trajectory = _checks.check_array(fn, "trajectory", trajectory, jnp.shape(trajectory), "(L+1, N, d)")
    if trajectory.ndim != 3:
        raise ValueError(f"{fn}: trajectory must have shape (L+1, N, d), got {trajectory.shape}.")
    params = _checks.check_params(fn, params)
    if trajectory.shape[2] != params.dim:
        raise ValueError(
            f"{fn}: trajectory has dimension d = {trajectory.shape[2]} but params have d = {params.dim}, "
            f"got trajectory shape {trajectory.shape}."
        )
    return trajectory[0]


def _check_result(fn, value, grads, params, tokens, weights, beta, radius, spec):
    """``(value, grads)`` unchanged if finite; otherwise the reason: the forward dynamics overflowed (the layer
    named), the loss itself, or the backward pass."""
    bad_value = ~jnp.isfinite(value)
    bad_grad = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)]))
    why = _checks.overflow_reason(spec, beta)
    if _checks.is_traced(bad_value) or _checks.is_traced(bad_grad):
        value = eqx.error_if(
            value,
            bad_value,
            f"{fn}: the loss is NaN or inf: the dynamics overflowed (mfattn.forward names the layer){why}.",
        )
        grads = eqx.error_if(grads, bad_grad, f"{fn}: the gradient is NaN or inf: the backward pass overflowed{why}.")
        return value, grads
    if bool(bad_value) or bool(bad_grad):
        trajectory = _checks.check_dynamics(fn, _forward(params, tokens, weights, beta, radius, spec), why)
        if bool(bad_value):
            norm = float(jnp.max(jnp.linalg.norm(trajectory[-1], axis=-1)))
            raise ValueError(
                f"{fn}: the loss is NaN or inf although the tokens stayed finite (the largest output token norm is "
                f"{norm:.3g}: if that is huge, the dynamics overflowed{why}; otherwise check the loss and targets)."
            )
        raise ValueError(
            f"{fn}: the gradient is NaN or inf although the tokens and the loss are finite: the backward pass "
            f"overflowed{why}."
        )
    return value, grads


def _check_traj(fn, params, x0, trajectory, other, name, dims):
    shape = (params.depth + 1, *x0.shape)
    trajectory = _checks.check_array(fn, "trajectory", trajectory, shape, "(L+1, N, d)").astype(x0.dtype)
    trajectory = _checks.check_finite(fn, "trajectory", trajectory, " (an overflowed forward pass?)")
    other_shape = shape if name == "adjoints" else x0.shape
    other = _checks.check_array(fn, name, other, other_shape, dims).astype(x0.dtype)
    return trajectory, _checks.check_finite(fn, name, other)
