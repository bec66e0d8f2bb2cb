"""Eager parameter draws at the rates experiment's shapes: :func:`mfattn.init_params` (each block a prefix of a
power-of-two draw: one compiled program per size class) against the previous direct draw at each block's shape
(one compiled program per shape), JAX's caches cleared before each.

    python benchmarks/draws.py

Prints a table and writes benchmarks/results/draws.json. The numbers must be identical.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from _util import machine, write_json

from mfattn import init_params
from mfattn.params import Params

# The default `mfattn rates`: the control grid and the trained grid (d = k = 2, "mean_noise").
SHAPES = sorted(
    {(L, H) for L in (8, 16, 32, 64) for H in (1, 4, 16)} | {(L, H) for L in (8, 16, 32) for H in (1, 4, 8)}
)


def previous(key, L, H, d=2, k=2, scale=0.5):
    """The previous ``init_params(..., init="mean_noise")``: each block drawn at its own shape."""
    a = scale * np.sqrt(6.0 / (d + k))
    eye = jnp.eye(d, k)[None, None]
    return Params(*(eye + jax.random.uniform(kk, (L, H, d, k), jnp.float32, -a, a) for kk in jax.random.split(key, 4)))


def current(key, L, H):
    return init_params(key, L, H, 2, 2, init="mean_noise", scale=0.5, dtype=jnp.float32)


def draw_all(fn, seeds):
    out = [fn(jax.random.fold_in(jax.random.key(s), i), L, H) for s in range(seeds) for i, (L, H) in enumerate(SHAPES)]
    return jax.block_until_ready(out)


def run(seeds: int = 8) -> dict:
    rows, outs = [], {}
    for name, fn in (("previous (one program per shape)", previous), ("init_params (per size class)", current)):
        jax.clear_caches()
        t = time.perf_counter()
        outs[name] = draw_all(fn, 1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        draw_all(fn, seeds)
        warm = time.perf_counter() - t
        rows.append({"method": name, "first_s": first, "warm_s": warm, "shapes": len(SHAPES), "seeds": seeds})
    a, b = outs.values()
    same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return {"rows": rows, "identical": bool(same), "speedup_first": rows[0]["first_s"] / rows[1]["first_s"]}


def main():
    res = run()
    print(f"{'method':<36}{'first call (s)':>16}{'8 seeds warm (s)':>18}")
    for r in res["rows"]:
        print(f"{r['method']:<36}{r['first_s']:>16.2f}{r['warm_s']:>18.3f}")
    print(f"{len(SHAPES)} shapes; identical numbers: {res['identical']}; first call {res['speedup_first']:.1f}x faster")
    write_json(os.path.join(os.path.dirname(__file__), "results", "draws.json"), res | {"machine": machine()})


if __name__ == "__main__":
    main()
