"""Cohen/DRT checkpoints: ``{"arch", "state_dict"}`` of one ``Sequential(NormalizeLayer,
model)``, possibly from DataParallel, read as one member."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from .. import data, models
from ..errors import DrtFastError
from .members import build_member, floats


def from_cohen(ckpt: dict, path: Path, dataset: str | None):
    """(members, meta) of a Cohen/DRT checkpoint's contents ``ckpt``; the dataset (hence the
    normalization) is ``dataset``, else the one the arch implies."""
    arch = str(ckpt["arch"])
    dataset = dataset or models.default_dataset(arch)   # also rejects unknown archs
    means, sds = data.normalization(dataset)
    channels = models.input_shape(arch)[0]
    if len(means) != channels:
        raise DrtFastError(f"{path}: {arch} takes {channels}-channel inputs but dataset "
                           f"{dataset!r} has {len(means)} channel(s)")
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DrtFastError(f"{path}: 'state_dict' must map names to tensors")
    state = _cohen_layout(state)
    num_classes = _classifier_outputs(state, arch, path)
    own = "0.means" in state and "0.sds" in state      # codebases whose NormalizeLayer has buffers
    # Cohen's NormalizeLayer kept means/sds as attributes: fill them from the dataset.
    state.setdefault("0.means", torch.tensor(means, dtype=torch.float32).view(-1, 1, 1))
    state.setdefault("0.sds", torch.tensor(sds, dtype=torch.float32).view(-1, 1, 1))
    member = build_member(state, arch, num_classes, means, sds, str(path))
    means, sds = floats(member[0].means), floats(member[0].sds)
    meta = dict(arch=arch, archs=[arch], dataset=dataset, num_classes=num_classes,
                input_shape=models.input_shape(arch), normalization=(means, sds),
                own_normalization=[own], sigma=_sigma_from_path(path), format="cohen",
                version=None, mode="we",
                weights=[1.0],
                train_config={k: ckpt[k] for k in ("epoch",) if k in ckpt})
    return [member], meta


def _cohen_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module`` (DataParallel/DDP) wherever it sits in a key; a bare model's state
    dict (no ``0.``/``1.`` prefix) is put under ``1.``."""
    out = {".".join(p for p in key.split(".") if p != "module"): v for key, v in state.items()}
    if not any(k.startswith(("0.", "1.")) for k in out):
        out = {f"1.{k}": v for k, v in out.items()}
    for key in ("0.means", "0.sds"):   # codebases whose NormalizeLayer has [C] buffers
        if key in out and out[key].dim() == 1:
            out[key] = out[key].view(-1, 1, 1)
    return out


def _classifier_outputs(state: Mapping[str, torch.Tensor], arch: str, path: Path) -> int:
    """num_classes = rows of the architecture's final linear layer in ``state``."""
    key = f"1.{models.classifier_name(arch)}.weight"
    if key not in state or state[key].dim() != 2:
        raise DrtFastError(f"{path}: state dict has no 2-d {key!r} (the classifier of "
                           f"{arch}); is the arch right?")
    return int(state[key].shape[0])


def _sigma_from_path(path: Path) -> float | None:
    """Cohen's released models live in ``.../noise_0.25/checkpoint.pth.tar``."""
    for part in reversed(path.resolve().parts):
        match = re.fullmatch(r"noise_(\d+(?:\.\d+)?)", part)
        if match:
            return float(match.group(1))
    return None
