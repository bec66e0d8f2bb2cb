"""Training: the hand path and autodiff give the same parameters; the loop resumes exactly."""

from __future__ import annotations

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn import optim
from mfattn.losses import Loss, TokenRegression
from mfattn.train import TrainState, batch_grad_map, train, train_step


class _Teacher(eqx.Module):
    """A minimal task (independent of mfattn.tasks): padded sequences, teacher transformer targets."""

    teacher: mfattn.Params
    beta: float
    num_tokens: int = eqx.field(static=True)

    @property
    def loss(self) -> Loss:
        return TokenRegression()

    def sample(self, key, batch_size):
        k1, k2 = jax.random.split(key)
        d = self.teacher.dim
        x = jax.random.uniform(k1, (batch_size, self.num_tokens, d), self.teacher.wq.dtype, -0.5, 0.5)
        lengths = jax.random.randint(k2, (batch_size,), 2, self.num_tokens + 1)
        w = (jnp.arange(self.num_tokens)[None, :] < lengths[:, None]).astype(x.dtype)
        w = w / jnp.sum(w, axis=1, keepdims=True)
        y = jax.vmap(lambda xi, wi: mfattn.forward(self.teacher, xi, beta=self.beta, weights=wi)[-1])(x, w)
        return x, w, y


def _setup(depth=2, heads=3, dim=3, head_dim=2, n=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    teacher = mfattn.init_params(k[0], depth, heads, dim, head_dim, init="mean_noise", dtype=jnp.float64)
    student = mfattn.init_params(k[1], depth, heads, dim, head_dim, dtype=jnp.float64)
    return _Teacher(teacher, 1.0, n), student


def test_batch_grad_map_methods_agree():
    task, params = _setup()
    x, w, y = task.sample(jax.random.key(1), 4)
    v1, g1 = batch_grad_map(params, x, w, y, task.loss, beta=1.0, method="adjoint")
    v2, g2 = batch_grad_map(params, x, w, y, task.loss, beta=1.0, method="autodiff")
    np.testing.assert_allclose(v1, v2, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # g is L H times the true gradient of the batch-mean loss
    _, true = mfattn.loss_and_grad(params, x[0], task.loss, beta=1.0, weights=w[0], targets=y[0])
    _, g0 = batch_grad_map(params, x[:1], w[:1], y[:1], task.loss, beta=1.0)
    np.testing.assert_allclose(g0.wq, 6 * true.wq, rtol=1e-10)


@pytest.mark.parametrize(
    "make_opt", [lambda: optim.adamw(1e-2, weight_decay=1e-2), lambda: optim.blockwise_adamw(1e-2)]
)
def test_adjoint_and_autodiff_training_agree_after_50_steps(make_opt):
    task, params = _setup()
    results = {}
    for method in ("adjoint", "autodiff"):
        state, hist = train(
            task,
            params,
            make_opt(),
            steps=50,
            batch_size=3,
            beta=1.0,
            key=jax.random.key(7),
            method=method,
            log_every=25,
            progress=False,
        )
        results[method] = (state.params, hist)
    for a, b in zip(jax.tree.leaves(results["adjoint"][0]), jax.tree.leaves(results["autodiff"][0])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert not np.allclose(results["adjoint"][0].wq, params.wq)  # it did train
    np.testing.assert_allclose(results["adjoint"][1]["loss"], results["autodiff"][1]["loss"], rtol=1e-10)


def test_training_reduces_the_loss():
    task, params = _setup(depth=2, heads=4, dim=3, head_dim=3, n=6)
    _, hist = train(
        task,
        params,
        optim.adamw(3e-2, weight_decay=0.0),
        steps=150,
        batch_size=8,
        beta=1.0,
        key=jax.random.key(0),
        log_every=50,
        progress=False,
    )
    first, last = np.mean(hist["loss"][:5]), np.mean(hist["loss"][-5:])
    assert last < 0.5 * first, (first, last)
    assert len(hist["loss"]) == 150 and len(hist["block_norms"]) == 3
    assert np.asarray(hist["block_norms"][-1]).shape == (4, 2, 4)


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    task, params = _setup()
    kw = dict(batch_size=2, beta=1.0, key=jax.random.key(3), log_every=4, progress=False)
    full, hist_full = train(task, params, optim.blockwise_adamw(1e-2), steps=12, **kw)
    ckpt = tmp_path / "run"
    part, _ = train(task, params, optim.blockwise_adamw(1e-2), steps=8, checkpoint_dir=ckpt, **kw)
    assert int(part.step) == 8 and sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.mfattn"]
    # A new process would start from fresh parameters: they must be ignored in favour of the checkpoint.
    other = jax.tree.map(lambda a: a * 0 + 1, params)
    resumed, hist = train(task, other, optim.blockwise_adamw(1e-2), steps=12, checkpoint_dir=ckpt, **kw)
    assert int(resumed.step) == 12
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    assert hist["step"] == list(range(12)) and hist["loss"] == hist_full["loss"]
    # Running again with the same target does nothing more.
    again, _ = train(task, params, optim.blockwise_adamw(1e-2), steps=12, checkpoint_dir=ckpt, **kw)
    np.testing.assert_array_equal(again.params.wq, full.params.wq)


def _checkpointed(tmp_path, lr=1e-2, key=3, steps=4, **extra):
    task, params = _setup()
    kw = dict(batch_size=2, beta=1.0, key=jax.random.key(key), log_every=4, progress=False)
    kw.update(extra)
    ckpt = tmp_path / "run"
    return train(task, params, optim.adamw(lr), steps=steps, checkpoint_dir=ckpt, **kw), ckpt


def test_resume_with_another_configuration_is_refused(tmp_path):
    (state, _), ckpt = _checkpointed(tmp_path)
    before = (ckpt / "checkpoint.mfattn").read_bytes()
    with pytest.raises(
        ValueError, match=r"different configuration \(differs in optimizer \(its settings, e.g. the lea"
    ):
        _checkpointed(tmp_path, lr=2e-2, steps=8)
    with pytest.raises(ValueError, match=r"differs in key\)"):
        _checkpointed(tmp_path, key=4, steps=8)
    with pytest.raises(ValueError, match=r"differs in batch_size, beta\)"):
        _checkpointed(tmp_path, steps=8, batch_size=3, beta=0.5)
    with pytest.raises(ValueError, match=r"differs in attention.kind\).*delete .*checkpoint.mfattn"):
        _checkpointed(tmp_path, steps=8, attention="l2")
    assert (ckpt / "checkpoint.mfattn").read_bytes() == before  # nothing was overwritten
    # the same configuration with more steps continues
    (more, hist), _ = _checkpointed(tmp_path, steps=8)
    assert int(more.step) == 8 and hist["step"] == list(range(8))


def test_damaged_checkpoints_give_a_clear_error(tmp_path):
    import zipfile

    (state, _), ckpt = _checkpointed(tmp_path)
    path = ckpt / "checkpoint.mfattn"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # cut
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.mfattn is damaged.*delete .* to start the run over"):
        _checkpointed(tmp_path, steps=8)
    path.write_bytes(good[:100] + bytes(8) + good[108:])  # bytes flipped inside state.eqx: the CRC fails
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.mfattn is damaged"):
        _checkpointed(tmp_path, steps=8)
    with zipfile.ZipFile(path, "w") as z:  # a part missing
        with zipfile.ZipFile(__import__("io").BytesIO(good)) as old:
            z.writestr("state.eqx", old.read("state.eqx"))
            z.writestr("config.json", old.read("config.json"))
    with pytest.raises(ValueError, match="lacks history.json"):
        _checkpointed(tmp_path, steps=8)
    with zipfile.ZipFile(path, "w") as z:  # unreadable JSON
        with zipfile.ZipFile(__import__("io").BytesIO(good)) as old:
            z.writestr("state.eqx", old.read("state.eqx"))
            z.writestr("config.json", old.read("config.json"))
            z.writestr("history.json", "{")
    with pytest.raises(ValueError, match="unreadable JSON"):
        _checkpointed(tmp_path, steps=8)
    path.write_bytes(good)
    (more, _), _ = _checkpointed(tmp_path, steps=8)
    assert int(more.step) == 8


def test_old_two_file_checkpoint_and_file_as_dir_are_refused(tmp_path):
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    (ckpt / "state.eqx").write_bytes(b"x")
    (ckpt / "history.json").write_text("{}")
    with pytest.raises(ValueError, match="old format"):
        _checkpointed(tmp_path)
    (tmp_path / "run2").write_text("")
    task, params = _setup()
    with pytest.raises(ValueError, match="is a file"):
        train(
            task,
            params,
            optim.adamw(1e-2),
            steps=1,
            batch_size=2,
            beta=1.0,
            key=jax.random.key(0),
            progress=False,
            checkpoint_dir=tmp_path / "run2",
        )


def test_train_step_is_pure_and_compiles_once():
    task, params = _setup()
    opt = optim.adamw(1e-2)
    batch = task.sample(jax.random.key(0), 2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, batch):
        return train_step(params, opt_state, batch, loss=task.loss, optimizer=opt, beta=1.0)

    s = opt.init(params)
    p1, s1, m1 = step(params, s, batch)
    p2, s2, m2 = step(params, s, batch)
    np.testing.assert_array_equal(p1.wq, p2.wq)
    step(p1, s1, task.sample(jax.random.key(1), 2))
    assert set(m1) == {"loss", "grad_norm", "max_abs_param", "block_norms"}


def test_train_rejects_bad_settings(no_jaxtyping):
    task, params = _setup()
    opt = optim.adamw(1e-2)
    kw = dict(batch_size=2, beta=1.0, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="steps"):
        train(task, params, opt, steps=-1, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        train(task, params, opt, steps=1, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="beta"):
        train(task, params, opt, steps=1, **{**kw, "beta": -1.0})
    with pytest.raises(ValueError, match="method"):
        train(task, params, opt, steps=1, method="sgd", **kw)
    wrong = mfattn.init_params(jax.random.key(0), 2, 3, 4, 2, dtype=jnp.float64)
    with pytest.raises(ValueError, match="dimension"):
        train(task, wrong, opt, steps=1, **kw)
    assert isinstance(TrainState, type)


def test_teacher_student_task_loss_halves():
    """Issue requirement at CI size (the benchmark runs L = 8, H = 8, d = 4 for 300 steps)."""
    from mfattn import tasks

    task = tasks.TeacherStudent.random(
        jax.random.key(0), dim=3, depth=3, heads=2, head_dim=3, beta=1.0, num_tokens=6, dtype=jnp.float64
    )
    params = mfattn.init_params(jax.random.key(1), 3, 4, 3, 3, dtype=jnp.float64)
    _, hist = train(
        task,
        params,
        optim.adamw(3e-2, weight_decay=1e-3),
        steps=120,
        batch_size=16,
        beta=1.0,
        key=jax.random.key(2),
        log_every=60,
        progress=False,
    )
    first, last = np.mean(hist["loss"][:5]), np.mean(hist["loss"][-5:])
    assert last < 0.5 * first, (first, last)
