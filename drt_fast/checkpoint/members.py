"""Members as every checkpoint layout stores them: ``Sequential(NormalizeLayer, arch)``,
rebuilt from a state dict that must match the architecture key by key."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .. import models
from ..errors import DrtFastError


def floats(buffer: torch.Tensor) -> tuple[float, ...]:
    """A float32 buffer as the shortest decimals that round-trip (0.3052, not
    0.30520001053810120)."""
    return tuple(float(str(v)) for v in buffer.detach().cpu().flatten().numpy())


def few(items: list[str], n: int = 3) -> str:
    """The first ``n`` of ``items``, and how many more there are."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def new_member(arch: str, num_classes: int, means, sds) -> nn.Sequential:
    """A freshly initialized ``Sequential(NormalizeLayer(means, sds), arch model)``."""
    return models.with_normalization(models.create(arch, num_classes), means, sds)


def check_state_dict(state, expected, arch: str, num_classes: int, what: str) -> None:
    """DrtFastError unless ``state`` has exactly the keys and shapes of ``expected`` (the
    state dict of a fresh ``arch`` member), with a message naming the differences."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {few(wrong)}")
    if problems:
        raise DrtFastError(f"{what} does not match architecture {arch} with {num_classes} "
                           f"classes: {'; '.join(problems)}")


def build_member(state, arch, num_classes, means, sds, what: str) -> nn.Sequential:
    """A member rebuilt from ``state``, checked key by key and loaded strictly."""
    if not isinstance(state, Mapping):
        raise DrtFastError(f"{what}: expected a state dict, got {type(state).__name__}")
    member = new_member(arch, num_classes, means, sds)
    expected = member.state_dict()
    # BatchNorm's num_batches_tracked (torch >= 0.4.1) is not in older checkpoints, Cohen's
    # released models among them; it plays no part in eval mode: keep the fresh member's.
    state = {**{k: v for k, v in expected.items() if k.endswith(".num_batches_tracked")}, **state}
    check_state_dict(state, expected, arch, num_classes, what)
    member.load_state_dict(state, strict=True)   # copies, casting to the member's float32
    return member.eval()
