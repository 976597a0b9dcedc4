"""What the member rewrites share: their result (`InferenceMember`), the reason a member is
not rewritten (`NotLowered`), and tracing an eval-mode copy of a member with torch.fx."""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import fx, nn

from ..errors import first_line


@dataclass
class InferenceMember:
    """A rewrite's result: ``module`` runs in the member's place (the member itself, with
    ``reason``, when nothing was rewritten)."""
    module: nn.Module         # what runs
    folded_bn: int = 0        # BatchNorms folded into the preceding layer
    fused: int = 0            # convolutions running as one fused call
    dense: int = 0            # dense matrices the member was lowered to (`dense_for_inference`)
    reason: Optional[str] = None   # why nothing was rewritten, when nothing was


class NotLowered(Exception):
    """Why a member stays as it is (the message is the reason reported)."""


def copy_and_trace(member: nn.Module, trace: Callable) -> tuple:
    """``(copy, trace(copy), None)`` for an eval-mode copy of ``member``, or, where copying
    or tracing fails, ``(copy or None, None, reason)``. A copy is traced: tracing runs
    forward() on proxies, and a forward with side effects (a hook, a counter) must not see
    them."""
    try:
        copied = copy.deepcopy(member).eval()
    except Exception as err:  # noqa: BLE001 -- e.g. an attribute that cannot be copied
        return None, None, f"it could not be copied: {first_line(err)}"
    try:
        return copied, trace(copied), None
    except Exception as err:  # noqa: BLE001 -- untraceable members run as they are
        return copied, None, f"torch.fx could not trace it: {first_line(err)}"


def propagate(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output shape in its ``tensor_meta`` (ShapeProp, which prints a
    traceback of a failing node to stderr before raising: the caller reports it in a line)."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(example)


def node_shape(node: fx.Node) -> Optional[tuple]:
    """The output shape `propagate` recorded for ``node`` (None: not a tensor)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None
