"""Every notebook (a jupytext percent script) runs to the end at its small built-in sizes.

Notebook 02 reads a `mfattn rates` run folder: it gets the session's quick run (tests/conftest.py's
``rates_quick_run``, shared with tests/test_rates.py) through ``MFATTN_RATES_DIR``, so the suite runs the
experiment once.
"""

import pathlib
import runpy

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, request, monkeypatch, tmp_path):
    monkeypatch.setenv("MFATTN_NOTEBOOK_OUT", str(tmp_path))  # where notebooks save their figures
    if path.name == "02_rates.py":
        _, run_dir, _ = request.getfixturevalue("rates_quick_run")
        monkeypatch.setenv("MFATTN_RATES_DIR", run_dir)
    runpy.run_path(str(path), run_name="__main__")


def test_there_are_notebooks():
    assert NOTEBOOKS
    assert any(p.name == "02_rates.py" for p in NOTEBOOKS)
