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
  limit's noise finds nothing the full limit confirms and gains nothing;
- optionally pooled over a seed's points (``exact_seed``; ``search_pool``): each round's maximisers are evaluated
  at *every* point of their seed, so a peak one (L, H) found counts for the others (one limit solve per maximiser
  serves them all). Seeds are never pooled: each seed's rows depend only on its draws, so the seeds stay
  independent (the seed bootstrap's assumption) and adding seeds changes no earlier seed's rows.

Measured on the default run (``benchmarks/search_budget.py``, one run, 2026-12-07): against the best value any of six
searches found (rms over seeds, point by point), the budget before 2026-12-07 (fixed step 0.1 R, 1 x 2, 2 rounds)
reached 0.53-0.82, the monotone ascent from 1 x 8 at 0.25 R 0.72-0.94 over 3 rounds and 0.72-0.96 over 4 (the
default; its last doubling gains at most 5.8%), one round of 4 x 64 0.77-0.99; every row at every row's maximiser
(other seeds' too) 0.93-1.00: the peaks are largely shared between seeds, and longer climbs find them. The
reported uniform errors are lower bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..metrics import projected_ascent
from .core import RowErrors, surrogate_paths, surrogate_values_and_grads

__all__ = ["SearchResult", "sup_search", "point_layout", "point_gain", "pad_rows"]


class SearchResult(NamedTuple):
    """Per seed and point (``(S, P)``): the estimate (the best exact value: over the candidates and the evaluated
    maximisers), its input ``(S, P, N, d)``, the candidate the best path started from, the gain of the last budget
    doubling, whether it was below ``tol``, how many rounds it climbed in, the best exact value over the candidates
    (where the search started), the best exact value over the search's maximisers (``nan`` if none ran), the
    corrected surrogate's value there (``nan`` where that maximiser is another point's), the exact evaluation's
    :class:`.core.RowErrors` there (``nan`` if none ran), and whether that maximiser is another point's (pooled).
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
    pooled: np.ndarray


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


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with its last entry repeated up to ``size`` entries: every call of a chunked program has one shape."""
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
    exact_seed=None,
    pool: bool = False,
    rule: str = "fixed",
    seed_rows=None,
) -> SearchResult:
    """Round ``r = 0, 1, ...`` climbs from the ``starts 2^r`` worst candidates of each (seed, point) (ranked by the
    exact errors ``exact_errs``, ``(S, P, C)``) for ``steps 2^r`` steps on the corrected surrogate (the cheap limit
    ``sur`` plus, per path, the full limit's paths ``candidate_paths`` (two ``(C, lmax + 1, N, d)``) minus the cheap
    limit's at its start; :func:`mfattn.metrics.projected_ascent` with ``step_size`` and ``rule``); the round's best
    path end is evaluated against the full limit by
    ``exact(seed_idx (Q,), point_idx (Q,), xs (Q, N, d)) -> RowErrors`` of ``(Q,)`` arrays. The estimate starts at
    the best exact candidate value and is the best exact value so far. A (seed, point) stops at the first round
    whose gain ``estimate_r / estimate_{r-1} - 1`` is below ``tol``; one that never does reports
    ``converged = False``. Each (seed, point) depends only on its own draws (adding seeds does not change the
    others' searches).

    With ``pool`` and ``exact_seed(seed_idx (Q,), xs (Q, N, d)) -> RowErrors`` of ``(Q, P)`` arrays (the errors of
    every point of seed ``seed_idx[q]`` at ``xs[q]``), the round's maximisers are pooled over their seed's points: every
    row of a seed that climbed takes the best exact value over all of that seed's maximisers so far, its gain is
    measured on that, and a row that had stopped climbs again when the pool raised it by ``tol`` or more. Each
    seed's rows then depend only on that seed's draws.

    ``seed_rows`` ``(S,)``: the row of ``discrete`` (and the seed index handed to ``exact``/``exact_seed``) of each
    seed of ``exact_errs`` (default: ``arange(S)``), so that a subset of the trained draws (the pilots, or the
    reported seeds) is searched with the programs compiled for all of them."""
    if pool and exact_seed is None:
        raise ValueError("rates.search.sup_search: pool needs exact_seed (every point of a seed at an input).")
    exact_errs = np.asarray(exact_errs)
    num_seeds, num_points, num_cand = exact_errs.shape
    rows_of = np.arange(num_seeds) if seed_rows is None else np.asarray(seed_rows)
    if rows_of.shape != (num_seeds,):
        raise ValueError(f"rates.search.sup_search: seed_rows must have shape ({num_seeds},), got {rows_of.shape}.")
    cand = np.asarray(candidates)
    # The cheap limit's paths at every candidate, in chunks of ``chunk`` (one compiled shape whatever the count).
    sx, sp = [], []
    for lo in range(0, num_cand, chunk):
        n = min(chunk, num_cand - lo)
        a, b = surrogate_paths(problem, sur, jnp.asarray(pad_rows(cand[lo : lo + n], chunk)), w)
        sx.append(np.asarray(a)[:n])
        sp.append(np.asarray(b)[:n])
    sx, sp = np.concatenate(sx), np.concatenate(sp)
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
    pooled = np.zeros(best.shape, bool)
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
                s_, g_, c_ = (
                    jnp.asarray(pad_rows(a, chunk)) for a in (rows_of[seed_f[sel]], p_g[point_f[sel]], start_f[sel])
                )
                offs = (jnp.asarray(off_x)[c_], jnp.asarray(off_p)[c_])
                real = jnp.asarray(n)  # the chunk's real paths: the padding copies after their batch are not run

                def vg(x, params=params, s_=s_, g_=g_, offs=offs, real=real):
                    return surrogate_values_and_grads(problem, sur, params, x, w, s_, g_, offs, lmax, count=real)

                v, x = projected_ascent(
                    vg, jnp.asarray(cand)[c_], radius=radius, steps=n_steps, step_size=step_size, rule=rule
                )
                vals[sel] = np.asarray(v)[:n]
                xb[sel] = np.asarray(x)[:n]
        vals = vals.reshape(order.shape)
        xb = xb.reshape(*order.shape, *cand.shape[1:])
        j = np.argmax(vals, axis=-1)
        q = np.arange(len(j))
        x_r, v_r, start_r = xb[q, j], vals[q, j], order[q, j]
        if not pool:
            rows = exact(rows_of[live_s], live_p, x_r)  # the surrogate proposes, the full limit decides
            # Each maximiser is offered to its own row only.
            to_s, to_p, src = live_s, live_p, np.arange(len(live_s))
            parts = [np.asarray(a) for a in rows]
        else:
            rows = exact_seed(rows_of[live_s], x_r)  # (Q, P): each maximiser at every point of its seed
            # Each maximiser is offered to every row of its seed, its own row first (it wins ties).
            own = np.zeros((len(live_s), num_points), bool)
            own[np.arange(len(live_s)), live_p] = True
            qq, pp = np.nonzero(np.ones((len(live_s), num_points), bool))
            ranked = np.lexsort((~own[qq, pp], pp, live_s[qq]))
            qq, pp = qq[ranked], pp[ranked]
            to_s, to_p, src = live_s[qq], pp, qq
            parts = [np.asarray(a)[qq, pp] for a in rows]
        if not pool:
            rows_s, rows_p = live_s, live_p
        else:  # every row of a seed that climbed
            rows_s, rows_p = np.nonzero(np.isin(np.arange(num_seeds), live_s)[:, None] & np.ones(num_points, bool))
        old = best[rows_s, rows_p].copy()
        for i in range(len(to_s)):  # in order: a later offer replaces an earlier one only when strictly better
            s_, p_, j_ = to_s[i], to_p[i], src[i]
            ex = parts[0][i]
            if ex > search_value[s_, p_] or np.isnan(search_value[s_, p_]):
                for full, part in zip(search_rows, parts):
                    full[s_, p_] = part[i]
                search_value[s_, p_] = ex
                mine = not pool or live_p[j_] == p_
                sur_value[s_, p_] = v_r[j_] if mine else np.nan
                pooled[s_, p_] = not mine
            if ex > best[s_, p_]:
                best[s_, p_] = ex
                best_x[s_, p_] = x_r[j_]
                start[s_, p_] = start_r[j_]
        g = best[rows_s, rows_p] / old - 1.0
        climbed = np.zeros(best.shape, bool)
        climbed[live_s, live_p] = True
        # A row that climbed reports this doubling's gain; one that sat (pooled only) keeps the larger of its own
        # last doubling's gain and what the pool added, so pooling never makes a gain look smaller.
        idle = ~climbed[rows_s, rows_p]
        gain[rows_s, rows_p] = np.where(idle, np.fmax(gain[rows_s, rows_p], g), g)
        used[live_s, live_p] = r + 1
        done[rows_s, rows_p] = gain[rows_s, rows_p] < tol
        if progress is not None:
            progress(1)
        if done.all():
            break
    return SearchResult(best, best_x, start, gain, done, used, cand_best, search_value, sur_value, search_rows, pooled)
