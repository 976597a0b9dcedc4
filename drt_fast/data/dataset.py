"""`Dataset`, what `drt_fast.data.load` returns, and the named datasets' normalizations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from ..errors import DrtFastError, InvalidArgument

if TYPE_CHECKING:
    from .images import LazyImages

# Per-dataset (means, sds) of the NormalizeLayer.
# * cifar10, imagenet: the constants of Cohen et al.'s code, so their checkpoints match.
# * mnist: identity, as in the DRT public code (inherited from Jeong & Shin's
#   smoothing-consistency code, whose MNIST "normalize layer" is nn.Identity), so that its
#   LeNet checkpoints see the inputs they were trained on.
# * digits: mean and standard deviation of all pixels of our fixed training split
#   (pixels / 16), rounded to 4 digits and frozen here so that they never drift.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3052,), (0.3760,)),
    "mnist": ((0.0,), (1.0,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

NAMES = ("digits", "mnist", "cifar10", "imagenet", "npz")


@dataclass
class Dataset:
    """A labelled set of inputs in pixel space.

    x: ``[N, C, H, W]`` float32 in [0, 1] (a tensor, or `LazyImages` for image folders).
    y: ``[N]`` int64 labels in ``[0, num_classes)``.
    normalization: ``(means, sds)``, one value per channel, for the model's NormalizeLayer.
    idx: ``[N]`` int64 index of each row in its source split (``arange(N)`` unless the
      file says otherwise, e.g. an ``.npz`` holding a subset). Certification uses it as
      the input's noise key and in the results' ``idx`` column.
    classes_from_labels: ``num_classes`` was inferred as ``max(y) + 1`` (an ``.npz``
      without a ``num_classes`` entry), so it is a lower bound: a model with more classes
      fits the data (a subset whose labels miss the top classes).
    own_normalization: the data states its normalization (a named dataset's constants, an
      ``.npz`` file's ``means``/``sds``); False for an ``.npz`` without them, whose
      ``normalization`` is only the identity default.
    grid: the pixels' own grid, in steps per unit (pixels k / grid: 16 for digits' 0..16,
      255 for 8-bit images), or None where the file does not say (a float ``.npz`` without
      a ``grid`` entry). Discrete smoothing noise lives on it.
    """

    x: Union[torch.Tensor, LazyImages]
    y: torch.Tensor
    num_classes: int
    name: str
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    idx: Optional[torch.Tensor] = None
    classes_from_labels: bool = False
    own_normalization: bool = True
    grid: Optional[int] = None

    def __post_init__(self):
        if self.idx is None:
            self.idx = torch.arange(len(self.y), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x.shape[1:])


def names() -> list[str]:
    """Dataset names `load` accepts."""
    return list(NAMES)


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(means, sds)`` per channel for dataset ``name`` (see `NORMALIZATION`)."""
    if name == "npz":
        raise DrtFastError("an .npz dataset has no fixed normalization; it is read from "
                           "the file's 'means'/'sds' arrays (identity when absent)")
    if name not in NORMALIZATION:
        raise InvalidArgument(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    return NORMALIZATION[name]


def check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    """DrtFastError unless ``split`` is one of dataset ``name``'s ``allowed`` splits."""
    if split not in allowed:
        raise DrtFastError(f"dataset {name!r} has splits {', '.join(allowed)}; got {split!r}")
