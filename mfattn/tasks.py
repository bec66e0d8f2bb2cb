"""Bounded data tasks: samplers of token sequences that stay in a closed ball (paper Assumption 3).

Every task draws batches of sequences whose tokens all lie in the closed ball of radius ``R`` in
``R^d`` (up to a few ulps of rounding), as the paper's analysis assumes. Each task is an
:class:`equinox.Module` with a jittable :meth:`Task.sample` returning a :class:`Batch` and a ``loss``
property, the task's natural :class:`mfattn.losses.Loss`:

* :class:`TeacherStudent` -- inputs uniform in the ball, targets the terminal tokens of a fixed random
  teacher transformer; loss :class:`~mfattn.losses.TokenRegression`.
* :class:`Denoising` -- one diffusion step: clean tokens from a mixture of small Gaussian blobs projected
  into the ball, inputs the clean tokens plus Gaussian noise projected back onto the ball, targets the
  clean tokens; loss :class:`~mfattn.losses.TokenRegression`.
* :class:`InContextRegression` -- linear regression in context: ``(x_i, <w, x_i>)`` example tokens and a
  query ``(x_q, 0)``; the target is ``y_q``; loss :class:`QueryRegression` on the query token only.
* :class:`TargetMeasure` -- transport every input to one fixed target measure ``rho``: inputs uniform in
  the ball, the target the same point cloud for every sequence; loss :class:`~mfattn.losses.MMD`.

:class:`TeacherStudent` and :class:`TargetMeasure` also define their target for *any* input sequence,
``task.target(tokens, weights)`` (the teacher's output; the fixed cloud), which is what an error measured
uniformly over inputs needs (:mod:`mfattn.rates`).

Variable sequence lengths are padding weights: with ``min_tokens`` (``min_examples``) set, each sequence
draws its length ``n`` uniformly in ``[min, N]`` and its weights are ``1/n`` on the real tokens and 0 on
the padding. Padding slots still hold ordinary samples (so they obey the ball bound too) but, with mass
0, they influence nothing (docs/spec.md section 1).

Example::

    task = TeacherStudent.random(jax.random.key(0), dim=4, depth=3, heads=2, head_dim=4, beta=1.0,
                                 num_tokens=16)
    batch = task.sample(jax.random.key(1), 32)     # tokens (32, 16, 4), weights (32, 16)
    value, grads = mfattn.loss_and_grad(params, batch.tokens[0], task.loss, beta=1.0,
                                        weights=batch.weights[0], targets=batch.targets[0])
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from .attention import project_ball
from .losses import MMD, Loss, TokenRegression
from .params import InitMethod, Params, init_params
from .particles import forward

__all__ = [
    "Batch", "Task", "TeacherStudent", "Denoising", "InContextRegression", "QueryRegression", "TargetMeasure",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Validation (plain Python on the static settings: runs before anything is traced or computed)
# ---------------------------------------------------------------------------------------------------------


def _check_int(owner: str, name: str, value, low: int = 1, high: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{owner}: {name} must be an integer {span}, got {value!r}.")
    return int(value)


def _check_float(owner: str, name: str, value, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{owner}: {name} must be a concrete real number, got {value!r}.") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{owner}: {name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}.")
    return v


def _check_min(owner: str, name: str, value, maximum: int, max_name: str) -> int | None:
    if value is None:
        return None
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or not 1 <= value <= maximum:
        raise ValueError(
            f"{owner}: {name} must be None or an integer in [1, {max_name}] = [1, {maximum}], got {value!r}."
        )
    return int(value)


# ---------------------------------------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------------------------------------


def _float_dtype():
    """JAX's default floating dtype (float64 when x64 is enabled), read at trace time."""
    return jnp.zeros(()).dtype


# Each sampler makes a single call to the PRNG and slices it: XLA's compile time grows with every random
# call (each inlines a threefry hash), and compilation dominates the cost of a sampler's first use.


def _draws(key: PRNGKeyArray, normal_shape: tuple[int, ...], uniform_shape: tuple[int, ...], dtype):
    """A standard-normal block and a ``U[0, 1)`` block from one ``jax.random.uniform`` call.

    The normals are ``sqrt(2) erfinv(2u - 1)`` (the inverse CDF, as ``jax.random.normal`` computes them),
    with ``2u - 1`` kept above -1 so that they are finite.
    """
    n_normal, n_uniform = math.prod(normal_shape), math.prod(uniform_shape)
    flat = jax.random.uniform(key, (n_normal + n_uniform,), dtype)
    low = jnp.nextafter(jnp.asarray(-1.0, dtype), jnp.asarray(0.0, dtype))
    g = math.sqrt(2.0) * jax.scipy.special.erfinv(jnp.maximum(2 * flat[:n_normal] - 1, low))
    return g.reshape(normal_shape), flat[n_normal:].reshape(uniform_shape)


def _ball(g: Float[Array, "*batch d"], u: Float[Array, "*batch"], radius) -> Float[Array, "*batch d"]:
    """Points uniform in the closed ball of radius ``radius`` from normals ``g`` and uniforms ``u``.

    ``g / |g|`` is uniform on the unit sphere and ``radius * u^(1/d)`` has the law of the distance to the
    origin, so ``|x| <= radius`` (up to rounding) by construction.
    """
    norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
    direction = g / jnp.maximum(norm, jnp.finfo(g.dtype).tiny)
    return direction * (radius * u[..., None] ** (1.0 / g.shape[-1]))


def _randint(u: Float[Array, "*batch"], low: int, high: int) -> Array:
    """Integers uniform in ``[low, high]`` from uniforms ``u`` in ``[0, 1)``."""
    return jnp.minimum(low + jnp.floor(u * (high - low + 1)).astype(jnp.int32), high)


def _truncated_normal(u: Float[Array, "*batch"], bound: float) -> Float[Array, "*batch"]:
    """Standard normal truncated to ``[-bound, bound]`` by the inverse CDF: ``sqrt 2 erfinv(erf(b/sqrt 2)(2u - 1))``."""
    edge = math.erf(bound / math.sqrt(2.0))
    return math.sqrt(2.0) * jax.scipy.special.erfinv(edge * (2 * u - 1))


def _project(x: Float[Array, "*batch d"], radius: float) -> Float[Array, "*batch d"]:
    """``Pi_R`` row-wise over any leading axes (:func:`mfattn.attention.project_ball`)."""
    return project_ball(x.reshape(-1, x.shape[-1]), radius).reshape(x.shape)


def _prefix_weights(u: Float[Array, " B"], num_tokens: int, min_tokens: int | None) -> Float[Array, "B N"]:
    """``(B, N)`` weights: uniform ``1/N``, or ``1/n`` on the first ``n ~ U{min_tokens..N}`` tokens (from ``u``)."""
    if min_tokens is None:
        return jnp.full((u.shape[0], num_tokens), 1.0 / num_tokens, u.dtype)
    n = _randint(u, min_tokens, num_tokens)
    live = jnp.arange(num_tokens)[None, :] < n[:, None]
    return jnp.where(live, 1.0 / n[:, None].astype(u.dtype), jnp.zeros((), u.dtype))


@eqx.filter_jit
def _sample(task, key, batch_size):
    return task._draw(key, batch_size)


# ---------------------------------------------------------------------------------------------------------
# Batch and the Task interface
# ---------------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """A batch of ``B`` weighted token sequences with their targets.

    Attributes:
        tokens: ``(B, N, d)`` input tokens ``x^0``; every token lies in the task's ball of radius ``R``.
        weights: ``(B, N)`` token masses: each row is ``>= 0`` and sums to 1; 0 marks padding.
        targets: a pytree whose every leaf has leading axis ``B`` (``(B, N, d)`` for the token-wise tasks,
            ``(B,)`` for :class:`InContextRegression`). Slice one sequence with
            ``jax.tree.map(lambda t: t[i], batch.targets)``.

    Example::

        batch = task.sample(key, 8)
        tokens, weights, targets = batch
    """

    tokens: Float[Array, "B N d"]
    weights: Float[Array, "B N"]
    targets: PyTree


class Task(eqx.Module):
    """A bounded data task: a sampler of token sequences in the closed ball of radius ``R``, and a loss.

    Attributes:
        dim: ``d``, the token dimension.
        num_tokens: ``N``, the number of token slots per sequence (real tokens plus padding).
        radius: ``R``: every sampled token satisfies ``|x| <= R`` (up to a few ulps of rounding).

    Subclasses set these fields, implement ``loss`` and the unvalidated sampler
    ``_draw(key, batch_size) -> Batch``; :meth:`sample` validates ``batch_size`` and jit-compiles.
    All settings other than arrays (a teacher's parameters, fixed cluster centres) are static fields,
    checked at construction.

    Example::

        batch = task.sample(jax.random.key(0), 64)
        batch = jax.jit(task.sample, static_argnums=1)(jax.random.key(0), 64)    # same result
    """

    dim: eqx.AbstractVar[int]
    num_tokens: eqx.AbstractVar[int]
    radius: eqx.AbstractVar[float]

    def sample(self, key: PRNGKeyArray, batch_size: int) -> Batch:
        """Draw a batch of ``batch_size`` sequences; deterministic given ``key``.

        Args:
            key: PRNG key (typed ``jax.random.key`` or raw ``PRNGKey``).
            batch_size: ``B >= 1``, static (with ``jax.jit`` pass it in ``static_argnums``).

        Returns:
            A :class:`Batch` with ``tokens (B, N, d)``, ``weights (B, N)`` and targets.
        """
        batch_size = _check_int(f"{type(self).__name__}.sample", "batch_size", batch_size)
        return _sample(self, key, batch_size)

    @abc.abstractmethod
    def _draw(self, key: PRNGKeyArray, batch_size: int) -> Batch:
        """The sampler proper (no validation; traced under :meth:`sample`'s jit)."""

    @property
    @abc.abstractmethod
    def loss(self) -> Loss:
        """The task's natural loss, evaluated as ``loss(x^L, weights, targets)`` for one sequence."""

    def __hash__(self) -> int:
        # ``jax.jit(task.sample)`` hashes the bound method, hence the task. Module's hash hashes every field,
        # which fails on array fields (a teacher, fixed centres); those tasks hash by identity instead.
        try:
            return super().__hash__()
        except TypeError:
            return object.__hash__(self)


# ---------------------------------------------------------------------------------------------------------
# Teacher-student
# ---------------------------------------------------------------------------------------------------------


class TeacherStudent(Task):
    """Regress the output of a fixed teacher transformer: ``y_i = x_i^L`` of the teacher on ``x^0``.

    Inputs are i.i.d. uniform in the closed ball of radius ``R`` in ``R^d``; the targets are the
    teacher's terminal tokens ``mfattn.forward(teacher, x, beta=beta, weights=w)[-1]``, computed with the
    sequence's own weights (so padding changes nothing for the real tokens). Targets are not inputs: they
    may leave the ball (when every head has ``|W_O W_V^T| <= b``, each layer multiplies the largest norm by
    at most ``1 + b/L``, so ``|y_i| <= e^b R``). The dtype of the batch is the teacher's.

    Args:
        teacher: :class:`~mfattn.Params` with leaves ``(L, H, d, k)``.
        beta: the teacher's inverse temperature, ``>= 0``.
        num_tokens: ``N >= 1``.
        radius: ``R > 0``.
        min_tokens: ``None`` (every sequence has ``N`` real tokens, weights ``1/N``) or the least length
            in ``[1, N]``: lengths are uniform in ``[min_tokens, N]``, padding at the end.
        dim: optional expected token dimension; a ``ValueError`` if it differs from ``teacher.dim``.

    Example::

        task = TeacherStudent.random(jax.random.key(0), dim=4, depth=3, heads=2, head_dim=4, beta=1.0,
                                     num_tokens=16, min_tokens=8)
        batch = task.sample(jax.random.key(1), 32)      # targets (32, 16, 4)
    """

    teacher: Params
    beta: float = eqx.field(static=True)
    num_tokens: int = eqx.field(static=True)
    radius: float = eqx.field(static=True)
    min_tokens: int | None = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(
        self,
        teacher: Params,
        beta: float,
        num_tokens: int,
        radius: float = 1.0,
        min_tokens: int | None = None,
        *,
        dim: int | None = None,
    ):
        owner = "TeacherStudent"
        if not isinstance(teacher, Params):
            raise ValueError(f"{owner}: teacher must be an mfattn.Params, got {type(teacher).__name__}.")
        if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(teacher)):
            raise ValueError(f"{owner}: teacher must have floating-point leaves.")
        if dim is not None and _check_int(owner, "dim", dim) != teacher.dim:
            raise ValueError(
                f"{owner}: dim = {dim} does not match the teacher's token dimension d = {teacher.dim} "
                f"(teacher leaves are (L, H, d, k) = {tuple(teacher.wq.shape)})."
            )
        self.beta = _check_float(owner, "beta", beta, positive=False)
        self.num_tokens = _check_int(owner, "num_tokens", num_tokens)
        self.radius = _check_float(owner, "radius", radius, positive=True)
        self.min_tokens = _check_min(owner, "min_tokens", min_tokens, self.num_tokens, "num_tokens")
        self.dim = teacher.dim
        self.teacher = teacher

    @classmethod
    def random(
        cls,
        key: PRNGKeyArray,
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        beta: float,
        num_tokens: int,
        radius: float = 1.0,
        init: InitMethod = "mean_noise",
        scale: float = 0.5,
        *,
        min_tokens: int | None = None,
        **kw,
    ) -> TeacherStudent:
        """A task whose teacher is drawn by :func:`mfattn.init_params`.

        The default ``init="mean_noise"`` (identity-mean blocks plus Xavier noise times ``scale``) gives a
        teacher that moves tokens by about their own size; with the zero-mean laws (``"xavier_uniform"``,
        ``"truncated_normal"``) the teacher stays close to the identity map and the task is nearly trivial.

        Args:
            key: PRNG key for the teacher.
            dim, depth, heads, head_dim: ``d, L, H, k`` of the teacher.
            beta, num_tokens, radius, min_tokens: as in :class:`TeacherStudent`.
            init, scale: the law of the teacher's entries (see :func:`mfattn.init_params`).
            **kw: further keywords of :func:`mfattn.init_params` (``mean``, ``tie_depth``, ``dtype``).

        Example::

            task = TeacherStudent.random(jax.random.key(0), 4, 3, 2, 4, beta=1.0, num_tokens=16)
        """
        owner = "TeacherStudent.random"
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads), ("head_dim", head_dim)):
            _check_int(owner, name, value)
        # Check the task's settings before drawing the teacher.
        _check_float(owner, "beta", beta, positive=False)
        num_tokens = _check_int(owner, "num_tokens", num_tokens)
        _check_float(owner, "radius", radius, positive=True)
        _check_min(owner, "min_tokens", min_tokens, num_tokens, "num_tokens")
        teacher = init_params(key, depth, heads, dim, head_dim, init=init, scale=scale, **kw)
        return cls(teacher, beta, num_tokens, radius, min_tokens)

    @property
    def loss(self) -> Loss:
        """:class:`~mfattn.losses.TokenRegression` ``sum_i m_i |x_i^L - y_i|^2 / 2``."""
        return TokenRegression()

    def target(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"]) -> Float[Array, "N d"]:
        """The targets of any one sequence (in the ball or not): the teacher's terminal tokens."""
        return forward(self.teacher, tokens, beta=self.beta, weights=weights)[-1]

    def _draw(self, key: PRNGKeyArray, batch_size: int) -> Batch:
        B, N = batch_size, self.num_tokens
        g, u = _draws(key, (B, N, self.dim), (B, N + 1), self.teacher.wq.dtype)
        tokens = _ball(g, u[:, :N], self.radius)
        weights = _prefix_weights(u[:, N], N, self.min_tokens)
        return Batch(tokens, weights, jax.vmap(self.target)(tokens, weights))


# ---------------------------------------------------------------------------------------------------------
# Denoising
# ---------------------------------------------------------------------------------------------------------


class Denoising(Task):
    """One denoising (diffusion) step: recover clean tokens from noisy ones.

    Clean tokens are i.i.d. draws from a mixture of ``clusters`` Gaussian blobs with equal weights::

        c_1..c_C uniform in the ball of radius R/2,   x_clean = Pi_R(c_a + spread * R * z),  a ~ U{1..C}
        x_in = Pi_R(x_clean + noise * e),             z, e ~ N(0, I_d)

    so inputs and targets both lie in the ball of radius ``R`` by the projection ``Pi_R``. By default the
    centres are fixed by ``seed`` (one distribution for every sequence: the network can learn the prior);
    with ``seed=None`` each sequence draws its own centres (the clusters must be inferred in context).
    Away from the boundary ``x_in - x_clean`` is ``N(0, noise^2 I)``.

    Args:
        dim: ``d >= 1``.
        num_tokens: ``N >= 1``.
        noise: standard deviation of the Gaussian noise, ``>= 0``.
        radius: ``R > 0``.
        clusters: number of blobs ``C >= 1``.
        min_tokens: ``None`` or the least sequence length in ``[1, N]`` (see :class:`TeacherStudent`).
        spread: standard deviation of a blob per coordinate, as a fraction of ``R`` (``>= 0``).
        seed: integer seed of the fixed centres (drawn with ``numpy.random.default_rng(seed)``), or
            ``None`` for centres drawn per sequence.

    Attributes:
        centres: the fixed centres ``(C, d)``, or ``None`` when ``seed`` is None.

    Example::

        task = Denoising(dim=4, num_tokens=32, noise=0.1)
        batch = task.sample(jax.random.key(0), 16)     # targets: the clean tokens, (16, 32, 4)
    """

    dim: int = eqx.field(static=True)
    num_tokens: int = eqx.field(static=True)
    noise: float = eqx.field(static=True)
    radius: float = eqx.field(static=True)
    clusters: int = eqx.field(static=True)
    min_tokens: int | None = eqx.field(static=True)
    spread: float = eqx.field(static=True)
    seed: int | None = eqx.field(static=True)
    centres: Float[Array, "C d"] | None

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        noise: float = 0.1,
        radius: float = 1.0,
        clusters: int = 4,
        min_tokens: int | None = None,
        *,
        spread: float = 0.1,
        seed: int | None = 0,
    ):
        owner = "Denoising"
        self.dim = _check_int(owner, "dim", dim)
        self.num_tokens = _check_int(owner, "num_tokens", num_tokens)
        self.noise = _check_float(owner, "noise", noise, positive=False)
        self.radius = _check_float(owner, "radius", radius, positive=True)
        self.clusters = _check_int(owner, "clusters", clusters)
        self.min_tokens = _check_min(owner, "min_tokens", min_tokens, self.num_tokens, "num_tokens")
        self.spread = _check_float(owner, "spread", spread, positive=False)
        self.seed = None if seed is None else _check_int(owner, "seed", seed, low=0)
        if self.seed is None:
            self.centres = None
        else:  # drawn with NumPy: no compilation at construction
            rng = np.random.default_rng(self.seed)
            g = rng.standard_normal((self.clusters, self.dim))
            radii = 0.5 * self.radius * rng.uniform(size=(self.clusters, 1)) ** (1.0 / self.dim)
            self.centres = jnp.asarray(g / np.linalg.norm(g, axis=-1, keepdims=True) * radii)

    @property
    def loss(self) -> Loss:
        """:class:`~mfattn.losses.TokenRegression`: the terminal tokens against the clean tokens."""
        return TokenRegression()

    def _draw(self, key: PRNGKeyArray, batch_size: int) -> Batch:
        B, N, C, d, R = batch_size, self.num_tokens, self.clusters, self.dim, self.radius
        per_seq = C if self.centres is None else 0
        # normals: blob offsets z, noise e, per-sequence centre directions; uniforms: cluster labels,
        # length, per-sequence centre radii.
        g, u = _draws(key, (B, 2 * N + per_seq, d), (B, N + 1 + per_seq), _float_dtype())
        if self.centres is None:
            centres = _ball(g[:, 2 * N :], u[:, N + 1 :], 0.5 * R)  # (B, C, d)
        else:
            centres = jnp.broadcast_to(self.centres.astype(g.dtype)[None], (B, C, d))
        means = jax.vmap(lambda c, a: c[a])(centres, _randint(u[:, :N], 0, C - 1))  # (B, N, d)
        clean = _project(means + (self.spread * R) * g[:, :N], R)
        noisy = _project(clean + self.noise * g[:, N : 2 * N], R)
        return Batch(noisy, _prefix_weights(u[:, N], N, self.min_tokens), clean)


# ---------------------------------------------------------------------------------------------------------
# In-context linear regression
# ---------------------------------------------------------------------------------------------------------


class QueryRegression(Loss):
    """Squared error of one token's last coordinate: ``ell = (x_q[-1] - y_q)^2 / 2``, ``q = index``.

    The loss reads the prediction off the query token only; ``targets`` is the scalar ``y_q`` (shape
    ``()`` or ``(1,)``). Its Lions derivative is ``(1/m_q) d ell / d x_q`` at the query and 0 elsewhere::

        d_mu ell(x_q) = ((x_q[-1] - y_q) / m_q) e_d,      d_mu ell(x_i) = 0  (i != q).

    The query must carry a positive weight ``m_q`` (as every real token does; :class:`InContextRegression`
    guarantees it): the value does not depend on ``m_q`` but the rescaled adjoint divides by it. A zero
    query weight is an error (raised through :func:`equinox.error_if`, also under ``jit``).

    Example::

        loss = QueryRegression()
        loss(tokens, weights, y_q)                 # scalar
        loss.lions(tokens, weights, y_q)           # (N, d), non-zero only at tokens[-1, -1]
    """

    index: int = eqx.field(default=-1, static=True)

    def __check_init__(self):
        if isinstance(self.index, bool) or not isinstance(self.index, (int, np.integer)):
            raise ValueError(f"QueryRegression: index must be an integer, got {self.index!r}.")

    def _residual(self, tokens, targets):
        n = tokens.shape[0]
        if not -n <= self.index < n:
            raise ValueError(f"QueryRegression: index = {self.index} is out of range for N = {n} tokens.")
        y = jnp.asarray(targets)
        if y.size != 1:
            raise ValueError(f"QueryRegression: targets must be the scalar y_q (shape () or (1,)), got {y.shape}.")
        return tokens[self.index, -1] - y.reshape(())

    def __call__(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Scalar:
        r = self._residual(tokens, targets)
        return 0.5 * r * r

    def lions(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"], targets) -> Float[Array, "N d"]:
        r = self._residual(tokens, targets)
        m = weights[self.index]
        m = eqx.error_if(m, m <= 0, "QueryRegression: the query token must have a positive weight.")
        return jnp.zeros_like(tokens).at[self.index, -1].set((r / m).astype(tokens.dtype))


class InContextRegression(Task):
    """Linear regression in context: predict ``y_q = <w, x_q>`` from examples ``(x_i, <w, x_i>)``.

    Each sequence draws its own ``w`` and holds ``num_examples`` example tokens ``(x_i, y_i)`` followed by
    one query token ``(x_q, 0)`` in ``R^{d_x + 1}`` (``d = dim_x + 1``, ``N = num_examples + 1``); the
    query's label is hidden and is the target. At unit scale::

        x_i, x_q, w  uniform in the unit ball of R^{d_x},
        y_i = <w, x_i> + eps_i,   eps_i = noise * (standard normal truncated to [-3, 3]),

    and every token and the target are then multiplied by ``s = R / sqrt(1 + (1 + 3 noise)^2)``.

    Ball bound: ``|x_i| <= 1`` and ``|<w, x_i>| <= |w| |x_i| <= 1`` (Cauchy-Schwarz), so
    ``|y_i| <= 1 + 3 noise`` and ``|(x_i, y_i)|^2 <= 1 + (1 + 3 noise)^2``; after scaling,
    ``|s (x_i, y_i)| <= R``. The query ``s (x_q, 0)`` has norm ``<= s <= R``. The scaling is linear, so in
    token coordinates ``y_i = <w, x_i> + s eps_i`` with the same ``w`` (exactly ``<w, x_i>`` at
    ``noise = 0``), and the label noise has standard deviation about ``0.987 s noise``.

    Layout and padding: the query always sits in the last slot (index ``-1``). With ``min_examples``
    set, a sequence uses ``n ~ U{min_examples..num_examples}`` examples in the first ``n`` slots, the
    slots ``n..num_examples-1`` are padding (weight 0), and the weights are ``1/(n+1)`` on the ``n``
    examples and on the query, which therefore always stays a real token with positive weight.

    Targets: ``s y_q`` per sequence, shape ``(B,)``. The loss is :class:`QueryRegression` on the query's
    last coordinate.

    Args:
        dim_x: ``d_x >= 1``.
        num_examples: examples per sequence (slots before the query), ``>= 1``.
        radius: ``R > 0``.
        noise: label noise standard deviation at unit scale (before truncation), ``>= 0``.
        min_examples: ``None`` (always ``num_examples``) or the least number of examples in
            ``[1, num_examples]``.

    Example::

        task = InContextRegression(dim_x=4, num_examples=20)
        batch = task.sample(jax.random.key(0), 64)     # tokens (64, 21, 5), targets (64,)
    """

    dim_x: int = eqx.field(static=True)
    num_examples: int = eqx.field(static=True)
    radius: float = eqx.field(static=True)
    noise: float = eqx.field(static=True)
    min_examples: int | None = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    num_tokens: int = eqx.field(static=True)

    def __init__(
        self,
        dim_x: int,
        num_examples: int,
        radius: float = 1.0,
        noise: float = 0.0,
        min_examples: int | None = None,
    ):
        owner = "InContextRegression"
        self.dim_x = _check_int(owner, "dim_x", dim_x)
        self.num_examples = _check_int(owner, "num_examples", num_examples)
        self.radius = _check_float(owner, "radius", radius, positive=True)
        self.noise = _check_float(owner, "noise", noise, positive=False)
        self.min_examples = _check_min(owner, "min_examples", min_examples, self.num_examples, "num_examples")
        self.dim = self.dim_x + 1
        self.num_tokens = self.num_examples + 1

    @property
    def scale(self) -> float:
        """``s = R / sqrt(1 + (1 + 3 noise)^2)``, the factor from unit scale to token coordinates."""
        return self.radius / math.sqrt(1.0 + (1.0 + 3.0 * self.noise) ** 2)

    @property
    def loss(self) -> Loss:
        """:class:`QueryRegression` ``(x_q^L[-1] - y_q)^2 / 2`` on the last token."""
        return QueryRegression(index=-1)

    def _draw(self, key: PRNGKeyArray, batch_size: int) -> Batch:
        B, N = batch_size, self.num_tokens
        noisy = self.noise > 0
        # normals: the directions of x in every slot (the query last) and of w; uniforms: their radii,
        # the length, the label noise.
        g, u = _draws(key, (B, N + 1, self.dim_x), (B, N + 2 + (N if noisy else 0)), _float_dtype())
        xw = _ball(g, u[:, : N + 1], 1.0)
        x, w = xw[:, :N], xw[:, N]  # (B, N, d_x), (B, d_x)
        y = jnp.sum(x * w[:, None, :], axis=-1)  # (B, N)
        if noisy:
            y = y + self.noise * _truncated_normal(u[:, N + 2 :], 3.0)
        query = jnp.arange(N) == N - 1  # (N,): the last slot
        labels = jnp.where(query[None, :], jnp.zeros((), g.dtype), y)
        tokens = self.scale * jnp.concatenate([x, labels[..., None]], axis=-1)
        targets = self.scale * y[:, -1]
        if self.min_examples is None:
            weights = jnp.full((B, N), 1.0 / N, g.dtype)
        else:
            n = _randint(u[:, N + 1], self.min_examples, self.num_examples)
            live = (jnp.arange(N)[None, :] < n[:, None]) | query[None, :]
            weights = jnp.where(live, 1.0 / (n[:, None] + 1).astype(g.dtype), jnp.zeros((), g.dtype))
        return Batch(tokens, weights, targets)


# ---------------------------------------------------------------------------------------------------------
# Transport to a fixed target measure
# ---------------------------------------------------------------------------------------------------------


class TargetMeasure(Task):
    """Transport every input measure to one fixed target measure ``rho``, measured by MMD.

    Inputs are i.i.d. uniform in the closed ball of radius ``R`` (as in :class:`TeacherStudent`); the target
    is the same empirical measure ``rho = (1/M) sum_a delta_{y_a}`` for every sequence, its ``M`` points
    drawn once (NumPy, ``seed``) uniformly in the ball of radius ``R/2`` centred at ``(R/2) e_1``: moving
    the input cloud onto ``rho`` takes a translation and a contraction. The loss is
    :class:`~mfattn.losses.MMD` ``MMD^2(mu^L, rho) / 2`` with a Gaussian kernel of width ``bandwidth``: a
    function of the whole terminal measure (paper Remark 5), whose Lions derivative couples the tokens.

    As the target does not depend on the input, :meth:`target` defines it for any sequence; the targets
    of a batch are the cloud repeated, ``(B, M, d)``. The dtype of a batch is that of the points.

    Args:
        dim: ``d >= 1``.
        num_tokens: ``N >= 1``.
        num_points: ``M >= 1``, the size of the target cloud.
        radius: ``R > 0``.
        bandwidth: the kernel width ``sigma > 0``.
        min_tokens: ``None`` or the least sequence length in ``[1, N]`` (see :class:`TeacherStudent`).
        seed: integer seed of the target points.
        dtype: dtype of the points and of the sampled batches (default: JAX's default float).

    Attributes:
        points: the target points ``(M, d)``.

    Example::

        task = TargetMeasure(dim=2, num_tokens=16, num_points=8)
        batch = task.sample(jax.random.key(0), 4)      # targets (4, 8, 2): the cloud, repeated
        task.loss(batch.tokens[0], batch.weights[0], batch.targets[0])    # MMD^2 / 2 of the inputs
    """

    points: Float[Array, "M d"]
    dim: int = eqx.field(static=True)
    num_tokens: int = eqx.field(static=True)
    radius: float = eqx.field(static=True)
    bandwidth: float = eqx.field(static=True)
    min_tokens: int | None = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        num_points: int = 8,
        radius: float = 1.0,
        bandwidth: float = 0.5,
        min_tokens: int | None = None,
        *,
        seed: int = 0,
        dtype=None,
    ):
        owner = "TargetMeasure"
        self.dim = _check_int(owner, "dim", dim)
        self.num_tokens = _check_int(owner, "num_tokens", num_tokens)
        num_points = _check_int(owner, "num_points", num_points)
        self.radius = _check_float(owner, "radius", radius, positive=True)
        self.bandwidth = _check_float(owner, "bandwidth", bandwidth, positive=True)
        self.min_tokens = _check_min(owner, "min_tokens", min_tokens, self.num_tokens, "num_tokens")
        self.seed = _check_int(owner, "seed", seed, low=0)
        rng = np.random.default_rng(self.seed)  # NumPy: no compilation at construction
        g = rng.standard_normal((num_points, self.dim))
        r = 0.5 * self.radius * rng.uniform(size=(num_points, 1)) ** (1.0 / self.dim)
        centre = np.zeros(self.dim)
        centre[0] = 0.5 * self.radius
        self.points = jnp.asarray(centre + g / np.linalg.norm(g, axis=-1, keepdims=True) * r, dtype=dtype)

    @property
    def loss(self) -> Loss:
        """:class:`~mfattn.losses.MMD` ``MMD^2(mu^L, rho) / 2`` with the task's bandwidth."""
        return MMD(bandwidth=self.bandwidth)

    def target(self, tokens: Float[Array, "N d"], weights: Float[Array, " N"]) -> Float[Array, "M d"]:
        """The target of any one sequence: the points of ``rho`` (independent of the input)."""
        return self.points.astype(tokens.dtype)

    def _draw(self, key: PRNGKeyArray, batch_size: int) -> Batch:
        B, N = batch_size, self.num_tokens
        g, u = _draws(key, (B, N, self.dim), (B, N + 1), self.points.dtype)
        tokens = _ball(g, u[:, :N], self.radius)
        weights = _prefix_weights(u[:, N], N, self.min_tokens)
        return Batch(tokens, weights, jnp.broadcast_to(self.points[None], (B, *self.points.shape)))
