"""Run folders: the file layer of resumable experiments (``mfattn rates`` and the like).

A run folder holds one experiment: ``config.json`` (the statistical configuration), ``results.csv`` (one row
per finished measurement, appended as each is computed) and whatever outputs are regenerated from the rows
(``summary.json``, plots). A rerun with the same folder resumes: rows already present are kept, the others
computed. :class:`RunFolder` makes that safe:

* **the destination** is checked before anything is created (:func:`check_out_path`): a path that is a file,
  lies under a file, or cannot be written is a ``ValueError``; so is a non-empty folder that holds no run;
* **identity** does not rest on one deletable file: every row of ``results.csv`` carries the run's
  :func:`fingerprint` (a hash of the configuration, execution-only settings excluded) in the column
  :data:`FINGERPRINT_COLUMN`, and ``config.json`` holds the configuration itself. A folder of another
  configuration is refused -- naming the differing settings when ``config.json`` is there, by the
  fingerprint when only ``results.csv`` is;
* **one process at a time**: :meth:`RunFolder.open` takes an exclusive lock on ``.mfattn-lock`` in the folder
  (POSIX ``fcntl.flock``; released by the OS if the process dies) and writes its holder (pid, host, start time,
  command) into it; a second process fails at once with :class:`FolderLocked` saying who holds it;
* **durable rows**: :meth:`RunFolder.append` flushes and fsyncs every row; on open, a last line cut mid-write,
  rows of the wrong length and repeated keys are dropped (the file rewritten atomically: temporary file, then
  ``os.replace``) and reported, so that they are recomputed;
* **nothing written by a failed start**: the folder, the lock and ``config.json`` are created only after every
  check has passed.

Example (``columns`` are the CSV's columns, ``key_columns`` those identifying a row)::

    folder = RunFolder("runs/x", {"lr": 0.1, "depths": [1, 2]}, columns=["depth", "err"], key_columns=["depth"])
    folder.check()                       # before any work: ValueError if the folder cannot take this run
    with folder.open() as f:             # lock, repair results.csv, write config.json
        for line in f.messages:          # e.g. "resuming runs/x: kept 3 rows"
            print(line)
        for depth in (1, 2, 4):
            if f.has({"depth": depth}):
                continue
            f.append({"depth": depth, "err": 0.5 / depth})
        rows = f.rows()                  # every row, as strings (csv.DictReader)
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import fnmatch
import hashlib
import io
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["FINGERPRINT_COLUMN", "FolderLocked", "RunFolder", "check_out_path", "fingerprint", "jsonable"]

#: The column of ``results.csv`` holding the run's :func:`fingerprint` on every row.
FINGERPRINT_COLUMN = "run"
LOCK_NAME = ".mfattn-lock"


class FolderLocked(ValueError):
    """Another process holds the run folder's lock (a ``ValueError``: the command line reports it as a usage
    error)."""


def jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back: dataclasses as dicts, tuples as lists, keys as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=_default))


def _default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"runfolder: cannot store a {type(obj).__name__} in config.json ({obj!r}).")


def fingerprint(identity: Mapping[str, Any], execution_only: Iterable[str] = ()) -> str:
    """A 16-hex-digit hash of ``identity`` (a JSON-able mapping) without the keys ``execution_only``.

    The hash of ``json.dumps`` with sorted keys (tuples are lists): the same configuration gives the same
    fingerprint in every process and on every machine; ``1`` and ``1.0`` differ (as they do in JSON).
    """
    skip = set(execution_only)
    data = {k: v for k, v in jsonable(dict(identity)).items() if k not in skip}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_out_path(path: str | os.PathLike, *, who: str = "mfattn") -> str:
    """``ValueError`` unless ``path`` is, or can be created as, a writable folder; returns it as a string.

    Refused: an empty path, a path that is a file, a path under a file, and a folder (or, for a new one, its
    nearest existing parent) this process cannot write. Creates nothing.
    """
    path = os.fspath(path)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{who}: the output folder must be a non-empty path, got {path!r}.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{who}: {path} is a file, not a folder; give --out a folder.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise ValueError(f"{who}: {path} lies under the file {parent}; give --out a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        what = "is not writable" if parent == os.path.abspath(path) else f"cannot be created: {parent} is not writable"
        raise ValueError(f"{who}: the output folder {path} {what}.")
    return path


@dataclasses.dataclass
class _Scan:
    """What :meth:`RunFolder._scan` found in ``results.csv``."""

    header: list | None = None
    rows: list = dataclasses.field(default_factory=list)  # kept rows, lists of strings in ``columns`` order
    dropped_cut: int = 0  # a last line cut mid-write
    dropped_bad: int = 0  # wrong field count / empty key
    dropped_dup: int = 0  # a key already present
    legacy: bool = False  # no fingerprint column (written before it existed)
    fingerprints: set = dataclasses.field(default_factory=set)
    needs_rewrite: bool = False


class RunFolder:
    """One run folder: validation, lock, ``config.json`` and the append-only ``results.csv``.

    Args:
        path: the folder (created by :meth:`open` if missing).
        identity: the run's configuration, a JSON-able mapping (a dataclass is turned into its dict); written
            to ``config.json`` and hashed into the :func:`fingerprint` on every row.
        columns: the CSV's columns, in order (the fingerprint column :data:`FINGERPRINT_COLUMN` is added last).
        key_columns: the columns that identify a row (a subset of ``columns``): a row whose key is already
            present is a duplicate.
        execution_only: settings of ``identity`` that change how the run executes, not what it computes: not
            hashed, not compared (a run may resume with other values).
        defaults: values for settings a stored ``config.json`` lacks (added to the configuration later: that
            run used the default). Default: none, a missing setting differs.
        outputs: name patterns of files regenerated from the rows (``summary.json``, plots): a folder holding
            only these (and no ``config.json`` or ``results.csv``) is not refused as unrelated.
        who: the name used in messages, e.g. ``"rates"``.
        results, config: the file names.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        identity: Mapping[str, Any] | Any,
        *,
        columns: Sequence[str],
        key_columns: Sequence[str],
        execution_only: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
        outputs: Sequence[str] = ("summary.json", "*.png"),
        who: str = "mfattn",
        results: str = "results.csv",
        config: str = "config.json",
    ):
        self.who = who
        self.path = os.fspath(path)
        self.identity = jsonable(identity)
        if not isinstance(self.identity, dict):
            raise TypeError(f"RunFolder: identity must be a mapping or a dataclass, got {type(identity).__name__}.")
        columns = [str(c) for c in columns]
        if FINGERPRINT_COLUMN in columns:
            raise ValueError(f"RunFolder: columns may not contain {FINGERPRINT_COLUMN!r} (added automatically).")
        if len(set(columns)) != len(columns) or not columns:
            raise ValueError(f"RunFolder: columns must be distinct and non-empty, got {columns}.")
        missing = [c for c in key_columns if c not in columns]
        if missing or not key_columns:
            raise ValueError(f"RunFolder: key_columns must be non-empty and among columns; not found: {missing}.")
        self.columns = columns
        self.fieldnames = [*columns, FINGERPRINT_COLUMN]
        self.key_columns = list(key_columns)
        self.execution_only = tuple(execution_only)
        self.defaults = jsonable(dict(defaults or {}))
        self.outputs = tuple(outputs)
        self.csv_path = os.path.join(self.path, results)
        self.config_path = os.path.join(self.path, config)
        self.lock_path = os.path.join(self.path, LOCK_NAME)
        self.fingerprint = fingerprint(self.identity, self.execution_only)
        self.messages: list[str] = []
        self._lock_file = None
        self._csv = None
        self._writer = None
        self._keys: set = set()
        self._rows_fp = self.fingerprint  # the fingerprint new rows get (the folder's, when it has one)

    # ------------------------------------------------------------------------------------------- checks
    def check(self) -> None:
        """``ValueError`` if this folder cannot take this run; creates and writes nothing.

        Checks the path (:func:`check_out_path`), refuses a non-empty folder that holds no run, a
        ``config.json`` of another configuration (naming the differing settings) or unreadable, and a
        ``results.csv`` whose rows carry another fingerprint, or none while ``config.json`` is missing.
        """
        check_out_path(self.path, who=self.who)
        if not os.path.isdir(self.path):
            return
        self._check_contents()
        accepted = self._accepted_fingerprints()
        scan = self._scan()
        self._check_scan(scan, accepted)

    def _check_contents(self) -> None:
        # files being written atomically (*.tmp) do not make a folder foreign
        names = [n for n in os.listdir(self.path) if n != LOCK_NAME and not n.endswith(".tmp")]
        ours = {os.path.basename(self.csv_path), os.path.basename(self.config_path)}
        if names and not ours & set(names):
            foreign = sorted(n for n in names if not any(fnmatch.fnmatch(n, p) for p in self.outputs))
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise ValueError(
                    f"{self.who}: {self.path} is a non-empty folder that holds no run (found {shown}); "
                    "give --out a new or empty folder, or a run folder of this command."
                )

    def _stored_config(self) -> dict | None:
        if not os.path.exists(self.config_path):
            return None
        try:
            with open(self.config_path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{self.who}: cannot read {self.config_path} ({err}); restore it, or delete the folder to start over."
            ) from None
        if not isinstance(stored, dict):
            raise ValueError(f"{self.who}: {self.config_path} is not a JSON object; delete the folder to start over.")
        return stored

    def differences(self, stored: Mapping[str, Any]) -> list[str]:
        """The settings in which ``stored`` (a configuration read back, missing keys taken from ``defaults``)
        differs from this run's, execution-only settings excluded; sorted."""
        previous = {**{k: v for k, v in self.defaults.items() if k not in stored}, **jsonable(dict(stored))}
        current = self.identity
        skip = set(self.execution_only)
        keys = (set(previous) | set(current)) - skip
        return sorted(k for k in keys if k not in previous or k not in current or previous[k] != current[k])

    def _accepted_fingerprints(self) -> set | None:
        """The row fingerprints that belong to this run, or ``None`` without ``config.json`` (then only this
        configuration's). ``ValueError`` if ``config.json`` holds another configuration."""
        stored = self._stored_config()
        if stored is None:
            return None
        changed = self.differences(stored)
        if changed:
            raise ValueError(
                f"{self.who}: {self.path} holds a run with a different configuration ({self.config_path}; differs "
                f"in {', '.join(changed)}); use another --out, or delete the folder to start over."
            )
        return {self.fingerprint, fingerprint(stored, self.execution_only)}

    def _check_scan(self, scan: _Scan, accepted: set | None) -> None:
        if scan.header is None:
            return
        if scan.header not in (self.fieldnames, self.columns):
            raise ValueError(
                f"{self.who}: {self.csv_path} has the columns {scan.header}, not this version's {self.fieldnames}; "
                "use another --out, or delete the folder to start over."
            )
        if scan.legacy and scan.rows and accepted is None:
            raise ValueError(
                f"{self.who}: {self.csv_path} has rows but no {FINGERPRINT_COLUMN!r} column and "
                f"{os.path.basename(self.config_path)} is missing: nothing says which configuration wrote them. "
                "Use another --out, or delete the folder to start over."
            )
        ok = accepted if accepted is not None else {self.fingerprint}
        foreign = sorted(scan.fingerprints - ok)
        if foreign:
            where = (
                f"{os.path.basename(self.config_path)} is missing, so the differing settings cannot be named"
                if accepted is None
                else f"not the configuration of {os.path.basename(self.config_path)}"
            )
            raise ValueError(
                f"{self.who}: {self.csv_path} holds rows of another configuration (fingerprint "
                f"{', '.join(foreign)}; this run's is {self.fingerprint}; {where}); use another --out, or delete "
                "the folder to start over."
            )

    def _scan(self) -> _Scan:
        """Read ``results.csv`` (if any) tolerantly: the header, the well-formed rows, what was dropped."""
        scan = _Scan()
        if not os.path.exists(self.csv_path):
            return scan
        try:
            with open(self.csv_path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ValueError(f"{self.who}: cannot read {self.csv_path} ({err}).") from None
        if not data:
            return scan
        if not data.endswith(b"\n"):  # cut mid-write: the writer ends every row with a newline
            data = data[: data.rfind(b"\n") + 1]
            scan.dropped_cut = 1
            scan.needs_rewrite = True
        try:
            text = data.decode()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{self.who}: {self.csv_path} is not text ({err}); delete the folder to start over."
            ) from None
        if not text:
            return scan
        records = list(csv.reader(io.StringIO(text, newline="")))
        if not records:
            return scan
        scan.header = records[0]
        scan.legacy = scan.header == self.columns
        if scan.legacy:
            scan.needs_rewrite = True
        width = len(scan.header)
        key_idx = [scan.header.index(c) for c in self.key_columns if c in scan.header]
        fp_idx = scan.header.index(FINGERPRINT_COLUMN) if FINGERPRINT_COLUMN in scan.header else None
        seen = set()
        for record in records[1:]:
            if (
                len(record) != width
                or any(record[i] == "" for i in key_idx)
                or (fp_idx is not None and not record[fp_idx])
            ):
                scan.dropped_bad += 1
                scan.needs_rewrite = True
                continue
            key = tuple(record[i] for i in key_idx)
            if key in seen:
                scan.dropped_dup += 1
                scan.needs_rewrite = True
                continue
            seen.add(key)
            if fp_idx is not None:
                scan.fingerprints.add(record[fp_idx])
            scan.rows.append(record)
        return scan

    # ------------------------------------------------------------------------------------------- open
    def open(self) -> RunFolder:
        """Check (:meth:`check`), create the folder, take the lock, check again under it, repair
        ``results.csv``, write ``config.json`` if missing, and open ``results.csv`` for appending.

        Returns ``self`` (a context manager: :meth:`close` on exit). :attr:`messages` says what was found:
        rows kept, rows dropped (to be recomputed). Raises ``ValueError`` (:class:`FolderLocked` if another
        process holds the folder); on failure nothing but the folder and its lock file has been created.
        """
        if self._csv is not None:
            raise ValueError(f"{self.who}: {self.path} is already open.")
        self.check()
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{self.who}: cannot create the output folder {self.path} ({err}).") from None
        self._acquire()
        try:
            self._check_contents()
            accepted = self._accepted_fingerprints()
            scan = self._scan()
            self._check_scan(scan, accepted)
            stored = self._stored_config()
            if stored is not None:
                self._rows_fp = fingerprint(stored, self.execution_only)
            self._repair(scan)
            if stored is None:
                _write_atomic(self.config_path, json.dumps(self.identity, indent=2) + "\n")
            new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
            self._csv = open(self.csv_path, "a", newline="")
            self._writer = csv.DictWriter(self._csv, fieldnames=self.fieldnames, lineterminator="\n")
            if new:
                self._writer.writeheader()
                self._sync()
            self._keys = {tuple(r[self.fieldnames.index(c)] for c in self.key_columns) for r in scan.rows}
        except BaseException:
            self.close()
            raise
        return self

    def _repair(self, scan: _Scan) -> None:
        n = len(scan.rows)
        if scan.needs_rewrite:
            fp = self._rows_fp
            rows = [r if not scan.legacy else [*r, fp] for r in scan.rows]
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if scan.header is not None or rows:
                w.writerow(self.fieldnames)
            w.writerows(rows)
            _write_atomic(self.csv_path, buf.getvalue())
        name = os.path.basename(self.csv_path)
        if scan.dropped_cut:
            self.messages.append(f"{self.who}: {name}: dropped 1 incomplete row (cut mid-write); it will be recomputed")
        if scan.dropped_bad:
            self.messages.append(
                f"{self.who}: {name}: dropped {scan.dropped_bad} malformed row(s); they will be recomputed"
            )
        if scan.dropped_dup:
            self.messages.append(f"{self.who}: {name}: dropped {scan.dropped_dup} duplicate row(s)")
        if scan.legacy and n:
            self.messages.append(f"{self.who}: {name}: added the {FINGERPRINT_COLUMN!r} column to {n} row(s)")
        if n:
            self.messages.append(f"{self.who}: resuming {self.path}: kept {n} row(s)")

    def _acquire(self) -> None:
        try:
            f = open(self.lock_path, "a+")
        except OSError as err:
            raise ValueError(f"{self.who}: cannot create the lock file {self.lock_path} ({err}).") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            self._lock_file = f
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                info = json.loads(holder)
                who = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
                if info.get("command"):
                    who += f" ({info['command']})"
            except ValueError:
                who = "another process (it has not written its details yet)"
            raise FolderLocked(
                f"{self.who}: {self.path} is in use by {who}; wait for it to finish, stop it, or use another --out."
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        f.seek(0)
        f.truncate()
        f.write(json.dumps(info))
        f.flush()
        self._lock_file = f

    # ------------------------------------------------------------------------------------------- rows
    def key(self, row: Mapping[str, Any]) -> tuple:
        """The key of ``row`` (values of ``key_columns`` as the CSV stores them, strings)."""
        return tuple(_cell(row[c]) for c in self.key_columns)

    def has(self, row: Mapping[str, Any]) -> bool:
        """Whether a row with ``row``'s key (only ``key_columns`` are read) is in ``results.csv``."""
        return self.key(row) in self._keys

    @property
    def done(self) -> set:
        """The keys (see :meth:`key`) of the rows in ``results.csv``."""
        return set(self._keys)

    def append(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` (every column of ``columns``, nothing else) to ``results.csv`` durably (flush and
        fsync). ``ValueError`` for a row whose key is already present, or with missing or unknown columns."""
        if self._writer is None:
            raise ValueError(f"{self.who}: open the run folder before appending rows.")
        extra = sorted(set(row) - set(self.columns))
        missing = [c for c in self.columns if c not in row]
        if extra or missing:
            raise ValueError(f"{self.who}: a results row needs exactly the columns; missing {missing}, extra {extra}.")
        key = self.key(row)
        if key in self._keys:
            raise ValueError(f"{self.who}: a row with key {dict(zip(self.key_columns, key))} is already written.")
        self._writer.writerow({**{c: _cell(row[c]) for c in self.columns}, FINGERPRINT_COLUMN: self._rows_fp})
        self._sync()
        self._keys.add(key)

    def rows(self) -> list[dict]:
        """Every row of ``results.csv`` as a dict of strings (as :class:`csv.DictReader` gives)."""
        if self._csv is not None:
            self._csv.flush()
        if not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def _sync(self) -> None:
        self._csv.flush()
        os.fsync(self._csv.fileno())

    def close(self) -> None:
        """Close ``results.csv`` and release the lock (also on exit of a ``with`` block)."""
        if self._csv is not None:
            self._csv.close()
            self._csv = self._writer = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def __enter__(self) -> RunFolder:
        if self._csv is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
