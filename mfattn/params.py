"""Parameters of attention heads on a grid of depths: one pytree for the discrete model and the limit.

A :class:`Params` holds the four projection matrices of every head as arrays shaped ``(T, P, d, k)``:

* discrete transformer: ``T = L`` layers, ``P = H`` heads per layer;
* mean-field limit: ``T = K + 1`` grid times ``t_0..t_K`` in ``[0, 1]``, ``P = M`` parameter particles
  drawn from the initialisation law ``nu_0``.

One head is ``theta = (W_Q, W_K, W_V, W_O)``, each ``d x k``; the attention matrices are
``A = W_Q W_K^T`` and ``B = W_O W_V^T`` (``d x d``), which the library never forms.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from . import _checks

__all__ = ["Params", "init_params"]


class Params(eqx.Module):
    """Projection matrices of every head (or parameter particle) at every depth (or grid time).

    Attributes:
        wq, wk, wv, wo: arrays shaped ``(T, P, d, k)`` -- query, key, value and output projections.

    A ``Params`` is a pytree: ``jax.tree.map``, Optax optimizers, ``jax.vmap`` and ``jax.lax.scan``
    all act on it directly. Constructing one checks that the four leaves agree in shape::

        p = Params(wq, wk, wv, wo)          # each (L, H, d, k)
        p.depth, p.heads, p.dim, p.head_dim
    """

    wq: Float[Array, "T P d k"]
    wk: Float[Array, "T P d k"]
    wv: Float[Array, "T P d k"]
    wo: Float[Array, "T P d k"]

    def __check_init__(self):
        leaves = (self.wq, self.wk, self.wv, self.wo)
        # Only check real arrays: transformations (vmap axis specs, Optax masks) may build a Params
        # whose leaves are placeholders.
        if not all(hasattr(x, "shape") and hasattr(x, "ndim") for x in leaves):
            return
        for name, x in zip(("wq", "wk", "wv", "wo"), leaves):
            if x.ndim != 4:
                raise ValueError(
                    f"Params: {name} must have shape (T, P, d, k) (grid, particles, dim, head_dim); "
                    f"got shape {tuple(x.shape)}."
                )
        shapes = {tuple(x.shape) for x in leaves}
        if len(shapes) != 1:
            raise ValueError(
                "Params: the leaves wq, wk, wv, wo must all have the same shape (T, P, d, k); got "
                + ", ".join(f"{n}={tuple(x.shape)}" for n, x in zip(("wq", "wk", "wv", "wo"), leaves))
            )
        shape = tuple(self.wq.shape)
        if min(shape) < 1:
            raise ValueError(
                f"Params: every axis of (T, P, d, k) (depth, heads, dim, head_dim) must be >= 1, got {shape}."
            )
        for name, x in zip(("wq", "wk", "wv", "wo"), leaves):
            if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"Params: {name} must be floating point, got dtype {x.dtype}.")

    @property
    def depth(self) -> int:
        """``T``: number of layers (discrete model) or grid times (limit)."""
        return self.wq.shape[-4]

    @property
    def heads(self) -> int:
        """``P``: heads per layer (discrete model) or particles per grid time (limit)."""
        return self.wq.shape[-3]

    @property
    def dim(self) -> int:
        """``d``: token dimension."""
        return self.wq.shape[-2]

    @property
    def head_dim(self) -> int:
        """``k``: head dimension."""
        return self.wq.shape[-1]

    def astype(self, dtype) -> Params:
        """The same parameters cast to ``dtype``."""
        return jax.tree.map(lambda x: x.astype(dtype), self)


DRAW_BLOCK = 4096  # the smallest draw of _draw (values)


def _draw(sample, key, shape):
    """``sample(key, shape)`` (an elementwise law of JAX's random module) as the first values of one flat draw
    whose size is a power of two (at least :data:`DRAW_BLOCK`), reshaped. Under JAX's partitionable threefry (its
    default) a value depends on the key and its flat index only, so these are the same numbers (tested); eagerly,
    one compiled program per size class instead of one per shape: each costs about a second of XLA compilation
    on the 2-core CPU (the default rates run compiled it 21 times)."""
    size = int(math.prod(shape))
    if size == 0 or not jax.config.jax_threefry_partitionable:
        return sample(key, shape)
    n = max(DRAW_BLOCK, 1 << (size - 1).bit_length())
    return sample(key, (n,))[:size].reshape(shape)


InitMethod = Literal["xavier_uniform", "truncated_normal", "mean_noise"]


def init_params(
    key: PRNGKeyArray,
    depth: int,
    heads: int,
    dim: int,
    head_dim: int,
    *,
    init: InitMethod = "xavier_uniform",
    scale: float = 1.0,
    mean: Sequence[Float[Array, "d k"]] | float | None = None,
    tie_depth: bool = False,
    dtype=None,
) -> Params:
    """Random parameters of shape ``(depth, heads, dim, head_dim)`` for each of W_Q, W_K, W_V, W_O.

    Args:
        key: PRNG key.
        depth, heads, dim, head_dim: ``T, P, d, k``.
        init: the law of one entry, independent across entries, heads and layers:

            * ``"xavier_uniform"`` (default): ``U(-a, a)``, ``a = scale * sqrt(6 / (d + k))``; compactly
              supported, as the paper assumes (Assumption 3).
            * ``"truncated_normal"``: normal with std ``scale * sqrt(2 / (d + k))`` truncated at two std.
            * ``"mean_noise"``: a fixed non-zero mean matrix per block plus Xavier-uniform noise times
              ``scale``. With zero-mean laws ``E[W_O W_V^T] = 0``, so the infinite-width velocity vanishes
              at initialisation; a non-zero mean makes the limit non-trivial from step 0.
        scale: multiplies the spread of the law (the noise for ``"mean_noise"``).
        mean: for ``"mean_noise"``: a float ``c`` (every block's mean is ``c * eye(d, k)``; default
            ``c = 1``) or four ``(d, k)`` arrays, the means of W_Q, W_K, W_V, W_O.
        tie_depth: draw one set of ``(heads, d, k)`` particles and repeat it along the depth axis
            (common random numbers across grid times, as the limit's ensemble uses at step 0).
        dtype: floating dtype (default: JAX's default float, float32 unless x64 is enabled).

    Returns:
        A :class:`Params` with leaves ``(depth, heads, dim, head_dim)``.

    Example::

        params = mfattn.init_params(jax.random.key(0), depth=8, heads=4, dim=16, head_dim=16)
    """
    fn = "init_params"
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,))):
        raise TypeError(f"{fn}: key must be a PRNG key (jax.random.key(seed)), got {type(key).__name__} {key!r}.")
    for name, value in (("depth", depth), ("heads", heads), ("dim", dim), ("head_dim", head_dim)):
        _checks.check_int(fn, name, value, minimum=1)
    _checks.check_choice(fn, "init", init, ("xavier_uniform", "truncated_normal", "mean_noise"))
    scale = _checks.check_real(fn, "scale", scale, minimum=0)
    _checks.check_bool(fn, "tie_depth", tie_depth)
    if dtype is not None:
        try:
            dt = jnp.dtype(dtype)
        except TypeError:
            dt = None
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{fn}: dtype must be a floating dtype (e.g. jnp.float32), got {dtype!r}.")
    if mean is not None and init != "mean_noise":
        raise ValueError(f"{fn}: mean applies to init='mean_noise' only, got init={init!r}.")
    if isinstance(mean, (numbers.Real, np.number)) or isinstance(mean, (bool, str)):
        mean = _checks.check_real(fn, "mean", mean)
    dtype = jnp.zeros((), dtype).dtype if dtype is not None else jnp.zeros(()).dtype
    draw_depth = 1 if tie_depth else depth
    shape = (draw_depth, heads, dim, head_dim)
    keys = jax.random.split(key, 4)
    a = scale * np.sqrt(6.0 / (dim + head_dim))

    def uniform(k):
        return _draw(lambda k, s: jax.random.uniform(k, s, dtype, -a, a), k, shape)

    if init == "xavier_uniform":
        leaves = [uniform(k) for k in keys]
    elif init == "truncated_normal":
        std = scale * np.sqrt(2.0 / (dim + head_dim))
        leaves = [std * _draw(lambda k, s: jax.random.truncated_normal(k, -2.0, 2.0, s, dtype), k, shape) for k in keys]
    elif init == "mean_noise":
        if mean is None or isinstance(mean, (int, float)):
            c = 1.0 if mean is None else float(mean)
            means = [c * jnp.eye(dim, head_dim, dtype=dtype)] * 4
        else:
            if not isinstance(mean, (tuple, list)) or len(mean) != 4:
                raise ValueError(
                    f"init_params: mean must be a float or four ({dim}, {head_dim}) arrays (W_Q, W_K, W_V, W_O), "
                    f"got {type(mean).__name__}."
                )
            means = [jnp.asarray(m, dtype) for m in mean]
            if any(m.shape != (dim, head_dim) for m in means):
                raise ValueError(
                    f"init_params: mean must be a float or four ({dim}, {head_dim}) arrays "
                    f"(W_Q, W_K, W_V, W_O); got shapes {[tuple(m.shape) for m in means]}."
                )
            for m in means:
                _checks.check_finite("init_params", "mean", m)
        leaves = [m[None, None] + uniform(k) for m, k in zip(means, keys)]
    else:
        raise ValueError(
            f"init_params: unknown init {init!r}; expected 'xavier_uniform', 'truncated_normal' or 'mean_noise'."
        )
    if tie_depth:
        leaves = [jnp.broadcast_to(x, (depth, heads, dim, head_dim)) for x in leaves]
    return Params(*leaves)
