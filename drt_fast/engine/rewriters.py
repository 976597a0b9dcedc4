"""How the members are rewritten for inference on each device (`drt_fast.fuse` does the
rewriting; this module picks what to try, in which order, and words what was done).

* `CudaRewriter`: each member with BatchNorms folded and conv(+add)+ReLU as single cuDNN
  calls; in bf16, with ``DRT_FAST_CIFAR_RESNET`` set, a CIFAR ResNet member as one call of
  drt-fast's CIFAR ResNet kernel instead.
* `CpuRewriter`: each member as dense matrices where it lowers, else with BatchNorms folded
  and conv(+add)+ReLU as oneDNN calls (fp32, and bf16 on channels-last draws).

A rewriter is given to `MemberRunner` (and `SmoothedClassifier(rewriter=...)`); None picks
one by device.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import fuse


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Rewrite:
    """A rewriter's answer: one `fuse.InferenceMember` per member, what was done in words,
    and whether some member runs as the CIFAR ResNet kernel."""
    members: list
    text: str
    kernel: bool = False


class CudaRewriter:
    """cuDNN fusion, and the CIFAR ResNet kernel where asked for.

    conv_ops: the fused convolutions (`fuse.FusedOps`; default cuDNN's); kernel_variant:
    device -> CIFAR ResNet kernel variant or None (default `fuse.cifar_resnet_variant`, which
    reads the environment); require_cudnn: refuse when cuDNN is unavailable or disabled.
    """
    keyed_by_shape = False     # the rewrites hold for any input shape

    def __init__(self, conv_ops: Optional[fuse.FusedOps] = None,
                 kernel_variant: Optional[Callable] = None, require_cudnn: bool = True):
        self.conv_ops = conv_ops
        self.kernel_variant = kernel_variant or fuse.cifar_resnet_variant
        self.require_cudnn = require_cudnn

    def unsupported(self, device) -> str:
        if self.require_cudnn and not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
            return "cuDNN is not available or is disabled"
        return ""

    def rewrite(self, members, example, run_dtype, channels_last, use_kernel=True) -> Rewrite:
        conv_ops = self.conv_ops or fuse.cudnn_ops()
        wanted = use_kernel and run_dtype == torch.bfloat16
        variant = self.kernel_variant(example.device) if wanted else None
        rewritten = []
        for member in members:
            if variant is not None:
                kernel = fuse.cifar_resnet_for_inference(member, variant)
                if kernel.fused:
                    rewritten.append(kernel)
                    continue
            rewritten.append(fuse.for_inference(member, conv_ops, run_dtype, example))
        cudnn = [r for r in rewritten if not isinstance(r.module, fuse.CifarResNetMember)]
        kernels = len(rewritten) - len(cudnn)
        parts = []
        if kernels:
            parts.append(f"{kernels} member(s) as one CIFAR ResNet kernel each ({fuse.cifar_resnet_setting()})")
        if cudnn:
            parts.append(f"{sum(r.fused for r in cudnn)} fused convolutions, "
                         f"{sum(r.folded_bn for r in cudnn)} BatchNorms folded in {len(cudnn)} member(s)")
        return Rewrite(rewritten, "; ".join(parts), kernel=kernels > 0)


class CpuRewriter:
    """Dense lowering (run by drt-fast's block-sparse CPU kernel in float32), else oneDNN
    fusion. conv_ops: the fused convolutions (default oneDNN's, where this torch has them)."""
    keyed_by_shape = True      # a dense rewrite is built for one input shape

    def __init__(self, conv_ops: Optional[fuse.FusedOps] = None):
        self.conv_ops = conv_ops

    def unsupported(self, device) -> str:
        return ""

    def _no_onednn(self, run_dtype, channels_last) -> str:
        """Why oneDNN's fusion cannot be used here ('' when it can)."""
        if self.conv_ops is not None:
            return ""
        if not fuse.onednn_available():
            return "this torch build has no oneDNN"
        if run_dtype not in (torch.float32, torch.bfloat16):
            return f"oneDNN fusion runs fp32 and bf16, not {_NAMES.get(run_dtype, run_dtype)}"
        if run_dtype == torch.bfloat16 and not fuse.onednn_available(torch.bfloat16):
            return "oneDNN has no bf16 kernels for this CPU"
        if run_dtype == torch.bfloat16 and not channels_last:
            return "oneDNN's bf16 fusion needs channels-last draws"
        return ""

    def rewrite(self, members, example, run_dtype, channels_last, use_kernel=True) -> Rewrite:
        no_onednn = self._no_onednn(run_dtype, channels_last)
        rewritten = []
        for member in members:
            dense = fuse.dense_for_inference(member, example)
            if not dense.dense and not no_onednn:
                fused = fuse.for_inference(member, self.conv_ops or fuse.onednn_ops(), run_dtype, example)
                dense = fused if fused.fused or fused.folded_bn else dense
            elif not dense.dense:
                dense.reason = f"{dense.reason}; {no_onednn}"
            rewritten.append(dense)
        return Rewrite(rewritten, _cpu_text(rewritten, run_dtype))


def _cpu_text(rewritten: list, run_dtype) -> str:
    lowered = [r for r in rewritten if r.dense]
    parts = []
    if lowered:
        matrices = sum(r.dense for r in lowered)
        # float32 chains of ReLU layers run by drt-fast's block kernel (fuse.DenseMember)
        chained = [r.module for r in lowered if r.module.chained] if run_dtype == torch.float32 else []
        kernel = ""
        if chained:
            dense_macs = sum(m.chain_stats[0] for m in chained)
            kernel = (f"; {len(chained)} run by the block-sparse CPU kernel, "
                      f"{sum(m.chain_stats[1] for m in chained) / dense_macs:.0%} of the multiply-adds")
        parts.append(f"{len(lowered)} of {len(rewritten)} member(s) as dense matrices "
                     f"({matrices} {'matrix' if matrices == 1 else 'matrices'}{kernel})")
    convs = [r for r in rewritten if r.fused or r.folded_bn]
    if convs:
        parts.append(f"{sum(r.fused for r in convs)} fused convolutions (oneDNN), "
                     f"{sum(r.folded_bn for r in convs)} BatchNorms folded in {len(convs)} member(s)")
    return "; ".join(parts)


def default_rewriter(device):
    """cuDNN's rewrites on CUDA, the CPU's elsewhere."""
    return CudaRewriter() if torch.device(device).type == "cuda" else CpuRewriter()
