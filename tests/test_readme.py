"""The README works as written: every ```python block runs, every ```toml block (and examples/*.toml) is a
valid rates configuration.

The python blocks are executed in order, in one fresh Python process and one shared namespace, as a reader
pasting them one after the other into a session would (later sections reuse ``params``, ``key``, ``tokens``
and ``loss`` from the Quick start). The process runs with JAX's defaults (float32, no x64, none of
tests/conftest.py's strict settings), in a temporary working directory (the training snippet writes a
checkpoint folder). ```bash blocks and unlabelled blocks (maths, console output) are not executed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import mfattn.rates

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number of the code, code)`` of every fenced block of a Markdown text."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if lang is None and match:
            lang, start, body = match.group(1), number + 1, []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise AssertionError(f"README.md: the code block opened at line {start - 1} is never closed")
    return blocks


BLOCKS = fenced_blocks(README.read_text())
PYTHON = [(line, code) for lang, line, code in BLOCKS if lang == "python"]
TOML = [(line, code) for lang, line, code in BLOCKS if lang == "toml"]
FIELDS = {f.name for f in dataclasses.fields(mfattn.rates.RatesConfig)}

RUNNER = textwrap.dedent(
    """
    import json, sys, time, traceback
    blocks = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__readme__"}
    for line, code in blocks:
        t0 = time.perf_counter()
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except BaseException:
            print(f"README.md: the python block at line {line} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
        print(f"README.md:{line} ok in {time.perf_counter() - t0:.1f} s", flush=True)
    """
)


def test_readme_has_the_blocks_this_file_checks():
    assert len(PYTHON) >= 5, PYTHON
    assert TOML
    assert any("loss_and_grad" in code for _, code in PYTHON)


def test_readme_python_blocks_run_in_order(tmp_path):
    import json

    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps(PYTHON))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(blocks)], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok in ") == len(PYTHON), proc.stdout


@pytest.mark.parametrize("line,code", TOML, ids=[f"README.md:{line}" for line, _ in TOML])
def test_readme_toml_blocks_are_rates_configurations(line, code):
    data = tomllib.loads(code)
    assert data, f"README.md:{line}: empty TOML block"
    assert set(data) <= FIELDS, f"README.md:{line}: keys {sorted(set(data) - FIELDS)} are not RatesConfig fields"


def test_there_are_example_configurations():
    names = {p.name for p in EXAMPLES}
    assert {"rates_LH.toml", "rates_N_sweep.toml", "rates_d_sweep.toml"} <= names, names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configuration_is_valid(path):
    """Valid TOML, only RatesConfig settings (a subset: settings may be added), every setting commented, and
    accepted by ``mfattn.rates.load_config`` (which validates the values)."""
    text = path.read_text()
    data = tomllib.loads(text)
    assert data, path
    assert set(data) <= FIELDS, f"{path.name}: keys {sorted(set(data) - FIELDS)} are not RatesConfig fields"
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in data:
            assert "#" in line, f"{path.name}: the setting {key!r} has no comment on its line"
    cfg = mfattn.rates.load_config(str(path))
    for key, value in data.items():
        got = getattr(cfg, key)
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == (
            tuple(value) if isinstance(value, list) else value
        ), key


def test_readme_points_at_the_repository_spec():
    text = README.read_text()
    assert "../shared" not in text and "SPEC section" not in text
    assert "docs/spec.md" in text
    assert (ROOT / "docs" / "spec.md").is_file()
