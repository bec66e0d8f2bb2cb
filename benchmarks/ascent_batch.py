"""One ascent step of the supremum search (`mfattn.rates.core.surrogate_values_and_grads`: the corrected cheap
limit's error and its gradient in the input, for the 32 paths of one call) with its paths vectorised ``batch`` at a
time, side by side in one process: ``batch = 32`` (all at once, the implementation before 2026-12-07) against
smaller batches, at N in {4, 16, 64} tokens (the default d = k = 2, L = 8, the surrogate's 128 heads, 16 seeds at
(8, 1) and (8, 4): the sweeps' sizes). Repeats are interleaved (these machines are noisy); the gradients of every
batch size are compared with the all-at-once ones.

    python benchmarks/ascent_batch.py            # N in {4, 16, 64}; a few minutes on the 2-core CPU
    python benchmarks/ascent_batch.py --quick    # N in {4, 16}

Prints a table and writes benchmarks/results/ascent_batch.json (ascent_batch_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from _util import machine, write_json

from mfattn import rates
from mfattn.rates import core, driver

PATHS = 32  # driver.ASCENT_CHUNK: the paths of one call


def case(n: int, batches: list[int], repeats: int) -> list[dict]:
    cfg = dataclasses.replace(
        rates.load_config(), num_tokens=n, depths=[8], heads=[1, 4], seeds=16, particles=2048, search_pilots=0
    )
    group = driver.groups(cfg)[0]
    prep = driver.prepare(cfg, group, list(range(cfg.seeds)))
    lmax = group.lmax
    sur = core.surrogate(prep.lim.ens, cfg.search_particles, lmax, prep.problem.grid)
    params = prep.st.discrete[0]
    xs = jnp.asarray(prep.cand[:PATHS])
    w = jnp.full((n,), 1.0 / n, xs.dtype)
    rows = jnp.asarray(np.arange(PATHS) % cfg.seeds)
    gidx = jnp.asarray(np.arange(PATHS) // cfg.seeds % len(group.points))
    offs = (jnp.zeros((PATHS, lmax + 1, n, cfg.dim), xs.dtype),) * 2

    def call(b):
        return core.surrogate_values_and_grads(prep.problem, sur, params, xs, w, rows, gidx, offs, lmax, batch=b)

    out, ref, times = [], None, {b: [] for b in batches}
    for b in batches:
        t0 = time.perf_counter()
        v, g = jax.block_until_ready(call(b))
        first = time.perf_counter() - t0
        ref = (v, g) if ref is None else ref
        dv = float(jnp.max(jnp.abs(v - ref[0])) / jnp.max(jnp.abs(ref[0])))
        dg = float(jnp.max(jnp.abs(g - ref[1])) / jnp.max(jnp.abs(ref[1])))
        out.append({"N": n, "batch": b, "first_call_s": first, "rel_diff_values": dv, "rel_diff_grads": dg})
    for _ in range(repeats):
        for b in batches:
            t0 = time.perf_counter()
            jax.block_until_ready(call(b))
            times[b].append(time.perf_counter() - t0)
    base = float(np.median(times[batches[0]]))
    for r in out:
        r["median_s"] = float(np.median(times[r["batch"]]))
        r["speedup_vs_all_at_once"] = base / r["median_s"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tokens = [4, 16] if args.quick else [4, 16, 64]
    batches = [PATHS, 8, 4, 2, 1]
    rows = []
    print(f"{'N':>4} {'batch':>6} {'median s':>10} {'speedup':>8} {'first call s':>13} {'rel diff grads':>15}")
    for n in tokens:
        for r in case(n, batches, args.repeats if n < 64 else 3):
            rows.append(r)
            print(
                f"{r['N']:>4} {r['batch']:>6} {r['median_s']:>10.4f} {r['speedup_vs_all_at_once']:>7.2f}x "
                f"{r['first_call_s']:>13.2f} {r['rel_diff_grads']:>15.1e}",
                flush=True,
            )
    name = "ascent_batch_quick.json" if args.quick else "ascent_batch.json"
    path = os.path.join(os.path.dirname(__file__), "results", name)
    write_json(path, {"machine": machine(), "paths_per_call": PATHS, "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
