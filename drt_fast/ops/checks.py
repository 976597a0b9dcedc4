"""The ops' argument checks, shared by the kernels, the fake (meta) kernels and the references.

Each check raises `InvalidArgument` / `InvalidArgumentType` with one line naming what was
expected and what came, before any pointer crosses into C++. Checks that read tensor values
(`draws_in_range`, `rows_in_range`, `finite_weights`, `dense_chain_plan`) are not for fake
tensors, nor for CUDA tensors on the hot path (they would synchronize with the host).
"""
import math

import torch
from torch import Tensor

from .. import validate
from ..errors import InvalidArgument, InvalidArgumentType
from .cifar_resnet_layout import cifar_resnet_convs

NOISE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what noisy_draws writes
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what vote_ reads
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # noisy_draws' x
ELEMENT_LIMIT = 2**32  # elements of one input: noise blocks are counted in 30 bits (csrc/philox.h)


def shape(t: Tensor) -> list:
    return list(t.shape)


def require_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise InvalidArgumentType(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def index_vector(name: str, t: Tensor, length: int, device: torch.device) -> None:
    """``t`` is an int64 ``[length]`` tensor on ``device``."""
    require_tensor(name, t)
    if t.dtype != torch.int64:
        raise InvalidArgument(f"{name} must be int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise InvalidArgument(f"{name} must have shape [{length}], got {shape(t)}")
    if t.device != device:
        raise InvalidArgument(f"{name} must be on the same device as the other tensors ({device}), got {t.device}")


# ---- noisy_draws ---------------------------------------------------------------------------
def noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last):
    """noisy_draws' arguments; returns the output dtype (``out_dtype`` resolved)."""
    require_tensor("x", x)
    if x.dtype not in INPUT_DTYPES:
        raise InvalidArgument(f"x must be a floating tensor (float32, float64, bfloat16, float16), got {x.dtype}")
    if x.dim() < 1:
        raise InvalidArgument("x must have shape [B, *S] with a batch dimension, got a 0-d tensor")
    batch = x.shape[0]
    if math.prod(x.shape[1:]) > ELEMENT_LIMIT:  # the counter's block index (csrc/philox.h)
        raise InvalidArgument(f"an input may hold at most 2**32 elements, got {math.prod(x.shape[1:])} "
                              f"(shape {shape(x)})")
    index_vector("keys", keys, batch, x.device)
    index_vector("first_draw", first_draw, batch, x.device)
    if reps < 1:
        raise InvalidArgument(f"reps must be >= 1, got {reps}")
    if reps > validate.DRAW_LIMIT:  # (else torch's allocation fails first, or its size overflows, unclearly)
        raise InvalidArgument(f"reps must be at most 2**32 (draw indices stay below 2^32), got {reps}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise InvalidArgument(f"sigma must be a finite number >= 0, got {sigma}")
    validate.stream(seed)
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in NOISE_DTYPES else torch.float32
    if out_dtype not in NOISE_DTYPES:
        raise InvalidArgument(f"out_dtype must be one of float32, bfloat16, float16 or None, got {out_dtype}")
    if channels_last and x.dim() != 4:
        raise InvalidArgument(f"channels_last output needs a 4-d input [B, C, H, W], got shape {shape(x)}")
    return out_dtype


def noisy_draws_discrete_args(v, keys, first_draw, reps, thresholds, guide, grid, seed, out_dtype, channels_last):
    """noisy_draws_discrete's arguments; returns the output dtype (``out_dtype`` resolved)."""
    require_tensor("v", v)
    if v.dtype != torch.int32:
        raise InvalidArgument(f"v must be int32 grid indices, got {v.dtype}")
    if v.dim() < 1:
        raise InvalidArgument("v must have shape [B, *S] with a batch dimension, got a 0-d tensor")
    if math.prod(v.shape[1:]) > ELEMENT_LIMIT:
        raise InvalidArgument(f"an input may hold at most 2**32 elements, got {math.prod(v.shape[1:])} "
                              f"(shape {shape(v)})")
    batch = v.shape[0]
    index_vector("keys", keys, batch, v.device)
    index_vector("first_draw", first_draw, batch, v.device)
    if reps < 1:
        raise InvalidArgument(f"reps must be >= 1, got {reps}")
    if reps > validate.DRAW_LIMIT:
        raise InvalidArgument(f"reps must be at most 2**32 (draw indices stay below 2^32), got {reps}")
    require_tensor("thresholds", thresholds)
    if (thresholds.dtype != torch.int64 or thresholds.dim() != 1 or thresholds.shape[0] < 2
            or thresholds.shape[0] % 2):
        raise InvalidArgument(f"thresholds must be int64 [2K] with K >= 1 (drt_fast.ops.discrete_table), "
                              f"got {thresholds.dtype} {shape(thresholds)}")
    if thresholds.device != v.device:
        raise InvalidArgument(f"thresholds must be on v's device ({v.device}), got {thresholds.device}")
    require_tensor("guide", guide)
    entries = guide.shape[0] if guide.dim() == 1 else 0
    if guide.dtype != torch.int32 or entries < 3 or entries > 2**24 + 1 or (entries - 1) & (entries - 2):
        raise InvalidArgument(f"guide must be int32 [2^g + 1] with g in [1, 24] (drt_fast.ops.discrete_table), "
                              f"got {guide.dtype} {shape(guide)}")
    if guide.device != v.device:
        raise InvalidArgument(f"guide must be on v's device ({v.device}), got {guide.device}")
    validate.grid(grid)
    validate.stream(seed)
    if out_dtype is None:
        out_dtype = torch.float32
    if out_dtype not in NOISE_DTYPES:
        raise InvalidArgument(f"out_dtype must be one of float32, bfloat16, float16 or None, got {out_dtype}")
    if channels_last and v.dim() != 4:
        raise InvalidArgument(f"channels_last output needs a 4-d input [B, C, H, W], got shape {shape(v)}")
    return out_dtype


GRID_INDEX_LIMIT = 2**24  # |v + I| below it: the sum is exact in fp32


def grid_indices_in_range(v: Tensor, half_width: int) -> None:
    """|v| + K < 2^24, so that every noisy index v + I is exact in fp32. Reads the values."""
    if v.numel():
        low, high = (int(t) for t in torch.aminmax(v))
        if max(-low, high) + half_width >= GRID_INDEX_LIMIT:
            raise InvalidArgument(f"grid indices must stay below 2**24 - {half_width} in magnitude "
                                  f"(noise reaches +-{half_width} steps), got values in [{low}, {high}]")


def draws_in_range(first_draw: Tensor, reps: int) -> None:
    """Every draw ``first_draw[b] + r`` (r < reps) lies in [0, 2^32) (`validate.draw_range`,
    on first_draw's extremes). Reads the values."""
    if first_draw.numel():
        low, high = (int(v) for v in torch.aminmax(first_draw))
        validate.draw_range(low, reps)
        validate.draw_range(high, reps)


def noisy_draws_output(x: Tensor, reps: int, out_dtype, channels_last: bool) -> Tensor:
    """noisy_draws' (uninitialized) output ``[B*reps, *S]``, channels-last if asked."""
    size = (x.shape[0] * reps, *x.shape[1:])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(size, dtype=out_dtype, device=x.device, memory_format=memory_format)


# ---- vote_ ---------------------------------------------------------------------------------
def vote_args(logits, rows, counts, agg, weights) -> None:
    require_tensor("logits", logits)
    if logits.dim() != 3:
        raise InvalidArgument(f"logits must have shape [M, R, K] (members, draws, classes), got {shape(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise InvalidArgument(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    members, draws, classes = logits.shape
    if members < 1 or classes < 1:
        raise InvalidArgument(f"logits must have at least one member and one class, got shape {shape(logits)}")
    device = logits.device
    index_vector("rows", rows, draws, device)
    require_tensor("counts", counts)
    if counts.dtype != torch.int64:
        raise InvalidArgument(f"counts must be int64, got {counts.dtype}")
    if counts.dim() != 2 or counts.shape[1] != classes:
        raise InvalidArgument(f"counts must have shape [B, {classes}] (K from logits), got {shape(counts)}")
    if not counts.is_contiguous():
        raise InvalidArgument("counts must be contiguous (it is updated in place), got a non-contiguous tensor")
    if counts.device != device:
        raise InvalidArgument(f"counts must be on the same device as logits ({device}), got {counts.device}")
    validate.aggregation(agg, "agg")
    require_tensor("weights", weights)
    if weights.dtype != torch.float32 or weights.dim() != 1 or weights.shape[0] != members:
        raise InvalidArgument(f"weights must be float32 with shape [{members}], got {weights.dtype} {shape(weights)}")
    if weights.device != device:
        raise InvalidArgument(f"weights must be on the same device as logits ({device}), got {weights.device}")


def finite_weights(weights: Tensor) -> None:
    """Reads the values."""
    values = weights.tolist()
    if not math.isfinite(sum(values)):  # float64 sums of float32 values: inf/NaN only from inf/NaN
        raise InvalidArgument(f"weights must be finite, got {values}")


def rows_in_range(rows: Tensor, batch: int) -> None:
    """Reads the values."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise InvalidArgument(
            f"rows must index counts' first dimension, in [0, {batch}), got values in "
            f"[{int(rows.min())}, {int(rows.max())}]"
        )


# ---- bias_act_, dense_chain ----------------------------------------------------------------
def bias_act_args(h, bias) -> None:
    require_tensor("h", h)
    require_tensor("bias", bias)
    if h.dim() != 2:
        raise InvalidArgument(f"h must have shape [rows, cols], got {shape(h)}")
    if not h.is_floating_point() or bias.dtype != h.dtype:
        raise InvalidArgument(f"h and bias must be one floating dtype, got {h.dtype} and {bias.dtype}")
    if bias.dim() != 1 or bias.shape[0] != h.shape[1]:
        raise InvalidArgument(f"bias must have shape [{h.shape[1]}], got {shape(bias)}")
    if bias.device != h.device:
        raise InvalidArgument(f"bias must be on h's device ({h.device}), got {bias.device}")


def dense_chain_args(x, meta, params, out_cols) -> None:
    require_tensor("x", x)
    require_tensor("meta", meta)
    require_tensor("params", params)
    if x.dim() != 2 or x.dtype != torch.float32:
        raise InvalidArgument(f"x must be float32 [rows, cols], got {x.dtype} {shape(x)}")
    if meta.dim() != 1 or meta.dtype != torch.int64 or meta.numel() < 4:
        raise InvalidArgument(f"meta must be an int64 plan (drt_fast.fuse.chain_plan), got {meta.dtype} {shape(meta)}")
    if params.dim() != 1 or params.dtype != torch.float32:
        raise InvalidArgument(f"params must be float32 [n], got {params.dtype} {shape(params)}")
    if meta.device.type != "cpu":
        raise InvalidArgument(f"meta must be on the CPU, got {meta.device}")
    if params.device != x.device:
        raise InvalidArgument(f"params must be on x's device ({x.device}), got {params.device}")
    if not isinstance(out_cols, int) or out_cols < 1:
        raise InvalidArgument(f"out_cols must be a positive int, got {out_cols!r}")


def dense_chain_plan(x, meta, out_cols) -> None:
    """The plan's columns against x's and out_cols. Reads meta."""
    in_cols, plan_out = int(meta[1]), int(meta[2])
    if x.shape[1] != in_cols or out_cols != plan_out:
        raise InvalidArgument(f"the plan maps {in_cols} columns to {plan_out}; got x with "
                              f"{x.shape[1]} columns and out_cols={out_cols}")


# ---- cifar_resnet --------------------------------------------------------------------------
def cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant) -> None:
    for name, t in (("x", x), ("weights", weights), ("biases", biases), ("norm", norm), ("fc_w", fc_w),
                    ("fc_b", fc_b)):
        require_tensor(name, t)
        if t.device != x.device:
            raise InvalidArgument(f"{name} must be on x's device ({x.device}), got {t.device}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32) or x.dtype not in LOGIT_DTYPES:
        raise InvalidArgument(f"x must be float32/bfloat16/float16 [B, 3, 32, 32], got {x.dtype} {shape(x)}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= 1000:
        raise InvalidArgument(f"blocks must be an int in [1, 1000], got {blocks!r}")
    if variant not in (0, 1) or isinstance(variant, bool):
        raise InvalidArgument(f"variant must be 0 (wmma) or 1 (mma.sync), got {variant!r}")
    convs = cifar_resnet_convs(blocks)
    tiles = sum(taps * cin * cout for cin, cout, taps, _, _ in convs)
    if weights.dtype != torch.bfloat16 or weights.dim() != 1 or weights.numel() != tiles:
        raise InvalidArgument(f"weights must be bfloat16 [{tiles}] for {blocks} blocks a stage, "
                              f"got {weights.dtype} {shape(weights)}")
    n_biases = sum(cout for _, cout, _, _, _ in convs)
    if biases.dtype != torch.float32 or biases.dim() != 1 or biases.numel() != n_biases:
        raise InvalidArgument(f"biases must be float32 [{n_biases}], got {biases.dtype} {shape(biases)}")
    if norm.dtype != torch.float32 or shape(norm) != [6]:
        raise InvalidArgument(f"norm must be float32 [6] (3 means, 3 sds), got {norm.dtype} {shape(norm)}")
    if fc_w.dtype != torch.float32 or fc_w.dim() != 2 or fc_w.shape[1] != 64 or fc_w.shape[0] < 1:
        raise InvalidArgument(f"fc_w must be float32 [classes, 64], got {fc_w.dtype} {shape(fc_w)}")
    if fc_b.dtype != torch.float32 or shape(fc_b) != [fc_w.shape[0]]:
        raise InvalidArgument(f"fc_b must be float32 [{fc_w.shape[0]}], got {fc_b.dtype} {shape(fc_b)}")
