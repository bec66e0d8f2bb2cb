"""The supremum over inputs: projected ascent on a corrected cheap limit with a doubling budget, each round's
maximisers re-evaluated against the full limit, the budget's gain measured on those exact values (numerics only;
NumPy in, NumPy out).

The cheap limit (:func:`.core.surrogate`: explicit Euler with a few hundred of the limit's particles) has a
Monte-Carlo error of the size of the errors being measured, and an ascent on it climbs that error (measured in the
37-minute study: it overstated the exact error at its maximisers 1.65x, and a doubling's gain measured on the
surrogate grew with H, to 43% at H = 64, where the true errors are smallest). So

- every ascent path carries the constant correction ``z_full(x_0) - z_cheap(x_0)`` at its start ``x_0`` (a
  candidate, whose full-limit paths are known): the surrogate is exact at the start, and only the change of the
  cheap limit's error along the path remains;
- the surrogate only proposes: each round's best path end of each (seed, point) is evaluated against the full
  limit (``exact``), and the estimate is the best *exact* value seen. A doubling whose ascent climbed the cheap
  limit's noise finds nothing the full limit confirms and gains nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..metrics import projected_ascent
from .core import RowErrors, surrogate_paths, surrogate_values_and_grads

__all__ = ["SearchResult", "sup_search", "point_layout", "point_gain"]


class SearchResult(NamedTuple):
    """Per seed and point (``(S, P)``): the estimate (the best exact value: over the candidates and the evaluated
    maximisers), its input ``(S, P, N, d)``, the candidate the best path started from, the gain of the last budget
    doubling, whether it was below ``tol``, how many rounds ran, the best exact value over the candidates (where
    the search started), the best exact value over the search's maximisers (``nan`` if none ran), the corrected
    surrogate's value there and the exact evaluation's :class:`.core.RowErrors` there (``nan`` if none ran).
    :func:`point_gain` gives each point's gain (of the rms over seeds, the reported uniform error)."""

    value: np.ndarray
    argmax: np.ndarray
    start: np.ndarray
    gain: np.ndarray
    converged: np.ndarray
    rounds: np.ndarray
    candidate_value: np.ndarray
    search_value: np.ndarray
    surrogate_value: np.ndarray
    search_rows: tuple


def point_layout(discrete: tuple) -> tuple[np.ndarray, np.ndarray]:
    """For the points ``p`` of a tuple of depth groups (leaves ``(S, G, L, H_max, d, k)``, points in group order):
    their group ``(P,)`` and head-count index within it ``(P,)``."""
    sizes = [p.wq.shape[1] for p in discrete]
    group = np.repeat(np.arange(len(sizes)), sizes)
    return group, np.concatenate([np.arange(n) for n in sizes])


def point_gain(value, gain) -> np.ndarray:
    """The last doubling's gain of a point's estimate, the rms over its seeds of their suprema: each seed's
    ``value`` against its value before its own last round, ``value / (1 + gain)``. ``(S, ...) -> (...)``."""
    value, gain = np.asarray(value, float), np.asarray(gain, float)
    before = value / (1.0 + np.nan_to_num(gain))
    return np.asarray(np.sqrt(np.mean(value**2, axis=0) / np.mean(before**2, axis=0)) - 1.0)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    n = a.shape[0]
    return np.concatenate([a, np.repeat(a[-1:], size - n, 0)]) if n < size else a


def sup_search(
    problem,
    sur,
    discrete,
    candidates,
    candidate_paths,
    exact_errs,
    w,
    lmax: int,
    exact,
    *,
    radius: float,
    starts: int,
    steps: int,
    step_size: float,
    rounds: int,
    tol: float,
    chunk: int = 32,
    progress=None,
) -> SearchResult:
    """Round ``r = 0, 1, ...`` climbs from the ``starts 2^r`` worst candidates of each (seed, point) (ranked by the
    exact errors ``exact_errs``, ``(S, P, C)``) for ``steps 2^r`` steps on the corrected surrogate (the cheap limit
    ``sur`` plus, per path, the full limit's paths ``candidate_paths`` (two ``(C, lmax + 1, N, d)``) minus the cheap
    limit's at its start); the round's best path end is evaluated against the full limit by
    ``exact(seed_idx (Q,), point_idx (Q,), xs (Q, N, d)) -> RowErrors`` of ``(Q,)`` arrays. The estimate starts at
    the best exact candidate value and is the best exact value so far. A (seed, point) stops at the first round
    whose gain ``estimate_r / estimate_{r-1} - 1`` is below ``tol``; one that never does reports
    ``converged = False``. Each (seed, point) depends only on its own draws (adding seeds does not change the
    others' searches)."""
    exact_errs = np.asarray(exact_errs)
    num_seeds, num_points, num_cand = exact_errs.shape
    cand = np.asarray(candidates)
    sx, sp = surrogate_paths(problem, sur, jnp.asarray(cand), w)
    off_x = np.asarray(candidate_paths[0]) - np.asarray(sx)  # (C, lmax + 1, N, d): the correction at each start
    off_p = np.asarray(candidate_paths[1]) - np.asarray(sp)
    p_group, p_g = point_layout(discrete)
    best_idx = np.argmax(exact_errs, axis=-1)
    best = np.take_along_axis(exact_errs, best_idx[..., None], -1)[..., 0]
    cand_best = best.copy()
    best_x = cand[best_idx]
    start = best_idx.copy()
    gain = np.full(best.shape, np.nan)
    done = np.zeros(best.shape, bool)
    used = np.zeros(best.shape, int)
    search_value = np.full(best.shape, np.nan)
    sur_value = np.full(best.shape, np.nan)
    search_rows = RowErrors(*(np.full(best.shape, np.nan) for _ in RowErrors._fields))
    order_all = np.argsort(-exact_errs, axis=-1)
    for r in range(rounds):
        n_start, n_steps = min(starts * 2**r, num_cand), steps * 2**r
        live_s, live_p = np.nonzero(~done)  # only the (seed, point) pairs still searching climb again
        order = order_all[live_s, live_p, :n_start]  # (Q, st)
        seed_f, point_f, start_f = np.repeat(live_s, n_start), np.repeat(live_p, n_start), order.reshape(-1)
        vals = np.empty(seed_f.shape, exact_errs.dtype)
        xb = np.empty((seed_f.shape[0], *cand.shape[1:]), cand.dtype)
        for j, params in enumerate(discrete):  # one compiled program per depth group (static shapes)
            mine = np.nonzero(p_group[point_f] == j)[0]
            # Chunks of ``chunk`` paths, the last one padded: one shape, so one compiled ascent per depth group
            # (power-of-two sizes compiled a program per size and round, ~15 s each on the 2-core CPU).
            for lo in range(0, mine.shape[0], chunk):
                sel = mine[lo : lo + chunk]
                n = sel.shape[0]
                s_, g_, c_ = (jnp.asarray(_pad(a, chunk)) for a in (seed_f[sel], p_g[point_f[sel]], start_f[sel]))
                offs = (jnp.asarray(off_x)[c_], jnp.asarray(off_p)[c_])

                def vg(x, params=params, s_=s_, g_=g_, offs=offs):
                    return surrogate_values_and_grads(problem, sur, params, x, w, s_, g_, offs, lmax)

                v, x = projected_ascent(vg, jnp.asarray(cand)[c_], radius=radius, steps=n_steps, step_size=step_size)
                vals[sel] = np.asarray(v)[:n]
                xb[sel] = np.asarray(x)[:n]
        vals = vals.reshape(order.shape)
        xb = xb.reshape(*order.shape, *cand.shape[1:])
        j = np.argmax(vals, axis=-1)
        q = np.arange(len(j))
        x_r, v_r, start_r = xb[q, j], vals[q, j], order[q, j]
        rows = exact(live_s, live_p, x_r)  # the surrogate proposes, the full limit decides
        ex = np.asarray(rows.err)
        better = ~(ex <= search_value[live_s, live_p])  # nan (no round yet) counts as worse
        for full, part in zip(search_rows, rows):
            full[live_s[better], live_p[better]] = np.asarray(part)[better]
        search_value[live_s[better], live_p[better]] = ex[better]
        sur_value[live_s[better], live_p[better]] = v_r[better]
        old = best[live_s, live_p]
        improved = ex > old
        best[live_s, live_p] = np.where(improved, ex, old)
        best_x[live_s, live_p] = np.where(improved[:, None, None], x_r, best_x[live_s, live_p])
        start[live_s, live_p] = np.where(improved, start_r, start[live_s, live_p])
        g = best[live_s, live_p] / old - 1.0
        gain[live_s, live_p] = g
        used[live_s, live_p] = r + 1
        done[live_s, live_p] = g < tol
        if progress is not None:
            progress(1)
        if done.all():
            break
    return SearchResult(best, best_x, start, gain, done, used, cand_best, search_value, sur_value, search_rows)
