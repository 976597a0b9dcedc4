"""``noisy_draws``: each input broadcast over its draws, plus counter-based Gaussian noise.

Row ``b*reps + r`` of the output is ``x[b] + sigma * noise(seed, keys[b], first_draw[b] + r,
element)``, the noise a pure function of its arguments (docs/internals.md, Noise): the same
for any batch size, order or device, bit for bit (`reference.reference_noisy_draws`).
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import checks, extension, reference


@torch.library.custom_op("drt_fast::noisy_draws", mutates_args=())
def noisy_draws(x: Tensor, keys: Tensor, first_draw: Tensor, reps: int, sigma: float, seed: int,
                out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """Noisy copies of each input: ``[B*reps, *S]``, row ``b*reps + r`` = ``x[b] + sigma * noise``.

    Args:
        x: ``[B, *S]`` inputs (pixel space), any float dtype; the sum is computed in fp32.
        keys: ``[B]`` int64 input keys (the dataset index of each input), in [0, 2^63).
        first_draw: ``[B]`` int64 index of the first draw of each input (draws below 2^32).
        reps: draws per input. sigma: noise level. seed: the noise stream, in [0, 2^64)
            (through the dispatcher, whose ints are int64: [0, 2^63)).
        out_dtype: float32, bfloat16 or float16 (``None``: x's dtype, or float32 for float64).
        channels_last: write a channels-last ``[B*reps, C, H, W]`` output (4-d x only).

    Differentiable in ``x``: the gradient of ``x[b]`` is the sum of its rows' gradients.
    """
    return noisy_draws_eager(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)


def noisy_draws_eager(x: Tensor, keys: Tensor, first_draw: Tensor, reps: int, sigma: float, seed: int,
                      out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """`noisy_draws` without the dispatcher: the same checks, kernels and result, no autograd,
    not traceable; for eager callers in a hot loop, where the custom op's per-call overhead
    counts (bench/RESULTS.md, "Dispatcher overhead")."""
    out_dtype = checks.noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    kernels = extension.kernels_for("noisy_draws", x)
    if kernels is None:
        return reference.reference_noisy_draws(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    out = checks.noisy_draws_output(x, reps, out_dtype, channels_last)
    # keep every tensor whose pointer crosses into C++ referenced until the call returns
    x32 = x.to(torch.float32).contiguous()
    keys_c, first_c = keys.contiguous(), first_draw.contiguous()
    num_elements = math.prod(x.shape[1:])
    channels, spatial = (x.shape[1], x.shape[2] * x.shape[3]) if channels_last else (1, num_elements)
    args = (x32.data_ptr(), keys_c.data_ptr(), first_c.data_ptr(), out.data_ptr(), x.shape[0], num_elements,
            reps, float(sigma), seed, extension.DTYPE_CODES[out_dtype], bool(channels_last), channels, spatial)
    if x.is_cuda:   # the draw range is not checked there: it would synchronize with the host
        with torch.cuda.device(x.device):
            kernels.noisy_draws(*args, *extension.cuda_launch(x))
    else:
        checks.draws_in_range(first_c, reps)
        kernels.noisy_draws(*args)
    return out


@noisy_draws.register_fake
def _(x, keys, first_draw, reps, sigma, seed, out_dtype=None, channels_last=False):
    out_dtype = checks.noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    return checks.noisy_draws_output(x, reps, out_dtype, channels_last)


def _setup_context(ctx, inputs, output):
    x, _, _, reps, *_ = inputs
    ctx.reps, ctx.x_shape, ctx.x_dtype = reps, x.shape, x.dtype


def _backward(ctx, grad):
    # out[b*reps + r] = x[b] + noise, so dx[b] is the sum of the output gradient over r
    grad_x = grad.reshape(ctx.x_shape[0], ctx.reps, *ctx.x_shape[1:]).sum(dim=1, dtype=torch.float32)
    return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None


noisy_draws.register_autograd(_backward, setup_context=_setup_context)
