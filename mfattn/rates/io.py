"""Files of a rates run folder: the CSV tables (one row written, flushed and synced as soon as it is computed),
the configuration it was started with, and resumption (finished rows are kept and skipped)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from ..runfolder import RunFolder
from .config import EXECUTION_ONLY, LEGACY_DEFAULTS, RatesConfig

__all__ = ["RESULTS", "CONTROL", "TRAINING", "OUTPUTS", "Table", "identity", "folder", "check_folder", "fmt_row"]

#: Files of a run folder besides results.csv and config.json (all regenerated or resumed from the run).
OUTPUTS = ("summary.json", "*.png", "control.csv", "training.csv", "diagnostics.json", "*.tmp")

RESULTS = (
    ["sweep", "optimizer", "depth", "heads", "num_tokens", "dim", "seed", "step"],
    [
        "pointwise_err",
        "pointwise_err_x",
        "pointwise_err_p",
        "p_norm",
        "pointwise_err_inf",
        "pointwise_mc",
        "pointwise_fluct",
        "pointwise_euler",
        "pointwise_fluct_mc",
        "uniform_err",
        "uniform_test_set",
        "uniform_search",
        "uniform_source",
        "uniform_mc",
        "uniform_fluct",
        "surrogate_value",
        "search_gain",
        "search_converged",
        "search_rounds",
        "worst_family",
        "worst_norm",
        "worst_diameter",
        "param_gap",
    ],
)
CONTROL = (
    ["depth", "heads", "seed"],
    ["pointwise_err", "err_x", "err_p", "pointwise_mc", "fluct_err", "euler_err", "fluct_mc", "reference_particles"],
)
TRAINING = (
    ["sweep", "optimizer", "num_tokens", "dim", "step"],
    ["limit_loss", "discrete_loss", "limit_sign_fraction", "discrete_sign_fraction"],
)


def _fmt(v):
    return f"{v:.7g}" if isinstance(v, float) else v


class Table:
    """One CSV file of a run: ``keys`` identify a row, ``values`` follow. Existing rows are read on opening; a
    last line cut mid-write (a crash) is dropped, the file rewritten without it, and ``dropped`` says so."""

    def __init__(self, path: str, spec: tuple):
        self.path, (self.keys, self.values) = path, spec
        self.columns = self.keys + self.values
        self.rows: list[dict] = []
        self.dropped = 0
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                text = f.read()
            lines = text.splitlines(keepends=True)
            header = next(csv.reader([lines[0]])) if lines else []
            if header != self.columns:
                raise ValueError(
                    f"rates: {path} has columns {header}, expected {self.columns}; it is not from this "
                    "version's run. Use another --out."
                )
            good = [lines[0]]
            for i, line in enumerate(lines[1:]):
                fields = next(csv.reader([line]), [])
                last = i == len(lines) - 2
                if len(fields) != len(self.columns) or (last and not line.endswith("\n")):
                    self.dropped += 1
                    continue
                good.append(line)
                self.rows.append(dict(zip(self.columns, fields)))
            if self.dropped:
                tmp = path + ".tmp"
                with open(tmp, "w", newline="") as f:
                    f.write("".join(good))
                os.replace(tmp, path)
        self.done = {self.key(r) for r in self.rows}
        self._f = None

    def key(self, row: dict) -> tuple:
        return tuple(str(row[k]) for k in self.keys)

    def write(self, row: dict) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        k = self.key(row)
        if k in self.done:
            return
        if self._f is None:
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            self._f = open(self.path, "a", newline="")
            self._w = csv.DictWriter(self._f, fieldnames=self.columns)
            if new:
                self._w.writeheader()
        self._w.writerow(row)
        self._f.flush()
        os.fsync(self._f.fileno())
        self.rows.append({c: str(row[c]) for c in self.columns})
        self.done.add(k)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def identity(cfg: RatesConfig) -> dict:
    """What a run folder's rows depend on: every setting but the execution-only ones and the seed count."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for k in EXECUTION_ONLY:
        d.pop(k, None)
    return d


def folder(cfg: RatesConfig, out_dir: str) -> RunFolder:
    """The run folder (:class:`mfattn.runfolder.RunFolder`: path checks, lock, identity, ``results.csv``); the
    other tables and outputs live beside ``results.csv`` under its lock."""
    return RunFolder(
        out_dir,
        dataclasses.asdict(cfg),
        columns=RESULTS[0] + RESULTS[1],
        key_columns=RESULTS[0],
        execution_only=EXECUTION_ONLY,
        # A setting a folder's config.json lacks is read as its default, but as what such a folder ran where the
        # setting came later with another default (the ascent's step rule: folders before it ran "fixed").
        defaults=dataclasses.asdict(RatesConfig()) | LEGACY_DEFAULTS,
        who="rates",
        outputs=OUTPUTS,
    )


def check_folder(cfg: RatesConfig, out_dir: str) -> None:
    """``ValueError`` if ``out_dir`` cannot hold this run (a file, under a file, unwritable, a non-empty folder
    holding no run, or a run of another configuration: the message names the settings that differ); writes
    nothing."""
    folder(cfg, out_dir).check()


def fmt_row(row: dict) -> dict:
    return {k: _fmt(v) for k, v in row.items()}
