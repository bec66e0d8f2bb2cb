# %% [markdown]
# # Convergence rates: reading a `mfattn rates` run
#
# A jupytext "percent" script: run it as `python notebooks/02_rates.py`, or open it in Jupyter with jupytext.
#
# `mfattn rates` trains discrete transformers (depth `L`, `H` heads) and their mean-field limit on the same
# data and records, at training steps `0`, `K/2` and `K`, how far apart they are: the pointwise error (mean
# over a test set) and the uniform error (supremum over inputs). The paper's Theorem 7 bounds the uniform
# error by `C (L^-1 + L^-1/3 H^-1/2)`; at a fixed input one expects `L^-1 + (L H)^-1/2`. This notebook reads
# a run folder (`results.csv`, `summary.json`) and shows the fitted exponents, the table, and the errors
# against `L` and `H` with the fitted model and the theorem's slopes.
#
# The run folder is `$MFATTN_RATES_DIR`, else `runs/rates` (what `mfattn rates` writes by default) when it
# exists; otherwise the notebook runs a tiny configuration itself (a couple of minutes on a laptop CPU).
# Figures are saved to `$MFATTN_NOTEBOOK_OUT` (default: a temporary folder) and shown inline under Jupyter.

# %%
import csv
import json
import math
import os
import pathlib
import sys
import tempfile

import matplotlib

if "ipykernel" not in sys.modules:  # a script or a test: no display
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from mfattn import fits  # noqa: E402

try:
    ROOT = pathlib.Path(__file__).resolve().parent.parent
except NameError:  # Jupyter: started from notebooks/ or from the repository root
    ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()

# A tiny configuration for when there is no run to read: every (L, H) point of the default grid's small
# corner, 2 seeds, 2 training steps.
TINY = dict(depths=(1, 2, 4), heads=(1, 2), seeds=2, steps=2, batch_size=2, particles=32, grid_size=3,
            test_per_family=2, ascent_starts=1, ascent_steps=1, mc_check=False)  # fmt: skip


def find_run() -> str:
    env = os.environ.get("MFATTN_RATES_DIR")
    if env:
        if not os.path.exists(os.path.join(env, "results.csv")):
            raise FileNotFoundError(f"MFATTN_RATES_DIR={env} holds no results.csv")
        return env
    default = ROOT / "runs" / "rates"
    if (default / "results.csv").exists() and (default / "summary.json").exists():
        return str(default)
    from mfattn.rates import RatesConfig, run

    out = os.path.join(tempfile.mkdtemp(prefix="mfattn_rates_"), "tiny")
    print(f"no run folder found: running a tiny configuration into {out}")
    run(RatesConfig(**TINY).validate(), out, progress=False)
    return out


run_dir = find_run()
out_dir = os.environ.get("MFATTN_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="mfattn_nb02_")
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(run_dir, "results.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
cfg = summary["config"]
print(f"run folder {run_dir}: {len(rows)} rows")
print(
    f"task {cfg.get('task', 'teacher_student')}, d = {cfg['dim']}, N = {cfg['num_tokens']}, beta = {cfg['beta']}, "
    f"L in {cfg['depths']}, H in {cfg['heads']}, {cfg['seeds']} seeds, K = {cfg['steps']} {cfg['optimizer']} "
    f"steps, limit ensemble M = {cfg['particles']}"
)

# %% [markdown]
# ## The table: one line per sweep point at the final step (means over seeds)
#
# `source` counts, over seeds, which estimate of the supremum won (`t` the test set, `a` the gradient
# ascent); `mc_err` is the limit's own Monte-Carlo error and `flag` counts the seeds where it exceeds 20% of
# the pointwise error (then the limit is not accurate enough for that point).

# %%
print(fits.table(rows))

# %% [markdown]
# ## The fits: `err = a/L + b L^-alpha H^-gamma`
#
# Free exponents with bootstrap intervals over seeds, and the fits with the exponents fixed at the theorem's
# `(1/3, 1/2)` and at the pointwise expectation `(1/2, 1/2)`: the smaller log-residual says which rate the
# data follow better.


# %%
def fmt(x):
    return "  n/a" if x is None else f"{x:5.2f}"


def interval(fit, name):
    lo, hi = fit.get("ci", {}).get(name, (None, None))
    return f"{fmt(fit.get(name))} [{fmt(lo)}, {fmt(hi)}]"


final = summary["fits"].get("final", {})
print(f"final step K = {final.get('step')}, optimizer {final.get('optimizer')}")
for kind in ("pointwise_err", "uniform_err"):
    block = final.get(kind, {})
    free = block.get("free", {})
    if "alpha" not in free:
        print(f"{kind}: no free fit ({free.get('skipped') or block.get('skipped')})")
        continue
    print(f"{kind}: alpha = {interval(free, 'alpha')}, gamma = {interval(free, 'gamma')}")
    for name in ("theorem", "pointwise"):
        fixed = block.get(name, {})
        if "rmse_log" in fixed:
            print(f"    fixed {name:<9} (alpha, gamma) = ({fixed['alpha']:.3f}, {fixed['gamma']:.3f}): "
                  f"rms log-residual {fixed['rmse_log']:.3f}  (free: {free['rmse_log']:.3f})")  # fmt: skip
    if "better_fixed" in block:
        print(f"    the {block['better_fixed']} exponents fit better")
for sweep, axis in (("N", "num_tokens"), ("d", "dim")):
    for opt, block in summary["fits"].get(sweep, {}).items():
        slopes = ", ".join(
            f"{kind} {block[kind]['slope']:+.2f}" for kind in ("pointwise_err", "uniform_err") if "slope" in block[kind]
        )
        print(f"{sweep} sweep ({opt}), slope in {axis} over {block[f'{axis}_values']}: {slopes}")

# %% [markdown]
# ## Error against depth `L` (one line per `H`) and against heads `H` (one line per `L`)
#
# Means over seeds with min-max bars at the final step; dashed: the free fit `a/L + b L^-alpha H^-gamma`;
# grey: the theorem's slopes (`-1/3` in `L`, `-1/2` in `H`) and the pointwise `-1/2` in `L`, drawn through
# the first point.

# %%
INTS = ("depth", "heads", "num_tokens", "dim", "seed", "step", "mc_flag")
FLOATS = ("pointwise_err", "uniform_err", "uniform_test_set", "uniform_ascent", "param_gap", "mc_err")
typed = [{**r, **{c: int(r[c]) for c in INTS}, **{c: float(r[c]) for c in FLOATS}} for r in rows]
K = max(r["step"] for r in typed)
lh = [r for r in typed if r["sweep"] == "LH" and r["step"] == K]
lh = [r for r in lh if r["optimizer"] == min(q["optimizer"] for q in lh)]


def means(rs, kind):
    """{(L, H): (mean, min, max)} over seeds."""
    acc = {}
    for r in rs:
        acc.setdefault((r["depth"], r["heads"]), []).append(r[kind])
    return {k: (np.mean(v), np.min(v), np.max(v)) for k, v in sorted(acc.items())}


depths = sorted({r["depth"] for r in lh})
heads = sorted({r["heads"] for r in lh})
figures = {}
for axis in ("L", "H"):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for ax, kind in zip(axes, ("pointwise_err", "uniform_err")):
        m = means(lh, kind)
        fit = final.get(kind, {}).get("free", {})
        outer, inner = (heads, depths) if axis == "L" else (depths, heads)
        for i, g in enumerate(outer):
            key = (lambda x, g=g: (x, g)) if axis == "L" else (lambda x, g=g: (g, x))
            xs = [x for x in inner if key(x) in m]
            y = np.array([m[key(x)][0] for x in xs])
            err = np.array([[m[key(x)][0] - m[key(x)][1] for x in xs], [m[key(x)][2] - m[key(x)][0] for x in xs]])
            label = f"H={g}" if axis == "L" else f"L={g}"
            ax.errorbar(xs, y, yerr=err, marker="o", ms=4, capsize=2, color=f"C{i}", label=label)
            if "alpha" in fit and len(xs) > 1:
                grid = np.geomspace(min(xs), max(xs), 50)
                L_, H_ = (grid, np.full_like(grid, g)) if axis == "L" else (np.full_like(grid, g), grid)
                ax.plot(grid, fits.rate_model(L_, H_, fit), "--", color=f"C{i}", lw=1)
        first = m[(depths[0], heads[-1])][0] if axis == "L" else m[(depths[-1], heads[0])][0]
        xs = np.array(depths if axis == "L" else heads, dtype=float)
        slopes = [(-1 / 3, ":", "theorem -1/3"), (-1 / 2, "-.", "pointwise -1/2")] if axis == "L" else [
            (-1 / 2, ":", "theorem -1/2")]  # fmt: skip
        for slope, style, label in slopes:
            ax.plot(xs, first * (xs / xs[0]) ** slope, style, color="0.4", lw=1, label=label)
        ax.set(xscale="log", yscale="log", xlabel="L (depth)" if axis == "L" else "H (heads)", ylabel="error")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        title = kind.replace("_err", " error")
        if "alpha" in fit:
            title += f": alpha = {fit['alpha']:.2f}, gamma = {fit['gamma']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{'depth' if axis == 'L' else 'heads'} dependence at step {K}", fontsize=10)
    path = os.path.join(out_dir, f"rates_err_vs_{axis}.png")
    fig.savefig(path, dpi=100)
    figures[axis] = path
    plt.close(fig)
print("figures:", ", ".join(figures.values()))

# %% [markdown]
# ## Free slopes along each axis
#
# The log-log slope of each error in `L` at every `H`, and in `H` at every `L`, with their bootstrap
# intervals: the theorem predicts about `-1/3` in `L` (once `L^-1` is small) and `-1/2` in `H`.

# %%
for kind in ("pointwise_err", "uniform_err"):
    block = final.get(kind, {})
    for entry in block.get("slope_L") or []:
        lo, hi = entry["ci"]
        print(f"{kind}: slope in L at H = {entry['heads']:>3}: {fmt(entry['slope'])} [{fmt(lo)}, {fmt(hi)}]")
    for entry in block.get("slope_H") or []:
        lo, hi = entry["ci"]
        print(f"{kind}: slope in H at L = {entry['depth']:>3}: {fmt(entry['slope'])} [{fmt(lo)}, {fmt(hi)}]")

# %% [markdown]
# ## Where the supremum was found, and the limit's own accuracy

# %%
last = [r for r in typed if r["step"] == K]
ascent = sum(r["uniform_source"] == "ascent" for r in last)
print(f"uniform error found by the gradient ascent for {ascent} of {len(last)} (point, seed) pairs at step {K}")
ratio = [r["uniform_err"] / r["pointwise_err"] for r in last if r["pointwise_err"] > 0]
print(f"uniform / pointwise error: median {np.median(ratio):.2f}, max {np.max(ratio):.2f}")
mc = [r["mc_err"] for r in last if math.isfinite(r["mc_err"])]
if mc:
    print(f"limit Monte-Carlo error {np.max(mc):.2e}; flagged points {sum(r['mc_flag'] for r in last)}")
else:
    print("no Monte-Carlo check in this run (mc_check = false)")
