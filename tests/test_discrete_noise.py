"""noisy_draws_discrete (ops/discrete_noise.py): the C++ kernel (and the CUDA kernel's per-quad
code, run on the host) against the pure-torch reference bit for bit; known answers; the
distribution drawn is exactly the table's; the inversion is exact at every threshold, the
rare low-word path included; the noisy input is a function of the integer sum alone; the grid
check; opcheck."""
import bisect
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch

from drt_fast import ops
from drt_fast.errors import DrtFastError
from drt_fast.ops import discrete_table, reference
from drt_fast.ops.rounded_gaussian import guide_of
from drt_fast.ops.extension import cpu_kernels

from test_ops import ISAS, isa  # noqa: F401 (fixture: every CPU kernel build)

DIGITS = discrete_table(0.25, 16)     # the embedded default's noise: K = 37
IMAGES = discrete_table(0.5, 255)     # 8-bit images at sigma 0.5: K = 1167


def _unsigned(t: torch.Tensor) -> list:
    return [int(v) % 2**64 for v in t.tolist()]


def _words(seed, key, draw, block):
    return cpu_kernels.philox4x32_10(block, draw, key & 0xFFFFFFFF, key >> 32, seed & 0xFFFFFFFF, seed >> 32)


def _inputs(batch, shape, grid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(0, grid + 1, (batch, *shape), generator=gen, dtype=torch.int32)
    keys = torch.randint(0, 2**40, (batch,), generator=gen)
    first = torch.randint(0, 10_000, (batch,), generator=gen)
    return v, keys, first


def _draw(table, v, keys, first, reps, seed, out_dtype=None, channels_last=False, fn=ops.noisy_draws_discrete):
    return fn(v, keys, first, reps, table.thresholds, table.guide, table.grid, seed, out_dtype, channels_last)


# ---------------------------------------------------------------------------------------
# kernels == reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", [DIGITS, IMAGES], ids=["digits", "images"])
@pytest.mark.parametrize("out_dtype", ops.NOISE_DTYPES)
@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7), False), ((3, 5, 7), True), ((1, 8, 8), True),
                                                 ((13,), False), ((1,), False), ((2, 2, 2, 3), False)])
def test_matches_reference_bitwise(isa, table, out_dtype, shape, channels_last):
    v, keys, first = _inputs(3, shape, table.grid)
    ours = _draw(table, v, keys, first, 7, 2**40 + 5, out_dtype, channels_last)
    ref = _draw(table, v, keys, first, 7, 2**40 + 5, out_dtype, channels_last, fn=ops.reference_noisy_draws_discrete)
    assert ours.dtype == out_dtype and ours.shape == (21, *shape) and ours.stride() == ref.stride()
    assert torch.equal(ours, ref)


def test_output_is_a_function_of_the_integer_sum():
    """Row r of input v is (v + I_r) / grid with I_r drawn from (seed, key, draw) alone: the
    same noise for any v, the sum exact, one rounding (so nothing of v leaks but v + I)."""
    v, keys, first = _inputs(1, (4, 9), 255)
    out = _draw(IMAGES, v, keys, first, 50, 3)
    other = _draw(IMAGES, v.flip(-1), keys, first, 50, 3)     # another input, same stream
    noise = reference.reference_discrete_noise(keys.repeat_interleave(50), first + torch.arange(50), 36, 3,
                                               IMAGES.thresholds, IMAGES.half_width).reshape(50, 4, 9)
    for x, o in ((v, out), (v.flip(-1), other)):
        total = (x.to(torch.int64) + noise).to(torch.float32)
        assert torch.equal(o, total / 255.0)
    assert torch.equal(torch.round(out * 255) - v, torch.round(other * 255) - v.flip(-1))


def test_invariant_to_batching():
    v, keys, first = _inputs(5, (3, 4, 4), 16, seed=1)
    whole = _draw(DIGITS, v, keys, first, 10, 9)
    for b in range(5):
        one = _draw(DIGITS, v[b:b + 1], keys[b:b + 1], first[b:b + 1], 10, 9)
        assert torch.equal(one, whole[b * 10:(b + 1) * 10])
        head = _draw(DIGITS, v[b:b + 1], keys[b:b + 1], first[b:b + 1], 4, 9)
        tail = _draw(DIGITS, v[b:b + 1], keys[b:b + 1], first[b:b + 1] + 4, 6, 9)
        assert torch.equal(torch.cat([head, tail]), one)


# Known answers: (sigma, grid, seed, key, draw, element) -> I, the noise in grid steps.
KNOWN_DISCRETE = [
    ((0.25, 16, 0, 0, 0, 0), 3),
    ((0.25, 16, 0, 0, 0, 3), -4),
    ((0.25, 16, 2**40 + 5, 2**33 + 17, 99, 1029), -5),
    ((0.25, 16, 2**64 - 1, 2**63 - 1, 2**32 - 1, 150527), -8),
    ((0.5, 255, 0, 0, 0, 0), 85),
    ((0.5, 255, 2**40 + 5, 2**33 + 17, 99, 1029), -154),
    ((0.5, 255, 7, 12, 100000, 17), -17),
]


@pytest.mark.parametrize("case,noise", KNOWN_DISCRETE)
def test_known_answers(case, noise):
    sigma, grid, seed, key, draw, element = case
    table = discrete_table(sigma, grid)
    v = torch.full((1, element + 1), 7, dtype=torch.int32)
    args = (v, torch.tensor([key]), torch.tensor([draw]), 1, table.thresholds, table.guide, grid, seed)
    want = float(np.float32(7 + noise) / np.float32(grid))     # the sum exact, the quotient rounded once in fp32
    assert ops.noisy_draws_discrete_eager(*args)[0, element].item() == want    # CPU kernel
    assert ops.reference_noisy_draws_discrete(*args)[0, element].item() == want
    t = _unsigned(table.thresholds)
    assert cpu_kernels.discrete4(seed, key, draw, element // 4, t, table.guide.tolist())[element % 4] == noise
    # the definition in Python integers: U = hi * 2^32 + lo from the two blocks, I = -K + #{T <= U}
    hi = _words(seed, key, draw, (1 << 31) + element // 4)[element % 4]
    lo = _words(seed, key, draw, (3 << 30) + element // 4)[element % 4]
    assert bisect.bisect_right(t, (hi << 32) | lo) - table.half_width == noise


# ---------------------------------------------------------------------------------------
# the inversion is exact
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", [DIGITS, IMAGES], ids=["digits", "images"])
def test_counts_are_exact_at_every_threshold(table):
    """#{T <= U} for U on, just below and just above every threshold, with the same high word
    and other low words, and for random U: the kernels' guided count against bisection."""
    t = _unsigned(table.thresholds)
    uniforms = [0, 2**64 - 1]
    for x in t:
        uniforms += [u % 2**64 for u in (x - 1, x, x + 1, x & ~0xFFFFFFFF, x | 0xFFFFFFFF, x - 2**32, x + 2**32)]
    gen = random.Random(0)
    uniforms += [gen.getrandbits(64) for _ in range(20000)]
    counts = cpu_kernels.discrete_count(uniforms, t, table.guide.tolist())
    assert counts == [bisect.bisect_right(t, u) for u in uniforms]


def _crafted(hi_words, seed):
    """Thresholds whose high words are drawn ones: every element with such a word needs its low
    word. Half-width 64 around the drawn words, plus spread ones."""
    gen = random.Random(seed)
    t = {(h << 32) | gen.getrandbits(32) for h in hi_words}
    while len(t) < 128:
        t.add(gen.getrandbits(64))
    return sorted(t)


def test_low_word_path_matches_reference(isa):
    """Tables whose thresholds share their high word with drawn uniforms force the rare path
    (one element in 2^32 / 2K otherwise): CPU kernel, CUDA's per-quad code and the reference
    agree, and the count is exact."""
    seed, key, draw, elements = 11, 5, 3, 64
    hi = [_words(seed, key, draw, (1 << 31) + q)[j] for q in range(elements // 4) for j in range(4)]
    t = _crafted(hi[::3], seed=1)
    thresholds = torch.tensor([u - 2**64 if u >= 2**63 else u for u in t], dtype=torch.int64)
    guide = guide_of(t)
    v = torch.zeros(1, elements, dtype=torch.int32)
    args = (v, torch.tensor([key]), torch.tensor([draw]), 1, thresholds, guide, 1, seed)
    ours = ops.noisy_draws_discrete(*args)
    assert torch.equal(ours, ops.reference_noisy_draws_discrete(*args))
    for q in range(elements // 4):
        lo = _words(seed, key, draw, (3 << 30) + q)
        four = cpu_kernels.discrete4(seed, key, draw, q, t, guide.tolist())
        for j in range(4):
            want = bisect.bisect_right(t, (hi[4 * q + j] << 32) | lo[j]) - 64
            assert four[j] == want == int(ours[0, 4 * q + j])


# ---------------------------------------------------------------------------------------
# the distribution drawn
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", [DIGITS, IMAGES], ids=["digits", "images"])
def test_distribution_is_the_tables(table):
    """2^24 draws (a fixed seed) against the table's probabilities: chi-square over the values
    (tails merged below 20 expected counts), and the largest |I| where the table says."""
    reps, elements = 256, 1 << 16
    v = torch.zeros(1, elements, dtype=torch.int32)
    out = _draw(table, v, torch.tensor([17]), torch.tensor([0]), reps, 2024)
    noise = torch.round(out * table.grid).to(torch.int64).reshape(-1) + table.half_width
    counts = torch.bincount(noise, minlength=2 * table.half_width + 1).numpy()
    n = counts.sum()
    p = np.array(table.probabilities())
    expected = n * p
    keep = expected >= 20
    low, high = np.argmax(keep), len(keep) - np.argmax(keep[::-1])   # central run; tails pooled
    obs = np.concatenate([[counts[:low].sum()], counts[low:high], [counts[high:].sum()]])
    exp = np.concatenate([[expected[:low].sum()], expected[low:high], [expected[high:].sum()]])
    assert scipy.stats.chisquare(obs, exp).pvalue > 1e-4
    assert abs(noise - table.half_width).max() <= table.half_width
    # the tail beyond 4 sigma, drawn at its rate
    s = table.sigma * table.grid
    tail = np.abs(np.arange(len(p)) - table.half_width) > 4 * s
    assert abs(counts[tail].sum() - expected[tail].sum()) < 5 * math.sqrt(expected[tail].sum())


def test_independent_across_elements_draws_and_keys():
    reps, elements = 512, 1024
    v = torch.zeros(4, elements, dtype=torch.int32)
    out = _draw(DIGITS, v, torch.arange(4) * 7919, torch.zeros(4, dtype=torch.int64), reps, 5)
    z = (out * 16).double().reshape(4, reps, elements).numpy()
    bound = 5 / math.sqrt(z.size)
    for a, b in ((z[..., :-1], z[..., 1:]), (z[..., :-4], z[..., 4:]), (z[:, :-1], z[:, 1:]), (z[:-1], z[1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < bound


# ---------------------------------------------------------------------------------------
# pixels on the grid
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grid", [16, 255])
def test_grid_indices_of_pixels_on_the_grid(dtype, grid):
    k = torch.arange(grid + 1)
    assert torch.equal(ops.grid_indices((k / grid).to(dtype), grid), k.to(torch.int32))
    assert torch.equal(ops.to_grid((k / grid).to(dtype), grid), k.to(torch.int32))


@pytest.mark.parametrize("x,message", [
    (torch.tensor([0.0, 0.5]), r"pixel \[1\] is 0.5 \(127.5 steps\)"),
    (torch.tensor([[0.0], [float("nan")]]), r"pixel \[1, 0\] is nan"),
    (torch.tensor([float("inf")]), "is inf"),
    (torch.tensor([2.0**20]), r"\|k\| < 2\^24"),
    (torch.tensor([1, 2], dtype=torch.int64), "needs floating pixels"),
])
def test_pixels_off_the_grid_are_refused(x, message):
    with pytest.raises(DrtFastError, match=message) as info:
        ops.grid_indices(x, 255)
    assert "\n" not in str(info.value)


def test_grid_tolerance():
    """fp32 pixels computed another way (v * (1/255), one ulp off) are on the grid; a pixel
    2^-9 steps off is not."""
    v = torch.arange(256)
    assert torch.equal(ops.grid_indices(v.float() * (1 / 255), 255), v.to(torch.int32))
    assert ops.first_off_grid((v.double() + 2.0**-9) / 255, 255) == 0


# ---------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------
def test_is_torch_op_and_opchecks():
    v, keys, first = _inputs(2, (3, 4, 5), 16)
    args = (v, keys, first, 3, DIGITS.thresholds, DIGITS.guide, 16, 9)
    assert torch.equal(torch.ops.drt_fast.noisy_draws_discrete(*args), ops.noisy_draws_discrete_eager(*args))
    for channels_last in (False, True):
        torch.library.opcheck(torch.ops.drt_fast.noisy_draws_discrete.default, args,
                              {"out_dtype": torch.bfloat16 if channels_last else None,
                               "channels_last": channels_last})


def _ok():
    v, keys, first = _inputs(2, (1, 3, 3), 16)
    return dict(v=v, keys=keys, first_draw=first, reps=3, thresholds=DIGITS.thresholds, guide=DIGITS.guide,
                grid=16, seed=1)


@pytest.mark.parametrize("change,message", [
    (dict(v=torch.zeros(2, 9)), "v must be int32 grid indices"),
    (dict(keys=torch.zeros(3, dtype=torch.int64)), r"keys must have shape \[2\]"),
    (dict(reps=0), "reps must be >= 1"),
    (dict(first_draw=torch.tensor([2**32 - 2, 0])), "got draws 4294967294 .. 4294967296"),
    (dict(thresholds=torch.zeros(3, dtype=torch.int64)), r"thresholds must be int64 \[2K\]"),
    (dict(guide=torch.zeros(6, dtype=torch.int32)), r"guide must be int32 \[2\^g \+ 1\]"),
    (dict(guide=torch.zeros(5, dtype=torch.int64)), r"guide must be int32 \[2\^g \+ 1\]"),
    (dict(grid=0), "grid must be in"),
    (dict(v=torch.full((2, 1, 3, 3), 2**24 - 10, dtype=torch.int32)), "grid indices must stay below"),
    (dict(seed=-1), "seed must be in"),
])
def test_errors(change, message):
    kwargs = {**_ok(), **change}
    for fn in (ops.noisy_draws_discrete, ops.reference_noisy_draws_discrete):
        with pytest.raises(DrtFastError, match=message):
            fn(**kwargs)


def test_cuda_matches_cpu(cuda_device):
    for table in (DIGITS, IMAGES):
        for shape, channels_last in (((1, 8, 8), False), ((3, 32, 32), True), ((3, 5, 7), True)):
            v, keys, first = _inputs(3, shape, table.grid)
            cpu = _draw(table, v, keys, first, 37, 99, None, channels_last)
            thresholds, guide = table.tensors_on(cuda_device)
            gpu = ops.noisy_draws_discrete(v.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), 37,
                                           thresholds, guide, table.grid, 99, None, channels_last)
            assert gpu.stride() == cpu.stride() and torch.equal(gpu.cpu(), cpu)
