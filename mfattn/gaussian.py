"""Gaussian closure of the mean-field softmax- and L2-attention limits (docs/spec.md section 8; Castin et al.).

For one head ``theta = (W_Q, W_K, W_V, W_O)`` write ``A = W_Q W_K^T`` and ``B = W_O W_V^T`` (``d x d``).

**Softmax attention** (scores ``s(x, y) = beta x^T A y``). If ``mu = N(m, S)``, the softmax weights
``exp(beta x^T A y) N(y; m, S)`` of a query ``x`` are again a Gaussian in ``y`` (an exponential tilt) with
mean ``m + beta S A^T x``, so

    Gamma(mu, x, theta) = B (m + beta S A^T x)                          (affine in x)

and the multi-head velocity (average over the heads, or the parameter particles of ``nu_t``) is
``v(x) = b + M x`` with ``b = avg_h B_h m`` and ``M = avg_h beta B_h S A_h^T``. An affine velocity pushes
a Gaussian to a Gaussian, so the limit PDE ``d mu_t / dt + div(mu_t v_t) = 0`` started from ``N(m_0, S_0)``
stays Gaussian, with moments solving the ``d + d^2``-dimensional ODE

    m' = avg_h B_h (m + beta S A_h^T m)  = v(m)
    S' = M S + S M^T,                      M = avg_h beta B_h S A_h^T.

**L2 attention** (scores ``s(x, y) = -beta |W_Q^T x - W_K^T y|^2 / 2``, then the same softmax over ``mu``
and ``Gamma = B * (weighted mean of y)``). Write ``K = W_K`` (``d x k``), ``r = W_Q^T x - K^T m`` and
``y = m + L z`` with ``S = L L^T``, ``z ~ N(0, I)`` (this also covers a singular ``S``). The weight
``exp(-beta |r - K^T L z|^2 / 2)`` times ``N(z; 0, I)`` is a Gaussian in ``z`` with precision
``I + beta L^T K K^T L`` and mean ``beta (I + beta L^T K K^T L)^-1 L^T K r``. The push-through identity
``(I + beta L^T K K^T L)^-1 L^T K = L^T K G`` with the ``k x k`` matrix

    G = (I_k + beta K^T S K)^-1                     (symmetric positive definite for S >= 0, beta >= 0)

gives the tilted measure ``N(m + beta S K G r, S - beta S K G K^T S)``. For invertible ``S`` this is the
Gaussian of precision ``S^-1 + beta K K^T`` (Woodbury: ``S - S K (I_k / beta + K^T S K)^-1 K^T S``);
the form with ``G`` never inverts ``S`` and is smooth down to ``beta = 0``. Hence

    Gamma_L2(mu, x, theta) = B (m + beta S W_K G (W_Q^T x - W_K^T m))          (affine in x)

and ``v(x) = b + M x`` with ``M = avg_h beta B_h S W_K,h G_h W_Q,h^T`` (``G_h`` depends on ``S``) and
``b = avg_h B_h (m - beta S W_K,h G_h W_K,h^T m)``. The moments solve

    m' = avg_h B_h (m + beta S W_K,h G_h (W_Q,h - W_K,h)^T m)  = v(m)
    S' = M S + S M^T,                      M = avg_h beta B_h S W_K,h G_h W_Q,h^T.

Limits: ``beta -> 0`` gives ``G -> I`` and ``Gamma -> B m`` (as for softmax); to first order in ``beta``,
``Gamma_L2 = Gamma_softmax - beta B S W_K W_K^T m``. As ``beta -> inf`` with ``K^T S K`` invertible,
``Gamma_L2 -> B (m + S K (K^T S K)^-1 (W_Q^T x - K^T m))``: ``B`` times the conditional mean of
``y ~ N(m, S)`` given ``K^T y = W_Q^T x``; for ``k = d`` and invertible ``W_K``, ``S`` that is
``B W_K^-T W_Q^T x``, whatever ``mu``.

In both cases ``S(t) = Phi(t) S_0 Phi(t)^T`` with ``Phi' = M Phi``, so ``S`` stays symmetric positive
semidefinite and keeps its rank.

:func:`closure` (``attention="softmax"`` or ``"l2"``; :func:`softmax_closure` is its softmax case) integrates
these ODEs with the parameters of the same ensemble, grid and interpolation as :func:`mfattn.limit.forward`
(:func:`mfattn.limit.param_at`), so it is the exact Gaussian solution of the limit that ``limit.forward``
discretises with particles. ``d`` is small here: the ``d x d`` matrices are formed (through the
``k``-dimensional projections, without Python loops).
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

__all__ = ["gaussian_velocity", "l2_gaussian_velocity", "closure", "softmax_closure"]

Interpolation = Literal["linear", "piecewise"]
AttentionKind = Literal["softmax", "l2"]
_ATTENTIONS = ("softmax", "l2")


def _check_kernel_args(fn: str, theta, mean, cov, x, beta):
    """``(mean, cov, x, beta)`` as arrays, after checking the shapes of one grid time's parameters
    ``(P, d, k)``, ``mean (d,)``, ``cov (d, d)``, ``x (d,)`` (static, so also under ``jit``/``vmap``) and
    ``beta >= 0`` (``equinox.error_if`` when traced)."""
    shapes = {tuple(jnp.shape(w)) for w in (theta.wq, theta.wk, theta.wv, theta.wo)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"{fn}: theta leaves must all be (P, d, k); got shapes {sorted(shapes)}.")
    d = theta.wq.shape[1]
    mean = _checks.check_array(fn, "mean", mean, (d,), "(d,)")
    cov = _checks.check_array(fn, "cov", cov, (d, d), "(d, d)")
    x = _checks.check_array(fn, "x", x, (d,), "(d,)")
    return mean, cov, x, _checks.check_scalar(fn, "beta", beta, jnp.result_type(mean, cov, x, theta.wq))


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
        beta: inverse temperature ``>= 0``.

    Returns:
        ``(d,)``: the limit of :func:`mfattn.velocity` on ``n`` samples of ``N(m, S)`` as ``n -> inf``.

    Raises:
        ValueError: mis-shaped arguments, or a (concrete) ``beta < 0``.

    Example::

        theta = jax.tree.map(lambda w: w[0], params)          # leaves (P, d, k)
        v = gaussian_velocity(theta, m, S, x, beta=1.0)       # (d,)
    """
    mean, cov, x, beta = _check_kernel_args("gaussian.gaussian_velocity", theta, mean, cov, x, beta)
    return _softmax_velocity(theta, mean, cov, x, beta)


@jax.jit
def _softmax_velocity(theta, mean, cov, x, beta):
    """:func:`gaussian_velocity` without the argument checks (one compiled program, also when called
    eagerly)."""
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


def _l2_gain(theta, cov: Float[Array, "d d"], beta) -> Float[Array, "P d k"]:
    """``S W_K G`` for every head, ``G = (I_k + beta W_K^T S W_K)^-1``: ``(P, d, k)``.

    ``G`` is applied by a ``k x k`` solve (``I_k + beta W_K^T S W_K`` is symmetric positive definite for
    ``S >= 0``, ``beta >= 0``); ``S`` itself is never inverted, so a singular ``S`` (a degenerate Gaussian)
    is fine. ``G`` is symmetric, so ``(S W_K G)^T = G W_K^T S`` solves ``(I_k + beta W_K^T S W_K) Z = W_K^T S``.
    """
    sk = jnp.einsum("de,pek->pdk", cov, theta.wk)  # S W_K
    core = jnp.einsum("pdk,pdl->pkl", theta.wk, sk)  # W_K^T S W_K (P, k, k)
    core = (core + jnp.swapaxes(core, 1, 2)) / 2
    system = jnp.eye(core.shape[-1], dtype=core.dtype)[None] + beta * core
    return jnp.swapaxes(jnp.linalg.solve(system, jnp.swapaxes(sk, 1, 2)), 1, 2)


def l2_gaussian_velocity(
    theta, mean: Float[Array, " d"], cov: Float[Array, "d d"], x: Float[Array, " d"], *, beta
) -> Float[Array, " d"]:
    """Closed-form L2 attention of the Gaussian measure ``N(mean, cov)`` at one query ``x``.

    L2 attention scores ``s(x, y) = -beta |W_Q^T x - W_K^T y|^2 / 2``, normalises ``exp(s(x, y)) mu(dy)``
    over ``mu`` and returns ``B`` times the weighted mean of ``y``. For ``mu = N(m, S)`` (see the module
    docstring for the derivation)::

        F_L2(N(m, S), x, nu) = (1/P) sum_h B_h (m + beta S W_K,h G_h (W_Q,h^T x - W_K,h^T m)),
        G_h = (I_k + beta W_K,h^T S W_K,h)^-1,   B_h = W_O,h W_V,h^T,

    affine in ``x``; ``S`` is never inverted (singular ``S`` allowed), ``beta = 0`` gives ``avg_h B_h m``.

    Args:
        theta: one layer's (grid time's) parameters, a :class:`~mfattn.Params`-like pytree with leaves
            ``(P, d, k)``.
        mean: ``(d,)`` mean ``m``; cov: ``(d, d)`` symmetric positive semidefinite covariance ``S``.
        x: ``(d,)`` query point.
        beta: inverse temperature ``>= 0``.

    Returns:
        ``(d,)``: the limit, as ``n -> inf``, of L2 attention averaged over the heads on ``n`` samples of
        ``N(m, S)``.

    Raises:
        ValueError: mis-shaped arguments, or a (concrete) ``beta < 0``.

    Example::

        theta = jax.tree.map(lambda w: w[0], params)          # leaves (P, d, k)
        v = l2_gaussian_velocity(theta, m, S, x, beta=1.0)    # (d,)
    """
    mean, cov, x, beta = _check_kernel_args("gaussian.l2_gaussian_velocity", theta, mean, cov, x, beta)
    return _l2_velocity(theta, mean, cov, x, beta)


@jax.jit
def _l2_velocity(theta, mean, cov, x, beta):
    """:func:`l2_gaussian_velocity` without the argument checks (one compiled program, also when called
    eagerly)."""
    r = jnp.einsum("pdk,d->pk", theta.wq, x) - jnp.einsum("pdk,d->pk", theta.wk, mean)  # W_Q^T x - W_K^T m
    y = mean[None, :] + beta * jnp.einsum("pdk,pk->pd", _l2_gain(theta, cov, beta), r)  # tilted means (P, d)
    v = jnp.einsum("pdk,pd->pk", theta.wv, y)  # W_V^T y
    return jnp.mean(jnp.einsum("pdk,pk->pd", theta.wo, v), axis=0)


def _l2_velocity_matrix(theta, cov: Float[Array, "d d"], beta) -> Float[Array, "d d"]:
    """``M = (1/P) sum_h beta B_h S W_K G_h W_Q^T = (1/P) sum_h beta W_O (W_V^T S W_K G_h) W_Q^T``: the
    Jacobian of :func:`l2_gaussian_velocity` in ``x``."""
    core = jnp.einsum("pdk,pdl->pkl", theta.wv, _l2_gain(theta, cov, beta))  # (P, k, k)
    return beta * jnp.einsum("pdk,pkl,pel->de", theta.wo, core, theta.wq) / theta.wq.shape[0]


def _softmax_vf(t, y, args):
    """Softmax closure: ``(m', S')`` at time ``t``; everything arrives through ``args``."""
    mean, cov = y
    ensemble, beta, grid, interpolation = args
    theta = param_at(ensemble, t, grid, interpolation)
    dmean = _softmax_velocity(theta, mean, cov, mean, beta)
    ms = _velocity_matrix(theta, cov, beta) @ cov
    return dmean, ms + ms.T  # exactly symmetric: S stays symmetric to the last bit


def _l2_vf(t, y, args):
    """L2 closure: ``(m', S')`` at time ``t``; everything arrives through ``args``."""
    mean, cov = y
    ensemble, beta, grid, interpolation = args
    theta = param_at(ensemble, t, grid, interpolation)
    dmean = _l2_velocity(theta, mean, cov, mean, beta)
    ms = _l2_velocity_matrix(theta, cov, beta) @ cov
    return dmean, ms + ms.T


_VECTOR_FIELDS = {"softmax": _softmax_vf, "l2": _l2_vf}


@eqx.filter_jit
def _solve(vf, ensemble, mean0, cov0, beta, grid, interpolation, ts, solver, controller, dt0, max_steps):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
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


def closure(
    ensemble: Params,
    mean0: Float[Array, " d"],
    cov0: Float[Array, "d d"],
    *,
    beta,
    ts,
    attention: AttentionKind = "softmax",
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
    (:func:`mfattn.limit.param_at`), ``A_h = W_Q W_K^T``, ``B_h = W_O W_V^T`` of particle ``h`` and ``avg_h``
    the mean over the ``M`` particles, for ``attention="softmax"``::

        m' = avg_h B_h (m + beta S A_h^T m)
        S' = V S + S V^T,   V = avg_h beta B_h S A_h^T

    and for ``attention="l2"`` (scores ``-beta |W_Q^T x - W_K^T y|^2 / 2``)::

        m' = avg_h B_h (m + beta S W_K,h G_h (W_Q,h - W_K,h)^T m),   G_h = (I_k + beta W_K,h^T S W_K,h)^-1
        S' = V S + S V^T,   V = avg_h beta B_h S W_K,h G_h W_Q,h^T

    (``V`` is the Jacobian of the affine velocity, called ``M`` in docs/spec.md section 8; the module docstring
    derives both). Then ``mu_t = N(m(t), S(t))`` exactly, for the same limit that
    :func:`mfattn.limit.forward` integrates with token particles. ``S(t) = Phi S_0 Phi^T`` stays symmetric
    positive semidefinite with the rank of ``S_0``; softmax closures may blow up in finite time (then the
    solve fails with Diffrax's step-budget or NaN error), L2 closures grow at most exponentially.

    Args:
        ensemble: :class:`~mfattn.Params` with leaves ``(K + 1, M, d, k)``.
        mean0: ``(d,)`` initial mean; cov0: ``(d, d)`` symmetric positive semidefinite initial covariance.
        beta: inverse temperature ``>= 0``.
        ts: ``(T,)`` non-decreasing save times in ``[t_0, t_K]``.
        attention: ``"softmax"`` (default) or ``"l2"``.
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

    Raises:
        ValueError: mis-shaped or non-finite arguments, a non-symmetric or indefinite ``cov0``,
            ``beta < 0``, an unknown ``attention`` or ``interpolation``, a bad ``grid`` or ``ts``.

    Example::

        ens = mfattn.limit.init_ensemble(key, grid_size=5, particles=8, dim=2, head_dim=2, init="mean_noise")
        means, covs = closure(ens, jnp.zeros(2), jnp.eye(2), beta=1.0, ts=jnp.linspace(0, 1, 5), attention="l2")
    """
    return _closure(
        "gaussian.closure",
        ensemble,
        mean0,
        cov0,
        beta=beta,
        ts=ts,
        attention=attention,
        grid=grid,
        interpolation=interpolation,
        solver=solver,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )


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
    particles (``V`` is the Jacobian of the affine velocity, called ``M`` in docs/spec.md section 8). Then
    ``mu_t = N(m(t), S(t))`` exactly, for the same limit that :func:`mfattn.limit.forward` integrates with
    token particles.

    This is :func:`closure` with ``attention="softmax"``.

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
    return _closure(
        "gaussian.softmax_closure",
        ensemble,
        mean0,
        cov0,
        beta=beta,
        ts=ts,
        attention="softmax",
        grid=grid,
        interpolation=interpolation,
        solver=solver,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )


def _closure(
    fn,
    ensemble,
    mean0,
    cov0,
    *,
    beta,
    ts,
    attention,
    grid,
    interpolation,
    solver,
    stepsize_controller,
    dt0,
    rtol,
    atol,
    max_steps,
):
    """Validate the arguments of :func:`closure` (errors name ``fn``) and solve."""
    ensemble = _checks.check_params(fn, ensemble)
    d = ensemble.dim
    mean0 = _checks.check_array(fn, "mean0", mean0, (d,), "(d,)")
    cov0 = _checks.check_array(fn, "cov0", cov0, (d, d), "(d, d)")
    dtype = jnp.result_type(mean0.dtype, cov0.dtype, ensemble.wq.dtype)
    ensemble = jax.tree.map(lambda w: _checks.check_finite(fn, "ensemble", w.astype(dtype)), ensemble)
    mean0 = _checks.check_finite(fn, "mean0", mean0.astype(dtype))
    cov0 = _check_cov(fn, _checks.check_finite(fn, "cov0", cov0.astype(dtype)))
    beta = _checks.check_scalar(fn, "beta", beta, dtype)
    if attention not in _ATTENTIONS:
        raise ValueError(f"{fn}: attention must be 'softmax' or 'l2', got {attention!r}.")
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
    return _solve(
        _VECTOR_FIELDS[attention],
        ensemble,
        mean0,
        cov0,
        beta,
        grid,
        interpolation,
        ts,
        solver,
        stepsize_controller,
        dt0,
        max_steps,
    )
