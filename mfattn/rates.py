"""The main experiment: how fast does the trained discrete transformer approach its mean-field limit?

For each sweep point (depth ``L``, heads ``H``, tokens ``N``, width ``d``, optimizer) and seed, a discrete model
and the limit are trained on the same data stream (docs/spec.md sections 5 and 7):

* the limit: an ensemble of ``M`` parameter particles on a grid of ``K + 1`` depths, drawn from ``nu_0``, trained
  by the optimizer's flow map with its own mean-field gradients; a second, independent ensemble gives the
  limit's Monte-Carlo error;
* the discrete model: ``L x H`` heads drawn from ``nu_0``, trained with its own gradients (hand adjoint);
* the coupled parameters ``theta_bar`` (paper eq. 23): the discrete model's initial heads trained with the
  limit's gradients at ``t_l = l / L``.

At training steps ``0``, ``K/2`` and ``K`` it records the pointwise error (mean over a test set of
``max_l (|x^l - x(t_l)|^2 + |p^l - p(t_l)|^2)^(1/2)``), the uniform error (its supremum over inputs: the maximum
over a test set mixing input families, then projected gradient ascent from the worst of them), the parameter
gap ``max_{l,h} |theta_{l,h} - theta_bar_{l,h}|`` of Lemma 6, and the limit's Monte-Carlo error.

The task (``task`` in the configuration). The adjoint's terminal condition ``p(1) = d_mu ell(mu_1)`` needs the
data ``y`` of the loss at every input where the error is measured, including the adversarial inputs of the
supremum search, which no data set contains. So a task here must define its target for *any* token sequence
(``task.target(tokens, weights)``), not only for its own samples:

* ``"teacher_student"`` (default; :class:`mfattn.tasks.TeacherStudent`): inputs uniform in the ball, targets
  the terminal tokens of a fixed random teacher transformer (``teacher_depth`` x ``teacher_heads`` heads),
  token regression ``sum_i m_i |x_i^L - y_i|^2 / 2``. The teacher maps any input to its target.
* ``"target_measure"`` (:class:`mfattn.tasks.TargetMeasure`): inputs uniform in the ball, transported to one
  fixed target measure ``rho`` (``target_points`` points drawn once in the ball), loss ``MMD^2(mu^L, rho) / 2``
  with a Gaussian kernel of width ``mmd_bandwidth``. The target does not depend on the input at all, and the
  loss is a genuine function of the terminal measure (paper Remark 5): its Lions derivative couples the
  tokens through the kernel, unlike token regression.

Tasks whose targets exist only for their own samples (in-context regression's hidden label, denoising's clean
tokens) are left out: for them the uniform error is not defined without a further modelling choice (e.g. the
ridge predictor of the context as in-context regression's target for an arbitrary sequence).

The seeds run together, vmapped; with several devices they are split over a ``("seeds", "particles")`` mesh
that also splits the limit's parameter particles (:func:`_mesh`). All (L, H) points of a group share one limit
and one compiled program, and groups of the same shapes share them too (the training step's
gradients are computed apart from the optimizer's update, so the d sweep's AdamW and blockwise AdamW groups
compile them once). Rows are appended to ``results.csv`` as each is computed; a rerun with the same output
folder skips what is there. ``mfattn.fits`` then fits ``err = a L^-1 + b L^-alpha H^-gamma``
and power laws along each axis, with bootstrap intervals over seeds, and draws the plots.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import platform
import time
import zlib
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import limit, optim
from .attention import SOFTMAX, Attention, as_attention
from .limit import _dense_forward_backward, _settings
from .metrics import discrepancy, input_families, projected_ascent
from .params import Params, init_params
from .particles import _adjoint, _forward
from .tasks import TargetMeasure, TeacherStudent
from .train import batch_grad_map

__all__ = ["RatesConfig", "QUICK", "TASKS", "run", "load_config", "check_folder", "COLUMNS"]

#: The tasks ``RatesConfig.task`` accepts: each defines its target for *any* input sequence (see the module
#: docstring), which the adjoint's terminal condition at an adversarial input needs.
TASKS = ("teacher_student", "target_measure")

COLUMNS = [
    "sweep", "optimizer", "depth", "heads", "num_tokens", "dim", "seed", "step",
    "pointwise_err", "uniform_err", "uniform_test_set", "uniform_ascent", "uniform_source",
    "param_gap", "mc_err", "mc_flag", "wall_s",
]  # fmt: skip


@dataclasses.dataclass
class RatesConfig:
    """Every setting of the experiment; a TOML file (``mfattn rates --config``) overrides any of them.

    The default finishes in about 5 minutes on a 2-core CPU and shows the depth and head dependence; the
    ``N`` and ``d`` sweeps (each needs its own limit) are off by default: list values in ``tokens_sweep``
    or ``dims_sweep`` to run them at ``(depth_ref, heads_ref)``. The N sweep uses ``optimizer``; the d sweep
    runs every width under both AdamW and blockwise AdamW, from the same initialisation and data stream
    (paired), so that their slopes in ``d`` compare the optimizers only. ``task`` is one of :data:`TASKS`
    (see the module docstring).
    """

    # model and data: inputs uniform in the ball of radius R; targets from a random teacher transformer
    # ("teacher_student", token regression) or a fixed target cloud ("target_measure", MMD loss)
    task: str = "teacher_student"
    # the student's (and the limit's) attention: a kind ("softmax", "l2", ...) or a table of
    # mfattn.Attention fields, e.g. {kind = "sigmoid", causal = true}; the teacher stays softmax
    attention: str | dict = "softmax"
    dim: int = 2
    head_dim: int = 2
    num_tokens: int = 4
    beta: float = 1.0
    radius: float = 1.0
    teacher_depth: int = 2  # teacher_student: the teacher's L and H
    teacher_heads: int = 2
    target_points: int = 8  # target_measure: M points of the target measure, Gaussian kernel width
    mmd_bandwidth: float = 0.5
    task_seed: int = 1234
    # sweeps
    depths: Sequence[int] = (1, 2, 4, 8, 16)
    heads: Sequence[int] = (1, 4, 16)
    tokens_sweep: Sequence[int] = ()
    dims_sweep: Sequence[int] = ()
    depth_ref: int = 8
    heads_ref: int = 4
    seeds: int = 2
    # training
    steps: int = 4
    batch_size: int = 4
    optimizer: str = "adamw"
    learning_rate: float = 2e-2
    weight_decay: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    init: str = "mean_noise"
    init_scale: float = 0.5
    # the limit
    particles: int = 1024
    grid_size: int = 9
    solver_steps: int = 1  # Tsit5 steps per grid interval; 0: adaptive (PID, rtol/atol)
    rtol: float = 1e-5
    atol: float = 1e-7
    mc_check: bool = True
    # the supremum over inputs
    test_per_family: int = 3
    ascent_starts: int = 1
    ascent_steps: int = 2
    ascent_step_size: float = 0.1
    precision: str = "float32"
    # several devices: a (seeds x particles) mesh; each axis takes the largest share of the local devices that
    # divides the seed count (resp. the particle count). Execution only: the numbers agree with one device's up
    # to rounding (split particles change the order of the particle sums; XLA may also batch per device).
    shard_seeds: bool = True  # split the (vmapped) seeds over the devices
    shard_particles: bool = True  # split the limit's parameter particles over the devices the seeds leave

    def spec(self) -> Attention:
        """The :class:`~mfattn.Attention` of the student and the limit."""
        if isinstance(self.attention, dict):
            return Attention(**self.attention)
        return as_attention(self.attention)

    def validate(self) -> RatesConfig:
        if self.task not in TASKS:
            raise ValueError(f"rates config: task must be one of {TASKS}, got {self.task!r}.")
        for name in ("dim", "head_dim", "num_tokens", "teacher_depth", "teacher_heads", "target_points",
                     "depth_ref", "heads_ref", "seeds", "batch_size", "particles", "test_per_family"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"rates config: {name} must be a positive integer, got {v!r}.")
        for name in ("steps", "ascent_starts", "ascent_steps", "solver_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"rates config: {name} must be a non-negative integer, got {v!r}.")
        if self.grid_size < 2:
            raise ValueError(f"rates config: grid_size must be >= 2, got {self.grid_size}.")
        for name in ("depths", "heads"):
            v = list(getattr(self, name))
            if not v or any(not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"rates config: {name} must be a non-empty list of positive integers, got {v!r}.")
        if math.lcm(*self.depths, self.depth_ref) > 4096:
            raise ValueError(
                "rates config: the limit is evaluated at t = l / lcm(depths); lcm(depths, depth_ref) = "
                f"{math.lcm(*self.depths, self.depth_ref)} > 4096. Use depths that divide each other "
                "(e.g. powers of 2)."
            )
        for name in ("tokens_sweep", "dims_sweep"):
            v = list(getattr(self, name))
            if any(not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"rates config: {name} must list positive integers, got {v!r}.")
        if not self.beta >= 0 or not self.radius > 0:
            raise ValueError(f"rates config: need beta >= 0 and radius > 0, got {self.beta}, {self.radius}.")
        try:
            spec = self.spec()
        except (TypeError, ValueError) as e:
            raise ValueError(f"rates config: bad attention {self.attention!r}: {e}") from None
        if spec.depth_exponent != 1:
            raise ValueError("rates config: the limit needs the residual step 1/L (attention depth_exponent = 1).")
        if not self.mmd_bandwidth > 0:
            raise ValueError(f"rates config: mmd_bandwidth must be > 0, got {self.mmd_bandwidth}.")
        if self.optimizer not in ("adamw", "blockwise_adamw"):
            raise ValueError(f"rates config: optimizer must be 'adamw' or 'blockwise_adamw', got {self.optimizer!r}.")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"rates config: precision must be 'float32' or 'float64', got {self.precision!r}.")
        _make_optimizer(self, self.optimizer)  # validates learning rate, b1, b2, weight decay
        return self


QUICK = {
    "depths": (2, 4, 8), "heads": (1, 4), "seeds": 2, "steps": 4, "batch_size": 2, "particles": 128,
    "grid_size": 5, "test_per_family": 4, "ascent_starts": 1, "ascent_steps": 1,
}  # fmt: skip


def load_config(path: str | None = None, *, quick: bool = False) -> RatesConfig:
    """The default configuration, with ``--quick``'s overrides, then the TOML file's (top-level keys)."""
    values = {}
    if quick:
        values.update(QUICK)
    if path is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"rates config {path}: not valid TOML: {e}") from None
        fields = {f.name for f in dataclasses.fields(RatesConfig)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"rates config {path}: unknown keys {unknown}; known keys: {sorted(fields)}.")
        values.update(data)
    cfg = RatesConfig(**values)
    for name in ("depths", "heads", "tokens_sweep", "dims_sweep"):
        setattr(cfg, name, tuple(getattr(cfg, name)))
    return cfg.validate()


def _make_optimizer(cfg: RatesConfig, name: str):
    return _optimizer(name, cfg.learning_rate, cfg.b1, cfg.b2, cfg.weight_decay)


def _optimizer(name: str, learning_rate, b1, b2, weight_decay):
    """One optimizer object per setting: ``filter_jit`` keys on its (closure) functions, so a fresh one per
    group would recompile the update for groups of the same shapes."""
    try:
        return _cached_optimizer(name, learning_rate, b1, b2, weight_decay)
    except TypeError:  # unhashable settings (e.g. a list from a TOML file): let the optimizer report them
        return _new_optimizer(name, learning_rate, b1, b2, weight_decay)


def _new_optimizer(name, learning_rate, b1, b2, weight_decay):
    make = optim.adamw if name == "adamw" else optim.blockwise_adamw
    return make(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)


_cached_optimizer = functools.lru_cache(maxsize=16)(_new_optimizer)


@dataclasses.dataclass(frozen=True)
class _Group:
    """Sweep points sharing one limit: same tokens N, width d and optimizer."""

    sweep: str
    num_tokens: int
    dim: int
    optimizer: str
    points: tuple  # ((L, H), ...)


def _groups(cfg: RatesConfig) -> list[_Group]:
    groups = [_Group("LH", cfg.num_tokens, cfg.dim, cfg.optimizer,
                     tuple((L, H) for L in cfg.depths for H in cfg.heads))]  # fmt: skip
    ref = ((cfg.depth_ref, cfg.heads_ref),)
    groups += [_Group("N", n, cfg.dim, cfg.optimizer, ref) for n in cfg.tokens_sweep]
    groups += [_Group("d", cfg.num_tokens, d, opt, ref) for d in cfg.dims_sweep for opt in ("adamw", "blockwise_adamw")]
    return groups


def _row_key(sweep, optimizer, depth, heads, n, d, seed, step) -> tuple:
    return (str(sweep), str(optimizer), int(depth), int(heads), int(n), int(d), int(seed), int(step))


def _read_done(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path, newline="") as f:
        return {
            _row_key(
                r["sweep"], r["optimizer"], r["depth"], r["heads"], r["num_tokens"], r["dim"], r["seed"], r["step"]
            )
            for r in csv.DictReader(f)
        }


class _Writer:
    """Appends rows to ``results.csv`` and flushes each one (an interruption loses no finished row)."""

    def __init__(self, path: str):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, row: dict) -> None:
        self.w.writerow(row)
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _eval_steps(steps: int) -> list[int]:
    return sorted({0, steps // 2, steps})


def _param_gap(a: Params, b: Params):
    sq = sum(jnp.sum((x - y) ** 2, axis=(-2, -1)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return jnp.sqrt(jnp.max(sq))


class _Models(eqx.Module):
    """Jitted pieces for one group (shapes fixed by the group, so each compiles once for all seeds)."""

    task: TeacherStudent | TargetMeasure
    beta: jax.Array
    grid: jax.Array
    settings: object
    spec: Attention = eqx.field(static=True, default=SOFTMAX)

    def target(self, x, w):
        """The task's target for any input sequence ``x`` (the terminal condition's data)."""
        return self.task.target(x, w)

    def limit_traj(self, ens, x, w, y, depth: int):
        """Limit tokens and adjoints at ``t_l = l / depth``, ``l = 0..depth``: two ``(depth+1, N, d)``."""
        _, xsol, psol = _dense_forward_backward(
            ens, x, w, y, self.task.loss, self.beta, None, self.grid, "linear", self.settings
        )
        t = jnp.arange(depth + 1, dtype=self.grid.dtype) / depth
        return jax.vmap(xsol.evaluate)(t), jax.vmap(psol.evaluate)(t)

    def discrete_traj(self, params, x, w, y):
        traj = _forward(params, x, w, self.beta, None, self.spec)
        ps = _adjoint(params, traj, self.task.loss.lions(traj[-1], w, y), w, self.beta, None, self.spec)
        return traj, ps

    def point_errs(self, discrete, x, w, y, xl, pl, lmax: int):
        """``err(x)`` of every sweep point (a tuple of discrete models) against the limit's tokens and adjoints
        ``xl, pl`` at ``t = l / lmax``: ``(P,)``."""
        out = []
        for params in discrete:
            stride = lmax // params.depth
            xd, pd = self.discrete_traj(params, x, w, y)
            out.append(discrepancy(xd, pd, xl[::stride], pl[::stride], w))
        return jnp.stack(out)

    def errs(self, discrete, ens, x, w, lmax: int):
        """``err(x)`` of every sweep point against one limit solve: ``(P,)``."""
        y = self.target(x, w)
        xl, pl = self.limit_traj(ens, x, w, y, lmax)
        return self.point_errs(discrete, x, w, y, xl, pl, lmax)


@eqx.filter_jit
def _errs(models: _Models, discrete, ensembles, xs, w, lmax: int):
    """Every input against every sweep point, and the limit's Monte-Carlo error on each input.

    ``ensembles`` stacks the limit's ensemble A (and, for the Monte-Carlo check, an independent ensemble B)
    on a leading axis. Returns ``(errs (C, P), mc (C,))``; ``mc = discrepancy(A, B) / sqrt(2)`` (NaN without
    B). One compilation per group serves every evaluation and the ascent's values.
    """
    ens_a = jax.tree.map(lambda a: a[0], ensembles)

    def one(x):
        y = models.target(x, w)
        xl, pl = models.limit_traj(ens_a, x, w, y, lmax)
        errs = models.point_errs(discrete, x, w, y, xl, pl, lmax)
        if ensembles.wq.shape[0] > 1:
            xb, pb = models.limit_traj(jax.tree.map(lambda a: a[1], ensembles), x, w, y, lmax)
            mc = discrepancy(xl, pl, xb, pb, w) / jnp.sqrt(2.0)
        else:
            mc = jnp.full((), jnp.nan, xl.dtype)
        return errs, mc

    return jax.vmap(one)(xs)


@eqx.filter_jit
def _point_errs_and_grads(models: _Models, discrete, ens, xs, w, idx, lmax: int):
    """``err`` of input ``s`` against sweep point ``idx[s]``, and its gradient in the input."""
    return jax.vmap(jax.value_and_grad(lambda x, i: models.errs(discrete, ens, x, w, lmax)[i]))(xs, idx)


_SETUP_CACHE: dict = {}


def _make_task(cfg: RatesConfig, group: _Group, dtype):
    d, n = group.dim, group.num_tokens
    if cfg.task == "target_measure":
        return TargetMeasure(d, n, num_points=cfg.target_points, radius=cfg.radius, bandwidth=cfg.mmd_bandwidth,
                             seed=cfg.task_seed, dtype=dtype)  # fmt: skip
    return TeacherStudent.random(
        jax.random.key(cfg.task_seed), dim=d, depth=cfg.teacher_depth, heads=cfg.teacher_heads,
        head_dim=cfg.head_dim, beta=cfg.beta, num_tokens=n, radius=cfg.radius, dtype=dtype,
    )  # fmt: skip


def _group_setup(cfg: RatesConfig, group: _Group, dtype):
    """The task, optimizer and jitted models of a group, built once and shared by its seeds: ``filter_jit``
    keys on these objects, so rebuilding them per seed would recompile everything."""
    key = (json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str), group, str(dtype))
    if key not in _SETUP_CACHE:
        task = _make_task(cfg, group, dtype)
        opt = _make_optimizer(cfg, group.optimizer)
        grid = limit.uniform_grid(cfg.grid_size, dtype)
        beta = jnp.asarray(cfg.beta, dtype)
        if cfg.solver_steps > 0:
            # Fixed Tsit5 steps landing on the grid times (where the parameter field has kinks): accurate
            # for this smooth field, and far lighter to compile and differentiate than the adaptive loop.
            n_steps = cfg.solver_steps * (cfg.grid_size - 1)
            settings = _settings(diffrax.Tsit5(), diffrax.ConstantStepSize(), 1.0 / n_steps, n_steps + 1, None,
                                 cfg.rtol, cfg.atol, cfg.spec())  # fmt: skip
        else:
            settings = _settings(None, None, None, 4096, None, cfg.rtol, cfg.atol, cfg.spec())
        _SETUP_CACHE.clear()  # one group at a time: keep memory bounded
        models = _Models(task, beta, grid, settings, cfg.spec())
        _SETUP_CACHE[key] = (task, task.loss, opt, grid, beta, settings, models)
    return _SETUP_CACHE[key]


def _init_seed(cfg: RatesConfig, group: _Group, seed: int, task, opt, dtype) -> dict:
    """Everything one seed starts from (arrays only, so that seeds can be stacked and vmapped)."""
    k_head, d, n = cfg.head_dim, group.dim, group.num_tokens
    # zlib.crc32, not hash(): Python's str hash changes between processes, and a resumed run must
    # regenerate exactly the same models and data. The d sweep's two optimizers share the tag: AdamW and
    # blockwise AdamW start from the same heads and ensembles and see the same data (a paired comparison).
    fields = (group.sweep, n, d) if group.sweep == "d" else (group.sweep, n, d, group.optimizer)
    tag = zlib.crc32(repr(fields).encode()) % (2**31)
    key = jax.random.fold_in(jax.random.key(seed), tag)
    k_ens, k_mc, k_disc, k_data, k_test = jax.random.split(key, 5)
    init_kw = dict(init=cfg.init, scale=cfg.init_scale, dtype=dtype)
    ens_keys = [k_ens, k_mc] if cfg.mc_check else [k_ens]
    ensembles = jax.tree.map(
        lambda *a: jnp.stack(a),
        *[limit.init_ensemble(kk, cfg.grid_size, cfg.particles, d, k_head, **init_kw) for kk in ens_keys],
    )
    discrete = tuple(
        init_params(jax.random.fold_in(k_disc, 1000 * L + H), L, H, d, k_head, **init_kw) for L, H in group.points
    )
    fams = input_families(k_test, cfg.test_per_family, n, d, cfg.radius, dtype)
    train_like = task.sample(jax.random.fold_in(k_test, 1), cfg.test_per_family).tokens
    return {
        "ensembles": ensembles,
        "opt_states": jax.vmap(opt.init)(ensembles),
        "discrete": discrete,
        "disc_opt": tuple(opt.init(p) for p in discrete),
        "coupled": discrete,  # the coupled heads start at the discrete model's own initialisation
        "coupled_opt": opt.init(discrete),
        "xs": jnp.concatenate([train_like, *fams.values()], axis=0),
        "data_key": jax.random.key_data(k_data),
    }


_PARAMS = ("ensembles", "coupled", "discrete")  # the trained parameters of a seed's state


def _seed_batch(data_key, sample, batch_size: int, step):
    """The batch of training step ``step`` on one seed's data stream (``data_key``: raw key data)."""
    return sample(jax.random.fold_in(jax.random.wrap_key_data(data_key), step), batch_size)


def _limit_grads(st: dict, batch, loss, beta, grid, settings):
    """One seed's limit gradients on ``batch``: the stacked ensembles' (A, and B for the Monte-Carlo check;
    vmapped, so the body compiles once) and the coupled heads', which follow ensemble A's (paper eq. 23)."""

    def one(ens):
        return limit._batch_grad_map(
            ens, batch.tokens, batch.weights, batch.targets, loss, beta, None, grid, "linear", settings, st["coupled"]
        )

    _, g_ens, g_c = jax.vmap(one)(st["ensembles"])
    return g_ens, jax.tree.map(lambda a: a[0], g_c)


def _discrete_grads(st: dict, batch, loss, beta, settings) -> tuple:
    """One seed's discrete model gradients on ``batch``, every sweep point (its own gradients, hand adjoint)."""
    return tuple(
        batch_grad_map(p, batch.tokens, batch.weights, batch.targets, loss, beta=beta, attention=settings.attention)[1]
        for p in st["discrete"]
    )


@eqx.filter_jit
def _grads_seeds(params: dict, data_key, loss, beta, grid, settings, sample, batch_size: int, step):
    """The gradients of one training step of every seed (vmapped), each seed on its own data stream (shared
    by its discrete models and its limit): :func:`_limit_grads` and :func:`_discrete_grads`. Independent of the
    optimizer, so that one compilation serves AdamW and blockwise AdamW (the d sweep runs both)."""

    def one(st, data_key):
        b = _seed_batch(data_key, sample, batch_size, step)
        g_ens, g_c = _limit_grads(st, b, loss, beta, grid, settings)
        return {"ensembles": g_ens, "coupled": g_c, "discrete": _discrete_grads(st, b, loss, beta, settings)}

    return jax.vmap(one)(params, data_key)


@eqx.filter_jit
def _update_seeds(state: dict, grads: dict, optimizer):
    """One optimizer update of every seed's parameters (vmapped over seeds and over the stacked ensembles)."""

    def one(st, g):
        new = dict(st)
        upd, new["opt_states"] = jax.vmap(optimizer.update)(g["ensembles"], st["opt_states"], st["ensembles"])
        new["ensembles"] = optax.apply_updates(st["ensembles"], upd)
        upd, new["coupled_opt"] = optimizer.update(g["coupled"], st["coupled_opt"], st["coupled"])
        new["coupled"] = optax.apply_updates(st["coupled"], upd)
        disc = [optimizer.update(gp, o, p) for gp, o, p in zip(g["discrete"], st["disc_opt"], st["discrete"])]
        new["discrete"] = tuple(optax.apply_updates(p, u) for p, (u, _) in zip(st["discrete"], disc))
        new["disc_opt"] = tuple(o for _, o in disc)
        return new

    return jax.vmap(one)(state, grads)


def _train_step_seeds(state: dict, loss, optimizer, beta, grid, settings, sample, batch_size: int, step):
    """One training step of every seed: the limit, its Monte-Carlo twin, the coupled heads and the discrete
    model of every sweep point (gradients, then the optimizer's update)."""
    params = {k: state[k] for k in _PARAMS}
    grads = _grads_seeds(params, state["data_key"], loss, beta, grid, settings, sample, batch_size, step)
    return _update_seeds(state, grads, optimizer)


def _mesh(cfg: RatesConfig, devices=None):
    """The ``("seeds", "particles")`` device mesh of a run, or ``None`` for one device.

    The seeds take ``gcd(seeds, n)`` of the ``n`` devices, the limit's particles ``gcd(particles, n / that)``
    of the rest (each axis split evenly); devices that fit neither stay idle. The (L, H) points of a group are
    not a mesh axis: they share their group's limit, which is nearly all of the work (see the README)."""
    from jax.sharding import Mesh

    devices = jax.devices() if devices is None else list(devices)
    s = math.gcd(cfg.seeds, len(devices)) if cfg.shard_seeds else 1
    r = math.gcd(cfg.particles, len(devices) // s) if cfg.shard_particles else 1
    if s * r == 1:
        return None
    return Mesh(np.asarray(devices[: s * r]).reshape(s, r), ("seeds", "particles"))


def _shard_state(state: dict, mesh) -> dict:
    """Place a group's stacked state on ``mesh``: every leaf's leading (seed) axis over ``"seeds"``, and the
    particle axis of the ensembles and of their optimizer states (leaves ``(S, E, K+1, M, ., .)``) over
    ``"particles"``. The jitted steps are unchanged; XLA adds the reduction over particles."""
    from jax.sharding import NamedSharding, PartitionSpec

    def put(spec):
        return lambda a: jax.device_put(a, NamedSharding(mesh, spec))

    seeds, particles = PartitionSpec("seeds"), PartitionSpec("seeds", None, None, "particles")
    out = {k: jax.tree.map(put(seeds), v) for k, v in state.items()}
    for k in ("ensembles", "opt_states"):
        out[k] = jax.tree.map(lambda a: put(particles if a.ndim == 6 else seeds)(a), state[k])
    return out


def _run_group(cfg: RatesConfig, group: _Group, seeds: list, done: set, writer: _Writer, bar, dtype, mesh) -> None:
    """One group, all its seeds at once (vmapped; the state placed on ``mesh`` when given, see :func:`_mesh`)."""
    task, loss, opt, grid, beta, settings, models = _group_setup(cfg, group, dtype)
    states = [_init_seed(cfg, group, seed, task, opt, dtype) for seed in seeds]
    state = jax.tree.map(lambda *a: jnp.stack(a), *states)
    if mesh is not None:
        state = _shard_state(state, mesh)
    w0 = jnp.full((group.num_tokens,), 1.0 / group.num_tokens, dtype)
    lmax = math.lcm(*(L for L, _ in group.points))
    for step in range(cfg.steps + 1):
        if step in _eval_steps(cfg.steps):
            keys = [
                [_row_key(group.sweep, group.optimizer, L, H, group.num_tokens, group.dim, seed, step)
                 for L, H in group.points]
                for seed in seeds
            ]  # fmt: skip
            if not all(kk in done for row in keys for kk in row):
                _evaluate(cfg, group, seeds, step, models, state, w0, lmax, keys, done, writer)
        if bar is not None:
            bar.update(len(seeds))
        if step == cfg.steps:
            break
        state = _train_step_seeds(state, loss, opt, beta, grid, settings, task.sample, cfg.batch_size,
                                  jnp.asarray(step))  # fmt: skip


@eqx.filter_jit
def _errs_seeds(models, discrete, ensembles, xs, w, lmax: int):
    return jax.vmap(lambda d, e, x: _errs(models, d, e, x, w, lmax))(discrete, ensembles, xs)


@eqx.filter_jit
def _point_errs_and_grads_seeds(models, discrete, ens_a, xs, w, idx, lmax: int):
    return jax.vmap(lambda d, e, x: _point_errs_and_grads(models, d, e, x, w, idx, lmax))(discrete, ens_a, xs)


def _evaluate(cfg, group, seeds, step, models, state, w0, lmax, keys, done, writer):
    """Errors of every sweep point and seed of a group at one training step; one CSV row per point and seed."""
    t0 = time.perf_counter()
    discrete, ensembles, xs = state["discrete"], state["ensembles"], state["xs"]
    ens_a = jax.tree.map(lambda a: a[:, 0], ensembles)
    errs, mc = _errs_seeds(models, discrete, ensembles, xs, w0, lmax)  # (S, C, P), (S, C)
    num_seeds, num_cand, num_points = errs.shape
    mc_err = jnp.mean(mc, axis=1)
    test_set = jnp.max(errs, axis=1)  # (S, P)
    ascent = jnp.full((num_seeds, num_points), -jnp.inf)
    starts = min(cfg.ascent_starts, num_cand)
    if starts > 0 and cfg.ascent_steps > 0:
        order = jnp.argsort(-errs, axis=1)[:, :starts]  # (S, starts, P): worst candidates of each point
        rows = jnp.swapaxes(order, 1, 2).reshape(num_seeds, -1)  # (S, P * starts), point-major
        idx = jnp.repeat(jnp.arange(num_points), starts)
        x0 = jax.vmap(lambda x, r: x[r])(xs, rows)  # (S, Q, N, d)
        q = x0.shape[1]

        def value_and_grad(z):  # flattened (S * Q, N, d), each seed against its own models
            v, g = _point_errs_and_grads_seeds(models, discrete, ens_a, z.reshape(num_seeds, q, *z.shape[1:]), w0,
                                               idx, lmax)  # fmt: skip
            return v.reshape(-1), g.reshape(z.shape)

        best, _ = projected_ascent(
            value_and_grad, x0.reshape(-1, *x0.shape[2:]), radius=cfg.radius, steps=cfg.ascent_steps,
            step_size=cfg.ascent_step_size,
        )  # fmt: skip
        ascent = jnp.max(best.reshape(num_seeds, num_points, starts), axis=2)
    gaps = [np.asarray(jax.vmap(_param_gap)(p, c)) for p, c in zip(discrete, state["coupled"])]  # each (S,)
    wall = (time.perf_counter() - t0) / (num_points * num_seeds)
    errs, mc_err, test_set, ascent = (np.asarray(a) for a in (errs, mc_err, test_set, ascent))
    for si, seed in enumerate(seeds):
        for p, (L, H) in enumerate(group.points):
            kk = keys[si][p]
            if kk in done:
                continue
            pointwise = float(np.mean(errs[si, :, p]))
            ts_val, as_val = float(test_set[si, p]), float(ascent[si, p])
            mc_v = float(mc_err[si])
            writer.write({
                "sweep": group.sweep, "optimizer": group.optimizer, "depth": L, "heads": H,
                "num_tokens": group.num_tokens, "dim": group.dim, "seed": seed, "step": step,
                "pointwise_err": f"{pointwise:.6e}", "uniform_err": f"{max(ts_val, as_val):.6e}",
                "uniform_test_set": f"{ts_val:.6e}", "uniform_ascent": f"{as_val:.6e}",
                "uniform_source": "ascent" if as_val > ts_val else "test_set",
                "param_gap": f"{float(gaps[p][si]):.6e}",
                "mc_err": f"{mc_v:.6e}", "mc_flag": int(cfg.mc_check and mc_v > 0.2 * pointwise),
                "wall_s": f"{wall:.3f}",
            })  # fmt: skip
            done.add(kk)


#: Settings that change how a run executes, not what it computes: a run may resume with other values.
EXECUTION_ONLY = ("shard_seeds", "shard_particles")


def check_folder(cfg: RatesConfig, out_dir: str) -> None:
    """``ValueError`` if ``out_dir`` holds a run of another configuration (resuming it would mix two runs).

    A key the folder's ``config.json`` lacks was added to :class:`RatesConfig` later: that run used its
    default. The settings of :data:`EXECUTION_ONLY` are not compared."""
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.exists(config_path):
        return
    with open(config_path) as f:
        previous = json.load(f)
    defaults = json.loads(json.dumps(dataclasses.asdict(RatesConfig())))
    previous = {**{k: v for k, v in defaults.items() if k not in previous}, **previous}
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for k in EXECUTION_ONLY:
        previous.pop(k, None)
        current.pop(k, None)
    if previous != current:
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        raise ValueError(
            f"rates: {out_dir} holds a run with a different configuration ({config_path}; differs in "
            f"{', '.join(changed)}); use another --out, or delete the folder to start over."
        )


def run(cfg: RatesConfig, out_dir: str, *, progress: bool = True) -> dict:
    """Run (or resume) the experiment into ``out_dir``; return the summary (also written to summary.json)."""
    from . import fits

    cfg.validate()
    if cfg.precision == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if cfg.precision == "float64" else jnp.float32
    check_folder(cfg, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    config_path = os.path.join(out_dir, "config.json")
    cfg_dict = dataclasses.asdict(cfg)
    if not os.path.exists(config_path):
        with open(config_path, "w") as f:
            json.dump(cfg_dict, f, indent=2)
    done = _read_done(csv_path)
    groups = _groups(cfg)
    seeds = list(range(cfg.seeds))
    mesh = _mesh(cfg)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * cfg.seeds * (cfg.steps + 1), desc="rates", unit="step")
    writer = _Writer(csv_path)
    try:
        for group in groups:
            keys = [
                _row_key(group.sweep, group.optimizer, L, H, group.num_tokens, group.dim, seed, st)
                for seed in seeds
                for L, H in group.points
                for st in _eval_steps(cfg.steps)
            ]
            if all(k in done for k in keys):
                if bar is not None:
                    bar.update(cfg.seeds * (cfg.steps + 1))
                continue
            _run_group(cfg, group, seeds, done, writer, bar, dtype, mesh)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    summary = {
        "fits": fits.summarize(rows),
        "config": cfg_dict,
        "versions": _versions(),
        "device": {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                   "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "mesh": None if mesh is None else dict(mesh.shape)},
        "elapsed_s_this_invocation": elapsed,
        "rows": len(rows),
    }  # fmt: skip
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=2)
    summary["plots"] = fits.plot(rows, out_dir)
    summary["table"] = fits.table(rows)
    return summary


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("mfattn", "jax", "jaxlib", "optax", "diffrax", "equinox", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj
