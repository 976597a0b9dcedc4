"""Reading checkpoints: one file (either layout), several member files as one ensemble, and
the files a user named (every failure one DrtFastError line)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from .. import models
from ..ensemble import Ensemble
from ..errors import DrtFastError, InvalidArgument, first_line
from ..io import sha256_file
from .cohen import from_cohen
from .files import PathLike, safe_load
from .members import few
from .native import FORMAT, from_drt_fast


def load_checkpoint(path: PathLike | Sequence[PathLike], mode: str | None = None,
                  map_location="cpu", dataset: str | None = None):
    """Load a drt-fast ensemble file or a Cohen/DRT checkpoint (one member); a list of
    paths joins their members (see `load_members`).

    Returns ``(Ensemble in eval mode, meta)``; meta holds ``arch``, ``archs`` (one per
    member), ``dataset``, ``num_classes``, ``input_shape`` (C, H, W), ``normalization``
    ``(means, sds)``, ``sigma`` (None when unknown; for Cohen files read from a
    ``noise_<sigma>`` folder in the path when there is one), ``train_config``, ``format``
    (``"drt-fast"`` or ``"cohen"``), ``mode``, ``weights``, ``members`` (M), ``paths`` and
    ``sha256`` (of the file; with several files, of their hashes in order). ``mode``
    overrides the file's; ``dataset`` overrides the one a Cohen file's arch implies.
    """
    if isinstance(path, (list, tuple)):
        return load_members(path, mode=mode, map_location=map_location, dataset=dataset)
    parts, meta = _read_members(Path(path), map_location, dataset)
    ensemble = Ensemble(parts, mode=mode or meta["mode"], weights=meta["weights"])
    meta["mode"] = ensemble.mode
    return ensemble.eval(), meta


def load_ensemble(path: PathLike | Sequence[PathLike], mode: str | None = None,
                  map_location="cpu", dataset: str | None = None) -> Ensemble:
    """The public loader of docs/DESIGN.md section 4: `load_checkpoint`'s Ensemble, with its
    metadata dict attached as ``ensemble.meta``."""
    ensemble, meta = load_checkpoint(path, mode=mode, map_location=map_location, dataset=dataset)
    ensemble.meta = meta
    return ensemble


def load_members(paths: Sequence[PathLike], mode: str | None = None, weights=None,
                 map_location="cpu", dataset: str | None = None):
    """One ensemble from several checkpoint files (Cohen/DRT members, or drt-fast files),
    members in the order given. They must agree on classes, input shape and dataset.
    Weights: the argument, else each file's member weights (uniform for Cohen files)
    rescaled by its number of members, i.e. every member counts equally by default.
    Returns ``(Ensemble, meta)`` as `load_checkpoint`."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InvalidArgument("expected at least one checkpoint path, got none")
    members, metas = [], []
    for p in paths:
        parts, meta = _read_members(p, map_location, dataset)
        members += parts
        metas.append(meta)
    first = metas[0]
    for p, meta in zip(paths[1:], metas[1:]):
        for key in ("num_classes", "input_shape", "dataset"):
            if meta[key] != first[key]:
                raise DrtFastError(f"checkpoints disagree on {key}: {paths[0]} has "
                                   f"{first[key]}, {p} has {meta[key]}")
    if weights is None and len(metas) > 1:
        # Each file's weights sum to 1; scale by its member count so members count equally.
        weights = [w * m["members"] for m in metas for w in m["weights"]]
    elif weights is None:
        weights = first["weights"]
    ensemble = Ensemble(members, mode=mode or first["mode"], weights=weights)
    archs = [a for m in metas for a in m["archs"]]
    meta = dict(first)
    meta.update(
        arch=archs[0] if len(set(archs)) == 1 else ",".join(dict.fromkeys(archs)),
        archs=archs, mode=ensemble.mode, weights=ensemble.weights.tolist(),
        own_normalization=[own for m in metas for own in m["own_normalization"]], files=metas,
        members=len(members), paths=[str(p) for p in paths],
        format=first["format"] if len({m["format"] for m in metas}) == 1 else "mixed",
        sha256=first["sha256"] if len(metas) == 1 else hashlib.sha256(
            "".join(m["sha256"] for m in metas).encode()).hexdigest(),
        sigma=first["sigma"] if len({m["sigma"] for m in metas}) == 1 else None,
    )
    return ensemble.eval(), meta


def open_checkpoints(paths: Sequence[PathLike], mode: str | None = None, dataset: str | None = None):
    """`load_checkpoint` of the file(s) a user named (one path, or several member files):
    every failure, a missing file or one the loader cannot read, is one DrtFastError line.
    ``dataset`` is the data's name: a Cohen file's normalization follows it (an ``npz``
    states none of its own; see `resolve_normalization`)."""
    for path in paths:
        if not os.path.exists(path):
            raise DrtFastError(f"checkpoint {os.fspath(path)!r} does not exist")
        if os.path.isdir(path):
            raise DrtFastError(f"checkpoint {os.fspath(path)!r} is a directory, expected a file")
    target = os.fspath(paths[0]) if len(paths) == 1 else [os.fspath(p) for p in paths]
    try:
        return load_checkpoint(target, mode=mode, dataset=dataset if dataset != "npz" else None)
    except DrtFastError:
        raise
    except Exception as e:  # a format the loader did not anticipate is still the user's file
        raise DrtFastError(f"cannot load checkpoint {target!r}: {first_line(e)}") from None


def _read_members(path: Path, map_location, dataset: str | None):
    """(list of member modules, meta) of one file."""
    checkpoint, sha = _torch_load(path, map_location)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        parts, meta = from_drt_fast(checkpoint, path)
    elif isinstance(checkpoint, dict) and "arch" in checkpoint and "state_dict" in checkpoint:
        parts, meta = from_cohen(checkpoint, path, dataset)
    elif isinstance(checkpoint, dict) and checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        # torch.save(model.state_dict()): name its size, not its hundreds of keys
        raise DrtFastError(f"{path} is a bare state dict ({len(checkpoint)} tensors, e.g. "
                           f"{few(list(map(str, checkpoint)))}) with no architecture; save it "
                           f"as {{'arch': NAME, 'state_dict': ...}} (arch one of "
                           f"{', '.join(models.names())})")
    else:
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        if isinstance(keys, list) and len(keys) > 10:
            keys = f"{keys[:10]} and {len(keys) - 10} more keys"
        raise DrtFastError(f"{path} is neither a drt-fast ensemble file nor a Cohen/DRT "
                           f"checkpoint ({{'arch', 'state_dict'}}); it holds {keys}")
    meta.update(sha256=sha, paths=[str(path)], members=len(parts))
    return parts, meta


def _torch_load(path: Path, map_location):
    if not path.exists():
        raise DrtFastError(f"checkpoint {path.name} not found in {path.parent.resolve()}")
    if not path.is_file():
        raise DrtFastError(f"checkpoint {path} is not a file")
    sha = sha256_file(path)
    return safe_load(path, map_location, "checkpoint"), sha
