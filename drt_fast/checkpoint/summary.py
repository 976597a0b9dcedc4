"""``drt-fast info``: a checkpoint described in a few lines."""
from __future__ import annotations

from typing import Mapping, Sequence

from ..ensemble import Ensemble
from .files import PathLike
from .load import load_checkpoint


def describe(path: PathLike | Sequence[PathLike]) -> str:
    """A human-readable summary of a checkpoint (or member files), for ``drt-fast info``."""
    return describe_loaded(*load_checkpoint(path))


def describe_loaded(ensemble: Ensemble, meta: Mapping) -> str:
    """`describe` of an ensemble `load_checkpoint` gave, with its ``meta``. Several member
    files: the ensemble, then each file's normalization, sigma and training."""
    counts = [sum(p.numel() for p in m.parameters()) for m in ensemble.members]
    shape = "x".join(str(v) for v in meta["input_shape"])
    files = meta.get("files") or [meta]
    lines = [
        f"file           {', '.join(meta['paths'])}",
        f"sha256         {meta['sha256']}",
        f"format         {meta['format']}" + (f" (version {meta['version']})" if meta.get("version") else ""),
        f"arch           {meta['arch']}",
        f"dataset        {meta['dataset']}",
        f"classes        {meta['num_classes']}",
        f"input shape    {shape}",
    ]
    if len(files) == 1:
        lines.append(_normalization_line(meta))
    lines.append(f"members        {meta['members']}")
    for i, (arch, count) in enumerate(zip(meta["archs"], counts)):
        lines.append(f"  member {i}     {arch}, {count:,} parameters")
    lines += [
        f"weights        {[round(w, 4) for w in meta['weights']]}",
        f"mode           {meta['mode']}",
    ]
    if len(files) == 1:
        lines.append(_sigma_line(meta))
        lines += _describe_training(meta.get("train_config") or {})
        return "\n".join(lines)
    first = 0
    for f in files:           # each member file's own record
        span = f"member {first}" if f["members"] == 1 else f"members {first}-{first + f['members'] - 1}"
        first += f["members"]
        lines.append(f"{span + ':':<15}{', '.join(f['paths'])} ({f['format']}, sha256 {f['sha256'][:12]})")
        lines += ["  " + line for line in [_normalization_line(f), _sigma_line(f),
                                             *_describe_training(f.get("train_config") or {})]]
    return "\n".join(lines)


def _normalization_line(meta: Mapping) -> str:
    means, sds = meta["normalization"]
    own = meta.get("own_normalization") or [True]
    note = "" if all(own) else " (not in the file: its arch's dataset's, unless the data or --means/--sds set one)"
    return f"normalization  means {list(means)}, sds {list(sds)}{note}"


def _sigma_line(meta: Mapping) -> str:
    return (f"sigma          {'unknown' if meta['sigma'] is None else meta['sigma']}"
            + (" (from the file's noise_<sigma> folder)" if meta["sigma"] is not None
               and meta.get("format") == "cohen" else ""))


_TRAINING_SHOWN = ("trainer", "rho1", "rho2", "gd_norm", "m", "eps", "steps", "eps_warmup", "epochs",
                   "lr", "lr_schedule", "batch", "weight_decay", "seed", "init", "world_size")


_TRAINER_ONLY = {"rho1": "drt", "rho2": "drt", "gd_norm": "drt", "eps": "smoothadv",
                 "steps": "smoothadv", "eps_warmup": "smoothadv"}


def _describe_training(config: Mapping) -> list[str]:
    """The ``training`` (and ``command``) lines of `describe`."""
    if not config:
        return ["training       (no configuration recorded)"]
    trainer = str(config.get("trainer", ""))
    if not trainer:                                # not drt-fast's (e.g. a Cohen file's epoch)
        return ["training       " + ", ".join(f"{k}={v}" for k, v in config.items())]
    shown = []
    for key in _TRAINING_SHOWN:
        value = config.get(key)
        if value is None or (key in _TRAINER_ONLY and _TRAINER_ONLY[key] not in trainer):
            continue
        if key == "epochs" and config.get("epochs_done") not in (None, value):
            value = f"{value} ({config['epochs_done']} done)"
        if key == "world_size" and value == 1:
            continue
        shown.append(f"{key}={value}")
    lines = ["training       " + ", ".join(shown)]
    if config.get("command"):
        lines.append(f"command        {config['command']}")
    return lines
