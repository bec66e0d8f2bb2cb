"""The rates experiment: settings, statistics (on synthetic data with known answers), the run folder, and the
quick configuration end to end (shared with the notebook test through conftest's ``rates_quick_run``)."""

import csv
import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfattn import limit, rates
from mfattn.fits import fit_rate
from mfattn.rates import core, driver, stats
from mfattn.rates.config import RatesConfig, load_config, print_config

# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "text, name",
    [
        ("depths = 4", "depths"),
        ("beta = [1.0]", "beta"),
        ('beta = "1.0"', "beta"),
        ('learning_rate = "0.1"', "learning_rate"),
        ("learning_rate = inf", "learning_rate"),
        ('init = "bogus"', "init"),
        ('control = "false"', "control"),
        ("search_pool = 1", "search_pool"),
        ('ascent_rule = "adam"', "ascent_rule"),
        ("ascent_rule = 1", "ascent_rule"),
        ("search_pilots = -1", "search_pilots"),
        ("search_pilots = 2.0", "search_pilots"),
        ("seeds = 0", "seeds"),
        ("seeds = true", "seeds"),
        ("replicas = 2", "replicas"),
        ("particles = 1001", "particles"),
        ("learning_rate = 0.5\nweight_decay = 3.0", "Lemma 26"),
        ("b1 = 0.999\nb2 = 0.9", "Lemma 43"),
        ("depths = [3, 7, 11, 13]", "depths"),
        ("heads = [3, 4]", "heads"),
        ("sweep_points = [8, 4]", "sweep_points"),
        ("search_particles = 100000", "search_particles"),
        ('attention = {kind = "softmax", depth_exponent = 0.5}', "attention"),
        ("bogus_key = 1", "unknown keys"),
        ("depths = [", "not valid TOML"),
    ],
)
def test_every_bad_setting_is_refused_naming_it(tmp_path, text, name):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises((ValueError, TypeError), match=name):
        load_config(str(path))


def test_print_config_is_valid_toml_that_reads_back_to_the_defaults(tmp_path):
    path = tmp_path / "defaults.toml"
    path.write_text(print_config())
    assert load_config(str(path)) == load_config()
    assert all(f.metadata["doc"] for f in dataclasses.fields(RatesConfig))


def test_shipped_study_configuration_is_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "studies")
    cfg = load_config(os.path.join(root, "rates.toml"))
    assert cfg.seeds >= 32 and cfg.steps >= 40 and cfg.control_particles >= 2**17
    assert max(cfg.control_depths) >= 64 and max(L * H for L in cfg.control_depths for H in cfg.control_heads) >= 4096
    for name in ("sweeps.toml", "sweeps_h16.toml"):  # the N and d sweeps' studies: N in {4, 16, 64}, bootstrap seeds
        sw = load_config(os.path.join(root, name))
        assert {4, 16, 64} <= set(sw.tokens_sweep) and len(sw.dims_sweep) >= 3 and sw.seeds >= 16


# ------------------------------------------------------------------------------------------------ statistics


def _synthetic(a, b, alpha, gamma, seeds, noise, rng, points):
    """Errors of the quadrature model ``sqrt((a/L)^2 + (b L^-alpha H^-gamma)^2)`` with log-normal seed noise."""
    L = np.array([p[0] for p in points], float)[:, None]
    H = np.array([p[1] for p in points], float)[:, None]
    m = np.sqrt((a / L) ** 2 + (b * L**-alpha * H**-gamma) ** 2)
    return m * np.exp(noise * rng.standard_normal((len(points), seeds)))


POINTS = [(L, H) for L in (8, 16, 32, 64) for H in (1, 4, 16, 64)]


def test_fit_recovers_known_exponents_with_bootstrap_intervals_that_cover_them():
    rng = np.random.default_rng(0)
    E = _synthetic(0.5, 3.0, 0.5, 0.5, 32, 0.05, rng, POINTS)
    f = stats.fit_errors(POINTS, E, radius=10.0, mc_ratio=0.3)
    assert f["method"].startswith("percentile bootstrap")
    assert f["alpha_ci"][0] <= 0.5 <= f["alpha_ci"][1] and f["gamma_ci"][0] <= 0.5 <= f["gamma_ci"][1]
    assert f["gamma_ci"][1] - f["gamma_ci"][0] < 0.1


def test_an_unidentified_a_is_reported_and_a_pure_power_law_fitted():
    rng = np.random.default_rng(1)
    E = _synthetic(0.0, 2.0, 0.4, 0.3, 16, 0.02, rng, POINTS)
    f = stats.fit_errors(POINTS, E, radius=10.0, mc_ratio=0.3)
    assert not f["a_identified"] and "not identified" in f["model"]
    assert abs(f["alpha"] - 0.4) < 0.03 and abs(f["gamma"] - 0.3) < 0.03


def test_few_seeds_use_a_jackknife_t_interval_and_two_seeds_none():
    rng = np.random.default_rng(2)
    f = stats.fit_errors(POINTS, _synthetic(0.5, 3.0, 0.5, 0.5, 4, 0.05, rng, POINTS), radius=10.0, mc_ratio=0.3)
    assert "jackknife" in f["method"] and f["gamma_ci"][0] < f["gamma"] < f["gamma_ci"][1]
    f2 = stats.fit_errors(POINTS, _synthetic(0.5, 3.0, 0.5, 0.5, 2, 0.05, rng, POINTS), radius=10.0, mc_ratio=0.3)
    assert f2["gamma_ci"] == [None, None]


def test_saturated_and_flagged_points_are_left_out_and_named():
    rng = np.random.default_rng(3)
    pts = [(1, 1), (2, 2), *POINTS]
    E = _synthetic(0.5, 3.0, 0.5, 0.5, 16, 0.05, rng, pts)
    ratio = np.zeros(len(pts))
    ratio[5] = 0.5
    f = stats.fit_errors(pts, E, radius=1.0, mc_ratio=0.3, mc_ratio_per_point=ratio)
    why = {(d["depth"], d["heads"]): d["why"] for d in f["left_out"]}
    assert "L H <= 4" in why[(1, 1)] and "L H <= 4" in why[(2, 2)] and "flagged" in why[pts[5]]
    assert f["points_used"] == len(pts) - len(why)


def _control(E_fluct, E, euler=None):
    euler = np.array([3.0 / p[0] for p in POINTS]) if euler is None else euler
    return stats.control_summary(POINTS, E, E_fluct=E_fluct, euler=euler, radius=10.0, mc_ratio=0.3,
                                 mc_ratio_per_point=np.zeros(16), fluct_mc_ratio_per_point=np.zeros(16),
                                 reference_particles=1)  # fmt: skip


def test_control_passes_on_the_clt_law_and_fails_on_the_theorem_rate():
    rng = np.random.default_rng(4)
    total = _synthetic(3.0, 5.0, 0.5, 0.5, 32, 0.05, rng, POINTS)
    good = _control(_synthetic(0.0, 5.0, 0.5, 0.5, 32, 0.05, rng, POINTS), total)
    assert good["passed"] and good["preferred"].startswith("pointwise") and good["gamma_half_width"] < 0.05
    assert abs(good["euler"]["order"] - 1.0) < 1e-9 and good["total"]["model"] == stats.QUADRATURE
    bad = _control(_synthetic(0.0, 5.0, 1 / 3, 0.5, 32, 0.05, rng, POINTS), total)
    assert not bad["passed"] and bad["preferred"].startswith("theorem")
    worse = _control(_synthetic(0.0, 5.0, 0.5, 0.3, 32, 0.05, rng, POINTS), total)
    assert not worse["passed"] and "excludes 1/2" in worse["why"]
    # The preference is a test with an uncertainty: alpha's interval at gamma = 1/2. Data too noisy to tell 1/2
    # from 1/3 prefer neither, and the control does not pass on them.
    vague = _control(_synthetic(0.0, 5.0, 0.5, 0.5, 4, 0.6, rng, POINTS), total)
    lo, hi = vague["alpha_at_gamma_half_ci"]
    assert lo < 1 / 3 and hi > 1 / 2 and vague["preferred"].startswith("neither") and not vague["passed"]
    assert good["alpha_at_gamma_half_ci"][0] > 1 / 3 and bad["alpha_at_gamma_half_ci"][1] < 1 / 2


def test_the_quadrature_model_recovers_what_the_linear_sum_misreads():
    """A deterministic Euler bias and a zero-mean fluctuation add in quadrature in the rms over seeds; the linear
    model ``a/L + b L^-alpha H^-gamma`` fitted to such data is biased (the step-0 study's gamma 0.58)."""
    rng = np.random.default_rng(6)
    E = _synthetic(4.0, 5.0, 0.5, 0.5, 32, 0.02, rng, POINTS)
    q = stats.fit_errors(POINTS, E, radius=10.0, mc_ratio=0.3)
    assert abs(q["alpha"] - 0.5) < 0.05 and abs(q["gamma"] - 0.5) < 0.03 and abs(q["a"] - 4.0) < 0.5
    lin = fit_rate(*np.array(POINTS, float).T, stats.rms(E))
    assert abs(lin["gamma"] - 0.5) > 0.05 or abs(lin["alpha"] - 0.5) > 0.05


def test_corrected_power_fit_recovers_exponents_under_a_1_over_L_variance_correction():
    L, H = np.array(POINTS, float).T
    e = 5.5 * (L * H) ** -0.5 * np.sqrt(1 - 4.9 / L)
    f = stats.corrected_power_fit(L, H, e)
    assert abs(f["alpha"] - 0.5) < 1e-6 and abs(f["gamma"] - 0.5) < 1e-6 and abs(f["c"] + 4.9) < 1e-4
    plain = stats.rate_fit(L, H, e, "power", alpha=None, gamma=None)
    assert abs(plain["alpha"] - 0.5) < 1e-6  # rate_fit's power model is the corrected one
    assert stats.corrected_power_fit(L, H, e, alpha=1 / 3, gamma=0.5)["rmse_log"] > 0.05


def test_power_model_fixed_rates_and_euler_order():
    L, H = np.array(POINTS, float).T
    e = 2.0 * (L * H) ** -0.5
    assert stats.rate_fit(L, H, e, "power", alpha=0.5, gamma=0.5)["rmse_log"] < 1e-6  # c found to 1e-6
    assert stats.rate_fit(L, H, e, "power", alpha=1 / 3, gamma=0.5)["rmse_log"] > 0.03
    eo = stats.euler_order([8, 16, 32], [1 / 8 + 1 / 64, 1 / 16 + 1 / 256, 1 / 32 + 1 / 1024])
    assert eo["local_orders"][0] > eo["local_orders"][1] > 1.0 and abs(eo["order"] - 1.0) < 0.1
    with pytest.raises(ValueError, match="model"):
        stats.rate_fit(L, H, e, "linear")


def test_theorem_ratio_slopes():
    rng = np.random.default_rng(5)
    L = np.array([p[0] for p in POINTS], float)[:, None]
    H = np.array([p[1] for p in POINTS], float)[:, None]
    E = 2.0 * (1 / L + L ** (-1 / 3) * H ** (-1 / 2)) * L**-0.2 * np.exp(0.01 * rng.standard_normal((16, 16)))
    tr = stats.theorem_ratio(POINTS, E)
    assert abs(tr["slope_L"] + 0.2) < 0.02 and tr["slope_L_ci"][1] < 0 and abs(tr["slope_H"]) < 0.02
    assert abs(tr["max"] - 2.0 * 8**-0.2) < 0.1


def test_sweep_slopes_recover_a_planted_slope_and_leave_out_flagged_values():
    rng = np.random.default_rng(6)
    vals = [4, 16, 64]
    E = 0.2 * np.array(vals, float)[:, None] ** 0.25 * np.exp(0.05 * rng.standard_normal((3, 16)))
    b = stats.sweep_slopes(vals, E, [0.1, 0.1, 0.1], 0.3)
    assert abs(b["slope"] - 0.25) < 0.03 and b["slope_ci"][0] < 0.25 < b["slope_ci"][1] and not b["left_out"]
    assert "bootstrap" in b["method"]
    # each value's rms over seeds with its interval (the plots' error bars): around the estimate, about the
    # spread's 2 x 1.96 x 0.05 / sqrt(16) ~ 5% of it wide
    for e, (lo, hi) in zip(b["rms_err"], b["rms_err_ci"], strict=True):
        assert lo < e < hi and 0.02 < (hi - lo) / e < 0.1
    E_bad = E.copy()
    E_bad[2] *= 5  # a value whose error is mostly the limit's own Monte-Carlo error
    b = stats.sweep_slopes(vals, E_bad, [0.1, 0.1, 0.9], 0.3)
    assert [(lo["value"], lo["mc_ratio"]) for lo in b["left_out"]] == [(64, 0.9)] and b["values_used"] == [4, 16]
    assert "Monte-Carlo" in b["left_out"][0]["reason"] and abs(b["slope"] - 0.25) < 0.08
    assert "error" in stats.sweep_slopes(vals, E, [0.1, 0.9, 0.9], 0.3)
    sat = stats.sweep_slopes(vals, E, [0.1, 0.1, 0.1], 0.3, radius=float(np.sqrt(np.mean(E[1] ** 2))))
    assert [lo["value"] for lo in sat["left_out"]] == [16, 64] and "saturated" in sat["left_out"][0]["reason"]
    assert "error" in sat and sat["rms_err"] == pytest.approx(list(np.sqrt(np.mean(E**2, axis=1))))


def test_paired_ratio_resamples_the_two_optimizers_seeds_together():
    rng = np.random.default_rng(7)
    E_a = np.exp(rng.standard_normal((3, 16)))  # a large spread over seeds...
    b = stats.paired_ratio([2, 4, 8], E_a, 0.7 * E_a)  # ...that cancels in the paired ratio
    assert b["ratio"] == pytest.approx([0.7] * 3) and b["geomean"] == pytest.approx(0.7)
    for lo, hi in [*b["ratio_ci"], b["geomean_ci"]]:
        assert lo == pytest.approx(0.7) and hi == pytest.approx(0.7)
    unpaired = stats.paired_ratio([2, 4, 8], E_a, 0.7 * E_a[:, rng.permutation(16)])
    assert unpaired["geomean_ci"][1] - unpaired["geomean_ci"][0] > 0.05
    assert "error" in stats.paired_ratio([2], E_a[:1], E_a[:2])


# ------------------------------------------------------------------------------------------------ numerics


def test_batch_means_monte_carlo_error_is_zero_for_identical_replicas_and_positive_otherwise(getkey):
    cfg = load_config(quick=True, overrides={"precision": "float64"})
    task = driver._task(cfg, 3, 2)
    problem = driver._problem(cfg, task, 3, 4)
    reps = driver._replicas(cfg, getkey(), 3, 64, 2)
    same = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), reps)
    disc = driver._discrete(cfg, [0, 1], [(2, 2)], 2, "t")
    xs = jnp.asarray(driver._train_like(cfg, task, getkey(), 2))
    w = jnp.full((3,), 1 / 3)
    e0 = core.evaluate(problem, same, disc, xs, w, 2)
    assert np.allclose(e0.mc, 0.0) and np.allclose(e0.err2_replica, e0.err**2)
    e1 = core.evaluate(problem, reps, disc, xs, w, 2)
    assert np.all(e1.mc > 0) and np.all(e1.err_x <= e1.err + 1e-12) and np.all(e1.err_p <= e1.err + 1e-12)


def test_the_error_splits_at_the_euler_limit(getkey):
    """A discrete model whose heads are the Euler limit's has no fluctuation part; in general the three errors obey
    the triangle inequality ``|fluct - euler| <= err <= fluct + euler``."""
    cfg = load_config(quick=True, overrides={"precision": "float64"})
    task = driver._task(cfg, 3, 2)
    problem = driver._problem(cfg, task, 3, 4)
    reps = driver._replicas(cfg, getkey(), 3, 32, 2)
    same = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), reps)
    own = limit.discretize(jax.tree.map(lambda a: a[0], same), 2, grid=problem.grid)  # (2, 8, d, k)
    disc = (jax.tree.map(lambda a: a[None, None], own),)
    xs = jnp.asarray(driver._train_like(cfg, task, getkey(), 2))
    w = jnp.asarray([0.5, 0.3, 0.2])
    e = core.evaluate(problem, same, disc, xs, w, 2)
    assert np.allclose(e.fluct, 0.0, atol=1e-12) and np.allclose(e.fluct_mc, 0.0)
    assert np.allclose(e.err[0], e.euler, rtol=1e-10) and np.all(e.euler > 1e-6)
    d2 = driver._discrete(cfg, [0, 1], [(2, 1), (2, 4)], 2, "t")
    e = core.evaluate(problem, reps, d2, xs, w, 2)
    eu = np.broadcast_to(e.euler[None], e.err.shape)
    assert np.all(e.err <= e.fluct + eu + 1e-12) and np.all(np.abs(e.fluct - eu) <= e.err + 1e-12)
    assert np.all(e.fluct_mc > 0)


def _search_problem(getkey, seeds):
    """A float64 search instance: 3 tokens, a 64-particle limit, three (L, H) points in two depth groups, 4
    candidates with their exact errors and full-limit paths, an 8-particle cheap limit, the Euler heads."""
    cfg = load_config(quick=True, overrides={"precision": "float64"})
    task = driver._task(cfg, 3, 2)
    problem = driver._problem(cfg, task, 3, 2)
    reps = driver._replicas(cfg, getkey(), 3, 64, 2)
    disc = driver._discrete(cfg, seeds, [(2, 1), (2, 2), (4, 2)], 2, "t")
    cand = jnp.asarray(driver._train_like(cfg, task, getkey(), 4))
    w = jnp.asarray([0.5, 0.3, 0.2])
    exact, paths = core.evaluate_and_paths(problem, reps, disc, cand, w, 4)
    sur = core.surrogate(reps, 8, 4, problem.grid)
    return problem, reps, disc, cand, w, np.asarray(exact.err), paths, sur, core.euler_heads(reps, disc, problem.grid)


def test_search_never_lowers_the_estimate_and_reports_its_gain(getkey):
    problem, reps, disc, cand, w, exact, paths, sur, euler = _search_problem(getkey, [0, 1])
    calls = []

    def full(s, p, x):  # the full limit's verdict on each round's maximisers
        calls.append(len(s))
        return driver._evaluate_at(problem, reps, disc, euler, s, p, x, w, 4, chunk=2, progress=None)

    kw = dict(radius=1.0, starts=1, step_size=0.1, tol=0.05)
    res = rates.search.sup_search(problem, sur, disc, cand, paths, exact, w, 4, full, steps=2, rounds=2, **kw)
    assert res.value.shape == (2, 3) and np.all(res.value >= res.candidate_value)
    assert np.allclose(res.candidate_value, exact.max(-1))
    assert np.all(res.converged == (res.gain < 0.05))
    assert np.all(np.linalg.norm(res.argmax, axis=-1) <= 1.0 + 1e-9)  # the search stays in the ball
    # The estimate is an exact value: the full limit's error at the reported maximiser, never the surrogate's.
    ss, pp = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    again = driver._evaluate_at(problem, reps, disc, euler, ss.ravel(), pp.ravel(), res.argmax[ss, pp].reshape(6, 3, 2),
                                w, 4, chunk=2, progress=None)  # fmt: skip
    np.testing.assert_allclose(again.err.reshape(2, 3), res.value, rtol=1e-10)
    assert np.all(res.value == np.fmax(res.candidate_value, res.search_value))
    assert calls[0] == 6 and sum(calls) == 6 + int(np.sum(res.rounds == 2))  # one exact row per live pair and round
    # The corrected surrogate is exact at its starts: with no ascent step, every start's value is its exact error
    # (the uncorrected 8-particle surrogate is not), and so is the full limit's at the unmoved start.
    res0 = rates.search.sup_search(problem, sur, disc, cand, paths, exact, w, 4, full, steps=0, rounds=1, **kw)
    assert np.allclose(res0.value, exact.max(-1), rtol=1e-10) and np.all(res0.gain == 0)
    np.testing.assert_allclose(res0.surrogate_value, res0.search_value, rtol=1e-10)
    pg = rates.search.point_gain(res.value, res.gain)
    assert pg.shape == (3,) and np.all(pg >= 0) and np.all(pg <= np.nanmax(res.gain, axis=0) + 1e-12)
    # A point's gain is that of the rms over seeds: seeds at 1 (no gain) and 2 (from 1) give sqrt(5 / 2) - 1.
    assert np.isclose(rates.search.point_gain([1.0, 2.0], [0.0, 1.0]), np.sqrt(2.5) - 1)
    # A subset of the trained draws (the pilots, or the reported seeds) searched through seed_rows: seed 1 alone,
    # with the programs of both, searches as beside seed 0 (its exact rows are asked for by its row, 1).
    seen = []
    one = rates.search.sup_search(problem, sur, disc, cand, paths, exact[1:], w, 4,
                                  lambda s, p, x: seen.append(set(s)) or full(s, p, x),
                                  steps=2, rounds=2, seed_rows=[1], **kw)  # fmt: skip
    np.testing.assert_allclose(one.value, res.value[1:], rtol=1e-10)
    np.testing.assert_array_equal(one.rounds, res.rounds[1:])
    assert seen and all(s == {1} for s in seen)
    with pytest.raises(ValueError, match="seed_rows"):
        rates.search.sup_search(problem, sur, disc, cand, paths, exact, w, 4, full, steps=2, rounds=1,
                                seed_rows=[1], **kw)  # fmt: skip
    grp, g = rates.search.point_layout(disc)
    assert list(grp) == [0, 0, 1] and list(g) == [0, 1, 0]
    rows, idx = jnp.asarray([0, 1]), jnp.asarray([1, 0])
    zero = tuple(jnp.zeros((2, *a.shape[1:])) for a in paths)
    raw, _ = core.surrogate_values_and_grads(problem, sur, disc[0], cand[:2], w, rows, idx, zero, 4)
    assert not np.allclose(raw, exact[[0, 1], [1, 0], [0, 1]], rtol=1e-3)
    # The rows run ``batch`` at a time: all at once, in blocks of 2 (the last a remainder) or one by one, the same
    # values and gradients (float64, 1e-12).
    rows, idx = jnp.asarray([0, 1, 1, 0, 1]), jnp.asarray([1, 0, 1, 0, 1])
    xs, offs = cand[jnp.asarray([0, 1, 2, 3, 0])], tuple(0.01 * jnp.ones((5, *a.shape[1:])) for a in paths)
    out = [
        core.surrogate_values_and_grads(problem, sur, disc[0], xs, w, rows, idx, offs, 4, batch=b) for b in (5, 2, 1)
    ]
    for got in out[1:]:
        for a, b in zip(got, out[0], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # ``count``: only the batches holding the first ``count`` rows run (3 rows in batches of 2: rows 0-3), the rest
    # are 0; one compiled program for every count.
    for c in (3, 5, 0):
        v, g = core.surrogate_values_and_grads(
            problem, sur, disc[0], xs, w, rows, idx, offs, 4, batch=2, count=jnp.asarray(c)
        )
        run = min(5, -(-c // 2) * 2)
        np.testing.assert_allclose(v[:run], out[0][0][:run], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g[:run], out[0][1][:run], rtol=1e-12, atol=1e-14)
        assert not np.any(v[run:]) and not np.any(g[run:])
    with pytest.raises(ValueError, match="batch"):
        core.surrogate_values_and_grads(problem, sur, disc[0], xs, w, rows, idx, offs, 4, batch=0)


def test_pooled_search_offers_each_maximiser_to_every_point_of_its_seed_and_no_other_seed(getkey):
    problem, reps, disc, cand, w, exact, paths, sur, euler = _search_problem(getkey, [0, 1, 2])

    def rows(d, eu):
        return lambda s, p, x: driver._evaluate_at(problem, reps, d, eu, s, p, x, w, 4, chunk=2, progress=None)

    def seed_rows(d, eu):
        return lambda s, x: driver._evaluate_seed_at(problem, reps, d, eu, s, x, w, 4, chunk=2, progress=None)

    # Every point of a seed at one limit solve per input: the numbers of one row at a time.
    xs, s = np.asarray(cand[:3]), np.array([2, 0, 2])
    every = seed_rows(disc, euler)(s, xs)
    for p in range(3):
        for a, b in zip(every, rows(disc, euler)(s, np.full(3, p), xs)):
            np.testing.assert_allclose(np.asarray(a)[:, p], b, rtol=1e-10)

    def run(d, eu, ex, pool, rounds):
        return rates.search.sup_search(
            problem, sur, d, cand, paths, ex, w, 4, rows(d, eu), radius=1.0, starts=1, steps=2, step_size=0.1,
            rounds=rounds, tol=0.05, exact_seed=seed_rows(d, eu), pool=pool,
        )  # fmt: skip

    own, pooled = run(disc, euler, exact, False, 1), run(disc, euler, exact, True, 1)
    # One round climbs the same paths in both: the pool only adds offers, never lowering an estimate.
    assert np.all(pooled.value >= own.value) and not np.any(own.pooled) and np.any(pooled.pooled)
    np.testing.assert_allclose(pooled.value[~pooled.pooled], own.value[~pooled.pooled], rtol=1e-10)
    pooled = run(disc, euler, exact, True, 3)
    assert np.all(pooled.value == np.fmax(pooled.candidate_value, pooled.search_value))
    assert np.all(pooled.converged == (pooled.gain < 0.05)) and np.all(pooled.rounds >= 1)
    # Each estimate is the exact error of its own row at its reported input (wherever the input came from).
    ss, pp = (a.ravel() for a in np.meshgrid(np.arange(3), np.arange(3), indexing="ij"))
    again = rows(disc, euler)(ss, pp, pooled.argmax[ss, pp])
    np.testing.assert_allclose(again.err.reshape(3, 3), pooled.value, rtol=1e-10)
    assert np.all(np.isnan(pooled.surrogate_value[pooled.pooled]))  # climbed on another row's objective
    # Seeds are not pooled: the first seed alone searches exactly as beside the others.
    first = tuple(jax.tree.map(lambda a: a[:1], g) for g in disc)
    alone = run(first, core.euler_heads(reps, first, problem.grid), exact[:1], True, 3)
    np.testing.assert_allclose(alone.value, pooled.value[:1], rtol=1e-10)
    np.testing.assert_array_equal(alone.rounds, pooled.rounds[:1])


def test_the_maximisers_rows_equal_the_full_evaluation(getkey):
    """:func:`core.evaluate_rows` (one row per input) gives the numbers of :func:`core.evaluate` (every seed and point
    at every input) for its row."""
    cfg = load_config(quick=True, overrides={"precision": "float64"})
    task = driver._task(cfg, 3, 2)
    problem = driver._problem(cfg, task, 3, 2)
    reps = driver._replicas(cfg, getkey(), 3, 64, 2)
    disc = driver._discrete(cfg, [0, 1], [(2, 1), (2, 2), (4, 2)], 2, "t")
    xs = np.asarray(driver._train_like(cfg, task, getkey(), 6)).reshape(2, 3, 3, 2)  # one input per (seed, point)
    w = jnp.asarray([0.5, 0.3, 0.2])
    ss, pp = (a.ravel() for a in np.meshgrid(np.arange(2), np.arange(3), indexing="ij"))
    euler = core.euler_heads(reps, disc, problem.grid)
    rows = driver._evaluate_at(problem, reps, disc, euler, ss, pp, xs[ss, pp], w, 4, chunk=2, progress=None)
    rows = core.RowErrors(*(np.asarray(a).reshape(2, 3) for a in rows))
    full = core.evaluate(problem, reps, disc, jnp.asarray(xs.reshape(6, 3, 2)), w, 4)
    diag = np.arange(6).reshape(2, 3)
    pick = lambda a: np.take_along_axis(np.asarray(a), diag[..., None], -1)[..., 0]  # noqa: E731
    np.testing.assert_allclose(rows.err, pick(full.err), rtol=1e-10)
    np.testing.assert_allclose(rows.fluct, pick(full.fluct), rtol=1e-10)
    np.testing.assert_allclose(rows.mc, np.asarray(full.mc)[np.arange(3)[None], diag], rtol=1e-10)


# ------------------------------------------------------------------------------------------------ end to end


def test_quick_run_writes_every_summary_key(rates_quick_run):
    cfg, out, summary = rates_quick_run
    for name in ("results.csv", "control.csv", "training.csv", "summary.json", "config.json", "err_vs_L.png"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert set(s["positive_control"]) >= {"passed", "gamma", "gamma_ci", "alpha", "alpha_ci", "preferred",
                                          "reference_particles", "total", "euler"}  # fmt: skip
    assert set(s["monte_carlo"]) >= {"particles", "replicas", "estimate", "max_ratio"}
    assert set(s["sup_search"]) >= {"final_gain", "converged", "pilots", "rows_from_pilots", "pilot_final_gain"}
    assert s["sup_search"]["pilots"] == cfg.search_pilots == 1
    assert set(s["training"]) >= {"steps", "sign_fraction", "depth_spread"}
    for kind in ("pointwise", "uniform", "pointwise_fluctuation", "uniform_fluctuation"):
        assert set(s["fits"][kind]) >= {"method", "seeds"}
    assert "order" in s["fits"]["euler"] or "error" in s["fits"]["euler"]
    assert set(s["theorem_ratio"]) >= {"max", "slope_L", "slope_L_ci", "slope_H", "slope_H_ci"}
    rows = rates.io.folder(cfg, out).rows()
    assert len(rows) == cfg.seeds * len(cfg.points)
    assert all(float(r["uniform_err"]) >= float(r["uniform_test_set"]) for r in rows)
    assert all(float(r["uniform_fluct"]) >= float(r["pointwise_fluct"]) * (1 - 1e-9) for r in rows)
    assert all(float(r["pointwise_err"]) <= float(r["pointwise_fluct"]) + float(r["pointwise_euler"]) + 1e-9
               for r in rows)  # fmt: skip
    assert "positive control" in summary["table"]


def test_resume_recomputes_nothing_and_a_cut_row_is_recomputed(rates_quick_run, tmp_path, monkeypatch):
    cfg, out, _ = rates_quick_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    calls = []
    monkeypatch.setattr(driver, "run_group", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(driver, "run_control", lambda *a, **k: calls.append(a))
    rates.run(cfg, str(copy), compile_ahead=False)
    assert calls == []
    text = (copy / "results.csv").read_text()
    (copy / "results.csv").write_text(text[: len(text) - 7])  # a crash mid-write
    messages = []
    rates.run(cfg, str(copy), log=messages.append, compile_ahead=False)  # run_group is replaced: nothing to compile
    assert len(calls) == 1 and calls[0][2] == [cfg.seeds - 1]  # the cut row (the last seed's) is recomputed
    assert any("incomplete" in m for m in messages)


def test_a_folder_from_before_the_ascent_rule_reads_as_the_fixed_rule(rates_quick_run):
    """A run folder whose config.json predates ``ascent_rule`` ran the fixed-step ascent: resuming it with the new
    default (monotone) is refused naming the setting, and with ``ascent_rule = "fixed"`` it is the same run."""
    cfg, out, _ = rates_quick_run
    stored = {k: v for k, v in rates.io.identity(cfg).items() if k != "ascent_rule"}
    assert cfg.ascent_rule == "monotone"
    assert rates.io.folder(cfg, out).differences(stored) == ["ascent_rule"]
    assert rates.io.folder(dataclasses.replace(cfg, ascent_rule="fixed"), out).differences(stored) == []
    # Likewise one that predates ``search_pilots`` ran without pilots.
    stored = {k: v for k, v in rates.io.identity(cfg).items() if k != "search_pilots"}
    assert cfg.search_pilots == 1
    assert rates.io.folder(cfg, out).differences(stored) == ["search_pilots"]
    assert rates.io.folder(dataclasses.replace(cfg, search_pilots=0), out).differences(stored) == []


def test_a_changed_statistical_setting_is_refused_and_more_seeds_extend(rates_quick_run, tmp_path, monkeypatch):
    cfg, out, _ = rates_quick_run
    with pytest.raises(ValueError, match="beta"):
        rates.check_folder(dataclasses.replace(cfg, beta=2.0), out)
    rates.check_folder(dataclasses.replace(cfg, seeds=cfg.seeds + 1, shard_seeds=False), out)  # allowed
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    seen = []
    new_origin = {"worst_origin_counts": {"sphere": 1}}  # what the new seed's row would add
    monkeypatch.setattr(driver, "run_group", lambda cfg_, g, seeds, *a, **k: seen.append(seeds) or dict(new_origin))
    monkeypatch.setattr(driver, "run_control", lambda cfg_, seeds, *a, **k: seen.append(seeds))
    key = next(k for k in json.load(open(os.path.join(out, "diagnostics.json"))) if k.startswith("LH/"))
    before = json.load(open(os.path.join(out, "diagnostics.json")))[key]["worst_origin_counts"]
    s = rates.run(dataclasses.replace(cfg, seeds=cfg.seeds + 1), str(copy), compile_ahead=False)
    assert seen == [[cfg.seeds]]  # only the new seed is computed, of the trained models (the control has its own)
    # The extension's origin counts add to the folder's; the summary gives them only if they count every row.
    after = json.load(open(copy / "diagnostics.json"))[key]["worst_origin_counts"]
    assert after == {**before, "sphere": before.get("sphere", 0) + 1} and sum(before.values()) == len(
        [r for r in csv.DictReader(open(os.path.join(out, "results.csv"))) if r["sweep"] == "LH"]
    )
    assert s["sup_search"]["worst_origin_counts"] is None  # one count more than the rows (no row was written)
    seen.clear()
    rates.run(dataclasses.replace(cfg, control_seeds=cfg.control_seeds + 2), str(copy), compile_ahead=False)
    assert seen == [[cfg.control_seeds, cfg.control_seeds + 1]]  # only the control's new seeds


def test_report_rebuilds_the_summary_from_the_files(rates_quick_run, tmp_path):
    cfg, out, summary = rates_quick_run
    again = rates.report(out)
    assert again["fits"]["uniform"].get("alpha") == summary["fits"]["uniform"].get("alpha")
    assert math.isfinite(again["training"]["depth_spread"])
    origins = again["sup_search"]["worst_origin_counts"]  # every row counted once, by a family (never "pilot")
    assert sum(origins.values()) == again["sup_search"]["rows"] and set(origins) <= set(driver.FAMILIES)
    # what only the run knew (versions, device, wall time, the fits' time) is kept from the summary it wrote
    with open(os.path.join(out, "summary.json")) as f:
        written = json.load(f)
    for key in rates.RUN_RECORD:
        assert written[key] == json.loads(json.dumps(summary[key])), key
    assert written["timings_s"]["fits"] == summary["timings_s"]["fits"]
    # an unreadable summary (a run cut while writing it) is rebuilt, without the record
    cut = str(tmp_path / "cut")
    shutil.copytree(out, cut)
    with open(os.path.join(cut, "summary.json"), "w") as f:
        f.write('{"versions": {')
    rates.report(cut)
    with open(os.path.join(cut, "summary.json")) as f:
        rebuilt = json.load(f)
    assert "versions" not in rebuilt
    assert rebuilt["fits"]["uniform"].get("alpha") == summary["fits"]["uniform"].get("alpha")


def test_compiling_ahead_changes_no_number_and_compiles_each_program_once(tmp_path):
    """Each group's programs compile on a second thread while earlier phases run (driver.prepare): the same rows as
    without, and no program compiled twice (the run's calls find the programs compiled ahead in JAX's cache)."""
    # The pooled search (search_pool) runs the exact rows' programs, no other.
    cfg = dataclasses.replace(
        rates.load_config(quick=True), control=False, depths=[2], heads=[1, 2], seeds=2, tokens_sweep=[3],
        sweep_points=[[2, 1]], search_pool=True,
    )  # fmt: skip
    names = {"train_step", "limit_replica_paths", "_errors_from_paths", "euler_heads", "surrogate_paths",
             "surrogate_values_and_grads", "_rows_from_paths"}  # fmt: skip
    counts = {}

    def listen(event, duration, fun_name=None, **kw):
        name = (fun_name or "").removeprefix("jit(").removesuffix(")")
        if event.endswith("backend_compile_duration") and name in names:
            counts[name] = counts.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        runs = {}
        for ahead in (False, True):
            jax.clear_caches()
            counts.clear()
            out = str(tmp_path / f"ahead{int(ahead)}")
            s = rates.run(cfg, out, compile_ahead=ahead)
            runs[ahead] = (dict(counts), open(os.path.join(out, "results.csv")).read(), s)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert runs[True][0] == runs[False][0] and set(runs[True][0]) == names
    assert runs[True][0]["train_step"] == 2  # one per group: LH, and N = 3
    assert runs[True][1] == runs[False][1] and runs[True][2]["sup_search"]["pooled"] is True
    ahead = [t for k, t in runs[True][2]["timings_s"].items() if k not in ("fits", "control")]
    assert len(ahead) == 2 and all(t["compiled ahead on a second thread (not in the wall time)"] > 0 for t in ahead)


def test_pilots_join_the_candidates_and_leave_each_seeds_rows_its_own():
    """``search_pilots``: pilot draws (their own stream) trained beside the seeds, searched first, their maximisers
    added to every seed's candidates. A seed's rows are the same whichever other seeds run beside it (seed 1 after
    seed 0, or first and before seed 2: the pilots' search and maximisers do not depend on the seed batch); the
    pilots change no trained model (the pointwise errors are those of a run without pilots) and only add candidates
    (the best candidate value never falls). Four trained draws in every run (seeds and pilots): one set of compiled
    programs serves all three."""
    cfg = dataclasses.replace(
        rates.load_config(quick=True), control=False, depths=[2], heads=[1, 2], search_pilots=2, ascent_steps=2,
        search_rounds=2,
    )  # fmt: skip
    group = driver.groups(cfg)[0]

    def rows(c, seeds):
        out, diag = [], None
        diag = driver.run_group(c, group, seeds, out.append, lambda r: None)
        return {(r["seed"], r["depth"], r["heads"]): r for r in out}, diag

    both, diag = rows(cfg, [0, 1])
    other, _ = rows(cfg, [1, 2])
    plain, diag0 = rows(dataclasses.replace(cfg, search_pilots=0), [0, 1, 2, 3])
    assert diag["pilots"] == 2 and 1 <= diag["pilot_candidates"] <= 2 * len(group.points)
    assert "pilots" not in diag0 and "pilot search" in diag["timings_s"]
    shared = [key for key in other if key in both]
    assert shared and all(key[0] == 1 for key in shared)
    for key in shared:
        for col in ("pointwise_err", "uniform_err", "uniform_test_set", "uniform_search", "worst_family"):
            assert other[key][col] == both[key][col], (key, col)
    for key, r in both.items():
        assert r["pointwise_err"] == plain[key]["pointwise_err"] and r["param_gap"] == plain[key]["param_gap"]
        assert r["uniform_test_set"] >= plain[key]["uniform_test_set"]
        assert r["uniform_err"] >= r["uniform_test_set"]
        assert (r["uniform_source"] == driver.PILOT) <= (r["worst_family"] == driver.PILOT)
    assert any(r["worst_family"] == driver.PILOT for r in both.values())

    # Each row's worst input by the family its climb began in, a pilot's path followed back to its start.
    def counts(rs):
        out = {}
        for r in rs:
            out[r["worst_family"]] = out.get(r["worst_family"], 0) + 1
        return out

    assert diag0["worst_origin_counts"] == counts(plain.values())
    origins, direct = diag["worst_origin_counts"], counts(both.values())
    assert sum(origins.values()) == len(both) and set(origins) <= set(driver.FAMILIES)
    assert all(origins.get(f, 0) >= direct.get(f, 0) for f in driver.FAMILIES)
    # The pilots are not seeds: their draws come from their own stream.
    d_seed = driver._draws(cfg, [0], 0, group.points, cfg.dim)
    d_pil = driver._draws(cfg, [0], 1, group.points, cfg.dim)
    assert d_pil[0].wq.shape[0] == 2 and np.array_equal(d_pil[0].wq[0], d_seed[0].wq[0])
    assert not np.allclose(d_pil[0].wq[1], d_seed[0].wq[0])


def test_the_n_and_d_sweeps_run_end_to_end_with_slopes_and_paired_ratios(tmp_path):
    """The sweeps' groups (other N; other d under both optimizers) through the driver, the summary and the plots."""
    cfg = dataclasses.replace(
        rates.load_config(quick=True),
        control=False,
        depths=[2],
        heads=[1],
        seeds=3,
        sweep_points=[[2, 1]],
        tokens_sweep=[2, 4],
        dims_sweep=[2, 3],
    )
    out = str(tmp_path / "sweeps")
    s = rates.run(cfg, out)
    rows = rates.io.folder(cfg, out).rows()
    assert sorted({(r["sweep"], r["optimizer"], r["num_tokens"], r["dim"]) for r in rows}) == [
        ("LH", "adamw", "4", "2"),
        ("N", "adamw", "2", "2"),
        ("N", "adamw", "4", "2"),
        ("d", "adamw", "4", "2"),
        ("d", "adamw", "4", "3"),
        ("d", "blockwise_adamw", "4", "2"),
        ("d", "blockwise_adamw", "4", "3"),
    ]
    n = s["fits"]["N"]["adamw L=2 H=1 pointwise_err"]
    assert n["values"] == [2, 4] and len(n["rms_err"]) == 2 and len(n["mc_ratio"]) == 2
    assert "slope" in n or "error" in n
    u = s["fits"]["N"]["adamw L=2 H=1 uniform_err"]
    assert len(u["search_gain"]) == 2
    # The sweeps' own search convergence, beside the (L, H) grid's, in the summary and the printout.
    gains = [g for b in (*s["fits"]["N"].values(), *s["fits"]["d"].values()) for g in b.get("search_gain", [])]
    assert s["sup_search"]["sweeps_final_gain"] == max(gains)
    assert "supremum search in the N and d sweeps" in s["table"]
    pr = s["fits"]["d"]["blockwise_adamw / adamw L=2 H=1 uniform_err"]
    assert len(pr["ratio"]) == 2 and len(pr["ratio_ci"]) == 2 and "paired" in pr["method"]
    for opt in ("adamw", "blockwise_adamw"):
        assert s["fits"]["d"][f"{opt} L=2 H=1 pointwise_err"]["values"] == [2, 3]
    # the same N = 4, d = 2 model under AdamW in three groups: the same draws and data, the same numbers
    same = [float(r["pointwise_err"]) for r in rows
            if r["optimizer"] == "adamw" and (r["num_tokens"], r["dim"], r["seed"]) == ("4", "2", "0")]  # fmt: skip
    assert len(same) == 3 and max(same) - min(same) <= 1e-6 * max(same)
    assert "paired ratio" in s["table"] and "slope in N" in s["table"] or "N sweep" in s["table"]
    for name in ("err_vs_N.png", "err_vs_d.png"):
        assert os.path.exists(os.path.join(out, name))
