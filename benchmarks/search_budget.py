"""How far the supremum search is from converged: one `mfattn rates` run (the default configuration), whose search
phase runs several searches on the same trained models side by side, each timed: the configured search (the
run's own, reported: with the pilots' maximisers among its candidates, `search_pilots`), and on the candidates
without them the configured budget, the same budget under the other step rule, the defaults before 2026-12-07,
the configured pooled over each seed's points (`search_pool`), one more doubling, and one big round (the pilots'
own search, shared by all, is timed apart). Then every (seed, point)
row is evaluated at *every* row's maximiser of the configured search (other seeds' too: one limit solve per input,
`core.evaluate_and_paths`), which no reported search does (it would make the seeds dependent), as a measure of how
shared the peaks are.

Per point: the rms over seeds of each search's estimates against the best value any of them found (the
"best-known"; the supremum is at least that), the last doubling's gain (the convergence test), and the time.

    python benchmarks/search_budget.py            # the default configuration (about 10 minutes)
    python benchmarks/search_budget.py --quick    # the smoke-test configuration

Prints a table and writes benchmarks/results/search_budget.json (search_budget_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax.numpy as jnp
import numpy as np

from mfattn import rates
from mfattn.rates import core, driver, search


def variants(cfg) -> list[tuple[str, dict]]:
    """``(name, sup_search overrides)``; the first is the configuration's own search, the others run on the
    candidates without the pilots' maximisers."""
    base = dict(starts=cfg.ascent_starts, steps=cfg.ascent_steps, rounds=cfg.search_rounds, pool=False,
                step_size=cfg.ascent_step_size, rule=cfg.ascent_rule)  # fmt: skip
    other = "fixed" if cfg.ascent_rule == "monotone" else "monotone"
    return [
        (f"configured ({cfg.search_pilots} pilots' maximisers among the candidates)", base),
        ("the same budget, no pilots", base),
        (f"the same budget, no pilots, {other} rule", dict(base, rule=other)),
        (
            "the defaults before 2026-12-07 (fixed, 1 x 2 at 0.1 R, 2 rounds)",
            dict(base, starts=1, steps=2, step_size=0.1, rounds=2, rule="fixed"),
        ),
        ("no pilots, pooled over the seed's points", dict(base, pool=True)),
        ("no pilots, one more doubling", dict(base, rounds=cfg.search_rounds + 1)),
        (
            f"no pilots, one round, {4 * cfg.ascent_starts} starts x {8 * cfg.ascent_steps} steps",
            dict(base, starts=4 * cfg.ascent_starts, steps=8 * cfg.ascent_steps, rounds=1),
        ),
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default=None)
    args = ap.parse_args(argv)
    cfg = rates.load_config(args.config, quick=args.quick)
    cfg = dataclasses.replace(cfg, control=False, tokens_sweep=[], dims_sweep=[])  # the (L, H) grid's search only
    found: dict = {}
    original, surrogate = driver.sup_search, core.surrogate

    def keep_limit(reps, *a, **k):  # the trained limit, for evaluating every row at every maximiser
        found["reps"] = reps
        return surrogate(reps, *a, **k)

    def searches(problem, sur, discrete, candidates, candidate_paths, exact_errs, w, lmax, exact, **kw):
        if kw.get("seed_rows") is not None:  # the pilots' search: as configured, timed
            t0 = time.perf_counter()
            res = original(problem, sur, discrete, candidates, candidate_paths, exact_errs, w, lmax, exact, **kw)
            found["pilot_seconds"] = time.perf_counter() - t0
            return res
        c0 = driver.base_candidates(cfg)  # the candidates before the pilots' maximisers
        out, values = [], []
        for i, (name, over) in enumerate(variants(cfg)):
            cand, paths, errs = candidates, candidate_paths, exact_errs
            if i > 0:
                cand, errs = candidates[:c0], exact_errs[..., :c0]
                paths = tuple(np.asarray(a)[:c0] for a in candidate_paths)
            t0 = time.perf_counter()
            res = original(problem, sur, discrete, cand, paths, errs, w, lmax, exact, **{**kw, **over})
            seconds = time.perf_counter() - t0
            values.append(res.value)
            out.append((name, over, res, seconds))
            if i == 0:
                configured = res
        # Every row at every row's maximiser of the configured search (other seeds' included).
        S, P = configured.value.shape
        xs = configured.argmax.reshape(S * P, *configured.argmax.shape[2:])
        t0 = time.perf_counter()
        errs = []
        for lo in range(0, xs.shape[0], driver.EVAL_CHUNK):
            part = xs[lo : lo + driver.EVAL_CHUNK]
            n = part.shape[0]
            part = np.concatenate([part, np.repeat(part[-1:], driver.EVAL_CHUNK - n, 0)])
            e = core.evaluate(problem, found["reps"], discrete, jnp.asarray(part), w, lmax)
            errs.append(np.asarray(e.err)[:S, ..., :n])  # the reported seeds (the pilots' rows follow them)
        every = np.fmax(configured.value, np.max(np.concatenate(errs, axis=-1), axis=-1))
        found["every"] = (every, time.perf_counter() - t0)
        found["searches"] = out
        found["best"] = np.max(np.stack(values + [every]), axis=0)
        return configured

    driver.sup_search, core.surrogate = searches, keep_limit
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rates.run(cfg, os.path.join(tmp, "run"))
    finally:
        driver.sup_search, core.surrogate = original, surrogate
    wall = time.perf_counter() - t0
    best = found["best"]
    rms = lambda v: np.sqrt(np.mean(np.asarray(v, float) ** 2, axis=0))  # noqa: E731
    points = cfg.points
    rows = []
    for name, over, res, seconds in found["searches"]:
        gain = search.point_gain(res.value, res.gain)
        rows.append(
            {
                "search": name,
                "settings": {k: v for k, v in over.items()},
                "seconds": seconds,
                "rms": rms(res.value).tolist(),
                "of_best_known": (rms(res.value) / rms(best)).tolist(),
                "point_gain": gain.tolist(),
                "max_gain": float(np.max(gain)),
                "converged": bool(np.max(gain) < cfg.search_tol),
            }
        )
    every, seconds = found["every"]
    rows.append(
        {
            "search": "every row at every row's maximiser (seeds dependent)",
            "seconds": seconds,
            "rms": rms(every).tolist(),
            "of_best_known": (rms(every) / rms(best)).tolist(),
        }
    )
    print(f"\n{'search':<66}{'s':>7}{'max gain':>10}  of best-known per point {points}")
    for r in rows:
        gain = f"{r['max_gain']:.3f}" if "max_gain" in r else ""
        print(f"{r['search']:<66}{r['seconds']:>7.1f}{gain:>10}  " + " ".join(f"{v:.2f}" for v in r["of_best_known"]))
    print(f"(the pilots' own search, shared by every seed: {found.get('pilot_seconds', 0.0):.1f} s)")
    result = {
        "config": "quick" if args.quick else (args.config or "default"),
        "pilots": cfg.search_pilots,
        "pilot_search_s": found.get("pilot_seconds"),
        "points": points,
        "seeds": cfg.seeds,
        "tol": cfg.search_tol,
        "best_known_rms": rms(best).tolist(),
        "searches": rows,
        "wall_s": wall,
    }
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = "search_budget_quick.json" if args.quick else "search_budget.json"
    with open(os.path.join(os.path.dirname(__file__), "results", name), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
