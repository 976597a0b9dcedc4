"""The CPU kernels of dense members (`drt_fast.fuse.DenseMember`): ``bias_act_``, a layer's
bias and activation after its GEMM, and ``dense_chain``, a whole member by a block plan
(`drt_fast.fuse.chain_plan`; layout in csrc/kernels.h DenseChainArgs).

Both have a direct entry point without the dispatcher (`bias_act_cpu_`, `dense_chain_cpu`),
which a dense member calls once per layer or batch, where the custom op's per-call overhead
would cost as much as the kernel saves. Each returns a "not done" value where its kernel
does not apply (or the reference switch is on), and the caller falls back.
"""
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidArgument
from . import checks, extension, reference


def bias_act_cpu_(h: Tensor, bias: Tensor, relu: bool) -> bool:
    """``bias_act_``'s CPU kernel called directly. Returns False, having done nothing, where
    the kernel does not apply (not float32 on the CPU, not contiguous, no ``_C``, the
    reference switch on): the caller falls back."""
    kernels = extension.cpu_kernels
    if not (h.dtype == torch.float32 and h.device.type == "cpu" and h.is_contiguous()
            and bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.is_contiguous()
            and h.dim() == 2 and bias.dim() == 1 and bias.shape[0] == h.shape[1]) \
            or kernels is None or extension.reference_in_use():
        return False
    kernels.bias_act(h.data_ptr(), bias.data_ptr(), h.shape[0], h.shape[1], bool(relu))
    return True


@torch.library.custom_op("drt_fast::bias_act_", mutates_args=("h",))
def bias_act_(h: Tensor, bias: Tensor, relu: bool) -> None:
    """In place ``h = act(h + bias)``: ``h`` ``[rows, cols]``, ``bias`` ``[cols]`` of h's
    dtype; act is ReLU when ``relu`` (NaN stays NaN), else the identity. One pass over h on
    the CPU for float32 (the C++ kernel); other dtypes and devices run the torch reference."""
    checks.bias_act_args(h, bias)
    if not bias_act_cpu_(h, bias, relu):
        reference.reference_bias_act_(h, bias, relu)


@bias_act_.register_fake
def _(h, bias, relu):
    checks.bias_act_args(h, bias)


def dense_chain_cpu(x: Tensor, meta: Tensor, params: Tensor, out_cols: int) -> Optional[Tensor]:
    """``dense_chain``'s CPU kernel called directly. Returns None, having done nothing, where
    the kernel does not apply (not float32 on the CPU, no ``_C``, the reference switch on):
    the caller falls back. A plan that does not fit x or out_cols raises `InvalidArgument`
    (the kernel checks every size and offset of the plan)."""
    kernels = extension.cpu_kernels
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and params.dtype == torch.float32 and params.device.type == "cpu" and params.is_contiguous()
            and meta.dtype == torch.int64 and meta.device.type == "cpu" and meta.is_contiguous()) \
            or kernels is None or extension.reference_in_use():
        return None
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    out = torch.empty(x.shape[0], out_cols, dtype=torch.float32)
    try:
        kernels.dense_chain(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), out_cols,
                            meta.data_ptr(), meta.numel(), params.data_ptr(), params.numel())
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    return out


@torch.library.custom_op("drt_fast::dense_chain", mutates_args=())
def dense_chain(x: Tensor, meta: Tensor, params: Tensor, out_cols: int) -> Tensor:
    """A dense member's forward by the plan ``meta`` / ``params`` (`drt_fast.fuse.chain_plan`):
    matrices in blocks, each layer's bias and optional ReLU. ``x`` ``[rows, in_cols]``
    float32 → ``[rows, out_cols]``. The C++ kernel on the CPU (each row summed in a fixed
    order: results do not depend on the batch), the torch reference elsewhere."""
    checks.dense_chain_args(x, meta, params, out_cols)
    checks.dense_chain_plan(x, meta, out_cols)
    out = dense_chain_cpu(x, meta, params, out_cols)
    return reference.reference_dense_chain(x, meta, params, out_cols) if out is None else out


@dense_chain.register_fake
def _(x, meta, params, out_cols):
    checks.dense_chain_args(x, meta, params, out_cols)
    return x.new_empty(x.shape[0], out_cols)
