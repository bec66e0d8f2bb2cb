"""Training the discrete model: a pure jitted step, and a resumable loop with a history.

One step (the paper's training, docs/spec.md sections 4 and 6): for a batch of sequences, the forward pass,
the terminal Lions derivative, the hand-derived adjoint and the gradient map ``g`` of every layer and
head, averaged over the batch -- the paper's *rescaled* gradient, ``L H`` times the true gradient --
then one optimizer update. ``method="autodiff"`` computes the same ``g`` as ``L H jax.grad`` of the
batch-mean loss; with the same seed both methods give the same parameters (to float rounding).

The loop scans ``log_every`` steps at a time inside one compiled function (no host synchronisation
inside a chunk), draws step ``s``'s batch with ``jax.random.fold_in(key, s)`` (so a resumed run is
identical to an uninterrupted one), and checkpoints ``(params, opt_state, step, key)`` atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks
from .attention import Attention, as_attention
from .losses import Loss
from .params import Params
from .particles import _forward, _value_and_grad_map, grad_scale

__all__ = ["TrainState", "batch_grad_map", "train_step", "train", "save_checkpoint", "load_checkpoint"]


class TrainState(NamedTuple):
    """Everything a run needs to continue: parameters, optimizer state, step count and base PRNG key."""

    params: Params
    opt_state: Any
    step: jax.Array  # int32 scalar
    key: jax.Array  # typed PRNG key; step s uses fold_in(key, s)


def batch_grad_map(
    params: Params,
    tokens,
    weights,
    targets,
    loss: Loss,
    *,
    beta,
    radius=None,
    method: Literal["adjoint", "autodiff"] = "adjoint",
    attention: Attention | str | None = None,
):
    """Batch-mean loss and the batch-mean rescaled gradient map ``g`` (shaped like ``params``).

    Args:
        params: ``(L, H, d, k)`` parameters.
        tokens: ``(B, N, d)``; weights: ``(B, N)``; targets: a pytree with leading axis ``B``.
        loss: an :class:`~mfattn.losses.Loss`.
        method: ``"adjoint"`` (hand-derived, memory-lean) or ``"autodiff"`` (``jax.grad / grad_scale``).
        attention: the kernel and scalings (:class:`~mfattn.Attention`; default softmax).

    Returns:
        ``(mean loss, g)``. The true gradient of the batch-mean loss is ``grad_scale(params, attention) * g``
        (``g / (L H)`` by default).
    """
    spec = as_attention(attention)
    beta = jnp.asarray(beta, params.wq.dtype)
    if method == "adjoint":

        def one(x, w, y):
            value, g, _ = _value_and_grad_map(params, x, w, y, loss, beta, radius, spec)
            return value, g

        values, gs = jax.vmap(one)(tokens, weights, targets)
        return jnp.mean(values), jax.tree.map(lambda a: jnp.mean(a, axis=0), gs)
    if method == "autodiff":

        def objective(p):
            traj = jax.vmap(lambda x, w: _forward(p, x, w, beta, radius, spec))(tokens, weights)
            return jnp.mean(jax.vmap(loss)(traj[:, -1], weights, targets))

        value, grad = jax.value_and_grad(objective)(params)
        scale = 1.0 / grad_scale(params, spec)
        return value, jax.tree.map(lambda a: a * scale, grad)
    raise ValueError(f"method must be 'adjoint' or 'autodiff', got {method!r}.")


def _metrics(params: Params, g: Params, value) -> dict:
    leaves = (params.wq, params.wk, params.wv, params.wo)
    return {
        "loss": value,
        "grad_norm": jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g))),
        "max_abs_param": jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves])),
        # (4, L, H): Frobenius norm of every block W_Q, W_K, W_V, W_O of every layer and head.
        "block_norms": jnp.stack([jnp.sqrt(jnp.sum(x * x, axis=(-2, -1))) for x in leaves]),
    }


def train_step(
    params: Params,
    opt_state,
    batch,
    *,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    beta,
    radius=None,
    method: Literal["adjoint", "autodiff"] = "adjoint",
    attention: Attention | str | None = None,
):
    """One optimizer step on a batch ``(tokens (B, N, d), weights (B, N), targets)``.

    Pure and jittable. Returns ``(params, opt_state, metrics)`` with ``metrics`` holding the batch loss
    (before the update), the norm of ``g``, the largest ``|theta|`` and the ``(4, L, H)`` block norms
    (after the update).
    """
    tokens, weights, targets = batch
    value, g = batch_grad_map(
        params, tokens, weights, targets, loss, beta=beta, radius=radius, method=method, attention=attention
    )
    updates, opt_state = optimizer.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, _metrics(params, g, value)


@eqx.filter_jit
def _run_chunk(state: TrainState, num_steps: int, sample, batch_size, loss, optimizer, beta, radius, method, spec):
    def body(state, _):
        key = jax.random.fold_in(state.key, state.step)
        batch = sample(key, batch_size)
        params, opt_state, metrics = train_step(
            state.params,
            state.opt_state,
            batch,
            loss=loss,
            optimizer=optimizer,
            beta=beta,
            radius=radius,
            method=method,
            attention=spec,
        )
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    return jax.lax.scan(body, state, None, length=num_steps)


def train(
    task,
    params: Params,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    beta,
    key,
    radius=None,
    method: Literal["adjoint", "autodiff"] = "adjoint",
    attention: Attention | str | None = None,
    log_every: int = 10,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
):
    """Train ``params`` on ``task`` for ``steps`` optimizer steps; resumable.

    Args:
        task: anything with ``sample(key, batch_size) -> (tokens, weights, targets)`` (jittable, batch
            size static) and a ``loss`` attribute (an :class:`~mfattn.losses.Loss`), e.g. the tasks in
            :mod:`mfattn.tasks`.
        params: initial :class:`~mfattn.Params` ``(L, H, d, k)`` (ignored when resuming).
        optimizer: an Optax transform, e.g. :func:`mfattn.optim.adamw` or :func:`mfattn.optim.blockwise_adamw`.
        steps: total number of steps (a resumed run continues up to it).
        batch_size: sequences per step.
        beta: inverse temperature; radius: optional projection radius.
        key: PRNG key; step ``s`` draws its batch with ``fold_in(key, s)``.
        method: ``"adjoint"`` or ``"autodiff"`` (see :func:`batch_grad_map`).
        attention: the kernel and scalings (:class:`~mfattn.Attention` or a kind string; default softmax).
        log_every: steps per compiled chunk; one history row per step, block norms once per chunk.
        checkpoint_dir: if given, ``(params, opt_state, step, key)`` and the history are written there
            after every chunk, and a run started with the same directory resumes from them.
        progress: show a tqdm progress bar.
        callback: called as ``callback(step, row)`` after every chunk with that chunk's last row.

    Returns:
        ``(state, history)``: the final :class:`TrainState` and a dict of lists -- ``step``, ``loss``,
        ``grad_norm``, ``max_abs_param`` per step, and ``block_norms_step``/``block_norms`` (``(4, L, H)``
        each) once per chunk.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"train: steps must be a non-negative integer, got {steps!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"train: batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"train: log_every must be a positive integer, got {log_every!r}.")
    if method not in ("adjoint", "autodiff"):
        raise ValueError(f"train: method must be 'adjoint' or 'autodiff', got {method!r}.")
    spec = as_attention(attention)
    loss = task.loss
    if not isinstance(loss, Loss):
        raise ValueError(f"train: task.loss must be an mfattn.losses.Loss, got {type(loss).__name__}.")
    _checks.check_params("train", params)
    dtype = params.wq.dtype
    beta = _checks.check_scalar("train", "beta", beta, dtype)
    radius = _checks.check_scalar("train", "radius", radius, dtype, allow_none=True)
    params = jax.tree.map(lambda x: _checks.check_finite("train", "params", x), params)
    tokens, weights, _ = task.sample(jax.random.key(0), 1)
    _checks.prepare("train", params, tokens[0], weights[0], beta, radius)  # shapes agree with the task

    state = TrainState(params, optimizer.init(params), jnp.asarray(0, jnp.int32), key)
    history = {"step": [], "loss": [], "grad_norm": [], "max_abs_param": [], "block_norms_step": [], "block_norms": []}
    if checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, "state.eqx")):
        state, history = load_checkpoint(checkpoint_dir, state)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=int(state.step), desc="train", unit="step")
    while int(state.step) < steps:
        n = min(log_every, steps - int(state.step))
        first = int(state.step)
        state, metrics = _run_chunk(state, n, task.sample, batch_size, loss, optimizer, beta, radius, method, spec)
        metrics = jax.device_get(metrics)
        history["step"].extend(range(first, first + n))
        for name in ("loss", "grad_norm", "max_abs_param"):
            history[name].extend(float(v) for v in metrics[name])
        history["block_norms_step"].append(first + n)
        history["block_norms"].append(np.asarray(metrics["block_norms"][-1]).tolist())
        if not np.all(np.isfinite(metrics["loss"])):
            raise FloatingPointError(
                f"train: loss became non-finite at step {first + int(np.argmin(np.isfinite(metrics['loss'])))}."
            )
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, state, history)
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}")
        if callback is not None:
            callback(first + n, {k: history[k][-1] for k in ("loss", "grad_norm", "max_abs_param")})
    if bar is not None:
        bar.close()
    return state, history


def _to_serialisable(state: TrainState):
    return state._replace(key=jax.random.key_data(state.key))


def save_checkpoint(directory: str | os.PathLike, state: TrainState, history: dict | None = None) -> None:
    """Write ``state`` (and ``history`` as JSON) to ``directory`` atomically (write, then rename)."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "state.eqx.tmp")
    eqx.tree_serialise_leaves(tmp, _to_serialisable(state))
    os.replace(tmp, os.path.join(directory, "state.eqx"))
    if history is not None:
        tmp = os.path.join(directory, "history.json.tmp")
        with open(tmp, "w") as f:
            json.dump(history, f)
        os.replace(tmp, os.path.join(directory, "history.json"))


def load_checkpoint(directory: str | os.PathLike, like: TrainState) -> tuple[TrainState, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; ``like`` gives the structure and shapes."""
    template = _to_serialisable(like)
    state = eqx.tree_deserialise_leaves(os.path.join(directory, "state.eqx"), template)
    state = state._replace(key=jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(like.key)))
    history = {}
    path = os.path.join(directory, "history.json")
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    return state, history
