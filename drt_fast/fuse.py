"""Inference rewrites of a member network for CUDA certification.

Certification runs every member forward hundreds of thousands of times per input in eval
mode, where a BatchNorm is a fixed per-channel affine map. `for_inference` rewrites a copy
of a member (``torch.fx``) so that:

* every BatchNorm that follows a convolution (or linear layer) is folded into its weights
  (``torch.fx.experimental.optimization.fuse``);
* a convolution whose only use is a ReLU runs as one cuDNN call computing
  ``relu(conv(x) + bias)`` (``aten.cudnn_convolution_relu``), and one whose only use is an
  addition feeding a ReLU -- a residual block's tail -- as ``relu(conv(x) + bias + z)``
  (``aten.cudnn_convolution_add_relu``). The activations make one round trip through memory
  instead of three to five, and on a GPU these small networks are bound by memory traffic;
* the weights of those fused convolutions are stored once in the precision the model runs
  in (bf16/fp16 certification casts them once, not on every forward as autocast does).

The function computed is the member's, up to floating-point rounding (a folded BatchNorm
rounds differently); the certificate is a certificate of the network that is evaluated, as
always. A member that ``torch.fx`` cannot trace (data-dependent control flow) is returned
unchanged, with the reason in ``InferenceMember.reason``.

``conv_relu`` / ``conv_add_relu`` are parameters so that the rewrite itself is tested on the
CPU with plain-torch equivalents (`reference_ops`); `cudnn_ops` are the fused cuDNN calls.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import first_line


@dataclass(frozen=True)
class FusedOps:
    conv_relu: Callable      # (x, w, b, stride, padding, dilation, groups) -> relu(conv + b)
    conv_add_relu: Callable  # (x, w, z, alpha, b, stride, padding, dilation, groups)


def _reference_conv_relu(x, w, b, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def _reference_conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)


def reference_ops() -> FusedOps:
    """Plain-torch equivalents of the fused calls (any device)."""
    return FusedOps(_reference_conv_relu, _reference_conv_add_relu)


def cudnn_ops() -> FusedOps:
    """cuDNN's fused convolution + bias (+ add) + ReLU (CUDA tensors only)."""
    return FusedOps(torch.ops.aten.cudnn_convolution_relu.default,
                    torch.ops.aten.cudnn_convolution_add_relu.default)


class FusedConvReLU(nn.Module):
    """``relu(conv(x) + bias)`` or, called with ``z``, ``relu(conv(x) + bias + z)`` in one
    fused call; the weights are stored in the dtype the model runs in, and the activations
    are cast to it (under autocast an fp32 tensor can arrive, e.g. from a normalization)."""

    def __init__(self, conv: nn.Conv2d, ops: FusedOps, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().to(dtype).clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype).clone())
        self.conf = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.ops = ops

    def forward(self, x, z=None):
        w = self.weight
        if z is None:
            return self.ops.conv_relu(x.to(w.dtype), w, self.bias, *self.conf)
        return self.ops.conv_add_relu(x.to(w.dtype), w, z.to(w.dtype), 1.0, self.bias, *self.conf)

    def extra_repr(self) -> str:
        stride, padding, dilation, groups = self.conf
        return (f"{self.weight.shape[1] * groups}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={tuple(stride)}, "
                f"padding={tuple(padding)}, dtype={self.weight.dtype}")


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclass
class InferenceMember:
    module: nn.Module         # what runs
    folded_bn: int = 0        # BatchNorms folded into the preceding layer
    fused: int = 0            # convolutions running as one fused call
    reason: Optional[str] = None   # why nothing was rewritten, when nothing was


def for_inference(member: nn.Module, ops: FusedOps, dtype: torch.dtype = torch.float32,
                  example: Optional[torch.Tensor] = None) -> InferenceMember:
    """An eval-mode copy of ``member`` with BatchNorms folded and conv(+add)+ReLU chains fused.

    ``dtype``: the dtype the fused convolutions' weights are stored in (the precision the
    model runs at). ``example``: one input batch; with it, an addition is fused only where
    both operands have the convolution output's shape (broadcasting adds stay as they are).
    Without it, additions are not fused.
    """
    bn_before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in member.modules())
    try:
        copied = copy.deepcopy(member).eval()
    except Exception as err:  # noqa: BLE001 -- e.g. an attribute that cannot be copied
        return InferenceMember(member, reason=f"it could not be copied: {first_line(err)}")
    try:
        gm = _fold_bn(copied)
    except Exception as err:  # noqa: BLE001 -- untraceable members run as they are
        return InferenceMember(copied, reason=f"torch.fx could not trace it: {first_line(err)}")
    folded = bn_before - sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    shapes = _shapes(gm, example)
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules) or len(node.args) < 1 or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv, z = None, None
        if _fusable_conv(src, modules) and len(src.users) == 1:
            conv = src
        elif _is_add(src) and len(src.users) == 1 and shapes is not None:
            for a, b in ((0, 1), (1, 0)):
                cand, other = src.args[a], src.args[b]
                if (isinstance(cand, fx.Node) and isinstance(other, fx.Node)
                        and _fusable_conv(cand, modules) and len(cand.users) == 1
                        and shapes.get(cand.name) is not None
                        and shapes.get(cand.name) == shapes.get(other.name)):
                    conv, z = cand, other
                    break
        if conv is None:
            continue
        name = f"fused_conv_relu_{fused}"
        gm.add_submodule(name, FusedConvReLU(modules[conv.target], ops, dtype))
        with gm.graph.inserting_before(node):
            args = (conv.args[0],) if z is None else (conv.args[0], z)
            new = gm.graph.call_module(name, args)
        if shapes is not None:
            shapes[new.name] = shapes.get(node.name)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if z is not None:
            gm.graph.erase_node(src)
        gm.graph.erase_node(conv)
        fused += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return InferenceMember(gm, folded_bn=folded, fused=fused,
                           reason=None if (folded or fused) else "nothing to fold or fuse")


def _fold_bn(member: nn.Module) -> fx.GraphModule:
    import warnings

    with warnings.catch_warnings():   # the module imports torch.jit helpers that warn
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse
    return fuse(member, inplace=True)


def _shapes(gm: fx.GraphModule, example: Optional[torch.Tensor]) -> Optional[dict]:
    """Output shape of every node on ``example`` (None without one, or when it fails)."""
    if example is None:
        return None
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception:  # noqa: BLE001 -- no shapes: additions stay unfused
        return None
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        out[node.name] = tuple(meta.shape) if hasattr(meta, "shape") else None
    return out


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs
    if node.op == "call_method":
        return node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs
    return False


def _fusable_conv(node: fx.Node, modules: dict) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    mod = modules.get(node.target)
    return (type(mod) is nn.Conv2d and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))
