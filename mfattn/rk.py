"""Fixed-step explicit Runge-Kutta solves for the limit, with the field's parameters in the loop carry.

The limit's vector fields (:mod:`mfattn.limit`) read the parameter particles ``theta(t)`` (the ensemble's
interpolation at the stage time) and apply an ensemble kernel to them. Inside Diffrax's ``while`` loop that
interpolation is a dynamic slice of the ensemble, which XLA fuses into the kernel's loops; on the 2-core CPU
(float32, ``M = 32768`` particles, ``N = 4``, ``d = k = 2``) one lanes velocity costs 7-10 ms there against
1.4-2.2 ms when its parameters are a loop-carried buffer. This module's loop therefore computes the parameters
of the *next* step's stages at the end of each step and carries them (``lax.scan``): the kernels then read plain
buffers. The stepping is the solver's own Butcher tableau (``solver.tableau``, any ``diffrax.AbstractERK``,
first-same-as-last reused) and its dense output is the solver's own interpolation (``solver.interpolation_cls``),
so a solve agrees with ``diffrax.diffeqsolve(..., stepsize_controller=ConstantStepSize(), dt0=(t1 - t0) / steps)``
to rounding (tested to ``1e-12`` in float64), without its adaptive machinery. It is differentiable
(``jax.grad`` through ``lax.scan``; memory: every step's carry).

Conventions follow Diffrax: the stage increments are ``k_i = h f(t_n + c_i h, y_n + sum_j a_ij k_j)`` with the
signed step ``h = (t1 - t0) / steps`` (negative for a solve backwards in time).
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dense", "solve"]


class Dense(eqx.Module):
    """A fixed-step solve's dense output: step ``n`` runs from ``t0 + n h`` to ``t0 + (n + 1) h``.

    ``ys``: the state at the ``steps + 1`` step times (leading axis); ``ks``: each step's stage increments
    ``(steps, stages, ...)``. ``evaluate(t)`` is the solver's interpolation inside the step holding ``t``."""

    t0: jax.Array
    h: jax.Array
    ys: jax.Array
    ks: jax.Array
    interpolation: Callable = eqx.field(static=True)

    @property
    def steps(self) -> int:
        return self.ks.shape[0]

    def evaluate(self, t):
        """The state at time ``t`` (a scalar): the local interpolant of the step holding it."""
        s = (jnp.asarray(t, self.ys.dtype) - self.t0) / self.h
        n = jnp.clip(jnp.floor(s).astype(jnp.int32), 0, self.steps - 1)
        theta = jnp.clip(s - n, 0.0, 1.0)
        zero, one = jnp.zeros((), self.ys.dtype), jnp.ones((), self.ys.dtype)
        local = self.interpolation(t0=zero, t1=one, y0=self.ys[n], y1=self.ys[n + 1], k=self.ks[n])
        return local.evaluate(theta)


def _stage_times(c) -> tuple[np.ndarray, list[int]]:
    """The distinct stage fractions ``c`` (static, from the tableau) and each stage's index among them."""
    distinct = sorted(set(float(v) for v in c))
    return np.asarray(distinct), [distinct.index(float(v)) for v in c]


def solve(
    solver: diffrax.AbstractERK,
    field: Callable,
    params_at: Callable,
    y0: jax.Array,
    t0,
    t1,
    steps: int,
) -> Dense:
    """Integrate ``dy/dt = field(params_at(t), t, y)`` from ``t0`` to ``t1`` in ``steps`` equal steps.

    Args:
        solver: an explicit Runge-Kutta solver of Diffrax (``diffrax.Tsit5()``, ``Dopri5``, ``Heun``, ...): its
            tableau and interpolation are used.
        field: ``(params, t, y) -> dy/dt`` with ``y`` an array.
        params_at: ``t -> params`` (a pytree): the field's parameters at time ``t``, computed for each step's
            stage times one step ahead and carried (see the module docstring).
        y0: the initial state (an array); t0, t1: the interval (``t1 < t0`` integrates backwards);
        steps: the number of equal steps (static).

    Returns:
        :class:`Dense` with ``ys`` ``(steps + 1, *y0.shape)``.
    """
    if not isinstance(solver, diffrax.AbstractERK):
        raise TypeError(f"rk.solve: solver must be an explicit Runge-Kutta solver, got {type(solver).__name__}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"rk.solve: steps must be a positive integer, got {steps!r}.")
    tab = solver.tableau
    dtype = y0.dtype
    c = np.concatenate([[0.0], np.asarray(tab.c, dtype=np.float64)])
    a = [np.asarray(row, dtype=np.float64) for row in tab.a_lower]
    b = np.asarray(tab.b_sol, dtype=np.float64)
    fsal = bool(tab.fsal)
    # with first-same-as-last, stage 0 of step n + 1 is the last stage of step n: only stages 1.. need parameters
    first = 1 if fsal else 0
    fractions, which = _stage_times(c[first:])
    t0 = jnp.asarray(t0, dtype)
    h = (jnp.asarray(t1, dtype) - t0) / steps

    def stage_params(n):
        start = t0 + n * h
        return tuple(params_at(start + jnp.asarray(f, dtype) * h) for f in fractions)

    def step(carry, n):
        y, f_first, params = carry
        start = t0 + n * h
        nxt = stage_params(n + 1)
        ks = []
        f = f_first if fsal else field(params[which[0]], start, y)
        ks.append(f * h)
        yi = y
        for i in range(1, len(c)):
            coeff = a[i - 1]
            yi = y + sum(jnp.asarray(coeff[j], dtype) * ks[j] for j in range(i))
            f = field(params[which[i - first]], start + jnp.asarray(c[i], dtype) * h, yi)
            ks.append(f * h)
        if tab.ssal:
            y1 = yi
        else:
            y1 = y + sum(jnp.asarray(b[j], dtype) * ks[j] for j in range(len(ks)))
        return (y1, f if fsal else f_first, nxt), (y1, jnp.stack(ks))

    params0 = stage_params(0)
    f0 = field(params_at(t0), t0, y0) if fsal else jnp.zeros_like(y0)
    _, (ys, ks) = jax.lax.scan(step, (y0, f0, params0), jnp.arange(steps))
    ys = jnp.concatenate([y0[None], ys])
    return Dense(t0=t0, h=h, ys=ys, ks=ks, interpolation=solver.interpolation_cls)
