"""The sidecar ``<out>.json`` of a results file: the latest run's configuration at its top
level, and ``segments``, every run that wrote to the file, in order.

A segment records when its run started, the rows it wrote (``first_row``, ``rows``, ``idx``
= [first, last]), its `SEGMENT_SETTINGS` and the versions (`SEGMENT_VERSIONS`). A sidecar of
an earlier version has no ``segments``: it reads as one run (`segments_of`).
"""
from __future__ import annotations

import datetime
import json
import os

from ..errors import DrtFastError

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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _segment_settings(settings: dict) -> dict:
    """``settings`` as a segment records them: every `SEGMENT_SETTINGS` key, None if absent."""
    return {key: settings.get(key) for key in SEGMENT_SETTINGS}


def new_segment(config: dict, settings: dict, first_row: int) -> dict:
    """The sidecar's record of a run that starts now, with ``first_row`` rows in the file
    before its own (``rows`` and ``idx`` grow as it writes)."""
    unknown = [key for key in settings if key not in SEGMENT_SETTINGS]
    if unknown:
        raise ValueError(f"not segment settings: {unknown}")
    return {"started": _now(), "command": config.get("command"), "first_row": first_row, "rows": 0,
            "idx": None, "settings": _segment_settings(settings),
            **{key: config.get(key) for key in SEGMENT_VERSIONS}}


def record_rows(sidecar: dict, order: list, settings: dict | None = None) -> None:
    """Record in ``sidecar`` the rows of its file (``order``: their idx in file order) and,
    when given, the latest run's ``settings`` as they are now (what the engine made of
    them may only be known after the first batch)."""
    segment = sidecar["segments"][-1]
    count_rows(sidecar["segments"], order)
    segment["updated"] = _now()
    if settings is not None:
        segment["settings"] = _segment_settings(settings)


def segments_of(meta: dict, order: list | None = None) -> list:
    """The runs a sidecar records (copies), with their ``rows`` and ``idx`` counted again
    from the file when ``order`` (the idx of its rows, in file order) is given: a run killed
    between writing rows and recording them recorded too few. A sidecar of an earlier
    version records no runs: it reads as one, with its top-level settings."""
    if isinstance(meta.get("segments"), list) and meta["segments"]:
        segments = [dict(segment) for segment in meta["segments"]]
    else:
        segments = [{"started": None, "command": meta.get("command"), "first_row": 0, "rows": None, "idx": None,
                     "settings": _segment_settings(meta),
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
