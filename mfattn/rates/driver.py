"""The rates experiment's driver: draws, phases, rows. It calls the numerics (:mod:`.core`, :mod:`.search`), hands
rows to a writer and reports progress through a callback; files live in :mod:`.io`, plots in :mod:`.plots`,
statistics in :mod:`.stats`.

Phases, in order (each row is handed over as soon as it is computed):

1. **Positive control** (``control = true``): untrained discrete models (heads i.i.d. from ``nu_0``) against a
   reference limit of ``control_particles`` particles (untrained, so one ensemble constant in depth, computed
   once), over the control grid; its pointwise error must follow ``a/L + b (L H)^-1/2`` (Euler + CLT).
2. For every group (the (L, H) grid; each N and each d of the sweeps): one data stream, one limit (``replicas``
   sub-ensembles), every seed's discrete models and coupled heads, trained ``steps`` steps together.
3. Evaluation at the last step: pointwise errors on ``test_inputs`` training-like inputs; the supremum over
   ``5 candidates`` inputs of five families, then the doubling search on the cheap limit; the maximisers are
   re-evaluated against the full limit. With ``search_pilots``, the pilot draws (discrete models from their own
   seed stream, trained with the seeds, never reported) are searched first and their maximisers join the
   candidates of every seed's search.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import limit, optim
from ..metrics import input_families
from ..params import init_params
from ..tasks import TargetMeasure, TeacherStudent
from . import core
from .config import RatesConfig
from .search import pad_rows, point_gain, point_layout, sup_search

__all__ = [
    "Group",
    "Prepared",
    "groups",
    "FAMILIES",
    "PILOT",
    "LABELS",
    "base_candidates",
    "prepare",
    "run_control",
    "run_group",
    "mesh",
    "place",
]

FAMILIES = ("train", "uniform", "clustered", "degenerate", "sphere")
#: The label of a candidate that is a pilot draw's maximiser (``search_pilots``), after the five families.
PILOT = "pilot"
#: Every candidate's label, indexed by the integer labels a group carries (the five families, then the pilots').
LABELS = (*FAMILIES, PILOT)
EVAL_CHUNK = 4  # inputs per call of the evaluation (candidates, and the search's exact rows): one compiled shape
ASCENT_CHUNK = 32  # ascent paths per call of the search (see .search)


@dataclass(frozen=True)
class Group:
    """Sweep points sharing one data stream and one limit: tokens N, width d, optimizer."""

    sweep: str
    num_tokens: int
    dim: int
    optimizer: str
    points: tuple  # ((L, H), ...)

    @property
    def lmax(self) -> int:
        return math.lcm(*(L for L, _ in self.points))


def groups(cfg: RatesConfig) -> list[Group]:
    pts = tuple(sorted(map(tuple, cfg.sweep_points)))
    out = [Group("LH", cfg.num_tokens, cfg.dim, cfg.optimizer, tuple(sorted(cfg.points)))]
    out += [Group("N", n, cfg.dim, cfg.optimizer, pts) for n in cfg.tokens_sweep]
    out += [Group("d", cfg.num_tokens, d, o, pts) for d in cfg.dims_sweep for o in ("adamw", "blockwise_adamw")]
    return out


def _key(cfg: RatesConfig, *tags):
    """A key for one draw, from the base seed and a tag (zlib.crc32: stable across processes, unlike hash)."""
    return jax.random.fold_in(jax.random.key(cfg.seed), zlib.crc32(repr(tags).encode()) % (2**31))


def _dtype(cfg):
    return jnp.float64 if cfg.precision == "float64" else jnp.float32


def _task(cfg: RatesConfig, n: int, d: int):
    dtype = _dtype(cfg)
    if cfg.task == "target_measure":
        return TargetMeasure(
            d,
            n,
            num_points=cfg.target_points,
            radius=cfg.radius,
            bandwidth=cfg.mmd_bandwidth,
            seed=int(jax.random.randint(_key(cfg, "task"), (), 0, 2**31 - 1)),
            dtype=dtype,
        )
    return TeacherStudent.random(
        _key(cfg, "task", n, d),
        dim=d,
        depth=cfg.teacher_depth,
        heads=cfg.teacher_heads,
        head_dim=cfg.head_dim,
        beta=cfg.beta,
        num_tokens=n,
        radius=cfg.radius,
        dtype=dtype,
    )


def _problem(cfg: RatesConfig, task, grid_size: int, steps: int) -> core.Problem:
    dtype = _dtype(cfg)
    return core.Problem(
        task,
        task.loss,
        jnp.asarray(cfg.beta, dtype),
        limit.uniform_grid(grid_size, dtype),
        steps,
        cfg.rtol,
        cfg.atol,
        cfg.spec(),
    )


def _replicas(cfg: RatesConfig, key, grid_size: int, particles: int, d: int) -> core.Params:
    per = particles // cfg.replicas
    keys = jax.random.split(key, cfg.replicas)
    return core.stack(
        [
            limit.init_ensemble(
                k, grid_size, per, d, cfg.head_dim, init=cfg.init, scale=cfg.init_scale, dtype=_dtype(cfg)
            )
            for k in keys
        ]
    )


def depth_groups(points) -> list[tuple[int, tuple[int, ...]]]:
    """``[(L, (H, ...)), ...]``: the sorted points grouped by depth (the layout of :class:`core.SeedState`)."""
    out: dict = {}
    for L, H in sorted(points):
        out.setdefault(L, []).append(H)
    return [(L, tuple(hs)) for L, hs in out.items()]


def _discrete(cfg: RatesConfig, seeds: list[int], points, d: int, tag: str) -> tuple:
    """Every seed's untrained heads at every point, one entry per depth group (heads replicated up to the group's
    largest count, see :mod:`.core`); each seed's draw depends on the seed and point only."""
    out = []
    for L, hs in depth_groups(points):
        hmax = max(hs)

        def draw(s, H, L=L, hmax=hmax):
            p = init_params(
                _key(cfg, tag, s, L, H, d),
                L,
                H,
                d,
                cfg.head_dim,
                init=cfg.init,
                scale=cfg.init_scale,
                dtype=_dtype(cfg),
            )
            return jax.tree.map(lambda a: np.repeat(np.asarray(a), hmax // H, axis=1), p)

        # Assembled in NumPy (copies only): eager jnp ops would compile a program per shape.
        shape = (len(seeds), len(hs))
        flat = [draw(s, H) for s in seeds for H in hs]
        out.append(jax.tree.map(lambda *a, shape=shape: jnp.asarray(np.stack(a).reshape(*shape, *a[0].shape)), *flat))
    return tuple(out)


def _draws(cfg: RatesConfig, seeds: list[int], pilots: int, points, d: int) -> tuple:
    """:func:`_discrete` for the seeds (tag ``"discrete"``) followed by ``pilots`` pilot draws (tag ``"pilot"``:
    their own stream, so that no seed's draw is a pilot's), along the leading axis."""
    disc = _discrete(cfg, seeds, points, d, "discrete")
    if not pilots:
        return disc
    pil = _discrete(cfg, list(range(pilots)), points, d, "pilot")
    return tuple(jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x, y) for x, y in zip(disc, pil))


def _train_like(cfg, task, key, count):
    return np.asarray(task.sample(key, count).tokens)


def _inputs(cfg: RatesConfig, task, n: int, d: int):
    """Test inputs (training-like) and candidates of the supremum (five families, each labelled)."""
    test = _train_like(cfg, task, _key(cfg, "test", n, d), cfg.test_inputs)
    fams = input_families(_key(cfg, "families", n, d), cfg.candidates, n, d, cfg.radius, _dtype(cfg))
    cand = [_train_like(cfg, task, _key(cfg, "cand", n, d), cfg.candidates)]
    cand += [np.asarray(fams[f]) for f in FAMILIES[1:]]
    labels = np.repeat(np.arange(len(FAMILIES)), cfg.candidates)
    return test, np.concatenate(cand), labels


def base_candidates(cfg: RatesConfig) -> int:
    """How many candidates of a group precede the pilots' maximisers: the test inputs, then each family's."""
    return cfg.test_inputs + len(FAMILIES) * cfg.candidates


def _evaluate(problem, reps, discrete, xs, w, lmax, *, chunk: int, progress) -> tuple:
    """:func:`core.evaluate_and_paths` in chunks of ``chunk`` inputs (one compiled shape; progress after each)."""
    parts, paths = [], []
    for lo in range(0, xs.shape[0], chunk):
        part = xs[lo : lo + chunk]
        n = part.shape[0]
        e, z = core.evaluate_and_paths(problem, reps, discrete, jnp.asarray(pad_rows(part, chunk)), w, lmax)
        parts.append(jax.tree.map(lambda a: np.asarray(a)[..., :n], e))  # noqa: B023
        paths.append(jax.tree.map(lambda a: np.asarray(a)[:n], z))  # noqa: B023
        if progress is not None:
            progress(n)
    cat = lambda axis: lambda *a: np.concatenate(a, axis=axis)  # noqa: E731
    return jax.tree.map(cat(-1), *parts), jax.tree.map(cat(0), *paths)


def _replica_paths(problem, reps, xs, w, lmax, *, chunk: int, progress):
    """Every replica's paths at each input of ``xs`` (``(Q, N, d)``), two ``(Q, R, lmax + 1, N, d)``: one limit
    solve per input, in chunks of ``chunk`` (:func:`core.limit_replica_paths`; progress after each)."""
    xr, pr = [], []
    for lo in range(0, xs.shape[0], chunk):
        n = min(chunk, xs.shape[0] - lo)
        a, b = core.limit_replica_paths(problem, reps, jnp.asarray(pad_rows(xs[lo : lo + n], chunk)), w, lmax)
        xr.append(np.asarray(a)[:n])
        pr.append(np.asarray(b)[:n])
        if progress is not None:
            progress(n)
    return np.concatenate(xr), np.concatenate(pr)


def _rows_at(problem, discrete, euler, seed_idx, point_idx, xs, w, xr, pr, lmax, *, chunk: int) -> core.RowErrors:
    """Row ``q`` (seed ``seed_idx[q]``, point ``point_idx[q]``) at the input ``xs[q]`` against its replica paths
    ``xr[q], pr[q]`` (:func:`core.rows_from_paths`, per depth group in chunks of ``chunk`` rows), ``(Q,)`` each."""
    p_group, p_g = point_layout(discrete)
    out = [np.zeros(seed_idx.shape) for _ in core.RowErrors._fields]
    for j, params in enumerate(discrete):
        mine = np.nonzero(p_group[point_idx] == j)[0]
        for lo in range(0, mine.shape[0], chunk):
            sel = mine[lo : lo + chunk]
            args = (xs[sel], seed_idx[sel], p_g[point_idx[sel]], xr[sel], pr[sel])
            x, s, g, a, b = (jnp.asarray(pad_rows(v, chunk)) for v in args)
            e = core.rows_from_paths(problem, params, euler[j], x, w, s, g, a, b, lmax)
            for o, v in zip(out, e):
                o[sel] = np.asarray(v)[: sel.shape[0]]
    return core.RowErrors(*out)


def _evaluate_at(problem, reps, discrete, euler, seed_idx, point_idx, xs, w, lmax, *, chunk: int, progress):
    """The exact errors of row ``q`` (seed ``seed_idx[q]``, point ``point_idx[q]``) at its own input ``xs[q]``
    (``(Q, N, d)``): one limit solve and one discrete model per row, ``(Q,)`` each; ``euler`` from
    :func:`core.euler_heads`."""
    seed_idx, point_idx, xs = np.asarray(seed_idx), np.asarray(point_idx), np.asarray(xs)
    xr, pr = _replica_paths(problem, reps, xs, w, lmax, chunk=chunk, progress=progress)
    return _rows_at(problem, discrete, euler, seed_idx, point_idx, xs, w, xr, pr, lmax, chunk=chunk)


def _evaluate_seed_at(problem, reps, discrete, euler, seed_idx, xs, w, lmax, *, chunk: int, progress):
    """The exact errors of every point of seed ``seed_idx[q]`` at the input ``xs[q]`` (``(Q, N, d)``):
    :class:`core.RowErrors` of ``(Q, P)`` arrays, one limit solve per input shared by the seed's points (the
    programs of :func:`_evaluate_at`, the same chunk shapes)."""
    seed_idx, xs = np.asarray(seed_idx), np.asarray(xs)
    xr, pr = _replica_paths(problem, reps, xs, w, lmax, chunk=chunk, progress=progress)
    num, points = xs.shape[0], point_layout(discrete)[0].shape[0]
    q, p = (a.ravel() for a in np.meshgrid(np.arange(num), np.arange(points), indexing="ij"))
    rows = _rows_at(problem, discrete, euler, seed_idx[q], p, xs[q], w, xr[q], pr[q], lmax, chunk=chunk)
    return core.RowErrors(*(a.reshape(num, points) for a in rows))


def run_control(cfg: RatesConfig, seeds: list[int], emit: Callable, progress=None) -> None:
    """The step-0 positive control; ``emit(row)`` for each (point, seed)."""
    n, d = cfg.num_tokens, cfg.dim
    task = _task(cfg, n, d)
    points = sorted((L, H) for L in cfg.control_depths for H in cfg.control_heads)
    lmax = math.lcm(*cfg.control_depths)
    # Untrained, the limit's parameters do not depend on depth: a 2-time grid holding the same particles, and a
    # fine fixed step (the reference must be far more accurate than the Euler error a/L being measured).
    problem = _problem(cfg, task, 2, max(16, 2 * cfg.solver_steps))
    reps = _replicas(cfg, _key(cfg, "control-limit", n, d), 2, cfg.control_particles, d)
    discrete = _discrete(cfg, seeds, points, d, "control")
    xs = _train_like(cfg, task, _key(cfg, "control-inputs", n, d), cfg.control_inputs)
    w = jnp.full((n,), 1.0 / n, _dtype(cfg))
    e, _ = _evaluate(problem, reps, discrete, xs, w, lmax, chunk=min(4, xs.shape[0]), progress=progress)
    for p, (L, H) in enumerate(points):
        mc = float(np.sqrt(np.mean(e.mc[p] ** 2)))
        fmc = float(np.sqrt(np.mean(e.fluct_mc[p] ** 2)))
        for si, s in enumerate(seeds):
            emit(
                {
                    "depth": L,
                    "heads": H,
                    "seed": s,
                    "pointwise_err": float(np.mean(e.err[si, p])),
                    "err_x": float(np.mean(e.err_x[si, p])),
                    "err_p": float(np.mean(e.err_p[si, p])),
                    "pointwise_mc": mc,
                    "fluct_err": float(np.mean(e.fluct[si, p])),
                    "euler_err": float(np.mean(e.euler[p])),
                    "fluct_mc": fmc,
                    "reference_particles": cfg.control_particles,
                }
            )


def mesh(cfg: RatesConfig, devices=None):
    """The ``("seeds", "particles")`` device mesh of a run, or ``None`` on one device. The trained draws (the seeds
    and the ``search_pilots`` pilots after them) take ``gcd(seeds + search_pilots, n)`` of the ``n`` devices
    (``shard_seeds``), each replica's particles ``gcd(particles / replicas, n / that)`` of the rest
    (``shard_particles``). Execution only: the numbers agree with one device's up to the order of the particle
    sums."""
    from jax.sharding import Mesh

    devices = jax.devices() if devices is None else list(devices)
    s = math.gcd(cfg.seeds + cfg.search_pilots, len(devices)) if cfg.shard_seeds else 1
    r = math.gcd(cfg.particles // cfg.replicas, len(devices) // s) if cfg.shard_particles else 1
    if s * r == 1:
        return None
    return Mesh(np.asarray(devices[: s * r]).reshape(s, r), ("seeds", "particles"))


def place(lim: core.LimitState, st: core.SeedState, m) -> tuple:
    """The limit's particle axis (leaves ``(R, K+1, M/R, d, k)``) over ``"particles"`` and every seed leaf's leading
    axis over ``"seeds"``; the jitted steps are unchanged (XLA adds the sums across devices)."""
    if m is None:
        return lim, st
    from jax.sharding import NamedSharding, PartitionSpec

    put = lambda spec: lambda a: jax.device_put(a, NamedSharding(m, spec))  # noqa: E731
    particles, seeds, whole = PartitionSpec(None, None, "particles"), PartitionSpec("seeds"), PartitionSpec()
    lim = jax.tree.map(lambda a: put(particles if a.ndim == 5 else whole)(a), lim)
    st = jax.tree.map(lambda a: put(seeds if a.ndim >= 1 else whole)(a), st)  # every leaf leads with the seeds
    return lim, st


def _optimizer(cfg, name):
    make = optim.adamw if name == "adamw" else optim.blockwise_adamw
    return make(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


@dataclass
class Prepared:
    """One group's problem, initial state and inputs, and the programs compiling ahead for it: ``ahead`` maps a
    phase (``"train"``, ``"eval"``, ``"search"``) to the future of its compilation (``None``: not compiling ahead)."""

    group: Group
    seeds: list
    pilots: int
    task: object
    problem: core.Problem
    opt: object
    lim: core.LimitState
    st: core.SeedState
    test: np.ndarray
    cand: np.ndarray
    labels: np.ndarray
    ahead: dict


def prepare(cfg: RatesConfig, group: Group, seeds: list[int], pool=None) -> Prepared:
    """Draw one group's limit, discrete models and inputs; with a ``concurrent.futures`` executor ``pool``, compile
    its programs there, in the order the run needs them (training step, evaluation, search). XLA's compiler
    releases the GIL, so on the 2-core CPU a second thread compiles the next phase's programs while this one runs
    (its compilation is about half of the default run); the run's calls then find them in JAX's cache. The same
    numbers: the same programs, only compiled earlier."""
    n, d = group.num_tokens, group.dim
    task = _task(cfg, n, d)
    problem = _problem(cfg, task, cfg.grid_size, cfg.solver_steps * (cfg.grid_size - 1))
    opt = _optimizer(cfg, group.optimizer)
    # The d sweep's two optimizers share every draw (paired); the limit and the data do not depend on the seeds.
    reps = _replicas(cfg, _key(cfg, "limit", n, d), cfg.grid_size, cfg.particles, d)
    lim = core.LimitState(reps, jax.vmap(opt.init)(reps), reps)
    disc = _draws(cfg, seeds, cfg.search_pilots, group.points, d)  # the seeds' rows, then the pilots'
    init_opt = lambda ps: tuple(jax.vmap(jax.vmap(opt.init))(p) for p in ps)  # noqa: E731
    st = core.SeedState(disc, init_opt(disc), disc, init_opt(disc))
    lim, st = place(lim, st, mesh(dataclasses.replace(cfg, seeds=len(seeds))))  # the pilots' rows counted there
    test, cand, labels = _inputs(cfg, task, n, d)
    # The test inputs are candidates of the supremum too (labelled "train"): uniform >= pointwise by construction.
    cand, labels = np.concatenate([test, cand]), np.concatenate([np.zeros(len(test), int), labels])
    ahead = {"train": None, "eval": None, "search": None}
    if pool is not None:
        batch = task.sample(jax.random.fold_in(_key(cfg, "data", n, d), 0), cfg.batch_size)
        w = jnp.full((n,), 1.0 / n, _dtype(cfg))
        xs = jnp.asarray(pad_rows(cand[:EVAL_CHUNK], EVAL_CHUNK))  # as _evaluate pads
        hyper = _hyper(cfg, group)
        ahead["train"] = pool.submit(
            _timed, lambda: core.train_step.lower(problem, lim, st, opt, batch, hyper).compile()
        )
        ahead["eval"] = pool.submit(
            _timed, lambda: core.compile_evaluation(problem, lim.ens, st.discrete, xs, w, group.lmax)
        )
        ahead["search"] = pool.submit(
            _timed,
            lambda: core.compile_search(
                problem, lim.ens, st.discrete, jnp.asarray(cand), w, group.lmax, particles=cfg.search_particles,
                ascent_chunk=ASCENT_CHUNK, row_chunk=EVAL_CHUNK,
            ),
        )  # fmt: skip
    return Prepared(group, list(seeds), cfg.search_pilots, task, problem, opt, lim, st, test, cand, labels, ahead)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _hyper(cfg: RatesConfig, group: Group) -> tuple:
    return (cfg.learning_rate, cfg.weight_decay, group.optimizer == "blockwise_adamw")


def run_group(
    cfg: RatesConfig,
    group: Group,
    seeds: list[int],
    emit: Callable,
    emit_training: Callable,
    progress: Callable | None = None,
    *,
    prepared: Prepared | None = None,
) -> dict:
    """Train and evaluate one group (``prepared`` by :func:`prepare` for these seeds, or drawn here); ``emit(row)``
    per (point, seed), ``emit_training(row)`` per step. Returns the group's training diagnostics."""
    if prepared is None:
        prepared = prepare(cfg, group, seeds)
    if prepared.group != group or prepared.seeds != list(seeds) or prepared.pilots != cfg.search_pilots:
        raise ValueError("driver.run_group: prepared is for another group, other seeds or other pilots.")
    n, d = group.num_tokens, group.dim
    dtype = _dtype(cfg)
    task, problem, opt, lim, st = prepared.task, prepared.problem, prepared.opt, prepared.lim, prepared.st
    data_key = _key(cfg, "data", n, d)
    hyper = _hyper(cfg, group)
    fr_lim, fr_disc = [], []
    clock = {"t": time.perf_counter()}
    timings: dict = {}
    ahead_s = {}

    def lap(name):  # wall time of each phase (its compilation included: the first call of each jitted piece)
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock["t"]
        clock["t"] = now

    def wait(phase):  # a phase starts when its programs compiled ahead are ready (never compiled twice)
        if prepared.ahead.get(phase) is not None:
            ahead_s[phase] = prepared.ahead[phase].result()

    wait("train")
    for step in range(cfg.steps):
        batch = task.sample(jax.random.fold_in(data_key, step), cfg.batch_size)
        lim, st, diag = core.train_step(problem, lim, st, opt, batch, hyper)
        diag = jax.tree.map(np.asarray, diag)
        fr_lim.append(float(diag["limit_sign_fraction"]))
        fr_disc.append(float(diag["discrete_sign_fraction"]))
        emit_training(
            {
                "sweep": group.sweep,
                "optimizer": group.optimizer,
                "num_tokens": n,
                "dim": d,
                "step": step,
                "limit_loss": float(diag["limit_loss"]),
                "discrete_loss": float(np.mean(diag["discrete_loss"])),
                "limit_sign_fraction": fr_lim[-1],
                "discrete_sign_fraction": fr_disc[-1],
            }
        )
        if progress is not None:
            progress("train", 1)
        jax.block_until_ready(lim.ens)
        lap("first training step (compile)" if step == 0 else "training")
    spread = core.depth_spread(lim.ens, lim.init)
    w = jnp.full((n,), 1.0 / n, dtype)
    lmax = group.lmax
    test, cand, labels = prepared.test, prepared.cand, prepared.labels
    prog = lambda name: None if progress is None else (lambda k: progress(name, k))  # noqa: E731
    wait("eval")
    e_cand, cand_paths = _evaluate(
        problem, lim.ens, st.discrete, cand, w, lmax, chunk=EVAL_CHUNK, progress=prog("eval")
    )
    lap("candidate evaluation")
    e_test = jax.tree.map(lambda a: a[..., : len(test)], e_cand)
    sur = core.surrogate(lim.ens, cfg.search_particles, lmax, problem.grid)
    euler = core.euler_heads(lim.ens, st.discrete, problem.grid)

    def exact(seed_idx, point_idx, xs):  # each round's maximisers against the full limit
        return _evaluate_at(
            problem, lim.ens, st.discrete, euler, seed_idx, point_idx, xs, w, lmax, chunk=EVAL_CHUNK,
            progress=prog("eval"),
        )  # fmt: skip

    def exact_seed(seed_idx, xs):  # pooled: each maximiser at every point of its seed
        return _evaluate_seed_at(
            problem, lim.ens, st.discrete, euler, seed_idx, xs, w, lmax, chunk=EVAL_CHUNK, progress=prog("eval")
        )

    wait("search")
    num_seeds = len(seeds)
    search = lambda errs, **kw: sup_search(  # noqa: E731
        problem, sur, st.discrete, jnp.asarray(cand), cand_paths, errs, w, lmax, exact,
        radius=cfg.radius, starts=cfg.ascent_starts, steps=cfg.ascent_steps, step_size=cfg.ascent_step_size,
        rounds=cfg.search_rounds, tol=cfg.search_tol, chunk=ASCENT_CHUNK, exact_seed=exact_seed,
        pool=cfg.search_pool, rule=cfg.ascent_rule, **kw,
    )  # fmt: skip
    pilot_info = {}
    origin = labels.copy()  # a candidate's family; a pilot's maximiser's: the family its pilot's path started in
    if prepared.pilots:
        # The pilots (rows num_seeds, ... of the trained draws) are searched first; their maximisers, new inputs
        # only, join the candidates of every seed (each evaluated against the full limit once, for every row).
        pil = search(e_cand.err[num_seeds:], seed_rows=num_seeds + np.arange(prepared.pilots), progress=prog("pilots"))
        lap("pilot search")
        px, first = np.unique(pil.argmax.reshape(-1, *cand.shape[1:]), axis=0, return_index=True)
        new = ~(px[:, None] == cand[None]).all(axis=(-2, -1)).any(axis=1)
        px, px_start = px[new], pil.start.reshape(-1)[first][new]  # the candidate each pilot's path started at
        if len(px):
            e_pil, pil_paths = _evaluate(
                problem, lim.ens, st.discrete, px, w, lmax, chunk=EVAL_CHUNK, progress=prog("eval")
            )
            e_cand = jax.tree.map(lambda a, b: np.concatenate([a, b], axis=-1), e_cand, e_pil)
            cand_paths = jax.tree.map(lambda a, b: np.concatenate([a, b]), cand_paths, pil_paths)
            cand = np.concatenate([cand, px])
            labels = np.concatenate([labels, np.full(len(px), LABELS.index(PILOT))])
            origin = np.concatenate([origin, origin[px_start]])
        pilot_info = {
            "pilots": prepared.pilots,
            "pilot_candidates": len(px),
            "pilot_point_gains": point_gain(pil.value, pil.gain).tolist(),
        }
        lap("pilot candidates against the full limit")
    # From here on, the reported seeds only (their rows lead the trained draws; the pilots' ``(S, P, C)`` rows go).
    e_cand = type(e_cand)(*(np.asarray(a)[:num_seeds] if np.ndim(a) == 3 else a for a in e_cand))
    e_test = type(e_test)(*(np.asarray(a)[:num_seeds] if np.ndim(a) == 3 else a for a in e_test))
    res = search(e_cand.err, progress=prog("search"))
    lap("search (cheap-limit ascent, maximisers against the full limit)")
    num_points = res.value.shape[1]
    e_max = res.search_rows
    exact_max, mc_max = res.search_value, e_max.mc
    pts = np.arange(num_points)[None, :]
    ts_idx = np.argmax(e_cand.err, axis=-1)
    ts_val = np.max(e_cand.err, axis=-1)
    ts_mc = e_cand.mc[pts, ts_idx]
    # The fluctuation part's supremum: over the candidates and the search's maximiser of the total error.
    fluct_sup = np.fmax(np.max(e_cand.fluct, axis=-1), e_max.fluct)
    gaps = np.concatenate([np.asarray(core.param_gap(a, b)) for a, b in zip(st.discrete, st.coupled)], axis=1)
    R = cfg.replicas
    origins: dict = {}  # the rows' worst inputs by the family their climb began in (through a pilot's path)
    for p, (L, H) in enumerate(group.points):
        mc_pw = float(np.sqrt(np.mean(e_test.mc[p] ** 2)))
        fmc_pw = float(np.sqrt(np.mean(e_test.fluct_mc[p] ** 2)))
        for si, s in enumerate(seeds):
            err2 = e_test.err[si, p] ** 2
            e_inf2 = (R * err2 - e_test.err2_replica[si, p]) / (R - 1)  # e^2(M) = e^2_inf + c / M at M and M / R
            use_search = bool(exact_max[si, p] > ts_val[si, p])  # nan (no round ran): the test set
            uni = float(res.value[si, p])
            x_w = res.argmax[si, p] if use_search else cand[ts_idx[si, p]]
            at = res.start[si, p] if use_search else ts_idx[si, p]
            fam, began = LABELS[labels[at]], LABELS[origin[at]]
            origins[began] = origins.get(began, 0) + 1
            source = ("pool" if res.pooled[si, p] else "search") if use_search else "test_set"
            source = PILOT if source == "test_set" and fam == PILOT else source
            dists = np.linalg.norm(x_w[:, None] - x_w[None], axis=-1)
            emit(
                {
                    "sweep": group.sweep,
                    "optimizer": group.optimizer,
                    "depth": L,
                    "heads": H,
                    "num_tokens": n,
                    "dim": d,
                    "seed": s,
                    "step": cfg.steps,
                    "pointwise_err": float(np.mean(e_test.err[si, p])),
                    "pointwise_err_x": float(np.mean(e_test.err_x[si, p])),
                    "pointwise_err_p": float(np.mean(e_test.err_p[si, p])),
                    "p_norm": float(np.mean(e_test.p_norm[p])),
                    "pointwise_err_inf": float(np.mean(np.sqrt(np.maximum(e_inf2, 0.0)))),
                    "pointwise_mc": mc_pw,
                    "pointwise_fluct": float(np.mean(e_test.fluct[si, p])),
                    "pointwise_euler": float(np.mean(e_test.euler[p])),
                    "pointwise_fluct_mc": fmc_pw,
                    "uniform_err": float(uni),
                    "uniform_test_set": float(ts_val[si, p]),
                    "uniform_search": float(exact_max[si, p]),
                    "uniform_source": source,
                    "uniform_mc": float(mc_max[si, p] if use_search else ts_mc[si, p]),
                    "uniform_fluct": float(fluct_sup[si, p]),
                    "surrogate_value": float(res.surrogate_value[si, p]),
                    "search_gain": float(res.gain[si, p]),
                    "search_converged": int(res.converged[si, p]),
                    "search_rounds": int(res.rounds[si, p]),
                    "worst_family": fam,
                    "worst_norm": float(np.mean(np.linalg.norm(x_w, axis=-1))),
                    "worst_diameter": float(dists.max()),
                    "param_gap": float(gaps[si, p]),
                }
            )
    if ahead_s:
        timings["compiled ahead on a second thread (not in the wall time)"] = sum(ahead_s.values())
    return {
        "sign_fraction_limit": fr_lim,
        "sign_fraction_discrete": fr_disc,
        **spread,
        **pilot_info,
        "worst_origin_counts": origins,
        "timings_s": timings,
    }
