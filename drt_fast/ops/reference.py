"""Pure-torch references of every op: what the kernels are tested against, and what runs
where they do not (the reference switch, `drt_fast.ops.use_reference`; CUDA tensors without
usable CUDA kernels).

Each reference takes its op's arguments, makes its op's checks, and computes its op's
result on any device: bit-identical for ``noisy_draws`` (Philox4x32-10 and Box-Muller in
IEEE basic operations only, as csrc/philox.h) and ``noisy_draws_discrete`` (integer
comparisons of the same counters), the same votes up to float rounding at
near-ties for ``vote_`` (aggregation in float64), the kernels' roundings for
``cifar_resnet``.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .cifar_resnet_layout import cifar_resnet_convs, unpack_cifar_resnet_weight

# ---- noise: Philox4x32-10 + Box-Muller, bit-identical to csrc/philox.h -----------------------
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

# The one NaN of each output dtype, as the kernels write it (csrc/kernels.h): torch's own
# conversions give other bits on a GPU (0x7FFF) than on the CPU (0x7FC0), and x86 keeps an
# input NaN's sign and payload. (integer view, bits)
_CANONICAL_NAN = {torch.float32: (torch.int32, 0x7FC00000), torch.bfloat16: (torch.int16, 0x7FC0),
                  torch.float16: (torch.int16, 0x7E00)}


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


def log_scaled(k: Tensor, shift) -> Tensor:
    """ln(k * 2^-shift) in fp32 for int64 k in [1, 2^24] and integer shift (an int or an int64
    tensor), as philox.h's log_scaled."""
    bits = k.to(torch.float32).view(torch.int32).to(torch.int64)  # k is exact in fp32
    e = (bits >> 23) - 127 - shift
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)  # [1, 2)
    big = m > _SQRT2  # centre the mantissa on 1 so that the series below converges fast
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int64)
    s = (m - 1.0) / (m + 1.0)  # ln m = 2 atanh(s), |s| <= 0.172
    s2 = s * s
    atanh = _horner(s2, _ATANH) * s + s
    return e.to(torch.float32) * _LN2 + 2.0 * atanh


def log_uniform(v: Tensor, bits) -> Tensor:
    """ln u in fp32 for u = (floor(v / 2^t) + 1) * 2^(t - bits), t = max(0, bitlength(v) - 24),
    int64 v in [0, 2^52): v's top 24 significant bits, as philox.h's log_uniform."""
    exponent = v.to(torch.float64).view(torch.int64) >> 52  # exact conversion: bitlength(v) + 1022
    t = (exponent - 1046).clamp(min=0)
    return log_scaled((v >> t) + 1, bits - t)


def sin_cos_quadrant(m: Tensor):
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


def needs_tail_word(a: Tensor) -> Tensor:
    """Pairs whose 64-bit uniform needs its tail word (philox.h): a < 2^15."""
    return a < (1 << 15)


def box_muller(a: Tensor, b: Tensor, c: Optional[Tensor] = None):
    """Two standard normals from pair words (a, b) and tail words c (int64 tensors holding
    uint32; c is read only where a < 2^15, None means 0), as philox.h's box_muller."""
    c = torch.zeros_like(a) if c is None else c
    w40 = (a << 8) | (b & 0xFF)
    w64 = (a << 32) | ((b & 0xFF) << 24) | (c >> 8)  # < 2^47 where it is used
    tail = needs_tail_word(a)
    log_u = torch.where(tail, log_uniform(torch.where(tail, w64, 0), 64), log_uniform(w40, 40))
    # torch.sqrt on fp32 CPU tensors is not correctly rounded (about 0.6 % of values are one ulp
    # off); sqrt in float64 rounded to fp32 is (53 >= 2 * 24 + 2 bits), as the kernels' sqrtf.
    radius = torch.sqrt((log_u * -2.0).to(torch.float64)).to(torch.float32)
    sin_t, cos_t = sin_cos_quadrant(b >> 8)
    return radius * cos_t, radius * sin_t


_GAUSSIAN_TAIL_BLOCK = 1 << 30  # philox.h: counter word 0 of quad q's tail block is 2^30 + q
DISCRETE_BLOCK = 1 << 31        # counter word 0 of discrete noise block p (elements 2p, 2p+1)


def reference_normals(keys: Tensor, draws: Tensor, num_elements: int, seed: int) -> Tensor:
    """Standard normal noise ``[N, num_elements]`` fp32 for the draws ``draws[N]`` of inputs ``keys[N]``.

    Pure torch; element ``e`` of row ``n`` is noise(seed, keys[n], draws[n], e).
    """
    quads = (num_elements + 3) // 4
    device = keys.device
    q = torch.arange(quads, dtype=torch.int64, device=device)[None, :]
    d = (draws & _MASK32)[:, None]
    k_lo, k_hi = (keys & _MASK32)[:, None], ((keys >> 32) & _MASK32)[:, None]  # as the kernels' uint64 key
    s_lo, s_hi = seed & _MASK32, seed >> 32
    w = torch.stack(torch.broadcast_tensors(*philox4x32_10(q, d, k_lo, k_hi, s_lo, s_hi)), dim=-1)  # [N, Q, 4]
    a, b = w[..., 0::2], w[..., 1::2]  # [N, Q, 2]: pair j of each quad
    c = torch.zeros_like(a)
    rows, cols, pairs = needs_tail_word(a).nonzero(as_tuple=True)  # one pair in 2^17: their tail blocks only
    if rows.numel():
        tail = philox4x32_10(q[0, cols] | _GAUSSIAN_TAIL_BLOCK, d[rows, 0], k_lo[rows, 0], k_hi[rows, 0], s_lo, s_hi)
        c[rows, cols, pairs] = torch.where(pairs == 0, tail[0], tail[1])
    z_cos, z_sin = box_muller(a, b, c)
    z = torch.stack((z_cos, z_sin), dim=-1).reshape(keys.shape[0], quads * 4)  # pair j -> elements 2j, 2j+1
    return z[:, :num_elements]


def reference_noisy_draws(x: Tensor, keys: Tensor, first_draw: Tensor, reps: int, sigma: float, seed: int,
                          out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Tensor:
    """Pure-torch `noisy_draws`: same arguments, bit-identical result, any device."""
    out_dtype = checks.noisy_draws_args(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)
    checks.draws_in_range(first_draw, reps)
    batch, elem_shape = x.shape[0], x.shape[1:]
    num_elements = math.prod(elem_shape)
    r = torch.arange(reps, dtype=torch.int64, device=x.device)
    draws = (first_draw[:, None] + r[None, :]).reshape(-1)  # row b*reps + r
    row_keys = keys.repeat_interleave(reps)
    z = reference_normals(row_keys, draws, num_elements, seed)
    x_rows = x.to(torch.float32).reshape(batch, 1, num_elements).expand(batch, reps, num_elements)
    sigma32 = torch.tensor(sigma, dtype=torch.float32, device=x.device)
    out = (x_rows.reshape(batch * reps, num_elements) + sigma32 * z).to(out_dtype)
    bits_dtype, nan = _CANONICAL_NAN[out_dtype]
    out.view(bits_dtype).masked_fill_(torch.isnan(out), nan)
    # the kernels' output layout exactly (channels-last strides are ambiguous when C == 1)
    return checks.noisy_draws_output(x, reps, out_dtype, channels_last).copy_(out.reshape(batch * reps, *elem_shape))


# ---- discrete noise: the rounded Gaussian drawn by integer comparisons, as csrc/philox.h -----------
_DISCRETE_LOW_BLOCK = 3 << 30  # counter word 0 of quad q's low words is 3 * 2^30 + q (high words: 2^31 + q)


def reference_discrete_noise(keys: Tensor, draws: Tensor, num_elements: int, seed: int, thresholds: Tensor,
                             half_width: int) -> Tensor:
    """Discrete noise ``[N, num_elements]`` int64 (grid steps) for the draws ``draws[N]`` of
    inputs ``keys[N]``: ``I = -K + #{i : T[i] <= U}``, U the element's 64-bit uniform (high
    word from block 2^31 + e // 4, low word from block 3 * 2^30 + e // 4, word e % 4 of each),
    T = ``thresholds`` (uint64 bits in int64, ascending as unsigned), K = ``half_width``."""
    quads = (num_elements + 3) // 4
    q = torch.arange(quads, dtype=torch.int64, device=keys.device)[None, :]
    d = (draws & _MASK32)[:, None]
    k_lo, k_hi = (keys & _MASK32)[:, None], ((keys >> 32) & _MASK32)[:, None]
    s_lo, s_hi = seed & _MASK32, seed >> 32

    def words(kind):
        return torch.stack(torch.broadcast_tensors(*philox4x32_10(q | kind, d, k_lo, k_hi, s_lo, s_hi)), dim=-1)

    hi, lo = words(DISCRETE_BLOCK), words(_DISCRETE_LOW_BLOCK)       # [N, Q, 4]
    # unsigned order as signed int64: subtract 2^63 (flip the top bit) on both sides
    u = (hi - 2**31) * 2**32 + lo
    t = thresholds.to(u.device) ^ torch.iinfo(torch.int64).min
    count = torch.searchsorted(t, u.reshape(-1), right=True).reshape(u.shape)
    return (count - half_width).reshape(keys.shape[0], quads * 4)[:, :num_elements]


def reference_noisy_draws_discrete(v: Tensor, keys: Tensor, first_draw: Tensor, reps: int, thresholds: Tensor,
                                   guide: Tensor, grid: int, seed: int, out_dtype: Optional[torch.dtype] = None,
                                   channels_last: bool = False) -> Tensor:
    """Pure-torch `noisy_draws_discrete`: same arguments, bit-identical result, any device
    (the guide, which only speeds the kernels up, is checked, not used)."""
    out_dtype = checks.noisy_draws_discrete_args(v, keys, first_draw, reps, thresholds, guide, grid, seed, out_dtype,
                                                 channels_last)
    checks.draws_in_range(first_draw, reps)
    half_width = thresholds.shape[0] // 2
    checks.grid_indices_in_range(v, half_width)
    batch, elem_shape = v.shape[0], v.shape[1:]
    num_elements = math.prod(elem_shape)
    r = torch.arange(reps, dtype=torch.int64, device=v.device)
    draws = (first_draw[:, None] + r[None, :]).reshape(-1)
    noise = reference_discrete_noise(keys.repeat_interleave(reps), draws, num_elements, seed, thresholds, half_width)
    rows = v.reshape(batch, 1, num_elements).to(torch.int64).expand(batch, reps, num_elements)
    total = rows.reshape(batch * reps, num_elements) + noise         # exact integers below 2^24
    out = (total.to(torch.float32) / float(grid)).to(out_dtype)        # one division, one rounding
    return checks.noisy_draws_output(v, reps, out_dtype, channels_last).copy_(out.reshape(batch * reps, *elem_shape))


# ---- votes -----------------------------------------------------------------------------------
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
    checks.vote_args(logits, rows, counts, agg, weights)
    checks.rows_in_range(rows, counts.shape[0])
    checks.finite_weights(weights)
    if logits.shape[1] == 0:
        return
    labels = reference_labels(logits, agg, weights)
    voted = labels >= 0
    ones = torch.ones(int(voted.sum()), dtype=counts.dtype, device=counts.device)
    counts.index_put_((rows[voted], labels[voted]), ones, accumulate=True)


# ---- dense members ---------------------------------------------------------------------------
def reference_bias_act_(h: Tensor, bias: Tensor, relu: bool) -> None:
    """Pure-torch `bias_act_`."""
    checks.bias_act_args(h, bias)
    h.add_(bias)
    if relu:
        h.relu_()


def reference_dense_chain(x: Tensor, meta: Tensor, params: Tensor, out_cols: int) -> Tensor:
    """Pure-torch `dense_chain`: the plan's blocks as GEMMs (any device)."""
    checks.dense_chain_args(x, meta, params, out_cols)
    checks.dense_chain_plan(x, meta, out_cols)
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


# ---- the CIFAR ResNet kernel -----------------------------------------------------------------
def reference_cifar_resnet(x: Tensor, weights: Tensor, biases: Tensor, norm: Tensor, fc_w: Tensor,
                           fc_b: Tensor, blocks: int, variant: int = 0) -> Tensor:
    """Pure-torch `cifar_resnet`, with the kernel's roundings: bf16 weights and activations
    (each convolution's output rounded once, after bias, residual and ReLU), fp32 sums."""
    checks.cifar_resnet_args(x, weights, biases, norm, fc_w, fc_b, blocks, variant)

    def bf16(t):
        return t.to(torch.bfloat16).float()

    x = bf16((x.float() - norm[:3].view(1, 3, 1, 1)) / norm[3:].view(1, 3, 1, 1))
    x = F.pad(x, (0, 0, 0, 0, 0, 13))          # 3 channels to 16 (zeros), as the kernel does
    wat = bat = 0
    h = residual = None
    for i, (cin, cout, taps, stride, kind) in enumerate(cifar_resnet_convs(blocks)):
        w = unpack_cifar_resnet_weight(weights[wat:wat + taps * cin * cout], cin, cout, taps, variant).float()
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
