"""The ``mfattn`` command line.

    mfattn rates [--config FILE.toml] [--out DIR] [--quick] [--host-devices N]

measures how fast trained discrete transformers approach their mean-field limit, uniformly over inputs,
as depth and heads grow, and fits the rates (results.csv, summary.json and plots in DIR; rerunning with the
same DIR resumes);

    mfattn gradcheck [--depth 4 --heads 3 --tokens 7 --dim 5 --head-dim 3 --beta 1.0 --seed 0]
                     [--attention softmax|unnormalized|l2|sigmoid|sinkhorn --causal --sphere]

runs the float64 comparison of the hand-derived backward pass against autodiff on a random instance
of the given size and prints the largest relative error of each quantity (exit status 1 if any
exceeds ``--tol``);

    mfattn phase [--out DIR] [--tokens 32] [--betas 0:9:19] [--time 60] [--steps 600] [--seeds 16] [--quick]

draws the clustering phase diagram of self-attention on the circle (Geshkovski et al.): the fraction of
aligned token pairs over (time, beta) for d = 2, W_Q = W_K = W_V = I and the normalised residual, averaged
over random initial conditions, and prints per beta the time to 90% aligned pairs (phase.png, phase.json
and phase.csv in DIR; about 8 s on a 2-core CPU, ``--quick`` a few seconds);

    mfattn bench [--quick] [--only NAME] [--rates] [--out FILE.json]

runs the benchmark suite (forward, hand backward variants beside jax.value_and_grad, a training step,
compile time against depth, the limit, optionally the default rates run) and prints one table of times,
compile times, peak memory and GFLOP/s against the machine's measured matmul rate, with the targets
(``--quick`` results go to benchmarks/results/bench_quick.json unless ``--out`` is given).

``mfattn --version`` prints the version. A bad option or setting is a usage error (exit status 2, one line,
before any work); Ctrl-C prints one line and exits with status 130 (rerunning the same command resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

INTERRUPTED = "interrupted; rerun the same command to resume"


def _gradcheck(args) -> int:
    import jax

    from .attention import Attention
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
        attention=Attention(args.attention, causal=args.causal, residual="sphere" if args.sphere else "euler"),
    )
    elapsed = time.perf_counter() - t0
    print(
        f"mfattn gradcheck: L={args.depth} H={args.heads} N={args.tokens} d={args.dim} k={args.head_dim} "
        f"beta={args.beta} seed={args.seed} padding={not args.no_padding} attention={args.attention}"
        f"{' causal' if args.causal else ''}{' sphere' if args.sphere else ''} (float64, {jax.default_backend()})"
    )
    print(f"{'quantity':<18} {'rel. error':>12}  status")
    failed = [name for name, err in errors.items() if not (math.isfinite(err) and err <= args.tol)]
    for name, err in errors.items():
        print(f"{name:<18} {err:12.3e}  {'FAIL' if name in failed else 'ok'}")
    finite = [err for err in errors.values() if math.isfinite(err)]
    worst = max(finite, default=0.0) if len(finite) == len(errors) else math.nan
    print(f"largest relative error {worst:.3e} (tolerance {args.tol:.0e}); {elapsed:.1f} s")
    if failed:
        print(f"FAIL: {', '.join(failed)} {'is' if len(failed) == 1 else 'are'} non-finite or above the tolerance")
    return 1 if failed or not errors else 0


class _RatesProgress:
    """A tqdm bar over the run's work units (:func:`mfattn.rates.work_units`, in limit solves), its label the phase
    now running; the ETA follows the measured rate of units."""

    def __init__(self, cfg):
        from tqdm.auto import tqdm

        from .rates import work_units

        u = work_units(cfg)
        self.bar = tqdm(
            total=round(u["control"] + sum(g["total"] for g in u["groups"]), 1),
            desc="rates",
            unit="solve",
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}]",
        )

    def __call__(self, phase: str, units: float) -> None:
        self.bar.set_description(f"rates: {phase}", refresh=False)
        # work_units is an estimate (the search stops early per point): never run past the total
        self.bar.update(max(0.0, min(units, self.bar.total - self.bar.n)))

    def close(self):
        self.bar.close()


def _rates(args) -> int:
    from .rates import report, run

    if args.report:
        summary = report(args.report)
        print(summary["table"])
        print(f"summary.json rebuilt and plots redrawn in {args.report}/")
        return 0
    cfg = args.rates_config
    out = args.out
    if cfg.precision == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # the application's choice, before any array exists
    t0 = time.perf_counter()
    bar = None if args.no_progress else _RatesProgress(cfg)
    try:
        summary = run(cfg, out, progress=bar, log=lambda m: print(m, file=sys.stderr))
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    print(summary["table"])
    print(f"results, summary.json and plots in {out}/ ({elapsed:.0f} s)")
    return 0


def _phase_config(args):
    """The :class:`~mfattn.phase.PhaseConfig` of the command line: ``--quick`` or the default, with the
    options given overriding it (``ValueError`` if invalid)."""
    from .phase import QUICK, PhaseConfig

    overrides = {
        name: getattr(args, name)
        for name in ("tokens", "betas", "time", "steps", "seeds", "threshold", "seed")
        if getattr(args, name) is not None
    }
    return dataclasses.replace(QUICK if args.quick else PhaseConfig(), **overrides)


def _phase(args) -> int:
    from .phase import run, summary_line

    cfg = _phase_config(args)
    out = args.out or ("runs/phase-quick" if args.quick else "runs/phase")
    t0 = time.perf_counter()
    result = run(cfg, out)
    elapsed = time.perf_counter() - t0
    print(
        f"mfattn phase: N={cfg.tokens} d={cfg.dim} T={cfg.time:g} L={cfg.steps} (step {cfg.time / cfg.steps:g}) "
        f"seeds={cfg.seeds} threshold={cfg.threshold:g}"
    )
    print(result["table"])
    print(summary_line(result, cfg))
    print(f"phase.png, phase.json and phase.csv in {out}/ ({elapsed:.1f} s)")
    return 0


def _betas(text: str):
    from .phase import parse_betas

    try:
        return parse_betas(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(low: float, *, strict: bool):
    """An argparse type: a finite float ``>= low`` (``> low`` if ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if strict else '>='} {low:g}, got {text!r}"
            )
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status (``SystemExit(2)``
    for a usage error, as argparse does)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``mfattn gradcheck: error: ... (see --help)``, exit status 2."""

    def error(self, message: str):
        one_line = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {one_line} (see {self.prog} --help)\n")


def _main(argv: list[str] | None) -> int:
    from . import __version__

    parser = _Parser(prog="mfattn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"mfattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gradcheck", help="hand-derived adjoints and gradients against autodiff (float64)")
    g.add_argument("--depth", type=int, default=4, help="L, number of layers")
    g.add_argument("--heads", type=int, default=3, help="H, heads per layer")
    g.add_argument("--tokens", type=int, default=7, help="N, tokens")
    g.add_argument("--dim", type=int, default=5, help="d, token dimension")
    g.add_argument("--head-dim", type=int, default=3, help="k, head dimension")
    g.add_argument("--beta", type=_number(0.0, strict=False), default=1.0, help="inverse temperature (>= 0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-padding", action="store_true", help="no zero-weight token")
    g.add_argument(
        "--tol", type=_number(0.0, strict=True), default=1e-9, help="largest acceptable relative error (> 0)"
    )
    g.add_argument(
        "--attention",
        default="softmax",
        choices=["softmax", "unnormalized", "l2", "sigmoid", "sinkhorn"],
        help="attention kernel (see mfattn.Attention)",
    )
    g.add_argument("--causal", action="store_true", help="causal masking")
    g.add_argument("--sphere", action="store_true", help="normalised residual (tokens on the unit sphere)")
    g.set_defaults(func=_gradcheck)
    r = sub.add_parser("rates", help="discrete-to-limit convergence rates, uniformly over inputs (the main job)")
    r.add_argument("--config", default=None, help="TOML file overriding the built-in default configuration")
    r.add_argument("--out", default=None, help="run folder (default runs/rates, or runs/rates-quick)")
    r.add_argument("--quick", action="store_true", help="a small configuration (about a minute) for smoke tests")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--print-config", action="store_true", help="print every setting with its default and meaning")
    r.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="rebuild the table, summary.json and plots of an existing run folder (no computation)",
    )
    r.add_argument(
        "--host-devices",
        type=int,
        default=None,
        metavar="N",
        help="on CPU: split it into N simulated devices and run on their mesh (whether it pays depends on the sizes)",
    )
    r.set_defaults(func=_rates)
    ph = sub.add_parser("phase", help="clustering phase diagram on the circle: aligned pairs over (time, beta)")
    ph.add_argument("--out", default=None, help="output folder (default runs/phase, or runs/phase-quick)")
    ph.add_argument("--tokens", type=int, default=None, help="N, tokens (default 32)")
    ph.add_argument(
        "--betas", type=_betas, default=None, help="list 'b1,b2,...' or range 'start:stop:count' (default 0:9:19)"
    )
    ph.add_argument("--time", type=float, default=None, help="final time T (default 60)")
    ph.add_argument("--steps", type=int, default=None, help="L, layers = time steps of size T/L (default 600)")
    ph.add_argument("--seeds", type=int, default=None, help="random initial conditions per beta (default 16)")
    ph.add_argument("--threshold", type=float, default=None, help="aligned: <x_i, x_j> > 1 - threshold (1e-2)")
    ph.add_argument("--seed", type=int, default=None, help="PRNG seed of the initial conditions (default 0)")
    ph.add_argument("--quick", action="store_true", help="a small configuration (a few seconds) for smoke tests")
    ph.set_defaults(func=_phase)
    from . import bench

    b = sub.add_parser("bench", help="the benchmark suite: times, compile, memory, GFLOP/s against matmul, targets")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run_from_args)
    args = parser.parse_args(argv)
    error = {"gradcheck": g, "rates": r, "phase": ph, "bench": b}[args.command].error  # 'mfattn rates: error: ...'
    if args.command == "gradcheck":
        for name in ("depth", "heads", "tokens", "dim", "head_dim"):
            if getattr(args, name) < 1:
                error(f"--{name.replace('_', '-')} must be a positive integer")
        if args.causal and args.attention == "sinkhorn":
            error("--causal is not defined for sinkhorn attention")
    if args.command == "rates" and args.print_config:
        from .rates import load_config, print_config

        try:
            print(print_config(load_config(args.config, quick=args.quick)))
        except (ValueError, TypeError) as err:
            error(str(err))
        return 0
    if args.command == "rates" and args.report:
        import os

        if not os.path.exists(os.path.join(args.report, "config.json")):
            error(f"--report {args.report}: not a rates run folder (no config.json)")
        return args.func(args)
    if args.command == "rates":
        if args.host_devices is not None:
            if args.host_devices < 1:
                error("--host-devices must be a positive integer")
            from .sharding import force_host_devices

            force_host_devices(args.host_devices)  # before anything runs on JAX
        from .rates import check_folder, load_config
        from .runfolder import check_out_path

        args.out = args.out or ("runs/rates-quick" if args.quick else "runs/rates")
        try:
            check_out_path(args.out, who="rates")
            args.rates_config = load_config(args.config, quick=args.quick)
            check_folder(args.rates_config, args.out)
        except (
            OSError,
            ValueError,
            TypeError,
        ) as err:  # a missing or unreadable file, bad TOML or setting, another run
            error(str(err))
    if args.command == "phase":
        try:
            _phase_config(args)
        except ValueError as err:
            error(str(err))
    if args.command == "bench":
        try:
            bench.check_args(args)
        except ValueError as err:
            error(str(err))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
