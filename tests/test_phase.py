"""The clustering phase diagram on the circle (mfattn.phase, ``mfattn phase``)."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfattn
from mfattn import cli
from mfattn.phase import (
    QUICK,
    PhaseConfig,
    aligned_fractions,
    first_time,
    identity_params,
    parse_betas,
    phase_diagram,
    uniform_on_sphere,
)


def reference_fractions(x0, beta, time, steps, threshold):
    """Independent NumPy loop: ``x <- (x + h F) / |x + h F|``, ``F_i = sum_j softmax_j(beta <x_i, x_j>) x_j``,
    ``h = time / steps``; the fraction of aligned pairs of distinct tokens after every step."""
    x, h, n = np.array(x0), time / steps, x0.shape[0]
    out = []
    for step in range(steps + 1):
        cos = x @ x.T
        out.append((np.sum(cos > 1 - threshold) - n) / (n * (n - 1)))
        if step == steps:
            return np.array(out), x
        s = beta * cos
        w = np.exp(s - s.max(axis=1, keepdims=True))
        y = x + h * (w / w.sum(axis=1, keepdims=True)) @ x
        x = y / np.linalg.norm(y, axis=1, keepdims=True)


def test_library_dynamics_is_the_normalised_residual_with_time_step_T_over_L():
    """``mfattn.forward`` with identity heads, W_O = T I and the sphere residual is the Euler scheme of
    step T / L for Geshkovski et al.'s dynamics: equal to the NumPy loop, tokens on the circle."""
    n, steps, time, beta, threshold = 12, 40, 8.0, 3.0, 5e-2
    x0 = uniform_on_sphere(jax.random.key(1), (2, n, 2))
    params = identity_params(steps, 2, time)
    assert params.wq.shape == (steps, 1, 2, 2)
    traj = mfattn.forward(params, x0[0], beta=beta, attention=mfattn.Attention(residual="sphere"))
    frac = aligned_fractions(params, x0, jnp.array([0.0, beta]), threshold)  # (B, S, L + 1)
    assert frac.shape == (2, 2, steps + 1)
    expected, x_end = reference_fractions(np.asarray(x0[0]), beta, time, steps, threshold)
    np.testing.assert_allclose(traj[-1], x_end, atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm(traj, axis=-1), 1.0, atol=1e-14)
    np.testing.assert_allclose(frac[1, 0], expected, atol=1e-14)
    assert expected[-1] > expected[0] + 0.2  # the tokens do move together over [0, T]


def test_time_to_90_percent_grows_with_beta():
    """Geshkovski et al.'s picture, quantitatively: with N = 32 tokens on the circle and 16 random initial
    conditions, the mean time to 90% aligned pairs (censored at T = 40, so a lower bound where it is not
    reached) grows with beta over beta = 0, 2, 4: quick collapse at beta = 0 (every seed by t ~ 12),
    metastable multi-cluster states for beta >= 2. Measured (float64): 8.3, 26.7, 39.5 (100%, 62% and 6% of
    the seeds reach 90% by T); the final aligned fraction falls 1.0, 0.81, 0.57. The asserted margins are
    a factor 2 and 5 time units, and 0.1 in the final fraction."""
    cfg = PhaseConfig(tokens=32, betas=(0.0, 2.0, 4.0), time=40.0, steps=400, seeds=16)
    result = phase_diagram(cfg)
    t90 = result["t_level_censored"]
    assert result["fraction"].shape == (3, 16, 401)
    assert result["reached"][0] == 1.0 and np.max(result["t_level_seeds"][0]) < 20.0
    assert t90[1] > 2.0 * t90[0], t90
    assert t90[2] > t90[1] + 5.0, t90
    assert result["final"][0] > 0.99 > result["final"][1] > result["final"][2] + 0.1, result["final"]
    # at the start nothing is aligned (uniform points, threshold 1e-2: about 4.5% of pairs by chance)
    assert np.all(result["mean"][:, 0] < 0.1)


def test_first_time_and_parse_betas():
    times = np.linspace(0.0, 4.0, 5)
    fr = np.array([[0.0, 0.5, 0.95, 0.8, 1.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_array_equal(first_time(times, fr, 0.9), [2.0, np.inf])
    assert parse_betas("0,1, 2.5") == (0.0, 1.0, 2.5)
    assert parse_betas("0:9:4") == (0.0, 3.0, 6.0, 9.0)
    with pytest.raises(ValueError, match="betas"):
        parse_betas("0:9")
    with pytest.raises(ValueError, match="tokens"):
        PhaseConfig(tokens=1)
    with pytest.raises(ValueError, match="betas"):
        PhaseConfig(betas=(-1.0,))


def test_phase_command_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "phase"
    assert cli.main(["phase", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "t(mean>=90%)" in printed and "phase.png" in printed
    assert (out / "phase.png").stat().st_size > 10_000
    summary = json.loads((out / "phase.json").read_text())
    nb, nt = len(QUICK.betas), QUICK.steps + 1
    assert summary["betas"] == list(QUICK.betas) and len(summary["times"]) == nt
    assert np.asarray(summary["fraction_mean"]).shape == (nb, nt)
    assert len(summary["time_to_level"]["per_seed"]) == nb
    with open(out / "phase.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == nb * nt
    grid = np.array([float(r["fraction_mean"]) for r in rows]).reshape(nb, nt)
    np.testing.assert_allclose(grid, summary["fraction_mean"], rtol=1e-5)
    assert np.all((grid >= 0) & (grid <= 1))
    # the command line overrides the quick configuration
    assert cli.main(["phase", "--quick", "--betas", "0,1", "--steps", "20", "--out", str(tmp_path / "b")]) == 0
    summary = json.loads((tmp_path / "b" / "phase.json").read_text())
    assert summary["betas"] == [0.0, 1.0] and len(summary["times"]) == 21


def _fake_result(betas, steps=5, seeds=3, time=10.0):
    rng = np.random.default_rng(0)
    times = np.linspace(0.0, time, steps + 1)
    fraction = np.sort(rng.uniform(size=(len(betas), seeds, steps + 1)), axis=-1)
    return {
        "times": times,
        "betas": np.asarray(betas, float),
        "mean": fraction.mean(axis=1),
        "t_level_seeds": first_time(times, fraction, 0.9),
    }


@pytest.mark.parametrize("betas", [(0.0, 0.5, 1.0, 2.0), (0.0,), (0.2, 3.0), (2.0, 0.0, 1.0)])
def test_phase_plot_beta_axis_is_non_negative_and_labels_are_maths(tmp_path, betas):
    """The heatmap's cells are centred on the betas but the axis starts at 0 (no negative inverse
    temperature, which pcolormesh's default half cell below beta = 0 used to show), covers every beta, and the
    axis labels and title are mathtext (rendered when the figure is saved)."""
    from mfattn.phase import phase_figure, plot_phase

    cfg = PhaseConfig(tokens=8, betas=betas, time=10.0, steps=5, seeds=3)
    result = _fake_result(betas)
    ax = phase_figure(result, cfg).axes[0]
    low, high = ax.get_ylim()
    assert low >= 0.0 and low <= min(betas), (low, betas)
    assert high >= max(betas)
    if min(betas) == 0.0:
        assert low == 0.0
    assert ax.get_xlim()[0] == 0.0
    assert ax.get_ylabel() == r"inverse temperature $\beta$" and ax.get_xlabel() == "time $t$"
    assert r"$\langle x_i, x_j\rangle" in ax.get_title() and "$N = 8$" in ax.get_title()
    path = plot_phase(result, str(tmp_path / "phase.png"), cfg)  # mathtext parse errors raise here
    assert (tmp_path / "phase.png").stat().st_size > 5_000 and path.endswith("phase.png")
