"""Fitting a loaded checkpoint to the data: its input normalization, its classes and shape."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..ensemble import Ensemble
from ..errors import DrtFastError, first_line
from ..models.normalize import NormalizeLayer
from .members import floats


def resolve_normalization(ensemble: Ensemble, meta: dict, given=None, data=None) -> str:
    """Settle the input normalization of a loaded ensemble, the way users of Cohen's code
    expect: a checkpoint's own normalization wins; a member that carries none (a Cohen
    file, whose NormalizeLayer kept its means/sds out of the state dict) takes ``given``
    (``(means, sds)`` the user set explicitly), else ``data`` (the normalization the data
    states: a named dataset's, an .npz file's ``means``/``sds``), else keeps the one of the
    dataset its arch implies (what `load_checkpoint` gave it).

    ``given`` that differs from a member's own normalization is a conflict (DrtFastError).
    Updates ``meta["normalization"]`` and returns where it came from: ``"checkpoint"``,
    ``"given"``, ``"data"`` or ``"arch"`` (members of several sources: e.g. ``"checkpoint,
    given"``).
    """
    own = list(meta.get("own_normalization") or [True] * len(ensemble.members))
    sources = []
    for member, has_own in zip(ensemble.members, own):
        layer = member[0] if isinstance(member, nn.Sequential) and len(member) else None
        if not isinstance(layer, NormalizeLayer):
            raise DrtFastError(f"{_name(meta)}: a member has no NormalizeLayer to normalize with")
        current = (floats(layer.means), floats(layer.sds))
        if has_own:
            if given is not None and not same_normalization(current, given):
                raise DrtFastError(f"{_name(meta)} carries its own normalization (means "
                                   f"{list(current[0])}, sds {list(current[1])}); --means/--sds set it "
                                   f"only for a checkpoint that has none")
            sources.append("checkpoint")
            continue
        chosen, source = (given, "given") if given is not None else (data, "data") if data is not None \
            else (None, "arch")
        if chosen is not None:
            means, sds = (tuple(float(v) for v in chosen[0]), tuple(float(v) for v in chosen[1]))
            if len(means) != layer.means.numel() or len(sds) != len(means) or min(sds) <= 0:
                what = "--means/--sds" if source == "given" else "the data's normalization"
                raise DrtFastError(f"{what} must hold {layer.means.numel()} values each (sds > 0) for "
                                   f"{_name(meta)}, got means {list(means)}, sds {list(sds)}")
            with torch.no_grad():
                layer.means.copy_(torch.tensor(means).view_as(layer.means))
                layer.sds.copy_(torch.tensor(sds).view_as(layer.sds))
        sources.append(source)
    first = ensemble.members[0][0]
    meta["normalization"] = (floats(first.means), floats(first.sds))
    return ", ".join(dict.fromkeys(sources))


def same_normalization(a, b) -> bool:
    """Whether two ``(means, sds)`` are the same, up to float32 rounding."""
    return len(a[0]) == len(b[0]) and len(a[1]) == len(b[1]) and all(
        math.isclose(float(x), float(y), rel_tol=1e-5, abs_tol=1e-7)
        for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]]))


def _name(meta: Mapping) -> str:
    paths = meta.get("paths") or ["checkpoint"]
    return f"checkpoint {paths[0]}" if len(paths) == 1 else f"checkpoints {', '.join(paths)}"


def check_fits(ensemble, meta: Mapping, ds, model_path, dataset_name: str, device) -> int:
    """Check that the checkpoint's classes and input shape match the data ``ds`` (a
    `data.Dataset`), with one clean forward pass of its first input; returns the number
    of classes to smooth over. That is the data's, or the model's where the data's count
    is only a lower bound (`data.Dataset.classes_from_labels`) and the model has more."""
    shape = tuple(ds.x.shape[1:])
    data_classes = ds.num_classes

    def fits(model_classes: int) -> bool:
        return model_classes == data_classes or (ds.classes_from_labels and model_classes > data_classes)

    def refuse(what: str, model_classes: int):
        hint = (" (its labels; an npz entry num_classes sets the count)"
                if ds.classes_from_labels else "")
        if model_classes > data_classes and dataset_name == "imagenet":
            hint += (": an image folder's labels are the positions of its sorted class folders, so "
                     "to certify some of the model's classes keep all its class folders (empty "
                     "ones count), or write an .npz whose y holds the model's class indices, with "
                     f"num_classes={model_classes}")
        elif model_classes > data_classes:
            hint += (f": to certify some of the model's classes, write an .npz whose y holds the "
                     f"model's class indices, with num_classes={model_classes}")
        raise DrtFastError(f"checkpoint {model_path!r} {what} classes, the {dataset_name} data has "
                           f"{data_classes}{hint}")

    if meta.get("num_classes") is not None and not fits(int(meta["num_classes"])):
        refuse(f"has {meta['num_classes']}", int(meta["num_classes"]))
    expected = tuple(meta["input_shape"]) if meta.get("input_shape") is not None else None
    if expected is not None and expected != shape:
        # x written as N, H, W, C (numpy/PIL/Keras order) reads as C = H
        hwc = len(shape) == 3 and shape == (*expected[1:], expected[0])
        raise DrtFastError(f"checkpoint {model_path!r} takes inputs of shape {expected}, "
                           f"the {dataset_name} data has shape {shape}"
                           + ("; if x is N, H, W, C, transpose it to N, C, H, W "
                              "(x.transpose(0, 3, 1, 2))" if hwc else ""))
    try:
        with torch.inference_mode():
            logits = ensemble(ds.x[:1].to(device=device, dtype=torch.float32))
    except RuntimeError as e:
        raise DrtFastError(f"checkpoint {model_path!r} cannot take the {dataset_name} inputs of shape "
                           f"{shape}: {first_line(e)}") from None
    if not fits(logits.shape[-1]):          # logits: [M, 1, K]
        refuse(f"outputs {logits.shape[-1]}", int(logits.shape[-1]))
    return int(logits.shape[-1])
