"""Shared benchmark helpers: compile once (timed separately), warm up, median of repeats,
``block_until_ready`` around every timing, XLA's own memory analysis of the compiled program."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def measure(fn, *args, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Compile ``jax.jit(fn)`` for ``args``; return compile seconds, median run seconds and memory.

    Memory is XLA's buffer assignment of the compiled program (``memory_analysis``): ``temp`` is the
    scratch space it needs beyond its arguments and outputs -- the quantity that grows when a backward
    pass stores per-layer activations.
    """
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    out = {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}
    if mem is not None:
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["arg_bytes"] = int(mem.argument_size_in_bytes)
        out["out_bytes"] = int(mem.output_size_in_bytes)
    return out


def compile_seconds(fn, *args) -> float:
    """Trace + lower + compile time of ``fn`` with every JAX cache cleared first."""
    jax.clear_caches()
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def temp_bytes(fn, *args) -> int:
    """Scratch memory XLA assigns to ``fn`` (compiles it; no run)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def machine() -> dict:
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
    }


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"
