"""A bad-input sweep over the public API (issue 14): every case is refused before any long computation with a
``ValueError`` (or a ``TypeError`` for a wrong type) whose message names the function and the argument.

Each case is ``(function, argument, call, expected exception)``; the test asserts the exact exception class and
that ``"<function>:"`` and the argument's name occur in the message. None may return (an invalid input
accepted, or a silent NaN) or fail deeper down (a dependency's error). Then: an exploding model names the
layer, the limit's step-budget failure says why, errors under ``jit`` carry the message, and good inputs of
every accepted form still pass.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mfattn
from mfattn import Attention, metrics, optim
from mfattn import limit as lim
from mfattn.losses import MMD, AutodiffLoss, TokenRegression

pytestmark = pytest.mark.usefixtures("no_jaxtyping")

N, D, K, L, H = 5, 3, 2, 2, 2
P = mfattn.init_params(jax.random.key(0), L, H, D, K)
X = jax.random.normal(jax.random.key(1), (N, D))
W = jnp.full((N,), 1.0 / N)
Y = jax.random.normal(jax.random.key(2), (N, D))
TRAJ = mfattn.forward(P, X, beta=1.0)
THETA = jax.tree.map(lambda a: a[0], P)
ENS = lim.init_ensemble(jax.random.key(3), 3, 4, D, K, init="mean_noise")
TS = jnp.linspace(0.0, 1.0, 3)
LOSS = TokenRegression()

NAN_X = X.at[0, 0].set(jnp.nan)
INF_X = X.at[1, 1].set(jnp.inf)
NAN_P = jax.tree.map(lambda a: a.at[0, 0, 0, 0].set(jnp.nan), P)
NAN_THETA = jax.tree.map(lambda a: a.at[0, 0, 0].set(jnp.nan), THETA)

CASES: list = []


def case(fn: str, arg: str, call, exc=ValueError, label: str = ""):
    CASES.append(pytest.param(fn, arg, call, exc, id=f"{fn}-{arg}-{label or len(CASES)}"))


# ------------------------------------------------------------------ the discrete model's entry points

# the same bad tokens / weights / beta / radius / params / attention for every entry point that takes tokens
BAD_COMMON = [
    ("tokens", ValueError, "wrong-d", dict(tokens=X[:, :2])),
    ("tokens", ValueError, "batched", dict(tokens=X[None])),
    ("tokens", ValueError, "1-D", dict(tokens=X[0])),
    ("tokens", ValueError, "empty", dict(tokens=X[:0])),
    ("tokens", ValueError, "nan", dict(tokens=NAN_X)),
    ("tokens", ValueError, "inf", dict(tokens=INF_X)),
    ("tokens", TypeError, "int", dict(tokens=jnp.ones((N, D), jnp.int32))),
    ("tokens", TypeError, "string", dict(tokens="tokens")),
    ("weights", ValueError, "shape", dict(weights=W[:4])),
    ("weights", ValueError, "negative", dict(weights=W.at[0].set(-0.2).at[1].set(0.6))),
    ("weights", ValueError, "nan", dict(weights=W.at[0].set(jnp.nan))),
    ("weights", ValueError, "inf", dict(weights=W.at[0].set(jnp.inf))),
    ("weights", ValueError, "sum-2", dict(weights=2 * W)),
    ("weights", ValueError, "all-zero", dict(weights=jnp.zeros(N))),
    ("weights", TypeError, "string", dict(weights="uniform")),
    ("beta", ValueError, "negative", dict(beta=-1.0)),
    ("beta", ValueError, "nan", dict(beta=float("nan"))),
    ("beta", ValueError, "inf", dict(beta=float("inf"))),
    ("beta", TypeError, "string", dict(beta="1.0")),
    ("beta", TypeError, "bool", dict(beta=True)),
    ("beta", ValueError, "vector", dict(beta=jnp.ones(2))),
    ("beta", TypeError, "none", dict(beta=None)),
    ("radius", ValueError, "negative", dict(radius=-1.0)),
    ("radius", ValueError, "zero", dict(radius=0.0)),
    ("radius", ValueError, "nan", dict(radius=float("nan"))),
    ("radius", TypeError, "string", dict(radius="1")),
    ("params", TypeError, "tuple", dict(params=(P.wq, P.wk, P.wv, P.wo))),
    ("params", ValueError, "nan", dict(params=NAN_P)),
    ("params", TypeError, "dict", dict(params={"wq": P.wq, "wk": P.wk, "wv": P.wv, "wo": P.wo})),
    ("attention", ValueError, "bogus-kind", dict(attention="bogus")),
    ("attention", TypeError, "number", dict(attention=3)),
]


def _forward(**kw):
    args = dict(params=P, tokens=X, beta=1.0, weights=W) | kw
    return mfattn.forward(args.pop("params"), args.pop("tokens"), **args)


def _loss_and_grad(**kw):
    args = dict(params=P, tokens=X, loss=LOSS, beta=1.0, weights=W, targets=Y) | kw
    return mfattn.loss_and_grad(args.pop("params"), args.pop("tokens"), args.pop("loss"), **args)


def _value_and_grad_map(**kw):
    args = dict(params=P, tokens=X, loss=LOSS, beta=1.0, weights=W, targets=Y) | kw
    return mfattn.value_and_grad_map(args.pop("params"), args.pop("tokens"), args.pop("loss"), **args)


def _adjoint(**kw):
    args = dict(params=P, trajectory=TRAJ, terminal=Y, beta=1.0, weights=W) | kw
    return mfattn.adjoint(args.pop("params"), args.pop("trajectory"), args.pop("terminal"), **args)


def _param_grad(**kw):
    args = dict(params=P, trajectory=TRAJ, adjoints=TRAJ, beta=1.0, weights=W) | kw
    return mfattn.param_grad(args.pop("params"), args.pop("trajectory"), args.pop("adjoints"), **args)


for fn, call in (("forward", _forward), ("loss_and_grad", _loss_and_grad), ("value_and_grad_map", _value_and_grad_map)):
    for arg, exc, label, kw in BAD_COMMON:
        if fn != "forward" and arg == "tokens" and label == "wrong-d":
            kw = dict(kw, targets=Y[:, :2])
        case(fn, arg, lambda call=call, kw=kw: call(**kw), exc, label)

for fn, call in (("adjoint", _adjoint), ("param_grad", _param_grad)):
    for arg, exc, label, kw in BAD_COMMON:
        if arg != "tokens":
            case(fn, arg, lambda call=call, kw=kw: call(**kw), exc, label)
    for label, bad, exc in (
        ("short", TRAJ[1:], ValueError),
        ("2-D", TRAJ[0], ValueError),
        ("nan", TRAJ.at[1, 0, 0].set(jnp.nan), ValueError),
        ("int", jnp.ones(TRAJ.shape, jnp.int32), TypeError),
        ("wrong-d", TRAJ[:, :, :2], ValueError),
    ):
        case(fn, "trajectory", lambda call=call, bad=bad: call(trajectory=bad), exc, label)

case("adjoint", "terminal", lambda: _adjoint(terminal=Y[:4]), ValueError, "shape")
case("adjoint", "terminal", lambda: _adjoint(terminal=Y.at[0, 0].set(jnp.nan)), ValueError, "nan")
case("param_grad", "adjoints", lambda: _param_grad(adjoints=TRAJ[1:]), ValueError, "shape")
case("param_grad", "adjoints", lambda: _param_grad(adjoints=TRAJ.at[0, 0, 0].set(jnp.inf)), ValueError, "inf")

# targets and losses
for fn, call in (("loss_and_grad", _loss_and_grad), ("value_and_grad_map", _value_and_grad_map)):
    for label, kw, exc in (
        ("targets-transposed", dict(targets=Y.T), ValueError),
        ("targets-one-row", dict(targets=Y[:1]), ValueError),  # would broadcast silently
        ("targets-vector", dict(targets=Y[:, 0]), ValueError),
        ("targets-nan", dict(targets=Y.at[0, 0].set(jnp.nan)), ValueError),
        ("targets-none", dict(targets=None), TypeError),
        ("targets-int", dict(targets=jnp.ones((N, D), jnp.int32)), TypeError),
        ("mmd-targets-wrong-d", dict(loss=MMD(), targets=Y[:, :2]), ValueError),
        ("mmd-targets-nan", dict(loss=MMD(), targets=Y.at[2, 1].set(jnp.nan)), ValueError),
        ("mmd-masses-negative", dict(loss=MMD(), targets=(Y, W.at[0].set(-W[0]))), ValueError),
        ("mmd-masses-shape", dict(loss=MMD(), targets=(Y, W[:3])), ValueError),
    ):
        arg = "target masses r" if "masses" in label else "targets"
        case(fn, arg, lambda call=call, kw=kw: call(**kw), exc, label)
    case(fn, "loss", lambda call=call: call(loss=lambda x, w, y: 0.0), TypeError, "not-a-loss")
    case(fn, "readout", lambda call=call: call(loss=TokenRegression(jnp.eye(2, 4))), ValueError, "readout-d")
case("loss_and_grad", "method", lambda: _loss_and_grad(method="finite-differences"), ValueError, "bogus")
case("loss_and_grad", "method", lambda: _loss_and_grad(method=1), TypeError, "int")

for label, kw, exc in (
    ("zero", dict(bandwidth=0.0), ValueError),
    ("negative", dict(bandwidth=-1.0), ValueError),
    ("nan", dict(bandwidth=float("nan")), ValueError),
    ("inf", dict(bandwidth=float("inf")), ValueError),
    ("string", dict(bandwidth="1"), TypeError),
    ("bool", dict(bandwidth=True), TypeError),
):
    case("MMD", "bandwidth", lambda kw=kw: MMD(**kw), exc, label)
case("TokenRegression", "readout", lambda: TokenRegression(jnp.ones(3)), ValueError, "1-D")
case("TokenRegression", "readout", lambda: TokenRegression(jnp.full((2, 3), jnp.nan)), ValueError, "nan")
case("TokenRegression", "readout", lambda: TokenRegression(jnp.ones((2, 3), jnp.int32)), TypeError, "int")
case("AutodiffLoss", "fn", lambda: AutodiffLoss(3), TypeError, "not-callable")
case("AutodiffLoss", "padding", lambda: AutodiffLoss(lambda x, w, y: 0.0, padding="bogus"), ValueError, "bogus")

# ------------------------------------------------------------------------------------------ the kernels


class Heads(NamedTuple):
    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array


def _kernel(fn):
    f = {"velocity": mfattn.velocity, "adjoint_field": mfattn.adjoint_field, "grad_map": mfattn.grad_map}[fn]

    def call(**kw):
        args = dict(theta=THETA, x=X, tokens=X, weights=W, beta=1.0) | kw
        return f(args.pop("theta"), args.pop("x"), args.pop("tokens"), args.pop("weights"), **args)

    return call


for fn in ("velocity", "adjoint_field", "grad_map"):
    second = "queries" if fn == "velocity" else "tokens"  # the kernels' second argument
    third = "tokens" if fn == "velocity" else "adjoints"
    call = _kernel(fn)
    for arg, label, kw, exc in (
        ("theta", "tuple", dict(theta=(THETA.wq, THETA.wk, THETA.wv, THETA.wo)), TypeError),
        ("theta", "whole-params", dict(theta=P), ValueError),
        ("theta", "mismatched", dict(theta=Heads(THETA.wq, THETA.wk, THETA.wv, THETA.wo[:, :2, :])), ValueError),
        ("theta", "nan", dict(theta=NAN_THETA), ValueError),
        ("theta", "int", dict(theta=Heads(*(jnp.ones((H, D, K), jnp.int32),) * 4)), TypeError),
        (second, "wrong-d", dict(x=X[:, :2]), ValueError),
        (second, "nan", dict(x=NAN_X), ValueError),
        (second, "int", dict(x=jnp.ones((N, D), jnp.int32)), TypeError),
        (third, "wrong-d", dict(tokens=X[:, :2]), ValueError),
        (third, "inf", dict(tokens=INF_X), ValueError),
        ("weights", "shape", dict(weights=W[:4]), ValueError),
        ("weights", "negative", dict(weights=W.at[0].set(-0.2).at[1].set(0.6)), ValueError),
        ("weights", "sum", dict(weights=2 * W), ValueError),
        ("weights", "nan", dict(weights=W.at[3].set(jnp.nan)), ValueError),
        ("weights", "none", dict(weights=None), TypeError),
        ("beta", "negative", dict(beta=-0.5), ValueError),
        ("beta", "string", dict(beta="1"), TypeError),
        ("radius", "zero", dict(radius=0.0), ValueError),
        ("attention", "bogus", dict(attention="softmin"), ValueError),
    ):
        case(fn, arg, lambda call=call, kw=kw: call(**kw), exc, label)
case(
    "velocity", "queries", lambda: _kernel("velocity")(x=X[:3], attention=Attention(causal=True)), ValueError, "causal"
)

_head = [P.wq[0, 0], P.wk[0, 0], P.wv[0, 0], P.wo[0, 0]]


def _attn(**kw):
    args = dict(wq=_head[0], wk=_head[1], wv=_head[2], wo=_head[3], x=X[0], tokens=X, weights=W, beta=1.0) | kw
    pos = [args.pop(n) for n in ("wq", "wk", "wv", "wo", "x", "tokens", "weights")]
    return mfattn.attention(*pos, **args)


case("attention", "wq", lambda: _attn(wq=P.wq[0]), ValueError, "3-D")
case("attention", "wo", lambda: _attn(wo=_head[3][:, :1]), ValueError, "shape")
case("attention", "x", lambda: _attn(x=X[:2]), ValueError, "2-D")
case("attention", "x", lambda: _attn(x=X[0, :2]), ValueError, "wrong-d")
case("attention", "tokens", lambda: _attn(tokens=NAN_X), ValueError, "nan")
case("attention", "weights", lambda: _attn(weights=-W), ValueError, "negative")
case("attention", "beta", lambda: _attn(beta=-1.0), ValueError, "negative")

# -------------------------------------------------------------------------------------- Attention fields

for arg, value, exc in (
    ("kind", "bogus", ValueError),
    ("kind", 3, TypeError),
    ("causal", "no", TypeError),
    ("causal", 1, TypeError),
    ("causal", None, TypeError),
    ("remat", "yes", TypeError),
    ("chunk", True, TypeError),
    ("chunk", 0, ValueError),
    ("chunk", 1.5, TypeError),
    ("chunk", "8", TypeError),
    ("logit_scale", True, TypeError),
    ("logit_scale", -1.0, ValueError),
    ("logit_scale", 0, ValueError),
    ("logit_scale", float("inf"), ValueError),
    ("logit_scale", "1/d", ValueError),
    ("logit_scale", [1.0], TypeError),
    ("bias", "x", TypeError),
    ("bias", float("nan"), ValueError),
    ("bias", True, TypeError),
    ("residual", "x", ValueError),
    ("residual", 1, TypeError),
    ("depth_exponent", "1", TypeError),
    ("depth_exponent", 0.0, ValueError),
    ("depth_exponent", True, TypeError),
    ("sinkhorn_iters", True, TypeError),
    ("sinkhorn_iters", 0, ValueError),
    ("sinkhorn_iters", 2.0, TypeError),
    ("matmul_dtype", 3, TypeError),
    ("matmul_dtype", "int32", ValueError),
):
    kind = "sigmoid" if arg == "bias" else "softmax"
    kw = {"kind": kind, arg: value} if arg != "kind" else {"kind": value}
    case("Attention", arg, lambda kw=kw: Attention(**kw), exc, repr(value))

# ---------------------------------------------------------------------------------- Params, init_params


def _init(**kw):
    args = dict(key=jax.random.key(0), depth=2, heads=2, dim=3, head_dim=2) | kw
    return mfattn.init_params(**args)


for arg, value, exc in (
    ("depth", True, TypeError),
    ("depth", 0, ValueError),
    ("depth", 2.0, TypeError),
    ("heads", 0, ValueError),
    ("heads", "2", TypeError),
    ("dim", -1, ValueError),
    ("head_dim", None, TypeError),
    ("scale", float("inf"), ValueError),
    ("scale", float("nan"), ValueError),
    ("scale", -1.0, ValueError),
    ("scale", "1", TypeError),
    ("init", "orthogonal", ValueError),
    ("init", 3, TypeError),
    ("tie_depth", "yes", TypeError),
    ("dtype", jnp.int32, TypeError),
    ("dtype", "bogus", TypeError),
    ("key", 0, TypeError),
):
    case("init_params", arg, lambda arg=arg, value=value: _init(**{arg: value}), exc, repr(value))
for value, exc in ((float("nan"), ValueError), (float("inf"), ValueError), ("1", TypeError)):
    case("init_params", "mean", lambda value=value: _init(init="mean_noise", mean=value), exc, repr(value))
case("init_params", "mean", lambda: _init(init="mean_noise", mean=[jnp.ones((3, 2))] * 3), ValueError, "three")
case("init_params", "mean", lambda: _init(init="mean_noise", mean=[jnp.full((3, 2), jnp.nan)] * 4), ValueError, "nan")
case("init_params", "mean", lambda: _init(mean=1.0), ValueError, "wrong-init")
case("Params", "(T, P, d, k)", lambda: mfattn.Params(*(jnp.ones((2, 0, 3, 2)),) * 4), ValueError, "zero-heads")
case("Params", "(T, P, d, k)", lambda: mfattn.Params(*(jnp.ones((0, 2, 3, 2)),) * 4), ValueError, "zero-depth")
case("Params", "wq", lambda: mfattn.Params(*(jnp.ones((2, 2, 3, 2), jnp.int32),) * 4), TypeError, "int")
case("Params", "wq", lambda: mfattn.Params(jnp.ones((2, 3, 2)), *(jnp.ones((2, 2, 3, 2)),) * 3), ValueError, "3-D")

# ------------------------------------------------------------------------------------------------ metrics

XB = jax.random.normal(jax.random.key(4), (4, D))
WB = jnp.full((4,), 0.25)


def _w2(fn, **kw):
    f = {"metrics.wasserstein2": metrics.wasserstein2, "metrics.wasserstein2_bounds": metrics.wasserstein2_bounds}[fn]
    args = dict(tokens_a=X, weights_a=W, tokens_b=XB, weights_b=WB) | kw
    pos = [args.pop(n) for n in ("tokens_a", "weights_a", "tokens_b", "weights_b")]
    return f(*pos, **args)


for fn in ("metrics.wasserstein2", "metrics.wasserstein2_bounds"):
    for arg, label, kw, exc in (
        ("tokens_b", "mismatched-d", dict(tokens_b=XB[:, :2]), ValueError),
        ("tokens_a", "nan", dict(tokens_a=NAN_X), ValueError),
        ("tokens_b", "inf", dict(tokens_b=XB.at[0, 0].set(jnp.inf)), ValueError),
        ("tokens_a", "1-D", dict(tokens_a=X[0]), ValueError),
        ("weights_a", "negative", dict(weights_a=W.at[0].set(-1.0)), ValueError),
        ("weights_b", "all-zero", dict(weights_b=jnp.zeros(4)), ValueError),
        ("weights_b", "inf", dict(weights_b=WB.at[1].set(jnp.inf)), ValueError),
        ("weights_a", "nan", dict(weights_a=W.at[1].set(jnp.nan)), ValueError),
        ("weights_a", "shape", dict(weights_a=WB), ValueError),
        ("weights_b", "none", dict(weights_b=None), TypeError),
        ("epsilon", "zero", dict(epsilon=0.0), ValueError),
        ("epsilon", "string", dict(epsilon="0.1"), TypeError),
        ("max_iters", "negative", dict(max_iters=-1), ValueError),
        ("max_iters", "float", dict(max_iters=1.5), TypeError),
        ("tol", "negative", dict(tol=-1.0), ValueError),
    ):
        case(fn, arg, lambda fn=fn, kw=kw: _w2(fn, **kw), exc, label)
case("metrics.wasserstein2", "method", lambda: _w2("metrics.wasserstein2", method="bogus"), ValueError, "bogus")
case(
    "metrics.wasserstein2",
    "weights_b",
    lambda: _w2("metrics.wasserstein2", method="sinkhorn", weights_b=-WB),
    ValueError,
    "sinkhorn-negative",
)

for fn, f, extra in (
    ("metrics.diameter", metrics.diameter, {}),
    ("metrics.num_clusters", metrics.num_clusters, {"threshold": 0.5}),
    ("metrics.cluster_labels", metrics.cluster_labels, {"threshold": 0.5}),
    ("metrics.aligned_fraction", metrics.aligned_fraction, {}),
):
    for arg, label, args, exc in (
        ("tokens", "nan", (NAN_X, W), ValueError),
        ("tokens", "1-D", (X[0], W), ValueError),
        ("tokens", "int", (jnp.ones((N, D), jnp.int32), W), TypeError),
        ("weights", "negative", (X, W.at[0].set(-1.0)), ValueError),
        ("weights", "all-zero", (X, jnp.zeros(N)), ValueError),
        ("weights", "inf", (X, W.at[0].set(jnp.inf)), ValueError),
        ("weights", "shape", (X, W[:3]), ValueError),
    ):
        case(fn, arg, lambda f=f, args=args, extra=extra: f(*args, **extra), exc, label)
    if fn != "metrics.diameter":
        for value, exc in ((0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("x", TypeError)):
            case(fn, "threshold", lambda f=f, value=value: f(X, W, threshold=value), exc, repr(value))

XD = jnp.zeros((L + 1, N, D))
for arg, args, exc in (
    ("x_disc", (XD[0], XD, XD, XD, W), ValueError),
    ("p_lim", (XD, XD, XD, XD[1:], W), ValueError),
    ("x_lim", (XD, XD, XD.astype(jnp.int32), XD, W), TypeError),
    ("weights", (XD, XD, XD, XD, W[:3]), ValueError),
):
    case("metrics.discrepancy", arg, lambda args=args: metrics.discrepancy(*args), exc)
for arg, kw, exc in (
    ("per_family", dict(per_family=0), ValueError),
    ("num_tokens", dict(num_tokens=2.0), TypeError),
    ("dim", dict(dim=True), TypeError),
    ("radius", dict(radius=-1.0), ValueError),
    ("radius", dict(radius="1"), TypeError),
):
    args = dict(key=jax.random.key(0), per_family=2, num_tokens=3, dim=2, radius=1.0) | kw
    case("metrics.input_families", arg, lambda args=args: metrics.input_families(**args), exc)
case("grad_scale", "params", lambda: mfattn.grad_scale((P.wq,)), TypeError)
case("grad_scale", "attention", lambda: mfattn.grad_scale(P, "bogus"), ValueError)

# ---------------------------------------------------------------------------------------------- optimizers

for fn, make in (("adamw", optim.adamw), ("blockwise_adamw", optim.blockwise_adamw)):
    for arg, kw, exc in (
        ("learning_rate", dict(learning_rate="0.1"), TypeError),
        ("learning_rate", dict(learning_rate=-1e-3), ValueError),
        ("learning_rate", dict(learning_rate=float("nan")), ValueError),
        ("learning_rate", dict(learning_rate=float("inf")), ValueError),
        ("learning_rate", dict(learning_rate=None), TypeError),
        ("weight_decay", dict(learning_rate=0.5, weight_decay=3.0), ValueError),  # Lemma 26
        ("weight_decay", dict(learning_rate=1e-3, weight_decay=-1.0), ValueError),
        ("weight_decay", dict(learning_rate=1e-3, weight_decay="0"), TypeError),
        ("b1", dict(learning_rate=1e-3, b1=1.0), ValueError),
        ("b1", dict(learning_rate=1e-3, b1="0.9"), TypeError),
        ("b2", dict(learning_rate=1e-3, b2=-0.1), ValueError),
        ("eps", dict(learning_rate=1e-3, eps=-1.0), ValueError),
    ):
        label = "-".join(f"{k}={v!r}" for k, v in kw.items())
        case(fn, arg, lambda make=make, kw=kw: make(**kw), exc, label)
case("blockwise_adamw", "normalize", lambda: optim.blockwise_adamw(1e-3, normalize="max"), ValueError, "bogus")
case("scale_by_blockwise_adam", "b2", lambda: optim.scale_by_blockwise_adam(b2=1.0), ValueError, "one")

# ------------------------------------------------------------------------------------------ the limit


def _limit(fn, **kw):
    if fn == "limit.forward":
        args = dict(ensemble=ENS, tokens=X, beta=1.0, ts=TS, weights=W) | kw
        return lim.forward(args.pop("ensemble"), args.pop("tokens"), **args)
    args = dict(ensemble=ENS, tokens=X, loss=LOSS, beta=1.0, ts=TS, weights=W, targets=Y) | kw
    return lim.forward_backward(args.pop("ensemble"), args.pop("tokens"), args.pop("loss"), **args)


for fn in ("limit.forward", "limit.forward_backward"):
    for arg, label, kw, exc in (
        ("ts", "2-D", dict(ts=TS[None]), ValueError),
        ("ts", "empty", dict(ts=TS[:0]), ValueError),
        ("ts", "nan", dict(ts=TS.at[1].set(jnp.nan)), ValueError),
        ("ts", "decreasing", dict(ts=TS[::-1]), ValueError),
        ("ts", "outside", dict(ts=jnp.array([0.0, 2.0])), ValueError),
        ("ts", "negative", dict(ts=jnp.array([-0.5, 0.5])), ValueError),
        ("ts", "string", dict(ts="0,1"), TypeError),
        ("dt0", "negative", dict(dt0=-0.1), ValueError),
        ("dt0", "zero", dict(dt0=0.0), ValueError),
        ("dt0", "string", dict(dt0="0.1"), TypeError),
        ("max_steps", "zero", dict(max_steps=0), ValueError),
        ("max_steps", "bool", dict(max_steps=True), TypeError),
        ("max_steps", "float", dict(max_steps=100.5), TypeError),
        ("rtol", "negative", dict(rtol=-1.0), ValueError),
        ("rtol", "nan", dict(rtol=float("nan")), ValueError),
        ("rtol", "string", dict(rtol="1e-6"), TypeError),
        ("atol", "negative", dict(atol=-1e-8), ValueError),
        ("rtol and atol", "both-zero", dict(rtol=0.0, atol=0.0), ValueError),
        ("grid", "shape", dict(grid=jnp.linspace(0, 1, 5)), ValueError),
        ("grid", "decreasing", dict(grid=jnp.array([1.0, 0.5, 0.0])), ValueError),
        ("depth_exponent", "sqrt", dict(attention=Attention(depth_exponent=0.5)), ValueError),
        ("interpolation", "bogus", dict(interpolation="cubic"), ValueError),
        ("tokens", "wrong-d", dict(tokens=X[:, :2]), ValueError),
        ("weights", "negative", dict(weights=W.at[0].set(-0.2).at[1].set(0.6)), ValueError),
        ("beta", "string", dict(beta="1"), TypeError),
    ):
        case(fn, arg, lambda fn=fn, kw=kw: _limit(fn, **kw), exc, label)
for label, kw, exc in (
    ("shape", dict(targets=Y[:1]), ValueError),
    ("nan", dict(targets=Y.at[0, 0].set(jnp.nan)), ValueError),
    ("none", dict(targets=None), TypeError),
):
    case("limit.forward_backward", "targets", lambda kw=kw: _limit("limit.forward_backward", **kw), exc, label)
case("limit.forward_backward", "loss", lambda: _limit("limit.forward_backward", loss="l2"), TypeError, "string")


# --------------------------------------------------------------------------------------------- the sweep


def test_the_sweep_has_over_200_cases():
    assert len(CASES) >= 200, len(CASES)


@pytest.mark.parametrize("fn, arg, call, exc", CASES)
def test_bad_input_is_refused_naming_function_and_argument(fn, arg, call, exc):
    with pytest.raises((ValueError, TypeError)) as info:
        out = call()
        jax.block_until_ready(out)
        pytest.fail(f"{fn}: a bad {arg} was accepted; returned {out!r}")
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    assert f"{fn}:" in msg, msg
    assert arg in msg, msg


# ----------------------------------------------------------------------------- overflowing dynamics


def _exploding():
    params = mfattn.init_params(jax.random.key(0), 8, 2, D, D, init="mean_noise")
    x = 2 * X / jnp.linalg.norm(X, axis=-1, keepdims=True)  # token norm 2
    return params, x, dict(beta=5.0, attention="unnormalized")


def test_an_exploding_model_names_the_layer_and_why():
    params, x, kw = _exploding()
    with pytest.raises(ValueError, match=r"forward: the dynamics overflowed: .* after layer \d+ of 8") as info:
        mfattn.forward(params, x, **kw)
    assert "not normalised" in str(info.value) and "beta = 5" in str(info.value)
    with pytest.raises(ValueError, match=r"loss_and_grad: the dynamics overflowed: .* after layer \d+ of 8"):
        mfattn.loss_and_grad(params, x, LOSS, targets=x, **kw)
    # the first non-finite layer is the one named: the layers before it are finite
    layer = int(str(info.value).split("after layer ")[1].split()[0])
    traj = mfattn.forward(jax.tree.map(lambda a: a[: layer - 1], params), x, **kw) if layer > 1 else x[None]
    assert bool(jnp.all(jnp.isfinite(traj)))


def test_an_exploding_model_is_reported_under_jit(monkeypatch):
    """Under jax.jit the check is an equinox.error_if: the message follows "EquinoxRuntimeError: " in the
    runtime error; with JAX_DISABLE_JIT=1 (the one-line way to see it, _checks' docstring) it is a plain
    ValueError whose message is the mfattn one."""
    params, x, kw = _exploding()
    for jit in (jax.jit, eqx.filter_jit):
        with pytest.raises(Exception) as info:
            jax.block_until_ready(jit(lambda z: mfattn.forward(params, z, **kw))(x))
        first = str(info.value).split("EquinoxRuntimeError: ")[-1].splitlines()[0]
        assert first.startswith("forward: the dynamics overflowed: the tokens are NaN or inf after layer"), first
    with jax.disable_jit():
        with pytest.raises(ValueError, match="^forward: the dynamics overflowed"):
            jax.jit(lambda z: mfattn.forward(params, z, **kw))(x)


def test_the_limit_says_why_it_ran_out_of_steps():
    ens = lim.init_ensemble(jax.random.key(0), 5, 4, D, D, init="mean_noise")
    x = 2 * X / jnp.linalg.norm(X, axis=-1, keepdims=True)
    with pytest.raises(RuntimeError, match="limit.forward: the ODE solve took more than max_steps = 32 .* overflowed"):
        lim.forward(ens, x, beta=5.0, ts=TS, attention="unnormalized", max_steps=32)


def test_bad_values_under_jit_name_the_function():
    run = jax.jit(lambda th, w: mfattn.velocity(th, X, X, w, beta=1.0))
    jax.block_until_ready(run(THETA, W))
    for th, w, msg in (
        (NAN_THETA, W, "velocity: theta contains NaN or inf"),
        (THETA, 2 * W, "velocity: weights must sum to 1"),
        (THETA, W.at[0].set(jnp.inf), "velocity: weights contains NaN or inf"),
    ):
        with pytest.raises(Exception, match=msg):
            jax.block_until_ready(run(th, w))
    with pytest.raises(Exception, match="metrics.wasserstein2: weights_b must be >= 0"):
        jax.block_until_ready(jax.jit(lambda w: metrics.wasserstein2(X, W, XB, w))(-WB))


def test_a_schedule_whose_first_step_breaks_lemma_26_warns():
    with pytest.warns(UserWarning, match="Lemma 26"):
        optim.adamw(optax.constant_schedule(0.5), weight_decay=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.adamw(optax.constant_schedule(0.5), weight_decay=2.0)  # exactly 1: allowed
        optim.adamw(0.5, weight_decay=2.0)


# ---------------------------------------------------------------------------- good inputs still pass


def test_good_inputs_of_every_accepted_form_pass():
    padded = jnp.array([0.5, 0.5, 0.0, 0.0, 0.0])
    for beta in (1, 1.0, np.float32(1.0), jnp.asarray(1.0), np.asarray(1.0)):
        assert mfattn.forward(P, X, beta=beta, weights=padded).shape == (L + 1, N, D)
    assert np.isfinite(float(mfattn.loss_and_grad(P, X, MMD(0.5), beta=1.0, targets=(Y, W))[0]))
    assert mfattn.velocity(Heads(THETA.wq, THETA.wk, THETA.wv, THETA.wo), X[:2], X, W, beta=0.0).shape == (2, D)
    assert Attention(causal=np.bool_(True), chunk=np.int64(2), logit_scale=2, bias=0).chunk == 2
    assert mfattn.init_params(jax.random.key(0), np.int64(2), 1, 3, 2, scale=0).depth == 2
    assert float(metrics.diameter(X, jnp.array([1.0, 0, 0, 0, 0]))) == 0.0  # one live token
    assert float(metrics.wasserstein2(X, 3 * W, X, W)) < 1e-6  # any positive total mass
    optim.adamw(jnp.asarray(1e-3), weight_decay=np.float64(1e-2))
    lim.forward(ENS, X, beta=1.0, ts=jnp.array([0.0, 0.5, 0.5, 1.0]), dt0=0.1)
