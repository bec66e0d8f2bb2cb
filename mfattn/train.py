"""Training the discrete model: a pure jitted step, and a resumable loop with a history.

One step (the paper's training, docs/spec.md sections 4 and 6): for a batch of sequences, the forward pass,
the terminal Lions derivative, the hand-derived adjoint and the gradient map ``g`` of every layer and
head, averaged over the batch -- the paper's *rescaled* gradient, ``L H`` times the true gradient --
then one optimizer update. ``method="autodiff"`` computes the same ``g`` as ``L H jax.grad`` of the
batch-mean loss; with the same seed both methods give the same parameters (to float rounding).

The loop scans ``log_every`` steps at a time inside one compiled function (no host synchronisation
inside a chunk), draws step ``s``'s batch with ``jax.random.fold_in(key, s)`` (so a resumed run is
identical to an uninterrupted one), and checkpoints ``(params, opt_state, step, key)``, the history and the
run's configuration atomically, as one file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import types
import zipfile
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
        checkpoint_dir: if given, ``(params, opt_state, step, key)``, the history and the run's configuration
            are written there after every chunk as one file (``checkpoint.mfattn``, replaced atomically), and a
            run started with the same directory resumes from it. Resuming with another configuration (optimizer
            or its learning rate..., key, batch size, beta, radius, method, attention, task, parameter shapes)
            is a ``ValueError`` naming the settings; ``steps`` may grow (the run continues to it).
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
    config = None
    if checkpoint_dir is not None:
        config = _run_config(
            task, params, optimizer, batch_size=batch_size, beta=beta, radius=radius, method=method, spec=spec, key=key
        )
        checkpoint_dir = os.fspath(checkpoint_dir)
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"train: checkpoint_dir {checkpoint_dir} is a file, not a folder.")
        if os.path.exists(os.path.join(checkpoint_dir, CHECKPOINT)) or os.path.exists(
            os.path.join(checkpoint_dir, "state.eqx")
        ):
            state, history = load_checkpoint(checkpoint_dir, state, config)

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
                f"train: loss became non-finite at step {first + int(np.argmin(np.isfinite(metrics['loss'])))}: the "
                "training dynamics overflowed (parameters or tokens grew without bound); lower the learning rate "
                "(learning_rate * weight_decay <= 1, paper Lemma 26) or beta; mfattn.forward(state.params, x, ...) "
                "names the first non-finite layer."
            )
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, state, history, config)
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


#: The checkpoint file in ``checkpoint_dir``: a zip archive of ``state.eqx`` (the :class:`TrainState`),
#: ``history.json`` and ``config.json`` (the run's configuration), written as one file (temporary name, then
#: ``os.replace``), so that state, history and configuration always belong together.
CHECKPOINT = "checkpoint.mfattn"
_PARTS = ("state.eqx", "history.json", "config.json")
#: Readable names of the configuration entries, for messages.
_NAMES = {
    "optimizer": "optimizer (its settings, e.g. the learning rate)",
    "key": "key",
    "batch_size": "batch_size",
    "beta": "beta",
    "radius": "radius",
    "method": "method",
    "task": "task",
    "params": "params (shape or dtype)",
}


def _fingerprint_parts(obj, out: list, seen: set, depth: int = 0) -> None:
    """Append a process-independent description of ``obj`` to ``out``: the constants and function names
    reachable from it (closures, defaults, partials, containers, object attributes), never addresses."""
    if depth > 60:
        out.append("...")
        return
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        out.append(repr(obj))
        return
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(obj)
        out.append(f"array{a.shape}{a.dtype}:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}")
        return
    if id(obj) in seen:
        out.append("<cycle>")
        return
    seen.add(id(obj))
    if isinstance(obj, types.ModuleType):
        out.append(f"module {obj.__name__}")
    elif isinstance(obj, type):
        out.append(f"class {obj.__module__}.{obj.__qualname__}")
    elif isinstance(obj, functools.partial):
        out.append("partial")
        for part in (obj.func, obj.args, obj.keywords):
            _fingerprint_parts(part, out, seen, depth + 1)
    elif isinstance(obj, types.FunctionType):
        out.append(f"fn {obj.__module__}.{obj.__qualname__}")
        for part in (obj.__defaults__, obj.__kwdefaults__):
            _fingerprint_parts(part, out, seen, depth + 1)
        for cell in obj.__closure__ or ():
            try:
                _fingerprint_parts(cell.cell_contents, out, seen, depth + 1)
            except ValueError:  # an empty cell
                out.append("<empty>")
    elif isinstance(obj, types.MethodType):
        _fingerprint_parts(obj.__func__, out, seen, depth + 1)
        _fingerprint_parts(obj.__self__, out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        out.append(f"{type(obj).__name__}[{len(obj)}]")
        for x in obj:
            _fingerprint_parts(x, out, seen, depth + 1)
    elif isinstance(obj, dict):
        out.append(f"dict[{len(obj)}]")
        for k in sorted(obj, key=repr):
            out.append(repr(k))
            _fingerprint_parts(obj[k], out, seen, depth + 1)
    elif callable(obj) and not hasattr(obj, "__dict__"):  # builtins, numpy ufuncs, ...
        out.append(f"callable {getattr(obj, '__qualname__', type(obj).__qualname__)}")
    else:
        out.append(f"object {type(obj).__module__}.{type(obj).__qualname__}")
        attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        if dataclasses.is_dataclass(obj):
            attrs.update({f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)})
        _fingerprint_parts(attrs, out, seen, depth + 1)


def _digest(obj) -> str:
    parts: list = []
    _fingerprint_parts(obj, parts, set())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _run_config(task, params, optimizer, *, batch_size, beta, radius, method, spec, key) -> dict:
    """What a checkpoint must agree with to be resumed: everything that changes the numbers of a step
    (not ``steps``, the target, nor ``log_every``, the chunking, nor the execution-only attention settings)."""
    attention = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("chunk", "remat")}
    return {
        "optimizer": _digest(optimizer),
        "key": np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key).tolist(),
        "batch_size": batch_size,
        "beta": float(beta),
        "radius": None if radius is None else float(radius),
        "method": method,
        "attention": json.loads(json.dumps(attention, default=str)),
        "task": f"{type(task).__module__}.{type(task).__qualname__}:{_digest(task)}",
        "params": [list(params.wq.shape), str(params.wq.dtype)],
    }


def _differences(stored: dict, current: dict) -> list[str]:
    names = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k), current.get(k)
        if k == "attention" and isinstance(a, dict) and isinstance(b, dict):
            names += [f"attention.{f}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        elif a != b:
            names.append(_NAMES.get(k, k))
    return names


def save_checkpoint(
    directory: str | os.PathLike, state: TrainState, history: dict | None = None, config: dict | None = None
) -> None:
    """Write ``state``, ``history`` and ``config`` (JSON-able dicts) to ``directory/checkpoint.mfattn`` as one
    unit: a zip archive written under a temporary name, fsynced, then renamed over the previous one (a crash
    leaves either the old checkpoint or the new, never a mix)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, _to_serialisable(state))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr("state.eqx", buf.getvalue())
            z.writestr("history.json", json.dumps(history if history is not None else {}))
            z.writestr("config.json", json.dumps(config if config is not None else {}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    directory: str | os.PathLike, like: TrainState, config: dict | None = None
) -> tuple[TrainState, dict]:
    """Read the checkpoint :func:`save_checkpoint` wrote to ``directory``; ``like`` gives the structure and
    shapes. With ``config``, ``ValueError`` naming the settings in which the checkpoint's differs.

    ``ValueError`` (naming the file and what to do) for a missing, damaged or incomplete checkpoint, one of
    other shapes, or one in the old two-file format (``state.eqx`` and ``history.json``)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CHECKPOINT)
    restart = f"delete {path} to start the run over from step 0"
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, "state.eqx")):
            raise ValueError(
                f"train: {directory} holds a checkpoint in the old format (state.eqx and history.json, saved "
                "without the run's configuration), which cannot be checked against this run; use another "
                "checkpoint_dir, or delete state.eqx and history.json there to start over."
            )
        raise ValueError(f"train: no checkpoint in {directory} (expected {path}).")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [p for p in _PARTS if p not in names]
            if missing:
                raise ValueError(f"train: the checkpoint {path} lacks {', '.join(missing)}; {restart}.")
            bad = z.testzip()
            if bad is not None:
                raise ValueError(f"train: the checkpoint {path} is damaged (its part {bad}); {restart}.")
            raw = {p: z.read(p) for p in _PARTS}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"train: the checkpoint {path} is damaged or unreadable ({err}); {restart}.") from None
    try:
        history = json.loads(raw["history.json"])
        stored = json.loads(raw["config.json"])
    except ValueError as err:
        raise ValueError(f"train: the checkpoint {path} has unreadable JSON ({err}); {restart}.") from None
    if config is not None:
        changed = _differences(stored, json.loads(json.dumps(config)))
        if changed:
            raise ValueError(
                f"train: {path} holds a run with a different configuration (differs in {', '.join(changed)}); "
                f"use another checkpoint_dir, or {restart}."
            )
    template = _to_serialisable(like)
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(raw["state.eqx"]), template)
    except Exception as err:  # wrong shapes or structure: equinox/numpy raise various types
        raise ValueError(
            f"train: the state in {path} does not fit this run (other shapes or optimizer state: "
            f"{type(err).__name__}: {err}); use another checkpoint_dir, or {restart}."
        ) from None
    state = state._replace(key=jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(like.key)))
    if history and len(history.get("step", [])) != int(state.step):
        raise ValueError(
            f"train: the checkpoint {path} is inconsistent (history has {len(history.get('step', []))} steps, "
            f"the state {int(state.step)}); {restart}."
        )
    return state, history
