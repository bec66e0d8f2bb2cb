"""The infinite-depth, infinite-width limit: a forward-backward McKean-Vlasov ODE (docs/spec.md section 5).

Time ``t in [0, 1]`` plays the role of depth; the heads of a layer become the law ``nu_t`` of the
parameters at depth ``t``. Numerically ``nu_t`` is an *ensemble*: a :class:`~mfattn.Params` with leaves
``(K + 1, M, d, k)`` holding ``M`` parameter particles at each time of a grid ``t_0 < ... < t_K`` (default
uniform on ``[0, 1]``); at training step 0 the particles are drawn once from ``nu_0`` and shared by every
grid time (common random numbers, ``init_ensemble``). Between grid times the field is the linear
interpolation of each particle, or (``interpolation="piecewise"``) constant on ``[t_j, t_{j+1})``, under
which an ``L``-layer discrete model with ``t_l = l / L`` is exactly explicit Euler with step ``1/L``.

    dx_i/dt = F(mu_t, x_i, nu_t)          x(0) = tokens                    (all tokens jointly)
    dp_i/dt = -G(pi_t, x_i, p_i; nu_t)    p(1) = d_mu ell(mu_1)(x_i(1))    (hand-derived adjoint ODE)
    g(theta, pi_t)                        the gradient map at each grid time and particle

``F``, ``G`` and ``g`` are the same kernels as the discrete model's (:func:`mfattn.velocity`,
:func:`mfattn.adjoint_field`, :func:`mfattn.grad_map`) with the particle axis in place of the heads.
The solves are ``diffrax.diffeqsolve`` calls whose solver, step-size controller, tolerances and adjoint
are arguments; ``jax.grad`` through :func:`forward` remains available as the reference. Under
``stepsize_controller=FixedSteps(steps)`` with an explicit Runge-Kutta solver they run instead in the fixed-step
loop of :mod:`mfattn.rk` (the solver's own tableau and interpolation, the particles of each stage computed one step
ahead and carried), which agrees with Diffrax's ``ConstantStepSize`` to rounding.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from . import _checks, rk
from .adjoint import adjoint_field, grad_map
from .attention import SOFTMAX, Attention, as_attention, velocity
from .losses import Loss
from .params import Params, init_params

__all__ = [
    "uniform_grid",
    "init_ensemble",
    "FixedSteps",
    "param_at",
    "forward",
    "backward",
    "forward_backward",
    "grad_map_on_grid",
    "discretize",
    "batch_grad_map",
    "LimitState",
    "init_state",
    "train_step",
    "monte_carlo_error",
]

Interpolation = Literal["linear", "piecewise"]


def uniform_grid(size: int, dtype=None) -> Float[Array, " K1"]:
    """``size`` equally spaced times on ``[0, 1]`` (``t_j = j / (size - 1)``)."""
    if size < 2:
        raise ValueError(f"uniform_grid: a grid needs at least 2 times, got {size}.")
    return jnp.linspace(0.0, 1.0, size, dtype=dtype)


def init_ensemble(
    key,
    grid_size: int,
    particles: int,
    dim: int,
    head_dim: int,
    **init_kwargs,
) -> Params:
    """``M = particles`` draws from the initialisation law, repeated at every grid time: leaves
    ``(grid_size, M, d, k)``. ``init_kwargs`` go to :func:`mfattn.init_params` (``init``, ``scale``,
    ``mean``, ``dtype``)."""
    return init_params(key, grid_size, particles, dim, head_dim, tie_depth=True, **init_kwargs)


def _segment(t, grid, interpolation):
    """Index ``j`` of the grid interval holding ``t`` and the interpolation weight ``alpha`` in [0, 1].

    A time within rounding of a grid point ``t_j`` is placed in ``[t_j, t_{j+1})``, so that explicit Euler
    with step ``1/L`` samples layer ``l``'s parameters at ``t_l = l/L`` (not ``l - 1``'s)."""
    span = grid[-1] - grid[0]
    tol = 1e3 * jnp.finfo(grid.dtype).eps * span
    j = jnp.searchsorted(grid, t + tol, side="right") - 1
    j = jnp.clip(j, 0, grid.shape[0] - 2)
    if interpolation == "piecewise":
        return j, jnp.zeros((), grid.dtype)
    alpha = jnp.clip((t - grid[j]) / (grid[j + 1] - grid[j]), 0.0, 1.0)
    return j, alpha


def param_at(ensemble: Params, t, grid: Float[Array, " K1"], interpolation: Interpolation = "linear"):
    """The parameter particles at time ``t``: a pytree like ``ensemble`` with leaves ``(M, d, k)``."""
    j, alpha = _segment(jnp.asarray(t, grid.dtype), grid, interpolation)
    if interpolation == "piecewise":
        return jax.tree.map(lambda x: x[j], ensemble)
    return jax.tree.map(lambda x: (1 - alpha) * x[j] + alpha * x[j + 1], ensemble)


def _default_controller(grid, interpolation, rtol, atol):
    # The field has kinks (linear) or jumps (piecewise) at the grid times: step onto them exactly.
    pid = diffrax.PIDController(rtol=rtol, atol=atol)
    if interpolation == "piecewise":
        return diffrax.ClipStepSizeController(pid, jump_ts=grid)
    return diffrax.ClipStepSizeController(pid, step_ts=grid)


class FixedSteps(diffrax.ConstantStepSize):
    """``steps`` equal steps over the solve's interval, as a step-size controller.

    ``stepsize_controller=FixedSteps(steps)`` with an explicit Runge-Kutta ``solver`` (the default ``Tsit5``) and
    the default adjoint runs the limit's solves in :func:`mfattn.rk.solve`'s loop instead of
    ``diffrax.diffeqsolve``: the same steps, stages and dense interpolation as Diffrax's ``ConstantStepSize`` with
    ``dt0 = (t_K - t_0) / steps`` (agreeing to rounding), without the adaptive loop's overhead, and with the
    particles of each stage precomputed one step ahead (several times faster at many particles; see
    :mod:`mfattn.rk`). Other solvers or adjoints get Diffrax's ``ConstantStepSize`` with that ``dt0``. Land the
    steps on the grid times (``steps`` a multiple of ``K``), where the linearly interpolated field has kinks."""

    steps: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"limit.FixedSteps: steps must be a positive integer, got {self.steps!r}.")


class _Solve(eqx.Module):
    """Solver settings shared by the forward and backward solves."""

    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController | None
    dt0: float | None
    max_steps: int = eqx.field(static=True)
    adjoint: diffrax.AbstractAdjoint
    rtol: float
    atol: float
    attention: Attention = eqx.field(static=True, default=SOFTMAX)

    def controller(self, grid, interpolation):
        if self.stepsize_controller is not None:
            return self.stepsize_controller
        return _default_controller(grid, interpolation, self.rtol, self.atol)

    @property
    def fixed(self) -> int | None:
        """The number of steps when the solves run in :func:`mfattn.rk.solve` (see :class:`FixedSteps`)."""
        if (
            isinstance(self.stepsize_controller, FixedSteps)
            and isinstance(self.solver, diffrax.AbstractERK)
            and isinstance(self.adjoint, diffrax.RecursiveCheckpointAdjoint)
        ):
            return self.stepsize_controller.steps
        return None

    def step0(self, t0, t1):
        """``dt0`` for ``diffrax.diffeqsolve`` (``(t1 - t0) / steps`` under :class:`FixedSteps`)."""
        if isinstance(self.stepsize_controller, FixedSteps):
            return (t1 - t0) / self.stepsize_controller.steps
        return self.dt0


def _settings(solver, stepsize_controller, dt0, max_steps, adjoint, rtol, atol, attention=None, fn="limit") -> _Solve:
    spec = as_attention(attention, fn)
    _checks.check_solve(fn, dt0, max_steps, rtol, atol)
    if isinstance(stepsize_controller, FixedSteps) and dt0 is not None:
        raise ValueError(f"{fn}: FixedSteps sets the step itself: pass dt0=None, got dt0 = {dt0!r}.")
    if spec.depth_exponent != 1:
        raise ValueError(
            f"{fn}: the depth limit exists for the residual step 1/L only (depth_exponent = 1), got "
            f"depth_exponent = {spec.depth_exponent}."
        )
    return _Solve(
        solver=diffrax.Tsit5() if solver is None else solver,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        max_steps=max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        rtol=rtol,
        atol=atol,
        attention=spec,
    )


def _prepare(fn, ensemble, tokens, weights, beta, radius, grid, interpolation):
    ensemble, tokens, weights, beta, radius = _checks.prepare(fn, ensemble, tokens, weights, beta, radius)
    if ensemble.depth < 2:
        raise ValueError(f"{fn}: an ensemble needs at least 2 grid times, got leaves {tuple(ensemble.wq.shape)}.")
    if interpolation not in ("linear", "piecewise"):
        raise ValueError(f"{fn}: interpolation must be 'linear' or 'piecewise', got {interpolation!r}.")
    if grid is None:
        grid = uniform_grid(ensemble.depth, tokens.dtype)
    else:
        grid = _checks.check_array(fn, "grid", grid, (ensemble.depth,), "(K+1,) = ensemble grid size").astype(
            tokens.dtype
        )
        # NumPy on a concrete grid: jnp ops inside a jit trace would be staged even on constants
        if not _checks._traced(grid) and not bool(np.all(np.diff(np.asarray(grid)) > 0)):
            raise ValueError(f"{fn}: grid must be strictly increasing.")
    return ensemble, tokens, weights, beta, radius, grid


def _check_ts(fn, ts, dtype, grid):
    return _checks.check_times(fn, ts, grid, dtype)


def _tangent(x, v):
    """``v - <x, v> x`` row-wise: the projection onto the sphere's tangent space at unit ``x``."""
    return v - x * jnp.sum(x * v, axis=-1, keepdims=True)


def _forward_field(theta, x, weights, beta, radius, spec):
    """``F(mu, x, nu)`` for the particles ``theta`` (``F - <x, F> x`` for the normalised residual)."""
    f = velocity(theta, x, x, weights, beta=beta, radius=radius, attention=spec, check=False)
    return _tangent(x, f) if spec.residual == "sphere" else f


def _backward_field(theta, x, p, weights, beta, radius, spec):
    """``-G(pi, x, p; nu)`` for the particles ``theta``.

    For the normalised residual the field is ``v = F - <x, F> x``; its adjoint field is
    ``G(pi(x, q)) - <x, p> F - <x, F> p`` with ``q = p - <x, p> x`` (``F``'s cotangent)."""
    if spec.residual == "sphere":
        f = velocity(theta, x, x, weights, beta=beta, radius=radius, attention=spec, check=False)
        g = adjoint_field(theta, x, _tangent(x, p), weights, beta=beta, radius=radius, attention=spec, check=False)
        dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
        return -(g - dot(x, p) * f - dot(x, f) * p)
    return -adjoint_field(theta, x, p, weights, beta=beta, radius=radius, attention=spec, check=False)


def _forward_vf(t, x, args):
    """``F(mu_t, x, nu_t)``. Everything arrives through ``args`` (``BacksolveAdjoint`` needs a vector field that
    closes over no arrays)."""
    ensemble, weights, beta, radius, grid, interpolation, spec = args
    return _forward_field(param_at(ensemble, t, grid, interpolation), x, weights, beta, radius, spec)


def _backward_vf(t, p, args):
    """``-G(pi_t, x_t, p; nu_t)`` with ``x_t`` read from the forward solve's dense interpolant."""
    ensemble, weights, beta, radius, grid, interpolation, xsol, spec = args
    theta = param_at(ensemble, t, grid, interpolation)
    return _backward_field(theta, xsol.evaluate(t), p, weights, beta, radius, spec)


def _grad_maps(params, xs, ps, weights, beta, radius, spec):
    """``g(theta_j, pi_j)`` for each grid (or layer) time ``j``, mapped over the leading axis; for the
    normalised residual the adjoint in ``pi`` is ``p - <x, p> x``."""

    def one(a):
        theta, x, p = a
        if spec.residual == "sphere":
            p = _tangent(x, p)
        return grad_map(theta, x, p, weights, beta=beta, radius=radius, attention=spec, check=False)

    return jax.lax.map(one, (params, xs, ps))


def _forward_solution(ensemble, tokens, weights, beta, radius, grid, interpolation, s: _Solve, saveat):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_forward_vf),
        s.solver,
        t0=grid[0],
        t1=grid[-1],
        dt0=s.step0(grid[0], grid[-1]),
        y0=tokens,
        args=(ensemble, weights, beta, radius, grid, interpolation, s.attention),
        saveat=saveat,
        stepsize_controller=s.controller(grid, interpolation),
        adjoint=s.adjoint,
        max_steps=s.max_steps,
    )


@eqx.filter_jit
def _forward(ensemble, tokens, weights, beta, radius, grid, interpolation, s, ts):
    if s.fixed is not None:
        xsol = _forward_dense(ensemble, tokens, weights, beta, radius, grid, interpolation, s)
        return jax.vmap(xsol.evaluate)(ts)
    return _forward_solution(ensemble, tokens, weights, beta, radius, grid, interpolation, s, diffrax.SaveAt(ts=ts)).ys


def forward(
    ensemble: Params,
    tokens: Float[Array, "N d"],
    *,
    beta,
    ts,
    weights: Float[Array, " N"] | None = None,
    radius=None,
    grid=None,
    interpolation: Interpolation = "linear",
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
    saveat: diffrax.SaveAt | None = None,
    attention: Attention | str | None = None,
):
    """Solve ``dx/dt = F(mu_t, x, nu_t)`` for all tokens jointly on ``[t_0, t_K]``.

    Args:
        ensemble: :class:`~mfattn.Params` with leaves ``(K + 1, M, d, k)``: ``M`` particles per grid time.
        tokens: ``(N, d)`` initial tokens; weights: ``(N,)`` masses (default uniform).
        beta: inverse temperature; radius: optional projection radius ``R``.
        ts: ``(T,)`` increasing save times in ``[t_0, t_K]``.
        grid: ``(K + 1,)`` increasing grid times (default uniform on ``[0, 1]``).
        interpolation: ``"linear"`` (default) or ``"piecewise"`` (constant on ``[t_j, t_{j+1})``).
        solver: a Diffrax solver (default ``Tsit5()``).
        stepsize_controller: default a PID controller (``rtol``, ``atol``) clipped to step onto the grid
            times, where the field has kinks (linear) or jumps (piecewise). For fixed steps pass
            :class:`FixedSteps` ``(steps)`` (the fast fixed-step loop of :mod:`mfattn.rk`; same numbers as Diffrax
            to rounding) or ``diffrax.ConstantStepSize()`` with ``dt0`` (Diffrax's loop).
        dt0: initial (or constant) step; ``None`` lets an adaptive controller choose.
        max_steps: Diffrax's step budget.
        adjoint: how ``jax.grad`` differentiates through this solve (default
            ``diffrax.RecursiveCheckpointAdjoint()``; ``diffrax.BacksolveAdjoint()`` also works).
        saveat: a ``diffrax.SaveAt`` used instead of ``SaveAt(ts=ts)`` (e.g. ``SaveAt(dense=True)`` or
            ``SaveAt(steps=True)``); the whole ``diffrax.Solution`` is then returned.
        attention: the kernel (:class:`~mfattn.Attention` or a kind string; default softmax). With
            ``residual="sphere"`` the field is ``F - <x, F> x`` (the limit of the normalised residual).
            ``depth_exponent`` must be 1: other residual scalings have no depth limit of this form.

    Returns:
        ``(T, N, d)``: the tokens at the save times (or the ``diffrax.Solution`` when ``saveat`` is given).

    Example::

        ens = mfattn.limit.init_ensemble(key, grid_size=17, particles=256, dim=4, head_dim=4, init="mean_noise")
        xs = mfattn.limit.forward(ens, tokens, beta=1.0, ts=jnp.linspace(0, 1, 9))   # (9, N, 4)
    """
    ensemble, tokens, weights, beta, radius, grid = _prepare(
        "limit.forward", ensemble, tokens, weights, beta, radius, grid, interpolation
    )
    ts = None if saveat is not None else _check_ts("limit.forward", ts, tokens.dtype, grid)
    s = _settings(solver, stepsize_controller, dt0, max_steps, adjoint, rtol, atol, attention, "limit.forward")
    try:
        if saveat is not None:
            return _solve(ensemble, tokens, weights, beta, radius, grid, interpolation, s, saveat)
        return _forward(ensemble, tokens, weights, beta, radius, grid, interpolation, s, ts)
    except Exception as e:  # noqa: BLE001 - only Diffrax's step-budget failure is reworded
        clearer = _checks.solve_failed("limit.forward", e, max_steps)
        if clearer is None:
            raise
        raise clearer from e


@eqx.filter_jit
def _solve(ensemble, tokens, weights, beta, radius, grid, interpolation, s, saveat):
    return _forward_solution(ensemble, tokens, weights, beta, radius, grid, interpolation, s, saveat)


def _backward_solution(ensemble, xsol, terminal, weights, beta, radius, grid, interpolation, s: _Solve, saveat):
    """The adjoint ODE from ``t_K`` back to ``t_0``, reading ``x(t)`` from the dense forward solution ``xsol``."""
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_backward_vf),
        s.solver,
        t0=grid[-1],
        t1=grid[0],
        dt0=None if s.step0(grid[0], grid[-1]) is None else -s.step0(grid[0], grid[-1]),
        y0=terminal,
        args=(ensemble, weights, beta, radius, grid, interpolation, xsol, s.attention),
        saveat=saveat,
        stepsize_controller=s.controller(grid, interpolation),
        max_steps=s.max_steps,
    )


def _forward_dense(ensemble, tokens, weights, beta, radius, grid, interpolation, s: _Solve):
    """The forward solve's dense output: :class:`mfattn.rk.Dense` under :class:`FixedSteps` (the particles of
    each stage carried), else Diffrax's solution (``SaveAt(t1=True, dense=True)``). Both have ``evaluate(t)``
    and ``ys[-1] = x(t_K)``."""
    if s.fixed is None:
        saveat = diffrax.SaveAt(t1=True, dense=True)
        return _forward_solution(ensemble, tokens, weights, beta, radius, grid, interpolation, s, saveat)
    return rk.solve(
        s.solver,
        lambda theta, t, x: _forward_field(theta, x, weights, beta, radius, s.attention),
        lambda t: param_at(ensemble, t, grid, interpolation),
        tokens,
        grid[0],
        grid[-1],
        s.fixed,
    )


def _backward_dense(ensemble, xsol, terminal, weights, beta, radius, grid, interpolation, s: _Solve):
    """The adjoint solve's dense output from ``t_K`` back to ``t_0`` (as :func:`_forward_dense`)."""
    if s.fixed is None:
        saveat = diffrax.SaveAt(t1=True, dense=True)
        return _backward_solution(ensemble, xsol, terminal, weights, beta, radius, grid, interpolation, s, saveat)
    return rk.solve(
        s.solver,
        lambda theta, t, p: _backward_field(theta, xsol.evaluate(t), p, weights, beta, radius, s.attention),
        lambda t: param_at(ensemble, t, grid, interpolation),
        terminal,
        grid[-1],
        grid[0],
        s.fixed,
    )


@eqx.filter_jit
def _forward_backward(ensemble, tokens, weights, targets, loss, beta, radius, grid, interpolation, s, ts):
    if s.fixed is not None:
        value, xsol, psol = _dense_forward_backward(
            ensemble, tokens, weights, targets, loss, beta, radius, grid, interpolation, s
        )
        return value, jax.vmap(xsol.evaluate)(ts), jax.vmap(psol.evaluate)(ts)
    xsol = _forward_solution(
        ensemble, tokens, weights, beta, radius, grid, interpolation, s, diffrax.SaveAt(ts=ts, t1=True, dense=True)
    )
    xs, x1 = xsol.ys[:-1], xsol.ys[-1]
    value = loss(x1, weights, targets)
    terminal = loss.lions(x1, weights, targets)
    saveat = diffrax.SaveAt(ts=ts[::-1])  # decreasing: the solve runs backwards in time
    ps = _backward_solution(ensemble, xsol, terminal, weights, beta, radius, grid, interpolation, s, saveat).ys[::-1]
    return value, xs, ps


def backward(
    ensemble: Params,
    tokens: Float[Array, "N d"],
    terminal_fn,
    *,
    beta,
    ts,
    weights: Float[Array, " N"] | None = None,
    radius=None,
    grid=None,
    interpolation: Interpolation = "linear",
    **solve_kwargs,
):
    """The adjoint ODE ``dp/dt = -G(pi_t, x_t, p_t; nu_t)`` from ``t_K`` back to ``t_0``.

    Args:
        ensemble, tokens, beta, weights, radius, grid, interpolation: as in :func:`forward`.
        terminal_fn: ``x(t_K) (N, d) -> p(t_K) (N, d)``, e.g. ``lambda x: loss.lions(x, weights, targets)``.
            It is a static argument of the compiled solve: pass the same function object on every call (a new
            ``lambda`` each time recompiles), or use :func:`forward_backward` with a loss.
        ts: ``(T,)`` increasing save times.
        solve_kwargs: ``solver``, ``stepsize_controller``, ``dt0``, ``rtol``, ``atol``, ``max_steps``,
            ``attention``.

    Returns:
        ``(xs, ps)``, each ``(T, N, d)``: tokens and rescaled adjoints ``p = (1/m) d ell / d x`` at ``ts``.

    The backward solve reads ``x(t)`` from the forward solve's dense interpolant (Diffrax's
    solver-specific interpolation, accurate to the solver's order) rather than integrating ``x`` backwards
    jointly with ``p``: the attention flow is not reversible in practice (clustering contracts the tokens,
    and the reversed flow amplifies errors), while the dense output costs only the forward steps' stages.
    """
    loss = _TerminalLoss(terminal_fn)
    value, xs, ps = forward_backward(
        ensemble,
        tokens,
        loss,
        beta=beta,
        ts=ts,
        weights=weights,
        radius=radius,
        grid=grid,
        interpolation=interpolation,
        **solve_kwargs,
    )
    del value
    return xs, ps


class _TerminalLoss(Loss):
    fn: object

    def __call__(self, tokens, weights, targets):
        return jnp.zeros((), tokens.dtype)

    def lions(self, tokens, weights, targets):
        return self.fn(tokens)


def forward_backward(
    ensemble: Params,
    tokens: Float[Array, "N d"],
    loss: Loss,
    *,
    beta,
    ts,
    weights: Float[Array, " N"] | None = None,
    targets=None,
    radius=None,
    grid=None,
    interpolation: Interpolation = "linear",
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 4096,
    attention: Attention | str | None = None,
):
    """Forward solve, loss at ``t_K``, then the hand-derived adjoint ODE backwards.

    Returns:
        ``(value, xs, ps)``: the loss ``ell(mu_{t_K})`` and the tokens and rescaled adjoints at ``ts``,
        each ``(T, N, d)``. ``ps[0]`` at ``ts[0] = 0`` is ``(1/m_i) d ell / d x_i(0)``.
    """
    if not isinstance(loss, Loss):
        raise TypeError(f"limit.forward_backward: loss must be an mfattn.losses.Loss, got {type(loss).__name__}.")
    ensemble, tokens, weights, beta, radius, grid = _prepare(
        "limit.forward_backward", ensemble, tokens, weights, beta, radius, grid, interpolation
    )
    ts = _check_ts("limit.forward_backward", ts, tokens.dtype, grid)
    s = _settings(solver, stepsize_controller, dt0, max_steps, None, rtol, atol, attention, "limit.forward_backward")
    targets = loss.check_targets("limit.forward_backward", tokens, targets)
    try:
        return _forward_backward(ensemble, tokens, weights, targets, loss, beta, radius, grid, interpolation, s, ts)
    except Exception as e:  # noqa: BLE001 - only Diffrax's step-budget failure is reworded
        clearer = _checks.solve_failed("limit.forward_backward", e, max_steps)
        if clearer is None:
            raise
        raise clearer from e


@eqx.filter_jit
def _grad_map_on_grid(ensemble, xs, ps, weights, beta, radius, spec=SOFTMAX):
    return _grad_maps(ensemble, xs, ps, weights, beta, radius, spec)


def grad_map_on_grid(
    ensemble: Params,
    xs: Float[Array, "K1 N d"],
    ps: Float[Array, "K1 N d"],
    *,
    beta,
    weights: Float[Array, " N"] | None = None,
    radius=None,
    attention: Attention | str | None = None,
) -> Params:
    """``g(theta^m(t_j), pi_{t_j})`` for every grid time ``t_j`` and particle ``m``: leaves ``(K+1, M, d, k)``.

    ``xs``, ``ps`` are the tokens and adjoints at the grid times (``forward_backward(..., ts=grid)``). This is
    the mean-field gradient that trains particle ``m`` at depth ``t_j`` (docs/spec.md section 5)."""
    ensemble, x0, weights, beta, radius = _checks.prepare(
        "limit.grad_map_on_grid", ensemble, xs[0], weights, beta, radius
    )
    shape = (ensemble.depth, *x0.shape)
    xs = _checks.check_array("limit.grad_map_on_grid", "xs", xs, shape, "(K+1, N, d)").astype(x0.dtype)
    ps = _checks.check_array("limit.grad_map_on_grid", "ps", ps, shape, "(K+1, N, d)").astype(x0.dtype)
    return _grad_map_on_grid(ensemble, xs, ps, weights, beta, radius, as_attention(attention))


def discretize(ensemble: Params, depth: int, *, grid=None, interpolation: Interpolation = "linear") -> Params:
    """The discrete model whose layer ``l`` has as heads the ensemble's particles at ``t_l = l / depth``:
    leaves ``(depth, M, d, k)``. Its forward pass is explicit Euler for :func:`forward` with step ``1/depth``."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"discretize: depth must be a positive integer, got {depth!r}.")
    dtype = ensemble.wq.dtype
    grid = uniform_grid(ensemble.depth, dtype) if grid is None else jnp.asarray(grid, dtype)
    ts = grid[0] + (grid[-1] - grid[0]) * jnp.arange(depth, dtype=dtype) / depth
    return jax.vmap(lambda t: param_at(ensemble, t, grid, interpolation))(ts)


# ------------------------------------------------------------------------------------------------- training


def _dense_forward_backward(ensemble, tokens, weights, targets, loss, beta, radius, grid, interpolation, s):
    """Loss value and the dense forward (x) and backward (p) solutions of one sequence."""
    xsol = _forward_dense(ensemble, tokens, weights, beta, radius, grid, interpolation, s)
    x1 = xsol.ys[-1]
    psol = _backward_dense(
        ensemble, xsol, loss.lions(x1, weights, targets), weights, beta, radius, grid, interpolation, s
    )
    return loss(x1, weights, targets), xsol, psol


def _layer_times(depth, grid):
    return grid[0] + (grid[-1] - grid[0]) * jnp.arange(depth, dtype=grid.dtype) / depth


def batch_grad_map(
    ensemble: Params,
    tokens,
    weights,
    targets,
    loss: Loss,
    *,
    beta,
    radius=None,
    grid=None,
    interpolation: Interpolation = "linear",
    coupled: Params | tuple | None = None,
    **solve_kwargs,
):
    """Batch-mean loss and mean-field gradients of the ensemble and, optionally, of coupled discrete heads.

    Args:
        ensemble: ``(K+1, M, d, k)`` parameter particles on the grid.
        tokens: ``(B, N, d)``; weights: ``(B, N)``; targets: pytree with leading axis ``B``.
        loss: an :class:`~mfattn.losses.Loss`.
        coupled: optional discrete parameters ``(L, H, d, k)`` (paper eq. 23), or a tuple of them (one per
            sweep point, each with its own ``L, H``): head ``h`` of layer ``l`` gets the gradient map
            ``g(theta_{l,h}, pi_{t_l})`` of the *limit's* measure at ``t_l = l / L``.
        solve_kwargs: ``solver``, ``stepsize_controller``, ``dt0``, ``rtol``, ``atol``, ``max_steps``,
            ``attention``.

    Returns:
        ``(value, g_ensemble, g_coupled)``: the batch-mean loss of the limit, ``g(theta^m(t_j), pi_{t_j})``
        averaged over the batch (leaves ``(K+1, M, d, k)``), and the coupled heads' gradient map averaged over
        the batch (leaves ``(L, H, d, k)``; ``None`` without ``coupled``).
    """
    if not isinstance(loss, Loss):
        raise ValueError(f"limit.batch_grad_map: loss must be an mfattn.losses.Loss, got {type(loss).__name__}.")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"limit.batch_grad_map: tokens must have shape (B, N, d), got {tokens.shape}.")
    weights = jnp.asarray(weights)
    if weights.shape != tokens.shape[:2]:
        raise ValueError(
            f"limit.batch_grad_map: weights must have shape (B, N) = {tokens.shape[:2]}, got {weights.shape}."
        )
    ensemble, _, _, beta, radius, grid = _prepare(
        "limit.batch_grad_map", ensemble, tokens[0], weights[0], beta, radius, grid, interpolation
    )
    if coupled is not None:
        for c in _coupled_list(coupled):
            _checks.check_params("limit.batch_grad_map", c)
            if c.wq.shape[2:] != ensemble.wq.shape[2:]:
                raise ValueError(
                    f"limit.batch_grad_map: coupled (d, k) = {c.wq.shape[2:]} differs from the ensemble's "
                    f"{ensemble.wq.shape[2:]}."
                )
        coupled = jax.tree.map(lambda a: a.astype(tokens.dtype), coupled)
    s = _settings(
        solve_kwargs.pop("solver", None),
        solve_kwargs.pop("stepsize_controller", None),
        solve_kwargs.pop("dt0", None),
        solve_kwargs.pop("max_steps", 4096),
        None,
        solve_kwargs.pop("rtol", 1e-6),
        solve_kwargs.pop("atol", 1e-8),
        solve_kwargs.pop("attention", None),
        "limit.batch_grad_map",
    )
    if solve_kwargs:
        raise ValueError(f"limit.batch_grad_map: unknown arguments {sorted(solve_kwargs)}.")
    return _batch_grad_map(
        ensemble,
        tokens.astype(grid.dtype),
        weights.astype(grid.dtype),
        targets,
        loss,
        beta,
        radius,
        grid,
        interpolation,
        s,
        coupled,
    )


@eqx.filter_jit
def _batch_grad_map(ensemble, tokens, weights, targets, loss, beta, radius, grid, interpolation, s, coupled):
    def one(x0, w, y):
        value, xsol, psol = _dense_forward_backward(ensemble, x0, w, y, loss, beta, radius, grid, interpolation, s)
        xs, ps = jax.vmap(xsol.evaluate)(grid), jax.vmap(psol.evaluate)(grid)
        g_ens = _grad_maps(ensemble, xs, ps, w, beta, radius, s.attention)

        def coupled_grad(c):
            tl = _layer_times(c.depth, grid)
            xl, pl = jax.vmap(xsol.evaluate)(tl), jax.vmap(psol.evaluate)(tl)
            return _grad_maps(c, xl, pl, w, beta, radius, s.attention)

        g_c = None if coupled is None else jax.tree.map(coupled_grad, coupled, is_leaf=_is_params)
        return value, g_ens, g_c

    values, g_ens, g_c = jax.vmap(one)(tokens, weights, targets)
    mean = lambda tree: None if tree is None else jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)
    return jnp.mean(values), mean(g_ens), mean(g_c)


def _is_params(node) -> bool:
    return isinstance(node, Params)


def _coupled_list(coupled) -> list:
    return [c for c in jax.tree.leaves(coupled, is_leaf=_is_params) if isinstance(c, Params)]


class LimitState(NamedTuple):
    """Training state of the limit and (optionally) of the coupled discrete parameters."""

    ensemble: Params
    opt_state: object
    coupled: Params | None = None
    coupled_opt_state: object = None


def init_state(
    optimizer: optax.GradientTransformation, ensemble: Params, coupled: Params | tuple | None = None
) -> LimitState:
    """Optimizer states for the ensemble and (if given) the coupled discrete parameters."""
    return LimitState(ensemble, optimizer.init(ensemble), coupled, None if coupled is None else optimizer.init(coupled))


def train_step(
    state: LimitState,
    batch,
    *,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    beta,
    radius=None,
    grid=None,
    interpolation: Interpolation = "linear",
    **solve_kwargs,
) -> tuple[LimitState, dict]:
    """One step of the AdamW flow map for every particle at every grid time (and the coupled heads).

    Each particle ``theta^m(t_j)`` is updated by ``optimizer`` with the batch-mean gradient map
    ``g(theta^m(t_j), pi_{t_j})`` of the limit's own trajectories; coupled heads ``theta_{l,h}`` with
    ``g(theta_{l,h}, pi_{t_l})`` (the same flow map applied to the discrete model's own initialisation,
    paper eq. 23). Pure; wrap it in ``jax.jit``/``eqx.filter_jit`` or call it as is.

    Returns:
        ``(state, metrics)`` with the batch loss (before the update) and the norms of the gradients.
    """
    tokens, weights, targets = batch
    value, g_ens, g_c = batch_grad_map(
        state.ensemble,
        tokens,
        weights,
        targets,
        loss,
        beta=beta,
        radius=radius,
        grid=grid,
        interpolation=interpolation,
        coupled=state.coupled,
        **solve_kwargs,
    )
    updates, opt_state = optimizer.update(g_ens, state.opt_state, state.ensemble)
    ensemble = optax.apply_updates(state.ensemble, updates)
    coupled, coupled_opt_state = state.coupled, state.coupled_opt_state
    metrics = {"loss": value, "grad_norm": _norm(g_ens)}
    if coupled is not None:
        updates, coupled_opt_state = optimizer.update(g_c, coupled_opt_state, coupled)
        coupled = optax.apply_updates(coupled, updates)
        metrics["coupled_grad_norm"] = _norm(g_c)
    return LimitState(ensemble, opt_state, coupled, coupled_opt_state), metrics


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def monte_carlo_error(
    key,
    make_ensemble,
    tokens: Float[Array, "N d"],
    *,
    beta,
    pairs: int = 4,
    ts=None,
    weights=None,
    **forward_kwargs,
) -> dict:
    """Estimate the Monte-Carlo error of the limit's finite ensemble from independent ensembles.

    ``make_ensemble(key) -> Params`` draws one ensemble of ``M`` particles. For ``pairs`` independent pairs
    ``(A, B)``, the trajectories are solved with each; since ``x_A - x_B`` has twice the variance of one
    ensemble's error, the root-mean-square error of one ensemble is estimated by
    ``sqrt(mean |x_A - x_B|^2 / 2)`` (per token, maximum over the save times).

    Returns:
        ``{"rms": float, "per_pair": array (pairs,)}``; ``rms`` shrinks like ``M^{-1/2}``.
    """
    ts = jnp.linspace(0.0, 1.0, 5) if ts is None else ts
    keys = jax.random.split(key, 2 * pairs)

    def solve(k):
        return forward(make_ensemble(k), tokens, beta=beta, ts=ts, weights=weights, **forward_kwargs)

    xs = [solve(k) for k in keys]
    per_pair = []
    for i in range(pairs):
        diff = xs[2 * i] - xs[2 * i + 1]
        per_pair.append(jnp.max(jnp.mean(jnp.sum(diff * diff, axis=-1), axis=-1)) / 2)
    per_pair = jnp.sqrt(jnp.stack(per_pair))
    return {"rms": float(jnp.sqrt(jnp.mean(per_pair**2))), "per_pair": per_pair}
