"""Statistics of a rates run (NumPy only): what is fitted, what is left out and why, and intervals valid at the
seed count used.

* The error of a point is the root mean square over seeds of the per-seed error (Theorem 7 bounds
  ``E_theta[err^2]^(1/2)``). Fits are least squares in log space (:func:`mfattn.fits.fit_rate`) of
  ``err = a/L + b L^-alpha H^-gamma``; when the ``a/L`` term carries under 5% of the model at every point, ``a`` is
  reported as not identified and the pure power law ``b L^-alpha H^-gamma`` (linear in logs) is the fit.
* Points are left out of a fit when saturated (error ``>= R``, or ``L H <= 4``) or Monte-Carlo flagged (the limit's
  own error above ``mc_ratio`` times the point's error); the summary lists them.
* Intervals: with ``>= 16`` seeds the percentile bootstrap over seeds (seeds resampled with replacement, the fit
  redone; 500 resamples); with fewer, the delete-one jackknife over seeds with a Student-t quantile. The method is
  named in each block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats as sps

from ..fits import fit_rate

__all__ = ["matrix", "fit_errors", "control_summary", "theorem_ratio", "sweep_slopes", "interval_method"]

THEOREM = (1.0 / 3.0, 0.5)
POINTWISE = (0.5, 0.5)
BOOT = 500
LEVEL = 0.95


def interval_method(num_seeds: int) -> str:
    if num_seeds >= 16:
        return f"percentile bootstrap over {num_seeds} seeds ({BOOT} resamples)"
    return f"delete-one jackknife over {num_seeds} seeds, Student-t (df {num_seeds - 1})"


def matrix(rows: list[dict], col: str, points: list[tuple], keys=("depth", "heads")):
    """``(P, S)`` values of ``col`` at ``points`` (tuples of the ``keys`` columns) and the sorted seeds."""
    seeds = sorted({int(r["seed"]) for r in rows})
    pos = {s: i for i, s in enumerate(seeds)}
    idx = {tuple(p): i for i, p in enumerate(points)}
    out = np.full((len(points), len(seeds)), np.nan)
    for r in rows:
        k = tuple(int(float(r[c])) for c in keys)
        if k in idx:
            out[idx[k], pos[int(r["seed"])]] = float(r[col])
    return out, seeds


def rms(a, axis=-1):
    return np.sqrt(np.mean(np.asarray(a) ** 2, axis=axis))


def _interval(stat: Callable[[np.ndarray], dict], E: np.ndarray, seed: int = 0) -> dict:
    """Intervals for every entry of ``stat(E)`` (``E``: ``(..., S)``, seeds last) by :func:`interval_method`."""
    S = E.shape[-1]
    names = list(stat(E))
    samples = {k: [] for k in names}
    if S >= 16:
        rng = np.random.default_rng(seed)
        for _ in range(BOOT):
            try:
                v = stat(E[..., rng.integers(0, S, S)])
            except (ValueError, np.linalg.LinAlgError, FloatingPointError):
                continue
            for k in names:
                samples[k].append(v[k])
        lo, hi = (1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100
        return {
            k: [float(np.nanpercentile(s, lo)), float(np.nanpercentile(s, hi))] if s else [None, None]
            for k, s in samples.items()
        }
    if S < 3:
        return {k: [None, None] for k in names}
    full = stat(E)
    for i in range(S):
        v = stat(np.delete(E, i, axis=-1))
        for k in names:
            samples[k].append(v[k])
    t = sps.t.ppf((1 + LEVEL) / 2, S - 1)
    out = {}
    for k, s in samples.items():
        s = np.asarray(s, float)
        se = math.sqrt((S - 1) / S * np.sum((s - s.mean()) ** 2))
        out[k] = [float(full[k] - t * se), float(full[k] + t * se)]
    return out


def _power_fit(L, H, e) -> dict:
    """``log e = log b - alpha log L - gamma log H`` by least squares."""
    A = np.stack([np.ones_like(L), -np.log(L), -np.log(H)], axis=1)
    coef, *_ = np.linalg.lstsq(A, np.log(e), rcond=None)
    res = A @ coef - np.log(e)
    return {
        "a": 0.0,
        "b": float(np.exp(coef[0])),
        "alpha": float(coef[1]),
        "gamma": float(coef[2]),
        "rmse_log": float(np.sqrt(np.mean(res**2))),
    }


def _a_share(fit, L, H) -> float:
    t1 = fit["a"] / L
    return float(np.max(t1 / (t1 + fit["b"] * L ** -fit["alpha"] * H ** -fit["gamma"])))


def _fit(L, H, E, starts=None) -> dict:
    e = rms(E)
    if len(np.unique(L)) < 2 or len(np.unique(H)) < 2 or e.size < 4:
        raise ValueError("too few points to fit")
    two = fit_rate(L, H, e, starts=starts)  # resamples start from the full fit's exponents (warm start)
    if _a_share(two, L, H) < 0.05:
        out = _power_fit(L, H, e)
        out["model"] = "b L^-alpha H^-gamma (a not identified)"
    else:
        out = dict(two, model="a/L + b L^-alpha H^-gamma")
    return out


def _usable(points, E, mc_ratio_per_point, radius, mc_ratio):
    """Which points enter a fit, and why the others do not."""
    keep, left_out = [], []
    e = rms(E)
    for i, (L, H) in enumerate(points):
        why = []
        if L * H <= 4:
            why.append("L H <= 4 (pre-asymptotic)")
        if not e[i] < radius:
            why.append(f"error {e[i]:.3g} >= R (saturated)")
        if mc_ratio_per_point is not None and not mc_ratio_per_point[i] <= mc_ratio:
            why.append(f"Monte-Carlo error {mc_ratio_per_point[i]:.2f} x the error > {mc_ratio} (flagged)")
        if not np.all(np.isfinite(E[i])):
            why.append("missing seeds")
        if why:
            left_out.append({"depth": L, "heads": H, "why": "; ".join(why)})
        else:
            keep.append(i)
    return keep, left_out


def fit_errors(points, E, *, radius: float, mc_ratio: float, mc_ratio_per_point=None) -> dict:
    """The fitted rate of errors ``E`` (``(P, S)``) at ``points``, with intervals and the points left out."""
    keep, left_out = _usable(points, E, mc_ratio_per_point, radius, mc_ratio)
    L = np.array([points[i][0] for i in keep], float)
    H = np.array([points[i][1] for i in keep], float)
    Ek = E[keep]
    out = {
        "seeds": int(E.shape[1]),
        "method": interval_method(E.shape[1]),
        "points_used": len(keep),
        "left_out": left_out,
    }
    try:
        f = _fit(L, H, Ek)
    except ValueError as e:
        return {**out, "error": str(e)}
    warm = [(f["alpha"], f["gamma"])]
    ci = _interval(lambda X: {k: _fit(L, H, X, warm)[k] for k in ("alpha", "gamma")}, Ek)
    fixed = {}
    for name, (al, ga) in (("theorem", THEOREM), ("pointwise", POINTWISE)):
        fixed[name] = fit_rate(L, H, rms(Ek), alpha=al, gamma=ga)["rmse_log"]
    return {
        **out,
        **f,
        "alpha_ci": ci["alpha"],
        "gamma_ci": ci["gamma"],
        "a_identified": f["a"] > 0,
        "rmse_log_fixed": fixed,
    }


def control_summary(points, E, *, radius: float, mc_ratio: float, mc_ratio_per_point, reference_particles: int):
    """The positive control: the step-0 pointwise error must follow ``a/L + b (L H)^-1/2``. Passed when the
    ``gamma`` interval contains 1/2 and the ``(1/2, 1/2)`` model fits better than ``(1/3, 1/2)`` with the
    difference of their rms log-residuals significant (its interval, by the same method, excludes 0)."""
    f = fit_errors(points, E, radius=radius, mc_ratio=mc_ratio, mc_ratio_per_point=mc_ratio_per_point)
    keep, _ = _usable(points, E, mc_ratio_per_point, radius, mc_ratio)
    L = np.array([points[i][0] for i in keep], float)
    H = np.array([points[i][1] for i in keep], float)

    def diff(X):
        e = rms(X)
        th = fit_rate(L, H, e, alpha=THEOREM[0], gamma=THEOREM[1], starts=[THEOREM])["rmse_log"]
        pw = fit_rate(L, H, e, alpha=POINTWISE[0], gamma=POINTWISE[1], starts=[POINTWISE])["rmse_log"]
        return {"d": th - pw}

    if "error" in f:
        none = {"gamma": None, "gamma_ci": [None, None], "alpha": None, "alpha_ci": [None, None], "preferred": None}
        return {"passed": False, "why": f["error"], "reference_particles": reference_particles, **none, "fit": f}
    d = diff(E[keep])["d"]
    d_ci = _interval(diff, E[keep])["d"]
    if d_ci[0] is not None and d_ci[0] > 0:
        preferred = "pointwise (1/2, 1/2)"
    elif d_ci[1] is not None and d_ci[1] < 0:
        preferred = "theorem (1/3, 1/2)"
    else:
        preferred = "neither (difference not significant)"
    g_ci = f["gamma_ci"]
    contains = g_ci[0] is not None and g_ci[0] <= 0.5 <= g_ci[1]
    passed = bool(contains and preferred.startswith("pointwise"))
    if g_ci[0] is None:
        why = ["no gamma interval (fewer than 3 seeds)"]
    else:
        why = [] if contains else [f"gamma interval [{g_ci[0]:.2f}, {g_ci[1]:.2f}] excludes 1/2"]
    if not preferred.startswith("pointwise"):
        why.append(f"preferred model: {preferred}")
    return {
        "passed": passed,
        "why": "; ".join(why) or "gamma interval contains 1/2 and (1/2, 1/2) is preferred",
        "gamma": f["gamma"],
        "gamma_ci": g_ci,
        "alpha": f["alpha"],
        "alpha_ci": f["alpha_ci"],
        "preferred": preferred,
        "rmse_log_difference": d,
        "rmse_log_difference_ci": d_ci,
        "reference_particles": reference_particles,
        "fit": f,
    }


def theorem_ratio(points, E) -> dict:
    """Theorem 7 is an upper bound: ``ratio = err / (1/L + L^-1/3 H^-1/2)`` should stay bounded over the sweep.
    Reports its maximum and the slopes of ``log ratio = c + s_L log L + s_H log H`` (bounded: slopes <= 0)."""
    L = np.array([p[0] for p in points], float)
    H = np.array([p[1] for p in points], float)
    bound = 1 / L + L ** (-1 / 3) * H ** (-1 / 2)

    def stat(X):
        r = rms(X) / bound
        A = np.stack([np.ones_like(L), np.log(L), np.log(H)], axis=1)
        coef, *_ = np.linalg.lstsq(A, np.log(r), rcond=None)
        return {"max": float(np.max(r)), "slope_L": float(coef[1]), "slope_H": float(coef[2])}

    ok = np.all(np.isfinite(E), axis=1)
    L, H, bound, E = L[ok], H[ok], bound[ok], E[ok]
    if len(np.unique(L)) < 2 or len(np.unique(H)) < 2:
        return {"error": "needs 2 depths and 2 head counts"}
    s = stat(E)
    ci = _interval(stat, E)
    return {
        **s,
        "max_ci": ci["max"],
        "slope_L_ci": ci["slope_L"],
        "slope_H_ci": ci["slope_H"],
        "per_point": [{"depth": int(a), "heads": int(b), "ratio": float(v)} for a, b, v in zip(L, H, rms(E) / bound)],
    }


def sweep_slopes(values: list, E: np.ndarray) -> dict:
    """The slope of ``log err`` in ``log values`` (N or d) with its interval; ``E``: ``(V, S)``."""

    def stat(X):
        lx, ly = np.log(np.asarray(values, float)), np.log(rms(X))
        s, c = np.polyfit(lx, ly, 1)
        return {"slope": float(s)}

    if len(values) < 2 or not np.all(np.isfinite(E)):
        return {"error": "needs 2 values with every seed"}
    return {
        "slope": stat(E)["slope"],
        "slope_ci": _interval(stat, E)["slope"],
        "method": interval_method(E.shape[1]),
        "values": list(values),
        "rms_err": [float(v) for v in rms(E)],
    }
