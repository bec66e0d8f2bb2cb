"""Every notebook (a jupytext percent script) runs to the end at its small built-in sizes."""

import pathlib
import runpy

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    runpy.run_path(str(path), run_name="__main__")


def test_there_are_notebooks():
    assert NOTEBOOKS
