"""The rates experiment end to end (the --quick configuration), resume after an interruption, config errors."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from mfattn.rates import COLUMNS, load_config, run


def _rows(path):
    with open(os.path.join(path, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rates") / "quick")
    cfg = load_config(quick=True)
    summary = run(cfg, out, progress=False)
    return cfg, out, summary


def test_quick_configuration_end_to_end(quick_run):
    cfg, out, summary = quick_run
    rows = _rows(out)
    points = len(cfg.depths) * len(cfg.heads)
    assert len(rows) == points * cfg.seeds * 3  # steps 0, K/2, K
    assert list(rows[0]) == COLUMNS
    for r in rows:
        assert float(r["pointwise_err"]) > 0
        assert float(r["uniform_err"]) >= float(r["pointwise_err"])  # a sup is at least the mean
        assert float(r["uniform_err"]) == max(float(r["uniform_test_set"]), float(r["uniform_ascent"]))
        assert (float(r["param_gap"]) == 0) == (r["step"] == "0")  # coupled heads start at the discrete init
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    assert {"fits", "config", "versions", "device", "rows"} <= set(saved)
    free = saved["fits"]["final"]["uniform_err"]["free"]
    assert 0 <= free["alpha"] <= 3 and 0 <= free["gamma"] <= 3
    for name in summary["plots"]:
        assert os.path.getsize(name) > 1000
    assert "pointwise" in summary["table"]


def test_resume_after_an_interruption_recomputes_nothing_twice(quick_run, tmp_path):
    cfg, out, _ = quick_run
    full = _rows(out)
    # An interruption while the last seed's final evaluation was being written: its last two rows are
    # missing. The rerun skips every finished unit, retrains the interrupted one (deterministically) and
    # writes only the missing rows.
    part = tmp_path / "interrupted"
    part.mkdir()
    shutil.copy(os.path.join(out, "config.json"), part / "config.json")
    keep = len(full) - 2
    with open(os.path.join(out, "results.csv")) as f:
        lines = f.readlines()
    (part / "results.csv").write_text("".join(lines[: keep + 1]))
    run(cfg, str(part), progress=False)
    resumed = _rows(str(part))
    assert len(resumed) == len(full)
    assert resumed[:keep] == full[:keep]  # finished rows untouched
    key = lambda r: tuple(r[c] for c in COLUMNS if c != "wall_s")
    assert sorted(map(key, resumed)) == sorted(map(key, full))  # the rerun reproduces the rest exactly
    # a finished run reruns nothing
    run(cfg, str(part), progress=False)
    assert len(_rows(str(part))) == len(full)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("depthz = [1, 2]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(str(bad))
    bad.write_text("depths = [3, 5, 7, 11, 13]\n")
    with pytest.raises(ValueError, match="lcm"):
        load_config(str(bad))
    bad.write_text('optimizer = "sgd"\n')
    with pytest.raises(ValueError, match="optimizer"):
        load_config(str(bad))
    good = tmp_path / "good.toml"
    good.write_text("depths = [2, 4]\nheads = [1]\nparticles = 64\n")
    cfg = load_config(str(good), quick=True)
    assert cfg.depths == (2, 4) and cfg.particles == 64 and cfg.steps == 4  # quick, then the file
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"dim": 99}))
    with pytest.raises(ValueError, match="different configuration"):
        run(cfg, str(other), progress=False)
