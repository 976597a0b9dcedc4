"""The results TSV: checked before a run, opened for appending whole rows, read back.

Rows are appended and flushed one at a time (and fsync'ed after each group of inputs), so a
run killed at any moment (SIGKILL included) leaves whole rows plus at most one partial last
line, which `open_results` drops on resume.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..errors import DrtFastError
from .files import probe_writable, write_json_atomic
from .rows import COLUMNS
from .sidecar import record_rows, sidecar_path


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


@dataclass
class ResultsFile:
    """An open results file positioned for appending whole rows."""

    path: str
    columns: tuple
    done: set  # idx of rows already in the file
    _file: object = None
    order: list = field(default_factory=list)   # idx of every row in the file, in file order
    sidecar: dict = None                         # what `start_run` wrote to <path>.json

    def append(self, row: str) -> None:
        """Append one row and hand it to the OS at once (a killed process loses no whole row)."""
        self._file.write(row)
        self._file.flush()
        self.order.append(int(row.split("\t", 1)[0]))

    def sync(self, settings: dict | None = None) -> None:
        """Push the rows appended so far to the disk (survives a power cut, not just a kill),
        then record them in this run's segment of the sidecar, with its ``settings`` as they
        are now (what the engine made of them may only be known after the first batch)."""
        os.fsync(self._file.fileno())
        if self.sidecar is not None:
            record_rows(self.sidecar, self.order, settings)
            write_json_atomic(sidecar_path(self.path), self.sidecar)

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
        order = list(kept.idx)
        f = open(out, "a")
    else:
        order = []
        f = open(out, "w")
        f.write("\t".join(columns) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return ResultsFile(out, columns, done, f, order)


def _drop_partial_last_line(path: str) -> None:
    """Truncate ``path`` after its last newline (the rest is a row cut short by a kill)."""
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def results_task(path: str) -> str:
    """"predict" for a file with a predict header (no radius column), else "certify"."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).decode("utf-8", "replace").rstrip("\r\n").split("\t")
    except OSError as e:
        raise DrtFastError(f"cannot read results file {path!r}: {e.strerror or e}") from None
    return "predict" if "radius" not in first and "predict" in first else "certify"


def is_results_file(path: str) -> bool:
    """Whether ``path`` looks like a results TSV (its first line starts with ``idx<TAB>``)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"idx\t"
    except OSError:
        return False


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
    """The columns of a certify results file that analysis needs, as Python lists; ``n``
    (estimation draws of each row) is None when the file has no such column (Cohen's)."""

    path: str
    idx: list
    label: list
    predict: list
    radius: list
    correct: list
    n: list = None

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
    if task == "certify" and "n" in header:
        col["n"] = header.index("n")
    out = Results(path, [], [], [], [], [], [] if "n" in col else None)
    for lineno, row in enumerate(rows, start=2):
        try:
            out.idx.append(int(row[col["idx"]]))
            out.label.append(int(row[col["label"]]))
            out.predict.append(int(row[col["predict"]]))
            out.radius.append(float(row[col["radius"]]) if "radius" in col else 0.0)
            out.correct.append(int(row[col["correct"]]))
            if out.n is not None:
                out.n.append(int(row[col["n"]]))
        except (IndexError, ValueError):
            raise DrtFastError(f"results file {path!r}, line {lineno}: expected tab-separated "
                               f"values for {' '.join(header)}, got {chr(9).join(row)!r}") from None
        if not 0.0 <= out.radius[-1] < math.inf:           # NaN fails this too
            raise DrtFastError(f"results file {path!r}, line {lineno}: radius {row[col['radius']]!r} "
                               f"is not a finite number >= 0")
    return out
