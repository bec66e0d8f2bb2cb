"""Rate fits, bootstrap intervals, summaries and plots for the convergence study (docs/spec.md section 7).

The experiment driver (:mod:`mfattn.rates`) records one row per (sweep point, seed, training step) with the
discrepancies between the discrete transformer (depth ``L``, ``H`` heads) and its mean-field limit. The
paper's Theorem 7 bounds the uniform (sup over inputs) error by

    err <= C (L^{-1} + L^{-1/3} H^{-1/2}),

while a pointwise (fixed input) error is expected to behave like ``L^{-1} + (L H)^{-1/2}``. This module
fits the family

    err(L, H) = a L^{-1} + b L^{-alpha} H^{-gamma},        a, b > 0,

in log space (:func:`fit_rate`), fits one-axis power laws (:func:`power_law`), puts percentile intervals on
any statistic by resampling the seeds (:func:`bootstrap`), and turns the rows into a JSON-able summary
(:func:`summarize`), PNG plots (:func:`plot`) and a printable table (:func:`table`).

Rows are mappings as :class:`csv.DictReader` yields them (every value a string) or already typed; numeric
columns are converted with ``float``/``int``. Everything here is NumPy and matplotlib only, without global
state (figures are :class:`matplotlib.figure.Figure` objects, never pyplot).

Example::

    import csv
    from mfattn import fits

    rows = list(csv.DictReader(open("results.csv")))
    summary = fits.summarize(rows)            # json.dump(summary, f)
    fits.plot(rows, "out/")                   # ["out/err_vs_L.png", ...]
    print(fits.table(rows))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["power_law", "fit_rate", "rate_model", "bootstrap", "summarize", "plot", "table", "THEOREM", "POINTWISE"]

#: Theorem 7's exponents ``(alpha, gamma)`` of ``L^{-alpha} H^{-gamma}``.
THEOREM = (1.0 / 3.0, 0.5)
#: The pointwise expectation ``(L H)^{-1/2}``.
POINTWISE = (0.5, 0.5)

ERROR_KINDS = ("pointwise_err", "uniform_err")
_INT_COLS = ("depth", "heads", "num_tokens", "dim", "seed", "step", "mc_flag")
_FLOAT_COLS = (
    "pointwise_err",
    "uniform_err",
    "uniform_test_set",
    "uniform_ascent",
    "param_gap",
    "mc_err",
    "wall_s",
)
_SKIPPABLE = (ValueError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError)


# ----------------------------------------------------------------------------------------------------------
# Power laws and the two-term rate model


def power_law(x, y) -> dict:
    """Least-squares power law ``y = e^c x^s``, i.e. the line ``log y = c + s log x``.

    Only pairs with ``x > 0`` and ``y > 0`` (and both finite) are used.

    Args:
        x: ``(n,)`` abscissae (e.g. depths ``L``).
        y: ``(n,)`` positive values (e.g. errors).

    Returns:
        ``dict(slope=s, intercept=c, n=number of pairs used)``; ``intercept`` is in natural log.

    Raises:
        ValueError: if ``x`` and ``y`` differ in length, or fewer than 2 distinct positive ``x`` carry a
            positive ``y``.

    Example::

        power_law([1, 2, 4], [1.0, 0.5, 0.25])   # {'slope': -1.0, 'intercept': 0.0, 'n': 3}
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"power_law: x and y must have the same length, got {x.size} and {y.size}.")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if np.unique(x[ok]).size < 2:
        raise ValueError(
            "power_law: need at least 2 distinct positive x values with positive y, "
            f"got {np.unique(x[ok]).size} (from {x.size} pairs)."
        )
    lx, ly = np.log(x[ok]), np.log(y[ok])
    design = np.stack([lx, np.ones_like(lx)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, ly, rcond=None)
    return {"slope": float(slope), "intercept": float(intercept), "n": int(ok.sum())}


def _log_model(p, lL, lH):
    """``log(a/L + b L^-alpha H^-gamma)`` and its Jacobian in ``p = (log a, log b, alpha, gamma)``."""
    t1 = p[0] - lL
    t2 = p[1] - p[2] * lL - p[3] * lH
    logm = np.logaddexp(t1, t2)
    w1 = np.exp(t1 - logm)  # share of the a/L term in the model
    w2 = np.exp(t2 - logm)
    jac = np.stack([w1, w2, -w2 * lL, -w2 * lH], axis=1)
    return logm, jac


def _lm(p0, free, lower, upper, lL, lH, ly, *, max_iter=300):
    """Projected Levenberg-Marquardt on ``0.5 |log model - log y|^2`` with box constraints.

    Marquardt's scaling ``(J^T J + lam diag(J^T J)) delta = -J^T r``; a coordinate at a bound whose
    descent direction points outwards is frozen for that iteration; the trial point is clipped to the box.
    """
    p = np.clip(p0, lower, upper)
    logm, jac = _log_model(p, lL, lH)
    r = logm - ly
    cost = 0.5 * float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        g = jac.T @ r
        act = free.copy()
        act &= ~((p <= lower) & (g > 0))
        act &= ~((p >= upper) & (g < 0))
        if not act.any() or np.max(np.abs(g[act])) < 1e-15:
            break
        J = jac[:, act]
        A = J.T @ J
        d = np.diag(A).copy()
        d = np.maximum(d, 1e-12 * max(d.max(), 1e-300))
        accepted = False
        while lam < 1e12:
            try:
                delta = np.linalg.solve(A + lam * np.diag(d), -g[act])
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            trial = p.copy()
            trial[act] += delta
            trial = np.clip(trial, lower, upper)
            tlogm, tjac = _log_model(trial, lL, lH)
            tr = tlogm - ly
            tcost = 0.5 * float(tr @ tr)
            if tcost <= cost:
                step = np.max(np.abs(trial - p))
                improvement = cost - tcost
                p, logm, jac, r, cost = trial, tlogm, tjac, tr, tcost
                lam = max(lam * 0.3, 1e-12)
                accepted = True
                break
            lam *= 10.0
        if not accepted or step < 1e-13 or improvement <= 1e-16 * cost and step < 1e-9:
            break
    return p, cost


def fit_rate(
    depth,
    heads,
    err,
    *,
    alpha: float | None = None,
    gamma: float | None = None,
    bounds: tuple[float, float] = (0.0, 3.0),
    starts: Iterable[tuple[float, float]] | None = None,
) -> dict:
    """Fit ``err = a L^{-1} + b L^{-alpha} H^{-gamma}`` by least squares in log space.

    Minimises ``sum_i (log(a/L_i + b L_i^{-alpha} H_i^{-gamma}) - log err_i)^2`` over ``log a``, ``log b``
    (so ``a, b > 0``) and the exponents ``alpha, gamma`` in ``bounds``, with a projected, damped
    Gauss-Newton (Levenberg-Marquardt) iteration with the analytic Jacobian

        d log m / d log a = w_1,   d log m / d log b = w_2,
        d log m / d alpha = -w_2 log L,   d log m / d gamma = -w_2 log H,

    where ``w_1 = (a/L)/m`` and ``w_2 = 1 - w_1`` are the two terms' shares of the model ``m``. It is started
    from a grid of exponents (``alpha, gamma`` in ``{0.1, 0.45, 0.8, 1.15, 1.5}``, or ``starts``), each
    with ``a, b`` from the linear least squares of the relative residuals at those exponents, and the best
    end point is kept. Fixing ``alpha`` and/or ``gamma`` fits a given rate: Theorem 7's ``(1/3, 1/2)``
    (:data:`THEOREM`) or the pointwise ``(1/2, 1/2)`` (:data:`POINTWISE`); compare their ``rmse_log``.

    Args:
        depth: ``(n,)`` depths ``L >= 1``.
        heads: ``(n,)`` head counts ``H >= 1``.
        err: ``(n,)`` errors; non-positive or non-finite entries are dropped (the fit is in log space).
        alpha: fix the depth exponent (free if ``None``).
        gamma: fix the heads exponent (free if ``None``).
        bounds: box for the free exponents.
        starts: optional ``(alpha, gamma)`` starting points replacing the default grid (fixed exponents
            override the corresponding coordinate).

    Returns:
        ``dict(a, b, alpha, gamma, rmse_log, n)`` with ``rmse_log = sqrt(mean residual^2)`` (natural log)
        and ``n`` the number of points used.

    Raises:
        ValueError: on mismatched lengths, fewer usable points than free parameters, a free ``alpha``
            with fewer than 2 distinct depths, or a free ``gamma`` with fewer than 2 distinct head counts.

    Example::

        L, H = np.meshgrid([2, 4, 8, 16], [1, 4, 16], indexing="ij")
        e = 0.3 / L + 2.0 * L ** (-1 / 3) * H ** (-1 / 2)
        fit_rate(L.ravel(), H.ravel(), e.ravel())              # alpha ~ 1/3, gamma ~ 1/2
        fit_rate(L.ravel(), H.ravel(), e.ravel(), alpha=0.5, gamma=0.5)["rmse_log"]   # > 0
    """
    L = np.asarray(depth, dtype=float).ravel()
    H = np.asarray(heads, dtype=float).ravel()
    e = np.asarray(err, dtype=float).ravel()
    if not L.size == H.size == e.size:
        raise ValueError(f"fit_rate: depth, heads and err must have equal lengths, got {L.size}, {H.size}, {e.size}.")
    if np.any(~np.isfinite(L) | (L <= 0)) or np.any(~np.isfinite(H) | (H <= 0)):
        raise ValueError("fit_rate: depth and heads must be positive and finite.")
    ok = np.isfinite(e) & (e > 0)
    L, H, e = L[ok], H[ok], e[ok]
    lo_b, hi_b = float(bounds[0]), float(bounds[1])
    if not lo_b < hi_b:
        raise ValueError(f"fit_rate: bounds must satisfy lower < upper, got {bounds}.")
    free = np.array([True, True, alpha is None, gamma is None])
    if L.size < free.sum():
        raise ValueError(f"fit_rate: {L.size} positive errors for {int(free.sum())} free parameters.")
    if alpha is None and np.unique(L).size < 2:
        raise ValueError("fit_rate: a free alpha needs at least 2 distinct depths.")
    if gamma is None and np.unique(H).size < 2:
        raise ValueError("fit_rate: a free gamma needs at least 2 distinct head counts.")
    lL, lH, ly = np.log(L), np.log(H), np.log(e)
    lower = np.array([-60.0, -60.0, lo_b, lo_b])
    upper = np.array([60.0, 60.0, hi_b, hi_b])
    if starts is None:
        grid = np.linspace(0.1, 1.5, 5)
        starts = [(sa, sg) for sa in grid for sg in grid]
    seen = set()
    best_p, best_cost = None, np.inf
    for sa, sg in starts:
        s_alpha = float(alpha) if alpha is not None else float(np.clip(sa, lo_b, hi_b))
        s_gamma = float(gamma) if gamma is not None else float(np.clip(sg, lo_b, hi_b))
        if (s_alpha, s_gamma) in seen:
            continue
        seen.add((s_alpha, s_gamma))
        # a, b from  min sum ((a u + b v) / e - 1)^2  at the starting exponents.
        u, v = 1.0 / L, L**-s_alpha * H**-s_gamma
        design = np.stack([u / e, v / e], axis=1)
        coef, *_ = np.linalg.lstsq(design, np.ones_like(e), rcond=None)
        floor = 1e-3 * float(np.median(e))
        a0, b0 = max(float(coef[0]), floor), max(float(coef[1]), floor)
        p0 = np.array([math.log(a0), math.log(b0), s_alpha, s_gamma])
        p, cost = _lm(p0, free, lower, upper, lL, lH, ly)
        if cost < best_cost:
            best_p, best_cost = p, cost
    if best_p is None:
        raise ValueError("fit_rate: no starting point given.")
    return {
        "a": float(np.exp(best_p[0])),
        "b": float(np.exp(best_p[1])),
        "alpha": float(best_p[2]),
        "gamma": float(best_p[3]),
        "rmse_log": float(np.sqrt(2.0 * best_cost / L.size)),
        "n": int(L.size),
    }


def rate_model(depth, heads, fit: Mapping[str, float]) -> np.ndarray:
    """Evaluate ``a L^{-1} + b L^{-alpha} H^{-gamma}`` for a :func:`fit_rate` result."""
    L = np.asarray(depth, dtype=float)
    H = np.asarray(heads, dtype=float)
    return fit["a"] / L + fit["b"] * L ** -fit["alpha"] * H ** -fit["gamma"]


# ----------------------------------------------------------------------------------------------------------
# Bootstrap over seeds


def _seed_of(row: Mapping[str, Any]) -> int:
    return int(float(row["seed"]))


def bootstrap(
    rows: Iterable[Mapping[str, Any]],
    statistic: Callable,
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile bootstrap over seeds.

    The ``S`` distinct seeds are resampled ``S`` at a time with replacement; all rows of a drawn seed go
    together, and a seed drawn twice contributes its rows twice, relabelled as distinct seeds (the ``j``-th
    draw gets seed ``j``), so statistics that group by seed see it twice as well. The interval is
    ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the resampled statistics.

    Args:
        rows: the rows (each with a ``"seed"`` entry).
        statistic: ``statistic(rows) -> float`` or ``-> dict[str, float]``. A resample on which it raises
            ``ValueError`` (or ``ZeroDivisionError``, ``FloatingPointError``, ``LinAlgError``) is skipped.
        n_boot: number of resamples.
        seed: NumPy generator seed (the resampling is deterministic).
        level: coverage of the interval, in ``(0, 1)``.

    Returns:
        ``dict(estimate, lo, hi, samples, n_boot, n_skipped, n_seeds, level, note)``: ``estimate`` is the
        statistic on all rows; ``lo``, ``hi`` and ``samples`` (a list) have the statistic's structure (a
        float or a dict keyed like the estimate; NaN entries are ignored in the percentiles). With one seed
        no resampling is done: ``lo = hi = estimate``, ``samples`` is empty and ``note`` says so. ``note`` is
        ``None`` when there is nothing to report.

    Raises:
        ValueError: if there are no rows, ``level`` is not in ``(0, 1)``, or the statistic fails on the
            full data.

    Example::

        def mean_err(rs):
            return float(np.mean([float(r["uniform_err"]) for r in rs]))

        bootstrap(rows, mean_err, n_boot=500)["lo"]
    """
    rows = list(rows)
    if not rows:
        raise ValueError("bootstrap: no rows.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}.")
    by_seed: dict[int, list] = {}
    for row in rows:
        by_seed.setdefault(_seed_of(row), []).append(row)
    seeds = sorted(by_seed)
    estimate = statistic(rows)
    is_dict = isinstance(estimate, Mapping)
    keys = list(estimate) if is_dict else None
    out = {
        "estimate": dict(estimate) if is_dict else float(estimate),
        "n_boot": int(n_boot),
        "n_skipped": 0,
        "n_seeds": len(seeds),
        "level": float(level),
        "note": None,
    }
    if len(seeds) < 2:
        out.update(
            lo=out["estimate"],
            hi=out["estimate"],
            samples=[],
            n_boot=0,
            note="only one seed: no resampling, the interval is degenerate (lo = hi = estimate)",
        )
        return out
    rng = np.random.default_rng(seed)
    samples = []
    skipped = 0
    for _ in range(n_boot):
        draw = rng.integers(0, len(seeds), size=len(seeds))
        resample = []
        for j, i in enumerate(draw):
            for row in by_seed[seeds[i]]:
                new = dict(row)
                new["seed"] = str(j) if isinstance(row["seed"], str) else j
                resample.append(new)
        try:
            value = statistic(resample)
        except _SKIPPABLE:
            skipped += 1
            continue
        if is_dict:
            samples.append({k: float(value.get(k, np.nan)) for k in keys})
        else:
            samples.append(float(value))
    qlo, qhi = 100.0 * (1.0 - level) / 2.0, 100.0 * (1.0 + level) / 2.0

    def interval(values):
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return math.nan, math.nan
        return float(np.percentile(values, qlo)), float(np.percentile(values, qhi))

    if is_dict:
        lo, hi = {}, {}
        for k in keys:
            lo[k], hi[k] = interval([s[k] for s in samples])
    else:
        lo, hi = interval(samples)
    notes = []
    if skipped:
        notes.append(f"{skipped} of {n_boot} resamples skipped (statistic failed on a degenerate resample)")
    if not samples:
        notes.append("no resample succeeded: the interval is undefined (NaN)")
    out.update(lo=lo, hi=hi, samples=samples, n_skipped=skipped, note="; ".join(notes) or None)
    return out


# ----------------------------------------------------------------------------------------------------------
# Rows


def _typed(row: Mapping[str, Any]) -> dict:
    """A copy of ``row`` with the numeric columns converted (missing columns are left out)."""
    out = dict(row)
    for k in _INT_COLS:
        if k in out and out[k] not in (None, ""):
            out[k] = int(float(out[k]))
    for k in _FLOAT_COLS:
        if k in out and out[k] not in (None, ""):
            out[k] = float(out[k])
    for k in ("sweep", "optimizer", "uniform_source"):
        if k in out:
            out[k] = str(out[k])
    return out


def _means(rows, keys, value):
    """Mean of ``value`` over the rows sharing ``keys``: ``{key tuple: (mean, min, max, count)}``."""
    acc: dict[tuple, list] = {}
    for r in rows:
        acc.setdefault(tuple(r[k] for k in keys), []).append(float(r[value]))
    return {k: (float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v)) for k, v in sorted(acc.items())}


def _select(rows, **conds):
    return [r for r in rows if all(r.get(k) == v for k, v in conds.items())]


def _clean(x):
    """Make ``x`` strict-JSON-able: NumPy scalars to Python, non-finite floats to ``None``."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# ----------------------------------------------------------------------------------------------------------
# Summary


def _slopes_stat(kind, axis, by):
    """Slopes of ``kind`` (mean over seeds) against ``axis`` for each value of ``by`` (keys ``str(value)``)."""

    def stat(rs):
        m = _means(rs, (by, axis), kind)
        groups: dict = {}
        for (g, x), v in m.items():
            groups.setdefault(g, ([], []))
            groups[g][0].append(x)
            groups[g][1].append(v[0])
        out = {}
        for g, (xs, ys) in groups.items():
            try:
                out[str(g)] = power_law(xs, ys)["slope"]
            except ValueError:
                if len(set(xs)) >= 2:  # enough points, but non-positive values
                    out[str(g)] = math.nan
        return out

    return stat


def _interval(boot, key=None):
    lo = boot["lo"] if key is None else boot["lo"].get(key, math.nan)
    hi = boot["hi"] if key is None else boot["hi"].get(key, math.nan)
    return [lo, hi]


def _boot_info(boot):
    return {k: boot[k] for k in ("n_boot", "n_skipped", "n_seeds", "level", "note")}


def _slopes_block(rows, kind, axis, by, boot_kw):
    stat = _slopes_stat(kind, axis, by)
    if not stat(rows):
        return None
    boot = bootstrap(rows, stat, **boot_kw)
    m = _means(rows, (by, axis), kind)
    entries = []
    for key, slope in boot["estimate"].items():
        xs = [x for (g, x) in m if str(g) == key]
        g_val = next(g for (g, _) in m if str(g) == key)
        entries.append(
            {by: g_val, "slope": slope, "ci": _interval(boot, key), f"{axis}_values": sorted(xs), **_boot_info(boot)}
        )
    return entries


def _rate_block(rows, kind, boot_kw):
    """Free fit with bootstrap intervals, the two fixed fits, and the per-axis slopes for one error kind."""
    block: dict[str, Any] = {}
    pos = [r for r in rows if math.isfinite(r[kind]) and r[kind] > 0]
    m = _means(rows, ("depth", "heads"), kind)
    block["n_points"] = len(m)
    block["n_rows"] = len(rows)
    if not pos:
        block["skipped"] = f"no positive {kind} values"
        return block
    (Ls, Hs), es = zip(*m.keys()), [v[0] for v in m.values()]
    try:
        free = fit_rate(Ls, Hs, es)
    except ValueError as exc:
        block["free"] = {"skipped": str(exc)}
    else:
        warm = [(free["alpha"], free["gamma"]), (0.2, 0.2), (0.2, 1.2), (1.2, 0.2), (1.2, 1.2)]

        def stat(rs):
            mm = _means(rs, ("depth", "heads"), kind)
            (ls, hs), ee = zip(*mm.keys()), [v[0] for v in mm.values()]
            f = fit_rate(ls, hs, ee, starts=warm)
            return {k: f[k] for k in ("a", "b", "alpha", "gamma")}

        boot = bootstrap(rows, stat, **boot_kw)
        if boot["n_seeds"] < 2:  # degenerate interval: at the reported fit (not a refit from warm starts)
            free["ci"] = {k: [free[k], free[k]] for k in ("a", "b", "alpha", "gamma")}
        else:
            free["ci"] = {k: _interval(boot, k) for k in ("a", "b", "alpha", "gamma")}
        free["bootstrap"] = _boot_info(boot)
        block["free"] = free
    for name, (al, ga) in (("theorem", THEOREM), ("pointwise", POINTWISE)):
        try:
            block[name] = fit_rate(Ls, Hs, es, alpha=al, gamma=ga)
        except ValueError as exc:
            block[name] = {"skipped": str(exc)}
    rm = {n: block[n].get("rmse_log", math.inf) for n in ("theorem", "pointwise")}
    if all(math.isfinite(v) for v in rm.values()):
        block["better_fixed"] = min(rm, key=rm.get)
    block["slope_L"] = _slopes_block(rows, kind, "depth", "heads", boot_kw)
    block["slope_H"] = _slopes_block(rows, kind, "heads", "depth", boot_kw)
    return block


def _axis_block(rows, axis, boot_kw):
    """Power laws in ``axis`` (``num_tokens`` or ``dim``) of the mean errors, for one optimizer."""
    block: dict[str, Any] = {"n_rows": len(rows), f"{axis}_values": sorted({r[axis] for r in rows})}
    others = [c for c in ("depth", "heads", "num_tokens", "dim") if c != axis]
    block["fixed"] = {c: sorted({r[c] for r in rows}) for c in others}
    for kind in (*ERROR_KINDS, "param_gap"):
        m = _means(rows, (axis,), kind)
        xs, ys = [k[0] for k in m], [v[0] for v in m.values()]

        def stat(rs, kind=kind):
            mm = _means(rs, (axis,), kind)
            return power_law([k[0] for k in mm], [v[0] for v in mm.values()])["slope"]

        try:
            fit = power_law(xs, ys)
        except ValueError as exc:
            block[kind] = {"skipped": str(exc)}
            continue
        boot = bootstrap(rows, stat, **boot_kw)
        block[kind] = {**fit, "ci": _interval(boot), "mean": dict(zip(map(str, xs), ys)), **_boot_info(boot)}
    return block


def summarize(rows: Iterable[Mapping[str, Any]], *, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """The JSON-able summary of a rates study (strict JSON: non-finite numbers become ``None``).

    For the final step ``K = max step`` (key ``"final"``) and for step 0 (``"initial"``, when recorded and
    ``!= K``), on the sweep ``"LH"`` rows, for each of ``pointwise_err``, ``uniform_err`` and ``param_gap``
    (errors averaged over the seeds at each ``(L, H)``, also within every bootstrap resample):

    - ``free``: :func:`fit_rate` with free exponents (``a, b, alpha, gamma, rmse_log, n``) and ``ci``, the
      bootstrap intervals ``[lo, hi]`` of ``a, b, alpha, gamma`` (seeds resampled, :func:`bootstrap`), and
      ``bootstrap`` (``n_boot, n_skipped, n_seeds, level, note``);
    - ``theorem`` (``alpha = 1/3, gamma = 1/2``) and ``pointwise`` (``alpha = gamma = 1/2``): fits with fixed
      exponents and their ``rmse_log``; ``better_fixed`` names the one with the smaller ``rmse_log``;
    - ``slope_L``: for each ``H``, the log-log slope in ``L`` (``{"heads", "slope", "ci", "depth_values",
      ...}``); ``slope_H``: for each ``L``, the slope in ``H``.

    At the final step, sweep ``"N"`` gives the slope of each error in ``N`` per optimizer (the theorem's
    constant does not depend on ``N``: near 0 is expected) and sweep ``"d"`` the slope in ``d`` per
    optimizer (AdamW against blockwise AdamW): ``{"slope", "intercept", "n", "ci", "mean", ...}``.

    Parts whose rows are absent are left out; a part that cannot be fitted (e.g. ``param_gap = 0`` at
    step 0) holds ``{"skipped": reason}``. The driver uses one optimizer on the ``LH`` grid; should the rows
    mix several, ``final``/``initial`` analyse the first (sorted by name), ``LH_note`` says so and
    ``LH_by_optimizer`` holds all.

    Args:
        rows: the rows of ``results.csv`` (strings, as :class:`csv.DictReader` gives, or typed).
        n_boot, seed, level: passed to :func:`bootstrap`.

    Returns:
        ``{"counts": {"rows", "seeds", "steps", "by_sweep", "points", "uniform_source_final"},
        "mc_flagged", "mc_flagged_final", "mc_err_max", "steps": {"final": K, "initial": 0},
        "final": {"step", "optimizer", "pointwise_err": block, "uniform_err": block, "param_gap": block},
        "initial": {...}, "N": {optimizer: {...}}, "d": {optimizer: {...}}}``, e.g.
        ``summary["final"]["uniform_err"]["free"]["ci"]["alpha"]``.

    Example::

        import csv, json
        rows = list(csv.DictReader(open("results.csv")))
        json.dump(summarize(rows), open("summary.json", "w"), indent=2)
    """
    rows = [_typed(r) for r in rows]
    if not rows:
        raise ValueError("summarize: no rows.")
    boot_kw = {"n_boot": n_boot, "seed": seed, "level": level}
    steps = sorted({r["step"] for r in rows})
    final = steps[-1]
    labels = {"final": final}
    if 0 in steps and final != 0:
        labels["initial"] = 0
    out: dict[str, Any] = {
        "counts": {
            "rows": len(rows),
            "seeds": len({r["seed"] for r in rows}),
            "steps": steps,
            "by_sweep": {s: sum(r["sweep"] == s for r in rows) for s in sorted({r["sweep"] for r in rows})},
            "points": {
                s: len(
                    {
                        (r["optimizer"], r["depth"], r["heads"], r["num_tokens"], r["dim"])
                        for r in rows
                        if r["sweep"] == s
                    }
                )
                for s in sorted({r["sweep"] for r in rows})
            },
            "uniform_source_final": {
                src: sum(r["step"] == final and r.get("uniform_source") == src for r in rows)
                for src in sorted({r.get("uniform_source", "") for r in rows})
            },
        },
        "mc_flagged": sum(int(r.get("mc_flag", 0)) for r in rows),
        "mc_flagged_final": sum(int(r.get("mc_flag", 0)) for r in rows if r["step"] == final),
        "mc_err_max": max(float(r.get("mc_err", 0.0)) for r in rows),
        "steps": labels,
    }
    lh = _select(rows, sweep="LH")
    if lh:
        opts = sorted({r["optimizer"] for r in lh})
        per_opt: dict[str, dict] = {}
        for opt in opts:
            per_opt[opt] = {}
            for label, step in labels.items():
                r_s = _select(lh, optimizer=opt, step=step)
                if r_s:
                    blocks = {k: _rate_block(r_s, k, boot_kw) for k in (*ERROR_KINDS, "param_gap")}
                    per_opt[opt][label] = {"step": step, "optimizer": opt, **blocks}
        out.update(per_opt[opts[0]])
        if len(opts) > 1:
            out["LH_note"] = (
                f"the LH rows mix optimizers {opts}: 'final'/'initial' analyse {opts[0]!r}; "
                "LH_by_optimizer holds each one"
            )
            out["LH_by_optimizer"] = per_opt
    for sweep, axis in (("N", "num_tokens"), ("d", "dim")):
        r_s = _select(rows, sweep=sweep, step=final)
        if r_s:
            out[sweep] = {
                opt: {"step": final, **_axis_block(_select(r_s, optimizer=opt), axis, boot_kw)}
                for opt in sorted({r["optimizer"] for r in r_s})
            }
    return _clean(out)


# ----------------------------------------------------------------------------------------------------------
# Plots and table


def _errorbar(ax, means, label, **kw):
    """Plot ``{x: (mean, min, max, count)}`` with min-max error bars."""
    xs = np.array(sorted(means), dtype=float)
    mid = np.array([means[x][0] for x in sorted(means)])
    lo = np.array([means[x][1] for x in sorted(means)])
    hi = np.array([means[x][2] for x in sorted(means)])
    keep = mid > 0
    if not keep.any():
        return None
    xs, mid, lo, hi = xs[keep], mid[keep], lo[keep], hi[keep]
    yerr = np.stack([mid - np.where(lo > 0, lo, mid), hi - mid])
    return ax.errorbar(xs, mid, yerr=yerr, marker="o", ms=4, capsize=2, label=label, **kw)


def _reference(ax, x, y0, slope, label, style):
    """A reference line ``y0 (x / x_0)^slope`` over ``x``."""
    x = np.asarray(sorted(x), dtype=float)
    if x.size < 2 or not y0 > 0:
        return
    ax.plot(x, y0 * (x / x[0]) ** slope, style, color="0.4", lw=1, label=label)


def _split(rows, outer, inner, kind):
    """``{outer value: {inner value: (mean, min, max, count)}}``."""
    res: dict = {}
    for (o, i), v in _means(rows, (outer, inner), kind).items():
        res.setdefault(o, {})[i] = v
    return res


def _log_axes(ax, xs, xlabel, ylabel):
    """Log-log axes with the x ticks at the data's values (no overlapping minor labels)."""
    from matplotlib.ticker import NullFormatter

    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
    xs = sorted(set(xs))
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot(rows: Iterable[Mapping[str, Any]], outdir) -> list[str]:
    """Plots of the final step's errors (means over seeds, min-max bars) as PNG files in ``outdir``.

    * ``err_vs_L.png``: pointwise and uniform error against ``L`` (one line per ``H``, log-log), the free
      :func:`fit_rate` model dashed, and reference slopes ``-1/3`` (Theorem 7) and ``-1/2`` (pointwise);
    * ``err_vs_H.png``: the same against ``H`` (one line per ``L``), reference slope ``-1/2``;
    * ``param_gap.png``: Lemma 6's parameter gap against ``L`` and ``H``;
    * ``err_vs_N.png`` / ``err_vs_d.png``: the ``"N"`` / ``"d"`` sweeps, one line per optimizer and error.

    Uses :class:`matplotlib.figure.Figure` directly (no pyplot state, no backend change).

    Args:
        rows: the rows of ``results.csv``.
        outdir: directory (created if needed).

    Returns:
        The paths written (figures whose rows are absent are not written).
    """
    from matplotlib.figure import Figure

    rows = [_typed(r) for r in rows]
    os.makedirs(outdir, exist_ok=True)
    if not rows:
        return []
    final = max(r["step"] for r in rows)
    rows = [r for r in rows if r["step"] == final]
    written = []
    lh = _select(rows, sweep="LH")
    if lh:
        opts = sorted({r["optimizer"] for r in lh})
        lh = _select(lh, optimizer=opts[0])  # one optimizer per figure: the first (name-sorted)
        for axis, by, fname in (("depth", "heads", "err_vs_L.png"), ("heads", "depth", "err_vs_H.png")):
            fig = Figure(figsize=(10, 4.2), layout="constrained")
            axes = fig.subplots(1, 2)
            for ax, kind in zip(axes, ERROR_KINDS):
                curves = _split(lh, by, axis, kind)
                m = _means(lh, ("depth", "heads"), kind)
                try:
                    (Ls, Hs), es = zip(*m.keys()), [v[0] for v in m.values()]
                    fit = fit_rate(Ls, Hs, es)
                except ValueError:
                    fit = None
                for i, (g, pts) in enumerate(curves.items()):
                    color = f"C{i % 10}"
                    _errorbar(ax, pts, f"{'H' if by == 'heads' else 'L'}={g}", color=color)
                    if fit is not None and len(pts) > 1:
                        xs = np.geomspace(min(pts), max(pts), 50)
                        L_, H_ = (xs, np.full_like(xs, g)) if axis == "depth" else (np.full_like(xs, g), xs)
                        ax.plot(xs, rate_model(L_, H_, fit), "--", color=color, lw=1)
                if curves:
                    g0 = max(curves) if axis == "depth" else min(curves)
                    pts = curves[g0]
                    x0 = min(pts)
                    if axis == "depth":
                        _reference(ax, list(pts), pts[x0][0], -1 / 3, "slope -1/3 (theorem)", ":")
                        _reference(ax, list(pts), pts[x0][0], -1 / 2, "slope -1/2 (pointwise)", "-.")
                    else:
                        _reference(ax, list(pts), pts[x0][0], -1 / 2, "slope -1/2", ":")
                title = kind.replace("_err", " error")
                if fit is not None:
                    title += f"\nfree fit: alpha={fit['alpha']:.2f}, gamma={fit['gamma']:.2f} (dashed)"
                ax.set_title(title, fontsize=9)
                xs = [x for pts in curves.values() for x in pts]
                _log_axes(ax, xs, "L (depth)" if axis == "depth" else "H (heads)", "error")
            fig.suptitle(f"step {final}, {opts[0]}, mean over seeds (min-max bars)", fontsize=10)
            written.append(_save(fig, os.path.join(outdir, fname)))
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, (axis, by) in zip(axes, (("depth", "heads"), ("heads", "depth"))):
            curves = _split(lh, by, axis, "param_gap")
            for i, (g, pts) in enumerate(curves.items()):
                _errorbar(ax, pts, f"{'H' if by == 'heads' else 'L'}={g}", color=f"C{i % 10}")
            if curves:
                g0 = max(curves) if axis == "depth" else min(curves)
                pts = curves[g0]
                slope = -1 / 3 if axis == "depth" else -1 / 2
                _reference(ax, list(pts), pts[min(pts)][0], slope, f"slope {slope:.2f} (theorem)", ":")
            xs = [x for pts in curves.values() for x in pts]
            _log_axes(ax, xs, "L (depth)" if axis == "depth" else "H (heads)", "max_{l,h} |theta - theta_bar|")
        fig.suptitle(f"parameter gap (Lemma 6), step {final}, {opts[0]}", fontsize=10)
        written.append(_save(fig, os.path.join(outdir, "param_gap.png")))
    for sweep, axis, fname, xlabel in (
        ("N", "num_tokens", "err_vs_N.png", "N (tokens)"),
        ("d", "dim", "err_vs_d.png", "d (width)"),
    ):
        srows = _select(rows, sweep=sweep)
        if not srows:
            continue
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, kind in zip(axes, ERROR_KINDS):
            curves = _split(srows, "optimizer", axis, kind)
            for i, (opt, pts) in enumerate(curves.items()):
                _errorbar(ax, pts, opt, color=f"C{i % 10}")
            xs = [x for pts in curves.values() for x in pts]
            _log_axes(ax, xs, xlabel, kind.replace("_err", " error"))
        fig.suptitle(f"{sweep} sweep, step {final}, mean over seeds (min-max bars)", fontsize=10)
        written.append(_save(fig, os.path.join(outdir, fname)))
    return written


def table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text table of the final step, one line per sweep point (means over seeds).

    Columns: sweep, L, H, N, d, optimizer, seeds, mean pointwise error, mean uniform error, the uniform
    error's source counts (``t`` test set / ``a`` ascent), mean parameter gap, mean Monte-Carlo error of the
    limit, number of Monte-Carlo flags.
    """
    rows = [_typed(r) for r in rows]
    header = (
        f"{'sweep':<5} {'L':>4} {'H':>4} {'N':>5} {'d':>4} {'optimizer':<16} {'seeds':>5} "
        f"{'pointwise':>10} {'uniform':>10} {'source':>9} {'param_gap':>10} {'mc_err':>10} {'flag':>4}"
    )
    lines = [header, "-" * len(header)]
    if not rows:
        return "\n".join(lines)
    final = max(r["step"] for r in rows)
    groups: dict[tuple, list] = {}
    order = {"LH": 0, "N": 1, "d": 2}
    for r in rows:
        if r["step"] == final:
            key = (r["sweep"], r["optimizer"], r["depth"], r["heads"], r["num_tokens"], r["dim"])
            groups.setdefault(key, []).append(r)
    for key in sorted(groups, key=lambda k: (order.get(k[0], 9), k)):
        sweep, opt, L, H, N, d = key
        g = groups[key]

        def mean(col, g=g):
            return float(np.mean([r[col] for r in g]))

        src = f"{sum(r['uniform_source'] == 'test_set' for r in g)}t/{sum(r['uniform_source'] == 'ascent' for r in g)}a"
        lines.append(
            f"{sweep:<5} {L:>4} {H:>4} {N:>5} {d:>4} {opt:<16} {len(g):>5} "
            f"{mean('pointwise_err'):>10.3e} {mean('uniform_err'):>10.3e} {src:>9} "
            f"{mean('param_gap'):>10.3e} {mean('mc_err'):>10.3e} {sum(r['mc_flag'] for r in g):>4}"
        )
    return "\n".join(lines)
