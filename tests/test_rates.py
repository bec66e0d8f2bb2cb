"""The rates experiment end to end (the --quick configuration), resume after an interruption, the N and d
sweeps with the target-measure task, config errors."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import shutil

import pytest

import mfattn
from mfattn import fits
from mfattn.rates import COLUMNS, TASKS, RatesConfig, load_config, run


def _rows(path):
    with open(os.path.join(path, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_quick_configuration_end_to_end(rates_quick_run):
    cfg, out, summary = rates_quick_run
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
    assert saved["config"]["task"] == "teacher_student"
    assert saved["device"]["mesh"] is None  # one device
    free = saved["fits"]["final"]["uniform_err"]["free"]
    assert 0 <= free["alpha"] <= 3 and 0 <= free["gamma"] <= 3
    for name in summary["plots"]:
        assert os.path.getsize(name) > 1000
    assert "pointwise" in summary["table"]


def test_resume_after_an_interruption_recomputes_nothing_twice(rates_quick_run, tmp_path, monkeypatch):
    cfg, out, _ = rates_quick_run
    # The fits and plots are checked above; here a few bootstrap resamples and no plots keep the three
    # summaries (two resumed runs) cheap.
    monkeypatch.setattr(fits, "summarize", functools.partial(fits.summarize, n_boot=4))
    monkeypatch.setattr(fits, "plot", lambda rows, outdir: [])
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


# The N and d sweeps at tiny sizes, with the target-measure task (MMD to a fixed cloud). One sweep point
# (L, H) = (2, 1) everywhere, so that the LH group, the N sweep at N = 3 and the d sweep at d = 2 (both
# optimizers) share compiled programs: three shapes (N, d) in {(3, 2), (5, 2), (3, 3)} in all. Without
# the ascent and the Monte-Carlo twin (the quick run above covers them).
SWEEPS = dict(
    task="target_measure", target_points=4, num_tokens=3, dim=2, depths=(2,), heads=(1,), depth_ref=2, heads_ref=1,
    tokens_sweep=(3, 5), dims_sweep=(2, 3), seeds=2, steps=1, batch_size=2, particles=8, grid_size=3,
    test_per_family=1, ascent_starts=0, ascent_steps=0, mc_check=False,
)  # fmt: skip


@pytest.mark.slow  # about a minute: three (N, d) shapes, each compiled (run with -m slow)
def test_tokens_and_dims_sweeps_with_the_target_measure_task(tmp_path):
    cfg = RatesConfig(**SWEEPS).validate()
    out = str(tmp_path / "sweeps")
    summary = run(cfg, out, progress=False)
    rows = _rows(out)
    groups = {}
    for r in rows:
        groups.setdefault((r["sweep"], int(r["num_tokens"]), int(r["dim"]), r["optimizer"]), []).append(r)
    assert set(groups) == {
        ("LH", 3, 2, "adamw"),
        ("N", 3, 2, "adamw"),
        ("N", 5, 2, "adamw"),
        *(("d", 3, d, opt) for d in (2, 3) for opt in ("adamw", "blockwise_adamw")),
    }
    for key, g in groups.items():
        assert sorted((r["seed"], r["step"]) for r in g) == [(s, t) for s in "01" for t in "01"], key
        assert {(r["depth"], r["heads"]) for r in g} == {("2", "1")}
    for r in rows:
        pointwise, uniform = float(r["pointwise_err"]), float(r["uniform_err"])
        assert 0 < pointwise <= uniform < math.inf
        assert r["uniform_source"] == "test_set" and r["mc_flag"] == "0"
        assert (float(r["param_gap"]) == 0) == (r["step"] == "0")
    # The d sweep is paired: at step 0 AdamW and blockwise AdamW hold the same models on the same inputs;
    # after a step they differ.
    for d in (2, 3):
        adam, block = (sorted(groups[("d", 3, d, opt)], key=lambda r: (r["seed"], r["step"])) for opt in
                       ("adamw", "blockwise_adamw"))  # fmt: skip
        for a, b in zip(adam, block):
            assert (a["pointwise_err"] == b["pointwise_err"]) == (a["step"] == "0")

    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    assert saved["config"]["task"] == "target_measure"
    fitted = saved["fits"]
    assert set(fitted["N"]) == {"adamw"} and set(fitted["d"]) == {"adamw", "blockwise_adamw"}
    for sweep, axis, opts in (("N", "num_tokens", ["adamw"]), ("d", "dim", ["adamw", "blockwise_adamw"])):
        for opt in opts:
            block = fitted[sweep][opt]
            assert block[f"{axis}_values"] == ([3, 5] if sweep == "N" else [2, 3])
            for kind in ("pointwise_err", "uniform_err", "param_gap"):
                slope = block[kind]["slope"]
                assert isinstance(slope, float) and math.isfinite(slope), (sweep, opt, kind, block[kind])
                assert all(isinstance(c, float) and math.isfinite(c) for c in block[kind]["ci"])
    names = {os.path.basename(p) for p in summary["plots"]}
    assert {"err_vs_N.png", "err_vs_d.png"} <= names
    for p in summary["plots"]:
        assert os.path.getsize(p) > 1000
    assert "blockwise_adamw" in summary["table"]


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, message in [
        ("depthz = [1, 2]", "unknown keys"),
        ("depths = [3, 5, 7, 11, 13]", "lcm"),
        ('optimizer = "sgd"', "optimizer"),
        ('task = "denoising"', "task must be one of"),
        ("mmd_bandwidth = 0.0", "mmd_bandwidth"),
        ('attention = "cosine"', "bad attention"),
        ("attention = {kind = 'l2', depth_exponent = 0.5}", "depth_exponent"),
    ]:
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_config(str(bad))
    table = tmp_path / "table.toml"
    table.write_text("attention = {kind = 'sigmoid', causal = true, bias = -0.5}\n")
    assert load_config(str(table)).spec() == mfattn.Attention("sigmoid", causal=True, bias=-0.5)
    good = tmp_path / "good.toml"
    good.write_text('depths = [2, 4]\nheads = [1]\nparticles = 64\ntask = "target_measure"\n')
    cfg = load_config(str(good), quick=True)
    assert cfg.depths == (2, 4) and cfg.particles == 64 and cfg.steps == 4  # quick, then the file
    assert cfg.task in TASKS and cfg.task == "target_measure"
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"dim": 99}))
    with pytest.raises(ValueError, match="different configuration"):
        run(cfg, str(other), progress=False)


def test_a_run_folder_from_before_new_settings_still_resumes(tmp_path):
    # config.json written before `task`, `target_points` and `mmd_bandwidth` existed: those runs used the
    # defaults, so the folder is the same configuration (nothing to compute: every row is there).
    cfg = RatesConfig(depths=(1,), heads=(1,), seeds=1, steps=0).validate()
    old = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items()
           if k not in ("task", "target_points", "mmd_bandwidth", "shard_particles")}  # fmt: skip
    old["shard_seeds"] = False  # execution only: not compared
    (tmp_path / "config.json").write_text(json.dumps(old))
    row = dict.fromkeys(COLUMNS, "1")
    row.update(sweep="LH", optimizer="adamw", depth="1", heads="1", num_tokens="4", dim="2", seed="0", step="0",
               uniform_source="test_set", mc_flag="0")  # fmt: skip
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerow(row)
    summary = run(cfg, str(tmp_path), progress=False)
    assert summary["rows"] == 1


def test_command_line_errors_before_any_work(tmp_path, capsys):
    """Bad options, files and run folders stop ``mfattn rates`` with a usage error (exit status 2)."""
    from mfattn import cli

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("seeds = [\n")
    bad_value = tmp_path / "value.toml"
    bad_value.write_text("seeds = -1\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"dim": 99}))
    cases = [
        (["--host-devices", "0"], "--host-devices must be a positive integer"),
        (["--config", str(tmp_path / "missing.toml")], "No such file"),
        (["--config", str(bad_toml)], "not valid TOML"),
        (["--config", str(bad_value)], "seeds must be a positive integer"),
        (["--out", str(other)], "different configuration .* differs in .*dim"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["rates", "--quick", *argv])
        assert exc.value.code == 2
        assert re.search(message, capsys.readouterr().err), argv
    assert sorted(os.listdir(other)) == ["config.json"]  # nothing was written
