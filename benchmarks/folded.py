"""Folded heads (:mod:`mfattn.folded`) against the per-head kernels (:mod:`mfattn.attention`, :mod:`mfattn.adjoint`:
lanes or vmap by their "auto" rule), side by side in one run, float32:

1. the supremum search of the default `mfattn rates` configuration (its L = 32 depth group: cheap limit of 32
   layers x 128 heads, discrete models of 32 layers x 8 heads, N = 4, d = k = 2): the cheap limit's forward and
   adjoint paths of 32 inputs (``core.surrogate_paths``) and the ascent's value and input-gradient of one chunk of
   32 paths (``core.surrogate_values_and_grads``), the old way (``Problem.discrete_paths``) and folded;
2. one layer's velocity F and adjoint field G over M parameter particles (the limit's kernels, issue #13's grid:
   M in {1024, 32768}, N in {4, 16}, d = k in {2, 4}), the folding included in the timed function.

Each: compile seconds, median run seconds, the ratio, and the largest difference (relative to the largest value).

    python benchmarks/folded.py            # about 3 minutes on the 2-core CPU
    python benchmarks/folded.py --quick    # the search part only, and M = 1024

Prints a table and writes benchmarks/results/folded.json (folded_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from _util import machine, measure, write_json  # noqa: I001

import mfattn
from mfattn import folded
from mfattn.rates import RatesConfig, core, driver


def _diff(a, b) -> float:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(x)), 1e-30)) for x, y in zip(a, b))


def _row(name, old_fn, new_fn, args) -> dict:
    old, new = measure(old_fn, *args), measure(new_fn, *args)
    row = {
        "case": name,
        "old_s": old["median_s"],
        "new_s": new["median_s"],
        "speedup": old["median_s"] / new["median_s"],
        "old_compile_s": old["compile_s"],
        "new_compile_s": new["compile_s"],
        "old_peak_bytes": old.get("peak_bytes"),
        "new_peak_bytes": new.get("peak_bytes"),
        "rel_diff": _diff(jax.jit(old_fn)(*args), jax.jit(new_fn)(*args)),
    }
    print(
        f"{name:<52} {row['old_s'] * 1e3:>9.2f} {row['new_s'] * 1e3:>9.2f} {row['speedup']:>6.1f}x "
        f"{row['old_compile_s']:>6.1f} {row['new_compile_s']:>6.1f} {row['rel_diff']:>9.1e}",
        flush=True,
    )
    return row


def search_rows() -> list[dict]:
    cfg = RatesConfig()
    group = driver.groups(cfg)[0]
    prep = driver.prepare(cfg, group, list(range(cfg.seeds)))
    problem, lim, disc = prep.problem, prep.lim, prep.st.discrete[-1]  # the deepest depth group (L = 32)
    lmax, (n, d) = group.lmax, (group.num_tokens, group.dim)
    w = jnp.full((n,), 1.0 / n, jnp.float32)
    sur = core.surrogate(lim.ens, cfg.search_particles, lmax, problem.grid)
    chunk = driver.ASCENT_CHUNK
    xs = jnp.asarray(np.resize(prep.cand, (chunk, n, d)))
    rows = jnp.asarray(np.arange(chunk) % disc.wq.shape[0])
    gidx = jnp.asarray(np.arange(chunk) % disc.wq.shape[1])
    key = jax.random.key(0)
    offsets = tuple(0.01 * jax.random.normal(jax.random.fold_in(key, i), (chunk, lmax + 1, n, d)) for i in (0, 1))
    old_problem = dataclasses.replace(problem, fold_heads=False)  # the per-head kernels, as before

    def paths(prob):
        return lambda x: core.surrogate_paths(prob, sur, x, w)

    def vg(prob):
        return lambda x: core.surrogate_values_and_grads(prob, sur, disc, x, w, rows, gidx, offsets, lmax)

    tag = f"{lmax} layers x {cfg.search_particles} heads, chunk {chunk}"
    return [
        _row(f"cheap-limit paths ({tag})", paths(old_problem), paths(problem), (xs,)),
        _row(f"search value and input-gradient ({tag})", vg(old_problem), vg(problem), (xs,)),
    ]


def kernel_rows(sizes) -> list[dict]:
    out = []
    for m, n, d in sizes:
        key = jax.random.key(1)
        theta = mfattn.Params(*(0.5 * jax.random.normal(jax.random.fold_in(key, i), (1, m, d, d)) for i in range(4)))
        theta = jax.tree.map(lambda a: a[0], theta)
        x = jax.random.normal(jax.random.fold_in(key, 9), (n, d))
        p = jax.random.normal(jax.random.fold_in(key, 10), (n, d))
        w = jnp.full((n,), 1.0 / n)

        def v_old(th, x, w=w):
            return mfattn.velocity(th, x, x, w, beta=1.0, check=False)

        def v_new(th, x, w=w):
            return folded.velocity(folded.fold(th), x, w, beta=1.0)

        def g_old(th, x, p=p, w=w):
            return mfattn.adjoint_field(th, x, p, w, beta=1.0, check=False)

        def g_new(th, x, p=p, w=w):
            return folded.adjoint_field(folded.fold(th), x, p, w, beta=1.0)

        tag = f"M = {m}, N = {n}, d = k = {d}"
        out.append(_row(f"velocity F ({tag})", v_old, v_new, (theta, x)))
        out.append(_row(f"adjoint field G ({tag})", g_old, g_new, (theta, x)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(f"{'case':<52} {'old ms':>9} {'new ms':>9} {'ratio':>7} {'c old':>6} {'c new':>6} {'rel diff':>9}")
    rows = search_rows()
    grid = [(1024, 4, 2)] if args.quick else [(m, n, d) for m in (1024, 32768) for n in (4, 16) for d in (2, 4)]
    rows += kernel_rows(grid)
    name = "folded_quick.json" if args.quick else "folded.json"
    write_json(
        os.path.join(os.path.dirname(__file__), "results", name),
        {"machine": machine(), "dtype": "float32", "rows": rows},
    )


if __name__ == "__main__":
    main()
