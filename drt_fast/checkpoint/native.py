"""drt-fast's own ensemble file: written by `save_ensemble`, read back by `from_drt_fast`
(the layout is in the package docstring)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import data, models
from ..ensemble import Ensemble, as_ensemble
from ..errors import DrtFastError, InvalidArgument
from ..models.normalize import NormalizeLayer
from .files import PathLike, atomic_torch_save, plain_config
from .members import build_member, check_state_dict, floats, new_member

FORMAT = "drt-fast-ensemble"
VERSION = 1


def save_ensemble(path: PathLike, ensemble: nn.Module, *, arch: str, dataset: str,
                  num_classes: int, input_shape: Sequence[int] | None = None,
                  normalization=None, sigma: float | None = None,
                  train_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``ensemble`` (an `Ensemble`, or one module) as a drt-fast ensemble file.

    Members are either ``with_normalization(model, ...)`` (their NormalizeLayer is saved as
    is) or bare ``arch`` models (the NormalizeLayer is added from ``normalization``).
    ``input_shape`` defaults to the architecture's, ``normalization`` (``(means, sds)`` or
    ``{"means", "sds"}``) to the members' NormalizeLayer or else the dataset's. Every
    member is checked against ``arch`` before anything is written. The write is atomic
    (temporary file in the same folder, then ``os.replace``). Returns the path.
    """
    ensemble = as_ensemble(ensemble)
    input_shape = tuple(int(v) for v in (input_shape or models.input_shape(arch)))
    if len(input_shape) != 3:
        raise InvalidArgument(f"input_shape must be (C, H, W), got {input_shape}")
    means, sds = _normalization_of(ensemble, normalization, dataset)
    if len(means) != input_shape[0]:
        raise InvalidArgument(f"normalization has {len(means)} channels but input_shape "
                           f"{input_shape} has {input_shape[0]}")
    if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise InvalidArgument(f"sigma must be a positive number or None, got {sigma!r}")

    expected = new_member(arch, num_classes, means, sds).state_dict()
    members = []
    for i, member in enumerate(ensemble.members):
        state = _member_state(member, means, sds, what=f"member {i}")
        check_state_dict(state, expected, arch, num_classes, what=f"member {i}")
        members.append(state)

    payload = {
        "format": FORMAT, "version": VERSION,
        "arch": arch, "dataset": dataset, "num_classes": int(num_classes),
        "input_shape": list(input_shape),
        "normalization": {"means": list(means), "sds": list(sds)},
        "members": members,
        "weights": [float(w) for w in ensemble.weights.tolist()],
        "mode": ensemble.mode,
        "sigma": None if sigma is None else float(sigma),
        "train_config": plain_config(dict(train_config or {})),
    }
    return atomic_torch_save(payload, Path(path))


def _normalization_of(ensemble: Ensemble, normalization, dataset: str):
    """(means, sds) as tuples of floats, from the argument, the first member's
    NormalizeLayer, or the dataset, in that order."""
    if isinstance(normalization, Mapping):
        normalization = (normalization.get("means"), normalization.get("sds"))
    if normalization is None:
        first = ensemble.members[0]
        if isinstance(first, nn.Sequential) and isinstance(first[0], NormalizeLayer):
            normalization = (floats(first[0].means), floats(first[0].sds))
        else:
            normalization = data.normalization(dataset)
    try:
        means, sds = normalization
        means = tuple(float(v) for v in means)
        sds = tuple(float(v) for v in sds)
    except (TypeError, ValueError):
        raise InvalidArgument(f"normalization must be (means, sds), got {normalization!r}") from None
    if not means or len(means) != len(sds) or min(sds) <= 0:
        raise InvalidArgument(f"normalization needs equally many means and positive sds, got "
                           f"means={list(means)} sds={list(sds)}")
    return means, sds


def _member_state(member: nn.Module, means, sds, what: str) -> dict[str, torch.Tensor]:
    """CPU state dict in the ``Sequential(NormalizeLayer, model)`` layout."""
    if isinstance(member, nn.Sequential) and len(member) == 2 and isinstance(member[0], NormalizeLayer):
        own = (floats(member[0].means), floats(member[0].sds))
        if not (len(own[0]) == len(means) and all(
                math.isclose(a, b, rel_tol=1e-6) for a, b in zip(own[0] + own[1], means + sds))):
            raise DrtFastError(f"{what}'s NormalizeLayer has means {list(own[0])}, sds "
                               f"{list(own[1])}; the file would say {list(means)}, {list(sds)}")
        state = member.state_dict()
    else:
        state = {f"1.{k}": v for k, v in member.state_dict().items()}
        state["0.means"] = torch.tensor(means, dtype=torch.float32).view(-1, 1, 1)
        state["0.sds"] = torch.tensor(sds, dtype=torch.float32).view(-1, 1, 1)
    # clone: a view would save its whole underlying storage.
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def from_drt_fast(ckpt: dict, path: Path):
    """(members, meta) of a drt-fast ensemble file's contents ``ckpt``."""
    version = ckpt.get("version")
    if version != VERSION:
        raise DrtFastError(f"{path}: drt-fast ensemble file version {version!r}; this "
                           f"drt-fast reads version {VERSION}")
    try:
        arch, dataset = str(ckpt["arch"]), str(ckpt["dataset"])
        num_classes = int(ckpt["num_classes"])
        input_shape = tuple(int(v) for v in ckpt["input_shape"])
        means = tuple(float(v) for v in ckpt["normalization"]["means"])
        sds = tuple(float(v) for v in ckpt["normalization"]["sds"])
        states = list(ckpt["members"])
        weights = [float(w) for w in ckpt["weights"]]
        mode = str(ckpt["mode"])
        sigma = None if ckpt.get("sigma") is None else float(ckpt["sigma"])
        train_config = dict(ckpt.get("train_config") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise DrtFastError(f"{path}: malformed drt-fast ensemble file ({type(exc).__name__}: "
                           f"{exc})") from None
    if not states:
        raise DrtFastError(f"{path}: the ensemble file holds no members")
    if len(weights) != len(states):
        raise DrtFastError(f"{path}: {len(states)} members but {len(weights)} weights")
    if len(input_shape) != 3 or input_shape[0] != len(means):
        raise DrtFastError(f"{path}: input_shape {list(input_shape)} does not match the "
                           f"{len(means)}-channel normalization")
    parts = [build_member(state, arch, num_classes, means, sds, f"{path} member {i}")
             for i, state in enumerate(states)]
    meta = dict(arch=arch, archs=[arch] * len(parts), dataset=dataset,
                num_classes=num_classes, input_shape=input_shape,
                normalization=(means, sds), own_normalization=[True] * len(parts), sigma=sigma,
                train_config=train_config, format="drt-fast", version=VERSION, mode=mode,
                weights=weights)
    return parts, meta
