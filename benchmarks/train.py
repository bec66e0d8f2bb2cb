"""Benchmark: training-step time (hand adjoint vs autodiff) and the teacher-student training curve.

1. One jitted ``mfattn.train.train_step`` (batch of 16 sequences, float32, blockwise AdamW) with the
   hand-derived backward pass against ``jax.grad`` through the forward pass, at several sizes, side by side.
2. Teacher-student at L = 8, H = 8, d = k = 4, N = 16: 300 steps of AdamW and of blockwise AdamW from the
   same initialisation; the loss curve, and the largest |theta| against the bound of paper Lemma 26.

    python benchmarks/train.py [--quick] [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import numpy as np
from _util import machine, measure, mib, write_json

import mfattn
from mfattn import optim, tasks
from mfattn.train import train, train_step


def step_rows(sizes, repeats):
    rows = []
    print(
        f"{'N':>5} {'L':>4} {'H':>3} | {'hand ms':>9} {'autodiff ms':>11} {'hand/ad':>7} | "
        f"{'hand MiB':>9} {'ad MiB':>9}"
    )
    for n, depth, heads in sizes:
        task = tasks.TeacherStudent.random(
            jax.random.key(0), dim=16, depth=2, heads=2, head_dim=16, beta=1.0, num_tokens=n
        )
        params = mfattn.init_params(jax.random.key(1), depth, heads, 16, 16)
        opt = optim.blockwise_adamw(1e-3)
        state = opt.init(params)
        batch = task.sample(jax.random.key(2), 16)
        row = {"N": n, "L": depth, "H": heads, "batch": 16, "d": 16, "k": 16}
        for method in ("adjoint", "autodiff"):
            fn = lambda p, s, b, method=method, task=task, opt=opt: train_step(
                p, s, b, loss=task.loss, optimizer=opt, beta=1.0, method=method
            )
            row[method] = measure(fn, params, state, tuple(batch), repeats=repeats)
        row["hand_over_autodiff"] = row["adjoint"]["median_s"] / row["autodiff"]["median_s"]
        rows.append(row)
        print(
            f"{n:>5} {depth:>4} {heads:>3} | {1e3 * row['adjoint']['median_s']:9.1f} "
            f"{1e3 * row['autodiff']['median_s']:11.1f} {row['hand_over_autodiff']:7.2f} | "
            f"{mib(row['adjoint'].get('temp_bytes')):>9} {mib(row['autodiff'].get('temp_bytes')):>9}",
            flush=True,
        )
    return rows


def curve(steps):
    task = tasks.TeacherStudent.random(jax.random.key(0), dim=4, depth=8, heads=8, head_dim=4, beta=1.0, num_tokens=16)
    params = mfattn.init_params(jax.random.key(1), 8, 8, 4, 4)
    out = {}
    for name, opt, wd in (("adamw", optim.adamw, 1e-2), ("blockwise_adamw", optim.blockwise_adamw, 1e-2)):
        t0 = time.perf_counter()
        _, hist = train(
            task,
            params,
            opt(3e-2, weight_decay=wd),
            steps=steps,
            batch_size=32,
            beta=1.0,
            key=jax.random.key(2),
            log_every=50,
            progress=False,
        )
        elapsed = time.perf_counter() - t0
        loss = np.asarray(hist["loss"])
        c = optim.adam_direction_bound(0.9, 0.999)
        init_max = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params))
        out[name] = {
            "loss_at": {str(s): float(np.mean(loss[max(0, s - 5) : s + 5])) for s in (0, 50, 100, 200, steps - 1)},
            "final_over_initial": float(np.mean(loss[-10:]) / np.mean(loss[:10])),
            "max_abs_param": float(max(hist["max_abs_param"])),
            "lemma26_bound": max(init_max, c / wd) if name == "adamw" else None,
            "seconds": elapsed,
        }
        print(
            f"{name:>16}: loss {out[name]['loss_at']['0']:.4g} -> {out[name]['loss_at'][str(steps - 1)]:.4g} "
            f"(x{out[name]['final_over_initial']:.3f}) in {elapsed:.1f} s; max|theta| {out[name]['max_abs_param']:.3f}",
            flush=True,
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [(16, 8, 4), (64, 8, 4)] if args.quick else list(itertools.product([16, 64, 256], [8, 32], [4, 8]))
    rows = step_rows(sizes, args.repeats)
    print()
    curves = curve(60 if args.quick else 300)
    write_json(args.out, {"machine": machine(), "steps": rows, "teacher_student": curves})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
