"""The main experiment, ``mfattn rates``: how fast does the trained discrete transformer approach its mean-field
limit, pointwise and uniformly over inputs (the paper's Lemma 6 and Theorem 7; docs/spec.md section 7)?

Layers: :mod:`.config` (settings, validated), :mod:`.core` and :mod:`.search` (numerics: pure, jitted),
:mod:`.driver` (phases and draws), :mod:`.io` (the run folder's files), :mod:`.stats` (fits and intervals),
:mod:`.plots` (figures). :func:`run` ties them together; :func:`report` rebuilds the summary, table and plots of an
existing run folder without computing anything.

Example::

    from mfattn import rates

    cfg = rates.load_config("studies/rates.toml")     # or rates.RatesConfig(seeds=32, ...).validate()
    summary = rates.run(cfg, "runs/study")             # rerun to resume; summary.json, CSVs and plots there
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from . import driver, io, search, stats
from .config import EXECUTION_ONLY, OPTIMIZERS, QUICK, TASKS, RatesConfig, load_config, print_config

__all__ = [
    "RatesConfig",
    "QUICK",
    "TASKS",
    "OPTIMIZERS",
    "EXECUTION_ONLY",
    "load_config",
    "print_config",
    "run",
    "report",
    "RUN_RECORD",
    "check_folder",
    "summarize",
    "work_units",
]

check_folder = io.check_folder


def work_units(cfg: RatesConfig) -> dict:
    """Relative cost of each phase in units of one limit solve of the trained ensemble (for an honest ETA)."""
    per_solve = cfg.particles * max(cfg.solver_steps, 1) * (cfg.grid_size - 1)
    control = cfg.control_inputs * cfg.control_particles * max(16, 2 * cfg.solver_steps) / per_solve
    # ... and its discrete models: one unit per 16 (seed, point) models of an input (a rough ETA weight)
    control += cfg.control_inputs * cfg.control_seeds * len(cfg.control_depths) * len(cfg.control_heads) / 16
    out = {"control": control if cfg.control else 0.0, "groups": []}
    for g in driver.groups(cfg):
        P = len(g.points)
        sur = cfg.search_particles * g.lmax / (12 * per_solve)  # Euler layers against Tsit5 stages, x3 for the grad
        search = [
            cfg.seeds * P * min(cfg.ascent_starts * 2**r, 5 * cfg.candidates) * cfg.ascent_steps * 2**r * sur
            for r in range(cfg.search_rounds)
        ]
        scale = (g.num_tokens / cfg.num_tokens) ** 2 * (g.dim / cfg.dim)
        rows = cfg.seeds * P  # exact rows of the search: at most one per (seed, point) and round
        pil = cfg.search_pilots / cfg.seeds  # the pilots' search, as the seeds' per draw; + a candidate per maximiser
        inputs = cfg.test_inputs + 5 * cfg.candidates + cfg.search_pilots * P
        out["groups"].append(
            {
                "train": 3 * cfg.batch_size * scale,
                "eval": scale,
                "search": [s * scale for s in search],
                "pilots": [s * pil * scale for s in search],
                "total": scale * (3 * cfg.batch_size * cfg.steps + inputs + rows * (1 + pil) * cfg.search_rounds)
                + sum(search) * (1 + pil) * scale,
            }
        )
    return out


def _group_keys(cfg, group, seed):
    return [
        tuple(str(v) for v in (group.sweep, group.optimizer, L, H, group.num_tokens, group.dim, seed, cfg.steps))
        for L, H in group.points
    ]


def run(
    cfg: RatesConfig,
    out_dir: str,
    *,
    progress: Callable[[str, float], None] | None = None,
    log: Callable[[str], None] | None = None,
    compile_ahead: bool = True,
) -> dict:
    """Run (or resume) the experiment into ``out_dir``; return the summary (also written to ``summary.json``).

    ``compile_ahead``: compile each group's programs on a second thread while the control and the earlier phases
    run (:func:`.driver.prepare`; execution only, the same numbers).

    ``progress(phase, units)`` is called as work completes (units: :func:`work_units`). Rows already in the
    folder are kept; missing ones are computed (adding seeds to a finished run extends it). ``precision =
    "float64"`` needs JAX's 64-bit mode switched on by the caller (``JAX_ENABLE_X64=1``; the CLI does it):
    a library call does not flip global state."""
    cfg.validate()
    if cfg.precision == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "rates.run: precision = 'float64' needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 or call "
            "jax.config.update('jax_enable_x64', True) first (`mfattn rates` does)."
        )
    folder = io.folder(cfg, out_dir).open()  # checks, lock, config.json, results.csv repaired
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(1, thread_name_prefix="mfattn-compile") if compile_ahead else None
    try:
        tabs = {
            name: io.Table(os.path.join(out_dir, f"{name}.csv"), spec)
            for name, spec in (("control", io.CONTROL), ("training", io.TRAINING))
        }
        messages = list(folder.messages) + [
            f"rates: {k}.csv: dropped {t.dropped} incomplete row(s); recomputed" for k, t in tabs.items() if t.dropped
        ]
        if log is not None:
            for m in messages:
                log(m)
        diag_path = os.path.join(out_dir, "diagnostics.json")
        diagnostics = json.load(open(diag_path)) if os.path.exists(diag_path) else {}
        units = work_units(cfg)
        seeds = list(range(cfg.seeds))
        tick = progress or (lambda phase, n: None)
        write = lambda row: folder.append(io.fmt_row(row))  # noqa: E731
        todo = [
            (gi, group, [s for s in seeds if any(k not in folder.done for k in _group_keys(cfg, group, s))])
            for gi, group in enumerate(driver.groups(cfg))
        ]
        # Every group's programs start compiling now, on the second thread, while the control runs.
        prepared = {
            gi: driver.prepare(cfg, group, missing, pool) for gi, group, missing in todo if missing and pool is not None
        }
        if cfg.control:
            missing = [
                s
                for s in range(cfg.control_seeds)
                if any(
                    (str(L), str(H), str(s)) not in tabs["control"].done
                    for L in cfg.control_depths
                    for H in cfg.control_heads
                )
            ]
            if missing:
                per = units["control"] / cfg.control_inputs
                tc = time.perf_counter()
                driver.run_control(cfg, missing, tabs["control"].write, lambda n: tick("control", n * per))
                diagnostics["control"] = {"timings_s": {"positive control": time.perf_counter() - tc}}
            else:
                tick("control", units["control"])
        for gi, group, missing in todo:
            gu = units["groups"][gi]
            if not missing:
                tick("group", gu["total"])
                continue
            rounds = {"search": iter(gu["search"]), "pilots": iter(gu["pilots"])}

            def group_tick(phase, n, gu=gu, rounds=rounds, group=group):
                if phase == "train":
                    tick(f"{group.sweep} train", gu["train"] * n)
                elif phase == "eval":
                    tick(f"{group.sweep} evaluate", gu["eval"] * n)
                else:  # a search round: the pilots' or the seeds'
                    tick(f"{group.sweep} {phase}", next(rounds[phase], 0.0))

            d = driver.run_group(
                cfg, group, missing, write, tabs["training"].write, group_tick, prepared=prepared.pop(gi, None)
            )
            key = f"{group.sweep}/{group.optimizer}/{group.num_tokens}/{group.dim}"
            # An extension's rows are new seeds: their counts add to those of the rows already there.
            counts = d.setdefault("worst_origin_counts", {})
            for f, c in diagnostics.get(key, {}).get("worst_origin_counts", {}).items():
                counts[f] = counts.get(f, 0) + c
            diagnostics[key] = d
            tmp = diag_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(diagnostics, f, indent=2)
            os.replace(tmp, diag_path)
        rows = {"results": folder.rows(), **{k: t.rows for k, t in tabs.items()}}
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for t in locals().get("tabs", {}).values():
            t.close()
        folder.close()
    tf = time.perf_counter()
    summary = summarize(cfg, rows, diagnostics)
    summary["timings_s"] = {k: v.get("timings_s", {}) for k, v in diagnostics.items()}
    summary["timings_s"]["fits"] = {"summary and fits": time.perf_counter() - tf}
    summary.update(_environment(), elapsed_s_this_invocation=time.perf_counter() - t0, messages=messages)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=2)
    from . import plots

    summary["plots"] = plots.plot_all(cfg, rows, summary, out_dir)
    summary["table"] = table(cfg, rows["results"], summary)
    return summary


#: Keys of ``summary.json`` that record the run itself rather than its rows (:func:`report` keeps them).
RUN_RECORD = ("versions", "device", "elapsed_s_this_invocation", "messages")


def report(out_dir: str) -> dict:
    """The summary, table and plots of an existing run folder, recomputed from its files (no numerics)."""
    with open(os.path.join(out_dir, "config.json")) as f:
        values = json.load(f)
    cfg = load_config(overrides=values)
    rows = {
        name: io.Table(os.path.join(out_dir, f"{name}.csv"), spec).rows
        for name, spec in (("control", io.CONTROL), ("training", io.TRAINING))
    }
    rows["results"] = io.folder(cfg, out_dir).rows()
    diag_path = os.path.join(out_dir, "diagnostics.json")
    diagnostics = json.load(open(diag_path)) if os.path.exists(diag_path) else {}
    summary = summarize(cfg, rows, diagnostics)
    summary["timings_s"] = {k: v.get("timings_s", {}) for k, v in diagnostics.items()}
    # What only the run itself knew (its versions, device, wall time, the fits' time, its messages) is kept from
    # the summary it wrote, where there is one.
    path = os.path.join(out_dir, "summary.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):  # none, or unreadable (a run cut while writing it): rebuilt without the record
        old = None
    if isinstance(old, dict):
        for key in RUN_RECORD:
            if key in old:
                summary[key] = old[key]
        if "fits" in old.get("timings_s", {}):
            summary["timings_s"]["fits"] = old["timings_s"]["fits"]
    with open(path, "w") as f:
        json.dump(_jsonable(summary), f, indent=2)
    from . import plots

    summary["plots"] = plots.plot_all(cfg, rows, summary, out_dir)
    summary["table"] = table(cfg, rows["results"], summary)
    return summary


def _surrogate_over_exact(rows) -> list:
    """The corrected surrogate's value over the exact one at each row's best search maximiser, where that
    maximiser is the row's own (a pooled one was climbed on another row's objective: its value is ``nan``)."""
    out = [float(r["surrogate_value"]) / float(r["uniform_search"]) for r in rows]
    return [v for v in out if np.isfinite(v)]


def _points_rms(rows, col, points, keys=("depth", "heads")):
    E, _ = stats.matrix(rows, col, points, keys)
    return E


def summarize(cfg: RatesConfig, rows: dict, diagnostics: dict) -> dict:
    """The run's summary from its rows (see the README for every key)."""
    res = [r for r in rows["results"] if r["sweep"] == "LH"]
    pts = [tuple(p) for p in cfg.points]
    out: dict = {"config": io.identity(cfg) | {"seeds": cfg.seeds, "control_seeds": cfg.control_seeds}}
    # ---- positive control
    rows = rows | {"control": [r for r in rows["control"] if int(r["seed"]) < cfg.control_seeds]}
    if cfg.control and rows["control"]:
        cpts = [(L, H) for L in cfg.control_depths for H in cfg.control_heads]
        E, _ = stats.matrix(rows["control"], "pointwise_err", cpts)
        E_f, _ = stats.matrix(rows["control"], "fluct_err", cpts)
        col = lambda c: stats.matrix(rows["control"], c, cpts)[0][:, 0]  # noqa: E731  (the same for every seed)
        mc, fmc, eul = col("pointwise_mc"), col("fluct_mc"), col("euler_err")
        out["positive_control"] = stats.control_summary(
            cpts,
            E,
            E_fluct=E_f,
            euler=eul,
            radius=cfg.radius,
            mc_ratio=cfg.mc_ratio,
            mc_ratio_per_point=mc / stats.rms(E),
            fluct_mc_ratio_per_point=fmc / stats.rms(E_f),
            reference_particles=cfg.control_particles,
        )
        out["positive_control"]["per_point"] = [
            {
                "depth": L,
                "heads": H,
                "rms_err": float(e),
                "mc": float(m),
                "sqrt_LH_err": float(e * math.sqrt(L * H)),
                "rms_fluct": float(f),
                "fluct_mc": float(fm),
                "sqrt_LH_fluct": float(f * math.sqrt(L * H)),
                "euler_err": float(u),
            }
            for (L, H), e, m, f, fm, u in zip(cpts, stats.rms(E), mc, stats.rms(E_f), fmc, eul)
        ]
    else:
        out["positive_control"] = {"passed": None, "why": "control = false"}
    lh = diagnostics.get(f"LH/{cfg.optimizer}/{cfg.num_tokens}/{cfg.dim}", {})
    train_rows = [r for r in rows["training"] if r["sweep"] == "LH"]
    signs = [(float(r["limit_sign_fraction"]), float(r["discrete_sign_fraction"])) for r in train_rows]
    out["training"] = {
        "steps": cfg.steps,
        "steps_recorded": len(train_rows),
        "sign_fraction": {
            "limit": float(np.mean([a for a, _ in signs])) if signs else None,
            "discrete": float(np.mean([b for _, b in signs])) if signs else None,
        },
        "depth_spread": lh.get("depth_spread"),
        "translation_share": lh.get("translation_share"),
        "rms_displacement": lh.get("rms_displacement"),
        "loss": {
            "limit": [float(r["limit_loss"]) for r in train_rows],
            "discrete": [float(r["discrete_loss"]) for r in train_rows],
        },
        "p_norm_mean": float(np.mean([float(r["p_norm"]) for r in res])) if res else None,
    }
    if not res:  # the run stopped before its evaluation (or has not reached it yet)
        out["note"] = "no trained-model rows in this folder: the run stopped before evaluating the trained models"
        out["monte_carlo"] = {"particles": cfg.particles, "replicas": cfg.replicas, "estimate": None,
                              "max_ratio": None, "flagged": [], "threshold": cfg.mc_ratio}  # fmt: skip
        out["sup_search"] = {"final_gain": None, "converged": None, "tol": cfg.search_tol}
        out["fits"], out["theorem_ratio"] = {}, {}
        return out
    # ---- errors at the final step
    E_pw = _points_rms(res, "pointwise_err", pts)
    E_un = _points_rms(res, "uniform_err", pts)
    mc_pw = _points_rms(res, "pointwise_mc", pts)
    mc_un = _points_rms(res, "uniform_mc", pts)
    ratio_pw = np.nanmax(mc_pw, axis=1) / stats.rms(E_pw)
    ratio_un = stats.rms(mc_un) / stats.rms(E_un)
    fits = {
        "pointwise": stats.fit_errors(pts, E_pw, radius=cfg.radius, mc_ratio=cfg.mc_ratio, mc_ratio_per_point=ratio_pw),
        "uniform": stats.fit_errors(pts, E_un, radius=cfg.radius, mc_ratio=cfg.mc_ratio, mc_ratio_per_point=ratio_un),
        "pointwise_extrapolated": stats.fit_errors(
            pts, _points_rms(res, "pointwise_err_inf", pts), radius=cfg.radius, mc_ratio=math.inf
        ),
        "param_gap": stats.fit_errors(pts, _points_rms(res, "param_gap", pts), radius=math.inf, mc_ratio=math.inf),
    }
    # The fluctuation part (against the Euler limit of each depth): no a/L term, the theorem's second term alone.
    E_fpw, E_fun = _points_rms(res, "pointwise_fluct", pts), _points_rms(res, "uniform_fluct", pts)
    fmc_pw = np.nanmax(_points_rms(res, "pointwise_fluct_mc", pts), axis=1)
    for name, Ef in (("pointwise_fluctuation", E_fpw), ("uniform_fluctuation", E_fun)):
        fits[name] = stats.fit_errors(
            pts, Ef, radius=cfg.radius, mc_ratio=cfg.mc_ratio, mc_ratio_per_point=fmc_pw / stats.rms(Ef), model="power"
        )
    E_eul, depths = _points_rms(res, "pointwise_euler", pts), sorted({L for L, _ in pts})
    fits["euler"] = stats.euler_order(
        depths, [np.nanmean(E_eul[[i for i, p in enumerate(pts) if p[0] == L]]) for L in depths]
    )
    flagged = [
        {"depth": L, "heads": H, "pointwise_ratio": float(a), "uniform_ratio": float(b)}
        for (L, H), a, b in zip(pts, ratio_pw, ratio_un)
        if a > cfg.mc_ratio or b > cfg.mc_ratio
    ]
    used_pw = [
        i
        for i, p in enumerate(pts)
        if not any(lo["depth"] == p[0] and lo["heads"] == p[1] for lo in fits["pointwise"]["left_out"])
    ]
    used_un = [
        i
        for i, p in enumerate(pts)
        if not any(lo["depth"] == p[0] and lo["heads"] == p[1] for lo in fits["uniform"]["left_out"])
    ]
    fitted = [ratio_pw[i] for i in used_pw] + [ratio_un[i] for i in used_un]
    out["monte_carlo"] = {
        "particles": cfg.particles,
        "replicas": cfg.replicas,
        "method": "batch means over replicas",
        "estimate": {
            "pointwise_max": float(np.nanmax(mc_pw)) if mc_pw.size else None,
            "uniform_rms_max": float(np.nanmax(stats.rms(mc_un))) if mc_un.size else None,
        },
        "max_ratio": float(max(fitted)) if fitted else None,
        "max_ratio_all_points": float(np.nanmax(np.concatenate([ratio_pw, ratio_un]))) if pts else None,
        "flagged": flagged,
        "threshold": cfg.mc_ratio,
        "per_point": [
            {
                "depth": L,
                "heads": H,
                "pointwise_rms": float(e),
                "pointwise_extrapolated_rms": float(x),
                "pointwise_mc": float(m),
            }
            for (L, H), e, x, m in zip(
                pts, stats.rms(E_pw), stats.rms(_points_rms(res, "pointwise_err_inf", pts)), np.nanmax(mc_pw, 1)
            )
        ],
    }
    gains = [float(r["search_gain"]) for r in res]
    fam: dict = {}
    for r in res:
        fam[r["worst_family"]] = fam.get(r["worst_family"], 0) + 1
    origin: dict = {}  # through the pilots' paths: the family each row's climb began in
    for k, v in diagnostics.items():
        for f, c in (v.get("worst_origin_counts", {}) if k.startswith("LH/") and isinstance(v, dict) else {}).items():
            origin[f] = origin.get(f, 0) + c
    # Each point's estimate is the rms over seeds of their suprema: its last doubling's gain is the convergence test.
    point_gains = [
        float(search.point_gain(*(np.asarray([float(r[k]) for r in rs]) for k in ("uniform_err", "search_gain"))))
        for rs in ([r for r in res if (int(r["depth"]), int(r["heads"])) == pt] for pt in pts)
        if rs
    ]
    out["sup_search"] = {
        "final_gain": max(point_gains) if point_gains else None,
        "converged": bool(max(point_gains) < cfg.search_tol) if point_gains else None,
        "criterion": "per point: the last doubling's gain of the rms over seeds of their suprema, each the best value "
        "re-evaluated against the full limit (the cheap limit only proposes)"
        + (", each round's maximisers pooled over their seed's points" if cfg.search_pool else ""),
        "pooled": bool(cfg.search_pool),
        "point_gains": [{"depth": L, "heads": H, "gain": g} for (L, H), g in zip(pts, point_gains)],
        "row_gain_max": max(gains) if gains else None,
        "rows_converged": sum(int(r["search_converged"]) for r in res),
        "tol": cfg.search_tol,
        "rows_from_search": sum(r["uniform_source"] in ("search", "pool") for r in res),
        "rows_from_pool": sum(r["uniform_source"] == "pool" for r in res),
        "pilots": cfg.search_pilots,
        "rows_from_pilots": sum(r["uniform_source"] == driver.PILOT for r in res),
        "rows_starting_at_pilots": fam.get(driver.PILOT, 0),
        "pilot_final_gain": max(
            (g for k, v in diagnostics.items() if isinstance(v, dict) for g in v.get("pilot_point_gains", [])),
            default=None,
        ),
        "rows": len(res),
        "worst_family_counts": fam,
        # Only when every row's origin was recorded (a folder extended from one older than this count has not).
        "worst_origin_counts": origin if sum(origin.values()) == len(res) and res else None,
        "worst_mean_token_norm": float(np.mean([float(r["worst_norm"]) for r in res])) if res else None,
        "worst_mean_diameter": float(np.mean([float(r["worst_diameter"]) for r in res])) if res else None,
        "surrogate_over_exact": float(np.median(own)) if (own := _surrogate_over_exact(res)) else None,
    }
    out["fits"] = fits
    out["theorem_ratio"] = stats.theorem_ratio(pts, E_un) if res else {}
    # ---- N and d sweeps
    for sweep, col in (("N", "num_tokens"), ("d", "dim")):
        vals = cfg.tokens_sweep if sweep == "N" else cfg.dims_sweep
        if not vals:
            continue
        block = {}
        for opt in (cfg.optimizer,) if sweep == "N" else OPTIMIZERS:
            for L, H in map(tuple, cfg.sweep_points):
                sub = [
                    r
                    for r in rows["results"]
                    if r["sweep"] == sweep and r["optimizer"] == opt and int(r["depth"]) == L and int(r["heads"]) == H
                ]
                at = [(v,) for v in vals]
                mat = lambda c: stats.matrix(sub, c, at, keys=(col,))[0]  # noqa: E731, B023
                E_pw, E_un = mat("pointwise_err"), mat("uniform_err")
                ratios = {
                    "pointwise_err": np.nanmax(mat("pointwise_mc"), axis=1) / stats.rms(E_pw),
                    "uniform_err": stats.rms(mat("uniform_mc")) / stats.rms(E_un),
                }
                gains = [float(search.point_gain(u, g)) for u, g in zip(E_un, mat("search_gain"))]
                for kind, E in (("pointwise_err", E_pw), ("uniform_err", E_un)):
                    b = stats.sweep_slopes(list(vals), E, ratios[kind], cfg.mc_ratio, cfg.radius)
                    if kind == "uniform_err":
                        b["search_gain"] = gains
                    block[f"{opt} L={L} H={H} {kind}"] = b
        if sweep == "d":  # paired: the same draws and data under both optimizers
            for L, H in map(tuple, cfg.sweep_points):
                for kind in ("pointwise_err", "uniform_err"):
                    E_ab = [
                        stats.matrix(
                            [r for r in rows["results"] if r["sweep"] == "d" and r["optimizer"] == o
                             and (int(r["depth"]), int(r["heads"])) == (L, H)],
                            kind, [(v,) for v in vals], keys=(col,),
                        )[0]
                        for o in OPTIMIZERS
                    ]  # fmt: skip
                    block[f"{OPTIMIZERS[1]} / {OPTIMIZERS[0]} L={L} H={H} {kind}"] = stats.paired_ratio(
                        list(vals), *E_ab
                    )
        fits[sweep] = block
    # The sweeps' searches: their own convergence (``final_gain`` above is the (L, H) grid's).
    sweep_gains = [
        g
        for sweep in ("N", "d")
        for b in fits.get(sweep, {}).values()
        for g in b.get("search_gain", [])
        if g is not None and math.isfinite(g)
    ]
    out["sup_search"]["sweeps_final_gain"] = max(sweep_gains) if sweep_gains else None
    out["sup_search"]["sweeps_converged"] = bool(max(sweep_gains) < cfg.search_tol) if sweep_gains else None
    return out


def _environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("mfattn", "jax", "jaxlib", "optax", "diffrax", "equinox", "numpy", "scipy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "device": {
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _ci(block, name):
    v, ci = block.get(name), block.get(f"{name}_ci")
    if v is None:
        return "n/a"
    if ci and None not in ci:
        return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{v:.2f}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def table(cfg: RatesConfig, rows: list, summary: dict) -> str:
    """The printed report: the control's verdict first, then one line per point (rms over seeds), then the fits."""
    lines = []
    pc = summary.get("positive_control", {})
    if pc.get("passed") is not None:
        verdict = "PASSED" if pc["passed"] else "FAILED"
        lines.append(
            f"positive control (step 0, reference limit M = {pc.get('reference_particles')}): {verdict} — "
            f"gamma = {_ci(pc, 'gamma')}, alpha = {_ci(pc, 'alpha')}, preferred: {pc.get('preferred')}"
            f" ({pc.get('why')})"
        )
        tot, eu = pc.get("total", {}), pc.get("euler", {})
        if "alpha" in tot:
            lines.append(
                f"  (fluctuation part, against the Euler limit of each depth); total error, {tot['model']}: "
                f"alpha = {_ci(tot, 'alpha')}, gamma = {_ci(tot, 'gamma')}; Euler term order "
                f"{_num(eu.get('order'))} (local {', '.join(f'{v:.2f}' for v in eu.get('local_orders', []))})"
            )
        if not pc["passed"]:
            lines.append("  the control failed: the numbers below are not a measurement of the theorem's rate.")
    hdr = (
        f"{'sweep':<6}{'opt':<16}{'L':>4}{'H':>4}{'N':>4}{'d':>4}{'seeds':>6}{'pointwise':>11}{'  x/p':>13}"
        f"{'uniform':>11}{'search':>8}{'mc/err':>8}{'gap':>10}  flag"
    )
    lines += [hdr, "-" * len(hdr)]
    groups: dict = {}
    for r in rows:
        groups.setdefault(
            (r["sweep"], r["optimizer"], int(r["depth"]), int(r["heads"]), int(r["num_tokens"]), int(r["dim"])), []
        ).append(r)
    for (sw, opt, L, H, n, d), rs in groups.items():
        f = lambda c: np.array([float(r[c]) for r in rs])  # noqa: E731, B023
        pw, un = stats.rms(f("pointwise_err")), stats.rms(f("uniform_err"))
        ratio = max(np.max(f("pointwise_mc")) / pw, stats.rms(f("uniform_mc")) / un)
        flag = "MC" if ratio > cfg.mc_ratio else ("sat" if (un >= cfg.radius or L * H <= 4) else "")
        xp = f"{stats.rms(f('pointwise_err_x')):.2f}/{stats.rms(f('pointwise_err_p')):.2f}"
        src = sum(r["uniform_source"] in ("search", "pool") for r in rs)
        lines.append(
            f"{sw:<6}{opt:<16}{L:>4}{H:>4}{n:>4}{d:>4}{len(rs):>6}{pw:>11.3e}{xp:>13}{un:>11.3e}"
            f"{src:>4}/{len(rs):<3}{ratio:>8.2f}{stats.rms(f('param_gap')):>10.3e}  {flag}"
        )
    lines.append("")
    for kind in ("pointwise", "uniform", "pointwise_fluctuation", "uniform_fluctuation"):
        fb = summary["fits"].get(kind, {})
        if "alpha" in fb:
            lines.append(
                f"{kind}: {fb['model']}: alpha = {_ci(fb, 'alpha')}, gamma = {_ci(fb, 'gamma')} "
                f"({fb['points_used']} points, {fb['method']}; theorem 1/3, 1/2; pointwise 1/2, 1/2)"
            )
        else:
            lines.append(f"{kind}: no fit ({fb.get('error')})")
    tr = summary.get("theorem_ratio", {})
    if "max" in tr:
        lines.append(
            f"uniform / (1/L + L^-1/3 H^-1/2): max {tr['max']:.2f}, slope in L {_ci(tr, 'slope_L')}, "
            f"in H {_ci(tr, 'slope_H')} (an upper bound holds if the slopes are <= 0)"
        )
    mc, ss, trn = summary["monte_carlo"], summary["sup_search"], summary["training"]
    lines.append(
        f"Monte-Carlo: {mc['particles']} particles in {mc['replicas']} replicas; largest MC/err over "
        f"fitted points {mc['max_ratio'] if mc['max_ratio'] is None else round(mc['max_ratio'], 3)}; "
        f"{len(mc['flagged'])} point(s) flagged (> {mc['threshold']})"
    )
    if ss["final_gain"] is not None:
        lines.append(
            f"supremum search: the last doubling raised a point's estimate (rms over seeds) by at most "
            f"{100 * ss['final_gain']:.1f}% ({'converged' if ss['converged'] else 'NOT converged'} at "
            f"{100 * ss['tol']:.0f}%; single seeds: at most {100 * ss['row_gain_max']:.1f}%)"
            + (" on the (L, H) grid" if ss.get("sweeps_final_gain") is not None else "")
        )
    if ss.get("sweeps_final_gain") is not None:
        lines.append(
            f"supremum search in the N and d sweeps: the last doubling raised a value's estimate by at most "
            f"{100 * ss['sweeps_final_gain']:.1f}% ({'converged' if ss['sweeps_converged'] else 'NOT converged'} at "
            f"{100 * ss['tol']:.0f}%)"
        )
    lines.append(
        f"training: {trn['steps']} steps; fraction of Adam directions at the sign bound "
        f"{_num(trn['sign_fraction']['limit'])} (limit), {_num(trn['sign_fraction']['discrete'])} (discrete); "
        f"depth spread of the limit's displacement {_num(trn['depth_spread'])}"
    )
    for sweep in ("N", "d"):
        for name, b in summary["fits"].get(sweep, {}).items():
            if "slope" in b:
                out = "".join(f"; {lo['value']} left out: {lo['reason']}" for lo in b["left_out"])
                lines.append(
                    f"slope in {sweep} ({name}): {_ci(b, 'slope')} (rms err "
                    f"{', '.join(f'{v:.3f}' for v in b['rms_err'])} at {sweep} = {b['values']}; MC/err max "
                    f"{max(b['mc_ratio']):.2f}{out})"
                )
            elif "geomean" in b:
                lines.append(
                    f"paired ratio ({name}): {', '.join(f'{v:.2f}' for v in b['ratio'])} at d = {b['values']}; "
                    f"geometric mean {_ci(b, 'geomean')}"
                )
            elif "error" in b:
                out = "".join(f"; {lo['value']} left out: {lo['reason']}" for lo in b.get("left_out", []))
                lines.append(f"{sweep} sweep ({name}): no slope, {b['error']}{out}")
    return "\n".join(lines)
