# %% [markdown]
# # Convergence rates: reading a `mfattn rates` run
#
# A jupytext "percent" script: run it as `python notebooks/02_rates.py`, or open it in Jupyter with jupytext.
#
# `mfattn rates` first runs a positive control (untrained models against a reference limit: the pointwise
# error must follow `a/L + b (L H)^-1/2`), then trains discrete transformers (depth `L`, `H` heads, several
# seeds) and their shared mean-field limit on one data stream, and measures how far apart they are: the
# pointwise error (mean over test inputs) and the uniform error (a search for the supremum over inputs: a lower
# bound until doubling its budget stops raising it). Theorem 7 bounds it by `C (L^-1 + L^-1/3 H^-1/2)`. This
# notebook reads a run folder and rebuilds its summary, table and figures from the files alone (`mfattn.rates.report`).
#
# The run folder is `$MFATTN_RATES_DIR`, else `runs/rates` (what `mfattn rates` writes by default) when it
# exists, else the study shipped in `docs/study`. Figures are written into the run folder.

# %%
import os
import pathlib

from mfattn import rates

try:
    ROOT = pathlib.Path(__file__).resolve().parent.parent
except NameError:  # Jupyter: started from notebooks/ or from the repository root
    ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()


def find_run() -> str:
    env = os.environ.get("MFATTN_RATES_DIR")
    for cand in ([env] if env else []) + [str(ROOT / "runs" / "rates"), str(ROOT / "docs" / "study")]:
        if os.path.exists(os.path.join(cand, "results.csv")):
            return cand
    raise FileNotFoundError("no run folder: run `mfattn rates` first, or set MFATTN_RATES_DIR")


run_dir = find_run()
summary = rates.report(run_dir)
print(f"run folder {run_dir}")
print(summary["table"])

# %% [markdown]
# ## The positive control, the limit's accuracy, the search and the training

# %%
pc = summary["positive_control"]
print("positive control:", "passed" if pc.get("passed") else "FAILED", "-", pc.get("why"))
for p in pc.get("per_point", []):
    print(
        f"  L = {p['depth']:>3}, H = {p['heads']:>3}: err {p['rms_err']:.3e}, sqrt(LH) err {p['sqrt_LH_err']:.2f}, "
        f"MC {p['mc']:.1e}"
    )
mc = summary["monte_carlo"]
print(f"Monte-Carlo: {mc['particles']} particles, {mc['replicas']} replicas, max MC/err {mc['max_ratio']}")
print("supremum search:", summary["sup_search"])
print("training:", {k: v for k, v in summary["training"].items() if k != "loss"})

# %% [markdown]
# ## Figures

# %%
for path in summary["plots"]:
    print(path)
