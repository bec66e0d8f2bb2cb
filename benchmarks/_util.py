"""Shared benchmark helpers: compile once (timed separately), warm up, median of repeats,
``block_until_ready`` around every timing, XLA's own memory analysis of the compiled program."""

from __future__ import annotations

import json
import os

import jax

from mfattn import bench as _bench


def measure(fn, *args, repeats: int = 5, min_time: float = 0.0, **kwargs) -> dict:
    """Compile ``jax.jit(fn)`` for ``args``; return compile seconds, median run seconds and memory.

    Memory is XLA's buffer assignment of the compiled program (``memory_analysis``): ``temp`` is the
    scratch space it needs beyond its arguments and outputs -- the quantity that grows when a backward
    pass stores per-layer activations; ``peak_bytes`` adds the arguments and outputs. The same measurement
    as ``mfattn bench`` (:func:`mfattn.bench.measure`; pass ``flops=`` for GFLOP/s), without clearing JAX's
    caches first unless ``fresh=True``.
    """
    kwargs.setdefault("fresh", False)
    return _bench.measure(fn, *args, repeats=repeats, min_time=min_time, **kwargs)


def compile_seconds(fn, *args, repeats: int = 1) -> float:
    """Trace + lower + compile time of ``fn`` with every JAX cache cleared first (best of ``repeats``)."""
    return _bench.compile_seconds(fn, *args, repeats=repeats)


def matmul_gflops(n: int = 2048) -> float:
    """The machine's float32 matmul rate ``2 n^3 / t`` (GFLOP/s), for comparing achieved rates."""
    return _bench.matmul_rate(n)["gflops"]


def temp_bytes(fn, *args) -> int:
    """Scratch memory XLA assigns to ``fn`` (compiles it; no run)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def machine() -> dict:
    return _bench.machine()


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"
