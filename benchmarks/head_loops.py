"""How the limit's kernels loop over their particles (``Attention(heads=...)``) at more tokens than the lanes
kernels take (N >= 8): ``"vmap"`` (one batched program over all particles, ``"auto"``'s choice on CPU below
``BLOCKED_HEADS_FROM`` tokens) against ``"blocked"`` (``lax.map`` over blocks of about
``HEAD_BLOCK_ENTRIES / N^2`` particles, each block vectorised; ``"auto"``'s choice from ``BLOCKED_HEADS_FROM``) and
``"sequential"`` (one particle at a time; ``"auto"``'s from ``SEQUENTIAL_HEADS_FROM``), side
by side in one process with interleaved repeats: the velocity F, the adjoint field and gradient map together
(G, g: one backward call), and one forward-backward solve of the limit (Tsit5, 8 fixed steps, as `mfattn rates`).
Sizes: N in {8, 32} and the N sweep's (N in {16, 64}, d = k = 2) at M = 512 (one replica of the sweeps' limit) and
2048.

    python benchmarks/head_loops.py            # a few minutes on the 2-core CPU
    python benchmarks/head_loops.py --quick    # N = 16 only

Prints a table and writes benchmarks/results/head_loops.json (head_loops_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import os
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from _util import machine, write_json

from mfattn import Attention, limit, velocity
from mfattn.adjoint import adjoint_field_and_grad_map
from mfattn.attention import HEAD_BLOCK_ENTRIES, head_block
from mfattn.losses import TokenRegression

LOOPS = ("vmap", "blocked", "sequential")


def ops(n: int, m: int):
    """The three operations at ``n`` tokens and ``m`` particles, each a function of the loop choice."""
    ens = limit.init_ensemble(jax.random.key(0), 9, m, 2, 2, init="mean_noise", scale=0.5)
    theta = jax.tree.map(lambda a: a[4], ens)
    x = 0.5 * jax.random.normal(jax.random.key(1), (n, 2))
    p = jax.random.normal(jax.random.key(2), (n, 2))
    y = 0.5 * jax.random.normal(jax.random.key(3), (n, 2))
    w = jnp.full((n,), 1.0 / n)
    ts = jnp.linspace(0.0, 1.0, 9)

    args = (ens, theta, x, p, y, w)

    def make(name, loop):
        """The operation as a jitted function of its arrays (closed-over arrays would be constant-folded)."""
        spec = Attention(heads=loop)
        if name == "F":
            f = jax.jit(lambda ens, theta, x, p, y, w: velocity(theta, x, x, w, beta=1.0, attention=spec))
        elif name == "G, g":
            f = jax.jit(
                lambda ens, theta, x, p, y, w: adjoint_field_and_grad_map(theta, x, p, w, beta=1.0, attention=spec)
            )
        else:
            f = jax.jit(
                lambda ens, theta, x, p, y, w: limit.forward_backward(
                    ens, x, TokenRegression(), beta=1.0, ts=ts, weights=w, targets=y, solver=diffrax.Tsit5(),
                    stepsize_controller=limit.FixedSteps(8), attention=spec,
                )[1:]
            )  # fmt: skip
        return lambda: f(*args)

    return make


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default=None, help="N:M pairs, e.g. 32:512,128:512 (default: the sizes above)")
    args = ap.parse_args(argv)
    sizes = [(16, 2048)] if args.quick else [(8, 2048), (16, 512), (16, 2048), (32, 512), (64, 512), (64, 2048)]
    if args.sizes:
        sizes = [tuple(int(v) for v in pair.split(":")) for pair in args.sizes.split(",")]
    rows = []
    print(
        f"{'N':>3} {'M':>5} {'op':>11} {'block':>5} " + " ".join(f"{k + ' ms':>13}" for k in LOOPS) + "  blocked/vmap"
    )
    for n, m in sizes:
        make = ops(n, m)
        for name in ("F", "G, g", "solve"):
            fns = {loop: make(name, loop) for loop in LOOPS}
            ref = jax.block_until_ready(fns["vmap"]())
            first, diff = {}, {}
            for loop, f in fns.items():
                t0 = time.perf_counter()
                out = jax.block_until_ready(f())
                first[loop] = time.perf_counter() - t0
                diff[loop] = max(
                    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))
                )
            times = {loop: [] for loop in fns}
            for _ in range(args.repeats):
                for loop, f in fns.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(f())
                    times[loop].append(time.perf_counter() - t0)
            med = {loop: float(np.median(t)) for loop, t in times.items()}
            row = {
                "N": n, "M": m, "op": name, "block": head_block(n, m), "median_s": med, "first_call_s": first,
                "rel_diff_vs_vmap": diff, "blocked_speedup_vs_vmap": med["vmap"] / med["blocked"],
            }  # fmt: skip
            rows.append(row)
            print(
                f"{n:>3} {m:>5} {name:>11} {row['block']:>5} "
                + " ".join(f"{med[k] * 1e3:>13.2f}" for k in LOOPS)
                + f"  {row['blocked_speedup_vs_vmap']:>6.2f}x",
                flush=True,
            )
    name = "head_loops_quick.json" if args.quick else "head_loops.json" if not args.sizes else "head_loops_sizes.json"
    path = os.path.join(os.path.dirname(__file__), "results", name)
    write_json(path, {"machine": machine(), "head_block_entries": HEAD_BLOCK_ENTRIES, "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
