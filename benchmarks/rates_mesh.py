"""Benchmark: where the time of a `mfattn rates` sweep group goes, and what a device mesh does to it.

For the (L, H) group of the default configuration (or ``--quick``'s), in one process:

1. the two parts of one training step's gradients on one device, side by side: the limit (both ensembles and
   the coupled heads of every point, for every seed) and the discrete models of all sweep points. This split is
   why the points are not a mesh axis (README, "Running the sweep");
2. one full training step (gradients and AdamW update) and one evaluation of every candidate input against
   every point, on one device and on the ``("seeds", "particles")`` mesh of :func:`mfattn.rates._mesh` over
   the first ``n`` devices, for each ``n`` of ``--devices``, with the largest difference from one device
   (normwise: max |difference| / max |value| of each parameter array and of the errors).

On CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before JAX starts); they
share the machine's cores, so the timings show the mesh's overhead rather than a speed-up. On a machine with
several GPUs or TPUs the same script measures the real thing.

    python benchmarks/rates_mesh.py [--quick] [--devices 1,2,4] [--repeats 3] [--out benchmarks/results/rates_mesh.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _timed(fn, repeats):
    import jax

    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t)
    return out, {"first_s": first, "median_s": statistics.median(runs), "runs_s": runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the --quick configuration of mfattn rates")
    ap.add_argument("--devices", default="1,2,4", help="device counts to compare (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/rates_mesh.json")
    args = ap.parse_args(argv)
    counts = sorted({int(c) for c in args.devices.split(",")})
    if "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={max(counts)}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from _util import machine, write_json

    from mfattn import rates

    cfg = rates.load_config(quick=args.quick)
    group = rates._groups(cfg)[0]
    dtype = jnp.float32
    task, loss, opt, grid, beta, settings, models = rates._group_setup(cfg, group, dtype)
    state0 = jax.tree.map(
        lambda *a: jnp.stack(a), *[rates._init_seed(cfg, group, s, task, opt, dtype) for s in range(cfg.seeds)]
    )
    w0 = jnp.full((group.num_tokens,), 1.0 / group.num_tokens, dtype)
    lmax = int(np.lcm.reduce([L for L, _ in group.points]))
    sample, batch = task.sample, cfg.batch_size
    print(
        f"rates {'--quick' if args.quick else 'default'}: {len(group.points)} (L, H) points, {cfg.seeds} seeds, "
        f"M = {cfg.particles} particles x {cfg.grid_size} grid times (x2 with the Monte-Carlo twin), N = "
        f"{group.num_tokens}, d = {group.dim}, float32; {jax.default_backend()} devices: {len(jax.devices())}"
    )

    # 1. The split of one training step's gradients (one device).
    @eqx.filter_jit
    def limit_part(params, data_key, step):
        def one(st, key):
            return rates._limit_grads(st, rates._seed_batch(key, sample, batch, step), loss, beta, grid, settings)

        return jax.vmap(one)(params, data_key)

    @eqx.filter_jit
    def discrete_part(params, data_key, step):
        def one(st, key):
            return rates._discrete_grads(st, rates._seed_batch(key, sample, batch, step), loss, beta, settings)

        return jax.vmap(one)(params, data_key)

    params = {k: state0[k] for k in rates._PARAMS}
    step0 = jnp.asarray(0)
    split = {}
    for name, fn in (("limit", limit_part), ("discrete", discrete_part)):
        _, split[name] = _timed(lambda fn=fn: fn(params, state0["data_key"], step0), args.repeats)
    share = split["discrete"]["median_s"] / (split["limit"]["median_s"] + split["discrete"]["median_s"])
    print("\none training step's gradients, one device")
    print(f"{'part':>10} {'median s':>10} {'first s':>9}")
    for name, r in split.items():
        print(f"{name:>10} {r['median_s']:10.4f} {r['first_s']:9.2f}")
    print(f"the discrete models of all {len(group.points)} points: {100 * share:.1f}% of the step's gradient time")

    # 2. Training step and evaluation on meshes of growing size.
    def train_step(state):
        return rates._train_step_seeds(state, loss, opt, beta, grid, settings, sample, batch, step0)

    def evaluate(state):
        return rates._errs_seeds(models, state["discrete"], state["ensembles"], state["xs"], w0, lmax)

    mesh_rows, reference = [], None
    print(f"\n{'devices':>7} {'mesh':>10} {'step s':>8} {'eval s':>8} {'step x':>7} {'eval x':>7} {'rel diff':>9}")
    for n in counts:
        if n > len(jax.devices()):
            print(f"{n:>7} skipped: only {len(jax.devices())} devices")
            continue
        mesh = rates._mesh(cfg, jax.devices()[:n])
        state = state0 if mesh is None else rates._shard_state(state0, mesh)
        new, t_step = _timed(lambda state=state: train_step(state), args.repeats)
        errs, t_eval = _timed(lambda state=state: evaluate(state), args.repeats)
        out = [np.asarray(a) for a in (*jax.tree.leaves(new["ensembles"]), errs[0])]
        if reference is None:
            reference = out
        # normwise per array (an elementwise ratio is meaningless for parameters near 0)
        diff = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(out, reference))
        shape = "1" if mesh is None else f"{mesh.shape['seeds']}x{mesh.shape['particles']}"
        row = {"devices": n, "mesh": shape, "train_step": t_step, "evaluation": t_eval, "max_rel_diff": diff}
        mesh_rows.append(row)
        base = mesh_rows[0]
        print(
            f"{n:>7} {shape:>10} {t_step['median_s']:8.3f} {t_eval['median_s']:8.3f} "
            f"{base['train_step']['median_s'] / t_step['median_s']:7.2f} "
            f"{base['evaluation']['median_s'] / t_eval['median_s']:7.2f} {diff:9.1e}"
        )
    write_json(
        args.out,
        {
            "machine": machine(),
            "config": "quick" if args.quick else "default",
            "points": [list(p) for p in group.points],
            "seeds": cfg.seeds,
            "particles": cfg.particles,
            "gradient_split": split,
            "discrete_share": share,
            "mesh": mesh_rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
