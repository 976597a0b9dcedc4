"""Model registry (timm-like): ``create(name, num_classes)``, ``names()``, ``input_shape(name)``.

Every model maps a *normalized* input ``[B, C, H, W]`` to logits ``[B, num_classes]``;
members are wrapped as ``with_normalization(model, means, sds)`` so that noise is added in
pixel space (see `drt_fast.checkpoint`, which does it in one place).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn

from ..errors import DrtFastError
from .cifar_resnet import cifar_resnet20, cifar_resnet110
from .digits_cnn import DigitsCNN
from .lenet import LeNet
from .normalize import NormalizeLayer, with_normalization
from .resnet import resnet50


class _Entry(NamedTuple):
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]   # (C, H, W) the architecture is built for
    dataset: str                        # the dataset it is meant for
    classifier: str                     # name of the final nn.Linear (its rows = classes)


_REGISTRY: dict[str, _Entry] = {
    "digits_cnn": _Entry(DigitsCNN, (1, 8, 8), "digits", "fc"),
    "lenet": _Entry(LeNet, (1, 28, 28), "mnist", "fc2"),
    "cifar_resnet20": _Entry(cifar_resnet20, (3, 32, 32), "cifar10", "fc"),
    "cifar_resnet110": _Entry(cifar_resnet110, (3, 32, 32), "cifar10", "fc"),
    "resnet50": _Entry(resnet50, (3, 224, 224), "imagenet", "fc"),
}


def names() -> list[str]:
    """Registered architecture names, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DrtFastError(f"unknown architecture {name!r}; expected one of "
                           f"{', '.join(_REGISTRY)}") from None


def create(name: str, num_classes: int, **kw) -> nn.Module:
    """A freshly initialized ``name`` model with ``num_classes`` outputs (no
    normalization layer; wrap it with `with_normalization`)."""
    entry = _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DrtFastError(f"num_classes must be a positive integer, got {num_classes!r}")
    return entry.factory(num_classes=num_classes, **kw)


def input_shape(name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the inputs ``name`` is built for."""
    return _entry(name).input_shape


def default_dataset(name: str) -> str:
    """The dataset ``name`` is meant for (used to infer it for Cohen/DRT checkpoints)."""
    return _entry(name).dataset


def classifier_name(name: str) -> str:
    """Module name of ``name``'s final linear layer (``fc``, ``fc2``)."""
    return _entry(name).classifier


__all__ = ["create", "names", "input_shape", "default_dataset", "classifier_name", "NormalizeLayer",
           "with_normalization"]
