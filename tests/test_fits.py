"""Rate fits, the seed bootstrap, the summary, plots and table of :mod:`mfattn.fits` (SPEC section 7).

Synthetic data with planted exponents: noiseless fits must recover them to 1e-3, fits under 5% log-normal
noise to ~0.1; every comparison is also checked to be discriminating (the alternative is far off).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mfattn import fits

DEPTHS = (2, 4, 8, 16, 32)
HEADS = (1, 4, 16, 64)
COLUMNS = (
    "sweep optimizer depth heads num_tokens dim seed step pointwise_err uniform_err uniform_test_set "
    "uniform_ascent uniform_source param_gap mc_err mc_flag wall_s"
).split()


def grid():
    L, H = np.meshgrid(DEPTHS, HEADS, indexing="ij")
    return L.ravel().astype(float), H.ravel().astype(float)


def rate(L, H, a, b, alpha, gamma):
    return a / L + b * L**-alpha * H**-gamma


# ------------------------------------------------------------------------------------------------ power_law


def test_power_law_exact():
    x = np.array([1.0, 2.0, 5.0, 10.0, 40.0])
    fit = fits.power_law(x, 3.0 * x**-0.7)
    assert fit["slope"] == pytest.approx(-0.7, abs=1e-12)
    assert fit["intercept"] == pytest.approx(math.log(3.0), abs=1e-12)
    # non-positive entries are ignored, not fitted
    fit = fits.power_law([0.0, 1.0, 2.0, 4.0, 8.0], [5.0, 2.0, 2.0**0.5, 1.0, -1.0])
    assert fit["slope"] == pytest.approx(-0.5, abs=1e-12) and fit["n"] == 3


@pytest.mark.parametrize(
    "x, y",
    [([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [1.0, 0.0]), ([], []), ([-1.0, -2.0], [1.0, 2.0])],
)
def test_power_law_bad_input(x, y):
    with pytest.raises(ValueError, match="distinct positive x"):
        fits.power_law(x, y)


def test_power_law_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        fits.power_law([1.0, 2.0, 3.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------------ fit_rate

TRUTHS = [
    (1.0, 1.0, 1 / 3, 1 / 2),  # Theorem 7
    (0.5, 2.0, 1 / 2, 1 / 2),  # pointwise expectation
    (0.3, 3.0, 0.2, 1.0),
    (1.0, 1.0, 1.2, 0.9),
]


@pytest.mark.parametrize("a, b, alpha, gamma", TRUTHS)
def test_fit_rate_noiseless(a, b, alpha, gamma):
    L, H = grid()
    fit = fits.fit_rate(L, H, rate(L, H, a, b, alpha, gamma))
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-3)
    assert fit["gamma"] == pytest.approx(gamma, abs=1e-3)
    assert fit["a"] == pytest.approx(a, rel=1e-3)
    assert fit["b"] == pytest.approx(b, rel=1e-3)
    assert fit["rmse_log"] < 1e-6 and fit["n"] == L.size


@pytest.mark.parametrize("a, b, alpha, gamma", TRUTHS[:3])
def test_fit_rate_noisy(a, b, alpha, gamma):
    L, H = grid()
    rng = np.random.default_rng(1)
    err = rate(L, H, a, b, alpha, gamma) * np.exp(0.05 * rng.standard_normal(L.shape))
    fit = fits.fit_rate(L, H, err)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.1)
    assert fit["gamma"] == pytest.approx(gamma, abs=0.1)
    assert 0.02 < fit["rmse_log"] < 0.08  # about the noise level, less the 4 fitted parameters


def test_fit_rate_fixed_exponents():
    L, H = grid()
    theorem = rate(L, H, 1.0, 1.0, *fits.THEOREM)
    pointwise = rate(L, H, 0.5, 2.0, *fits.POINTWISE)
    for data, right, wrong in ((theorem, fits.THEOREM, fits.POINTWISE), (pointwise, fits.POINTWISE, fits.THEOREM)):
        good = fits.fit_rate(L, H, data, alpha=right[0], gamma=right[1])
        bad = fits.fit_rate(L, H, data, alpha=wrong[0], gamma=wrong[1])
        assert (good["alpha"], good["gamma"]) == right and (bad["alpha"], bad["gamma"]) == wrong
        assert good["rmse_log"] < 1e-6
        assert bad["rmse_log"] > 0.05
    # one exponent fixed, the other recovered
    fit = fits.fit_rate(L, H, theorem, gamma=0.5)
    assert fit["gamma"] == 0.5 and fit["alpha"] == pytest.approx(1 / 3, abs=1e-3)


def test_fit_rate_respects_bounds():
    L, H = grid()
    fit = fits.fit_rate(L, H, rate(L, H, 1.0, 1.0, 0.5, 2.5), bounds=(0.0, 1.5))
    assert 0.0 <= fit["alpha"] <= 1.5 and fit["gamma"] == pytest.approx(1.5)
    assert fit["rmse_log"] > 1e-3


def test_fit_rate_bad_input():
    L, H = grid()
    e = rate(L, H, 1.0, 1.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="equal lengths"):
        fits.fit_rate(L, H[:-1], e)
    with pytest.raises(ValueError, match="free parameters"):
        fits.fit_rate(L[:3], H[:3], e[:3])
    with pytest.raises(ValueError, match="distinct head counts"):
        fits.fit_rate(L[H == 4], H[H == 4], e[H == 4])
    with pytest.raises(ValueError, match="free parameters"):
        fits.fit_rate(L, H, np.zeros_like(e))
    # a single H is fine once gamma is fixed
    fit = fits.fit_rate(L[H == 4], H[H == 4], e[H == 4], gamma=0.5)
    assert fit["alpha"] == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------------------------------------ bootstrap


def mean_stat(rows):
    return float(np.mean([float(r["value"]) for r in rows]))


def test_bootstrap_covers_truth():
    rng = np.random.default_rng(0)
    rows = [{"seed": str(s), "value": str(2.0 + 0.3 * rng.standard_normal())} for s in range(30) for _ in range(3)]
    res = fits.bootstrap(rows, mean_stat, n_boot=400, seed=1)
    assert res["lo"] < 2.0 < res["hi"]
    assert res["lo"] < res["estimate"] < res["hi"]
    # width about 2 * 1.96 * sd / sqrt(#rows): the interval is neither degenerate nor huge
    assert 0.05 < res["hi"] - res["lo"] < 0.3
    assert len(res["samples"]) == 400 and res["n_skipped"] == 0 and res["note"] is None
    # the same seed gives the same resamples
    assert fits.bootstrap(rows, mean_stat, n_boot=400, seed=1)["samples"] == res["samples"]


def test_bootstrap_resamples_whole_seeds():
    rows = [{"seed": s, "value": float(s)} for s in range(5) for _ in range(4)]

    def stat(rs):
        values = {}
        for r in rs:
            values.setdefault(r["seed"], set()).add(r["value"])
        # every (relabelled) seed keeps its 4 rows, which all come from one original seed
        assert all(len(v) == 1 for v in values.values())
        return {"seeds": float(len(values)), "rows": float(len(rs)), "mean": mean_stat(rs)}

    res = fits.bootstrap(rows, stat, n_boot=50)
    assert all(s["seeds"] == 5.0 and s["rows"] == 20.0 for s in res["samples"])
    assert res["estimate"]["mean"] == 2.0
    assert res["lo"]["mean"] < 2.0 < res["hi"]["mean"]
    assert res["lo"]["seeds"] == res["hi"]["seeds"] == 5.0


def test_bootstrap_skips_degenerate_resamples():
    rows = [{"seed": s, "x": float(s), "y": 2.0 * float(s) + 1.0} for s in (1, 2, 3)]

    def slope(rs):
        return fits.power_law([r["x"] for r in rs], [r["y"] for r in rs])["slope"]

    res = fits.bootstrap(rows, slope, n_boot=200, seed=0)
    # a resample drawing one seed three times (probability 3/27) has a single x: the fit fails
    assert 5 < res["n_skipped"] < 50
    assert len(res["samples"]) == 200 - res["n_skipped"]
    assert f"{res['n_skipped']} of 200 resamples skipped" in res["note"]
    assert np.isfinite(res["lo"]) and res["lo"] <= res["hi"]


def test_bootstrap_one_seed():
    rows = [{"seed": "7", "value": "1.5"}, {"seed": "7", "value": "2.5"}]
    res = fits.bootstrap(rows, mean_stat)
    assert res["estimate"] == res["lo"] == res["hi"] == 2.0
    assert res["samples"] == [] and res["n_seeds"] == 1
    assert "one seed" in res["note"] and "degenerate" in res["note"]
    with pytest.raises(ValueError, match="no rows"):
        fits.bootstrap([], mean_stat)


# ------------------------------------------------------------------------------------------------ summarize

PW = (0.5, 1.0, *fits.POINTWISE)  # pointwise error: a/L + b (L H)^-1/2
UNI = (1.0, 2.0, *fits.THEOREM)  # uniform error: the theorem's rate


def make_rows(seeds=4, sweeps=("LH", "N", "d"), noise=0.03, steps=(0, 5, 10)):
    """Rows as csv.DictReader gives them (all strings), with planted rates."""
    rng = np.random.default_rng(42)
    rows = []

    def add(sweep, opt, L, H, N, d, pw, uni, gap):
        for seed in range(seeds):
            for step in steps:
                z = np.exp(noise * rng.standard_normal(3))
                g = 0.0 if step == 0 else gap * z[2]
                src = "ascent" if (seed + step) % 3 else "test_set"
                values = dict(
                    sweep=sweep,
                    optimizer=opt,
                    depth=L,
                    heads=H,
                    num_tokens=N,
                    dim=d,
                    seed=seed,
                    step=step,
                    pointwise_err=pw * z[0],
                    uniform_err=uni * z[1],
                    uniform_test_set=uni * z[1] * 0.9,
                    uniform_ascent=uni * z[1],
                    uniform_source=src,
                    param_gap=g,
                    mc_err=1e-4,
                    mc_flag=int(seed == 0 and step == 10 and L == 2),
                    wall_s=0.1,
                )
                rows.append({k: str(values[k]) for k in COLUMNS})

    if "LH" in sweeps:
        for L in DEPTHS:
            for H in HEADS:
                add("LH", "adamw", L, H, 16, 8, rate(L, H, *PW), rate(L, H, *UNI), 0.1 * rate(L, H, *UNI))
    if "N" in sweeps:
        for N in (8, 16, 32, 64):
            add("N", "adamw", 8, 4, N, 8, 0.1, 0.2, 0.01)
    if "d" in sweeps:
        for d in (4, 8, 16, 32):
            add("d", "adamw", 8, 4, 16, d, 0.02 * d**0.5, 0.04 * d**0.5, 0.01)
            add("d", "blockwise_adamw", 8, 4, 16, d, 0.1, 0.2, 0.01)
    return rows


@pytest.fixture(scope="module")
def rows():
    return make_rows()


@pytest.fixture(scope="module")
def summary(rows):
    return fits.summarize(rows, n_boot=40)


def test_summarize_structure(rows, summary):
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert set(summary) == {
        "counts",
        "mc_flagged",
        "mc_flagged_final",
        "mc_err_max",
        "steps",
        "final",
        "initial",
        "N",
        "d",
    }
    assert summary["steps"] == {"final": 10, "initial": 0}
    assert summary["counts"]["rows"] == len(rows)
    assert summary["counts"]["seeds"] == 4
    assert summary["counts"]["by_sweep"] == {"LH": 20 * 12, "N": 4 * 12, "d": 8 * 12}
    assert summary["counts"]["points"] == {"LH": 20, "N": 4, "d": 8}
    assert summary["mc_flagged"] == summary["mc_flagged_final"] == len(HEADS)  # seed 0, step 10, L = 2
    final = summary["final"]
    assert final["step"] == 10 and final["optimizer"] == "adamw" and summary["initial"]["step"] == 0
    for kind in ("pointwise_err", "uniform_err", "param_gap"):
        block = final[kind]
        assert {"free", "theorem", "pointwise", "better_fixed", "slope_L", "slope_H", "n_points"} <= set(block)
        assert block["n_points"] == 20
        assert set(block["free"]["ci"]) == {"a", "b", "alpha", "gamma"}
        assert [e["heads"] for e in block["slope_L"]] == list(HEADS)
        assert [e["depth"] for e in block["slope_H"]] == list(DEPTHS)
        assert block["free"]["bootstrap"]["n_seeds"] == 4
    # step 0: the parameter gap is 0 (no training yet), so it is skipped with a reason, not an error
    assert "skipped" in summary["initial"]["param_gap"]
    assert "free" in summary["initial"]["uniform_err"]
    assert set(summary["d"]) == {"adamw", "blockwise_adamw"} and set(summary["N"]) == {"adamw"}


def test_summarize_recovers_planted_rates(rows, summary):
    for step in ("final", "initial"):
        lh = summary[step]
        for kind, (_, _, alpha, gamma), better in (("pointwise_err", PW, "pointwise"), ("uniform_err", UNI, "theorem")):
            free = lh[kind]["free"]
            assert free["alpha"] == pytest.approx(alpha, abs=0.1)
            assert free["gamma"] == pytest.approx(gamma, abs=0.1)
            for name, truth in (("alpha", alpha), ("gamma", gamma)):
                lo, hi = free["ci"][name]
                assert lo <= free[name] <= hi and hi - lo < 0.2
                assert lo - 0.02 < truth < hi + 0.02  # 95% intervals from 4 seeds: a little slack
            assert lh[kind]["better_fixed"] == better
            other = "pointwise" if better == "theorem" else "theorem"
            assert lh[kind][better]["rmse_log"] < 0.5 * lh[kind][other]["rmse_log"]
    # the uniform error's slope in H at fixed L: -gamma b L^-alpha H^-gamma / err, between -1/2 and 0
    for e in summary["final"]["uniform_err"]["slope_H"]:
        assert -0.5 < e["slope"] < -0.2 and e["ci"][0] <= e["slope"] <= e["ci"][1]
    gap = summary["final"]["param_gap"]["free"]
    assert gap["alpha"] == pytest.approx(1 / 3, abs=0.1) and gap["gamma"] == pytest.approx(1 / 2, abs=0.1)
    # N: no dependence planted; d: d^{1/2} for AdamW, none for blockwise AdamW
    n_final = summary["N"]["adamw"]
    assert n_final["num_tokens_values"] == [8, 16, 32, 64] and n_final["fixed"]["depth"] == [8]
    point = [r for r in rows if r["sweep"] == "N" and (r["num_tokens"], r["step"]) == ("8", "10")]
    assert len(point) == 4  # the mean over the seeds at the final step
    assert n_final["uniform_err"]["mean"]["8"] == pytest.approx(np.mean([float(r["uniform_err"]) for r in point]))
    for kind in ("pointwise_err", "uniform_err"):
        assert abs(n_final[kind]["slope"]) < 0.05
        assert summary["d"]["adamw"][kind]["slope"] == pytest.approx(0.5, abs=0.05)
        assert abs(summary["d"]["blockwise_adamw"][kind]["slope"]) < 0.05
        lo, hi = summary["d"]["adamw"][kind]["ci"]
        assert lo < summary["d"]["adamw"][kind]["slope"] < hi and hi - lo < 0.1


def test_summarize_skips_absent_sweeps_and_one_seed():
    rows = make_rows(seeds=1, sweeps=("LH",), steps=(3,))
    s = fits.summarize(rows, n_boot=10)
    assert "N" not in s and "d" not in s
    assert s["steps"] == {"final": 3}
    free = s["final"]["uniform_err"]["free"]
    assert "one seed" in free["bootstrap"]["note"]
    assert free["ci"]["alpha"] == [free["alpha"], free["alpha"]]
    only_n = fits.summarize(make_rows(seeds=2, sweeps=("N",), steps=(0, 4)), n_boot=10)
    assert not {"final", "initial", "d"} & set(only_n) and only_n["N"]["adamw"]["step"] == 4


def test_summarize_mixed_optimizers_on_grid():
    rows = make_rows(seeds=2, sweeps=("LH",), steps=(2,))
    other = [dict(r, optimizer="blockwise_adamw", uniform_err=str(2 * float(r["uniform_err"]))) for r in rows]
    s = fits.summarize(rows + other, n_boot=5)
    assert s["final"]["optimizer"] == "adamw" and "blockwise_adamw" in s["LH_note"]
    by_opt = s["LH_by_optimizer"]
    assert set(by_opt) == {"adamw", "blockwise_adamw"} and by_opt["adamw"]["final"] == s["final"]
    # each optimizer fitted on its own rows: same exponents, b doubled
    a, b = by_opt["adamw"]["final"]["uniform_err"]["free"], by_opt["blockwise_adamw"]["final"]["uniform_err"]["free"]
    assert b["alpha"] == pytest.approx(a["alpha"], abs=1e-6) and b["b"] == pytest.approx(2 * a["b"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ plot, table


def test_plot_writes_pngs(rows, tmp_path):
    paths = fits.plot(rows, tmp_path / "plots")
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["err_vs_H.png", "err_vs_L.png", "err_vs_N.png", "err_vs_d.png", "param_gap.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    # no N or d sweep: those figures are not written
    paths = fits.plot(make_rows(seeds=2, sweeps=("LH",), steps=(0, 1)), tmp_path / "lh_only")
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["err_vs_H.png", "err_vs_L.png", "param_gap.png"]


def test_table(rows):
    text = fits.table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + 20 + 4 + 8  # header, rule, one line per sweep point
    assert lines[0].split()[:6] == ["sweep", "L", "H", "N", "d", "optimizer"]
    first = lines[2].split()
    assert first[:7] == ["LH", "2", "1", "16", "8", "adamw", "4"]
    point = [r for r in rows if r["sweep"] == "LH" and (r["depth"], r["heads"], r["step"]) == ("2", "1", "10")]
    for col, kind in ((7, "pointwise_err"), (8, "uniform_err"), (10, "param_gap")):  # means over the 4 seeds
        assert float(first[col]) == pytest.approx(np.mean([float(r[kind]) for r in point]), rel=1e-3)
    assert float(first[7]) == pytest.approx(rate(2, 1, *PW), rel=0.1)
    assert first[9] == "1t/3a" and first[-1] == "1"  # step 10: seed 2 test set; 0, 1, 3 ascent
    assert sum(line.startswith("d ") for line in lines) == 8
