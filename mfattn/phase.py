"""Clustering phase diagram of self-attention on the circle (Geshkovski, Letrouit, Polyanskiy, Rigollet).

``N`` tokens start i.i.d. uniform on the unit sphere ``S^{d-1}`` (``d = 2``: the circle) and move through a
deep transformer with ``W_Q = W_K = W_V = I`` and the normalised residual::

    x_i^{l+1} = (x_i^l + h F_i) / |x_i^l + h F_i|,   F_i = sum_j softmax_j(beta <x_i^l, x_j^l>) x_j^l,

``h = T / L``: ``L`` layers of :func:`mfattn.forward` with ``mfattn.Attention(residual="sphere")``, every
layer one head with ``W_Q = W_K = W_V = I`` and ``W_O = T I`` (the velocity is linear in ``W_O`` and the
residual step is ``1 / L``). As ``L -> inf`` this is Geshkovski et al.'s (SA) dynamics on the sphere
``dx_i/dt = P_{x_i}(F_i)`` (``P_x = I - x x^T``) up to time ``T``: tokens cluster, and in the long run they
gather into a single cluster from almost every initial condition (proved by Geshkovski et al. for
``d >= 3``), after metastable multi-cluster states whose lifetime grows quickly with ``beta``.

The diagnostic is the fraction of aligned pairs, :func:`mfattn.metrics.aligned_fraction` (pairs of
distinct tokens with ``<x_i, x_j> > 1 - threshold``), averaged over ``seeds`` random initial conditions,
on the grid of layer times ``t_l = l T / L`` and inverse temperatures ``beta``. The picture it reproduces,
qualitatively: at small ``beta`` all tokens gather quickly into one cluster; as ``beta`` grows they first
form several clusters which merge only after long, metastable plateaus, so the time to reach 90% aligned
pairs grows quickly with ``beta`` (beyond the time horizon for the larger ``beta``).

Everything is one compiled program: ``jax.vmap`` over ``beta`` and over the initial conditions, the layers
a ``lax.scan`` inside :func:`mfattn.forward`; no Python loop over tokens, layers or temperatures.

:func:`run` (the ``mfattn phase`` command) writes ``phase.png`` (heatmap: time on x, ``beta`` on y, colour
the mean aligned fraction, with the 90% contour), ``phase.json`` (configuration, the grid, per-seed times
to 90%) and ``phase.csv`` (one row per ``beta`` and time), and returns a summary with a printable table.

The default (``N = 32``, 19 values of ``beta`` in ``[0, 9]``, ``T = 60`` in 600 steps, 16 initial conditions)
takes about 8 s on a 2-core CPU (float32). It gives mean times to 90% aligned pairs (per-seed times
averaged, ``T`` where not reached) of 7.3, 8.2, 11.9, 23.4, 34.6, 46.2, 57.8 at ``beta`` = 0, 1, 1.5, 2, 2.5,
3, 4; from ``beta = 5`` no initial condition reaches 90% by ``T = 60``, and the final aligned fraction falls
from 1 (``beta <= 1.5``) to 0.59 (``beta = 4``) and 0.39 (``beta = 9``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .attention import Attention
from .metrics import aligned_fraction
from .params import Params
from .particles import forward

__all__ = [
    "PhaseConfig",
    "QUICK",
    "identity_params",
    "uniform_on_sphere",
    "aligned_fractions",
    "first_time",
    "phase_diagram",
    "phase_figure",
    "plot_phase",
    "table",
    "summary_line",
    "parse_betas",
    "run",
]

SPHERE = Attention(residual="sphere")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """Settings of the phase diagram (the ``mfattn phase`` options).

    Attributes:
        tokens: ``N``, tokens per sequence.
        betas: inverse temperatures (the y axis).
        time: ``T``, the final time (the x axis runs over ``[0, T]``).
        steps: ``L``, layers (time steps of size ``T / L``; ``T / L <= 0.1`` keeps the Euler error small).
        seeds: random initial conditions per ``beta`` (the same ``seeds`` sequences for every ``beta``).
        dim: ``d`` (2: the circle).
        threshold: a pair is aligned when ``<x_i, x_j> > 1 - threshold``.
        level: the aligned fraction whose first-passage time is reported (0.9).
        seed: PRNG seed of the initial conditions.
    """

    tokens: int = 32
    betas: tuple[float, ...] = tuple(float(b) for b in np.linspace(0.0, 9.0, 19))
    time: float = 60.0
    steps: int = 600
    seeds: int = 16
    dim: int = 2
    threshold: float = 1e-2
    level: float = 0.9
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("time", "threshold", "level"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("tokens", "steps", "seeds", "dim"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"PhaseConfig: {name} must be a positive integer, got {value!r}.")
        if self.tokens < 2:
            raise ValueError(f"PhaseConfig: tokens must be >= 2 (pairs), got {self.tokens}.")
        if not self.betas or not all(math.isfinite(b) and b >= 0 for b in self.betas):
            raise ValueError(f"PhaseConfig: betas must be a non-empty list of finite values >= 0, got {self.betas}.")
        if not (math.isfinite(self.time) and self.time > 0):
            raise ValueError(f"PhaseConfig: time must be > 0, got {self.time!r}.")
        if not (0 < self.threshold <= 2):
            raise ValueError(f"PhaseConfig: threshold must be in (0, 2], got {self.threshold!r}.")
        if not (0 < self.level <= 1):
            raise ValueError(f"PhaseConfig: level must be in (0, 1], got {self.level!r}.")


#: A small configuration for smoke tests (a few seconds).
QUICK = PhaseConfig(tokens=16, betas=(0.0, 2.0, 4.0, 8.0), time=20.0, steps=100, seeds=4)


def identity_params(depth: int, dim: int, time, dtype=None) -> Params:
    """``L = depth`` layers of one head with ``W_Q = W_K = W_V = I`` and ``W_O = T I`` (leaves
    ``(L, 1, d, d)``): with the residual step ``1 / L`` each layer advances the time by ``T / L``."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=dtype), (depth, 1, dim, dim))
    return Params(eye, eye, eye, jnp.asarray(time, dtype) * eye)


def uniform_on_sphere(key, shape: tuple[int, ...], dtype=None) -> Array:
    """I.i.d. uniform points on the unit sphere: normalised standard Gaussians, ``shape = (..., d)``."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    g = jax.random.normal(key, shape, dtype)
    return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def aligned_fractions(
    params: Params, tokens: Float[Array, "S N d"], betas: Float[Array, " B"], threshold: float
) -> Float[Array, "B S L1"]:
    """Aligned fraction at every layer ``l = 0..L``, for every ``beta`` and initial condition.

    Args:
        params: the model (:func:`identity_params`), leaves ``(L, 1, d, d)``.
        tokens: ``(S, N, d)`` initial conditions on the unit sphere (uniform masses).
        betas: ``(B,)`` inverse temperatures.
        threshold: alignment threshold of :func:`mfattn.metrics.aligned_fraction`.

    Returns:
        ``(B, S, L + 1)``. One compiled program: ``vmap`` over ``beta`` and initial conditions.
    """
    return _aligned_fractions(params, tokens, betas, threshold)


@jax.jit
def _aligned_fractions(params, tokens, betas, threshold):
    n = tokens.shape[1]
    weights = jnp.full((n,), 1.0 / n, tokens.dtype)

    def one(beta, x0):
        traj = forward(params, x0, beta=beta, weights=weights, attention=SPHERE)  # (L+1, N, d)
        return jax.vmap(lambda x: aligned_fraction(x, weights, threshold))(traj)

    return jax.vmap(lambda b: jax.vmap(lambda x0: one(b, x0))(tokens))(betas)


def first_time(times: np.ndarray, fractions: np.ndarray, level: float) -> np.ndarray:
    """First time at which ``fractions`` (``(..., T)``, along ``times (T,)``) reaches ``level``; ``inf`` where it
    never does."""
    fractions = np.asarray(fractions)
    reached = fractions >= level
    first = np.argmax(reached, axis=-1)
    return np.where(np.any(reached, axis=-1), np.asarray(times)[first], np.inf)


def phase_diagram(cfg: PhaseConfig = PhaseConfig()) -> dict:
    """The aligned fraction over (time, ``beta``), for ``cfg.seeds`` initial conditions.

    Returns a dict of NumPy arrays and numbers:

    * ``times`` ``(L + 1,)``, ``betas`` ``(B,)``;
    * ``fraction`` ``(B, S, L + 1)``: per ``beta``, initial condition and time; ``mean`` ``(B, L + 1)`` its
      average over the initial conditions;
    * ``t_level_mean`` ``(B,)``: first time the mean fraction reaches ``cfg.level`` (``inf`` if not by ``T``);
    * ``t_level_seeds`` ``(B, S)``: the same per initial condition; ``reached`` ``(B,)``: the share of
      initial conditions that reach it by ``T``; ``t_level_censored`` ``(B,)``: the mean over initial
      conditions of the per-seed times with ``inf`` replaced by ``T`` (a lower bound on the mean time);
    * ``final`` ``(B,)``: mean fraction at ``T``.
    """
    dtype = jnp.zeros(()).dtype
    params = identity_params(cfg.steps, cfg.dim, cfg.time, dtype)
    x0 = uniform_on_sphere(jax.random.key(cfg.seed), (cfg.seeds, cfg.tokens, cfg.dim), dtype)
    betas = jnp.asarray(cfg.betas, dtype)
    fraction = np.asarray(aligned_fractions(params, x0, betas, cfg.threshold))
    times = np.linspace(0.0, cfg.time, cfg.steps + 1)
    mean = fraction.mean(axis=1)
    per_seed = first_time(times, fraction, cfg.level)
    return {
        "times": times,
        "betas": np.asarray(cfg.betas),
        "fraction": fraction,
        "mean": mean,
        "t_level_mean": first_time(times, mean, cfg.level),
        "t_level_seeds": per_seed,
        "reached": np.mean(np.isfinite(per_seed), axis=1),
        "t_level_censored": np.mean(np.minimum(per_seed, cfg.time), axis=1),
        "final": mean[:, -1],
    }


def _beta_edges(betas: np.ndarray) -> np.ndarray:
    """Cell edges around the (sorted, non-negative) ``betas`` for the heatmap: midpoints between neighbours,
    half a cell beyond the ends (a lone value gets +-0.5), the lowest edge clipped at 0 so that the axis never
    shows a negative inverse temperature."""
    betas = np.asarray(betas, dtype=float)
    if betas.size == 1:
        edges = np.array([betas[0] - 0.5, betas[0] + 0.5])
    else:
        mid = (betas[1:] + betas[:-1]) / 2
        edges = np.concatenate([[betas[0] - (mid[0] - betas[0])], mid, [betas[-1] + (betas[-1] - mid[-1])]])
    edges[0] = max(edges[0], 0.0)
    return edges


def _time_edges(times: np.ndarray) -> np.ndarray:
    times = np.asarray(times, dtype=float)
    if times.size == 1:
        return np.array([times[0], times[0] + 1.0])
    mid = (times[1:] + times[:-1]) / 2
    return np.concatenate([[max(times[0] - (mid[0] - times[0]), 0.0)], mid, [times[-1] + (times[-1] - mid[-1])]])


def phase_figure(result: dict, cfg: PhaseConfig = PhaseConfig()):
    """The phase diagram as a :class:`matplotlib.figure.Figure`: heatmap of the mean aligned fraction (time on
    x, ``beta`` on y, both axes starting at 0), the ``cfg.level`` contour, and the per-``beta`` median time to
    ``cfg.level`` over the initial conditions. Labels are rendered as mathematics (mathtext)."""
    from matplotlib.figure import Figure

    times, betas, mean = np.asarray(result["times"]), np.asarray(result["betas"]), np.asarray(result["mean"])
    order = np.argsort(betas, kind="stable")
    betas, mean = betas[order], mean[order]
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    beta_edges, time_edges = _beta_edges(betas), _time_edges(times)
    mesh = ax.pcolormesh(time_edges, beta_edges, mean, shading="flat", vmin=0.0, vmax=1.0, cmap="viridis")
    if len(betas) > 1:
        ax.contour(times, betas, mean, levels=[cfg.level], colors="white", linewidths=1.2)
    median = np.median(np.asarray(result["t_level_seeds"])[order], axis=1)
    ok = np.isfinite(median)
    level = f"{100 * cfg.level:g}\\%"
    ax.plot(median[ok], betas[ok], "o", color="white", markersize=3, label=f"median time to ${level}$ aligned")
    ax.set_xlim(time_edges[0], time_edges[-1])
    ax.set_ylim(beta_edges[0], beta_edges[-1])
    ax.set_xlabel(r"time $t$")
    ax.set_ylabel(r"inverse temperature $\beta$")
    ax.set_title(
        f"aligned pairs ($\\langle x_i, x_j\\rangle > 1 - {cfg.threshold:g}$), $N = {cfg.tokens}$, "
        f"$d = {cfg.dim}$, {cfg.seeds} seeds",
        fontsize=9,
    )
    if ok.any():
        ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(mesh, ax=ax, label="fraction of aligned pairs")
    return fig


def plot_phase(result: dict, path: str, cfg: PhaseConfig = PhaseConfig()) -> str:
    """Save :func:`phase_figure` to ``path`` (PNG) and return ``path``."""
    phase_figure(result, cfg).savefig(path, dpi=120)
    return path


def table(result: dict, cfg: PhaseConfig = PhaseConfig()) -> str:
    """A printable table: per ``beta``, the times to ``cfg.level`` and the final aligned fraction."""
    pct = f"{cfg.level:.0%}"
    head = f"{'beta':>6} {'t(mean>=' + pct + ')':>14} {'median t' + pct:>11} {'reached':>8} {'final':>6}"
    lines = [head, "-" * len(head)]
    horizon = f">{cfg.time:g}"
    for i, beta in enumerate(result["betas"]):
        t_mean = result["t_level_mean"][i]
        median = float(np.median(result["t_level_seeds"][i]))
        lines.append(
            f"{beta:6.2f} {(f'{t_mean:.1f}' if math.isfinite(t_mean) else horizon):>14} "
            f"{(f'{median:.1f}' if math.isfinite(median) else horizon):>11} "
            f"{result['reached'][i]:8.0%} {result['final'][i]:6.3f}"
        )
    return "\n".join(lines)


def run(cfg: PhaseConfig = PhaseConfig(), out_dir: str = "runs/phase") -> dict:
    """Compute the phase diagram and write ``phase.png``, ``phase.json`` and ``phase.csv`` to ``out_dir``.

    Returns the dict of :func:`phase_diagram` with ``table`` (printable), ``files`` and ``wall_s`` added.
    """
    t0 = time.perf_counter()
    result = phase_diagram(cfg)
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "png": plot_phase(result, os.path.join(out_dir, "phase.png"), cfg),
        "json": os.path.join(out_dir, "phase.json"),
        "csv": os.path.join(out_dir, "phase.csv"),
    }
    std = result["fraction"].std(axis=1)
    with open(files["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["beta", "time", "fraction_mean", "fraction_std"])
        for i, beta in enumerate(result["betas"]):
            for k, t in enumerate(result["times"]):
                writer.writerow([f"{beta:.6g}", f"{t:.6g}", f"{result['mean'][i, k]:.6g}", f"{std[i, k]:.6g}"])
    wall = time.perf_counter() - t0
    summary = {
        "config": dataclasses.asdict(cfg),
        "dynamics": "x <- (x + h F) / |x + h F|, F = softmax attention with W_Q = W_K = W_V = I, h = time / steps",
        "betas": result["betas"],
        "times": result["times"],
        "fraction_mean": result["mean"],
        "time_to_level": {
            "level": cfg.level,
            "mean_curve": result["t_level_mean"],
            "per_seed": result["t_level_seeds"],
            "reached": result["reached"],
            "censored_mean": result["t_level_censored"],
        },
        "final": result["final"],
        "backend": jax.default_backend(),
        "dtype": str(jnp.zeros(()).dtype),
        "wall_s": wall,
    }
    with open(files["json"], "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    return {**result, "table": table(result, cfg), "files": files, "wall_s": wall}


def parse_betas(text: str) -> tuple[float, ...]:
    """``"0,1,2.5"`` (a list) or ``"start:stop:count"`` (``count`` values from ``start`` to ``stop``,
    inclusive, evenly spaced)."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise ValueError
            return tuple(float(b) for b in np.linspace(start, stop, count))
        return tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"betas must be a list 'b1,b2,...' or a range 'start:stop:count', got {text!r}.") from None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def summary_line(result: dict, cfg: PhaseConfig = PhaseConfig()) -> str:
    """One line: per ``beta``, the mean over initial conditions of the time to ``cfg.level`` (``T`` where it
    is not reached, so a lower bound there)."""
    pairs = ", ".join(f"{b:g}: {v:.1f}" for b, v in zip(result["betas"], result["t_level_censored"]))
    return f"mean time to {cfg.level:.0%} aligned pairs over seeds (not reached -> {cfg.time:g}), by beta: {pairs}"
