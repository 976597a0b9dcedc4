"""``noisy_draws_discrete``: inputs on a grid, each broadcast over its draws, plus discrete noise.

For inputs ``v / grid`` (v int32 grid indices), row ``b*reps + r`` of the output is
``(v[b] + I) / grid`` with I the rounded Gaussian of `rounded_gaussian` drawn exactly, by
integer comparisons of counter-based 64-bit uniforms with the table's thresholds
(csrc/philox.h): the noisy input is a function of the integer sum ``v + I`` alone, the same
for any batch size, order or device, bit for bit (`reference.reference_noisy_draws_discrete`).
`grid_indices` turns pixels into grid indices, refusing pixels that are not on the grid.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidArgument
from . import checks, extension, reference

ON_GRID_TOLERANCE = 2.0 ** -10  # grid steps: how far fp32/fp64 pixels may sit from their grid point


@torch.library.custom_op("drt_fast::noisy_draws_discrete", mutates_args=())
def noisy_draws_discrete(v: Tensor, keys: Tensor, first_draw: Tensor, reps: int, thresholds: Tensor, guide: Tensor,
                         grid: int, seed: int, out_dtype: Optional[torch.dtype] = None,
                         channels_last: bool = False) -> Tensor:
    """Noisy copies of grid inputs: ``[B*reps, *S]``, row ``b*reps + r`` = ``(v[b] + I) / grid``.

    Args:
        v: ``[B, *S]`` int32 grid indices (the pixels ``v / grid``), ``|v| + K < 2^24``.
        keys: ``[B]`` int64 input keys (the dataset index of each input), in [0, 2^63).
        first_draw: ``[B]`` int64 index of the first draw of each input (draws below 2^32).
        reps: draws per input. thresholds: ``[2K]`` int64, the uint64 bits of the ascending
            thresholds of a `rounded_gaussian.DiscreteTable`, and guide: its int32 guide
            ``[2^g + 1]`` (both on v's device). grid: steps per unit. seed: the noise stream,
            in [0, 2^64) (through the dispatcher: [0, 2^63)).
        out_dtype: float32 (``None``), bfloat16 or float16: ``(v + I) / grid`` is computed in
            fp32 (the sum exact, the quotient rounded once), then rounded to out_dtype.
        channels_last: write a channels-last ``[B*reps, C, H, W]`` output (4-d v only).
    """
    return noisy_draws_discrete_eager(v, keys, first_draw, reps, thresholds, guide, grid, seed, out_dtype,
                                      channels_last)


def noisy_draws_discrete_eager(v: Tensor, keys: Tensor, first_draw: Tensor, reps: int, thresholds: Tensor,
                               guide: Tensor, grid: int, seed: int, out_dtype: Optional[torch.dtype] = None,
                               channels_last: bool = False) -> Tensor:
    """`noisy_draws_discrete` without the dispatcher (as `noise.noisy_draws_eager`)."""
    out_dtype = checks.noisy_draws_discrete_args(v, keys, first_draw, reps, thresholds, guide, grid, seed, out_dtype,
                                                 channels_last)
    kernels = extension.kernels_for("noisy_draws_discrete", v)
    if kernels is None:
        return reference.reference_noisy_draws_discrete(v, keys, first_draw, reps, thresholds, guide, grid, seed,
                                                        out_dtype, channels_last)
    out = checks.noisy_draws_output(v, reps, out_dtype, channels_last)
    # keep every tensor whose pointer crosses into C++ referenced until the call returns
    v_c, keys_c, first_c = v.contiguous(), keys.contiguous(), first_draw.contiguous()
    table, guide_c = thresholds.contiguous(), guide.contiguous()
    half_width = table.shape[0] // 2
    num_elements = math.prod(v.shape[1:])
    channels, spatial = (v.shape[1], v.shape[2] * v.shape[3]) if channels_last else (1, num_elements)
    args = (v_c.data_ptr(), keys_c.data_ptr(), first_c.data_ptr(), out.data_ptr(), v.shape[0], num_elements, reps,
            table.data_ptr(), half_width, guide_c.data_ptr(), guide.shape[0].bit_length() - 1, float(grid), seed,
            extension.DTYPE_CODES[out_dtype], bool(channels_last), channels, spatial)
    if v.is_cuda:   # value checks would synchronize with the host: the caller's (grid_indices)
        with torch.cuda.device(v.device):
            kernels.noisy_draws_discrete(*args, *extension.cuda_launch(v))
    else:
        checks.draws_in_range(first_c, reps)
        checks.grid_indices_in_range(v_c, half_width)
        kernels.noisy_draws_discrete(*args)
    return out


@noisy_draws_discrete.register_fake
def _(v, keys, first_draw, reps, thresholds, guide, grid, seed, out_dtype=None, channels_last=False):
    out_dtype = checks.noisy_draws_discrete_args(v, keys, first_draw, reps, thresholds, guide, grid, seed, out_dtype,
                                                 channels_last)
    return checks.noisy_draws_output(v, reps, out_dtype, channels_last)


def to_grid(x: Tensor, grid: int) -> Tensor:
    """int32 ``round(x * grid)`` for pixels ``x`` that `grid_indices` accepted (the product is
    exact in float64 for fp32, bf16 and fp16 pixels): no checks, no host synchronization."""
    return torch.round(x.to(torch.float32).to(torch.float64) * grid).to(torch.int32)


def first_off_grid(x: Tensor, grid: int, half_width: int = 0) -> Optional[int]:
    """The flat index of the first pixel of ``x`` that is not on the grid of step
    ``1 / grid``, or None. A pixel is on it when its fp32 value (what the sampler passes
    on) is within ``ON_GRID_TOLERANCE`` steps of a grid point ``v / grid`` or is exactly that
    point rounded to x's dtype, and ``|v| + half_width < 2^24``; NaN and inf are not."""
    scaled = x.to(torch.float32).to(torch.float64) * grid
    v = torch.round(scaled)
    on_grid = (scaled - v).abs() <= ON_GRID_TOLERANCE      # NaN: False; inf - inf is NaN
    if x.dtype != torch.float64:
        on_grid |= (v / grid).to(x.dtype) == x
    on_grid &= v.abs() + half_width < checks.GRID_INDEX_LIMIT   # (an inf that matched above: here)
    if bool(on_grid.all()):
        return None
    return int((~on_grid).reshape(-1).nonzero()[0, 0])


def grid_indices(x: Tensor, grid: int, half_width: int = 0) -> Tensor:
    """The int32 grid indices ``v = round(x * grid)`` of pixels ``x`` on the grid of step
    ``1 / grid`` (`first_off_grid`); InvalidArgument naming the first pixel that is not."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InvalidArgument(f"noise='discrete' needs floating pixels, got "
                              f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    flat = first_off_grid(x, grid, half_width)
    if flat is not None:
        where = [int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)]
        value = float(x.reshape(-1)[flat])
        raise InvalidArgument(
            f"noise='discrete' needs inputs on the grid of step 1/{grid} (pixels k/{grid}, k an integer, "
            f"|k| < 2^24); "
            f"pixel {where} is {value!r} ({value * grid:.6g} steps): give the data's own grid "
            f"(e.g. grid=255 for 8-bit images) or use noise='gaussian'")
    return to_grid(x, grid)
