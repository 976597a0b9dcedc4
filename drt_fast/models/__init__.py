"""Model registry (timm-like): ``create(name, num_classes)``, ``names()``, ``input_shape(name)``,
and ``register(name, factory, ...)`` / ``unregister(name)`` for architectures of one's own.

Every model maps a *normalized* input ``[B, C, H, W]`` to logits ``[B, num_classes]``;
members are wrapped as ``with_normalization(model, means, sds)`` so that noise is added in
pixel space (see `drt_fast.checkpoint`, which does it in one place).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn

from ..errors import DrtFastError, InvalidArgument
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


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: Callable[..., nn.Module], *, input_shape, dataset: str,
             classifier: str = "fc") -> None:
    """Make architecture ``name`` known to `create`, checkpoints and ``--arch``.

    ``factory(num_classes=K, **kw)`` builds the model (normalized ``[B, C, H, W]`` in,
    logits ``[B, K]`` out); ``input_shape`` is the ``(C, H, W)`` it is built for,
    ``dataset`` the dataset it is meant for (a Cohen/DRT checkpoint of this arch normalizes
    as that dataset), ``classifier`` the module name of its final ``nn.Linear`` (its rows
    are the classes). A name already registered is refused: `unregister` it first.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"an architecture name must be a non-empty str, got {name!r}")
    if name in _REGISTRY:
        raise InvalidArgument(f"architecture {name!r} is already registered")
    if not callable(factory):
        raise InvalidArgument(f"factory of {name!r} must be callable, got {type(factory).__name__}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise InvalidArgument(f"input_shape of {name!r} must be (C, H, W) of positive ints, "
                              f"got {input_shape!r}")
    _REGISTRY[name] = _Entry(factory, shape, str(dataset), str(classifier))


def unregister(name: str) -> None:
    """Forget architecture ``name`` (`register`'s undo); unknown names are an error."""
    _entry(name)
    del _REGISTRY[name]


register("digits_cnn", DigitsCNN, input_shape=(1, 8, 8), dataset="digits", classifier="fc")
register("lenet", LeNet, input_shape=(1, 28, 28), dataset="mnist", classifier="fc2")
register("cifar_resnet20", cifar_resnet20, input_shape=(3, 32, 32), dataset="cifar10")
register("cifar_resnet110", cifar_resnet110, input_shape=(3, 32, 32), dataset="cifar10")
register("resnet50", resnet50, input_shape=(3, 224, 224), dataset="imagenet")


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


__all__ = ["create", "register", "unregister", "names", "input_shape", "default_dataset",
           "classifier_name", "NormalizeLayer", "with_normalization"]
