"""The fused sampling hot path as torch custom ops, and their pure-torch references.

The sampling ops, registered under ``torch.ops.drt_fast`` (contracts in docs/internals.md):

* ``noisy_draws(x[B,*S], keys[B], first_draw[B], reps, sigma, seed, out_dtype=None,
  channels_last=False) -> [B*reps, *S]``: row ``b*reps + r`` is
  ``x[b] + sigma * noise(seed, keys[b], first_draw[b] + r, element)``.
* ``vote_(logits[M,R,K], rows[R], counts[B,K], agg, weights[M]) -> None``: per draw ``r``,
  aggregate the M members' logits (``agg`` in we/logit/mme/mv), take the argmax and add one
  to ``counts[rows[r], label]`` in place. Draws with any non-finite logit are not counted.

and two for the CPU's dense members (`drt_fast.fuse.DenseMember`): ``bias_act_`` (a layer's
bias and ReLU after a GEMM) and ``dense_chain`` (a whole member, by a block plan).

The noise is Philox4x32-10 (key = seed, counter = (element // 4, draw, input key)) followed
by Box-Muller computed with IEEE basic operations only, so the C++ kernel, the CUDA kernel
and :func:`reference_noisy_draws` below produce bit-identical fp32 noise.

This module is the only caller of the compiled ``_C`` / ``_C_cuda`` modules: every check on
device, dtype, shape and contiguity happens here, before a pointer crosses into C++.
"""
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .errors import DrtFastError, InvalidArgument, InvalidArgumentType

try:  # the CPU kernels; the source tree has none until `pip install .` (or -e .) built it
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _C_IMPORT_ERROR = exc

_C_CUDA_IMPORT_ERROR = None
try:  # the CUDA kernels, only built where nvcc was found
    from . import _C_cuda
except ImportError as exc:
    _C_cuda = None
    # not built (no such module) is normal; a module that exists but fails to load is not
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C_cuda") is not None:
        _C_CUDA_IMPORT_ERROR = exc

__all__ = [
    "noisy_draws",
    "vote_",
    "reference_noisy_draws",
    "reference_vote_",
    "noisy_draws_eager",
    "vote_eager_",
    "bias_act_",
    "reference_bias_act_",
    "dense_chain",
    "reference_dense_chain",
    "reference_labels",
    "cuda_available",
    "AGGREGATIONS",
    "NOISE_DTYPES",
    "LOGIT_DTYPES",
]

AGGREGATIONS = ("we", "logit", "mme", "mv")
NOISE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what noisy_draws writes
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what vote_ reads
_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# dtype codes shared with csrc/bindings.cpp
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_AGG_CODE = {name: i for i, name in enumerate(AGGREGATIONS)}


# ----------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------
_cuda_ok = None


def cuda_available() -> bool:
    """Whether the CUDA kernels were built and a CUDA driver answers with at least one device.

    Never raises: a build without CUDA or a machine without a driver just gives False.
    """
    global _cuda_ok
    if _cuda_ok is None:
        try:
            _cuda_ok = _C_cuda is not None and _C_cuda.device_count() > 0
        except Exception:  # a broken driver must not break `import drt_fast`
            _cuda_ok = False
    return _cuda_ok


def arch_covers(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``CMAKE_CUDA_ARCHITECTURES`` ``archs`` (comma- or
    semicolon-separated: ``"80,90"``, ``"80-real,90-virtual"``, ``"90a"``) holds code a GPU of
    compute ``capability`` ``(major, minor)`` runs: a cubin of its major version and no higher
    minor one, or PTX of no higher version (which the driver compiles). A list CMake expands
    itself (``native``, ``all``, ``all-major``) or an empty one cannot be judged: True."""
    entries = [e.strip() for e in archs.replace(";", ",").split(",") if e.strip()]
    for entry in entries:
        name, _, kind = entry.partition("-")
        specific = name[-1:] in ("a", "f")          # 90a, 100f: that GPU family only
        digits = name[:-1] if specific else name
        if not digits.isdigit():
            return True
        major, minor = divmod(int(digits), 10)
        if kind in ("", "real") and major == capability[0] and minor <= capability[1]:
            if not specific or minor == capability[1]:
                return True
        if kind in ("", "virtual") and not specific and (major, minor) <= tuple(capability):
            return True
    return not entries


_device_ok: dict = {}


def kernels_run_on(device) -> bool:
    """Whether the CUDA kernels were built, a driver answers, and the build holds code for
    ``device``'s GPU (`arch_covers`). Where it does not, CUDA tensors on it use the pure-torch
    references, with one warning saying how to rebuild."""
    if not cuda_available():
        return False
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_ok:
        archs = getattr(_C_cuda, "architectures", lambda: "")()
        capability = torch.cuda.get_device_capability(index)
        _device_ok[index] = arch_covers(archs, capability)
        if not _device_ok[index]:
            cc = "".join(map(str, capability))
            _warn_cuda_fallback(
                f"drt_fast's CUDA kernels were built for architectures {archs}, which hold no code "
                f"for {torch.cuda.get_device_name(index)} (sm_{cc}); CUDA tensors there use the "
                f"slower pure-torch reference implementation. Rebuild for it with "
                f"CMAKE_CUDA_ARCHITECTURES=\"{archs.replace(',', ';')};{cc}\" pip install . for the "
                f"fused kernels.")
    return _device_ok[index]


def _shadowed_install() -> Optional[str]:
    """The folder of a pip-installed drt_fast with compiled kernels, when the drt_fast
    imported is another copy (the source tree, first on sys.path for `python -m drt_fast`
    and `torchrun -m drt_fast` run from the repository root); else None."""
    from importlib import metadata

    here = Path(__file__).resolve().parent
    for dist in metadata.distributions():   # the source tree's egg-info is one of them
        try:
            if (dist.metadata["Name"] or "").lower().replace("_", "-") != "drt-fast":
                continue
            installed = Path(dist.locate_file("drt_fast")).resolve()
        except Exception:
            continue
        # an editable install has no package folder of its own
        if installed != here and installed.is_dir() and any(installed.glob("_C.*")):
            return str(installed)
    return None


def _require_cpu_kernels():
    if _C is None:
        installed = _shadowed_install()
        if installed is not None:
            raise ImportError(
                f"drt_fast._C (the compiled CPU kernels) is missing from the drt_fast imported "
                f"here, the source tree {Path(__file__).resolve().parent}, which shadows the "
                f"installed one in {installed} (`python -m drt_fast` and `torchrun -m drt_fast` "
                f"put the current directory first on sys.path): run them from another "
                f"directory, use the `drt-fast` command (torchrun --no-python ... drt-fast -- "
                f"certify ...), or build the source tree too (pip install -e .)"
            )
        raise ImportError(
            "drt_fast._C (the compiled CPU kernels) is missing: drt_fast must be built and "
            "installed with `pip install .` (or `pip install -e .` for development) before "
            f"its ops run on the CPU; importing it failed with: {_C_IMPORT_ERROR}"
        )
    return _C


_warned_cuda_fallback = False


def _warn_cuda_fallback(message: Optional[str] = None):
    global _warned_cuda_fallback
    if not _warned_cuda_fallback:
        _warned_cuda_fallback = True
        if message is None and _C_CUDA_IMPORT_ERROR is not None:
            message = (f"drt_fast's CUDA kernels fail to load ({_C_CUDA_IMPORT_ERROR}); CUDA tensors "
                       "use the slower pure-torch reference implementation. Reinstall drt-fast "
                       "(pip install .) against this torch and CUDA driver.")
        warnings.warn(
            message or
            "drt_fast was built without CUDA kernels (or no CUDA driver answers); CUDA tensors "
            "use the slower pure-torch reference implementation. Rebuild with nvcc on the PATH "
            "(DRT_FAST_CUDA=1 pip install .) for the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------
# Argument checks (shared by the real kernels, the fake kernels and the references)
# ----------------------------------------------------------------------------------------
def _shape(t: Tensor) -> list:
    return list(t.shape)


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise InvalidArgumentType(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_index_vector(name: str, t: Tensor, length: int, device: torch.device):
    _require_tensor(name, t)
    if t.dtype != torch.int64:
        raise InvalidArgument(f"{name} must be int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise InvalidArgument(f"{name} must have shape [{length}], got {_shape(t)}")
    if t.device != device:
        raise InvalidArgument(f"{name} must be on the same device as the other tensors ({device}), got {t.device}")


def _check_noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last):
    """Validate noisy_draws' arguments; returns the output dtype (``out_dtype`` resolved)."""
    _require_tensor("x", x)
    if x.dtype not in _INPUT_DTYPES:
        raise InvalidArgument(f"x must be a floating tensor (float32, float64, bfloat16, float16), got {x.dtype}")
    if x.dim() < 1:
        raise InvalidArgument(f"x must have shape [B, *S] with a batch dimension, got a 0-d tensor")
    batch = x.shape[0]
    _check_index_vector("keys", keys, batch, x.device)
    _check_index_vector("first_draw", first_draw, batch, x.device)
    if reps < 1:
        raise InvalidArgument(f"reps must be >= 1, got {reps}")
    if reps > 2**32:  # (else torch's allocation fails first, or its size overflows, unclearly)
        raise InvalidArgument(f"reps must be at most 2**32 (draw indices stay below 2^32), got {reps}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise InvalidArgument(f"sigma must be a finite number >= 0, got {sigma}")
    if not 0 <= seed < 2**63:
        raise InvalidArgument(f"seed must be in [0, 2**63), got {seed}")
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in NOISE_DTYPES else torch.float32
    if out_dtype not in NOISE_DTYPES:
        raise InvalidArgument(f"out_dtype must be one of float32, bfloat16, float16 or None, got {out_dtype}")
    if channels_last and x.dim() != 4:
        raise InvalidArgument(f"channels_last output needs a 4-d input [B, C, H, W], got shape {_shape(x)}")
    return out_dtype


def _check_vote_args(logits, rows, counts, agg, weights):
    _require_tensor("logits", logits)
    if logits.dim() != 3:
        raise InvalidArgument(f"logits must have shape [M, R, K] (members, draws, classes), got {_shape(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise InvalidArgument(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    members, draws, classes = logits.shape
    if members < 1 or classes < 1:
        raise InvalidArgument(f"logits must have at least one member and one class, got shape {_shape(logits)}")
    device = logits.device
    _check_index_vector("rows", rows, draws, device)
    _require_tensor("counts", counts)
    if counts.dtype != torch.int64:
        raise InvalidArgument(f"counts must be int64, got {counts.dtype}")
    if counts.dim() != 2 or counts.shape[1] != classes:
        raise InvalidArgument(f"counts must have shape [B, {classes}] (K from logits), got {_shape(counts)}")
    if not counts.is_contiguous():
        raise InvalidArgument("counts must be contiguous (it is updated in place), got a non-contiguous tensor")
    if counts.device != device:
        raise InvalidArgument(f"counts must be on the same device as logits ({device}), got {counts.device}")
    if agg not in AGGREGATIONS:
        raise InvalidArgument(f"agg must be one of {', '.join(AGGREGATIONS)}, got {agg!r}")
    _require_tensor("weights", weights)
    if weights.dtype != torch.float32 or weights.dim() != 1 or weights.shape[0] != members:
        raise InvalidArgument(f"weights must be float32 with shape [{members}], got {weights.dtype} {_shape(weights)}")
    if weights.device != device:
        raise InvalidArgument(f"weights must be on the same device as logits ({device}), got {weights.device}")


def _check_finite_weights(weights: Tensor):
    """Reads the values: not on CUDA in the hot path (it would synchronize with the host)."""
    values = weights.tolist()
    if not math.isfinite(sum(values)):  # float64 sums of float32 values: inf/NaN only from inf/NaN
        raise InvalidArgument(f"weights must be finite, got {values}")


def _check_rows_in_range(rows: Tensor, batch: int):
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise InvalidArgument(
            f"rows must index counts' first dimension, in [0, {batch}), got values in "
            f"[{int(rows.min())}, {int(rows.max())}]"
        )


def _check_draws_in_range(first_draw: Tensor, reps: int):
    """Draw indices ``first_draw[b] + r`` must lie in [0, 2^32) (they are 32-bit counters: a
    larger one would wrap onto another draw's noise). Reads the values: not on CUDA."""
    if first_draw.numel():
        low, high = (int(v) for v in torch.aminmax(first_draw))
        if low < 0 or high + reps > 2**32:
            raise InvalidArgument(f"draw indices must lie in [0, 2^32): first_draw holds values in "
                                  f"[{low}, {high}] and reps is {reps}")


def _empty_output(x: Tensor, reps: int, out_dtype, channels_last: bool) -> Tensor:
    shape = (x.shape[0] * reps, *x.shape[1:])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=out_dtype, device=x.device, memory_format=memory_format)


# ----------------------------------------------------------------------------------------
# Pure-torch reference: Philox4x32-10 + Box-Muller, bit-identical to csrc/philox.h
# ----------------------------------------------------------------------------------------
# Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11; Random123)
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF

# fp32 constants, written as hex so that Python and C++ hold exactly the same values
_SQRT2 = float.fromhex("0x1.6a09e6p+0")
_LN2 = float.fromhex("0x1.62e430p-1")
_ATANH = [float.fromhex(h) for h in ("0x1.555556p-2", "0x1.99999ap-3", "0x1.24924ap-3", "0x1.c71c72p-4")]  # 1/3 1/5 1/7 1/9
_SIN = [float.fromhex(h) for h in ("-0x1.555556p-3", "0x1.111112p-7", "-0x1.a01a02p-13", "0x1.71de3ap-19")]
_COS = [float.fromhex(h) for h in ("-0x1p-1", "0x1.555556p-5", "-0x1.6c16c2p-10", "0x1.a01a02p-16", "-0x1.27e4fcp-22")]
_HALF_PI_STEP = float.fromhex("0x1.921fb6p-22")  # (pi/2) / 2^22: one step of the angle grid


def _mulhilo32(m: int, c: Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product ``m * c``; c int64 in [0, 2^32).

    int64 cannot hold the full product, so c is split into 16-bit halves (each partial
    product stays below 2^48).
    """
    p_lo = m * (c & 0xFFFF)
    p_hi = m * (c >> 16)
    low = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low >> 32), low & _MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 words (broadcasting); returns 4 words."""
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _horner(t: Tensor, coeffs) -> Tensor:
    """coeffs[0] + t*(coeffs[1] + t*(...)) with one rounding per operation, as in philox.h."""
    acc = t * coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc + c
        acc = acc * t
    return acc  # = t * (c0 + t * (c1 + ...)), the constant term is added by the caller


def _log_u24(k: Tensor) -> Tensor:
    """ln(k * 2^-24) in fp32 for int64 k in [1, 2^24] (a uniform in (0, 1])."""
    bits = k.to(torch.float32).view(torch.int32).to(torch.int64)  # k is exact in fp32
    e = (bits >> 23) - (127 + 24)
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)  # [1, 2)
    big = m > _SQRT2  # centre the mantissa on 1 so that the series below converges fast
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int64)
    s = (m - 1.0) / (m + 1.0)  # ln m = 2 atanh(s), |s| <= 0.172
    s2 = s * s
    atanh = _horner(s2, _ATANH) * s + s
    return e.to(torch.float32) * _LN2 + 2.0 * atanh


def _sin_cos_quadrant(m: Tensor):
    """sin and cos of the angle 2*pi * m / 2^24 in fp32, m int64 in [0, 2^24)."""
    quadrant = m >> 22
    rem = m & 0x3FFFFF
    upper = rem >= (1 << 21)  # upper half of the quadrant: use the complementary angle
    steps = torch.where(upper, (1 << 22) - rem, rem)
    a = steps.to(torch.float32) * _HALF_PI_STEP  # in [0, pi/4]
    a2 = a * a
    sin_a = _horner(a2, _SIN) * a + a
    cos_a = _horner(a2, _COS) + 1.0
    sin_phi = torch.where(upper, cos_a, sin_a)
    cos_phi = torch.where(upper, sin_a, cos_a)
    cos_t = torch.where(quadrant == 0, cos_phi, torch.where(quadrant == 1, -sin_phi,
                        torch.where(quadrant == 2, -cos_phi, sin_phi)))
    sin_t = torch.where(quadrant == 0, sin_phi, torch.where(quadrant == 1, cos_phi,
                        torch.where(quadrant == 2, -sin_phi, -cos_phi)))
    return sin_t, cos_t


def _box_muller(a: Tensor, b: Tensor):
    """Two standard normals from two uint32 words (int64 tensors), as philox.h's box_muller."""
    # torch.sqrt on fp32 CPU tensors is not correctly rounded (about 0.6 % of values are one ulp
    # off); sqrt in float64 rounded to fp32 is (53 >= 2 * 24 + 2 bits), as the kernels' sqrtf.
    radius = torch.sqrt((_log_u24((a >> 8) + 1) * -2.0).to(torch.float64)).to(torch.float32)
    sin_t, cos_t = _sin_cos_quadrant(b >> 8)
    return radius * cos_t, radius * sin_t


def reference_normals(keys: Tensor, draws: Tensor, num_elements: int, seed: int) -> Tensor:
    """Standard normal noise ``[N, num_elements]`` fp32 for the draws ``draws[N]`` of inputs ``keys[N]``.

    Pure torch; element ``e`` of row ``n`` is noise(seed, keys[n], draws[n], e).
    """
    quads = (num_elements + 3) // 4
    device = keys.device
    q = torch.arange(quads, dtype=torch.int64, device=device)[None, :]
    d = (draws & _MASK32)[:, None]
    k_lo, k_hi = (keys & _MASK32)[:, None], ((keys >> 32) & _MASK32)[:, None]  # as the kernels' uint64 key
    w0, w1, w2, w3 = philox4x32_10(q, d, k_lo, k_hi, seed & _MASK32, seed >> 32)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(keys.shape[0], quads * 4)
    return z[:, :num_elements]


def reference_noisy_draws(x: Tensor, keys: Tensor, first_draw: Tensor, reps: int, sigma: float, seed: int,
                          out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """Pure-torch :func:`noisy_draws`: same arguments, bit-identical result, any device."""
    out_dtype = _check_noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    _check_draws_in_range(first_draw, reps)
    batch, elem_shape = x.shape[0], x.shape[1:]
    num_elements = math.prod(elem_shape)
    r = torch.arange(reps, dtype=torch.int64, device=x.device)
    draws = (first_draw[:, None] + r[None, :]).reshape(-1)  # row b*reps + r
    row_keys = keys.repeat_interleave(reps)
    z = reference_normals(row_keys, draws, num_elements, seed)
    x_rows = x.to(torch.float32).reshape(batch, 1, num_elements).expand(batch, reps, num_elements)
    sigma32 = torch.tensor(sigma, dtype=torch.float32, device=x.device)
    out = (x_rows.reshape(batch * reps, num_elements) + sigma32 * z).to(out_dtype)
    nan_bits = {torch.float32: (torch.int32, 0x7FC00000), torch.bfloat16: (torch.int16, 0x7FC0), torch.float16: (torch.int16, 0x7E00)}[out_dtype]
    out.view(nan_bits[0]).masked_fill_(torch.isnan(out), nan_bits[1])  # the kernels' one NaN (csrc/kernels.h), on any device
    # the kernels' output layout exactly (channels-last strides are ambiguous when C == 1)
    return _empty_output(x, reps, out_dtype, channels_last).copy_(out.reshape(batch * reps, *elem_shape))


def reference_labels(logits: Tensor, agg: str, weights: Tensor) -> Tensor:
    """Each draw's label by `vote_`'s rules, in pure torch and float64: ``[R]`` int64, -1 for
    a draw with a non-finite logit (it casts no vote). ``logits`` ``[M, R, K]``, ``weights``
    ``[M]``; the arguments are not checked (`reference_vote_` and `ensemble.aggregate` do)."""
    members, draws, classes = logits.shape
    device = logits.device
    z = logits.to(torch.float64)
    finite = torch.isfinite(z).all(dim=2).all(dim=0)  # [R]
    z = torch.where(finite[None, :, None], z, torch.zeros((), dtype=z.dtype, device=device))
    w = weights.to(device=device, dtype=torch.float64)[:, None, None]
    if agg == "we":
        score = (w * torch.softmax(z, dim=2)).sum(0)
    elif agg == "logit":
        score = (w * z).sum(0)
    elif agg == "mme":
        probs = torch.softmax(z, dim=2)
        top = probs.topk(min(2, classes), dim=2).values
        margin = top[..., 0] - top[..., 1] if classes > 1 else top[..., 0]  # [M, R]
        decider = margin.argmax(dim=0)  # first (smallest) member index on ties
        score = z[decider, torch.arange(draws, device=device)]  # the decider's logits [R, K]
    else:  # mv: classes no member voted for stay at -1 (they never win, even at zero weights)
        member_labels = z.argmax(dim=2)  # [M, R]
        score = torch.full((draws, classes), -1.0, dtype=z.dtype, device=device)
        every = torch.arange(draws, device=device)
        for m in range(members):  # member order, as the kernels add
            score[every, member_labels[m]] = score[every, member_labels[m]].clamp_min(0.0) + w[m, 0, 0]
    labels = score.argmax(dim=1)  # torch.argmax returns the first maximum: ties -> smaller class
    return torch.where(finite, labels, torch.full_like(labels, -1))


def reference_vote_(logits: Tensor, rows: Tensor, counts: Tensor, agg: str, weights: Tensor) -> None:
    """Pure-torch :func:`vote_` (aggregation in float64; same tie-breaking), any device."""
    _check_vote_args(logits, rows, counts, agg, weights)
    _check_rows_in_range(rows, counts.shape[0])
    _check_finite_weights(weights)
    if logits.shape[1] == 0:
        return
    labels = reference_labels(logits, agg, weights)
    voted = labels >= 0
    ones = torch.ones(int(voted.sum()), dtype=counts.dtype, device=counts.device)
    counts.index_put_((rows[voted], labels[voted]), ones, accumulate=True)


# ----------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("drt_fast::noisy_draws", mutates_args=())
def noisy_draws(x: Tensor, keys: Tensor, first_draw: Tensor, reps: int, sigma: float, seed: int,
                out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """Noisy copies of each input: ``[B*reps, *S]``, row ``b*reps + r`` = ``x[b] + sigma * noise``.

    Args:
        x: ``[B, *S]`` inputs (pixel space), any float dtype; the sum is computed in fp32.
        keys: ``[B]`` int64 input keys (the dataset index of each input), in [0, 2^63).
        first_draw: ``[B]`` int64 index of the first draw of each input (draws below 2^32).
        reps: draws per input. sigma: noise level. seed: in [0, 2^63).
        out_dtype: float32, bfloat16 or float16 (``None``: x's dtype, or float32 for float64).
        channels_last: write a channels-last ``[B*reps, C, H, W]`` output (4-d x only).
    """
    return noisy_draws_eager(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)


def noisy_draws_eager(x: Tensor, keys: Tensor, first_draw: Tensor, reps: int, sigma: float, seed: int,
                      out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """`noisy_draws` without the dispatcher: the same checks and kernels, no autograd, not
    traceable. For eager callers in a hot loop (the engine's steps), where the custom op's
    overhead -- 10-45 us a call, measured on the CPU -- is a few % of a small model's batch."""
    out_dtype = _check_noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    if x.is_cuda and not kernels_run_on(x.device):
        _warn_cuda_fallback()
        return reference_noisy_draws(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    out = _empty_output(x, reps, out_dtype, channels_last)
    # keep every tensor whose pointer crosses into C++ referenced until the call returns
    x32 = x.to(torch.float32).contiguous()
    keys_c, first_c = keys.contiguous(), first_draw.contiguous()
    batch = x.shape[0]
    num_elements = math.prod(x.shape[1:])
    channels, spatial = (x.shape[1], x.shape[2] * x.shape[3]) if channels_last else (1, num_elements)
    args = (x32.data_ptr(), keys_c.data_ptr(), first_c.data_ptr(), out.data_ptr(), batch, num_elements, reps,
            float(sigma), seed, _DTYPE_CODE[out_dtype], bool(channels_last), channels, spatial)
    if x.is_cuda:
        with torch.cuda.device(x.device):
            _C_cuda.noisy_draws(*args, x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
    elif x.device.type == "cpu":
        _check_draws_in_range(first_c, reps)
        _require_cpu_kernels().noisy_draws(*args)
    else:
        raise InvalidArgument(f"noisy_draws runs on cpu or cuda tensors, got device {x.device}")
    return out


@noisy_draws.register_fake
def _(x, keys, first_draw, reps, sigma, seed, out_dtype=None, channels_last=False):
    out_dtype = _check_noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    return _empty_output(x, reps, out_dtype, channels_last)


def _noisy_draws_setup_context(ctx, inputs, output):
    x, _, _, reps, *_ = inputs
    ctx.reps, ctx.x_shape, ctx.x_dtype = reps, x.shape, x.dtype


def _noisy_draws_backward(ctx, grad):
    # out[b*reps + r] = x[b] + noise, so dx[b] is the sum of the output gradient over r
    grad_x = grad.reshape(ctx.x_shape[0], ctx.reps, *ctx.x_shape[1:]).sum(dim=1, dtype=torch.float32)
    return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None


noisy_draws.register_autograd(_noisy_draws_backward, setup_context=_noisy_draws_setup_context)


@torch.library.custom_op("drt_fast::vote_", mutates_args=("counts",))
def vote_(logits: Tensor, rows: Tensor, counts: Tensor, agg: str, weights: Tensor) -> None:
    """Per draw, aggregate the members and add one vote for the winning class, in place.

    Args:
        logits: ``[M, R, K]`` float32/bfloat16/float16, M members' logits on R noise draws.
        rows: ``[R]`` int64, the row of ``counts`` each draw votes in (its input).
        counts: ``[B, K]`` int64, contiguous, updated in place.
        agg: ``"we"`` weighted softmax average, ``"logit"`` weighted logit average,
            ``"mme"`` the member with the largest softmax top-1 minus top-2 margin decides,
            ``"mv"`` weighted majority vote of member argmaxes.
        weights: ``[M]`` float32 member weights.

    Ties go to the smaller class index (and, in ``mme``, the smaller member index). A draw with
    any non-finite logit casts no vote. On CUDA, ``rows`` is not range-checked and ``weights``
    not checked for NaN/inf (either would synchronize with the host): a draw whose row is out
    of range casts no vote there.
    """
    vote_eager_(logits, rows, counts, agg, weights)


def vote_eager_(logits: Tensor, rows: Tensor, counts: Tensor, agg: str, weights: Tensor) -> None:
    """`vote_` without the dispatcher (see `noisy_draws_eager`)."""
    _check_vote_args(logits, rows, counts, agg, weights)
    if logits.is_cuda and not kernels_run_on(logits.device):
        _warn_cuda_fallback()
        reference_vote_(logits, rows, counts, agg, weights)
        return
    members, draws, classes = logits.shape
    if draws == 0:
        return
    logits_c, rows_c, weights_c = logits.contiguous(), rows.contiguous(), weights.contiguous()
    args = (logits_c.data_ptr(), _DTYPE_CODE[logits.dtype], members, draws, classes, rows_c.data_ptr(),
            counts.data_ptr(), counts.shape[0], _AGG_CODE[agg], weights_c.data_ptr())
    if logits.is_cuda:
        with torch.cuda.device(logits.device):
            _C_cuda.vote(*args, logits.device.index, torch.cuda.current_stream(logits.device).cuda_stream)
    elif logits.device.type == "cpu":
        _check_finite_weights(weights)
        bad_row = _require_cpu_kernels().vote(*args)
        if bad_row >= 0:  # checked before any count changed
            _check_rows_in_range(rows, counts.shape[0])
    else:
        raise InvalidArgument(f"vote_ runs on cpu or cuda tensors, got device {logits.device}")


@vote_.register_fake
def _(logits, rows, counts, agg, weights):
    _check_vote_args(logits, rows, counts, agg, weights)


# ----------------------------------------------------------------------------------------
# bias_act_: a dense layer's epilogue (drt_fast/fuse.py DenseMember)
# ----------------------------------------------------------------------------------------
def _check_bias_act_args(h, bias):
    _require_tensor("h", h)
    _require_tensor("bias", bias)
    if h.dim() != 2:
        raise InvalidArgument(f"h must have shape [rows, cols], got {_shape(h)}")
    if not h.is_floating_point() or bias.dtype != h.dtype:
        raise InvalidArgument(f"h and bias must be one floating dtype, got {h.dtype} and {bias.dtype}")
    if bias.dim() != 1 or bias.shape[0] != h.shape[1]:
        raise InvalidArgument(f"bias must have shape [{h.shape[1]}], got {_shape(bias)}")
    if bias.device != h.device:
        raise InvalidArgument(f"bias must be on h's device ({h.device}), got {bias.device}")


def reference_bias_act_(h: Tensor, bias: Tensor, relu: bool) -> None:
    """Pure-torch ``bias_act_``."""
    _check_bias_act_args(h, bias)
    h.add_(bias)
    if relu:
        h.relu_()


def bias_act_cpu_(h: Tensor, bias: Tensor, relu: bool) -> bool:
    """``bias_act_``'s CPU kernel called directly, without the dispatcher (a dense member
    calls it once per layer and batch, where the custom op's overhead, 10-20 us a call,
    would cost as much as the kernel saves). Returns False, having done nothing, where the
    kernel does not apply (not float32 on the CPU, not contiguous): the caller falls back."""
    if not (h.dtype == torch.float32 and h.device.type == "cpu" and h.is_contiguous()
            and bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.is_contiguous()
            and h.dim() == 2 and bias.dim() == 1 and bias.shape[0] == h.shape[1]) or _C is None:
        return False
    _C.bias_act(h.data_ptr(), bias.data_ptr(), h.shape[0], h.shape[1], bool(relu))
    return True


@torch.library.custom_op("drt_fast::bias_act_", mutates_args=("h",))
def bias_act_(h: Tensor, bias: Tensor, relu: bool) -> None:
    """In place ``h = act(h + bias)``: ``h`` ``[rows, cols]``, ``bias`` ``[cols]`` of h's
    dtype; act is ReLU when ``relu`` (NaN stays NaN), else the identity. One pass over h on
    the CPU for float32 (the C++ kernel); other dtypes and devices run the torch reference."""
    _check_bias_act_args(h, bias)
    if not bias_act_cpu_(h, bias, relu):
        reference_bias_act_(h, bias, relu)


@bias_act_.register_fake
def _(h, bias, relu):
    _check_bias_act_args(h, bias)


# ----------------------------------------------------------------------------------------
# dense_chain: a dense member's whole forward (drt_fast/fuse.py DenseMember, _chain_plan)
# ----------------------------------------------------------------------------------------
def _check_dense_chain_args(x, meta, params, out_cols):
    _require_tensor("x", x)
    _require_tensor("meta", meta)
    _require_tensor("params", params)
    if x.dim() != 2 or x.dtype != torch.float32:
        raise InvalidArgument(f"x must be float32 [rows, cols], got {x.dtype} {_shape(x)}")
    if meta.dim() != 1 or meta.dtype != torch.int64 or meta.numel() < 4:
        raise InvalidArgument(f"meta must be an int64 plan (fuse._chain_plan), got {meta.dtype} {_shape(meta)}")
    if params.dim() != 1 or params.dtype != torch.float32:
        raise InvalidArgument(f"params must be float32 [n], got {params.dtype} {_shape(params)}")
    if meta.device.type != "cpu":
        raise InvalidArgument(f"meta must be on the CPU, got {meta.device}")
    if params.device != x.device:
        raise InvalidArgument(f"params must be on x's device ({x.device}), got {params.device}")
    if not isinstance(out_cols, int) or out_cols < 1:
        raise InvalidArgument(f"out_cols must be a positive int, got {out_cols!r}")


def _check_dense_chain_plan(x, meta, out_cols):
    """The plan's columns against x's and out_cols (reads meta: not for fake tensors)."""
    in_cols, plan_out = int(meta[1]), int(meta[2])
    if x.shape[1] != in_cols or out_cols != plan_out:
        raise InvalidArgument(f"the plan maps {in_cols} columns to {plan_out}; got x with "
                           f"{x.shape[1]} columns and out_cols={out_cols}")


def reference_dense_chain(x: Tensor, meta: Tensor, params: Tensor, out_cols: int) -> Tensor:
    """Pure-torch ``dense_chain``: the plan's blocks as GEMMs (any device)."""
    _check_dense_chain_args(x, meta, params, out_cols)
    _check_dense_chain_plan(x, meta, out_cols)
    m, at = meta.tolist(), 4
    h = x
    for _ in range(m[0]):
        width, relu, bias_offset, blocks = m[at:at + 4]
        at += 4
        out = params[bias_offset:bias_offset + width].expand(h.shape[0], width).clone()
        for _ in range(blocks):
            lo, hi, c0, block_width, offset = m[at:at + 5]
            at += 5
            weight = params[offset:offset + (hi - lo) * block_width].view(hi - lo, block_width)
            out[:, c0:c0 + block_width] += h[:, lo:hi] @ weight
        h = out.relu_() if relu else out
    return h[:, :out_cols].contiguous()


def dense_chain_cpu(x: Tensor, meta: Tensor, params: Tensor, out_cols: int) -> Optional[Tensor]:
    """``dense_chain``'s CPU kernel called directly, without the dispatcher (a dense member
    calls it once per batch). Returns None, having done nothing, where the kernel does not
    apply (not float32 on the CPU): the caller falls back. A plan that does not fit x or
    out_cols raises `InvalidArgument` (the kernel checks every size and offset of the plan)."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and params.dtype == torch.float32 and params.device.type == "cpu" and params.is_contiguous()
            and meta.dtype == torch.int64 and meta.device.type == "cpu" and meta.is_contiguous()) or _C is None:
        return None
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    out = torch.empty(x.shape[0], out_cols, dtype=torch.float32)
    try:
        _C.dense_chain(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), out_cols,
                       meta.data_ptr(), meta.numel(), params.data_ptr(), params.numel())
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    return out


@torch.library.custom_op("drt_fast::dense_chain", mutates_args=())
def dense_chain(x: Tensor, meta: Tensor, params: Tensor, out_cols: int) -> Tensor:
    """A dense member's forward by the plan ``meta`` / ``params`` (`drt_fast.fuse`
    ``_chain_plan``): matrices in blocks, each layer's bias and optional ReLU. ``x``
    ``[rows, in_cols]`` float32 → ``[rows, out_cols]``. The C++ kernel on the CPU (each row
    summed in a fixed order: results do not depend on the batch), the torch reference
    elsewhere."""
    _check_dense_chain_args(x, meta, params, out_cols)
    _check_dense_chain_plan(x, meta, out_cols)
    out = dense_chain_cpu(x, meta, params, out_cols)
    return reference_dense_chain(x, meta, params, out_cols) if out is None else out


@dense_chain.register_fake
def _(x, meta, params, out_cols):
    _check_dense_chain_args(x, meta, params, out_cols)
    return x.new_empty(x.shape[0], out_cols)


# ----------------------------------------------------------------------------------------
# cifar_resnet: a whole CIFAR ResNet forward in one CUDA kernel (csrc/cuda/resnet.cu;
# drt_fast/fuse.py ResNetKernelMember builds its arguments)
# ----------------------------------------------------------------------------------------
def resnet_kernel_convs(blocks: int) -> list:
    """``(cin, cout, taps, stride, kind)`` of every convolution of a CIFAR ResNet with
    ``blocks`` BasicBlocks a stage, in the kernel's order (its weights and biases follow it):
    the stem (3 input channels padded to 16), then per block conv1 (``"relu"``), at a stage's
    entry the 1x1 downsample (``"linear"``), and conv2 (``"residual"``: + the block's input,
    then ReLU)."""
    convs = [(16, 16, 9, 1, "relu")]
    for s in range(3):
        ch = 16 << s
        for b in range(blocks):
            if s and b == 0:
                convs += [(ch // 2, ch, 9, 2, "relu"), (ch // 2, ch, 1, 2, "linear")]
            else:
                convs.append((ch, ch, 9, 1, "relu"))
            convs.append((ch, ch, 9, 1, "residual"))
    return convs


RESNET_KERNEL_VARIANTS = ("wmma", "mma")   # csrc/cuda/resnet.cu: variant 0 and 1


def _mma_tile_order() -> Tensor:
    """The mma.sync variant's packed 16x16 tile: element ``lane*8 + half*4 + reg*2 + j`` is
    the row-major tile's ``[k = 2t + 8 reg + j][n = 8 half + g]`` (g = lane // 4, t = lane % 4:
    PTX's B fragment of m16n8k16, so that each lane loads its 16 bytes at once)."""
    lane, half, reg, j = torch.meshgrid(*(torch.arange(n) for n in (32, 2, 2, 2)), indexing="ij")
    return ((2 * (lane % 4) + 8 * reg + j) * 16 + 8 * half + lane // 4).reshape(-1)


def pack_resnet_kernel_weight(w: Tensor, variant: int = 0) -> Tensor:
    """A convolution's weight ``[cout, cin, k, k]`` (cin a multiple of 16) as the kernel's
    16x16 tiles, flat: tap, then input chunk, then output chunk; each tile is
    [input channel][output channel], row-major (variant 0, wmma) or in the mma.sync
    fragment order (variant 1, `_mma_tile_order`)."""
    cout, cin, kh, kw = w.shape
    tiles = (w.permute(2, 3, 1, 0).reshape(kh * kw, cin // 16, 16, cout // 16, 16)
             .permute(0, 1, 3, 2, 4).reshape(-1, 256))
    if variant == 1:
        tiles = tiles[:, _mma_tile_order()]
    return tiles.reshape(-1)


def unpack_resnet_kernel_weight(tiles: Tensor, cin: int, cout: int, taps: int, variant: int = 0) -> Tensor:
    """Inverse of `pack_resnet_kernel_weight`."""
    k = 3 if taps == 9 else 1
    tiles = tiles.view(-1, 256)
    if variant == 1:
        tiles = tiles[:, torch.argsort(_mma_tile_order())]
    return (tiles.reshape(taps, cin // 16, cout // 16, 16, 16).permute(0, 1, 3, 2, 4)
            .reshape(taps, cin, cout).permute(2, 1, 0).reshape(cout, cin, k, k))


def _check_cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant):
    for name, t in (("x", x), ("weights", weights), ("biases", biases), ("norm", norm), ("fc_w", fc_w),
                    ("fc_b", fc_b)):
        _require_tensor(name, t)
        if t.device != x.device:
            raise InvalidArgument(f"{name} must be on x's device ({x.device}), got {t.device}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32) or x.dtype not in LOGIT_DTYPES:
        raise InvalidArgument(f"x must be float32/bfloat16/float16 [B, 3, 32, 32], got {x.dtype} {_shape(x)}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= 1000:
        raise InvalidArgument(f"blocks must be an int in [1, 1000], got {blocks!r}")
    if variant not in (0, 1) or isinstance(variant, bool):
        raise InvalidArgument(f"variant must be 0 (wmma) or 1 (mma.sync), got {variant!r}")
    convs = resnet_kernel_convs(blocks)
    tiles = sum(taps * cin * cout for cin, cout, taps, _, _ in convs)
    if weights.dtype != torch.bfloat16 or weights.dim() != 1 or weights.numel() != tiles:
        raise InvalidArgument(f"weights must be bfloat16 [{tiles}] for {blocks} blocks a stage, "
                           f"got {weights.dtype} {_shape(weights)}")
    n_biases = sum(cout for _, cout, _, _, _ in convs)
    if biases.dtype != torch.float32 or biases.dim() != 1 or biases.numel() != n_biases:
        raise InvalidArgument(f"biases must be float32 [{n_biases}], got {biases.dtype} {_shape(biases)}")
    if norm.dtype != torch.float32 or _shape(norm) != [6]:
        raise InvalidArgument(f"norm must be float32 [6] (3 means, 3 sds), got {norm.dtype} {_shape(norm)}")
    if fc_w.dtype != torch.float32 or fc_w.dim() != 2 or fc_w.shape[1] != 64 or fc_w.shape[0] < 1:
        raise InvalidArgument(f"fc_w must be float32 [classes, 64], got {fc_w.dtype} {_shape(fc_w)}")
    if fc_b.dtype != torch.float32 or _shape(fc_b) != [fc_w.shape[0]]:
        raise InvalidArgument(f"fc_b must be float32 [{fc_w.shape[0]}], got {fc_b.dtype} {_shape(fc_b)}")


def reference_cifar_resnet(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor,
                           fc_b: Tensor, blocks: int, variant: int = 0) -> Tensor:
    """Pure-torch `cifar_resnet`, with the kernel's roundings: bf16 weights and activations
    (each convolution's output rounded once, after bias, residual and ReLU), fp32 sums."""
    import torch.nn.functional as F

    _check_cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)

    def bf16(t):
        return t.to(torch.bfloat16).float()

    x = bf16((x.float() - norm[:3].view(1, 3, 1, 1)) / norm[3:].view(1, 3, 1, 1))
    x = F.pad(x, (0, 0, 0, 0, 0, 13))          # 3 channels to 16 (zeros), as the kernel does
    wat = bat = 0
    h = residual = None
    for i, (cin, cout, taps, stride, kind) in enumerate(resnet_kernel_convs(blocks)):
        w = unpack_resnet_kernel_weight(weights[wat:wat + taps * cin * cout], cin, cout, taps, variant).float()
        b = biases[bat:bat + cout]
        wat, bat = wat + taps * cin * cout, bat + cout
        padding = 1 if taps == 9 else 0
        if i == 0:                                                # the stem
            x = bf16(F.relu(F.conv2d(x, w, b, 1, padding)))
        elif kind == "relu":                                      # conv1
            h = bf16(F.relu(F.conv2d(x, w, b, stride, padding)))
        elif kind == "linear":                                    # the downsample
            residual = bf16(F.conv2d(x, w, b, stride, padding))
        else:                                                     # conv2 + residual
            x = bf16(F.relu(F.conv2d(h, w, b, 1, padding) + (x if residual is None else residual)))
            residual = None
    return x.mean(dim=(2, 3)) @ fc_w.t() + fc_b


def _cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, stop_after=0,
                       snapshot=None) -> tuple:
    """The binding's arguments (resnet.cu CifarResNetArgs); the tensors must stay alive.
    ``stop_after``/``snapshot``: the kernel's debugging hook (cuda_kernels.h)."""
    return (x.data_ptr(), _DTYPE_CODE[x.dtype], x.shape[0], *x.stride(), weights.data_ptr(), weights.numel(),
            biases.data_ptr(), biases.numel(), norm.data_ptr(), fc_w.data_ptr(), fc_b.data_ptr(),
            fc_w.shape[0], blocks, out.data_ptr(), variant, stop_after,
            0 if snapshot is None else snapshot.data_ptr())


def _launch_cifar_resnet(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, stop_after=0, snapshot=None,
                         on_host=False) -> None:
    """The CUDA kernel on x's GPU, or with ``on_host`` its CTA program on the host (CPU
    tensors; `_C_cuda.cifar_resnet_on_host`), writing ``out`` (and ``snapshot``)."""
    # contiguous, the weight tiles 32-byte and the biases 8-byte aligned (vector loads)
    params = [t.contiguous() for t in (weights, biases, norm, fc_w, fc_b)]
    for i, alignment in ((0, 32), (1, 8)):
        if params[i].data_ptr() % alignment:
            params[i] = params[i].clone()
    args = _cifar_resnet_args(x, *params, blocks, variant, out, stop_after, snapshot)
    try:
        if on_host:
            _C_cuda.cifar_resnet_on_host(*args, 0)
        else:
            with torch.cuda.device(x.device):
                _C_cuda.cifar_resnet(*args, x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def cifar_resnet_eager(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor, fc_b: Tensor,
                       blocks: int, variant: int = 0) -> Tensor:
    """`cifar_resnet` without the dispatcher (see `noisy_draws_eager`)."""
    _check_cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    if not (x.is_cuda and kernels_run_on(x.device)):
        return reference_cifar_resnet(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    out = torch.empty(x.shape[0], fc_w.shape[0], dtype=torch.float32, device=x.device)
    _launch_cifar_resnet(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out)
    return out


@torch.library.custom_op("drt_fast::cifar_resnet", mutates_args=())
def cifar_resnet(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor, fc_b: Tensor,
                 blocks: int, variant: int = 0) -> Tensor:
    """A CIFAR ResNet (depth 6n+2, n = ``blocks``) forward: ``x`` ``[B, 3, 32, 32]`` pixels
    (any strides) -> float32 logits ``[B, classes]``. ``norm``: the input layer's 3 means
    and 3 sds; ``weights``: every convolution's folded weight as bf16 tiles
    (`pack_resnet_kernel_weight`, in `resnet_kernel_convs` order); ``biases``: their folded
    BatchNorm biases; ``fc_w`` ``[classes, 64]``, ``fc_b``: the linear layer; ``variant``:
    the kernel's tensor-core path, 0 (wmma) or 1 (mma.sync), which fixes the tiles' order.

    On CUDA (compute capability 8.0 or newer), one kernel with a CTA per draw keeps the draw's
    activations in shared memory through the whole network (csrc/cuda/resnet.cu); elsewhere,
    `reference_cifar_resnet` (the same roundings in torch)."""
    return cifar_resnet_eager(x, weights, biases, norm, fc_w, fc_b, blocks, variant)


@cifar_resnet.register_fake
def _(x, weights, biases, norm, fc_w, fc_b, blocks, variant=0):
    _check_cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    return x.new_empty(x.shape[0], fc_w.shape[0], dtype=torch.float32)


# The CIFAR ResNet kernel's debugging hook (cuda_kernels.h stop_after / snapshot): each
# draw's shared memory after a number of phases, and how to read activation maps out of it.
RESNET_KERNEL_REGIONS = (0, 36_992, 57_728)  # byte offsets of resnet.cu's regions 0, 1, 2


def cifar_resnet_snapshot(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor,
                          fc_b: Tensor, blocks: int, variant: int, stop_after: int,
                          on_host: bool = False) -> Tensor:
    """Each draw's kernel shared memory after ``stop_after`` phases (1: the stem; then one
    per conv1 -- a stage's entry: conv1 and the downsample -- and one per conv2), uint8
    ``[B, bytes]``: on x's GPU, or with ``on_host`` the kernel's program on the host (CPU
    tensors). For debugging the kernel; read maps with `resnet_kernel_map`."""
    _check_cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)
    if _C_cuda is None:
        raise DrtFastError("drt_fast was built without its CUDA kernels")
    size = _C_cuda.cifar_resnet_sizes(blocks, variant)[2]
    snapshot = torch.zeros(x.shape[0], size, dtype=torch.uint8, device=x.device)
    out = torch.empty(x.shape[0], fc_w.shape[0], dtype=torch.float32, device=x.device)
    _launch_cifar_resnet(x, weights, biases, norm, fc_w, fc_b, blocks, variant, out, stop_after, snapshot,
                         on_host)
    return snapshot


def resnet_kernel_map(snapshot: Tensor, variant: int, region: int, grid: int, channels: int) -> Tensor:
    """The activation map of ``channels`` channels on grid ``grid`` (0, 1, 2: 32, 16, 8
    pixels a side) stored in ``region`` of `cifar_resnet_snapshot` rows: float ``[B, C, H, W]``
    (the interior pixels; planes of 16 channels on the zero-padded grid, resnet.cu `at`)."""
    side = 32 >> grid
    pitch = side + 2
    positions = 110 if grid == 2 else pitch * pitch
    start = RESNET_KERNEL_REGIONS[region]
    raw = snapshot[:, start:start + channels // 16 * positions * 32].contiguous().view(torch.bfloat16).float()
    planes = raw.view(-1, channels // 16, positions, 16)
    if variant == 1:                      # halves of 8 channels swapped at every other 4 positions
        swapped = ((torch.arange(positions, device=raw.device) >> 2) & 1).bool()
        halves = planes.view(*planes.shape[:3], 2, 8)
        halves = torch.where(swapped[None, None, :, None, None], halves.flip(3), halves)
        planes = halves.reshape(planes.shape)
    rows = torch.arange(1, side + 1, device=raw.device)
    index = (rows[:, None] * pitch + rows[None, :]).reshape(-1)
    interior = planes[:, :, index, :]     # [B, planes, H*W, 16]
    return interior.permute(0, 1, 3, 2).reshape(-1, channels, side, side)
