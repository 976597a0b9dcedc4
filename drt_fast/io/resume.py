"""Starting a run on a results file: a new file, or an existing one continued (``--resume``)
once its sidecar's result-determining part (`RESUME_KEYS`) matches this run's."""
from __future__ import annotations

import os

from ..errors import DrtFastError
from .files import write_json_atomic
from .results import ResultsFile, open_results
from .sidecar import new_segment, read_sidecar, segments_of, sidecar_path

# Sidecar entries that determine the rows' values. Left out on purpose: batch (results do
# not depend on it: noise is counter-based), max (a resumed run may certify more inputs:
# the first rows stay the same), device (noise is bit-identical on CPU and GPU), paths,
# the command line and versions (recorded for the reader, not compared).
RESUME_KEYS = ("task", "model_sha256", "dataset", "data_sha256", "split", "sigma", "n0", "n",
               "alpha", "seed", "mode", "normalization", "precision", "skip",
               "certification", "radii", "futility",
               "noise", "grid")
# Keys that sidecars of earlier versions lack: compared only when the file has them.
_RESUME_KEYS_ADDED = ("data_sha256", "normalization")
# ... or read with the value they had then: every such certify file is a fixed-n one.
_EARLIER_VALUES = {"certification": lambda meta: "fixed-n" if meta.get("task") == "certify" else None,
                   "noise": lambda meta: "gaussian"}


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
