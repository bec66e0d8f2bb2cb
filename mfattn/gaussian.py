"""Gaussian closure of the mean-field softmax-attention limit (SPEC section 8; Castin et al.).

For one head ``theta = (W_Q, W_K, W_V, W_O)`` write ``A = W_Q W_K^T`` and ``B = W_O W_V^T`` (``d x d``).
If ``mu = N(m, S)``, the softmax weights ``exp(beta x^T A y) N(y; m, S)`` of a query ``x`` are again a
Gaussian in ``y`` (an exponential tilt) with mean ``m + beta S A^T x``, so

    Gamma(mu, x, theta) = B (m + beta S A^T x)                          (affine in x)

and the multi-head velocity (average over the heads, or the parameter particles of ``nu_t``) is
``v(x) = b + M x`` with ``b = avg_h B_h m`` and ``M = avg_h beta B_h S A_h^T``. An affine velocity pushes
a Gaussian to a Gaussian, so the limit PDE ``d mu_t / dt + div(mu_t v_t) = 0`` started from ``N(m_0, S_0)``
stays Gaussian, with moments solving the ``d + d^2``-dimensional ODE

    m' = avg_h B_h (m + beta S A_h^T m)  = v(m)
    S' = M S + S M^T,                      M = avg_h beta B_h S A_h^T.

:func:`softmax_closure` integrates this ODE with the parameters of the same ensemble, grid and
interpolation as :func:`mfattn.limit.forward` (:func:`mfattn.limit.param_at`), so it is the exact Gaussian
solution of the limit that ``limit.forward`` discretises with particles. ``d`` is small here: the
``d x d`` matrices are formed (through the ``k``-dimensional projections, without Python loops).
"""

from __future__ import annotations

from typing import Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from . import _checks
from .limit import _default_controller, param_at, uniform_grid
from .params import Params

__all__ = ["gaussian_velocity", "softmax_closure"]

Interpolation = Literal["linear", "piecewise"]


def gaussian_velocity(
    theta, mean: Float[Array, " d"], cov: Float[Array, "d d"], x: Float[Array, " d"], *, beta
) -> Float[Array, " d"]:
    """Closed-form softmax attention of the Gaussian measure ``N(mean, cov)`` at one query ``x``.

    ``F(N(m, S), x, nu) = (1/P) sum_h B_h (m + beta S A_h^T x)`` with ``A_h = W_Q W_K^T``,
    ``B_h = W_O W_V^T``; evaluated in the ``k``-dimensional projections (``A^T x = W_K (W_Q^T x)``).

    Args:
        theta: one layer's (grid time's) parameters, a :class:`~mfattn.Params`-like pytree with leaves
            ``(P, d, k)``.
        mean: ``(d,)`` mean ``m``; cov: ``(d, d)`` symmetric positive semidefinite covariance ``S``.
        x: ``(d,)`` query point.
        beta: inverse temperature.

    Returns:
        ``(d,)``: the limit of :func:`mfattn.velocity` on ``n`` samples of ``N(m, S)`` as ``n -> inf``.

    Example::

        theta = jax.tree.map(lambda w: w[0], params)          # leaves (P, d, k)
        v = gaussian_velocity(theta, m, S, x, beta=1.0)       # (d,)
    """
    q = jnp.einsum("pdk,d->pk", theta.wq, x)  # W_Q^T x
    tilt = jnp.einsum("pdk,pk->pd", theta.wk, q)  # A^T x
    y = mean[None, :] + beta * jnp.einsum("de,pe->pd", cov, tilt)  # tilted means (P, d)
    r = jnp.einsum("pdk,pd->pk", theta.wv, y)  # W_V^T y
    return jnp.mean(jnp.einsum("pdk,pk->pd", theta.wo, r), axis=0)


def _velocity_matrix(theta, cov: Float[Array, "d d"], beta) -> Float[Array, "d d"]:
    """``M = (1/P) sum_h beta B_h S A_h^T = (1/P) sum_h beta W_O (W_V^T S W_K) W_Q^T``: the Jacobian of
    :func:`gaussian_velocity` in ``x``."""
    core = jnp.einsum("pdk,de,pel->pkl", theta.wv, cov, theta.wk)  # (P, k, k)
    return beta * jnp.einsum("pdk,pkl,pel->de", theta.wo, core, theta.wq) / theta.wq.shape[0]


def _closure_vf(t, y, args):
    """``(m', S')`` at time ``t``; everything arrives through ``args``."""
    mean, cov = y
    ensemble, beta, grid, interpolation = args
    theta = param_at(ensemble, t, grid, interpolation)
    dmean = gaussian_velocity(theta, mean, cov, mean, beta=beta)
    ms = _velocity_matrix(theta, cov, beta) @ cov
    return dmean, ms + ms.T  # exactly symmetric: S stays symmetric to the last bit


@eqx.filter_jit
def _solve(ensemble, mean0, cov0, beta, grid, interpolation, ts, solver, controller, dt0, max_steps):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_closure_vf),
        solver,
        t0=grid[0],
        t1=grid[-1],
        dt0=dt0,
        y0=(mean0, cov0),
        args=(ensemble, beta, grid, interpolation),
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        max_steps=max_steps,
    ).ys


def _check_cov(fn: str, cov):
    """``cov`` symmetrised, after checking that it is symmetric and positive semidefinite (to a relative
    tolerance ``4 sqrt(eps)``); ``equinox.error_if`` when traced."""
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(cov)))
    tol = _checks._tol(cov.dtype) * scale
    asym = jnp.max(jnp.abs(cov - cov.T)) > tol
    sym = (cov + cov.T) / 2
    indefinite = jnp.min(jnp.linalg.eigvalsh(sym)) < -tol
    if _checks._traced(cov):
        sym = eqx.error_if(sym, asym, f"{fn}: cov0 must be symmetric.")
        return eqx.error_if(sym, indefinite, f"{fn}: cov0 must be positive semidefinite.")
    if bool(asym):
        raise ValueError(
            f"{fn}: cov0 must be symmetric, got max |S - S^T| = {float(jnp.max(jnp.abs(cov - cov.T))):.3e}."
        )
    if bool(indefinite):
        raise ValueError(
            f"{fn}: cov0 must be positive semidefinite, got smallest eigenvalue "
            f"{float(jnp.min(jnp.linalg.eigvalsh(sym))):.3e}."
        )
    return sym


def softmax_closure(
    ensemble: Params,
    mean0: Float[Array, " d"],
    cov0: Float[Array, "d d"],
    *,
    beta,
    ts,
    grid=None,
    interpolation: Interpolation = "linear",
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = 16_384,
) -> tuple[Float[Array, "T d"], Float[Array, "T d d"]]:
    """Mean and covariance of the limit ``mu_t`` started from the Gaussian ``mu_0 = N(mean0, cov0)``.

    Solves, on ``[t_0, t_K]`` with ``theta_h(t)`` the ensemble's particles at time ``t``
    (:func:`mfattn.limit.param_at`)::

        m' = avg_h B_h (m + beta S A_h^T m)
        S' = V S + S V^T,   V = avg_h beta B_h S A_h^T

    with ``A_h = W_Q W_K^T``, ``B_h = W_O W_V^T`` of particle ``h`` and ``avg_h`` the mean over the ``M``
    particles (``V`` is the Jacobian of the affine velocity, called ``M`` in SPEC section 8). Then
    ``mu_t = N(m(t), S(t))`` exactly, for the same limit that :func:`mfattn.limit.forward` integrates with
    token particles.

    Args:
        ensemble: :class:`~mfattn.Params` with leaves ``(K + 1, M, d, k)``.
        mean0: ``(d,)`` initial mean; cov0: ``(d, d)`` symmetric positive semidefinite initial covariance.
        beta: inverse temperature ``>= 0``.
        ts: ``(T,)`` non-decreasing save times in ``[t_0, t_K]``.
        grid: ``(K + 1,)`` increasing grid times (default uniform on ``[0, 1]``).
        interpolation: ``"linear"`` (default) or ``"piecewise"``, as in :func:`mfattn.limit.forward`.
        solver: a Diffrax solver (default ``Tsit5()``).
        stepsize_controller: default a PID controller (``rtol``, ``atol``) clipped to step onto the grid
            times (``step_ts`` for linear, ``jump_ts`` for piecewise interpolation).
        dt0: initial (or constant) step; ``None`` lets an adaptive controller choose.
        rtol, atol: tolerances of the default controller.
        max_steps: Diffrax's step budget.

    Returns:
        ``(means, covs)``, shaped ``(T, d)`` and ``(T, d, d)``: ``m`` and ``S`` at ``ts``.

    Example::

        ens = mfattn.limit.init_ensemble(key, grid_size=5, particles=8, dim=2, head_dim=2, init="mean_noise")
        means, covs = softmax_closure(ens, jnp.zeros(2), jnp.eye(2), beta=1.0, ts=jnp.linspace(0, 1, 5))
    """
    fn = "gaussian.softmax_closure"
    ensemble = _checks.check_params(fn, ensemble)
    d = ensemble.dim
    mean0 = _checks.check_array(fn, "mean0", mean0, (d,), "(d,)")
    cov0 = _checks.check_array(fn, "cov0", cov0, (d, d), "(d, d)")
    dtype = jnp.result_type(mean0.dtype, cov0.dtype, ensemble.wq.dtype)
    ensemble = jax.tree.map(lambda w: _checks.check_finite(fn, "ensemble", w.astype(dtype)), ensemble)
    mean0 = _checks.check_finite(fn, "mean0", mean0.astype(dtype))
    cov0 = _check_cov(fn, _checks.check_finite(fn, "cov0", cov0.astype(dtype)))
    beta = _checks.check_scalar(fn, "beta", beta, dtype)
    if interpolation not in ("linear", "piecewise"):
        raise ValueError(f"{fn}: interpolation must be 'linear' or 'piecewise', got {interpolation!r}.")
    if ensemble.depth < 2:
        raise ValueError(f"{fn}: an ensemble needs at least 2 grid times, got leaves {tuple(ensemble.wq.shape)}.")
    if grid is None:
        grid = uniform_grid(ensemble.depth, dtype)
    else:
        grid = _checks.check_array(fn, "grid", grid, (ensemble.depth,), "(K+1,) = ensemble grid size").astype(dtype)
        if not _checks._traced(grid) and not bool(jnp.all(jnp.diff(grid) > 0)):
            raise ValueError(f"{fn}: grid must be strictly increasing.")
    ts = jnp.asarray(ts, dtype)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"{fn}: ts must be a non-empty 1-D array of save times, got shape {ts.shape}.")
    if not _checks._traced(ts) and not _checks._traced(grid):
        t, g = np.asarray(ts), np.asarray(grid)
        if np.any(np.diff(t) < 0) or t[0] < g[0] or t[-1] > g[-1]:
            raise ValueError(f"{fn}: ts must be non-decreasing and within [grid[0], grid[-1]] = [{g[0]}, {g[-1]}].")
    if solver is None:
        solver = diffrax.Tsit5()
    if stepsize_controller is None:
        # the limit's default: a PID controller stepping onto the grid times (kinks or jumps of the field)
        stepsize_controller = _default_controller(grid, interpolation, rtol, atol)
    return _solve(ensemble, mean0, cov0, beta, grid, interpolation, ts, solver, stepsize_controller, dt0, max_steps)
