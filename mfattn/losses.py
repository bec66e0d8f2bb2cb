"""Losses on the terminal measure, each with its Lions derivative (docs/spec.md section 4).

A loss is a function ``ell(tokens, weights, targets)`` of a weighted empirical measure
``mu = sum_i m_i delta_{x_i}`` (and per-example targets). The backward pass starts from its Lions
derivative at the atoms, ``p_i^L = d_mu ell(mu)(x_i) = (1/m_i) d ell / d x_i``, which stays defined at a
token of weight 0 (the derivative of the loss with respect to an infinitesimal mass placed there).

Every loss is an :class:`equinox.Module`: call it for the value, ``.lions(...)`` for the derivative::

    loss = mfattn.losses.TokenRegression()
    value = loss(tokens, weights, targets)          # scalar
    p_terminal = loss.lions(tokens, weights, targets)  # (N, d)
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from . import _checks

__all__ = ["Loss", "TokenRegression", "MMD", "AutodiffLoss"]


class Loss(eqx.Module):
    """A loss of the terminal measure with its Lions derivative."""

    @abc.abstractmethod
    def __call__(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Scalar:
        """The loss value ``ell(mu)``."""

    @abc.abstractmethod
    def lions(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Float[Array, "N d"]:
        """``d_mu ell(mu)(x_i)`` at every atom, ``(N, d)``."""

    def check_targets(self, fn: str, tokens: Float[Array, "N d"], targets):
        """``targets`` checked for these ``(N, d)`` tokens (``ValueError`` naming ``fn`` and the argument):
        here, every floating-point array in it finite. Subclasses add their shapes."""

        def leaf(t):
            if hasattr(t, "dtype") and jnp.issubdtype(jnp.asarray(t).dtype, jnp.inexact):
                return _checks.check_finite(fn, "targets", jnp.asarray(t))
            return t

        return jax.tree.map(leaf, targets)


class TokenRegression(Loss):
    """Per-token regression ``ell = sum_i m_i |R x_i - y_i|^2 / 2`` with an optional readout ``R``.

    ``targets`` is ``(N, d_out)``; ``readout`` is ``(d_out, d)`` (default: the identity, ``d_out = d``).
    Lions derivative: ``d_mu ell(x_i) = R^T (R x_i - y_i)``.
    """

    readout: Float[Array, "dout d"] | None = None

    def __check_init__(self):
        r = self.readout
        if r is None or not hasattr(r, "shape"):
            return
        if r.ndim != 2 or min(r.shape) < 1:
            raise ValueError(f"TokenRegression: readout must have shape (d_out, d), got {tuple(r.shape)}.")
        if not jnp.issubdtype(r.dtype, jnp.floating):
            raise TypeError(f"TokenRegression: readout must be floating point, got dtype {r.dtype}.")
        if not _checks.is_traced(r) and not bool(jnp.all(jnp.isfinite(r))):
            raise ValueError("TokenRegression: readout contains NaN or inf.")

    def check_targets(self, fn: str, tokens: Float[Array, "N d"], targets):
        """``(N, d_out)`` finite targets (``d_out = d`` without a readout); the readout must be ``(d_out, d)``."""
        n, d = tokens.shape
        if self.readout is not None and self.readout.shape[1] != d:
            raise ValueError(
                f"{fn}: loss TokenRegression's readout is (d_out, d) = {tuple(self.readout.shape)} but the tokens "
                f"have d = {d}."
            )
        d_out = d if self.readout is None else self.readout.shape[0]
        if targets is None:
            raise TypeError(f"{fn}: targets is required for TokenRegression (an ({n}, {d_out}) array), got None.")
        targets = _checks.check_array(fn, "targets", targets, (n, d_out), "(N, d_out)")
        return _checks.check_finite(fn, "targets", targets.astype(tokens.dtype))

    def _residual(self, tokens, targets):
        pred = tokens if self.readout is None else tokens @ self.readout.T
        return pred - targets

    def __call__(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Scalar:
        r = self._residual(tokens, targets)
        return 0.5 * jnp.sum(weights * jnp.sum(r * r, axis=-1))

    def lions(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Float[Array, "N d"]:
        r = self._residual(tokens, targets)
        return r if self.readout is None else r @ self.readout


def _gauss(x, y, bandwidth):
    d2 = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    return jnp.exp(-d2 / (2 * bandwidth**2))


class MMD(Loss):
    """Half the squared maximum mean discrepancy to a target measure, Gaussian kernel.

    ``ell = MMD^2(mu, rho) / 2`` with ``kappa(x, y) = exp(-|x - y|^2 / (2 sigma^2))`` and
    ``rho = sum_a r_a delta_{y_a}``. ``targets`` is ``(Y, r)`` with ``Y`` of shape ``(M, d)`` and
    ``r`` of shape ``(M,)``, or just ``Y`` (uniform ``r``). Lions derivative::

        d_mu ell(x) = sum_j m_j grad_1 kappa(x, x_j) - sum_a r_a grad_1 kappa(x, y_a),
        grad_1 kappa(x, y) = -(x - y) kappa(x, y) / sigma^2.
    """

    bandwidth: float = 1.0

    def __check_init__(self):
        if not _checks.is_traced(self.bandwidth):
            _checks.check_real("MMD", "bandwidth", self.bandwidth, positive=True)

    def check_targets(self, fn: str, tokens: Float[Array, "N d"], targets):
        """``Y`` ``(M, d)`` finite, or ``(Y, r)`` with masses ``r`` ``(M,)`` ``>= 0`` summing to 1."""
        d = tokens.shape[1]
        if targets is None:
            raise TypeError(f"{fn}: targets is required for MMD (an (M, {d}) array Y or a pair (Y, r)), got None.")
        if isinstance(targets, (tuple, list)):
            if len(targets) != 2:
                raise ValueError(f"{fn}: targets must be Y or a pair (Y, r) for MMD, got {len(targets)} items.")
            y, r = targets
        else:
            y, r = targets, None
        y = _checks.check_points(fn, "targets", y, d).astype(tokens.dtype)
        r = _checks.check_weights(fn, r, y.shape[0], tokens.dtype, name="target masses r")
        return (y, r) if isinstance(targets, (tuple, list)) else y

    @staticmethod
    def _target(targets):
        if isinstance(targets, (tuple, list)):
            y, r = targets
        else:
            y = targets
            r = jnp.full(y.shape[0], 1.0 / y.shape[0], y.dtype)
        return y, r

    def __call__(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Scalar:
        y, r = self._target(targets)
        kxx = weights @ _gauss(tokens, tokens, self.bandwidth) @ weights
        kxy = weights @ _gauss(tokens, y, self.bandwidth) @ r
        kyy = r @ _gauss(y, y, self.bandwidth) @ r
        return 0.5 * (kxx - 2 * kxy + kyy)

    def lions(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Float[Array, "N d"]:
        y, r = self._target(targets)

        def grad_part(points, masses):
            kern = _gauss(tokens, points, self.bandwidth) * masses[None, :]  # (N, M)
            return -(tokens * jnp.sum(kern, axis=-1, keepdims=True) - kern @ points) / self.bandwidth**2

        return grad_part(tokens, weights) - grad_part(y, r)


class AutodiffLoss(Loss):
    """Any loss written on ``(tokens, weights, targets)``; its Lions derivative by autodiff.

    At an atom of positive mass ``d_mu ell(x_i) = (1/m_i) d ell / d x_i``. At an atom of mass 0 that
    quotient is 0/0; ``padding="exact"`` computes the limit ``d/dx_i d/dm_i ell`` (needs ``fn``
    differentiable in ``weights`` at 0, and costs one extra reverse pass per token), ``padding="zero"``
    (default) returns 0 there, which is harmless when zero-weight tokens are mere padding: they never
    influence other tokens or the parameter gradients.

    Example::

        loss = AutodiffLoss(lambda X, m, Y: jnp.sum(m * jnp.sum((X - Y) ** 4, -1)))
    """

    fn: Callable
    padding: Literal["zero", "exact"] = eqx.field(default="zero", static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"AutodiffLoss: fn must be a callable (tokens, weights, targets) -> scalar, got {self.fn!r}."
            )
        _checks.check_choice("AutodiffLoss", "padding", self.padding, ("zero", "exact"))

    def __call__(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Scalar:
        return self.fn(tokens, weights, targets)

    def lions(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Float[Array, "N d"]:
        live = (weights > 0)[:, None]
        grad = jax.grad(self.fn)(tokens, weights, targets)
        p = jnp.where(live, grad / jnp.where(live, weights[:, None], 1), 0)
        if self.padding == "zero":
            return p
        if self.padding != "exact":
            raise ValueError(f"AutodiffLoss: padding must be 'zero' or 'exact', got {self.padding!r}.")

        def mixed(i):
            def dm_i(x_i):
                return jax.grad(self.fn, argnums=1)(tokens.at[i].set(x_i), weights, targets)[i]

            return jax.grad(dm_i)(tokens[i])

        exact = jax.lax.map(mixed, jnp.arange(tokens.shape[0]))
        return jnp.where(live, p, exact)
