"""The ``mfattn`` command line.

    mfattn rates [--config FILE.toml] [--out DIR] [--quick]

measures how fast trained discrete transformers approach their mean-field limit, uniformly over inputs,
as depth and heads grow, and fits the rates (results.csv, summary.json and plots in DIR; rerunning with the
same DIR resumes);

    mfattn gradcheck [--depth 4 --heads 3 --tokens 7 --dim 5 --head-dim 3 --beta 1.0 --seed 0]

runs the float64 comparison of the hand-derived backward pass against autodiff on a random instance
of the given size and prints the largest relative error of each quantity (exit status 1 if any
exceeds ``--tol``).
"""

from __future__ import annotations

import argparse
import sys
import time


def _gradcheck(args) -> int:
    import jax

    from .gradcheck import gradcheck

    t0 = time.perf_counter()
    errors = gradcheck(
        depth=args.depth,
        heads=args.heads,
        tokens=args.tokens,
        dim=args.dim,
        head_dim=args.head_dim,
        beta=args.beta,
        seed=args.seed,
        padding=not args.no_padding,
    )
    elapsed = time.perf_counter() - t0
    print(
        f"mfattn gradcheck: L={args.depth} H={args.heads} N={args.tokens} d={args.dim} k={args.head_dim} "
        f"beta={args.beta} seed={args.seed} padding={not args.no_padding} (float64, {jax.default_backend()})"
    )
    print(f"{'quantity':<18} {'rel. error':>12}  status")
    worst = 0.0
    for name, err in errors.items():
        worst = max(worst, err)
        print(f"{name:<18} {err:12.3e}  {'ok' if err <= args.tol else 'FAIL'}")
    print(f"largest relative error {worst:.3e} (tolerance {args.tol:.0e}); {elapsed:.1f} s")
    return 0 if worst <= args.tol else 1


def _rates(args) -> int:
    from .rates import load_config, run

    cfg = load_config(args.config, quick=args.quick)
    out = args.out or ("runs/rates-quick" if args.quick else "runs/rates")
    t0 = time.perf_counter()
    summary = run(cfg, out, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print(summary["table"])
    print()
    fits = summary["fits"]
    for kind in ("pointwise_err", "uniform_err"):
        f = fits.get("final", {}).get(kind, {}).get("free")
        if f:
            print(
                f"{kind}: err = a/L + b L^-alpha H^-gamma with alpha = {_interval(f, 'alpha')}, "
                f"gamma = {_interval(f, 'gamma')} (theorem: 1/3, 1/2; pointwise expectation: 1/2, 1/2)"
            )
    print(f"results, summary.json and plots in {out}/ ({elapsed:.0f} s)")
    return 0


def _interval(fit: dict, name: str) -> str:
    """``estimate [lo, hi]`` from a fits.fit_rate result with bootstrap intervals in ``fit["ci"]``."""
    est = fit.get(name)
    if not isinstance(est, (int, float)):
        return str(est)
    lo_hi = fit.get("ci", {}).get(name)
    if lo_hi and None not in lo_hi:
        return f"{est:.2f} [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"
    return f"{est:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mfattn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gradcheck", help="hand-derived adjoints and gradients against autodiff (float64)")
    g.add_argument("--depth", type=int, default=4, help="L, number of layers")
    g.add_argument("--heads", type=int, default=3, help="H, heads per layer")
    g.add_argument("--tokens", type=int, default=7, help="N, tokens")
    g.add_argument("--dim", type=int, default=5, help="d, token dimension")
    g.add_argument("--head-dim", type=int, default=3, help="k, head dimension")
    g.add_argument("--beta", type=float, default=1.0, help="inverse temperature (>= 0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-padding", action="store_true", help="no zero-weight token")
    g.add_argument("--tol", type=float, default=1e-9, help="largest acceptable relative error")
    g.set_defaults(func=_gradcheck)
    r = sub.add_parser("rates", help="discrete-to-limit convergence rates, uniformly over inputs (the main job)")
    r.add_argument("--config", default=None, help="TOML file overriding the built-in default configuration")
    r.add_argument("--out", default=None, help="run folder (default runs/rates, or runs/rates-quick)")
    r.add_argument("--quick", action="store_true", help="a small configuration (about a minute) for smoke tests")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_rates)
    args = parser.parse_args(argv)
    if args.command == "gradcheck":
        for name in ("depth", "heads", "tokens", "dim", "head_dim"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be a positive integer")
        if args.beta < 0:
            parser.error("--beta must be >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
