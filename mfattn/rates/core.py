"""Numerics of the rates experiment: pure, jitted functions on typed state (no files, no progress, no plots).

One *group* (tokens ``N``, width ``d``, optimizer) has one data stream and therefore one limit (docs/spec.md
section 7.1: Theorem 7's expectation is over the parameters, given the data). The limit is represented by ``R``
independent replicas (sub-ensembles of ``M / R`` particles, leaves ``(R, K+1, M/R, d, k)``); the limit's paths are
the replicas' pooled mean, whose Monte-Carlo error is estimated by batch means,

    mc^2 = sum_r |z_r - zbar|^2 / (R (R - 1))      (z: tokens and adjoints at the layer times, in the error's norm),

and the error of one replica against the discrete model gives ``e^2(M / R)`` beside the pooled ``e^2(M)``, from
which ``e^2(M) = e^2_inf + c / M`` is extrapolated. Each seed has its own discrete models (one per (L, H) point,
stacked over seeds) and coupled heads ``theta_bar`` (paper eq. 23), trained with the limit's gradients.

The points of one depth share one compiled program: their heads are stored replicated up to the largest head count
``H_max`` of that depth (each of the ``H`` heads ``H_max / H`` times), which leaves the head average, and therefore
the trajectories, adjoints and per-head gradients, unchanged. A *depth group* holds leaves ``(S, G, L, H_max, d,
k)`` for its ``G`` head counts; compile time grows with the number of distinct depths, not of points.
"""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import folded, limit
from ..attention import SOFTMAX, Attention
from ..losses import Loss
from ..params import Params
from ..particles import adjoint, forward
from ..train import batch_grad_map

__all__ = [
    "Problem",
    "LimitState",
    "SeedState",
    "Errors",
    "train_step",
    "RowErrors",
    "evaluate",
    "evaluate_and_paths",
    "evaluate_rows",
    "rows_from_paths",
    "limit_replica_paths",
    "surrogate",
    "surrogate_paths",
    "surrogate_values_and_grads",
    "sign_fraction",
    "depth_spread",
    "euler_heads",
    "param_gap",
    "stack",
    "compile_evaluation",
    "compile_search",
]


class Problem(eqx.Module):
    """The fixed parts of a group: its task (the target of any input), loss, inverse temperature, the limit's grid
    and solver (fixed steps: Tsit5 with ``steps`` steps landing on the grid times, in the fixed-step loop of
    :class:`mfattn.limit.FixedSteps`), attention and radius."""

    task: eqx.Module
    loss: Loss
    beta: jax.Array
    grid: jax.Array
    steps: int = eqx.field(static=True)  # fixed solver steps over [0, 1]; 0: adaptive
    rtol: float = eqx.field(static=True, default=1e-5)
    atol: float = eqx.field(static=True, default=1e-7)
    spec: Attention = eqx.field(static=True, default=SOFTMAX)
    fold_heads: bool = eqx.field(static=True, default=True)  # the search's paths through mfattn.folded

    def solve_kwargs(self) -> dict:
        if self.steps > 0:
            return dict(solver=diffrax.Tsit5(), stepsize_controller=limit.FixedSteps(self.steps), attention=self.spec)
        return dict(rtol=self.rtol, atol=self.atol, attention=self.spec)

    def limit_paths(self, ens: Params, x, w, y, lmax: int):
        """One ensemble's tokens and adjoints at ``t_l = l / lmax``: two ``(lmax + 1, N, d)``."""
        ts = jnp.arange(lmax + 1, dtype=self.grid.dtype) / lmax
        _, xs, ps = limit.forward_backward(
            ens, x, self.loss, beta=self.beta, ts=ts, weights=w, targets=y, grid=self.grid, **self.solve_kwargs()
        )
        return xs, ps

    def discrete_paths(self, params: Params, x, w, y, *, fold: bool = False):
        """A discrete model's tokens and adjoints at its layers: two ``(L + 1, N, d)``. ``fold``: through
        :mod:`mfattn.folded` (heads contracted in matrix products; the same numbers up to rounding) where it
        computes this attention and ``fold_heads`` is set: the supremum search's many paths of few tokens (its
        cheap limit's hundreds of heads per layer)."""
        if fold and self.fold_heads and folded.supports(self.spec):
            params = folded.fold(params)
            fwd, adj = folded.forward, folded.adjoint
        else:
            fwd, adj = forward, adjoint
        kw = dict(beta=self.beta, weights=w, attention=self.spec)
        traj = fwd(params, x, **kw)
        return traj, adj(params, traj, self.loss.lions(traj[-1], w, y), **kw)


class LimitState(NamedTuple):
    """The trained limit: replicas ``(R, K+1, M/R, d, k)``, their optimizer state, and their initial values."""

    ens: Params
    opt: optax.OptState
    init: Params


class SeedState(NamedTuple):
    """Every seed's discrete models and coupled heads, one entry per depth group, leaves ``(S, G, L, H_max, d, k)``
    (see the module docstring)."""

    discrete: tuple
    discrete_opt: tuple
    coupled: tuple
    coupled_opt: tuple


class Errors(NamedTuple):
    """Discrete-vs-limit errors of every seed, point and input (``(S, P, C)``), and the limit's own (``(P, C)``).

    ``err`` is ``max_l max_i (|x_i^l - x_i(t_l)|^2 + |p_i^l - p_i(t_l)|^2)^(1/2)`` against the pooled limit;
    ``err_x`` and ``err_p`` the same with one part; ``err2_replica`` the mean over replicas of ``err^2`` against one
    replica (``e^2(M / R)``); ``p_norm`` the limit adjoint's ``max_l max_i |p_i(t_l)|``; ``mc`` the batch-means
    Monte-Carlo error of the pooled limit at the point's layer times.

    The error splits at the *Euler limit* of depth ``L``: the ``L``-layer model whose layer ``l`` has the limit's
    particles at ``t_l`` as its heads (infinitely many heads, :func:`mfattn.limit.discretize`; pooled over
    replicas like the limit). ``fluct`` is the discrete model against it (the heads' fluctuation and the training
    coupling, no Euler term), ``euler`` the Euler limit against the limit (the ``O(1/L)`` discretisation, the same
    for every seed and head count), ``fluct_mc`` the Euler limit's batch-means Monte-Carlo error. By the triangle
    inequality ``|fluct - euler| <= err <= fluct + euler``."""

    err: jax.Array
    err_x: jax.Array
    err_p: jax.Array
    err2_replica: jax.Array
    p_norm: jax.Array
    mc: jax.Array
    fluct: jax.Array
    euler: jax.Array
    fluct_mc: jax.Array


def stack(trees: list):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _masked(sq, w):
    """``sq`` with the entries of zero-mass tokens (the last axis) set to 0 (explicit broadcasting)."""
    return jnp.where(jnp.broadcast_to(w > 0, sq.shape), sq, 0.0)


def _d2(a, b):
    """``sum over coordinates of (a - b)^2``, ``b`` broadcast to ``a``'s leading axes."""
    return jnp.sum((a - jnp.broadcast_to(b, a.shape)) ** 2, axis=-1)


def _sq(a, b, w):
    """``max_l max_{i live} |a_i^l - b_i^l|^2`` (the last axis is the token's coordinates)."""
    sq = _d2(a, b)
    return jnp.max(_masked(sq, w), axis=(-2, -1))


def _dist(a, b, w):
    """``max_l max_{i live} (|x_a - x_b|^2 + |p_a - p_b|^2)`` of path pairs ``a = (x, p)``, ``b`` broadcast."""
    return jnp.max(_masked(_d2(a[0], b[0]) + _d2(a[1], b[1]), w), axis=(-2, -1))


def _batch_means(xr, pr, w):
    """Batch-means Monte-Carlo error of the pooled mean of replica paths ``(R, L+1, N, d)``."""
    num_rep = xr.shape[0]
    xbar, pbar = jnp.mean(xr, axis=0), jnp.mean(pr, axis=0)
    spread = jax.vmap(lambda a, b: _dist((a, b), (xbar, pbar), w))(xr, pr)  # (R,)
    return jnp.sqrt(jnp.sum(spread) / (num_rep * (num_rep - 1)))


@eqx.filter_jit
def euler_heads(reps: Params, discrete: tuple, grid) -> tuple:
    """The Euler limits' heads of every depth group of ``discrete``: leaves ``(R, L, M/R, d, k)``."""
    return tuple(
        jax.vmap(lambda e, L=p.wq.shape[2]: limit.discretize(e, L, grid=grid))(reps)
        for p in discrete  # noqa: B008
    )


def _point_errors(problem: Problem, discrete: tuple, euler: tuple, x, w, y, xr, pr, lmax: int):
    """Errors of every seed and point at one input, against replica paths ``xr, pr`` (``(R, lmax+1, N, d)``) and
    the Euler limits of heads ``euler`` (:func:`euler_heads`)."""
    xbar, pbar = jnp.mean(xr, axis=0), jnp.mean(pr, axis=0)
    out = []
    for params, heads in zip(discrete, euler):  # one entry per depth group (static shapes), stacked over seeds, H
        G = params.wq.shape[1]
        stride = lmax // params.wq.shape[2]
        xl, pl, xrl, prl = xbar[::stride], pbar[::stride], xr[:, ::stride], pr[:, ::stride]
        xd, pd = jax.vmap(jax.vmap(lambda p: problem.discrete_paths(p, x, w, y)))(params)  # (S, G, L+1, N, d)
        rep = jax.vmap(lambda a, b: _dist((xd, pd), (a, b), w))(xrl, prl)  # noqa: B023  (R, S, G)
        pn = jnp.sqrt(jnp.max(_masked(jnp.sum(pl**2, axis=-1), w)))
        xe_r, pe_r = jax.vmap(lambda h: problem.discrete_paths(h, x, w, y))(heads)  # (R, L+1, N, d)
        xe, pe = jnp.mean(xe_r, axis=0), jnp.mean(pe_r, axis=0)
        full = lambda v: jnp.full((G,), v)  # noqa: E731, B023  (the limit's own numbers: the same for every H)
        out.append(
            (
                jnp.sqrt(_dist((xd, pd), (xl, pl), w)),
                jnp.sqrt(_sq(xd, xl, w)),
                jnp.sqrt(_sq(pd, pl, w)),
                jnp.mean(rep, axis=0),
                full(pn),
                full(_batch_means(xrl, prl, w)),
                jnp.sqrt(_dist((xd, pd), (xe, pe), w)),
                full(jnp.sqrt(_dist((xe, pe), (xl, pl), w))),
                full(_batch_means(xe_r, pe_r, w)),
            )
        )
    return tuple(jnp.concatenate(a, axis=-1) for a in zip(*out))  # (S, P) ... and (P,)


@eqx.filter_jit
def limit_replica_paths(problem: Problem, reps: Params, xs, w, lmax: int) -> tuple:
    """Every replica's paths ``(x, p)`` at the inputs ``xs`` (``(C, N, d)``, masses ``w``), each
    ``(C, R, lmax + 1, N, d)``: the limit's solves, one per replica and input. Its own compiled program, shared by
    the candidate evaluation and the search's exact rows (same chunk shape), and by every depth group."""

    def one(x):
        y = problem.task.target(x, w)
        return jax.vmap(lambda e: problem.limit_paths(e, x, w, y, lmax))(reps)

    return jax.lax.map(one, xs)  # inputs one after another: memory bounded by one input


@eqx.filter_jit
def _errors_from_paths(problem: Problem, discrete: tuple, euler: tuple, xs, w, xr, pr, lmax: int):
    def one(args):
        x, xr1, pr1 = args
        y = problem.task.target(x, w)
        return _point_errors(problem, discrete, euler, x, w, y, xr1, pr1, lmax)

    parts = jax.lax.map(one, (xs, xr, pr))
    return Errors(*(jnp.moveaxis(a, 0, -1) for a in parts))


def evaluate_and_paths(problem: Problem, reps: Params, discrete: tuple, xs, w, lmax: int) -> tuple:
    """:class:`Errors` of every seed and point on the inputs ``xs`` (``(C, N, d)``, masses ``w``) against the
    limit's replicas ``reps`` (one solve per replica and input, shared by every seed and point) and its Euler
    limits (one per depth); and the pooled limit's paths ``(x, p)``, each ``(C, lmax + 1, N, d)``."""
    euler = euler_heads(reps, discrete, problem.grid)
    xr, pr = limit_replica_paths(problem, reps, xs, w, lmax)
    errs = _errors_from_paths(problem, discrete, euler, xs, w, xr, pr, lmax)
    return errs, (jnp.mean(xr, axis=1), jnp.mean(pr, axis=1))


def evaluate(problem: Problem, reps: Params, discrete: tuple, xs, w, lmax: int) -> Errors:
    """:func:`evaluate_and_paths` without the paths."""
    return evaluate_and_paths(problem, reps, discrete, xs, w, lmax)[0]


class RowErrors(NamedTuple):
    """The exact errors of single (seed, head count, input) rows of one depth group, each ``(Q,)``: ``err`` and its
    Monte-Carlo error ``mc``, the fluctuation part ``fluct`` (against the depth's Euler limit)."""

    err: jax.Array
    mc: jax.Array
    fluct: jax.Array


@eqx.filter_jit
def _rows_from_paths(problem: Problem, group: Params, euler: Params, xs, w, rows, gidx, xr, pr, lmax: int):
    def one(args):
        x, s, g, xr1, pr1 = args
        y = problem.task.target(x, w)
        mine = jax.tree.map(lambda a: a[s, g][None, None], group)
        e = _point_errors(problem, (mine,), (euler,), x, w, y, xr1, pr1, lmax)
        return e[0][0, 0], e[5][0], e[6][0, 0]

    return RowErrors(*jax.lax.map(one, (xs, rows, gidx, xr, pr)))


def rows_from_paths(problem: Problem, group: Params, euler: Params, xs, w, rows, gidx, xr, pr, lmax: int):
    """:class:`RowErrors` of row ``q`` (seed ``rows[q]``, head count ``gidx[q]`` of the depth group ``group``) at
    the input ``xs[q]`` against given replica paths ``xr[q], pr[q]`` (``(Q, R, lmax + 1, N, d)``, from
    :func:`limit_replica_paths`): one limit solve can serve several rows (the search's pooled maximisers)."""
    return _rows_from_paths(problem, group, euler, xs, w, rows, gidx, xr, pr, lmax)


def evaluate_rows(problem: Problem, reps: Params, group: Params, euler: Params, xs, w, rows, gidx, lmax: int):
    """:class:`RowErrors` of row ``q``: seed ``rows[q]`` and head count ``gidx[q]`` of the depth group ``group``
    (leaves ``(S, G, L, H_max, d, k)``, Euler heads ``euler`` from :func:`euler_heads`) at the input ``xs[q]``.
    The same numbers as :func:`evaluate` at a fraction of its work when each input belongs to one row (the search's
    maximisers): one limit solve per row (:func:`limit_replica_paths`), one discrete model."""
    xr, pr = limit_replica_paths(problem, reps, xs, w, lmax)
    return _rows_from_paths(problem, group, euler, xs, w, rows, gidx, xr, pr, lmax)


def surrogate(reps: Params, particles: int, lmax: int, grid) -> Params:
    """The cheap limit the supremum search climbs on: explicit Euler on ``lmax`` layers with the first
    ``particles`` particles of replica 0 as heads (leaves ``(lmax, particles, d, k)``)."""
    ens = jax.tree.map(lambda a: a[0, :, :particles], reps)
    return limit.discretize(ens, lmax, grid=grid)


@eqx.filter_jit
def surrogate_paths(problem: Problem, sur: Params, xs, w):
    """The cheap limit's paths ``(x, p)`` at the inputs ``xs``: each ``(C, lmax + 1, N, d)``."""

    def one(x):
        return problem.discrete_paths(sur, x, w, problem.task.target(x, w), fold=True)

    return jax.lax.map(one, xs)


@eqx.filter_jit
def surrogate_values_and_grads(
    problem: Problem, sur: Params, group: Params, xs, w, rows, gidx, offsets, lmax: int, batch: int = 4, count=None
):
    """The corrected surrogate error of row ``q`` and its gradient in the input: seed ``rows[q]``, head count
    ``gidx[q]`` of the depth group ``group`` (leaves ``(S, G, L, H_max, d, k)``) at the input ``xs[q]``, against
    the cheap limit's paths plus the row's constant ``offsets[q]`` (two ``(Q, lmax + 1, N, d)``: the full limit's
    paths minus the cheap limit's at the row's start, so that the surrogate is exact there). ``(Q,)`` values and
    ``(Q, N, d)`` gradients for ``Q`` rows.

    The rows run ``batch`` at a time (a loop over batches, each vectorised): one row's intermediates (its cheap
    limit's ``(heads, N, N)`` scores at every layer, kept for the gradient) stay in cache. Measured on the 2-core
    CPU (32 rows, the surrogate's 128 heads, L = 8, d = k = 2, ``benchmarks/ascent_batch.py``, beside another
    job): against all 32 rows vectorised at once, 1.91x at N = 4, 1.45x at N = 16, 1.64x at N = 64 (blocks of 2:
    1.52x, 1.82x, 1.74x; one at a time: 0.95-1.34x; measured as ``lax.map(batch_size=)``, the same batches); the
    same values up to float32 rounding (gradients 3e-7).

    ``count`` (an integer array; default: every row): only the batches holding the first ``count`` rows run (a loop
    whose trip count is an argument: one compiled program for every count); the values and gradients of the rows
    after those batches are 0. The search passes its chunks' real row counts, so the copies padding a chunk to its
    compiled shape cost nothing beyond their batch."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"rates.core.surrogate_values_and_grads: batch must be an integer >= 1, got {batch!r}.")
    stride = lmax // group.wq.shape[2]

    def err(x, s, g, dx, dp):
        y = problem.task.target(x, w)
        xl, pl = problem.discrete_paths(sur, x, w, y, fold=True)
        xd, pd = problem.discrete_paths(jax.tree.map(lambda a: a[s, g], group), x, w, y, fold=True)
        sq = _d2(xd, (xl + dx)[::stride]) + _d2(pd, (pl + dp)[::stride])
        return jnp.sqrt(jnp.max(_masked(sq, w), axis=(-2, -1)))

    args = (xs, rows, gidx, *offsets)
    q = xs.shape[0]
    count = q if count is None else count
    nb = -(-q // batch)
    blocks = jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], nb * batch - q, 0)]).reshape(nb, batch, *a.shape[1:]), args
    )
    one_batch = jax.vmap(jax.value_and_grad(err))

    def body(i, out):
        v, g = one_batch(*jax.tree.map(lambda a: a[i], blocks))
        return out[0].at[i].set(v), out[1].at[i].set(g)

    zeros = (jnp.zeros((nb, batch), xs.dtype), jnp.zeros((nb, batch, *xs.shape[1:]), xs.dtype))
    v, g = jax.lax.fori_loop(0, (count + batch - 1) // batch, body, zeros)
    return v.reshape(-1)[:q], g.reshape(-1, *xs.shape[1:])[:q]


def _zeros(tree):
    """Host zeros shaped like the ``ShapeDtypeStruct`` leaves of ``tree``, as arguments for compiling."""
    return jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), tree)


def _index(n: int):
    """Row indices as the drivers pass them (NumPy's integers through ``jnp.asarray``: JAX's default int)."""
    return jnp.asarray(np.zeros(n, np.int64))


def compile_evaluation(problem: Problem, reps: Params, discrete: tuple, xs, w, lmax: int) -> None:
    """Compile, without running, the programs :func:`evaluate_and_paths` runs on inputs shaped like ``xs``
    (``(C, N, d)``): for compiling ahead on another thread (XLA's compiler releases the GIL); a later call with
    arguments of these shapes finds them in JAX's cache."""
    euler_heads.lower(reps, discrete, problem.grid).compile()
    euler = _zeros(jax.eval_shape(lambda: euler_heads(reps, discrete, problem.grid)))
    limit_replica_paths.lower(problem, reps, xs, w, lmax).compile()
    xr, pr = _zeros(jax.eval_shape(lambda: limit_replica_paths(problem, reps, xs, w, lmax)))
    _errors_from_paths.lower(problem, discrete, euler, xs, w, xr, pr, lmax).compile()


def compile_search(problem: Problem, reps: Params, discrete: tuple, candidates, w, lmax: int, *, particles: int,
                   ascent_chunk: int, row_chunk: int) -> None:  # fmt: skip
    """Compile, without running, the supremum search's programs (:mod:`.search`) for the candidates' shape
    ``(C, N, d)``: the cheap limit's paths on chunks of ``ascent_chunk`` candidates, and per depth group the
    ascent's values and gradients on chunks of ``ascent_chunk`` paths and the exact rows (:func:`evaluate_rows`) on
    chunks of ``row_chunk`` inputs. As :func:`compile_evaluation`."""
    sur = surrogate(reps, particles, lmax, problem.grid)
    euler = _zeros(jax.eval_shape(lambda: euler_heads(reps, discrete, problem.grid)))
    xs_a = jnp.asarray(np.zeros((ascent_chunk, *candidates.shape[1:]), candidates.dtype))
    surrogate_paths.lower(problem, sur, xs_a, w).compile()  # the candidates in chunks of ascent_chunk
    xs_r = jnp.asarray(np.zeros((row_chunk, *candidates.shape[1:]), candidates.dtype))
    path = jax.ShapeDtypeStruct((ascent_chunk, lmax + 1, *candidates.shape[1:]), candidates.dtype)
    offsets = _zeros((path, path))  # a row's correction: full minus cheap paths (x, p) at its start
    xr, pr = _zeros(jax.eval_shape(lambda: limit_replica_paths(problem, reps, xs_r, w, lmax)))
    for group, heads in zip(discrete, euler):
        rows, gidx = _index(ascent_chunk), _index(ascent_chunk)
        count = jnp.asarray(ascent_chunk)  # as the search passes a chunk's real row count
        surrogate_values_and_grads.lower(problem, sur, group, xs_a, w, rows, gidx, offsets, lmax, count=count).compile()
        rows, gidx = _index(row_chunk), _index(row_chunk)
        _rows_from_paths.lower(problem, group, heads, xs_r, w, rows, gidx, xr, pr, lmax).compile()


def _flat_heads(p: Params) -> Params:
    """``(S, G, L, H, d, k) -> (L, S G H, d, k)``: every seed's heads side by side (the gradient map is per head)."""
    return jax.tree.map(lambda a: jnp.moveaxis(a, 2, 0).reshape(a.shape[2], -1, *a.shape[4:]), p)


def _unflat_heads(g: Params, like: Params) -> Params:
    return jax.tree.map(lambda a, b: jnp.moveaxis(a.reshape(b.shape[2], *b.shape[:2], *b.shape[3:]), 0, 2), g, like)


def sign_fraction(old: Params, new: Params, learning_rate: float, weight_decay: float, blockwise: bool):
    """Fraction of the optimizer's directions at the sign bound: ``|m_hat / (sqrt(v_hat) + eps)| >= 0.9`` entrywise
    (AdamW), or Frobenius norm ``>= 0.9`` per block (blockwise AdamW). The direction is read off the update,
    ``theta_new = theta - lr (direction + lambda theta)``."""
    fr = []
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
        direction = (a - b) / learning_rate - weight_decay * a
        mag = jnp.sqrt(jnp.sum(direction**2, axis=(-2, -1))) if blockwise else jnp.abs(direction)
        fr.append(jnp.mean(mag >= 0.9))
    return jnp.mean(jnp.stack(fr))


@eqx.filter_jit
def train_step(problem: Problem, lim: LimitState, seeds: SeedState, optimizer, batch, hyper: tuple):
    """One training step on the shared batch: the limit's replicas (each its own mean-field gradients), every
    seed's discrete models (their own gradients, hand adjoint) and coupled heads (the limit's gradients at
    ``t_l = l / L``, averaged over replicas; paper eq. 23). Returns the new states and diagnostics (losses,
    sign-bound fractions)."""
    lr, wd, blockwise = hyper
    coupled_flat = tuple(_flat_heads(c) for c in seeds.coupled)

    def limit_grads(ens):
        return limit.batch_grad_map(
            ens,
            batch.tokens,
            batch.weights,
            batch.targets,
            problem.loss,
            beta=problem.beta,
            grid=problem.grid,
            coupled=coupled_flat,
            **problem.solve_kwargs(),
        )

    lim_loss, g_ens, g_c = jax.vmap(limit_grads)(lim.ens)
    g_c = tuple(_unflat_heads(jax.tree.map(lambda a: jnp.mean(a, axis=0), g), c) for g, c in zip(g_c, seeds.coupled))
    upd, lim_opt = jax.vmap(optimizer.update)(g_ens, lim.opt, lim.ens)
    ens = optax.apply_updates(lim.ens, upd)

    def disc_grads(p):
        one = lambda q: batch_grad_map(
            q,
            batch.tokens,
            batch.weights,
            batch.targets,
            problem.loss,  # noqa: E731
            beta=problem.beta,
            attention=problem.spec,
        )
        return jax.vmap(jax.vmap(one))(p)

    update = jax.vmap(jax.vmap(optimizer.update))

    new_d, new_do, new_c, new_co, losses, fr_d = [], [], [], [], [], []
    for p, o, c, co, gc in zip(seeds.discrete, seeds.discrete_opt, seeds.coupled, seeds.coupled_opt, g_c):
        loss_d, g = disc_grads(p)
        u, o = update(g, o, p)
        q = optax.apply_updates(p, u)
        fr_d.append(sign_fraction(p, q, lr, wd, blockwise))
        new_d.append(q)
        new_do.append(o)
        u, co = update(gc, co, c)
        new_c.append(optax.apply_updates(c, u))
        new_co.append(co)
        losses.append(jnp.mean(loss_d, axis=0))
    diag = {
        "limit_loss": jnp.mean(lim_loss),
        "discrete_loss": jnp.concatenate(losses),  # (P,), mean over seeds
        "limit_sign_fraction": sign_fraction(lim.ens, ens, lr, wd, blockwise),
        "discrete_sign_fraction": jnp.mean(jnp.stack(fr_d)),
    }
    return LimitState(ens, lim_opt, lim.init), SeedState(tuple(new_d), tuple(new_do), tuple(new_c), tuple(new_co)), diag


def depth_spread(ens: Params, init: Params) -> dict:
    """How depth-dependent training made the limit: the particles' displacement ``D_t = theta(t) - theta_0``
    split into its common part ``c = mean_t D_t`` and the rest; ``spread = rms(D - c) / rms(c)`` (0: every depth
    moved alike), and the share of ``c`` that is one common translation (the particle mean of ``c``)."""
    d = [a - b for a, b in zip(jax.tree.leaves(ens), jax.tree.leaves(init))]  # (R, K+1, M, d, k)
    common = [jnp.mean(x, axis=1, keepdims=True) for x in d]
    rest = sum(jnp.sum((x - c) ** 2) for x, c in zip(d, common))
    size = sum(jnp.sum(jnp.broadcast_to(c, x.shape) ** 2) for x, c in zip(d, common))
    shift = [jnp.mean(c, axis=2, keepdims=True) for c in common]
    shift_sq = sum(jnp.sum(jnp.broadcast_to(s, x.shape) ** 2) for x, s in zip(d, shift))
    disp = sum(jnp.sum(x**2) for x in d)
    count = d[0].shape[0] * d[0].shape[1] * d[0].shape[2]
    return {
        "depth_spread": float(jnp.sqrt(rest / jnp.maximum(size, 1e-300))),
        "translation_share": float(jnp.sqrt(shift_sq / jnp.maximum(size, 1e-300))),
        "rms_displacement": float(jnp.sqrt(disp / count)),
    }


@jax.jit
def param_gap(a: Params, b: Params):
    """Lemma 6's gap ``max_{l,h} |theta_{l,h} - theta_bar_{l,h}|`` (Frobenius over the four blocks), per seed and
    head count: ``(S, G)`` from a depth group's leaves ``(S, G, L, H_max, d, k)``."""
    sq = sum(jnp.sum((x - y) ** 2, axis=(-2, -1)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return jnp.sqrt(jnp.max(sq, axis=(-2, -1)))
