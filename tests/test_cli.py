"""The command line (mfattn.cli): usage errors exit 2 with one line before any work; Ctrl-C exits 130 with one
line; gradcheck fails on non-finite errors; bench --quick does not touch the committed reference."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import mfattn
from mfattn import bench, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err  # one line
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mfattn {mfattn.__version__}"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["gradcheck", "--beta", "nan"], "--beta: expected a finite number >= 0, got 'nan'"),
        (["gradcheck", "--beta", "inf"], "--beta"),
        (["gradcheck", "--beta", "-1"], "--beta"),
        (["gradcheck", "--tol", "0"], "--tol: expected a finite number > 0"),
        (["gradcheck", "--tol", "nan"], "--tol"),
        (["gradcheck", "--tol", "abc"], "--tol: expected a number, got 'abc'"),
        (["gradcheck", "--depth", "0"], "--depth must be a positive integer"),
        (["gradcheck", "--attention", "bogus"], "invalid choice: 'bogus'"),
        (["gradcheck", "--causal", "--attention", "sinkhorn"], "--causal"),
        (["bench", "--only", "bogus"], "unknown benchmark(s) bogus; choose from matmul, forward"),
        (["bench", "--only", "forward,bogus2"], "bogus2"),
        (["bench", "--mem-budget-gib", "0"], "--mem-budget-gib"),
        (["bench", "--mem-budget-gib", "nan"], "--mem-budget-gib"),
        (["nosuch"], "invalid choice"),
        (["rates", "--host-devices", "0"], "--host-devices"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, words, capsys):
    assert words in _usage_error(argv, capsys)


def test_bad_out_folders_are_usage_errors(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "is a file" in _usage_error(["rates", "--quick", "--out", str(tmp_path / "f")], capsys)
    assert "lies under the file" in _usage_error(["rates", "--quick", "--out", str(tmp_path / "f" / "r")], capsys)
    assert "JSON file" in _usage_error(["bench", "--out", str(tmp_path)], capsys)
    assert "JSON file" in _usage_error(["bench", "--out", str(tmp_path / "f" / "b.json")], capsys)
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_gradcheck_fails_on_non_finite_or_large_errors(monkeypatch, capsys):
    import mfattn.gradcheck

    monkeypatch.setattr(mfattn.gradcheck, "gradcheck", lambda **kw: {"adjoint": 1e-12, "param_grad": math.nan})
    assert cli.main(["gradcheck"]) == 1
    out = capsys.readouterr().out
    assert "param_grad" in out and "nan  FAIL" in out and "1.000e-12  ok" in out
    assert "FAIL: param_grad is non-finite or above the tolerance" in out
    monkeypatch.setattr(mfattn.gradcheck, "gradcheck", lambda **kw: {"adjoint": 1e-6})
    assert cli.main(["gradcheck", "--tol", "1e-9"]) == 1
    assert cli.main(["gradcheck", "--tol", "1e-5"]) == 0


def test_gradcheck_real_small_instance_passes(capsys):
    argv = ["gradcheck", "--depth", "1", "--heads", "1", "--tokens", "3", "--dim", "2", "--head-dim", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("  ok") >= 3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["bench", "--quick"], bench.DEFAULT_QUICK_OUT),
        (["bench"], bench.DEFAULT_OUT),
        (["bench", "--quick", "--out", "x.json"], "x.json"),
    ],
)
def test_bench_quick_does_not_overwrite_the_reference(argv, expected, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda names, **kw: seen.update(kw, names=names))
    assert cli.main(argv) == 0
    assert seen["out"] == expected and seen["quick"] == ("--quick" in argv)
    assert bench.DEFAULT_QUICK_OUT != bench.DEFAULT_OUT


def test_bench_only_takes_lists(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda names, **kw: seen.update(kw, names=names))
    assert cli.main(["bench", "--only", "forward,grad", "--only", "rates", "--out", "x.json"]) == 0
    assert seen["names"] == ["forward", "grad", "rates"] and seen["rates"] is True


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["gradcheck", "bench", "rates", "phase"])
def test_ctrl_c_prints_one_line_and_exits_130(command, monkeypatch, tmp_path, capsys):
    import mfattn.gradcheck
    import mfattn.phase
    import mfattn.rates

    monkeypatch.setattr(mfattn.gradcheck, "gradcheck", _interrupt)
    monkeypatch.setattr(bench, "run", _interrupt)
    monkeypatch.setattr(mfattn.rates, "run", _interrupt)
    monkeypatch.setattr(mfattn.phase, "run", _interrupt)
    argv = {
        "gradcheck": ["gradcheck"],
        "bench": ["bench", "--out", str(tmp_path / "b.json")],
        "rates": ["rates", "--quick", "--out", str(tmp_path / "r"), "--no-progress"],
        "phase": ["phase", "--quick", "--out", str(tmp_path / "p")],
    }[command]
    assert cli.main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err == cli.INTERRUPTED + "\n"


def test_ctrl_c_in_a_real_process(tmp_path):
    """A real SIGINT while a subcommand works: one line on stderr, exit status 130, no traceback."""
    # The child sets SIGINT to Python's default first, as in a terminal: a shell without job control starts
    # background commands with SIGINT ignored, which every process below inherits (the suite run as `pytest ... &`
    # from a script), and a Python started so keeps ignoring it.
    script = textwrap.dedent(
        """
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import sys, time
        import mfattn.gradcheck
        from mfattn import cli

        def slow(**kw):
            print("ready", flush=True)
            time.sleep(60)

        mfattn.gradcheck.gradcheck = slow
        sys.exit(cli.main(["gradcheck"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err == cli.INTERRUPTED + "\n"


def test_usage_error_in_a_real_process():
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run(
        [sys.executable, "-m", "mfattn.cli", "bench", "--only", "bogus"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("mfattn bench: error: --only: unknown benchmark(s) bogus; choose from matmul")
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "kw, error, words",
    [
        ({"beta": math.nan}, ValueError, "gradcheck: beta must be finite and >= 0"),
        ({"beta": -1.0}, ValueError, "gradcheck: beta"),
        ({"beta": "1.0"}, TypeError, "gradcheck: beta must be a real number"),
        ({"depth": 0}, ValueError, "gradcheck: depth must be a positive integer"),
        ({"heads": True}, ValueError, "gradcheck: heads"),
        ({"tokens": 2.0}, ValueError, "gradcheck: tokens"),
        ({"seed": 0.5}, ValueError, "gradcheck: seed"),
        ({"padding": "no"}, ValueError, "gradcheck: padding"),
    ],
)
def test_gradcheck_function_checks_its_arguments(kw, error, words, no_jaxtyping):
    from mfattn.gradcheck import gradcheck

    with pytest.raises(error, match=words):
        gradcheck(**kw)
