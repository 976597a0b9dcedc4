"""Inference rewrites of a member network for certification.

Certification runs every member forward hundreds of thousands of times per input in eval
mode, where a BatchNorm is a fixed per-channel affine map. There are two rewrites, both of
a copy of the member (``torch.fx``), both checked against the member by the engine:

`dense_for_inference` (the CPU's): a member that is a chain of affine layers (convolutions,
linear layers, normalization, eval BatchNorm, average pooling, reshapes) and elementwise
activations, on inputs small enough, becomes a chain of ``x @ W + b`` and activations on
flat rows: each run of affine layers between two activations is one dense matrix. On small
inputs the matrices are small, and one GEMM beats a few tiny convolutions (the digits CNN's
member forwards: about 2x on 2 CPU cores, 1000 draws a batch; oneDNN's convolutions of an
8x8 image are bound by their per-call overhead). In float32 on the CPU, a chain of matrices
and ReLUs then runs as one call of drt-fast's block-sparse kernel (`ops.dense_chain`;
`_chain_plan`): tiles of rows go through every layer in the core's cache, and each block of
a matrix multiplies only the band of inputs its outputs depend on, skipping most of a
convolution's zeros (the digits CNN: 55 % of the multiply-adds; its forwards 1.8-2.1x
faster than one GEMM per matrix and 3-8x faster than the plain members, whose oneDNN
convolutions vary from run to run; 1000 draws on 2 cores). A matrix is built only where it is cheap:
at most `DENSE_MAX_ENTRIES` entries and at most `DENSE_MAX_WASTE` times the multiply-adds
of the layers it replaces (the zeros of a convolution's matrix are computed too; measured
on 2 cores with single convolutions: 7x the multiply-adds on an 8x8 input still 4x faster,
10x on a 16x16 input 2x slower). Members of more than `DENSE_MAX_PARAMETERS` parameters are
refused before they are copied.

`for_inference` (CUDA's with cuDNN calls, `cudnn_ops`; the CPU's for members that do not
lower to matrices, with oneDNN calls, `onednn_ops`) rewrites the member so that:

* every BatchNorm that follows a convolution (or linear layer) is folded into its weights
  (``torch.fx.experimental.optimization.fuse``);
* a convolution whose only use is a ReLU runs as one call computing
  ``relu(conv(x) + bias)`` (``aten.cudnn_convolution_relu``; oneDNN's convolution with a
  ReLU post-op), and one whose only use is an addition feeding a ReLU -- a residual block's
  tail -- as ``relu(conv(x) + bias + z)`` (``aten.cudnn_convolution_add_relu``; oneDNN's
  add + ReLU post-ops). The activations make one round trip through memory instead of
  three to five, and these small networks are bound by memory traffic;
* the weights of those fused convolutions are stored once in the precision the model runs
  in (bf16/fp16 certification casts them once, not on every forward as autocast does).

Both compute the member's function up to floating-point rounding (a folded BatchNorm, a
matrix computed in float64 and stored in float32 round differently; on the embedded default
at n = 10,000 the counts of all 225 inputs came out equal); the certificate is a
certificate of the network that is evaluated, as always. A member that ``torch.fx`` cannot trace (data-dependent control flow) is returned
unchanged, with the reason in ``InferenceMember.reason``.

``conv_relu`` / ``conv_add_relu`` are parameters: `cudnn_ops` (CUDA), `onednn_ops` (CPU),
and plain-torch equivalents (`reference_ops`) with which the rewrite itself is tested.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from .errors import first_line
from .models.normalize import NormalizeLayer


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
    the kernels torch.compile's CPU backend fuses to. Measured on 2 cores, member forwards
    with BatchNorm folded: 3x ResNet-20 1.5-1.7x (fp32) and 2.9x (bf16), ResNet-110 1.3x,
    LeNet 1.1x faster than the plain members."""
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


@dataclass
class InferenceMember:
    module: nn.Module         # what runs
    folded_bn: int = 0        # BatchNorms folded into the preceding layer
    fused: int = 0            # convolutions running as one fused call
    dense: int = 0            # dense matrices the member was lowered to (`dense_for_inference`)
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
    copied, gm, reason = _copy_and_trace(member, _fold_bn)
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


def _copy_and_trace(member: nn.Module, trace: Callable) -> tuple:
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
        _propagate(gm, example)
    except Exception:  # noqa: BLE001 -- no shapes: additions stay unfused
        return None
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        out[node.name] = tuple(meta.shape) if hasattr(meta, "shape") else None
    return out


def _propagate(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output shape in its ``tensor_meta`` (ShapeProp, which prints a
    traceback of a failing node to stderr before raising: the caller reports it in a line)."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(example)


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


# ----------------------------------------------------------------- dense lowering (CPU)
DENSE_MAX_ENTRIES = 2**18   # entries of one matrix (1 MiB in fp32: it stays in cache)
DENSE_MAX_WASTE = 8         # matrix entries per multiply-add of the layers it replaces
DENSE_MAX_PARAMETERS = 2**22  # bigger members are refused before they are copied

_AFFINE_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d,
)
# Modules and calls that leave a row's flat (C-order) values as they are, in eval mode.
_FLAT_NOOP_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                      nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_FLAT_NOOP_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_FLAT_NOOP_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")
_AFFINE_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear, F.avg_pool1d, F.avg_pool2d,
                     F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.pad, torch.permute, torch.transpose)
_AFFINE_METHODS = ("permute", "transpose")
# x + c, x - c, c - x, x * c, c * x, x / c, -x with c a constant (a number or an attribute)
_ARITHMETIC = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
               operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
               operator.neg: "neg", torch.neg: "neg"}
_ARITHMETIC_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg"}

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Softplus, nn.Softsign)
_ACT_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
                  F.celu, F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                  F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign)
_ACT_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_")
# call_function / call_method targets by kind: no-op, ReLU, other activation, affine, and
# arithmetic (affine with a constant operand, see `_arithmetic`).
_CALL_KINDS = {
    "call_function": (_FLAT_NOOP_FUNCTIONS, (F.relu, torch.relu, torch.relu_), _ACT_FUNCTIONS,
                      _AFFINE_FUNCTIONS, _ARITHMETIC),
    "call_method": (_FLAT_NOOP_METHODS, ("relu", "relu_"), _ACT_METHODS, _AFFINE_METHODS,
                    _ARITHMETIC_METHODS),
}


class DenseMember(nn.Module):
    """A member lowered to a chain of ``h @ W + b`` and elementwise activations on flat rows.

    Input ``[B, *S]`` (any layout: it is read in C order), output ``[B, *out_shape]``. The
    matrices are buffers ``weight{i}`` ``[n_in, n_out]`` and ``bias{i}`` ``[n_out]``. A
    chain of float32 matrices each followed by at most a ReLU, built on the CPU, also keeps
    the block-sparse kernel's plan (``chain_meta``, ``chain_params``; `chained`), which its
    float32 CPU forward runs; other dtypes, autocast and other devices use the matrices.
    """

    def __init__(self, plan, out_shape):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.acts = nn.ModuleList()
        self._plan = []          # ("matrix", i) | ("relu", None) | ("act", callable)
        for kind, value in plan:
            if kind == "matrix":
                i = sum(k == "matrix" for k, _ in self._plan)
                self.register_buffer(f"weight{i}", value[0].contiguous())
                self.register_buffer(f"bias{i}", value[1].contiguous())
                self._plan.append(("matrix", i))
            elif isinstance(value, nn.Module):
                self.acts.append(value)
                self._plan.append(("act", value))
            else:
                self._plan.append((kind, value))
        # The CPU's float32 forward: the whole chain in one kernel (`ops.dense_chain_cpu`),
        # where the chain is matrices each followed by at most a ReLU.
        # Not where padding to whole chunks costs more than the zeros save (a single 784 x 10
        # matrix would do 3.2x the multiply-adds of torch.mm's GEMM).
        chain = _chain_layers(plan)
        if chain is not None and chain[0][0].device.type == "cpu":
            meta, params, macs = _chain_plan(chain)
            stats = (sum(w.numel() for w, _, _ in chain), macs)
            if stats[1] <= CHAIN_MAX_WASTE * stats[0]:
                self.register_buffer("chain_meta", meta, persistent=False)
                self.register_buffer("chain_params", params, persistent=False)
                self.chain_out = chain[-1][0].shape[1]
                self.chain_stats = stats

    @property
    def chained(self) -> bool:
        """Whether the CPU's float32 forward runs as one `ops.dense_chain_cpu` call."""
        return "chain_meta" in self._buffers

    @property
    def matrices(self) -> int:
        return sum(kind == "matrix" for kind, _ in self._plan)

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        # float32 on the CPU: the whole chain in one kernel (`ops.dense_chain_cpu`), or per
        # matrix a GEMM, then bias (+ ReLU) in one pass (`ops.bias_act_cpu_`); elsewhere, and
        # under autocast, addmm (+ ReLU) as torch runs it.
        epilogue = (h.device.type == "cpu" and h.dtype == torch.float32
                    and not torch.is_autocast_enabled("cpu"))
        if epilogue and self.chained:
            out = ops.dense_chain_cpu(h, self.chain_meta, self.chain_params, self.chain_out)
            if out is not None:
                return out.reshape(x.shape[0], *self.out_shape)
        owned = False            # h is ours to overwrite (not the caller's input)
        buffers, plan, i = self._buffers, self._plan, 0
        while i < len(plan):
            kind, value = plan[i]
            i += 1
            if kind == "matrix":
                weight, bias = buffers[f"weight{value}"], buffers[f"bias{value}"]
                relu = epilogue and i < len(plan) and plan[i][0] == "relu"
                if epilogue:
                    h = torch.mm(h, weight)
                    if not ops.bias_act_cpu_(h, bias, relu):
                        ops.reference_bias_act_(h, bias, relu)
                    i += relu                    # the ReLU is done
                else:
                    h = torch.addmm(bias, h, weight)
                owned = True
                continue
            if not owned:
                h, owned = h.clone(), True
            h = h.relu_() if kind == "relu" else value(h)
        return h.reshape(x.shape[0], *self.out_shape)

    def extra_repr(self) -> str:
        shapes = [tuple(getattr(self, f"weight{v}").shape) for k, v in self._plan if k == "matrix"]
        chain = ""
        if self.chained:
            dense, blocked = self.chain_stats
            chain = f", cpu kernel: {blocked:,} of {dense:,} multiply-adds a row"
        return f"matrices={shapes}, out_shape={self.out_shape}{chain}"


# ---- the CPU kernel's plan (ops.dense_chain_cpu; csrc/kernels.h DenseChainArgs) ------------
CHAIN_MAX_WASTE = 1.25  # the kernel's multiply-adds (padding included) over the matrices';
                        # at 1.02 (an MLP 784-256-256-10) it ran as fast as torch.mm
_CHUNK = 32            # columns: block widths are padded to a multiple (kernels.h kDenseChunk)
_ALIGN = 16            # floats: each weight block and bias starts at a multiple (64 bytes)
_BLOCK_OVERHEAD = 4    # a block's fixed cost per row and column, in multiply-adds (measured
                       # on the digits CNN; it keeps blocks from splitting for a few zeros)
_MAX_GROUPS = 1024     # column groups merged pairwise above that would cost seconds: one block


def _chain_layers(plan) -> Optional[list]:
    """``[(W [n_in, n_out], b, relu)]`` when ``plan`` is float32 matrices each followed by at
    most one ReLU (what the CPU kernel runs), else None."""
    layers = []
    for kind, value in plan:
        if kind == "matrix":
            weight, bias = value
            if weight.dtype != torch.float32 or bias.dtype != torch.float32:
                return None
            layers.append([weight, bias, False])
        elif kind == "relu" and layers and not layers[-1][2]:
            layers[-1][2] = True
        else:
            return None
    return [tuple(layer) for layer in layers] or None


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _column_groups(weight: torch.Tensor) -> list:
    """Columns of ``weight`` ``[n_in, n_out]`` grouped into blocks ``(lo, hi, columns)``:
    each block reads input rows ``[lo, hi)``, which hold all the nonzeros of its columns.
    Columns with the same band start as one group; adjacent groups (ordered by band) are
    merged while that lowers ``(hi - lo + overhead) * padded width`` summed over blocks."""
    nonzero = weight != 0
    n_in, n_out = weight.shape
    any_row = nonzero.any(0)
    lo = torch.where(any_row, nonzero.int().argmax(0), 0).tolist()
    hi = torch.where(any_row, n_in - nonzero.flip(0).int().argmax(0), 0).tolist()
    bands: dict = {}
    for j in range(n_out):
        bands.setdefault((lo[j], hi[j]), []).append(j)
    if len(bands) > _MAX_GROUPS:
        return [(min(lo), max(hi), list(range(n_out)))]
    groups = [(a, b, cols) for (a, b), cols in sorted(bands.items())]

    def cost(lo, hi, n):
        return (hi - lo + _BLOCK_OVERHEAD) * _pad(n, _CHUNK)

    def band(g, h):
        if g[1] == g[0]:        # an empty band (all-zero columns) fits anywhere
            return h[0], h[1]
        if h[1] == h[0]:
            return g[0], g[1]
        return min(g[0], h[0]), max(g[1], h[1])

    def gain(g, h):
        return cost(*g[:2], len(g[2])) + cost(*h[:2], len(h[2])) - cost(*band(g, h), len(g[2]) + len(h[2]))

    while len(groups) > 1:
        gains = [gain(g, h) for g, h in zip(groups, groups[1:])]
        best = max(range(len(gains)), key=gains.__getitem__)
        if gains[best] < 0:
            break
        g, h = groups[best], groups[best + 1]
        groups[best:best + 2] = [(*band(g, h), g[2] + h[2])]
    return groups


def _chain_plan(layers) -> tuple:
    """The CPU kernel's ``(meta, params, macs)`` for ``layers`` ``[(W, b, relu)]`` (layout
    in csrc/kernels.h; ``macs``: its multiply-adds a row, the padding included). Each hidden
    layer's outputs are reordered block by block (the next matrix's rows follow) and padded
    with zero columns to whole chunks; the last layer keeps its order, so the output is its
    first ``n_out`` columns."""
    params, size = [], 0

    def put(t: torch.Tensor) -> int:
        nonlocal size
        offset = size
        flat = t.reshape(-1)
        params.append(flat)
        size += flat.numel()
        gap = _pad(size, _ALIGN) - size
        if gap:
            params.append(flat.new_zeros(gap))
            size += gap
        return offset

    in_cols = layers[0][0].shape[0]
    meta, macs = [len(layers), in_cols, layers[-1][0].shape[1], 0], 0
    position = torch.arange(in_cols)           # where each of the layer's inputs is
    src_width = in_cols
    for index, (weight, bias, relu) in enumerate(layers):
        placed = weight.new_zeros(src_width, weight.shape[1])
        placed[position] = weight
        n_out = weight.shape[1]
        if index == len(layers) - 1:
            groups = [(0, src_width, list(range(n_out)))]
            nonzero = (placed != 0).any(1).nonzero()
            if len(nonzero):
                groups = [(int(nonzero[0]), int(nonzero[-1]) + 1, list(range(n_out)))]
        else:
            groups = _column_groups(placed)
        blocks, new_position, width = [], torch.empty(n_out, dtype=torch.long), 0
        for lo, hi, cols in groups:
            block_width = _pad(len(cols), _CHUNK)
            w = weight.new_zeros(hi - lo, block_width)
            w[:, :len(cols)] = placed[lo:hi, cols]
            new_position[cols] = torch.arange(width, width + len(cols))
            blocks.append((lo, hi, width, block_width, put(w)))
            width += block_width
            macs += (hi - lo) * block_width
        full_bias = bias.new_zeros(width)
        full_bias[new_position] = bias
        meta += [width, int(relu), put(full_bias), len(blocks)]
        for block in blocks:
            meta += list(block)
        meta[3] = max(meta[3], width)
        position, src_width = new_position, width
    return torch.tensor(meta, dtype=torch.int64), torch.cat(params).contiguous(), macs


class _NotLowered(Exception):
    """Why a member stays as it is (the message is the reason reported)."""


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with our input normalization kept as one (affine) module."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, NormalizeLayer) or super().is_leaf_module(m, qualname)


def dense_for_inference(member: nn.Module, example: torch.Tensor) -> InferenceMember:
    """``member`` as a `DenseMember` (``InferenceMember.dense``: its number of matrices), or
    the member itself with the reason when it is not a chain of affine layers and
    elementwise activations, or a matrix would cost too much (see the module docstring).

    ``example``: an input batch (its first row is used). The matrices are computed in
    float64 from the member's own layers (the layers applied to the unit vectors) and
    stored in the member's dtype.
    """
    params = sum(t.numel() for t in member.parameters())
    if params > DENSE_MAX_PARAMETERS:      # no copy of a big network just to refuse it
        return InferenceMember(member, reason=f"it has {params:,} parameters, too many for "
                                              f"dense matrices (limit {DENSE_MAX_PARAMETERS:,})")
    _, gm, reason = _copy_and_trace(member, lambda m: fx.GraphModule(m, _LeafTracer().trace(m)))
    if gm is None:
        return InferenceMember(member, reason=reason)
    dtype = next((t.dtype for t in gm.parameters() if t.is_floating_point()), torch.float32)
    pair = example[:1].expand(2, *example.shape[1:]).to(dtype).contiguous()
    try:
        _propagate(gm, pair)
        chain = _chain(gm)
        runs = _runs(gm, chain)
        if not any(kind == "matrix" for kind, _ in runs):
            return InferenceMember(member, reason="it has no layer to turn into a matrix")
        plan = _lower(gm, runs, pair, dtype)
    except _NotLowered as err:
        return InferenceMember(member, reason=str(err))
    except Exception as err:  # noqa: BLE001 -- a member this does not understand runs as it is
        return InferenceMember(member, reason=f"it could not be lowered: {first_line(err)}")
    out = DenseMember(plan, _shape(chain[-1][1])[1:])
    return InferenceMember(out, dense=out.matrices)


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _input(gm: fx.GraphModule) -> fx.Node:
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _NotLowered(f"it takes {len(inputs)} inputs, not one")
    return inputs[0]


def _chain(gm: fx.GraphModule) -> list:
    """The member's layers in order as ``(kind, node)`` (kinds of `_kind`); raises
    `_NotLowered` unless each layer takes the previous layer's output (and constants) only,
    is affine or elementwise, and keeps the draws of a batch apart."""
    modules = dict(gm.named_modules())
    current = _input(gm)
    chain = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise _NotLowered("its output is not the last layer's tensor")
            break
        if _shape(node) is None:          # x.size(0), x.shape, x.dtype: metadata, no data
            continue
        data = []                          # tensor arguments that are not constants
        fx.node.map_arg((node.args, node.kwargs), lambda a: data.append(a)
                        if a.op != "get_attr" and _shape(a) is not None else None)
        users = [u for u in current.users if u.op == "output" or _shape(u) is not None]
        if data != [current] or users != [node]:
            raise _NotLowered(f"it is not a chain of layers (at {node.name}: a branch, "
                              f"skip connection or second input)")
        kind = _kind(node, modules)
        if kind is None:
            raise _NotLowered(f"{_describe(node, modules)} is neither affine nor elementwise")
        if _shape(node)[0] != _shape(current)[0]:
            raise _NotLowered(f"{_describe(node, modules)} mixes the draws of a batch")
        chain.append((kind, node))
        current = node
    return chain


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"layer {node.target} ({type(modules[node.target]).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{target}()" + ("" if node.name == target else f" at {node.name}")


def _kind(node: fx.Node, modules: dict) -> Optional[str]:
    """"noop" (flat values unchanged), "affine", "relu", "act" (elementwise) or None."""
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, _FLAT_NOOP_MODULES):
            return "noop"
        if isinstance(mod, nn.ReLU):
            return "relu"
        if isinstance(mod, _ACT_MODULES):
            return "act"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            # without running statistics a BatchNorm normalizes by the batch's: not affine
            return "affine" if mod.running_mean is not None else None
        if isinstance(mod, (_AFFINE_MODULES, NormalizeLayer)):
            return "affine"
        return None
    table = _CALL_KINDS.get(node.op)
    if table is None:
        return None
    *kinds, arithmetic = table
    for kind, targets in zip(("noop", "relu", "act", "affine"), kinds):
        if node.target in targets:
            return kind
    if node.target in arithmetic:
        return _arithmetic(arithmetic[node.target], node)
    return None


def _arithmetic(op: str, node: fx.Node) -> Optional[str]:
    """"affine" for x + c, x - c, c - x, x * c, c * x, x / c and -x (c constant), else None."""
    if node.kwargs:                       # alpha=, rounding_mode=, out=: not taken
        return None
    if op == "neg":
        return "affine" if len(node.args) == 1 else None
    if len(node.args) != 2:
        return None
    a = node.args[0]          # `_chain` made sure exactly one argument is the data
    data_first = isinstance(a, fx.Node) and a.op != "get_attr" and _shape(a) is not None
    return None if op == "div" and not data_first else "affine"


def _macs(node: fx.Node, modules: dict) -> int:
    """Multiply-adds per row of one affine layer (1 per output value but for conv/linear)."""
    out = math.prod(_shape(node)[1:])
    mod = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(mod, nn.modules.conv._ConvNd):
        return out * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    if isinstance(mod, nn.Linear):
        return out * mod.in_features
    if node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = _shape(weight) if isinstance(weight, fx.Node) else None
        if shape is not None:
            return out * math.prod(shape[1:])
    return out


def _runs(gm: fx.GraphModule, chain: list) -> list:
    """``chain`` as steps ``("matrix", (start, end, n_in, n_out))`` -- a run of affine layers
    from ``start``'s output to ``end``'s, each within the cost limits -- and ``("relu" |
    "act", node)``; a run of flat no-ops is no step. Raises `_NotLowered` on a costly run."""
    modules = dict(gm.named_modules())
    steps, run, start = [], [], _input(gm)
    for kind, node in chain + [("end", None)]:
        if kind in ("affine", "noop"):
            run.append((kind, node))
            continue
        if any(k == "affine" for k, _ in run):
            end = run[-1][1]
            n_in, n_out = math.prod(_shape(start)[1:]), math.prod(_shape(end)[1:])
            entries = n_in * n_out
            names = ", ".join(n.name for _, n in run)
            if entries > DENSE_MAX_ENTRIES:
                raise _NotLowered(f"the layers {names} would be a {n_in}x{n_out} matrix "
                                  f"(more than {DENSE_MAX_ENTRIES:,} entries)")
            macs = sum(_macs(n, modules) for k, n in run if k == "affine")
            if entries > DENSE_MAX_WASTE * macs:
                raise _NotLowered(f"the layers {names} would be a {n_in}x{n_out} matrix, "
                                  f"{entries / macs:.0f}x their {macs:,} multiply-adds "
                                  f"(limit {DENSE_MAX_WASTE}x)")
            steps.append(("matrix", (start, end, n_in, n_out)))
        if node is not None:
            steps.append((kind, node))
            start = node
        run = []
    return steps


def _lower(gm: fx.GraphModule, runs: list, pair: torch.Tensor, dtype: torch.dtype) -> list:
    """The `DenseMember` plan of the steps of `_runs`. Each matrix is its run applied, in
    float64 (``gm`` is our copy: it is converted), to the unit vectors and to zero (the bias)."""
    modules = dict(gm.named_modules())
    gm.double()
    plan = []
    for kind, value in runs:
        if kind == "relu":
            plan.append(("relu", None))
        elif kind == "act":
            plan.append(("act", _act(value, modules)))
        else:
            start, end, n_in, n_out = value
            f64 = dict(dtype=torch.float64, device=pair.device)
            basis = torch.cat([torch.zeros(1, n_in, **f64),
                               torch.eye(n_in, **f64)]).view(n_in + 1, *_shape(start)[1:])
            with torch.no_grad():
                out = _Probe(gm, start, basis, end).run(pair.double())
            out = out.reshape(n_in + 1, n_out)
            plan.append(("matrix", ((out[1:] - out[0]).to(dtype), out[0].to(dtype))))
    return plan


class _Probe(fx.Interpreter):
    """Runs the graph up to ``stop`` with ``start``'s output replaced by ``basis``; returns
    ``stop``'s output. (Its own loop: ending `fx.Interpreter.run` early by raising costs a
    traceback summary, about a second the first time in a process.)"""

    def __init__(self, gm, start, basis, stop):
        super().__init__(gm)
        self._start, self._basis, self._stop = start, basis, stop

    def run(self, *args):
        self.args_iter = iter(args)
        self.env = {}
        for node in self.graph.nodes:
            out = self._basis if node is self._start else self.run_node(node)
            if node is self._stop:
                return out
            self.env[node] = out
        raise RuntimeError("the probe never reached the end of the run")


def _act(node: fx.Node, modules: dict):
    """The elementwise activation ``node`` applies, as a callable on a flat tensor."""
    if node.op == "call_module":
        return modules[node.target]
    args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in list(args) + list(kwargs.values())):
        raise _NotLowered(f"{node.name} takes a tensor argument besides its input")
    if node.op == "call_function":
        fn = node.target
        return lambda h: fn(h, *args, **kwargs)
    name = node.target
    return lambda h: getattr(h, name)(*args, **kwargs)


# ---- a whole CIFAR ResNet as one CUDA kernel (ops.cifar_resnet; csrc/cuda/resnet.cu) -------
RESNET_KERNEL_ENV = "DRT_FAST_RESNET_KERNEL"


def resnet_kernel_variant(device: torch.device) -> Optional[int]:
    """The variant of drt-fast's CIFAR ResNet kernel that bf16 certification on ``device``
    runs CIFAR ResNet members with (`ResNetKernelMember`), or None: only with
    ``DRT_FAST_RESNET_KERNEL`` set to ``mma`` (or ``1``: the mma.sync variant, 1) or ``wmma``
    (variant 0), the CUDA kernels built, and a GPU of compute capability 8.0 or newer with
    room for the kernel's shared memory (76.6 KB a block for mma.sync, 84.6 KB for wmma). Off
    by default: the kernel has been tested on the host
    (its CTA program, ``ops.cifar_resnet_on_host``) but not yet run on a GPU."""
    value = os.environ.get(RESNET_KERNEL_ENV, "")
    variant = {"1": 1, "mma": 1, "wmma": 0}.get(value)
    if variant is None or device.type != "cuda" or not ops.kernels_run_on(device):
        return None
    props = torch.cuda.get_device_properties(device)
    room = getattr(props, "shared_memory_per_block_optin", 0)
    return variant if props.major >= 8 and room >= ops.extension.cuda_kernels.cifar_resnet_sizes(1, variant)[2] else None


class ResNetKernelMember(nn.Module):
    """A CIFAR ResNet member (`drt_fast.models.cifar_resnet.ResNet` of BasicBlocks, depth
    6n+2, behind an optional `NormalizeLayer`) as one `ops.cifar_resnet` call: BatchNorms
    folded in float64, convolution weights stored as bf16 tiles, float32 logits. It computes
    in bf16 whatever the input dtype (the kernel's arithmetic; `resnet_kernel_for_inference`
    builds it for bf16 certification only)."""

    def __init__(self, weights, biases, norm, fc_w, fc_b, blocks: int, variant: int):
        super().__init__()
        for name, t in (("weights", weights), ("biases", biases), ("norm", norm), ("fc_w", fc_w),
                        ("fc_b", fc_b)):
            self.register_buffer(name, t.contiguous())
        self.blocks, self.variant = blocks, variant

    def forward(self, x):
        return ops.cifar_resnet_eager(x, self.weights, self.biases, self.norm, self.fc_w, self.fc_b,
                                      self.blocks, self.variant)

    def extra_repr(self) -> str:
        return (f"depth={6 * self.blocks + 2}, classes={self.fc_w.shape[0]}, "
                f"{len(ops.cifar_resnet_convs(self.blocks))} convolutions as bf16 tiles, "
                f"{ops.CIFAR_RESNET_VARIANTS[self.variant]}")


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    """``conv`` followed by eval-mode ``bn`` (with running statistics) as (weight, bias),
    folded in float64 (torch's `fuse_conv_bn_weights`)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    def double(t):
        return None if t is None else t.detach().double()

    weight, bias = fuse_conv_bn_weights(double(conv.weight), double(conv.bias), double(bn.running_mean),
                                        double(bn.running_var), bn.eps, double(bn.weight), double(bn.bias))
    return weight.detach(), bias.detach()


def _expect_conv(conv, cin, cout, k, stride) -> None:
    if not (type(conv) is nn.Conv2d and conv.in_channels == cin and conv.out_channels == cout
            and conv.kernel_size == (k, k) and conv.stride == (stride, stride)
            and conv.padding == ((k - 1) // 2,) * 2 and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"):
        raise _NotLowered(f"{conv!r} is not the {k}x{k} {cin}->{cout} convolution (stride "
                          f"{stride}) of a CIFAR ResNet")


def _expect_bn(bn, channels) -> None:
    if not (type(bn) is nn.BatchNorm2d and bn.num_features == channels):
        raise _NotLowered(f"{bn!r} is not a BatchNorm2d of {channels} channels")
    if bn.running_mean is None or bn.running_var is None:
        raise _NotLowered("a BatchNorm has no running statistics")


def _expect_relu(relu) -> None:
    if type(relu) is not nn.ReLU:
        raise _NotLowered(f"{relu!r} is not the ReLU of a CIFAR ResNet")


def _resnet_kernel_parts(member: nn.Module) -> tuple:
    """(means, sds, resnet) of a member the kernel runs, else `_NotLowered`."""
    from .models.cifar_resnet import BasicBlock, ResNet

    means, sds, net = torch.zeros(3), torch.ones(3), member
    if type(member) is nn.Sequential and len(member) == 2 and type(member[0]) is NormalizeLayer:
        means, sds, net = member[0].means.flatten(), member[0].sds.flatten(), member[1]
    if type(net) is not ResNet:
        raise _NotLowered("it is not a CIFAR ResNet (drt_fast.models.cifar_resnet)")
    if means.numel() != 3:
        raise _NotLowered(f"its input normalization has {means.numel()} channels, not 3")
    if member.training:
        raise _NotLowered("it is in training mode")
    _expect_conv(net.conv1, 3, 16, 3, 1)
    _expect_bn(net.bn1, 16)
    _expect_relu(net.relu)
    layers = (net.layer1, net.layer2, net.layer3)
    if len({len(layer) for layer in layers}) != 1 or len(net.layer1) < 1:
        raise _NotLowered("its stages do not have the same number of blocks")
    for s, layer in enumerate(layers):
        ch = 16 << s
        for b, block in enumerate(layer):
            if type(block) is not BasicBlock:
                raise _NotLowered("its blocks are not BasicBlocks")
            entry = s > 0 and b == 0
            _expect_conv(block.conv1, ch // 2 if entry else ch, ch, 3, 2 if entry else 1)
            _expect_conv(block.conv2, ch, ch, 3, 1)
            _expect_bn(block.bn1, ch)
            _expect_bn(block.bn2, ch)
            _expect_relu(block.relu)
            if entry:
                ds = block.downsample
                if not (type(ds) is nn.Sequential and len(ds) == 2):
                    raise _NotLowered("a stage's first block has no 1x1 downsample")
                _expect_conv(ds[0], ch // 2, ch, 1, 2)
                _expect_bn(ds[1], ch)
            elif block.downsample is not None:
                raise _NotLowered("a block has a downsample where the kernel has none")
    if not (type(net.avgpool) is nn.AvgPool2d and net.avgpool.kernel_size == 8
            and type(net.fc) is nn.Linear and net.fc.in_features == 64):
        raise _NotLowered("its head is not AvgPool2d(8) and a linear layer of 64 inputs")
    return means, sds, net


def resnet_kernel_for_inference(member: nn.Module, variant: int = 1) -> InferenceMember:
    """``member`` as a `ResNetKernelMember` running the kernel's ``variant`` (1: mma.sync,
    0: wmma) (``InferenceMember.fused``: its convolutions, ``folded_bn``: its BatchNorms), or
    the member itself with the reason."""
    try:
        means, sds, net = _resnet_kernel_parts(member)
    except _NotLowered as err:
        return InferenceMember(member, reason=str(err))
    convs = [_folded(net.conv1, net.bn1)]
    convs[0] = (torch.nn.functional.pad(convs[0][0], (0, 0, 0, 0, 0, 13)), convs[0][1])  # 3 -> 16 inputs
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            convs.append(_folded(block.conv1, block.bn1))
            if block.downsample is not None:
                convs.append(_folded(block.downsample[0], block.downsample[1]))
            convs.append(_folded(block.conv2, block.bn2))
    weights = torch.cat([ops.pack_cifar_resnet_weight(w, variant) for w, _ in convs]).to(torch.bfloat16)
    biases = torch.cat([b for _, b in convs]).float()
    norm = torch.cat([means, sds]).float()
    device = net.fc.weight.device
    fc_b = net.fc.bias.detach() if net.fc.bias is not None else torch.zeros(net.fc.out_features, device=device)
    module = ResNetKernelMember(weights.to(device), biases.to(device), norm.to(device),
                                net.fc.weight.detach().float().clone(), fc_b.float().clone(),
                                len(net.layer1), variant)
    return InferenceMember(module, folded_bn=len(convs), fused=len(convs))
