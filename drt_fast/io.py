"""Result files: Cohen-format TSV rows, the JSON metadata sidecar, and resume.

A results file is what Cohen's ``certify.py`` / ``predict.py`` write, so existing analysis
scripts read it unchanged, with drt-fast's extra columns after Cohen's::

    certify:  idx  label  predict  radius  correct  time  pA_lower  count  n
    predict:  idx  label  predict  correct  time

Rows are appended and flushed one at a time (and fsync'ed after each group of inputs),
so a run killed at any moment (SIGKILL included) leaves whole rows plus at most one
partial last line, which :func:`open_results` drops on resume. The sidecar ``<out>.json`` holds the configuration;
its result-determining part (:data:`RESUME_KEYS`) must match for a resume.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from dataclasses import dataclass

from .errors import DrtFastError

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "pA_lower", "count", "n")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
COLUMNS = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS}

# Sidecar entries that determine the rows' values. Left out on purpose: batch (results do
# not depend on it: noise is counter-based), max (a resumed run may certify more inputs:
# the first rows stay the same), device (noise is bit-identical on CPU and GPU), paths,
# the command line and versions (recorded for the reader, not compared).
RESUME_KEYS = ("task", "model_sha256", "dataset", "data_sha256", "split", "sigma", "n0", "n",
               "alpha", "seed", "mode", "precision", "skip", "noise", "grid")
# Keys that sidecars of earlier versions lack: compared only when the file has them.
_RESUME_KEYS_ADDED = ("data_sha256",)
# Keys that sidecars of earlier versions lack, with the value their runs had.
_RESUME_KEY_DEFAULTS = {"noise": "gaussian"}


def sidecar_path(out: str) -> str:
    """The metadata file that goes with results file ``out``."""
    return out + ".json"


def format_time(seconds: float) -> str:
    """Elapsed time as Cohen writes it: ``str(datetime.timedelta)``, e.g. ``0:00:01.234567``."""
    return str(datetime.timedelta(seconds=seconds))


def certify_row(idx: int, label: int, cert, seconds: float) -> str:
    """One certify row (with newline). ``cert`` has label, radius, pA_lower, count, n."""
    correct = int(cert.label == label)
    return (f"{idx}\t{label}\t{cert.label}\t{cert.radius:.3}\t{correct}\t{format_time(seconds)}"
            f"\t{cert.pA_lower:.6g}\t{cert.count}\t{cert.n}\n")


def predict_row(idx: int, label: int, prediction: int, seconds: float) -> str:
    """One predict row (with newline), Cohen's ``predict.py`` layout."""
    return f"{idx}\t{label}\t{prediction}\t{int(prediction == label)}\t{format_time(seconds)}\n"


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes (identifies the model in the sidecar)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(out: str, resume: bool) -> None:
    """Refuse, before any work, an output that exists without ``--resume`` or cannot be written.

    Probes the folder by creating and removing a temporary file there (permission bits
    alone say nothing when running as root or on some network file systems).
    """
    if os.path.isdir(out):
        raise DrtFastError(f"--out must be a file path, got the directory {out!r}")
    if not resume:
        for path in (out, sidecar_path(out)):
            if os.path.exists(path):
                raise DrtFastError(
                    f"output file {path!r} already exists; pass --resume to continue it, "
                    f"or choose another --out (drt-fast never overwrites results)")
    probe_writable(out, "results")


def probe_writable(path: str, what: str) -> None:
    """Raise a DrtFastError unless ``path`` can be written: a temporary file is created and
    removed in its folder (permission bits alone say nothing when running as root, in /proc
    or /sys, or on some network file systems) and an existing file is opened for appending
    (which changes nothing in it). ``what`` names the file in the message."""
    if os.path.isdir(path):
        raise DrtFastError(f"cannot write {what} to {path!r}: it is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DrtFastError(f"cannot write {what} to {path!r}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".drt-fast-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
        if os.path.exists(path):
            with open(path, "a"):
                pass
    except OSError as e:
        raise DrtFastError(f"cannot write {what} to {path!r}: {e.strerror or e}") from None


def created_file_mode() -> int:
    """The permission bits ``open()`` would give a new file under the current umask
    (``tempfile.mkstemp`` makes 0600 files; files that are meant to be shared get these)."""
    try:       # Linux says it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        os.chmod(tmp, created_file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_sidecar(out: str) -> dict | None:
    """The sidecar of ``out`` as a dict, or None when there is none."""
    path = sidecar_path(out)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DrtFastError(f"cannot read the metadata file {path!r}: {e}") from None
    if not isinstance(meta, dict):
        raise DrtFastError(f"metadata file {path!r} should hold a JSON object, got {type(meta).__name__}")
    return meta


def check_resume_compatible(old: dict, new: dict, out: str) -> None:
    """Refuse to resume ``out`` when a result-determining setting differs."""
    old = {**_RESUME_KEY_DEFAULTS, **old}
    diffs = [f"{key}: {old.get(key)!r} in the file, {new.get(key)!r} now"
             for key in RESUME_KEYS if old.get(key) != new.get(key)
             and not (key in _RESUME_KEYS_ADDED and key not in old)]
    if diffs:
        raise DrtFastError(f"cannot resume {out!r}: its configuration differs ({'; '.join(diffs)}); "
                           f"use the same settings or another --out")


@dataclass
class ResultsFile:
    """An open results file positioned for appending whole rows."""

    path: str
    columns: tuple
    done: set  # idx of rows already in the file
    _file: object = None

    def append(self, row: str) -> None:
        """Append one row and hand it to the OS at once (a killed process loses no whole row)."""
        self._file.write(row)
        self._file.flush()

    def sync(self) -> None:
        """Push the rows appended so far to the disk (survives a power cut, not just a kill)."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_results(out: str, task: str, resume: bool) -> ResultsFile:
    """Open ``out`` for appending ``task`` rows ("certify" or "predict").

    New file: writes the header. Resume: drops a trailing partial line (a run killed
    mid-write), checks the header, and collects the idx already present.
    """
    columns = COLUMNS[task]
    done = set()
    if resume and os.path.exists(out):
        _drop_partial_last_line(out)       # a kill during the header leaves nothing
    if resume and os.path.exists(out) and os.path.getsize(out) > 0:
        header, rows = _read_rows(out)
        if tuple(header) != columns:
            raise DrtFastError(f"cannot resume {out!r}: its header is {chr(9).join(header)!r}, "
                               f"expected the {task} header {chr(9).join(columns)!r}")
        # every row as analysis will read it (numbers, a finite radius), each input once
        try:
            kept = _parse_results(out, header, rows, task)
        except DrtFastError as e:
            raise DrtFastError(f"cannot resume: {e}; fix or remove that row") from None
        if any(len(row) != len(columns) for row in rows):
            number = next(n for n, row in enumerate(rows, start=2) if len(row) != len(columns))
            raise DrtFastError(f"cannot resume {out!r}: line {number} does not have the "
                               f"{len(columns)} columns of a {task} row; fix or remove it")
        done = set(kept.idx)
        if len(done) != len(kept.idx):
            raise DrtFastError(f"cannot resume {out!r}: it holds some idx twice")
        f = open(out, "a")
    else:
        f = open(out, "w")
        f.write("\t".join(columns) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return ResultsFile(out, columns, done, f)


def _drop_partial_last_line(path: str) -> None:
    """Truncate ``path`` after its last newline (the rest is a row cut short by a kill)."""
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def _read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    """Header fields and the rows' fields of a TSV file (blank lines skipped)."""
    with open(path) as f:
        lines = [line.rstrip("\n").rstrip("\r") for line in f]
    if not lines:
        raise DrtFastError(f"results file {path!r} is empty (expected a header line)")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return lines[0].split("\t"), rows


@dataclass
class Results:
    """The columns of a certify results file that analysis needs, as Python lists."""

    path: str
    idx: list
    label: list
    predict: list
    radius: list
    correct: list

    def __len__(self) -> int:
        return len(self.idx)


def read_results(path: str, task: str = "certify") -> Results:
    """Read a results TSV: drt-fast's, or Cohen's (only Cohen's columns needed).

    Columns are found by name, so extra columns in any order are fine. A predict file
    (``task="predict"``) has no radius column: its radii read as 0.
    """
    if not os.path.exists(path):
        raise DrtFastError(f"results file {path!r} does not exist")
    try:
        header, rows = _read_rows(path)
    except UnicodeDecodeError:
        raise DrtFastError(f"results file {path!r} is not a text TSV file") from None
    except OSError as e:                         # a directory, no read permission, ...
        raise DrtFastError(f"cannot read results file {path!r}: {e.strerror or e}") from None
    return _parse_results(path, header, rows, task)


def _parse_results(path: str, header: list, rows: list, task: str) -> Results:
    """`read_results` of a file's header and rows (as `_read_rows` gives them)."""
    header = [h.strip() for h in header]
    needed = ("idx", "label", "predict", "radius", "correct")
    if task == "predict":
        needed = tuple(c for c in needed if c != "radius")
    missing = [c for c in needed if c not in header]
    if missing:
        hint = " (a predict file has no radius: analyze reads certify results)" if missing == ["radius"] else ""
        raise DrtFastError(f"results file {path!r} lacks the column(s) {', '.join(missing)}: "
                           f"expected a header with {' '.join(needed)} ..., got {' '.join(header)!r}{hint}")
    col = {name: header.index(name) for name in needed}
    out = Results(path, [], [], [], [], [])
    for lineno, row in enumerate(rows, start=2):
        try:
            out.idx.append(int(row[col["idx"]]))
            out.label.append(int(row[col["label"]]))
            out.predict.append(int(row[col["predict"]]))
            out.radius.append(float(row[col["radius"]]) if "radius" in col else 0.0)
            out.correct.append(int(row[col["correct"]]))
        except (IndexError, ValueError):
            raise DrtFastError(f"results file {path!r}, line {lineno}: expected tab-separated "
                               f"values for {' '.join(header)}, got {chr(9).join(row)!r}") from None
        if not 0.0 <= out.radius[-1] < math.inf:           # NaN fails this too
            raise DrtFastError(f"results file {path!r}, line {lineno}: radius {row[col['radius']]!r} "
                               f"is not a finite number >= 0")
    return out
