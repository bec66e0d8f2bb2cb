"""Benchmark: forward, hand adjoint + gradient map, and jax.value_and_grad through the forward pass.

For N in {64, 256, 1024}, L in {8, 64}, H in {4, 16}, d = k = 16, float32, one token sequence:

* (a) ``forward``: the trajectory;
* (b) ``hand``: loss value and all parameter gradients by the forward scan plus the fused hand-derived
  backward scan (``mfattn.loss_and_grad(method="adjoint")``), recomputing each layer's attention;
* (c) ``autodiff``: ``jax.value_and_grad`` of the same loss through the forward scan
  (``method="autodiff"``), which stores every layer's attention weights.

Reported: median wall time after warm-up (``block_until_ready``), compile time, and XLA's scratch memory
for the compiled program (``memory_analysis().temp_size_in_bytes``). (c) is skipped, and said so, when its
scratch memory would exceed ``--mem-budget-gib``. Then compile time of (b) and (c) at L = 8 and L = 512.

    python benchmarks/adjoint.py [--quick] [--out benchmarks/results/adjoint.json]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
from _util import compile_seconds, machine, measure, mib, temp_bytes, write_json

import mfattn
from mfattn.losses import TokenRegression


def setup(n, depth, heads, dim=16, head_dim=16, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    params = mfattn.init_params(k[0], depth, heads, dim, head_dim, init="mean_noise", scale=0.5)
    x = jax.random.normal(k[1], (n, dim)) / jnp.sqrt(dim)
    y = jax.random.normal(k[2], (n, dim)) / jnp.sqrt(dim)
    return params, x, y


LOSS = TokenRegression()
BETA = 1.0


def f_forward(params, x, y):
    return mfattn.forward(params, x, beta=BETA)


def f_hand(params, x, y):
    return mfattn.loss_and_grad(params, x, LOSS, beta=BETA, targets=y, method="adjoint")


def f_autodiff(params, x, y):
    return mfattn.loss_and_grad(params, x, LOSS, beta=BETA, targets=y, method="autodiff")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--out", default="benchmarks/results/adjoint.json")
    ap.add_argument("--mem-budget-gib", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    ns, ls, hs = ([64, 256], [8], [4]) if args.quick else ([64, 256, 1024], [8, 64], [4, 16])
    rows = []
    print(
        f"{'N':>5} {'L':>4} {'H':>3} | {'fwd ms':>9} {'hand ms':>9} {'autodiff ms':>11} {'hand/ad':>7} | "
        f"{'hand MiB':>9} {'autodiff MiB':>12}"
    )
    for n, depth, heads in itertools.product(ns, ls, hs):
        params, x, y = setup(n, depth, heads)
        row = {"N": n, "L": depth, "H": heads, "d": 16, "k": 16, "dtype": "float32"}
        row["forward"] = measure(f_forward, params, x, y, repeats=args.repeats)
        row["hand"] = measure(f_hand, params, x, y, repeats=args.repeats)
        ad_temp = temp_bytes(f_autodiff, params, x, y)
        if ad_temp > args.mem_budget_gib * 2**30:
            row["autodiff"] = {"skipped": f"scratch memory {ad_temp / 2**30:.1f} GiB > budget", "temp_bytes": ad_temp}
        else:
            row["autodiff"] = measure(f_autodiff, params, x, y, repeats=args.repeats)
        ad = row["autodiff"].get("median_s")
        ratio = row["hand"]["median_s"] / ad if ad else None
        row["hand_over_autodiff"] = ratio
        rows.append(row)
        print(
            f"{n:>5} {depth:>4} {heads:>3} | {1e3 * row['forward']['median_s']:9.2f} "
            f"{1e3 * row['hand']['median_s']:9.2f} "
            f"{(f'{1e3 * ad:11.2f}' if ad else 'skipped'.rjust(11))} "
            f"{(f'{ratio:7.2f}' if ratio else '-'.rjust(7))} | "
            f"{mib(row['hand'].get('temp_bytes')):>9} {mib(row['autodiff'].get('temp_bytes')):>12}",
            flush=True,
        )

    compile_rows = []
    print("\ncompile time (s), N = 64, H = 4")
    print(f"{'L':>5} {'hand':>8} {'autodiff':>9}")
    for depth in [8, 512]:
        params, x, y = setup(64, depth, 4)
        c = {
            "L": depth,
            "hand_s": compile_seconds(f_hand, params, x, y),
            "autodiff_s": compile_seconds(f_autodiff, params, x, y),
        }
        compile_rows.append(c)
        print(f"{depth:>5} {c['hand_s']:8.2f} {c['autodiff_s']:9.2f}", flush=True)
    ratio = compile_rows[1]["hand_s"] / compile_rows[0]["hand_s"]
    print(f"hand compile time L=512 / L=8: {ratio:.2f} (target <= 1.5)")
    write_json(args.out, {"machine": machine(), "rows": rows, "compile": compile_rows, "compile_ratio_hand": ratio})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
