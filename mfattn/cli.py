"""The ``mfattn`` command line.

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
