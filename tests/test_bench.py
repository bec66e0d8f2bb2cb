"""The benchmark suite (``mfattn bench``): the quick run and the analytic FLOP counts."""

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfattn import bench


def _matmul(m, n, p):
    """Flops of an (m, n) @ (n, p) product: one multiply and one add per term."""
    return 2 * m * n * p


def test_forward_flops_hand_count():
    # One head of one layer, N = 3 tokens, d = 2, k = 1, counted product by product.
    n, d, k = 3, 2, 1
    projections = 3 * _matmul(n, d, k)  # Q, K, V
    scores = _matmul(n, k, n)  # Q K^T
    values = _matmul(n, n, k)  # W V
    output = _matmul(n, k, d)  # (W V) W_O^T
    softmax = 5 * n * n
    per_head = projections + scores + values + output + softmax
    assert bench.head_flops(n, d, k, "fwd") == per_head == 36 + 18 + 18 + 12 + 45
    assert bench.flops_forward(n, d, k, depth=4, heads=2, batch=3) == 4 * 2 * 3 * per_head


def test_backward_flops_hand_count():
    n, d, k = 5, 3, 2
    ndk, n2k = _matmul(n, d, k), _matmul(n, n, k)
    # fused hand backward: Q, K, V, a (4), G (3), g (4) thin products; six N x N x k products; ~12 N^2.
    fused = 11 * ndk + 6 * n2k + 12 * n * n
    assert bench.head_flops(n, d, k, "field_and_grad") == fused
    assert bench.head_flops(n, d, k, "field") == fused - 4 * ndk
    assert bench.head_flops(n, d, k, "grad") == fused - 3 * ndk
    # reverse mode: two products per forward product, softmax vjp ~5 N^2
    assert bench.head_flops(n, d, k, "vjp") == 2 * (4 * ndk + 2 * n2k) + 5 * n * n
    fwd = bench.head_flops(n, d, k, "fwd")
    assert bench.flops_grad_hand(n, d, k, 2, 3) == 6 * (fwd + fused)
    assert bench.flops_grad_autodiff(n, d, k, 2, 3) == 6 * (fwd + bench.head_flops(n, d, k, "vjp"))
    kept = bench.flops_grad_hand(n, d, k, 2, 3, recompute=False)
    assert kept == 6 * (fwd + fused - 3 * ndk - 2 * n2k - 5 * n * n)
    # limit: K Tsit5 steps (6 new stages each, plus the first) forward and backward, g at K + 1 times
    f_g = bench.head_flops(n, d, k, "grad")
    f_field = bench.head_flops(n, d, k, "field")
    assert bench.flops_limit(n, d, k, steps=4, particles=7, batch=2) == 2 * 7 * (25 * (fwd + f_field) + 5 * f_g)
    # N >> d, k: the ratios the module docstring states (N^2 k terms dominate)
    big, kk = 1 << 16, 256
    hand = bench.flops_grad_hand(big, 1, kk, 1, 1)
    assert hand / bench.flops_grad_autodiff(big, 1, kk, 1, 1) == pytest.approx(16 / 12, rel=0.01)
    assert hand / bench.flops_forward(big, 1, kk, 1, 1) == pytest.approx(16 / 4, rel=0.01)
    with pytest.raises(ValueError, match="part"):
        bench.head_flops(2, 2, 2, "nope")


def _finite_pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_suite(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    payload = bench.run(quick=True, out=str(out), verbose=False)
    elapsed = time.perf_counter() - t0
    assert elapsed < 180  # about 20-30 s on a busy 2-core CPU; generous for shared CI machines
    data = json.loads(out.read_text())
    assert data["mode"] == "quick"
    assert set(data["benchmarks"]) == set(bench.BENCHMARKS)
    assert _finite_pos(data["matmul_gflops"])
    assert "skipped" in data["benchmarks"]["rates"]  # off without --rates
    for name, res in data["benchmarks"].items():
        if name == "rates":
            continue
        assert res["rows"], name
        for row in res["rows"]:
            assert _finite_pos(row["compile_s"]), (name, row)
            if name.startswith("compile_"):
                continue
            assert _finite_pos(row["median_s"]), (name, row)
            assert _finite_pos(row["gflops"]), (name, row)
            assert _finite_pos(row["frac_matmul"]), (name, row)
            assert _finite_pos(row["peak_bytes"]) and row["peak_bytes"] >= row["temp_bytes"] >= 0, (name, row)
    fns = {r["fn"] for r in data["benchmarks"]["grad"]["rows"]}
    assert {"forward", "autodiff"} | {v.name for v in bench.GRAD_VARIANTS} <= fns
    assert {r["fn"] for r in data["benchmarks"]["train"]["rows"]} == {"train_adjoint", "train_autodiff"}
    lk = data["benchmarks"]["limit_kernels"]["rows"]
    assert {(r["op"], r["impl"]) for r in lk} == {
        (o, i) for o in ("velocity", "adjoint_field", "grad_map") for i in ("vmap", "lanes")
    }
    assert all(_finite_pos(r["ratio"]) for r in lk if r["impl"] == "lanes")
    statuses = {t["target"]: t["status"] for t in data["targets"]}
    assert any(t.startswith("forward >=") for t in statuses)
    assert any("fits in 4 GiB" in t for t in statuses)
    assert all(s in ("met", "not run") or s.startswith("gap x") for s in statuses.values())
    assert payload["table"].count("\n") > len(data["targets"])


def test_only_and_cli_args(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--only", "forward", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["benchmarks"]) == ["matmul", "forward"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.run(["nope"], quick=True, out=None, verbose=False)


def test_the_surrogate_ascent_row_is_the_cheap_limits_discrepancy_and_its_input_gradient(getkey, monkeypatch):
    # float64: the benchmark's surrogate ascent step (folded heads) against the per-head model it folds (the value),
    # and its input gradient against a central difference of itself, on non-uniform weights; the cheap limit takes
    # the first SURROGATE_PARTICLES particles of each grid time.
    from mfattn import adjoint, forward, limit
    from mfattn.attention import Attention
    from mfattn.losses import TokenRegression
    from mfattn.params import Params

    monkeypatch.setattr(bench, "SURROGATE_PARTICLES", 6)  # small sizes (the row's are 128 and 32): the same code
    monkeypatch.setattr(bench, "SURROGATE_LAYERS", 3)
    m, n, d, k = 10, 5, 3, 2
    ens = Params(*(jnp.eye(d, k)[None, None] + 0.4 * jax.random.normal(getkey(), (3, m, d, k)) for _ in range(4)))
    x, y, p = (jax.random.normal(getkey(), (1, n, d)) for _ in range(3))
    w = jax.nn.softmax(jax.random.normal(getkey(), (1, n)))
    step = jax.jit(bench.limit_ops(Attention(), 2)["surrogate_ascent_step"])
    value, grad = step(ens, x, w, y, p)
    sur = limit.discretize(jax.tree.map(lambda a: a[:, :6], ens), 3)
    loss = TokenRegression()
    traj = forward(sur, x[0], beta=bench.BETA, weights=w[0])
    ps = adjoint(sur, traj, loss.lions(traj[-1], w[0], y[0]), beta=bench.BETA, weights=w[0])
    want = jnp.sum((traj - p[0][None]) ** 2) + jnp.sum((ps - p[0][None]) ** 2)
    assert value.dtype == jnp.float64 and float(want) > 1.0
    np.testing.assert_allclose(value, want, rtol=1e-12)
    v, h = jax.random.normal(getkey(), (1, n, d)), 1e-6
    slope = (step(ens, x + h * v, w, y, p)[0] - step(ens, x - h * v, w, y, p)[0]) / (2 * h)
    np.testing.assert_allclose(jnp.sum(grad * v[0]), slope, rtol=1e-6)
    assert abs(float(slope)) > 1e-2  # a gradient that is there
