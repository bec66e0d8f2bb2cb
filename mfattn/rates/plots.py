"""Figures of a rates run (matplotlib ``Figure`` objects, never pyplot's global state). Every error is the root
mean square over seeds; hollow markers are points left out of the fits (saturated or Monte-Carlo flagged, named
in the legend); fitted models are dashed and named in the legend with their exponents."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..fits import rate_model
from . import stats

__all__ = ["plot_all"]


def _axes(ax, xs, xlabel, ylabel):
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
    xs = sorted(set(xs))
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=6)


def _fit_label(fb):
    if "alpha" not in fb:
        return None
    return rf"fit: $\alpha={fb['alpha']:.2f}$, $\gamma={fb['gamma']:.2f}$"


def _model(fb, L, H):
    second = fb["b"] * L ** -fb["alpha"] * H ** -fb["gamma"]
    if "c" in fb:
        second = second * np.sqrt(1 + fb["c"] / L)
    if fb.get("a", 0) <= 0:
        return second
    if fb.get("model") == stats.QUADRATURE:
        return np.sqrt((fb["a"] / L) ** 2 + second**2)
    return rate_model(L, H, fb)


def _panel(ax, pts, E, left_out, fb, x_axis: str, title: str, ylabel: str):
    """One panel: error against ``L`` (a line per ``H``) or against ``H`` (a line per ``L``)."""
    e = stats.rms(E)
    out = {(d["depth"], d["heads"]) for d in left_out}
    by, other = (1, 0) if x_axis == "L" else (0, 1)
    groups = sorted({p[by] for p in pts})
    labelled_out = False
    for gi, g in enumerate(groups):
        idx = [i for i, p in enumerate(pts) if p[by] == g]
        xs = np.array([pts[i][other] for i in idx], float)
        ys = e[idx]
        (line,) = ax.plot(xs, ys, "-", lw=1, label=f"${'H' if x_axis == 'L' else 'L'}={g}$")
        for i, x, y in zip(idx, xs, ys):
            hollow = tuple(pts[i]) in out
            ax.plot(
                [x],
                [y],
                "o",
                ms=4,
                color=line.get_color(),
                mfc="none" if hollow else line.get_color(),
                label=None if (not hollow or labelled_out) else "left out of the fit",
            )
            labelled_out |= hollow
        if "alpha" in fb:
            L = xs if x_axis == "L" else np.full_like(xs, g)
            H = np.full_like(xs, g) if x_axis == "L" else xs
            ax.plot(
                xs, _model(fb, L, H), "--", lw=0.8, color=line.get_color(), label=_fit_label(fb) if gi == 0 else None
            )
    ax.set_title(title, fontsize=8)
    _axes(ax, [p[other] for p in pts], f"${x_axis}$", ylabel)


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_all(cfg, rows: dict, summary: dict, out_dir: str) -> list[str]:
    """Write the run's PNG files into ``out_dir``; return their paths."""
    paths = []
    res = [r for r in rows["results"] if r["sweep"] == "LH"]
    pts = [tuple(p) for p in cfg.points]
    pc = summary.get("positive_control", {})
    fits = summary["fits"]
    for x_axis in ("L", "H"):
        ncol = (2 if rows["control"] else 0) + (2 if res else 0)
        if ncol == 0:
            continue
        fig = Figure(figsize=(4.2 * ncol, 3.4), layout="constrained")
        axs = np.atleast_1d(fig.subplots(1, ncol))
        col = 0
        if rows["control"]:
            cpts = [(L, H) for L in cfg.control_depths for H in cfg.control_heads]
            verdict = "passed" if pc.get("passed") else "FAILED"
            E, _ = stats.matrix(rows["control"], "fluct_err", cpts)
            _panel(
                axs[0],
                cpts,
                E,
                pc.get("fit", {}).get("left_out", []),
                pc.get("fit", {}),
                x_axis,
                f"step 0 control ({verdict}): fluctuation",
                "discrete vs Euler limit, rms over seeds",
            )
            E, _ = stats.matrix(rows["control"], "pointwise_err", cpts)
            tot = pc.get("total", {})
            _panel(axs[1], cpts, E, tot.get("left_out", []), tot, x_axis, "step 0: total error", "pointwise error")
            eu = pc.get("euler", {})
            if x_axis == "L" and "err" in eu:
                axs[1].plot(eu["depths"], eu["err"], "k:", lw=1, label=f"Euler term, order {eu['order']:.2f}")
                axs[1].legend(fontsize=6)
            col = 2
        if res:
            for kind, ylabel in (("pointwise", "pointwise error"), ("uniform", r"uniform error $\sup_x$")):
                E, _ = stats.matrix(res, f"{kind}_err", pts)
                _panel(
                    axs[col],
                    pts,
                    E,
                    fits[kind].get("left_out", []),
                    fits[kind],
                    x_axis,
                    f"step {cfg.steps}: {kind}",
                    ylabel,
                )
                col += 1
        paths.append(_save(fig, os.path.join(out_dir, f"err_vs_{x_axis}.png")))
    if res:
        fig = Figure(figsize=(4, 3.4))
        ax = fig.subplots()
        E, _ = stats.matrix(res, "param_gap", pts)
        _panel(
            ax,
            pts,
            E,
            [],
            fits["param_gap"],
            "L",
            "Lemma 6's parameter gap",
            r"$\max_{l,h}\,|\theta_{l,h}-\bar\theta_{l,h}|$",
        )
        paths.append(_save(fig, os.path.join(out_dir, "param_gap.png")))
        tr = summary.get("theorem_ratio", {})
        if "per_point" in tr:
            fig = Figure(figsize=(4, 3.4))
            ax = fig.subplots()
            for H in sorted({p["heads"] for p in tr["per_point"]}):
                pp = [p for p in tr["per_point"] if p["heads"] == H]
                ax.plot([p["depth"] for p in pp], [p["ratio"] for p in pp], "o-", ms=3, label=f"$H={H}$")
            ax.set_title(r"uniform error $/\,(L^{-1}+L^{-1/3}H^{-1/2})$", fontsize=8)
            _axes(ax, [p["depth"] for p in tr["per_point"]], "$L$", "ratio")
            paths.append(_save(fig, os.path.join(out_dir, "theorem_ratio.png")))
    tr_rows = [r for r in rows["training"] if r["sweep"] == "LH"]
    if tr_rows:
        fig = Figure(figsize=(4, 3.4))
        ax = fig.subplots()
        steps = [int(r["step"]) for r in tr_rows]
        ax.plot(steps, [float(r["limit_loss"]) for r in tr_rows], label="limit")
        ax.plot(steps, [float(r["discrete_loss"]) for r in tr_rows], label="discrete (mean over points, seeds)")
        ax.set(yscale="log", xlabel="training step", ylabel="batch loss")
        ax.legend(fontsize=6)
        paths.append(_save(fig, os.path.join(out_dir, "training.png")))
    for sweep, col, sym in (("N", "num_tokens", "N"), ("d", "dim", "d")):
        sub = [r for r in rows["results"] if r["sweep"] == sweep]
        if not sub:
            continue
        fig = Figure(figsize=(4, 3.4))
        ax = fig.subplots()
        marked = False
        for key, b in fits.get(sweep, {}).items():
            if b.get("rms_err"):
                slope = f"slope {b['slope']:.2f}" if "slope" in b else "no slope"
                (line,) = ax.plot(b["values"], b["rms_err"], "o-", ms=3, label=f"{key}: {slope}")
                ci = b.get("rms_err_ci")
                if ci and all(c[0] is not None for c in ci):  # each value's interval over seeds
                    lo = [max(0.0, e - c[0]) for e, c in zip(b["rms_err"], ci)]
                    hi = [max(0.0, c[1] - e) for e, c in zip(b["rms_err"], ci)]
                    ax.errorbar(b["values"], b["rms_err"], yerr=[lo, hi], fmt="none", color=line.get_color(),
                                capsize=2, lw=0.8)  # fmt: skip
                out = [i for i, v in enumerate(b["values"]) if any(lo["value"] == v for lo in b["left_out"])]
                if out:  # Monte-Carlo flagged or saturated: left out of the slope
                    lab = None if marked else "x: left out (MC-flagged or saturated)"
                    ax.plot([b["values"][i] for i in out], [b["rms_err"][i] for i in out], "x", ms=8,
                            color=line.get_color(), label=lab)  # fmt: skip
                    marked = True
        _axes(ax, [int(r[col]) for r in sub], f"${sym}$", "error, rms over seeds")
        ax.legend(fontsize=5)  # many lines: smaller than _axes' legend
        paths.append(_save(fig, os.path.join(out_dir, f"err_vs_{sym}.png")))
    return paths
