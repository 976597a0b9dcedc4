"""``cifar_resnet``: a whole CIFAR ResNet forward in one CUDA kernel (csrc/cuda/cifar_resnet.cu).

`drt_fast.fuse.CifarResNetMember` builds its arguments (BatchNorms folded, weights packed as
the kernel's tiles, `cifar_resnet_layout`). The kernel's CTA program also runs on the host
(`cifar_resnet_on_host`, a test hook of ``_C_cuda``), and it can stop after a phase and
hand back each draw's shared memory (`cifar_resnet_snapshot`), for debugging.
"""
import torch
from torch import Tensor

from ..errors import DrtFastError, InvalidArgument
from . import checks, extension, reference


def cifar_resnet_binding_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, stop_after=0,
                              snapshot=None) -> tuple:
    """The binding's arguments (cuda_kernels.h CifarResNetArgs) but the trailing launch
    ones: raw pointers, so the tensors must stay alive until the call returns.
    ``stop_after`` / ``snapshot``: the kernel's debugging hook."""
    return (x.data_ptr(), extension.DTYPE_CODES[x.dtype], x.shape[0], *x.stride(), weights.data_ptr(),
            weights.numel(), biases.data_ptr(), biases.numel(), norm.data_ptr(), fc_w.data_ptr(),
            fc_b.data_ptr(), fc_w.shape[0], blocks, out.data_ptr(), variant, stop_after,
            0 if snapshot is None else snapshot.data_ptr())


def _launch(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, stop_after=0, snapshot=None,
            on_host=False, order=0) -> None:
    """The CUDA kernel on x's GPU, or with ``on_host`` its CTA program on the host (CPU
    tensors; ``order``: the order of each phase's warps there), writing ``out`` (and
    ``snapshot``)."""
    # contiguous, the weight tiles 32-byte and the biases 8-byte aligned (vector loads)
    params = [t.contiguous() for t in (weights, biases, norm, fc_w, fc_b)]
    for i, alignment in ((0, 32), (1, 8)):
        if params[i].data_ptr() % alignment:
            params[i] = params[i].clone()
    args = cifar_resnet_binding_args(x, *params, blocks, variant, out, stop_after, snapshot)
    try:
        if on_host:
            _cuda_module().cifar_resnet_on_host(*args, order)
        else:
            with torch.cuda.device(x.device):
                extension.cuda_kernels.cifar_resnet(*args, *extension.cuda_launch(x))
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def _cuda_module():
    if extension.cuda_kernels is None:
        raise DrtFastError("drt_fast was built without its CUDA kernels")
    return extension.cuda_kernels


def cifar_resnet_eager(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor, fc_b: Tensor,
                       blocks: int, variant: int = 0) -> Tensor:
    """`cifar_resnet` without the dispatcher (see `noisy_draws_eager`)."""
    checks.cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    if not (x.is_cuda and extension.kernels_run_on(x.device)):
        return reference.reference_cifar_resnet(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    out = torch.empty(x.shape[0], fc_w.shape[0], dtype=torch.float32, device=x.device)
    _launch(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out)
    return out


@torch.library.custom_op("drt_fast::cifar_resnet", mutates_args=())
def cifar_resnet(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor, fc_b: Tensor,
                 blocks: int, variant: int = 0) -> Tensor:
    """A CIFAR ResNet (depth 6n+2, n = ``blocks``) forward: ``x`` ``[B, 3, 32, 32]`` pixels
    (any strides) -> float32 logits ``[B, classes]``. ``norm``: the input layer's 3 means
    and 3 sds; ``weights``: every convolution's folded weight as bf16 tiles
    (`pack_cifar_resnet_weight`, in `cifar_resnet_convs` order); ``biases``: their folded
    BatchNorm biases; ``fc_w`` ``[classes, 64]``, ``fc_b``: the linear layer; ``variant``:
    the kernel's tensor-core path, 0 (wmma) or 1 (mma.sync), which fixes the tiles' order.

    On CUDA (compute capability 8.0 or newer), one kernel with a CTA per draw keeps the draw's
    activations in shared memory through the whole network; elsewhere, and under the
    reference switch, `reference_cifar_resnet` (the same roundings in torch)."""
    return cifar_resnet_eager(x, weights, biases, norm, fc_w, fc_b, blocks, variant)


@cifar_resnet.register_fake
def _(x, weights, biases, norm, fc_w, fc_b, blocks, variant=0):
    checks.cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    return x.new_empty(x.shape[0], fc_w.shape[0], dtype=torch.float32)


def cifar_resnet_on_host(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor, fc_b: Tensor,
                         blocks: int, variant: int = 0, order: int = 0) -> Tensor:
    """`cifar_resnet` by the kernel's CTA program run on the host (CPU tensors; draw after
    draw; ``order`` 0, 1 or 2: the order in which each phase's warps and threads run, which
    must not change the result). A test hook: needs the CUDA build, not a GPU."""
    checks.cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    out = torch.full((x.shape[0], fc_w.shape[0]), float("nan"))
    _launch(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, on_host=True, order=order)
    return out


def cifar_resnet_snapshot(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor,
                          fc_b: Tensor, blocks: int, variant: int, stop_after: int,
                          on_host: bool = False) -> Tensor:
    """Each draw's kernel shared memory after ``stop_after`` phases (1: the stem; then one
    per conv1 -- a stage's entry: conv1 and the downsample -- and one per conv2), uint8
    ``[B, bytes]``: on x's GPU, or with ``on_host`` the kernel's program on the host (CPU
    tensors). For debugging the kernel; read maps with `cifar_resnet_map`."""
    checks.cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    size = _cuda_module().cifar_resnet_sizes(blocks, variant)[2]
    snapshot = torch.zeros(x.shape[0], size, dtype=torch.uint8, device=x.device)
    out = torch.empty(x.shape[0], fc_w.shape[0], dtype=torch.float32, device=x.device)
    _launch(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, stop_after, snapshot, on_host)
    return snapshot
