"""Tests of mfattn.optim: AdamW, blockwise AdamW, the bound of Lemma 43, the compact set of Lemma 26, flow."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfattn import optim
from mfattn.params import Params, init_params

# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _random_grads(key, params, num_steps):
    """Gradients for ``num_steps`` steps: normal entries, per-step/per-leaf scales 10^U(-3, 3)."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for leaf in leaves:
        key, k1, k2 = jax.random.split(key, 3)
        g = jax.random.normal(k1, (num_steps, *leaf.shape), leaf.dtype)
        expo = jax.random.uniform(k2, (num_steps,) + (1,) * leaf.ndim, leaf.dtype, -3.0, 3.0)
        out.append(g * 10.0**expo)
    return jax.tree.unflatten(treedef, out)


def _run(opt, params, grads_seq):
    """Trajectory (leaves ``(num_steps, ...)``) of ``opt`` fed the stacked gradients ``grads_seq``."""

    def body(carry, g):
        p, s = optim.apply_step(opt, carry[0], g, carry[1])
        return (p, s), p

    _, traj = jax.lax.scan(body, (params, opt.init(params)), grads_seq)
    return traj


def _assert_trees_close(a, b, atol, rtol=0.0):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture
def params(getkey):
    return init_params(getkey(), depth=2, heads=3, dim=4, head_dim=2)


# ---------------------------------------------------------------------------------------------------------
# Agreement with optax and with a NumPy reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learning_rate", [3e-2, optax.linear_schedule(5e-2, 1e-3, 150)])
def test_adamw_matches_optax(getkey, params, learning_rate):
    grads = _random_grads(getkey(), params, 200)
    kw = dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.3)
    ours = _run(optim.adamw(learning_rate, **kw), params, grads)
    ref = _run(optax.adamw(learning_rate, **kw), params, grads)
    _assert_trees_close(ours, ref, atol=1e-12)
    # The run moved the parameters (the comparison is not vacuous).
    assert float(jnp.abs(ours.wq[-1] - params.wq).max()) > 0.1


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_blockwise_with_1x1_blocks_is_adamw(getkey, normalize):
    tree = {
        "p": init_params(getkey(), depth=3, heads=2, dim=1, head_dim=1),
        "w": jax.random.normal(getkey(), (5, 3, 1, 1)),
    }
    grads = _random_grads(getkey(), tree, 100)
    kw = dict(b1=0.85, b2=0.97, eps=1e-7, weight_decay=0.2)
    block = _run(optim.blockwise_adamw(1e-2, normalize=normalize, **kw), tree, grads)
    entry = _run(optim.adamw(1e-2, **kw), tree, grads)
    _assert_trees_close(block, entry, atol=1e-12)


def _numpy_blockwise_adamw(params, grads_seq, learning_rate, b1, b2, eps, weight_decay, normalize):
    """Explicit reference: loops over steps and over every block, norms computed block by block."""
    leaves, treedef = jax.tree.flatten(params)
    theta = [np.array(x, dtype=np.float64) for x in leaves]
    gseq = [np.asarray(x, dtype=np.float64) for x in jax.tree.leaves(grads_seq)]
    m = [np.zeros_like(x) for x in theta]
    v = [np.zeros(x.shape[:-2] if x.ndim >= 2 else ()) for x in theta]
    num_steps = gseq[0].shape[0]
    traj = [np.zeros((num_steps, *x.shape)) for x in theta]
    for k in range(1, num_steps + 1):
        eta = float(learning_rate(k - 1)) if callable(learning_rate) else learning_rate
        for i, th in enumerate(theta):
            g = gseq[i][k - 1]
            lead = th.shape[:-2] if th.ndim >= 2 else ()
            sq = np.zeros(lead)
            for idx in np.ndindex(*lead):
                block = g[idx] if th.ndim >= 2 else g
                s = np.sum(block * block)
                sq[idx] = s / block.size if normalize == "mean" else s
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * sq
            mhat = m[i] / (1 - b1**k)
            vhat = v[i] / (1 - b2**k)
            direction = np.zeros_like(th)
            for idx in np.ndindex(*lead):
                direction[idx] = mhat[idx] / (np.sqrt(vhat[idx]) + eps)
            theta[i] = th - eta * (direction + weight_decay * th)
            traj[i][k - 1] = theta[i]
    return jax.tree.unflatten(treedef, traj)


def _cosine_schedule_f64(count):
    """A cosine schedule computed in float64 (Optax's own schedules compute in float32 from the int32
    step count, and XLA's float32 cos differs by an ulp between jit and eager: 1e-9 noise)."""
    t = jnp.asarray(count, jnp.float64) / 40.0
    return 1e-3 + 2.5e-2 * (1.0 + jnp.cos(jnp.pi * t))


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("learning_rate", [2e-2, _cosine_schedule_f64], ids=["const", "sched"])
def test_blockwise_matches_numpy_reference(getkey, normalize, learning_rate):
    # Params leaves (T, P, d, k); a 3-D leaf (2 blocks 3x4); a vector and a scalar (one block each).
    tree = {
        "params": init_params(getkey(), depth=2, heads=2, dim=3, head_dim=2),
        "w3": jax.random.normal(getkey(), (2, 3, 4)),
        "bias": jax.random.normal(getkey(), (5,)),
        "scalar": jnp.asarray(0.7),
    }
    grads = _random_grads(getkey(), tree, 40)
    kw = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05)
    ours = _run(optim.blockwise_adamw(learning_rate, normalize=normalize, **kw), tree, grads)
    ref = _numpy_blockwise_adamw(tree, grads, learning_rate, normalize=normalize, **kw)
    _assert_trees_close(ours, ref, atol=1e-12)
    # Blockwise differs from entrywise AdamW (so the reference is not trivially adamw's).
    entry = _run(optim.adamw(learning_rate, **kw), tree, grads)
    assert float(jnp.abs(entry["params"].wq[-1] - ours["params"].wq[-1]).max()) > 1e-3


def test_blockwise_state_is_one_value_per_block(params):
    tree = {"params": params, "bias": jnp.ones(5), "scalar": jnp.asarray(1.0)}
    state = optim.scale_by_blockwise_adam().init(tree)
    assert isinstance(state, optim.ScaleByBlockwiseAdamState)
    assert state.nu["params"].wq.shape == (2, 3, 1, 1)
    assert state.nu["bias"].shape == (1,)
    assert state.nu["scalar"].shape == ()
    assert state.mu["params"].wq.shape == params.wq.shape


# ---------------------------------------------------------------------------------------------------------
# Compilation, dtypes, inject_hyperparams
# ---------------------------------------------------------------------------------------------------------

_FACTORIES = {
    "adamw": lambda: optim.adamw(1e-2, weight_decay=1e-2),
    "blockwise_sum": lambda: optim.blockwise_adamw(1e-2, weight_decay=1e-2),
    "blockwise_mean": lambda: optim.blockwise_adamw(optax.cosine_decay_schedule(1e-2, 10), normalize="mean"),
    "injected": lambda: optax.inject_hyperparams(optim.blockwise_adamw)(learning_rate=1e-3),
}


@pytest.mark.parametrize("name", list(_FACTORIES))
def test_update_compiles_once(params, name):
    chex.clear_trace_counter()  # the counter is keyed by the function's code, shared across parameters
    opt = _FACTORIES[name]()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, g, s):
        return optim.apply_step(opt, p, g, s)

    state = opt.init(params)
    p = params
    for c in (1.0, 2.0, 3.0):
        p, state = step(p, jax.tree.map(lambda x, c=c: c * x, params), state)
    assert float(jnp.abs(p.wq - params.wq).max()) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(_FACTORIES))
def test_dtype_preserved(params, name, dtype):
    opt = _FACTORIES[name]()
    p = params.astype(dtype)
    g = jax.tree.map(lambda x: jnp.sin(x).astype(dtype), params)
    state = opt.init(p)
    step = jax.jit(lambda p, g, s: optim.apply_step(opt, p, g, s))
    for _ in range(2):
        p, state = step(p, g, state)
        updates, _ = opt.update(g, state, p)
    for x in jax.tree.leaves((p, updates)):
        assert x.dtype == dtype
    for x in jax.tree.leaves(state):
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == dtype


def test_inject_hyperparams(getkey, params):
    """Injected hyperparameters (traced under jit) reach the update: changing lr mid-run is honoured."""
    grads = _random_grads(getkey(), params, 20)
    g1 = jax.tree.map(lambda x: x[:10], grads)
    g2 = jax.tree.map(lambda x: x[10:], grads)
    injected = optax.inject_hyperparams(optim.blockwise_adamw)(learning_rate=1e-2, weight_decay=0.1)

    def run(opt, p, s, gs):
        def body(carry, g):
            return optim.apply_step(opt, carry[0], g, carry[1]), None

        return jax.lax.scan(body, (p, s), gs)[0]

    run = jax.jit(run, static_argnums=0)
    p, s = run(injected, params, injected.init(params), g1)
    s.hyperparams["learning_rate"] = jnp.asarray(3e-2)
    p, s = run(injected, p, s, g2)

    plain1 = optim.blockwise_adamw(1e-2, weight_decay=0.1)
    plain2 = optim.blockwise_adamw(3e-2, weight_decay=0.1)
    q, t = run(plain1, params, plain1.init(params), g1)
    q, t = run(plain2, q, t, g2)
    _assert_trees_close(p, q, atol=1e-12)
    _assert_trees_close(s.inner_state, t, atol=1e-12)
    # The learning-rate change mattered.
    r, _ = run(plain1, *run(plain1, params, plain1.init(params), g1), g2)
    assert float(jnp.abs(r.wq - q.wq).max()) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [optim.adamw, optim.blockwise_adamw])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.0), "b2"),
        (dict(b2=float("nan")), "b2"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-1e-4), "weight_decay"),
    ],
)
def test_invalid_settings_raise(factory, kwargs, name):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_invalid_normalize_and_bound_args_raise():
    with pytest.raises(ValueError, match="normalize"):
        optim.blockwise_adamw(1e-3, normalize="max")
    with pytest.raises(ValueError, match="normalize"):
        optim.scale_by_blockwise_adam(normalize="frobenius")
    with pytest.raises(ValueError, match="b2"):
        optim.adam_direction_bound(0.5, 1.0)
    with pytest.raises(ValueError, match="num_steps"):
        optim.flow(optim.adamw(1e-3), jnp.ones(2), lambda p, k: p, -1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.adamw(1e-3, b1=0.9, b2=0.5),
        lambda: optim.blockwise_adamw(1e-3, b1=0.8, b2=0.64),
        lambda: optim.scale_by_blockwise_adam(b1=0.95, b2=0.9),
    ],
)
def test_b1_at_least_sqrt_b2_warns(make):
    with pytest.warns(UserWarning, match="Lemma 43"):
        make()


def test_default_settings_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.adamw(1e-3)
        optim.blockwise_adamw(1e-3)
        optim.blockwise_adamw(1e-3, b1=0.0, b2=0.0)
        optax.inject_hyperparams(optim.adamw)(learning_rate=1e-3).init(jnp.ones(3))


# ---------------------------------------------------------------------------------------------------------
# The bound C(b1, b2) of Lemma 43
# ---------------------------------------------------------------------------------------------------------


def _R(b1, b2, k):
    """Exact supremum over sequences, at step k (eps = 0), of |m_hat| / sqrt(v_hat)."""
    r = b1 * b1 / b2
    return (1 - b1) / (1 - b1**k) * np.sqrt((1 - b2**k) * (1 - r**k) / ((1 - b2) * (1 - r)))


def test_adam_direction_bound_values():
    C = optim.adam_direction_bound(0.9, 0.999)
    assert C == pytest.approx(0.1 / math.sqrt(0.001 * (1 - 0.81 / 0.999)), rel=1e-14)
    assert C == pytest.approx(7.2702918, abs=1e-7)
    assert optim.adam_direction_bound(0.0, 0.99) == pytest.approx(10.0, rel=1e-14)
    assert optim.adam_direction_bound(0.0, 0.0) == 1.0
    assert optim.adam_direction_bound(0.9, 0.81) == math.inf
    assert optim.adam_direction_bound(0.9, 0.5) == math.inf
    # A true bound on the step-k supremum R_k for all k, and its limit.
    k = np.arange(1, 200_001, dtype=np.float64)
    for b1, b2 in [(0.9, 0.999), (0.9, 0.99), (0.5, 0.3), (0.99, 0.9999), (0.9, 0.82), (0.3, 0.1)]:
        C = optim.adam_direction_bound(b1, b2)
        R = _R(b1, b2, k)
        assert R.max() <= C * (1 + 1e-12)
        assert R.max() >= C * (1 - 1e-3)


@pytest.mark.parametrize("kind", ["adamw", "sum", "mean"])
@pytest.mark.parametrize("b1, b2", [(0.9, 0.999), (0.5, 0.9)])
def test_bound_is_approached(b1, b2, kind):
    """The Cauchy-Schwarz equality case g_j = (b1/b2)^{k-j} G drives the direction to C (tightness)."""
    k = 5000 if b2 > 0.99 else 500
    C = optim.adam_direction_bound(b1, b2)
    block = jnp.asarray([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0]])
    scales = (b1 / b2) ** jnp.arange(k - 1, -1, -1.0)
    grads = scales[:, None, None] * block[None]
    if kind == "adamw":
        opt = optim.adamw(1.0, b1, b2, 1e-30, 0.0)
    else:
        opt = optim.blockwise_adamw(1.0, b1, b2, 1e-30, 0.0, normalize=kind)
    u = jax.jit(_directions, static_argnums=0)(opt, grads)[-1]
    if kind == "adamw":
        ratio = float(jnp.abs(u).max()) / C
    else:
        n = block.size if kind == "mean" else 1
        ratio = float(jnp.sqrt(jnp.sum(u * u))) / (math.sqrt(n) * C)
    assert 0.99 <= ratio <= 1 + 1e-9


def test_direction_unbounded_when_b1_exceeds_sqrt_b2():
    """Without b1 < sqrt(b2) the same construction exceeds any fixed constant: the hypothesis matters."""
    b1, b2 = 0.9, 0.5
    grads = (b1 / b2) ** jnp.arange(29, -1, -1.0)
    with pytest.warns(UserWarning, match="Lemma 43"):
        opt = optim.adamw(1.0, b1, b2, 1e-30, 0.0)
    u = _directions(opt, grads)
    assert float(jnp.abs(u[-1])) > 10.0


# Direction property test (Lemma 43): one jitted scan, hyperparameters traced (no recompilation).
_DIR_STEPS = 128
_DIR_SHAPE = (1, 2, 3, 2)


def _directions(opt, grads):
    """The directions m_hat / (sqrt(v_hat) + eps) of ``opt`` (built with lr 1, no decay), per step."""
    zeros = jnp.zeros_like(grads[0])

    def body(state, g):
        updates, state = opt.update(g, state, zeros)
        return state, -updates

    return jax.lax.scan(body, opt.init(zeros), grads)[1]


@jax.jit
def _directions_adamw(b1, b2, eps, grads):
    return _directions(optim.adamw(1.0, b1, b2, eps, 0.0), grads)


@jax.jit
def _directions_sum(b1, b2, eps, grads):
    return _directions(optim.blockwise_adamw(1.0, b1, b2, eps, 0.0, normalize="sum"), grads)


@jax.jit
def _directions_mean(b1, b2, eps, grads):
    return _directions(optim.blockwise_adamw(1.0, b1, b2, eps, 0.0, normalize="mean"), grads)


_DIRECTIONS = {"adamw": _directions_adamw, "sum": _directions_sum, "mean": _directions_mean}


@st.composite
def _betas(draw):
    """(b1, b2) with b1 < sqrt(b2): b1 = frac * sqrt(b2), frac < 1."""
    b2 = draw(st.one_of(st.floats(0.1, 0.9999), st.sampled_from([0.999, 0.99, 0.9])))
    frac = draw(st.one_of(st.floats(0.0, 0.995), st.sampled_from([0.0, 0.9 / math.sqrt(0.999)])))
    return frac * math.sqrt(b2), b2


@st.composite
def _gradient_sequence(draw, b1, b2):
    """Adversarial gradient sequences: scales 1e-8..1e8, sign flips, zeros, geometric ramps."""
    n = _DIR_STEPS
    expo = np.array(draw(st.lists(st.integers(-8, 8), min_size=n, max_size=n)), dtype=np.float64)
    sign = np.array(draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=n, max_size=n)))
    pattern = draw(st.sampled_from(["ones", "random", "fixed_random"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if pattern == "ones":
        base = np.ones((n, *_DIR_SHAPE))
    elif pattern == "random":
        base = rng.standard_normal((n, *_DIR_SHAPE))
    else:
        base = np.broadcast_to(rng.standard_normal(_DIR_SHAPE), (n, *_DIR_SHAPE))
    g = (sign * 10.0**expo)[:, None, None, None, None] * base
    # From `start` on, the Cauchy-Schwarz extremal growth rate b2/b1 (capped) with a constant sign.
    start = draw(st.integers(0, n))
    if start < n:
        rho = min(b2 / b1, 10.0) if b1 > 0 else 10.0
        ramp = 10.0 ** expo[start] * rho ** np.arange(n - start)
        g[start:] = ramp[:, None, None, None, None] * base[start:]
    return g


@settings(deadline=None, max_examples=40)
@given(data=st.data())
@pytest.mark.parametrize("kind", ["adamw", "sum", "mean"])
def test_lemma43_direction_bounded(kind, data):
    b1, b2 = data.draw(_betas())
    eps = data.draw(st.sampled_from([1e-8, 1e-12, 1e-3]))
    g = data.draw(_gradient_sequence(b1, b2))
    C = optim.adam_direction_bound(b1, b2)
    u = _DIRECTIONS[kind](b1, b2, eps, jnp.asarray(g))
    assert bool(jnp.all(jnp.isfinite(u)))
    if kind == "adamw":
        ratio = jnp.abs(u) / C  # entrywise
    else:
        n = _DIR_SHAPE[-2] * _DIR_SHAPE[-1] if kind == "mean" else 1
        ratio = jnp.sqrt(jnp.sum(u * u, axis=(-2, -1))) / (math.sqrt(n) * C)  # Frobenius per block
    assert float(ratio.max()) <= 1 + 1e-9


# ---------------------------------------------------------------------------------------------------------
# The compact set of Lemma 26: |theta_k| <= max(|theta_0|, C / lambda) when eta * lambda <= 1
# ---------------------------------------------------------------------------------------------------------

_LONG_STEPS = 10_000
_STRATEGIES = ["push_out", "pull_in", "alternating", "random_scales", "ramp"]


def _adversarial_grad(strategy, theta, step, key, rho, period):
    out = jnp.where(theta >= 0, -1.0, 1.0)  # a gradient along -sign(theta) pushes |theta| up
    if strategy == "push_out":
        return 1e8 * out
    if strategy == "pull_in":
        return -1e8 * out
    if strategy == "alternating":
        return jnp.where(step % 2 == 0, 1e8, -1e-8) * out
    if strategy == "random_scales":
        k1, k2 = jax.random.split(jax.random.fold_in(key, step))
        scale = 10.0 ** jax.random.uniform(k2, (), theta.dtype, -8.0, 8.0)
        return scale * jax.random.normal(k1, theta.shape, theta.dtype)
    if strategy == "ramp":  # the extremal growth of Lemma 43, restarted every `period` steps
        return 1e-8 * rho ** (step % period).astype(theta.dtype) * out
    raise AssertionError(strategy)


def _norms(kind, x):
    return jnp.abs(x) if kind == "adamw" else jnp.sqrt(jnp.sum(x * x, axis=(-2, -1)))


def _long_run(kind, strategy, params, b1, b2, eta, lam, C, key, rho, period):
    """Max over 10^4 steps of |theta_k| / max(|theta_0|, C / lam), entrywise or per block."""
    if kind == "adamw":
        opt = optim.adamw(eta, b1, b2, 1e-8, lam)
    else:
        opt = optim.blockwise_adamw(eta, b1, b2, 1e-8, lam)
    bound = jax.tree.map(lambda x: jnp.maximum(_norms(kind, x), C / lam), params)

    def grad_fn(p, step):
        return jax.tree.map(lambda x: _adversarial_grad(strategy, x, step, key, rho, period), p)

    def body(carry, step):
        p, s, worst = carry
        p, s = optim.apply_step(opt, p, grad_fn(p, step), s)
        ratios = jax.tree.map(lambda x, b: jnp.max(_norms(kind, x) / b), p, bound)
        return (p, s, jnp.maximum(worst, jnp.max(jnp.stack(jax.tree.leaves(ratios))))), None

    init = (params, opt.init(params), jnp.zeros((), params.wq.dtype))
    return jax.lax.scan(body, init, jnp.arange(_LONG_STEPS))[0][2]


_long_run_jit = jax.jit(_long_run, static_argnums=(0, 1))


@settings(deadline=None, max_examples=25)
@given(
    betas=_betas(),
    lam=st.floats(1e-2, 10.0),
    eta_lam=st.one_of(st.floats(1e-3, 1.0), st.just(1.0)),
    strategy=st.sampled_from(_STRATEGIES),
    init_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.parametrize("kind", ["adamw", "sum"])
def test_lemma26_parameters_stay_in_compact_set(kind, betas, lam, eta_lam, strategy, init_scale, seed):
    b1, b2 = betas
    C = optim.adam_direction_bound(b1, b2)
    key = jax.random.key(seed)
    params = init_params(key, depth=1, heads=2, dim=3, head_dim=2, scale=init_scale)
    rho = min(b2 / b1, 10.0) if b1 > 0 else 10.0
    period = max(2, math.ceil(16 / math.log10(rho)))
    worst = _long_run_jit(kind, strategy, params, b1, b2, eta_lam / lam, lam, C, key, rho, period)
    assert float(worst) <= 1 + 1e-9


def test_lemma26_bound_is_reached_by_push_out():
    """Sanity of the property test: pushing outward drives |theta| to (nearly) C_eff / lambda."""
    b1, b2, lam = 0.0, 0.0, 0.5  # C = 1, the direction is exactly sign(g)
    params = init_params(jax.random.key(0), depth=1, heads=2, dim=3, head_dim=2, scale=1e-3)
    worst = _long_run_jit("adamw", "push_out", params, b1, b2, 0.5, lam, 1.0, jax.random.key(1), 10.0, 2)
    assert float(worst) > 1 - 1e-6


# ---------------------------------------------------------------------------------------------------------
# The flow map
# ---------------------------------------------------------------------------------------------------------


def _quadratic_grad_fn(target):
    """Gradient of 0.5 |theta - (1 + step / 1000) target|^2 per leaf; aux: the loss."""

    def grad_fn(p, step):
        shift = 1.0 + step / 1000.0
        diff = jax.tree.map(lambda x, t: x - shift * t, p, target)
        loss = 0.5 * sum(jnp.sum(d * d) for d in jax.tree.leaves(diff))
        return diff, loss

    return grad_fn


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_flow_equals_python_loop(getkey, params, normalize):
    chex.clear_trace_counter()
    target = init_params(getkey(), depth=2, heads=3, dim=4, head_dim=2)
    grad_fn = _quadratic_grad_fn(target)
    schedule = optax.exponential_decay(5e-2, 10, 0.9)
    opt = optim.blockwise_adamw(schedule, weight_decay=1e-2, normalize=normalize)
    num_steps = 30

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(p):
        return optim.flow(opt, p, grad_fn, num_steps, has_aux=True, save_trajectory=True)

    res = run(params)
    res_again = run(jax.tree.map(lambda x: 2.0 * x, params))  # no retrace
    assert not np.allclose(res_again.params.wq, res.params.wq)

    step = jax.jit(lambda p, g, s: optim.apply_step(opt, p, g, s))
    p, s = params, opt.init(params)
    traj, losses = [], []
    for i in range(num_steps):
        g, loss = grad_fn(p, i)
        p, s = step(p, g, s)
        traj.append(p)
        losses.append(loss)
    _assert_trees_close(res.params, p, atol=1e-12)
    _assert_trees_close(res.opt_state, s, atol=1e-12)
    _assert_trees_close(res.trajectory, jax.tree.map(lambda *xs: jnp.stack(xs), *traj), atol=1e-12)
    np.testing.assert_allclose(res.aux, np.array(losses), rtol=1e-12)
    assert isinstance(res.trajectory, Params) and res.trajectory.wq.shape == (num_steps, *params.wq.shape)
    assert float(res.aux[-1]) < float(res.aux[0])


def test_flow_continues_and_defaults(getkey, params):
    target = init_params(getkey(), depth=2, heads=3, dim=4, head_dim=2)
    grad_fn = _quadratic_grad_fn(target)
    plain = lambda p, step: grad_fn(p, step)[0]
    opt = optim.adamw(optax.linear_schedule(1e-1, 1e-2, 20), weight_decay=1e-2)
    whole = optim.flow(opt, params, plain, 20)
    assert whole.trajectory is None and whole.aux is None
    half = optim.flow(opt, params, plain, 12)
    rest = optim.flow(opt, half.params, plain, 8, opt_state=half.opt_state, first_step=12)
    _assert_trees_close(rest.params, whole.params, atol=1e-12)
    # Restarting the step count (first_step=0) uses other targets: the result differs.
    wrong = optim.flow(opt, half.params, plain, 8, opt_state=half.opt_state)
    assert float(jnp.abs(wrong.params.wq - whole.params.wq).max()) > 1e-6
    # Zero steps: identity.
    none = optim.flow(opt, params, plain, 0, save_trajectory=True)
    _assert_trees_close(none.params, params, atol=0.0)
    assert none.trajectory.wq.shape == (0, *params.wq.shape)
