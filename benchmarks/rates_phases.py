"""Where a `mfattn rates` run's time goes: the wall time of each phase (compilation included in the first call of
each jitted piece), side by side with and without compiling each group's programs ahead on a second thread
(`rates.run(..., compile_ahead=...)`, JAX's caches cleared before each run; the two runs' rows must be identical),
and one training step split into the limit's gradients and the discrete models' (both timed after warm-up, in the
same process).

    python benchmarks/rates_phases.py            # the default configuration (about 10 minutes: two runs)
    python benchmarks/rates_phases.py --quick    # the smoke-test configuration
    python benchmarks/rates_phases.py --config studies/rates.toml --only-ahead

Prints a table and writes benchmarks/results/rates_phases.json (rates_phases_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax

from mfattn import limit, rates
from mfattn.rates import driver
from mfattn.train import batch_grad_map


def _median(fn, repeats=3):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def step_split(cfg) -> dict:
    """One training step's gradients: the limit's replicas (all particles) against every seed's discrete models."""
    group = driver.groups(cfg)[0]
    task = driver._task(cfg, group.num_tokens, group.dim)
    problem = driver._problem(cfg, task, cfg.grid_size, cfg.solver_steps * (cfg.grid_size - 1))
    reps = driver._replicas(cfg, jax.random.key(0), cfg.grid_size, cfg.particles, group.dim)
    disc = driver._discrete(cfg, list(range(cfg.seeds)), group.points, group.dim, "bench")
    batch = task.sample(jax.random.key(1), cfg.batch_size)
    kw = problem.solve_kwargs()

    @jax.jit
    def limit_grads(reps):
        one = lambda e: limit.batch_grad_map(
            e,
            batch.tokens,
            batch.weights,
            batch.targets,
            problem.loss,  # noqa: E731
            beta=problem.beta,
            grid=problem.grid,
            **kw,
        )[1]
        return jax.vmap(one)(reps)

    @jax.jit
    def discrete_grads(disc):
        one = lambda q: batch_grad_map(
            q,
            batch.tokens,
            batch.weights,
            batch.targets,
            problem.loss,  # noqa: E731
            beta=problem.beta,
            attention=problem.spec,
        )[1]
        return tuple(jax.vmap(jax.vmap(one))(p) for p in disc)

    t_lim = _median(lambda: limit_grads(reps))
    t_disc = _median(lambda: discrete_grads(disc))
    return {
        "limit_grads_s": t_lim,
        "discrete_grads_s": t_disc,
        "discrete_share": t_disc / (t_lim + t_disc),
        "particles": cfg.particles,
        "seeds": cfg.seeds,
        "points": len(group.points),
    }


def _run(cfg, ahead: bool) -> tuple[float, list, str]:
    jax.clear_caches()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = rates.run(cfg, os.path.join(tmp, "run"), compile_ahead=ahead)
        total = time.perf_counter() - t0
        with open(os.path.join(tmp, "run", "results.csv")) as f:
            results = f.read()
    rows = [(group, phase, s) for group, block in summary["timings_s"].items() for phase, s in block.items()]
    return total, rows, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", default=None)
    p.add_argument("--only-ahead", action="store_true", help="one run, compiling ahead (no comparison)")
    p.add_argument("--out", default=None, help="JSON path")
    a = p.parse_args(argv)
    cfg = rates.load_config(a.config, quick=a.quick)
    if cfg.precision == "float64":
        jax.config.update("jax_enable_x64", True)
    modes = (True,) if a.only_ahead else (False, True)
    runs = {ahead: _run(cfg, ahead) for ahead in modes}
    identical = None if a.only_ahead else runs[True][2] == runs[False][2]
    split = step_split(cfg)
    label = {False: "in line", True: "ahead"}
    print(f"{'group':<14}{'phase':<62}" + "".join(f"{label[m] + ' (s)':>12}" for m in modes))
    keys = list(dict.fromkeys((g, ph) for m in modes for g, ph, _ in runs[m][1]))
    for g, ph in keys:
        vals = [next((s for gg, pp, s in runs[m][1] if (gg, pp) == (g, ph)), None) for m in modes]
        print(f"{g:<14}{ph[:61]:<62}" + "".join(f"{'-' if v is None else f'{v:.1f}':>12}" for v in vals))
    print(f"{'total (wall, with start-up)':<76}" + "".join(f"{runs[m][0]:>12.1f}" for m in modes))
    if identical is not None:
        print(f"compiling ahead: {runs[False][0] / runs[True][0]:.2f}x faster end to end; identical rows: {identical}")
    print(
        f"one training step's gradients (after warm-up): limit {split['limit_grads_s']:.3f} s "
        f"({split['particles']} particles), discrete models {split['discrete_grads_s']:.4f} s "
        f"({split['seeds']} seeds x {split['points']} points): {split['discrete_share']:.1%} of the two"
    )
    out = a.out or os.path.join(
        os.path.dirname(__file__), "results", "rates_phases_quick.json" if a.quick else "rates_phases.json"
    )
    with open(out, "w") as f:
        json.dump(
            {
                "config": "quick" if a.quick else (a.config or "default"),
                "total_s": runs[True][0],
                "phases": [{"group": g, "phase": ph, "seconds": s} for g, ph, s in runs[True][1]],
                "in_line": None
                if a.only_ahead
                else {
                    "total_s": runs[False][0],
                    "phases": [{"group": g, "phase": ph, "seconds": s} for g, ph, s in runs[False][1]],
                },
                "identical_rows": identical,
                "step_split": split,
                "machine": {"backend": jax.default_backend(), "cpu_count": os.cpu_count()},
            },
            f,
            indent=2,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
