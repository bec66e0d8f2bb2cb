"""Mean-field attention: the forward velocity ``F(mu, x, nu)`` (docs/spec.md section 2), and its variants.

For one head ``theta = (W_Q, W_K, W_V, W_O)`` (each ``d x k``), a query point ``x`` and the weighted
empirical measure ``mu = sum_j m_j delta_{x_j}``::

    s_j(x)  = beta <W_Q^T x, W_K^T x_j>
    w_j(x)  = m_j exp(s_j) / sum_i m_i exp(s_i)          (softmax of s_j + log m_j)
    Gamma(mu, x, theta) = W_O W_V^T sum_j w_j(x) x_j

and the velocity is the average over the heads (parameter particles) ``F = (1/P) sum_h Gamma_h``.
Everything is computed through the ``k``-dimensional projections ``x W_Q``, ``x W_K``, ``x W_V``; the
``d x d`` matrices ``A = W_Q W_K^T`` and ``B = W_O W_V^T`` are never formed. A token of weight 0 has
exactly no influence (its log-weight is ``-inf``).

With a radius ``R`` the measure is first pushed through the projection ``Pi_R`` onto the closed ball
(docs/spec.md section 2, paper eq. 6-7): keys and values use ``Pi_R(x_j)``, queries are not projected.

Other kernels (unnormalised, L2, sigmoid, Sinkhorn), causal masking, the normalised residual, the depth
and logit scalings and the numerical options (query chunks, kept attention, mixed precision) are selected
by an :class:`Attention` passed as ``attention=`` (default: the softmax above).

The kernels here take one layer's (or one grid time's) parameters, a pytree with leaves ``(P, d, k)``,
and have no batch axis: batch with ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from . import _checks

__all__ = [
    "Attention",
    "as_attention",
    "attention",
    "velocity",
    "project_ball",
    "project_ball_vjp",
    "log_weights",
    "sinkhorn_potentials",
]


def log_weights(weights: Float[Array, " N"]) -> Float[Array, " N"]:
    """``log m_j``, with ``-inf`` (not NaN) for padding tokens of weight 0."""
    positive = weights > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, weights, 1)), -jnp.inf)


def project_ball(tokens: Float[Array, "N d"], radius) -> Float[Array, "N d"]:
    """``Pi_R(x) = x`` if ``|x| <= R`` else ``R x / |x|``, row-wise. ``radius=None`` is the identity."""
    if radius is None:
        return tokens
    norm = jnp.linalg.norm(tokens, axis=-1, keepdims=True)
    outside = norm > radius
    return jnp.where(outside, tokens * (radius / jnp.where(outside, norm, 1)), tokens)


def project_ball_vjp(tokens: Float[Array, "N d"], cotangent: Float[Array, "N d"], radius) -> Float[Array, "N d"]:
    """``DPi_R(x_i)^T v_i`` row-wise (the Jacobian is symmetric): ``v`` inside the ball, and
    ``(R/|x|) (v - x <x, v>/|x|^2)`` outside."""
    if radius is None:
        return cotangent
    norm = jnp.linalg.norm(tokens, axis=-1, keepdims=True)
    outside = norm > radius
    safe = jnp.where(outside, norm, 1)
    u = tokens / safe
    radial = jnp.sum(u * cotangent, axis=-1, keepdims=True)
    return jnp.where(outside, (radius / safe) * (cotangent - u * radial), cotangent)


Kind = Literal["softmax", "unnormalized", "l2", "sigmoid", "sinkhorn"]
KINDS = ("softmax", "unnormalized", "l2", "sigmoid", "sinkhorn")
HEAD_LOOPS = ("auto", "lanes", "vmap", "sequential", "blocked")


@dataclasses.dataclass(frozen=True)
class Attention:
    """Which attention, normalisation and scalings a model uses (hashable: a static argument under jit).

    Every variant is written in the weighted-measure form, for a query ``x``, atoms ``x_j`` of masses
    ``m_j`` and scores ``s_j = beta_eff <W_Q^T x, W_K^T x_j>`` (``beta_eff = beta * logit scale``)::

        "softmax"       w_j = m_j e^{s_j} / sum_l m_l e^{s_l}                         (the default)
        "unnormalized"  w_j = m_j e^{s_j}                                   (no normalising sum)
        "l2"            s_j = -beta_eff |W_Q^T x - W_K^T x_j|^2 / 2, then softmax
        "sigmoid"       w_j = m_j sigma(s_j + bias)
        "sinkhorn"      w_j = m_j e^{s_j + g_j} / sum_l m_l e^{s_l + g_l}: softmax with the key potentials
                        g of the entropic self-transport of mu (Sander et al.'s doubly stochastic weights,
                        ``sinkhorn_iters`` log-domain Sinkhorn iterations from g = 0; one iteration
                        is the softmax)

    and ``Gamma(mu, x, theta) = W_O W_V^T sum_j w_j x_j``.

    Attributes:
        kind: one of the kernels above.
        causal: token ``j`` influences token ``i`` only if ``j <= i`` (queries are the tokens, in order).
            With every kind but ``"sinkhorn"``. A zero-weight token whose prefix holds no mass gets
            velocity 0 (its normalising sum is empty).
        bias: the sigmoid's bias ``b`` (``"sigmoid"`` only).
        logit_scale: ``None`` (1), ``"1/k"``, ``"1/sqrt(k)"`` (Bordelon et al.'s scalings, ``k`` the head
            dimension) or a positive number; multiplies ``beta``.
        residual: ``"euler"`` -- ``x^{l+1} = x^l + L^-alpha F`` (the paper's residual stream);
            ``"sphere"`` -- the normalised residual ``x^{l+1} = (x^l + L^-alpha F) / |x^l + L^-alpha F|``
            that keeps tokens on the unit sphere (Geshkovski et al.); its limit is
            ``dx/dt = F - <x, F> x``. Inputs should then lie on the unit sphere.
        depth_exponent: ``alpha`` of the residual step ``L^-alpha`` (1: the paper's mean-field scaling and
            the only one with a depth limit; 1/2: the other regime).
        sinkhorn_iters: number of Sinkhorn iterations (``"sinkhorn"`` only).
        chunk: ``None`` (all query rows at once) or a block size: attention is evaluated for blocks of
            ``chunk`` query rows in a ``lax.scan`` (forward and hand backward; the backward's transposed
            products accumulate over blocks), so one head holds ``O(chunk N)`` instead of ``O(N^2)``
            numbers. Same results up to rounding; for large ``N`` on memory-bound devices.
        heads: how a layer's heads (the limit's parameter particles) are looped over -- a numerical choice, the
            same results up to rounding. ``"lanes"``: the head axis is the innermost array axis and the token
            and coordinate loops are unrolled (:mod:`mfattn.lanes`; many heads, few tokens: the limit);
            ``"vmap"``: ``jax.vmap`` over heads (batched matrix products); ``"sequential"``: ``lax.map`` over
            heads (one head's ``N x N`` arrays live at a time; on CPU the fastest for large ``N``);
            ``"blocked"``: ``lax.map`` over blocks of heads, each block vectorised, sized so that a block's
            ``N x N`` arrays hold about :data:`HEAD_BLOCK_ENTRIES` numbers (they stay in cache).
            ``"auto"`` (default): on CPU lanes for at most 4 tokens, at least 1024 heads and ``d, k <= 4`` (the
            limit's ensembles; the rule and its measurement: :data:`mfattn.lanes.AUTO_MAX_TOKENS`), sequential
            from :data:`SEQUENTIAL_HEADS_FROM` tokens, blocked from :data:`BLOCKED_HEADS_FROM`, else vmap (on
            accelerators always vmap). Lanes needs a
            closed-form kind, no ``matmul_dtype`` and no ``chunk``; otherwise ``"lanes"`` falls back to
            ``"auto"``'s choice.
        remat: ``True`` (default, memory-lean): the hand backward pass recomputes each layer's attention
            from the stored tokens, memory ``O(L N d + H N^2)``. ``False``: the fused hand path
            (:func:`mfattn.value_and_grad_map`, :func:`mfattn.loss_and_grad`, training) keeps every layer's
            kernel, normalisers and attended values from the forward pass, as autodiff does (memory
            ``O(L H N^2)``), and recomputes no score. Closed-form kinds without ``chunk`` only.
        matmul_dtype: ``None`` (products in the input dtype) or e.g. ``"bfloat16"``: mixed precision, where
            the operands of every matrix product (projections, scores, weighted sums; forward and hand
            backward) are cast to this dtype and accumulated in the input dtype, while the softmax
            statistics (shift, exponentials, normalising sums, the centring of the backward pass) stay in
            the input dtype. For accelerators with fast low-precision matrix units; on a CPU it is slower.

    Pass an ``Attention`` (or just the kind as a string) as ``attention=`` to any entry point::

        mfattn.forward(params, x, beta=1.0, attention="sigmoid")
        mfattn.forward(params, x, beta=1.0, attention=mfattn.Attention("l2", causal=True))
    """

    kind: Kind = "softmax"
    causal: bool = False
    bias: float = 0.0
    logit_scale: str | float | None = None
    residual: Literal["euler", "sphere"] = "euler"
    depth_exponent: float = 1.0
    sinkhorn_iters: int = 20
    matmul_dtype: str | None = None
    chunk: int | None = None
    remat: bool = True
    heads: Literal["auto", "lanes", "vmap", "sequential", "blocked"] = "auto"

    def __post_init__(self):
        _checks.check_choice("Attention", "kind", self.kind, KINDS)
        for name in ("causal", "remat"):
            object.__setattr__(self, name, _checks.check_bool("Attention", name, getattr(self, name)))
        _checks.check_real("Attention", "bias", self.bias)
        if not (self.logit_scale is None or isinstance(self.logit_scale, str)):
            _checks.check_real("Attention", "logit_scale", self.logit_scale, positive=True)
        _checks.check_choice("Attention", "residual", self.residual, ("euler", "sphere"))
        _checks.check_choice("Attention", "heads", self.heads, HEAD_LOOPS)
        _checks.check_real("Attention", "depth_exponent", self.depth_exponent, positive=True)
        object.__setattr__(
            self, "sinkhorn_iters", _checks.check_int("Attention", "sinkhorn_iters", self.sinkhorn_iters, minimum=1)
        )
        object.__setattr__(
            self, "chunk", _checks.check_int("Attention", "chunk", self.chunk, minimum=1, allow_none=True)
        )
        if not (self.matmul_dtype is None or isinstance(self.matmul_dtype, str)):
            raise TypeError(f"Attention: matmul_dtype must be None or a dtype name, got {self.matmul_dtype!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"Attention: kind must be one of {KINDS}, got {self.kind!r}.")
        if self.causal and self.kind == "sinkhorn":
            raise ValueError("Attention: causal masking is not defined for doubly stochastic (sinkhorn) weights.")
        if self.bias != 0 and self.kind != "sigmoid":
            raise ValueError(f"Attention: bias applies to 'sigmoid' only, got kind {self.kind!r}.")
        if not np.isfinite(self.bias):
            raise ValueError(f"Attention: bias must be finite, got {self.bias!r}.")
        ls = self.logit_scale
        if not (
            ls is None or ls in ("1/k", "1/sqrt(k)") or (isinstance(ls, (int, float)) and np.isfinite(ls) and ls > 0)
        ):
            raise ValueError(
                f"Attention: logit_scale must be None, '1/k', '1/sqrt(k)' or a positive number, got {ls!r}."
            )
        if self.residual not in ("euler", "sphere"):
            raise ValueError(f"Attention: residual must be 'euler' or 'sphere', got {self.residual!r}.")
        if not (np.isfinite(self.depth_exponent) and self.depth_exponent > 0):
            raise ValueError(f"Attention: depth_exponent must be > 0, got {self.depth_exponent!r}.")
        if self.matmul_dtype is not None:
            try:
                dt = jnp.dtype(self.matmul_dtype)
            except TypeError:
                dt = None
            if dt is None or not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"Attention: matmul_dtype must be a floating dtype name, got {self.matmul_dtype!r}.")
        if self.chunk is not None and not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f"Attention: chunk must be None or a positive integer, got {self.chunk!r}.")
        if not self.remat and (self.kind == "sinkhorn" or self.chunk is not None):
            raise ValueError(
                "Attention: remat=False (keep the forward's attention) needs a closed-form kind and no chunk."
            )
        if not (isinstance(self.sinkhorn_iters, int) and self.sinkhorn_iters >= 1):
            raise ValueError(f"Attention: sinkhorn_iters must be a positive integer, got {self.sinkhorn_iters!r}.")

    @property
    def normalized(self) -> bool:
        """Whether the weights are divided by their sum (softmax-like kinds)."""
        return self.kind in ("softmax", "l2", "sinkhorn")

    def scale(self, head_dim: int) -> float:
        """The logit scale multiplying ``beta`` for head dimension ``k``."""
        if self.logit_scale is None:
            return 1.0
        if self.logit_scale == "1/k":
            return 1.0 / head_dim
        if self.logit_scale == "1/sqrt(k)":
            return 1.0 / float(np.sqrt(head_dim))
        return float(self.logit_scale)

    def step(self, depth: int) -> float:
        """The residual step ``L^-alpha``."""
        return float(depth) ** (-self.depth_exponent)


SOFTMAX = Attention()


#: On CPU, heads are evaluated one after the other (``lax.map``) from this many tokens on: XLA:CPU runs
#: each 2-D product multi-threaded but batched products poorly (measured at N = 1024, H = 8, d = k = 64:
#: 33 ms against 60 ms for ``vmap``), and one head's ``N x N`` arrays are live at a time. Small problems
#: (the limit's many particles, tiny N) stay vectorised.
SEQUENTIAL_HEADS_FROM = 128


#: ``Attention(heads="blocked")``: the heads of one block hold about this many entries per ``N x N`` array.
HEAD_BLOCK_ENTRIES = 2**17
#: On CPU, ``heads="auto"`` runs the heads in blocks (``"blocked"``) from this many tokens up to
#: :data:`SEQUENTIAL_HEADS_FROM`: all heads vmapped at once keep ``M`` of the ``N x N`` arrays live, which leave the
#: cache. Measured on the 2-core CPU (``benchmarks/head_loops.py``, d = k = 2, blocked against vmap, interleaved):
#: one forward-backward solve of the limit 1.41x (N = 64, M = 512) and 1.95x (M = 2048), 1.12x at N = 32 (M = 512);
#: 0.95-1.05x for every operation at N = 8 and 16 (noise), where the rule leaves vmap.
BLOCKED_HEADS_FROM = 32


def head_block(n_tokens: int, n_heads: int) -> int:
    """The block size of ``heads="blocked"``: ``HEAD_BLOCK_ENTRIES // N^2`` heads (at least 1, at most all)."""
    return int(max(1, min(n_heads, HEAD_BLOCK_ENTRIES // max(1, n_tokens) ** 2)))


def over_heads(fn, heads, n_tokens: int, loop: str = "auto"):
    """``fn`` applied to every head of ``heads`` (a pytree with a leading head axis), results stacked.

    ``loop`` (:attr:`Attention.heads`): ``"vmap"``, ``"sequential"`` (``lax.map``), ``"blocked"`` (``lax.map``
    over blocks of :func:`head_block` heads, each block vmapped), or ``"auto"`` (and ``"lanes"``, whose kernels
    are not per-head functions): ``jax.vmap`` on accelerators and for small ``N``; on CPU blocked for
    ``BLOCKED_HEADS_FROM <= N < SEQUENTIAL_HEADS_FROM`` and ``lax.map`` from ``SEQUENTIAL_HEADS_FROM``."""
    auto_cpu = loop in ("auto", "lanes") and jax.default_backend() == "cpu"
    if loop == "sequential" or (auto_cpu and n_tokens >= SEQUENTIAL_HEADS_FROM):
        return jax.lax.map(lambda h: fn(*h), heads)
    if loop == "blocked" or (auto_cpu and n_tokens >= BLOCKED_HEADS_FROM):
        n_heads = jax.tree.leaves(heads)[0].shape[0]
        return jax.lax.map(lambda h: fn(*h), heads, batch_size=head_block(n_tokens, n_heads))
    return jax.vmap(fn)(*heads)


#: On CPU, a product of two of one head's own computed matrices (the scores, weights times values, the backward
#: pass's N x N x k products) with a contraction of at most 4 and at most this many multiply-adds is written as
#: a broadcast product summed over the contraction, which XLA fuses into one loop. Under ``vmap`` over many heads
#: or particles XLA:CPU runs such products as batched dots, one tiny GEMM call per head. At M = 1024 particles,
#: N = 4, d = k = 2 (the rates experiment's default) the velocity took 560 us, the adjoint field 1996 us and the
#: gradient map 2125 us, and with this 205, 385 and 368 us (best of 7). Unrolling the contraction into a sum of
#: outer products ran a little faster still but compiled slower (the quick rates run's ascent: 29 s against
#: 22 s). Larger products stay dots: at N = 8, d = k = 2, unrolled products with a bound of 128 and
#: contractions up to 8 made the velocity slower (300 to 675 us); from N = 8 on nothing changes.
TINY_PRODUCT = 64


def _broadcast_matmul(a, b):
    """``a @ b`` for 2-D operands as ``sum_i a[:, i, None] * b[None, i, :]`` (one fused loop, no dot)."""
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _per_head_matmul(a, b):
    n, c = a.shape[-2:]
    if a.ndim == b.ndim == 2 and c <= 4 and n * c * b.shape[-1] <= TINY_PRODUCT and jax.default_backend() == "cpu":
        return _broadcast_matmul(a, b)
    return jnp.matmul(a, b)


def _matmul(spec: Attention, shared: bool = False):
    """``a @ b``, or with ``spec.matmul_dtype`` the mixed-precision product (operands cast, accumulation
    and result in the inputs' dtype). ``shared``: a projection, a product with a weight matrix or with an
    operand that every head shares (the tokens, the keys, the adjoints), which stays a dot; otherwise both
    operands are computed by the head and tiny products avoid XLA:CPU's batched dot (:data:`TINY_PRODUCT`)."""
    if spec.matmul_dtype is None:
        return jnp.matmul if shared else _per_head_matmul
    low = jnp.dtype(spec.matmul_dtype)
    if jax.default_backend() == "cpu":
        # XLA:CPU has no low x low -> high dot for every shape: round the operands to the low dtype and
        # multiply in the high one (the same numbers up to the order of accumulation).
        def mm(a, b):
            high = jnp.result_type(a, b)
            return jnp.matmul(a.astype(low).astype(high), b.astype(low).astype(high))

        return mm

    def mm(a, b):
        return jnp.matmul(a.astype(low), b.astype(low), preferred_element_type=jnp.result_type(a, b))

    return mm


def as_attention(attention, fn: str = "as_attention") -> Attention:
    """``None`` -> softmax; a kind string -> ``Attention(kind)``; an :class:`Attention` unchanged (errors name
    ``fn``)."""
    if attention is None:
        return SOFTMAX
    if isinstance(attention, Attention):
        return attention
    if isinstance(attention, str):
        if attention not in KINDS:
            raise ValueError(f"{fn}: attention must be one of {KINDS} or an mfattn.Attention, got {attention!r}.")
        return Attention(kind=attention)
    raise TypeError(f"{fn}: attention must be a kind string or an mfattn.Attention, got {type(attention).__name__}.")


def exp_cap(dtype) -> float:
    """Largest exponent used for a zero-weight key's kernel: ``exp(cap)`` times O(1) values stays finite."""
    return 0.4 * float(np.log(np.finfo(dtype).max))


def _scores(spec: Attention, q, kk, beta):
    """``(Nq, N)`` scores; for ``"l2"`` the query's own ``-beta |q|^2 / 2`` is dropped (it cancels in the
    normalisation)."""
    s = beta * _matmul(spec)(q, kk.T)
    if spec.kind == "l2":
        s = s - (0.5 * beta) * jnp.sum(kk * kk, axis=-1)[None, :]
    return s


def _causal_allowed(rows, n: int):
    """``(R, N)``: key ``j`` is visible from query row ``rows[r]`` iff ``j <= rows[r]``."""
    return jnp.arange(n)[None, :] <= rows[:, None]


def _lse(a, weights, live, axis):
    """``log sum_j m_j e^{a_j}`` along ``axis``, differentiable in ``m`` also at ``m_j = 0`` (the shift is
    the max over live entries, with its derivative stopped; dead entries' exponents are capped)."""
    expand = (lambda x: x[None, :]) if axis == -1 else (lambda x: x[:, None])
    top = jnp.max(jnp.where(expand(live), a, -jnp.inf), axis=axis, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0))
    e = jnp.exp(jnp.minimum(a - top, exp_cap(a.dtype)))
    return jnp.log(jnp.sum(expand(weights) * e, axis=axis, keepdims=True)) + top


def sinkhorn_potentials(q_tok, kk, weights, beta, spec: Attention):
    """Key potentials ``g`` (``(N,)``) of the entropic self-transport of ``mu``: alternate
    ``f_i = -log sum_j m_j e^{s_ij + g_j}`` and ``g_j = -log sum_i m_i e^{s_ij + f_i}`` from ``g = 0``,
    ``spec.sinkhorn_iters`` times. The weights ``m_j e^{s_ij + f_i + g_j}`` are then doubly stochastic
    for ``mu`` up to the last update."""
    live = weights > 0
    s = _scores(spec, q_tok, kk, beta)

    def body(_, g):
        f = -_lse(s + g[None, :], weights, live, axis=-1)  # (N, 1)
        return -_lse(s + f, weights, live, axis=0)[0]  # (N,)

    return jax.lax.fori_loop(0, spec.sinkhorn_iters, body, jnp.zeros(kk.shape[0], s.dtype))


def _head_weights(spec: Attention, q, kk, weights, beta, key_bias=None, rows=None):
    """The attention weights ``w_ij`` (``(Nq, N)``) of one head, rows summing to 1 when normalised."""
    live = weights > 0
    s = _scores(spec, q, kk, beta)
    if key_bias is not None:
        s = s + key_bias[None, :]
    if spec.kind == "sinkhorn":
        # w_ij = m_j e^{s_ij + g_j + f_i}, written to stay differentiable in m at m_j = 0 (the
        # autodiff backward's Lions derivative at a zero-weight atom takes d/dm there).
        f = -_lse(s, weights, live, axis=-1)
        return weights[None, :] * jnp.exp(jnp.minimum(s + f, exp_cap(s.dtype)))
    allowed = jnp.broadcast_to(live[None, :], s.shape)
    if spec.causal:
        allowed = allowed & _causal_allowed(rows, s.shape[1])
    if spec.normalized:
        if not spec.causal:  # the common path: one fused softmax of s + log m
            return jax.nn.softmax(s + log_weights(weights)[None, :], axis=-1)
        top = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
        top = jnp.where(jnp.isfinite(top), top, 0)
        e = jnp.where(allowed, weights[None, :] * jnp.exp(jnp.where(allowed, s - top, -jnp.inf)), 0)
        z = jnp.sum(e, axis=-1, keepdims=True)
        return e / jnp.where(z > 0, z, 1)
    if spec.kind == "unnormalized":
        return jnp.where(allowed, weights[None, :] * jnp.exp(jnp.where(allowed, s, -jnp.inf)), 0)
    return jnp.where(allowed, weights[None, :] * jax.nn.sigmoid(s + spec.bias), 0)  # sigmoid


def _head_forward(spec, wq, wk, wv, wo, queries, tokens, keys, weights, beta):
    """One head, all queries: ``(Nq, d)``. Work ``O(Nq N k)`` (times the iterations for Sinkhorn); memory
    ``O(Nq N)``, or ``O(chunk N)`` with ``spec.chunk`` (query rows in blocks)."""
    mm, proj = _matmul(spec), _matmul(spec, shared=True)
    kk = proj(keys, wk)  # (N, k)
    v = proj(keys, wv)  # (N, k)
    bias = None
    if spec.kind == "sinkhorn":
        bias = sinkhorn_potentials(proj(tokens, wq), kk, weights, beta, spec)

    def block(xq, rows):
        w = _head_weights(spec, proj(xq, wq), kk, weights, beta, bias, rows)
        return proj(mm(w, v), wo.T)

    nq = queries.shape[0]
    rows = jnp.arange(nq)
    if spec.chunk is None or spec.chunk >= nq:
        return block(queries, rows)
    nb = -(-nq // spec.chunk)
    pad = nb * spec.chunk - nq
    xq = jnp.pad(queries, [(0, pad), (0, 0)]).reshape(nb, spec.chunk, -1)
    out = jax.lax.map(lambda a: block(*a), (xq, jnp.pad(rows, (0, pad)).reshape(nb, spec.chunk)))
    return out.reshape(nb * spec.chunk, -1)[:nq]


def velocity(
    theta,
    queries: Float[Array, "Nq d"],
    tokens: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
    attention: Attention | str | None = None,
    check: bool = True,
) -> Float[Array, "Nq d"]:
    """Multi-head mean-field velocity ``F(mu, x, nu) = (1/P) sum_h Gamma(mu, x, theta_h)``.

    Args:
        theta: one layer's parameters (a :class:`~mfattn.Params`-like pytree ``wq, wk, wv, wo`` with
            leaves ``(P, d, k)``): the heads, or the parameter particles of ``nu``.
        queries: ``(Nq, d)`` points ``x`` at which ``F`` is evaluated (``Nq = N``, the tokens in order,
            for causal attention).
        tokens: ``(N, d)`` atoms ``x_j`` of ``mu``.
        weights: ``(N,)`` masses ``m_j >= 0`` summing to 1.
        beta: inverse temperature ``>= 0``.
        radius: optional ball radius ``R`` of the projection ``Pi_R`` applied to ``mu``.
        attention: the kernel (:class:`Attention` or a kind string; default softmax).
        check: validate the arguments (shapes in Python; values, when traced, by ``equinox.error_if``).
            The library's own layers pass ``False``: their inputs were checked at the entry point.

    Returns:
        ``(Nq, d)``. Work ``O(P Nq N k)``, memory ``O(P Nq N)``.
    """
    spec = as_attention(attention, "velocity")
    if check:
        theta, queries, tokens, _, weights, beta, radius = _checks.kernel_args(
            "velocity", theta, queries, tokens, weights, beta, radius
        )
    if spec.causal and queries.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"velocity: causal attention needs the queries to be the tokens in order, got Nq = {queries.shape[0]}, "
            f"N = {tokens.shape[0]}."
        )
    beta = beta * spec.scale(theta.wq.shape[-1])
    n_tokens = max(queries.shape[0], tokens.shape[0])
    from . import lanes  # lanes builds on this module: imported here, not at the top

    if lanes.applies(spec, n_tokens, theta.wq.shape[0], theta.wq.shape[-2:]):
        return lanes.velocity(theta, queries, tokens, weights, beta=beta, radius=radius, spec=spec)
    keys = project_ball(tokens, radius)
    heads = over_heads(
        lambda wq, wk, wv, wo: _head_forward(spec, wq, wk, wv, wo, queries, tokens, keys, weights, beta),
        (theta.wq, theta.wk, theta.wv, theta.wo),
        n_tokens,
        spec.heads,
    )
    return jnp.mean(heads, axis=0)


def attention(
    wq: Float[Array, "d k"],
    wk: Float[Array, "d k"],
    wv: Float[Array, "d k"],
    wo: Float[Array, "d k"],
    x: Float[Array, " d"],
    tokens: Float[Array, "N d"],
    weights: Float[Array, " N"],
    *,
    beta,
    radius=None,
    attention: Attention | str | None = None,
) -> Float[Array, " d"]:
    """One head at one query point: ``Gamma(mu, x, theta)`` (docs/spec.md, paper eq. 2-3; other kernels by
    ``attention=``, except causal masking, which needs the token order: use :func:`velocity`).

    Example::

        y = attention(wq, wk, wv, wo, x, tokens, jnp.full(N, 1 / N), beta=1.0)   # (d,)
        Y = jax.vmap(attention, in_axes=(None,) * 4 + (0, None, None))(...)    # many queries
    """
    spec = as_attention(attention, "attention")
    if spec.causal:
        raise ValueError("attention: causal masking needs the token order; use mfattn.velocity(...) instead.")
    if jnp.ndim(wq) != 2:
        raise ValueError(f"attention: wq must have shape (d, k), got {jnp.shape(wq)}.")
    mats = [
        _checks.check_array("attention", n, m, jnp.shape(wq), "(d, k) like wq") for n, m in zip(_W, (wq, wk, wv, wo))
    ]
    x = _checks.check_array("attention", "x", x, jnp.shape(wq)[:1], "(d,)")
    theta, x, tokens, _, weights, beta, radius = _checks.kernel_args(
        "attention", _Head(*(m[None] for m in mats)), x[None], tokens, weights, beta, radius
    )
    return velocity(theta, x, tokens, weights, beta=beta, radius=radius, attention=spec, check=False)[0]


_W = ("wq", "wk", "wv", "wo")


class _Head(NamedTuple):
    wq: Array
    wk: Array
    wv: Array
    wo: Array
