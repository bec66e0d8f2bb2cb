"""Benchmark: the limit's forward + backward solve and gradient map, beside the discrete model.

Limit: ensemble of M particles on a grid of K + 1 times, batch of B sequences of N tokens, float32:
``mfattn.limit.batch_grad_map`` (forward Tsit5 solve with dense output, hand-derived adjoint ODE backwards,
gradient map at every grid time and particle, averaged over the batch). Beside it, in the same run, the
discrete model with L H = M parameters per... (L = K layers, H = M / K heads... see --help): forward + hand
adjoint + gradient map for the same batch (``mfattn.train.batch_grad_map``).

Reports median time, compile time and XLA's scratch memory; then the limit's compile time for several
(K, M), which must not grow with K or M.

    python benchmarks/limit.py [--quick] [--out benchmarks/results/limit.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from _util import compile_seconds, machine, measure, mib, write_json

import mfattn
from mfattn import limit
from mfattn.losses import TokenRegression
from mfattn.train import batch_grad_map

LOSS = TokenRegression()


def setup(grid_size, particles, n, d, k, batch, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    ens = limit.init_ensemble(keys[0], grid_size, particles, d, k, init="mean_noise", scale=0.5)
    x = jax.random.normal(keys[1], (batch, n, d)) / jnp.sqrt(d)
    w = jnp.full((batch, n), 1.0 / n)
    y = jax.random.normal(keys[2], (batch, n, d)) / jnp.sqrt(d)
    return ens, x, w, y


def limit_fn(ens, x, w, y):
    return limit.batch_grad_map(ens, x, w, y, LOSS, beta=1.0)


def discrete_fn(params, x, w, y):
    return batch_grad_map(params, x, w, y, LOSS, beta=1.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/limit.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    n, d, k, batch = 16, 4, 4, 8
    grid_size, particles = (17, 256) if args.quick else (65, 4096)
    ens, x, w, y = setup(grid_size, particles, n, d, k, batch)
    rows = {}
    rows["limit"] = measure(limit_fn, ens, x, w, y, repeats=args.repeats)
    # Discrete model with L H = M: L = K layers of H = M / K heads.
    depth = grid_size - 1
    heads = particles // depth
    params = mfattn.init_params(jax.random.key(1), depth, heads, d, k, init="mean_noise", scale=0.5)
    rows["discrete"] = measure(discrete_fn, params, x, w, y, repeats=args.repeats)
    print(f"M={particles} K={grid_size - 1} N={n} d=k={d} batch={batch} float32; discrete L={depth} H={heads}")
    print(f"{'':>10} {'median ms':>10} {'compile s':>10} {'scratch MiB':>12}")
    for name, r in rows.items():
        print(f"{name:>10} {1e3 * r['median_s']:10.1f} {r['compile_s']:10.2f} {mib(r.get('temp_bytes')):>12}")
    sizes = [(17, 256), (65, 256), (17, 4096), (65, 4096)] if not args.quick else [(5, 64), (17, 256)]
    compile_rows = []
    print(f"\nlimit compile time\n{'K':>5} {'M':>6} {'s':>7}")
    for g, m in sizes:
        e, xx, ww, yy = setup(g, m, n, d, k, batch)
        c = compile_seconds(limit_fn, e, xx, ww, yy)
        compile_rows.append({"K": g - 1, "M": m, "compile_s": c})
        print(f"{g - 1:>5} {m:>6} {c:7.2f}", flush=True)
    write_json(
        args.out,
        {
            "machine": machine(),
            "sizes": {
                "M": particles,
                "K": grid_size - 1,
                "N": n,
                "d": d,
                "k": k,
                "batch": batch,
                "L": depth,
                "H": heads,
            },
            "rows": rows,
            "compile": compile_rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
