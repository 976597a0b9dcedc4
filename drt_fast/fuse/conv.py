"""Convolution fusion: BatchNorms folded and conv(+add)+ReLU chains as one fused call.

`for_inference` (CUDA's, with cuDNN calls, `cudnn_ops`; the CPU's for members that do not
lower to matrices, with oneDNN calls, `onednn_ops`) rewrites a copy of the member
(``torch.fx``) so that:

* every BatchNorm that follows a convolution (or linear layer) is folded into its weights
  (``torch.fx.experimental.optimization.fuse``);
* a convolution whose only use is a ReLU runs as one call computing
  ``relu(conv(x) + bias)`` (``aten.cudnn_convolution_relu``; oneDNN's convolution with a
  ReLU post-op), and one whose only use is an addition feeding a ReLU -- a residual block's
  tail -- as ``relu(conv(x) + bias + z)`` (``aten.cudnn_convolution_add_relu``; oneDNN's
  add + ReLU post-ops): the activations make one round trip through memory instead of
  three to five;
* the weights of those fused convolutions are stored once in the precision the model runs
  in (bf16/fp16 certification casts them once, not on every forward as autocast does).

The copy computes the member's function up to floating-point rounding (a folded BatchNorm
rounds differently). ``conv_relu`` / ``conv_add_relu`` are parameters (`FusedOps`):
`cudnn_ops` (CUDA), `onednn_ops` (CPU), and the plain-torch `reference_ops`, with which the
rewrite itself is tested on any device.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .common import InferenceMember, copy_and_trace, node_shape, propagate


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


def _onednn_conv_relu(x, w, b, stride, padding, dilation, groups):
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, dilation, groups,
                                                   "relu", [], "")


def _onednn_conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, z, w, b, padding, stride, dilation, groups, "add", alpha, "relu", [], "")


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN's fused convolutions (x86 and arm64 builds do),
    for ``dtype`` on this CPU (bf16 needs hardware support: AVX512-BF16 or AMX)."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    if dtype == torch.bfloat16:
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe is not None and probe())
    return dtype == torch.float32


def onednn_ops() -> FusedOps:
    """oneDNN's convolution with ReLU (or residual add + ReLU) as a post-op (CPU tensors):
    the kernels torch.compile's CPU backend fuses to (their speed: bench/RESULTS.md,
    "Member rewrites")."""
    return FusedOps(_onednn_conv_relu, _onednn_conv_add_relu)


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


def for_inference(member: nn.Module, ops: FusedOps, dtype: torch.dtype = torch.float32,
                  example: Optional[torch.Tensor] = None) -> InferenceMember:
    """An eval-mode copy of ``member`` with BatchNorms folded and conv(+add)+ReLU chains fused.

    ``dtype``: the dtype the fused convolutions' weights are stored in (the precision the
    model runs at). ``example``: one input batch; with it, an addition is fused only where
    both operands have the convolution output's shape (broadcasting adds stay as they are).
    Without it, additions are not fused.
    """
    bn_before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in member.modules())
    copied, gm, reason = copy_and_trace(member, _fold_bn)
    if gm is None:
        return InferenceMember(member if copied is None else copied, reason=reason)
    folded = bn_before - sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    shapes = _shapes(gm, example)
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules) or len(node.args) < 1 or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv, z = _conv_feeding(src, modules, shapes)
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


def _conv_feeding(src: fx.Node, modules: dict, shapes: Optional[dict]) -> tuple:
    """``(conv, z)`` where a ReLU's input ``src`` is a fusable convolution used only there
    (``z`` None) or an addition, used only there, of such a convolution and a tensor ``z``
    of its output's shape (known only with ``shapes``); else ``(None, None)``."""
    if _fusable_conv(src, modules) and len(src.users) == 1:
        return src, None
    if _is_add(src) and len(src.users) == 1 and shapes is not None:
        for a, b in ((0, 1), (1, 0)):
            cand, other = src.args[a], src.args[b]
            if (isinstance(cand, fx.Node) and isinstance(other, fx.Node)
                    and _fusable_conv(cand, modules) and len(cand.users) == 1
                    and shapes.get(cand.name) is not None
                    and shapes.get(cand.name) == shapes.get(other.name)):
                return cand, other
    return None, None


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
    try:
        propagate(gm, example)
    except Exception:  # noqa: BLE001 -- no shapes: additions stay unfused
        return None
    return {node.name: node_shape(node) for node in gm.graph.nodes}


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
