"""Result files: Cohen-format TSV rows, the JSON metadata sidecar, and resume.

A results file is what Cohen's ``certify.py`` / ``predict.py`` write, so existing analysis
scripts read it unchanged, with drt-fast's extra columns after Cohen's::

    certify:  idx  label  predict  radius  correct  time  pA_lower  count  n
    predict:  idx  label  predict  correct  time

``radius`` and ``pA_lower`` are written rounded down (`format_down`): never above the value
computed, and reading one back gives exactly that value (Cohen's ``{:.3}`` rounds to nearest,
which wrote 0.24951 as 0.25).

Rows are appended and flushed one at a time (and fsync'ed after each group of inputs),
so a run killed at any moment (SIGKILL included) leaves whole rows plus at most one
partial last line, which :func:`open_results` drops on resume.

The sidecar ``<out>.json`` holds the configuration of the latest run at its top level; its
result-determining part (:data:`RESUME_KEYS`) must match for a resume. ``segments`` lists
every run that wrote to the file, in order (`new_segment`): when it started, the rows it
wrote (``first_row``, ``rows``, ``idx`` = [first, last]), its `SEGMENT_SETTINGS` (batch,
device, engine levers: each makes a slightly different floating-point base classifier) and
versions. A sidecar of an earlier version has no ``segments``: it reads as one run.
"""
from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

from .errors import DrtFastError

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "pA_lower", "count", "n")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
COLUMNS = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS}

# Sidecar entries that determine the rows' values. Left out on purpose: batch (results do
# not depend on it: noise is counter-based), max (a resumed run may certify more inputs:
# the first rows stay the same), device (noise is bit-identical on CPU and GPU), paths,
# the command line and versions (recorded for the reader, not compared).
RESUME_KEYS = ("task", "model_sha256", "dataset", "data_sha256", "split", "sigma", "n0", "n",
               "alpha", "seed", "mode", "normalization", "precision", "skip",
               "certification", "radii", "futility")
# Keys that sidecars of earlier versions lack: compared only when the file has them.
_RESUME_KEYS_ADDED = ("data_sha256", "normalization")
# ... or read with the value they had then: every such certify file is a fixed-n one.
_EARLIER_VALUES = {"certification": lambda meta: "fixed-n" if meta.get("task") == "certify" else None}

# What each run (segment) of a file records of its own: settings that leave the certificates
# of exact arithmetic alone but each make a slightly different floating-point base
# classifier (batch composition, kernels, layout; "fused" and "graphs" say what the engine
# made of fuse and cuda_graphs), then the versions.
SEGMENT_SETTINGS = ("batch", "device", "fuse", "cuda_graphs", "channels_last", "cifar_resnet_kernel",
                    "fused", "graphs")
SEGMENT_VERSIONS = ("drt_fast_version", "torch_version")


def sidecar_path(out: str) -> str:
    """The metadata file that goes with results file ``out``."""
    return out + ".json"


def format_time(seconds: float) -> str:
    """Elapsed time as Cohen writes it: ``str(datetime.timedelta)``, e.g. ``0:00:01.234567``."""
    return str(datetime.timedelta(seconds=seconds))


def format_down(value: float) -> str:
    """``value`` (a finite float) as the shortest decimal that is never above it and that
    reads back (``float()``) as ``value`` itself: its exact binary value cut, not rounded,
    after as few significant digits as that takes (0.25 -> ``0.25``, 0.1 -> ``0.1``, 0.3 ->
    ``0.29999999999999998``, 0.2495123... -> its 16-17 digits). Plain notation, never an
    exponent; a whole number keeps a ``.0`` as Python writes floats."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"format_down takes a finite number, got {value}")
    if value == 0:
        return "0.0"
    exact = decimal.Decimal(value)              # the float's exact binary value, in decimal
    for digits in range(1, 40):
        cut = decimal.Context(prec=digits, rounding=decimal.ROUND_FLOOR).plus(exact)
        if float(cut) == value:
            break
    else:                                       # unreachable: 40 digits always read back
        cut = exact
    text = format(cut, "f")
    return text if "." in text else text + ".0"


def certify_row(idx: int, label: int, cert, seconds: float) -> str:
    """One certify row (with newline). ``cert`` has label, radius, pA_lower, count, n;
    radius and pA_lower are written by `format_down` (never above their values)."""
    correct = int(cert.label == label)
    return (f"{idx}\t{label}\t{cert.label}\t{format_down(cert.radius)}\t{correct}\t{format_time(seconds)}"
            f"\t{format_down(cert.pA_lower)}\t{cert.count}\t{cert.n}\n")


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
    def value(meta, key):
        return meta[key] if key in meta else _EARLIER_VALUES.get(key, lambda meta: None)(meta)

    diffs = [f"{key}: {value(old, key)!r} in the file, {value(new, key)!r} now"
             for key in RESUME_KEYS if value(old, key) != value(new, key)
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
            segment = self.sidecar["segments"][-1]
            count_rows(self.sidecar["segments"], self.order)
            segment["updated"] = _now()
            if settings is not None:
                segment["settings"] = {key: settings.get(key) for key in SEGMENT_SETTINGS}
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


def start_run(out: str, task: str, config: dict, settings: dict, resume: bool) -> ResultsFile:
    """Open ``out`` for a run of ``task`` with ``config`` (the sidecar's top level) and
    ``settings`` (its `SEGMENT_SETTINGS`): a new file, or with ``resume`` the rows of an
    existing one continued, after its sidecar is found compatible. The sidecar gets this run
    as a new segment after those of the runs before; it is written before any row, so a
    kill in between leaves no row without its configuration."""
    old = None
    if resume and os.path.exists(out):
        old = read_sidecar(out)
        if old is None:
            raise DrtFastError(f"cannot resume {out!r}: its metadata file {sidecar_path(out)!r} is "
                               f"missing, so its configuration is unknown")
        check_resume_compatible(old, config, out)
    try:
        if old is None:
            sidecar = dict(config, segments=[new_segment(config, settings, 0)])
            write_json_atomic(sidecar_path(out), sidecar)
            results = open_results(out, task, resume)
        else:
            results = open_results(out, task, resume)
            segments = segments_of(old, results.order)
            sidecar = dict(config, segments=[*segments, new_segment(config, settings, len(results.order))])
            write_json_atomic(sidecar_path(out), sidecar)
    except OSError as e:
        raise DrtFastError(f"cannot write results to {out!r}: {e.strerror or e}") from None
    results.sidecar = sidecar
    return results


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_segment(config: dict, settings: dict, first_row: int) -> dict:
    """The sidecar's record of a run that starts now, with ``first_row`` rows in the file
    before its own (``rows`` and ``idx`` grow as it writes)."""
    unknown = [key for key in settings if key not in SEGMENT_SETTINGS]
    if unknown:
        raise ValueError(f"not segment settings: {unknown}")
    return {"started": _now(), "command": config.get("command"), "first_row": first_row, "rows": 0,
            "idx": None, "settings": {key: settings.get(key) for key in SEGMENT_SETTINGS},
            **{key: config.get(key) for key in SEGMENT_VERSIONS}}


def segments_of(meta: dict, order: list | None = None) -> list:
    """The runs a sidecar records (copies), with their ``rows`` and ``idx`` counted again
    from the file when ``order`` (the idx of its rows, in file order) is given: a run killed
    between writing rows and recording them recorded too few. A sidecar of an earlier
    version records no runs: it reads as one, with its top-level settings."""
    if isinstance(meta.get("segments"), list) and meta["segments"]:
        segments = [dict(segment) for segment in meta["segments"]]
    else:
        segments = [{"started": None, "command": meta.get("command"), "first_row": 0, "rows": None, "idx": None,
                     "settings": {key: meta.get(key) for key in SEGMENT_SETTINGS},
                     **{key: meta.get(key) for key in SEGMENT_VERSIONS},
                     "note": "rebuilt from a sidecar written before runs were recorded"}]
    if order is not None:
        count_rows(segments, order)
    return segments


def count_rows(segments: list, order: list) -> None:
    """Set each segment's ``rows`` and ``idx`` from the file's rows (``order``: their idx in
    file order): a run owns the rows from its first_row to the next run's."""
    for segment, following in zip(segments, segments[1:] + [None]):
        first = min(segment["first_row"], len(order))
        end = min(following["first_row"] if following is not None else len(order), len(order))
        segment["rows"] = max(0, end - first)
        segment["idx"] = [order[first], order[end - 1]] if end > first else None


def mixed_settings(segments: list) -> dict:
    """``{name: [value of each run that wrote rows]}`` for the settings and versions that
    differ between those runs (`segments_of`; a value a run did not record is not
    compared): empty when the rows come from one run, or from runs with the same settings."""
    runs = [s for s in segments if s.get("rows") is None or s["rows"] > 0]
    mixed = {}
    for key in SEGMENT_SETTINGS + SEGMENT_VERSIONS:
        values = [(s.get("settings") or {}).get(key) if key in SEGMENT_SETTINGS else s.get(key) for s in runs]
        known = [v for v in values if v is not None]
        if len({json.dumps(v, sort_keys=True) for v in known}) > 1:
            mixed[key] = values
    return mixed


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
