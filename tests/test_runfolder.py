"""Run folders (mfattn.runfolder): every folder fault gets a message; nothing is lost or written twice."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mfattn.runfolder import FINGERPRINT_COLUMN, FolderLocked, RunFolder, check_out_path, fingerprint

COLUMNS = ["depth", "seed", "err"]
KEYS = ["depth", "seed"]
IDENTITY = {"lr": 0.1, "depths": [1, 2, 4], "threads": 2}


def _folder(path, identity=IDENTITY, **kw):
    return RunFolder(path, identity, columns=COLUMNS, key_columns=KEYS, execution_only=("threads",), **kw)


def _fill(path, rows=((1, 0), (2, 0), (4, 0)), identity=IDENTITY):
    with _folder(path, identity).open() as f:
        for depth, seed in rows:
            if not f.has({"depth": depth, "seed": seed}):
                f.append({"depth": depth, "seed": seed, "err": 1.0 / depth})
        return f.messages


def _read(path):
    with open(os.path.join(path, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_rows_carry_the_fingerprint_and_resume_keeps_them(tmp_path):
    out = tmp_path / "run"
    assert _fill(out, rows=[(1, 0), (2, 0)]) == []
    rows = _read(out)
    assert [r["depth"] for r in rows] == ["1", "2"]
    assert {r[FINGERPRINT_COLUMN] for r in rows} == {fingerprint(IDENTITY, ["threads"])}
    assert json.loads((out / "config.json").read_text()) == IDENTITY
    # resume: the two rows are kept and reported, only the missing one is computed; nothing duplicated
    messages = _fill(out)
    assert messages == ["mfattn: resuming " + str(out) + ": kept 2 row(s)"]
    assert [(r["depth"], r["seed"]) for r in _read(out)] == [("1", "0"), ("2", "0"), ("4", "0")]
    with _folder(out).open() as f:
        assert f.done == {("1", "0"), ("2", "0"), ("4", "0")}
        with pytest.raises(ValueError, match="already written"):
            f.append({"depth": 4, "seed": 0, "err": 0.0})
        with pytest.raises(ValueError, match="missing"):
            f.append({"depth": 8, "seed": 0})
        assert len(f.rows()) == 3


def test_execution_only_settings_do_not_block_a_resume(tmp_path):
    _fill(tmp_path / "run", rows=[(1, 0)])
    assert fingerprint({**IDENTITY, "threads": 8}, ["threads"]) == fingerprint(IDENTITY, ["threads"])
    messages = _fill(tmp_path / "run", identity={**IDENTITY, "threads": 8})
    assert "kept 1 row(s)" in messages[-1]
    assert len(_read(tmp_path / "run")) == 3


def test_cut_last_row_is_dropped_reported_and_recomputed(tmp_path):
    out = tmp_path / "run"
    _fill(out)
    path = out / "results.csv"
    text = path.read_text()
    path.write_text(text[: len(text) - 7])  # a crash in the middle of writing the last row
    folder = _folder(out)
    folder.check()  # a cut row is repairable: not an error
    messages = _fill(out)
    assert any("dropped 1 incomplete row" in m and "recomputed" in m for m in messages), messages
    assert any("kept 2 row(s)" in m for m in messages), messages
    rows = _read(out)
    assert [(r["depth"], r["seed"], r["err"]) for r in rows] == [
        ("1", "0", "1.0"),
        ("2", "0", "0.5"),
        ("4", "0", "0.25"),
    ]
    assert path.read_text().endswith("\n") and not list(out.glob("*.tmp-*"))


def test_malformed_and_duplicate_rows_are_dropped(tmp_path):
    out = tmp_path / "run"
    _fill(out, rows=[(1, 0)])
    fp = fingerprint(IDENTITY, ["threads"])
    with open(out / "results.csv", "a") as f:
        f.write(f"2,0,0.5,{fp},EXTRA\n")  # a glued row: one field too many
        f.write(f"1,0,9.9,{fp}\n")  # the same key twice (two processes before the lock)
    messages = _fill(out)
    assert any("1 malformed row" in m for m in messages) and any("1 duplicate row" in m for m in messages)
    rows = _read(out)
    assert [(r["depth"], r["err"]) for r in rows] == [("1", "1.0"), ("2", "0.5"), ("4", "0.25")]


def test_other_configuration_is_refused_naming_the_settings(tmp_path):
    out = tmp_path / "run"
    _fill(out, rows=[(1, 0)])
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"differs in depths, lr"):
        _folder(out, {**IDENTITY, "lr": 0.2, "depths": [1]}).check()
    with pytest.raises(ValueError, match=r"differs in lr"):
        _folder(out, {**IDENTITY, "lr": 0.2}).open()
    assert sorted(os.listdir(out)) == before and len(_read(out)) == 1


def test_defaults_fill_settings_added_later(tmp_path):
    out = tmp_path / "run"
    _fill(out, rows=[(1, 0)])
    newer = {**IDENTITY, "init": "zero"}
    with pytest.raises(ValueError, match="differs in init"):
        _folder(out, newer).check()
    with _folder(out, newer, defaults={"init": "zero"}).open() as f:
        f.append({"depth": 2, "seed": 0, "err": 0.5})
    # new rows keep the folder's fingerprint, so the file stays one run
    assert len({r[FINGERPRINT_COLUMN] for r in _read(out)}) == 1


def test_deleted_config_json_another_configuration_is_refused(tmp_path):
    out = tmp_path / "run"
    _fill(out, rows=[(1, 0)])
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match="another configuration.*config.json is missing"):
        _folder(out, {**IDENTITY, "lr": 0.3}).check()
    # the same configuration: the rows are recognised by their fingerprint and config.json is restored
    messages = _fill(out)
    assert any("kept 1 row(s)" in m for m in messages)
    assert json.loads((out / "config.json").read_text()) == IDENTITY


def test_results_without_fingerprint_and_config_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_text("depth,seed,err\n1,0,1.0\n")
    with pytest.raises(ValueError, match="nothing says which configuration"):
        _folder(out).check()
    # with the config.json it came with, an older file is adopted: the column is added to its rows
    (out / "config.json").write_text(json.dumps(IDENTITY))
    messages = _fill(out)
    assert any("added the 'run' column to 1 row" in m for m in messages)
    assert [r["depth"] for r in _read(out)] == ["1", "2", "4"]


def test_corrupt_config_json_is_refused(tmp_path):
    out = tmp_path / "run"
    _fill(out, rows=[(1, 0)])
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        _folder(out).check()


def test_out_is_a_file_or_under_a_file(tmp_path):
    file = tmp_path / "a.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _folder(file).check()
    with pytest.raises(ValueError, match="lies under the file"):
        _folder(file / "sub" / "run").check()
    with pytest.raises(ValueError, match="non-empty path"):
        check_out_path("")
    assert not (tmp_path / "a.txt.lock").exists() and sorted(os.listdir(tmp_path)) == ["a.txt"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="as root, chmod does not stop writing")
def test_unwritable_folder(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            _folder(locked / "run").check()
        with pytest.raises(ValueError, match="not writable"):
            _folder(locked).check()
    finally:
        locked.chmod(0o700)


def test_unwritable_folder_as_root_is_reported_by_open(tmp_path, monkeypatch):
    """Root writes anywhere chmod allows, so the refusal is exercised through the check's own answer: a parent
    os.access refuses must give the message, and nothing be created."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(ValueError, match="cannot be created: .* is not writable"):
        _folder(tmp_path / "run").open()
    assert not (tmp_path / "run").exists()


def test_unrelated_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="holds no run.*thesis.tex"):
        _folder(tmp_path).open()
    assert sorted(os.listdir(tmp_path)) == ["thesis.tex"]
    # a folder with only regenerated outputs (results deleted) is not unrelated
    other = tmp_path / "plots"
    other.mkdir()
    (other / "err_vs_L.png").write_bytes(b"")
    _fill(other, rows=[(1, 0)])
    assert len(_read(other)) == 1


def test_failed_start_writes_no_config(tmp_path):
    """A refused start creates nothing, so the corrected configuration is not refused afterwards."""
    out = tmp_path / "run"
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError):
        _folder(tmp_path / "x" / "run").open()
    with pytest.raises(TypeError):
        RunFolder(out, 3, columns=COLUMNS, key_columns=KEYS)
    with pytest.raises(ValueError, match="key_columns"):
        RunFolder(out, IDENTITY, columns=COLUMNS, key_columns=["nope"])
    assert not out.exists()


def test_second_process_fails_fast_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _folder(out).open()
    try:
        # the same process, a second open: refused (flock is per open file)
        with pytest.raises(FolderLocked, match=f"in use by pid {os.getpid()}"):
            _folder(out).open()
        script = textwrap.dedent(
            f"""
            import sys
            from mfattn.runfolder import RunFolder, FolderLocked
            f = RunFolder({str(out)!r}, {IDENTITY!r}, columns={COLUMNS!r}, key_columns={KEYS!r},
                          execution_only=("threads",))
            try:
                f.open()
            except FolderLocked as e:
                print(e)
                sys.exit(3)
            sys.exit(0)
            """
        )
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 3, res.stderr
        assert f"pid {os.getpid()}" in res.stdout and "started" in res.stdout
        holder.append({"depth": 1, "seed": 0, "err": 1.0})
    finally:
        holder.close()
    # released: the next process gets it, and the row is there once
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(_read(out)) == 1


def test_concurrent_processes_write_every_row_once(tmp_path):
    """Two processes started together into one folder: one runs, the other is refused; no row twice."""
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys, time
        from mfattn.runfolder import RunFolder, FolderLocked
        f = RunFolder({str(out)!r}, {IDENTITY!r}, columns={COLUMNS!r}, key_columns={KEYS!r})
        try:
            f.open()
        except FolderLocked:
            sys.exit(3)
        for d in range(20):
            if not f.has({{"depth": d, "seed": 0}}):
                f.append({{"depth": d, "seed": 0, "err": 1.0}})
                time.sleep(0.02)
        f.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(2)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes in ([0, 0], [0, 3]), codes  # both ran (one after the other) or one was refused
    keys = [(r["depth"], r["seed"]) for r in _read(out)]
    assert len(keys) == len(set(keys)) == 20
