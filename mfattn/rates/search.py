"""The supremum over inputs: projected ascent on a cheap limit with a doubling budget, maximisers re-evaluated
against the full limit by the caller (numerics only; NumPy in, NumPy out)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..metrics import projected_ascent
from .core import surrogate_values, surrogate_values_and_grads

__all__ = ["SearchResult", "sup_search"]


class SearchResult(NamedTuple):
    """Per seed and point (``(S, P)``): the surrogate's best value, its input ``(S, P, N, d)``, the candidate the
    best path started from, the gain of the last budget doubling, whether it was below ``tol``, and how many
    rounds the point used."""

    value: np.ndarray
    argmax: np.ndarray
    start: np.ndarray
    gain: np.ndarray
    converged: np.ndarray
    rounds: np.ndarray
    candidate_value: np.ndarray


def sup_search(
    problem,
    sur,
    discrete,
    candidates,
    exact_errs,
    w,
    lmax: int,
    *,
    radius: float,
    starts: int,
    steps: int,
    step_size: float,
    rounds: int,
    tol: float,
    chunk: int = 256,
    progress=None,
) -> SearchResult:
    """Round ``r = 0, 1, ...`` climbs from the ``starts 2^r`` worst candidates of each (seed, point) (ranked by the
    exact errors ``exact_errs``, ``(S, P, C)``) for ``steps 2^r`` steps on the surrogate ``sur``; the estimate is the
    best surrogate value so far (the candidates' included). A (seed, point) stops at the first round whose gain
    ``estimate_r / estimate_{r-1} - 1`` is below ``tol`` and keeps that round's estimate; one that never does keeps
    the last round's and reports ``converged = False``. Each (seed, point) depends only on its own draws."""
    num_seeds, num_points, num_cand = exact_errs.shape
    cand = np.asarray(candidates)
    sur_cand = np.asarray(surrogate_values(problem, sur, discrete, candidates, w, lmax))  # (S, P, C)
    best_idx = np.argmax(sur_cand, axis=-1)
    best = np.take_along_axis(sur_cand, best_idx[..., None], -1)[..., 0]
    best_x = cand[best_idx]
    start = best_idx.copy()
    value, arg, st_out = best.copy(), best_x.copy(), start.copy()
    gain = np.full(best.shape, np.nan)
    done = np.zeros(best.shape, bool)
    used = np.zeros(best.shape, int)
    order_all = np.argsort(-np.asarray(exact_errs), axis=-1)
    for r in range(rounds):
        n_start, n_steps = min(starts * 2**r, num_cand), steps * 2**r
        live_s, live_p = np.nonzero(~done)  # only the (seed, point) pairs still searching climb again
        order = order_all[live_s, live_p, :n_start]  # (Q, st)
        rows = np.repeat(live_s, n_start)
        idx = np.repeat(live_p, n_start)
        x0 = cand[order.reshape(-1)]
        vals, xb = [], []
        for lo in range(0, x0.shape[0], chunk):  # bounded memory; the last chunk padded to one compiled shape
            sl = slice(lo, lo + chunk)
            n = x0[sl].shape[0]
            pad = lambda a: np.concatenate([a, np.repeat(a[-1:], chunk - n, 0)]) if n < chunk else a  # noqa: E731, B023
            r_, i_, z = jnp.asarray(pad(rows[sl])), jnp.asarray(pad(idx[sl])), jnp.asarray(pad(x0[sl]))

            def vg(x, r_=r_, i_=i_):
                return surrogate_values_and_grads(problem, sur, discrete, x, w, r_, i_, lmax)

            v, x = projected_ascent(vg, z, radius=radius, steps=n_steps, step_size=step_size)
            vals.append(np.asarray(v)[:n])
            xb.append(np.asarray(x)[:n])
        vals = np.concatenate(vals).reshape(order.shape)
        xb = np.concatenate(xb).reshape(*order.shape, *cand.shape[1:])
        j = np.argmax(vals, axis=-1)
        rmax = np.take_along_axis(vals, j[:, None], -1)[:, 0]
        old = best[live_s, live_p]
        improved = rmax > old
        new = np.where(improved, rmax, old)
        g = new / old - 1.0
        best_x[live_s, live_p] = np.where(improved[:, None, None], xb[np.arange(len(j)), j], best_x[live_s, live_p])
        start[live_s, live_p] = np.where(improved, order[np.arange(len(j)), j], start[live_s, live_p])
        best[live_s, live_p] = new
        value[live_s, live_p] = new
        arg[live_s, live_p] = best_x[live_s, live_p]
        st_out[live_s, live_p] = start[live_s, live_p]
        gain[live_s, live_p] = g
        used[live_s, live_p] = r + 1
        done[live_s, live_p] = g < tol
        if progress is not None:
            progress(1)
        if done.all():
            break
    return SearchResult(value, arg, st_out, gain, done, used, sur_cand.max(axis=-1))
