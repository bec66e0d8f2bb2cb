"""Tests of mfattn.tasks: the ball bound, weights and padding, determinism and jit, each task's own
maths, each task's loss through the hand adjoint against autodiff (float64), and the targets of arbitrary
inputs (``task.target``) that the rates experiment needs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn.losses import MMD, TokenRegression
from mfattn.tasks import (
    Batch,
    Denoising,
    InContextRegression,
    QueryRegression,
    TargetMeasure,
    Task,
    TeacherStudent,
)

BIG = 512  # sequences in the large batches used for the ball bound
BALL_TOL = 1e-12


def teacher_student(min_tokens=None, radius=1.0):
    key = jax.random.key(42)
    return TeacherStudent.random(key, 3, 2, 2, 3, beta=1.0, num_tokens=6, radius=radius, min_tokens=min_tokens)


# Factories (not instances) so that nothing is computed at collection time. Compilation dominates the
# run time, so tests share these tasks and their batches (one batch size, one compile per task).
TASKS = {
    "teacher-pad": lambda: teacher_student(min_tokens=2, radius=2.5),
    # Far from the boundary (no projection is active): the noise level is exact.
    "denoise": lambda: Denoising(dim=3, num_tokens=16, noise=0.3, radius=10.0, spread=0.02),
    "denoise-pad": lambda: Denoising(dim=2, num_tokens=7, noise=1.0, radius=0.5, clusters=3, min_tokens=1),
    "denoise-perseq": lambda: Denoising(
        dim=3, num_tokens=6, noise=0.2, clusters=1, spread=0.01, seed=None, min_tokens=3
    ),
    "icr": lambda: InContextRegression(dim_x=3, num_examples=8),
    "icr-noisy-pad": lambda: InContextRegression(dim_x=2, num_examples=100, noise=0.2, min_examples=50),
}
PADDED = [name for name in TASKS if "pad" in name or name == "denoise-perseq"]


@functools.cache
def task_of(name: str) -> Task:
    return TASKS[name]()


@functools.cache
def batch_of(name: str, seed: int = 1) -> Batch:
    return task_of(name).sample(jax.random.key(seed), BIG)


def min_len(task: Task) -> int | None:
    """Least number of real tokens, or None without padding."""
    if isinstance(task, InContextRegression):
        return None if task.min_examples is None else task.min_examples + 1
    return task.min_tokens


def one(targets, i):
    return jax.tree.map(lambda t: t[i], targets)


def student(dim, depth=2, heads=2, head_dim=3, seed=0):
    """Mean + noise student parameters, drawn with NumPy (no compilation)."""
    rng = np.random.default_rng(seed)
    leaves = [np.eye(dim, head_dim) + 0.5 * rng.uniform(-1, 1, (depth, heads, dim, head_dim)) for _ in range(4)]
    return mfattn.Params(*(jnp.asarray(x) for x in leaves))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------------------------------------
# Common properties of every task
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASKS)
def test_batch_shapes_bound_and_weights(name):
    task, batch = task_of(name), batch_of(name)
    assert isinstance(batch, Batch)
    B, N, d = BIG, task.num_tokens, task.dim
    assert batch.tokens.shape == (B, N, d)
    assert batch.weights.shape == (B, N)
    assert batch.tokens.dtype == batch.weights.dtype == jnp.float64
    for leaf in jax.tree.leaves(batch.targets):
        assert leaf.shape[0] == B and leaf.dtype == jnp.float64
        assert np.all(np.isfinite(leaf))
    if isinstance(task, InContextRegression):
        assert batch.targets.shape == (B,)
        assert d == task.dim_x + 1 and N == task.num_examples + 1
    else:
        assert batch.targets.shape == (B, N, d)

    # Every token (padding included) in the closed ball of radius R; and the bound is not vacuous.
    norms = np.linalg.norm(np.asarray(batch.tokens), axis=-1)
    assert norms.max() <= task.radius + BALL_TOL
    assert norms.max() > 0.5 * task.radius
    if isinstance(task, Denoising):  # the clean targets too
        assert np.linalg.norm(np.asarray(batch.targets), axis=-1).max() <= task.radius + BALL_TOL

    w = np.asarray(batch.weights)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    if min_len(task) is None:
        np.testing.assert_array_equal(w, 1.0 / N)


@pytest.mark.parametrize("name", PADDED)
def test_padding_pattern(name):
    task = task_of(name)
    w = np.asarray(batch_of(name).weights)
    N = task.num_tokens
    live = w > 0
    n = live.sum(axis=1)
    lo = min_len(task)
    assert n.min() >= lo and n.max() <= N
    # Lengths vary across the batch and cover the whole range [lo, N].
    assert set(n.tolist()) == set(range(lo, N + 1))
    # Weights are 1/n on the real tokens, 0 elsewhere.
    np.testing.assert_allclose(np.where(live, w, 0), live / n[:, None], rtol=1e-15, atol=0)
    slots = np.arange(N)[None, :]
    if isinstance(task, InContextRegression):
        # Examples first, then padding, then the query, which is always real.
        assert np.all(live[:, -1])
        np.testing.assert_array_equal(live[:, :-1], slots[:, :-1] < (n - 1)[:, None])
    else:
        np.testing.assert_array_equal(live, slots < n[:, None])


@pytest.mark.parametrize("name", TASKS)
def test_deterministic(name):
    task, a = task_of(name), batch_of(name)
    b = task.sample(jax.random.key(1), BIG)
    c = batch_of(name, seed=2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.tokens, c.tokens)
    assert not np.allclose(a.targets, c.targets)
    if min_len(task) is not None:
        assert not np.allclose(a.weights, c.weights)


# One task of each class (each jax.jit is a fresh compilation); teacher-pad and denoise hold arrays
# (hashed by identity), icr-noisy-pad only static fields.
@pytest.mark.parametrize("name", ["teacher-pad", "denoise", "icr-noisy-pad"])
def test_jit_matches_eager(name):
    task = task_of(name)
    jitted = jax.jit(task.sample, static_argnums=1)
    for seed in (1, 2):
        for x, y in zip(jax.tree.leaves(jitted(jax.random.key(seed), BIG)), jax.tree.leaves(batch_of(name, seed))):
            np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)


def test_legacy_uint32_key():
    task = task_of("denoise")
    batch = task.sample(jax.random.PRNGKey(3), BIG)
    assert batch.tokens.shape == (BIG, task.num_tokens, task.dim)
    np.testing.assert_array_equal(task.sample(jax.random.PRNGKey(3), BIG).tokens, batch.tokens)


# ---------------------------------------------------------------------------------------------------------
# Teacher-student
# ---------------------------------------------------------------------------------------------------------


def test_teacher_targets_are_teacher_forward():
    task, batch = task_of("teacher-pad"), batch_of("teacher-pad")
    for i in range(6):
        want = mfattn.forward(task.teacher, batch.tokens[i], beta=task.beta, weights=batch.weights[i])[-1]
        np.testing.assert_allclose(batch.targets[i], want, rtol=1e-12, atol=1e-13)
    # Real tokens ignore the padding: dropping it changes nothing.
    n = np.sum(np.asarray(batch.weights) > 0, axis=1)
    i = int(np.argmin(n))
    short = mfattn.forward(task.teacher, batch.tokens[i, : n[i]], beta=task.beta)[-1]
    np.testing.assert_allclose(batch.targets[i, : n[i]], short, rtol=1e-12, atol=1e-13)


def test_teacher_target_of_any_input():
    task, batch = task_of("teacher-pad"), batch_of("teacher-pad")
    np.testing.assert_allclose(task.target(batch.tokens[3], batch.weights[3]), batch.targets[3], rtol=1e-12, atol=1e-13)
    far = 3.0 * batch.tokens[0]  # outside the ball: still the teacher's output
    want = mfattn.forward(task.teacher, far, beta=task.beta, weights=batch.weights[0])[-1]
    np.testing.assert_allclose(task.target(far, batch.weights[0]), want, rtol=1e-12, atol=1e-13)


def test_teacher_moves_tokens():
    batch = batch_of("teacher-pad")
    moved = np.linalg.norm(np.asarray(batch.targets) - np.asarray(batch.tokens), axis=-1).mean()
    size = np.linalg.norm(np.asarray(batch.tokens), axis=-1).mean()
    assert moved > 0.2 * size, (moved, size)


def test_teacher_dtype_follows_teacher():
    task = task_of("teacher-pad")
    task32 = TeacherStudent(task.teacher.astype(jnp.float32), task.beta, task.num_tokens)
    batch = jax.eval_shape(lambda k: task32.sample(k, 4), jax.random.key(1))  # traced, not compiled
    assert batch.tokens.dtype == batch.weights.dtype == batch.targets.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------
# Denoising
# ---------------------------------------------------------------------------------------------------------


def test_denoising_noise_level_and_clusters():
    task, batch = task_of("denoise"), batch_of("denoise")
    noise, R, spread = task.noise, task.radius, task.spread
    diff = np.asarray(batch.tokens) - np.asarray(batch.targets)
    assert abs(diff.mean()) < 0.01
    assert abs(diff.std() / noise - 1) < 0.02, diff.std()
    # Clean tokens are blobs of std spread * R around the fixed centres (which lie in the ball of radius R/2).
    centres = np.asarray(task.centres)
    assert centres.shape == (4, 3) and np.linalg.norm(centres, axis=-1).max() <= R / 2 + BALL_TOL

    def dist2(clean):
        return np.min(np.sum((clean.reshape(-1, 1, 3) - centres[None]) ** 2, axis=-1), axis=1)

    clean = np.asarray(batch.targets).reshape(-1, 3)
    assert abs(np.sqrt(dist2(clean).mean() / 3) / (spread * R) - 1) < 0.05
    # The noise is independent of the blob offset (uncorrelated, coordinate by coordinate).
    nearest = centres[np.argmin(np.sum((clean[:, None, :] - centres[None]) ** 2, axis=-1), axis=1)]
    offset, noise_ = clean - nearest, diff.reshape(-1, 3)
    for j in range(3):
        assert abs(np.corrcoef(offset[:, j], noise_[:, j])[0, 1]) < 0.05
    # Another key: the same centres.
    assert np.sqrt(dist2(np.asarray(batch_of("denoise", seed=2).targets)).max()) < 6 * spread * R


def test_denoising_projection_active():
    # noise 1.0 >> R = 0.5: most noisy inputs were projected onto the sphere, yet all stay in the ball.
    norms = np.linalg.norm(np.asarray(batch_of("denoise-pad").tokens), axis=-1)
    assert norms.max() <= 0.5 + BALL_TOL
    assert np.mean(norms > 0.5 - 1e-9) > 0.5


def test_denoising_per_sequence_centres():
    task, batch = task_of("denoise-perseq"), batch_of("denoise-perseq")
    clean, w = np.asarray(batch.targets), np.asarray(batch.weights)
    # One blob of std 0.01 per sequence (clusters=1), at a centre that changes from sequence to sequence.
    assert np.all(clean.std(axis=1) < 0.05)
    means = clean.mean(axis=1)
    assert np.median(np.linalg.norm(means[1:] - means[:-1], axis=-1)) > 0.2
    # Inputs are the clean tokens plus noise of std 0.2 (the ball of radius 1 is rarely reached).
    diff = np.asarray(batch.tokens) - clean
    assert abs(diff.std() / task.noise - 1) < 0.05
    assert w.shape == (BIG, 6)
    assert task.centres is None


# ---------------------------------------------------------------------------------------------------------
# In-context regression
# ---------------------------------------------------------------------------------------------------------


def test_icr_is_linear_and_query_hidden():
    tokens, weights, y_q = (np.asarray(a) for a in batch_of("icr"))
    np.testing.assert_array_equal(tokens[:, -1, -1], 0.0)  # the query's label slot
    assert np.all(weights[:, -1] > 0)
    for i in range(32):
        real = weights[i, :-1] > 0
        x, y = tokens[i, :-1][real, :-1], tokens[i, :-1][real, -1]
        w, *_ = np.linalg.lstsq(x, y, rcond=None)
        np.testing.assert_allclose(x @ w, y, rtol=0, atol=1e-12)
        np.testing.assert_allclose(tokens[i, -1, :-1] @ w, y_q[i], rtol=0, atol=1e-12)
        # Padding slots hold ordinary examples of the same w.
        np.testing.assert_allclose(tokens[i, :-1, :-1] @ w, tokens[i, :-1, -1], rtol=0, atol=1e-12)
        # w lies in the unit ball (the scaling of the tokens is linear, so w is unchanged).
        assert np.linalg.norm(w) <= 1 + 1e-9


def test_icr_noise_level_and_scale():
    task = task_of("icr-noisy-pad")
    noise, s = task.noise, task.scale
    assert math.isclose(s, task.radius / math.sqrt(1 + (1 + 3 * noise) ** 2))
    tokens, weights, _ = (np.asarray(a) for a in batch_of("icr-noisy-pad"))
    res = []
    for i in range(16):
        real = weights[i, :-1] > 0
        x, y = tokens[i, :-1][real, :-1], tokens[i, :-1][real, -1]
        w, *_ = np.linalg.lstsq(x, y, rcond=None)
        res.append((y - x @ w) * np.sqrt(len(y) / (len(y) - 2)))
    std = np.concatenate(res).std()
    truncated_std = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))
    assert abs(std / (s * noise * truncated_std) - 1) < 0.06, std


@pytest.mark.parametrize("index", [-1, 2])
@pytest.mark.parametrize("padding", [False, True])
def test_query_regression_lions(index, padding):
    N, d = 6, 4
    rng = np.random.default_rng(index % 7 + 10 * padding)
    tokens = jnp.asarray(rng.normal(size=(N, d)))
    m = rng.uniform(0.1, 1.0, N)
    if padding:
        m[[0, 4]] = 0.0
    m = jnp.asarray(m / m.sum())
    y = jnp.asarray(rng.normal())
    loss = QueryRegression(index=index)
    q = index % N
    np.testing.assert_allclose(loss(tokens, m, y), 0.5 * (tokens[q, -1] - y) ** 2, rtol=1e-15)
    np.testing.assert_allclose(loss(tokens, m, y[None]), loss(tokens, m, y), rtol=0)
    p = np.asarray(loss.lions(tokens, m, y))
    grad = np.asarray(jax.grad(loss)(tokens, m, y))
    np.testing.assert_allclose(p[q], grad[q] / float(m[q]), rtol=1e-14, atol=0)
    assert abs(p[q, -1]) > 0
    np.testing.assert_array_equal(np.delete(p, q, axis=0), 0.0)
    np.testing.assert_array_equal(np.delete(grad, q, axis=0), 0.0)


def test_query_regression_errors():
    tokens = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="index"):
        QueryRegression(index=3)(tokens, jnp.full(3, 1 / 3), 0.0)
    with pytest.raises(ValueError, match="targets"):
        QueryRegression()(tokens, jnp.full(3, 1 / 3), jnp.zeros(2))
    with pytest.raises(Exception, match="positive weight"):
        QueryRegression().lions(tokens, jnp.array([0.5, 0.5, 0.0]), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Each task's loss through the model: hand adjoint against autodiff
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["teacher-pad", "denoise-pad", "icr-noisy-pad"])
def test_task_loss_adjoint_matches_autodiff(name):
    check_loss_adjoint(task_of(name), batch_of(name))


def check_loss_adjoint(task, batch):
    """Hand adjoint against autodiff through the model for the task's loss, in float64, on the shortest
    padded sequence with at least two real tokens (so every block has a gradient)."""
    n = np.sum(np.asarray(batch.weights) > 0, axis=1)
    i = int(np.argmin(np.where(n >= 2, n, task.num_tokens + 1)))
    params = student(task.dim)
    kw = dict(beta=1.0, weights=batch.weights[i], targets=one(batch.targets, i))
    v_hand, g_hand = mfattn.loss_and_grad(params, batch.tokens[i], task.loss, method="adjoint", **kw)
    v_auto, g_auto = mfattn.loss_and_grad(params, batch.tokens[i], task.loss, method="autodiff", **kw)
    assert v_auto > 0
    np.testing.assert_allclose(v_hand, v_auto, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g_hand), jax.tree.leaves(g_auto)):
        assert np.linalg.norm(b) > 0
        assert rel(a, b) <= 1e-10


def test_losses():
    assert isinstance(task_of("teacher-pad").loss, TokenRegression)
    assert isinstance(Denoising(2, 3).loss, TokenRegression)
    assert InContextRegression(2, 3).loss == QueryRegression(index=-1)


# ---------------------------------------------------------------------------------------------------------
# Transport to a fixed target measure
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def target_task() -> TargetMeasure:
    return TargetMeasure(dim=3, num_tokens=6, num_points=5, radius=2.0, bandwidth=0.7, min_tokens=2, seed=3)


@functools.cache
def target_batch() -> Batch:
    return target_task().sample(jax.random.key(1), BIG)


def test_target_measure_batch_and_cloud():
    task, batch = target_task(), target_batch()
    B, N, d, M = BIG, 6, 3, 5
    assert batch.tokens.shape == (B, N, d) and batch.weights.shape == (B, N) and batch.targets.shape == (B, M, d)
    assert batch.tokens.dtype == batch.targets.dtype == task.points.dtype == jnp.float64
    norms = np.linalg.norm(np.asarray(batch.tokens), axis=-1)
    assert norms.max() <= task.radius + BALL_TOL and norms.max() > 0.5 * task.radius
    # The same cloud for every sequence, inside the ball of radius R/2 around (R/2) e_1, and fixed by the seed.
    np.testing.assert_array_equal(batch.targets, np.broadcast_to(task.points, (B, M, d)))
    centre = np.array([1.0, 0.0, 0.0])
    assert np.linalg.norm(np.asarray(task.points) - centre, axis=-1).max() <= 1.0 + 1e-12
    np.testing.assert_array_equal(TargetMeasure(3, 6, 5, radius=2.0, seed=3).points, task.points)
    assert not np.allclose(TargetMeasure(3, 6, 5, radius=2.0, seed=4).points, task.points)
    w = np.asarray(batch.weights)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert set((w > 0).sum(axis=1).tolist()) == set(range(2, N + 1))
    # The target of any input, in the ball or not, is the cloud; the loss is MMD with the task's width.
    for x in (batch.tokens[0], 10.0 * batch.tokens[1]):
        np.testing.assert_array_equal(task.target(x, batch.weights[0]), task.points)
    assert task.loss == MMD(bandwidth=0.7)
    task32 = TargetMeasure(2, 4, dtype=jnp.float32)
    shapes = jax.eval_shape(lambda k: task32.sample(k, 2), jax.random.key(0))
    assert shapes.tokens.dtype == shapes.targets.dtype == jnp.float32


def test_target_measure_loss_adjoint_matches_autodiff():
    check_loss_adjoint(target_task(), target_batch())


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _teacher(dim=3):
    return student(dim, depth=1, heads=1, head_dim=2)


BAD = [
    ("num_tokens", lambda: TeacherStudent(_teacher(), 1.0, 0)),
    ("radius", lambda: TeacherStudent(_teacher(), 1.0, 4, radius=0.0)),
    ("radius", lambda: TeacherStudent(_teacher(), 1.0, 4, radius=-1.0)),
    ("radius", lambda: TeacherStudent(_teacher(), 1.0, 4, radius=math.inf)),
    ("beta", lambda: TeacherStudent(_teacher(), -1.0, 4)),
    ("min_tokens", lambda: TeacherStudent(_teacher(), 1.0, 4, min_tokens=0)),
    ("min_tokens", lambda: TeacherStudent(_teacher(), 1.0, 4, min_tokens=5)),
    ("dim", lambda: TeacherStudent(_teacher(3), 1.0, 4, dim=2)),
    ("num_tokens", lambda: TeacherStudent.random(jax.random.key(0), 2, 1, 1, 2, 1.0, num_tokens=0)),
    ("radius", lambda: TeacherStudent.random(jax.random.key(0), 2, 1, 1, 2, 1.0, 3, radius=-2.0)),
    ("depth", lambda: TeacherStudent.random(jax.random.key(0), 2, 0, 1, 2, 1.0, 3)),
    ("min_tokens", lambda: TeacherStudent.random(jax.random.key(0), 2, 1, 1, 2, 1.0, 3, min_tokens=4)),
    ("dim", lambda: Denoising(0, 4)),
    ("num_tokens", lambda: Denoising(2, -1)),
    ("noise", lambda: Denoising(2, 4, noise=-0.1)),
    ("noise", lambda: Denoising(2, 4, noise=math.nan)),
    ("radius", lambda: Denoising(2, 4, radius=0.0)),
    ("clusters", lambda: Denoising(2, 4, clusters=0)),
    ("min_tokens", lambda: Denoising(2, 4, min_tokens=5)),
    ("spread", lambda: Denoising(2, 4, spread=-1.0)),
    ("seed", lambda: Denoising(2, 4, seed=-1)),
    ("dim_x", lambda: InContextRegression(0, 4)),
    ("num_examples", lambda: InContextRegression(2, 0)),
    ("radius", lambda: InContextRegression(2, 4, radius=-1.0)),
    ("noise", lambda: InContextRegression(2, 4, noise=-1.0)),
    ("min_examples", lambda: InContextRegression(2, 4, min_examples=0)),
    ("min_examples", lambda: InContextRegression(2, 4, min_examples=5)),
    ("dim", lambda: TargetMeasure(0, 4)),
    ("num_tokens", lambda: TargetMeasure(2, 0)),
    ("num_points", lambda: TargetMeasure(2, 4, num_points=0)),
    ("radius", lambda: TargetMeasure(2, 4, radius=-1.0)),
    ("bandwidth", lambda: TargetMeasure(2, 4, bandwidth=0.0)),
    ("min_tokens", lambda: TargetMeasure(2, 4, min_tokens=5)),
    ("seed", lambda: TargetMeasure(2, 4, seed=-1)),
    ("batch_size", lambda: Denoising(2, 4).sample(jax.random.key(0), 0)),
    ("batch_size", lambda: InContextRegression(2, 4).sample(jax.random.key(0), -3)),
]


@pytest.mark.parametrize("name, make", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_settings_raise(name, make):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_types_raise_value_error(no_jaxtyping):
    # Without the test-only type checker, users get mfattn's ValueError naming the argument.
    with pytest.raises(ValueError, match="num_tokens"):
        Denoising(2, 2.5)
    with pytest.raises(ValueError, match="teacher"):
        TeacherStudent("not params", 1.0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        Denoising(2, 3).sample(jax.random.key(0), 2.0)
    with pytest.raises(ValueError, match="min_examples"):
        InContextRegression(2, 3, min_examples=True)
