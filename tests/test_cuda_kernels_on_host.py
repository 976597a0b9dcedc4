"""The CUDA kernels' per-item code, run on the host (test hooks of ``_C_cuda``; no GPU needed).

* noisy_draws and noisy_draws_discrete (``noisy_draws_on_host``,
  ``noisy_draws_discrete_on_host``): every path -- contiguous with vector or scalar
  accesses, channels-last by groups of 4 positions, general -- writes each element exactly
  as the CPU kernel does (which is bit-identical to the torch reference, tests/test_ops.py,
  tests/test_discrete_noise.py); the known answers of both noises.
* vote_ with few classes (``vote_on_host``): each draw's label, as the thread-per-draw
  kernel computes it, against the torch reference (ties, non-finite logits, every mode and
  dtype). The warp's aggregation of the votes (one atomic per distinct vote) is GPU code.

On a GPU the kernels themselves are compared with the CPU by the CUDA tests in
tests/test_ops.py; these cover their indexing and per-draw logic everywhere.
"""
import math

import pytest
import torch

from drt_fast import ops
from drt_fast.ops import reference

pytestmark = pytest.mark.skipif(ops._C_cuda is None, reason="drt_fast was built without its CUDA kernels")

GENERAL, CONTIGUOUS, CHANNELS_LAST = 0, 1, 2
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def on_host(x, keys, first, reps, sigma, seed, out_dtype, channels_last, misalign=False):
    """The CUDA kernel's items on the host -> (output, path). ``misalign``: the output starts
    one element into its buffer (not 16-byte aligned)."""
    batch, num_elements = x.shape[0], math.prod(x.shape[1:])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch * reps, *x.shape[1:])
    if misalign:
        buffer = torch.full((math.prod(shape) + 1,), float("nan"), dtype=out_dtype)
        flat = buffer[1:]
    else:
        flat = torch.full((math.prod(shape),), float("nan"), dtype=out_dtype)
    if channels_last:            # the storage order of a channels-last [N, C, H, W] tensor
        n, c, h, w = shape
        out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
        assert out.numel() == 0 or out.is_contiguous(memory_format=memory_format)
    else:
        out = flat.view(shape)
    channels, spatial = (x.shape[1], x.shape[2] * x.shape[3]) if channels_last else (1, num_elements)
    x32 = x.contiguous()
    path = ops._C_cuda.noisy_draws_on_host(
        x32.data_ptr(), keys.data_ptr(), first.data_ptr(), flat.data_ptr(), batch, num_elements, reps,
        float(sigma), seed, ops._DTYPE_CODE[out_dtype], bool(channels_last), channels, spatial)
    return out, path


def inputs(batch, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, *shape, generator=gen),
            torch.randint(0, 2**40, (batch,), generator=gen),
            torch.randint(0, 10_000, (batch,), generator=gen))


CASES = [
    # shape, channels_last, misaligned output, path expected
    ((1, 8, 8), False, False, CONTIGUOUS),        # digits: vector accesses
    ((3, 32, 32), False, False, CONTIGUOUS),
    ((3, 5, 7), False, False, CONTIGUOUS),        # 105 elements: scalar, a partial last quad
    ((2, 3, 3), False, False, CONTIGUOUS),        # 18 elements
    ((1, 8, 8), False, True, CONTIGUOUS),         # not aligned: scalar accesses
    ((3, 8, 8), True, False, CHANNELS_LAST),
    ((2, 4, 6), True, False, CHANNELS_LAST),
    ((4, 2, 2), True, False, CHANNELS_LAST),
    ((1, 8, 8), True, False, CONTIGUOUS),         # one channel: channels-last is contiguous
    ((3, 5, 5), True, False, GENERAL),            # 25 positions: not whole groups of 4
    ((5, 4, 4), True, False, GENERAL),            # more than 4 channels
    ((3, 8, 8), True, True, GENERAL),             # not aligned
]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,channels_last,misalign,path", CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}{'-cl' if c[1] else ''}{'-misaligned' if c[2] else ''}"
                              for c in CASES])
@pytest.mark.parametrize("batch,reps", [(1, 5), (3, 7)])
def test_every_path_writes_what_the_cpu_kernel_writes(out_dtype, shape, channels_last, misalign, path, batch, reps):
    x, keys, first = inputs(batch, shape, seed=batch * 10 + reps)
    got, taken = on_host(x, keys, first, reps, 0.37, 12345, out_dtype, channels_last, misalign)
    want = ops.noisy_draws(x, keys, first, reps, 0.37, 12345, out_dtype, channels_last)
    assert taken == path
    assert torch.equal(got.contiguous(), want.contiguous())     # bitwise, every element written
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("channels_last,path", [(False, CONTIGUOUS), (True, GENERAL)])
def test_a_misaligned_input_falls_back_to_scalar_reads(channels_last, path):
    x, keys, first = inputs(2, (3, 8, 8), seed=4)
    shifted = torch.empty(x.numel() + 1)[1:].view_as(x)     # 4 bytes off 16-byte alignment
    shifted.copy_(x)
    got, taken = on_host(shifted, keys, first, 9, 0.3, 5, torch.float32, channels_last)
    assert taken == path
    want = ops.noisy_draws(x, keys, first, 9, 0.3, 5, torch.float32, channels_last)
    assert torch.equal(got.contiguous(), want.contiguous())


def test_empty_rows_write_nothing():
    """No element (a 0-pixel image) or no draw: nothing to do, and no division by zero."""
    for shape, reps in [((3, 0, 4), 5), ((1, 8, 8), 0)]:
        x, keys, first = inputs(2, shape)
        for channels_last in (False, True):
            got, taken = on_host(x, keys, first, reps, 0.3, 5, torch.float32, channels_last)
            assert got.numel() == 0 and taken == GENERAL


def test_the_vector_path_at_the_scale_of_a_gpu_batch():
    """Many items: the row / input division by multiply-high over a large range."""
    x, keys, first = inputs(7, (3, 16, 16), seed=3)
    for channels_last in (False, True):
        got, taken = on_host(x, keys, first, 333, 0.5, 7, torch.float32, channels_last)
        assert taken == (CHANNELS_LAST if channels_last else CONTIGUOUS)
        want = ops.noisy_draws(x, keys, first, 333, 0.5, 7, torch.float32, channels_last)
        assert torch.equal(got.contiguous(), want.contiguous())


from test_philox import KNOWN_NORMALS, f32_bits  # noqa: E402


@pytest.mark.parametrize("case,bits", KNOWN_NORMALS)
def test_known_normals(case, bits):
    """The known answers of tests/test_philox.py through the CUDA kernel's items (x = 0,
    sigma = 1: the output is the noise)."""
    seed, key, draw, element = case
    x = torch.zeros(1, element + 1)
    got, _ = on_host(x, torch.tensor([key]), torch.tensor([draw]), 1, 1.0, seed, torch.float32, False)
    assert f32_bits(got[0, element].item()) == bits


def test_pairs_that_need_their_tail_word():
    """Rows holding pairs that read their tail word (one in 2^17), every path, against the CPU
    kernel, which redoes them after its vectorized pass."""
    seed, key = 5, 11
    first = torch.tensor([7, 51])
    x = torch.zeros(2, 4, 128, 128)
    keys = torch.full((2,), key)
    for draw in first.tolist():            # each draw holds two such pairs
        w = reference.philox4x32_10(torch.arange(4 * 128 * 128 // 4), torch.tensor(draw), torch.tensor(key),
                                    torch.tensor(0), seed, 0)
        assert int((reference.needs_tail_word(w[0]) | reference.needs_tail_word(w[2])).sum()) == 2
    for channels_last in (False, True):
        got, _ = on_host(x, keys, first, 1, 1.0, seed, torch.float32, channels_last)
        want = ops.noisy_draws(x, keys, first, 1, 1.0, seed, torch.float32, channels_last)
        assert torch.equal(got.contiguous(), want.contiguous())


# ------------------------------------------------------------------ noisy_draws_discrete
def discrete_on_host(v, keys, first, reps, table, seed, out_dtype, channels_last, thresholds=None, guide=None):
    """The CUDA kernel's discrete items on the host -> (output, path)."""
    thresholds = table.thresholds if thresholds is None else thresholds
    guide = table.guide if guide is None else guide
    batch, num_elements = v.shape[0], math.prod(v.shape[1:])
    shape = (batch * reps, *v.shape[1:])
    flat = torch.full((math.prod(shape),), float("nan"), dtype=out_dtype)
    if channels_last:
        n, c, h, w = shape
        out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = flat.view(shape)
    channels, spatial = (v.shape[1], v.shape[2] * v.shape[3]) if channels_last else (1, num_elements)
    path = ops._C_cuda.noisy_draws_discrete_on_host(
        v.data_ptr(), keys.data_ptr(), first.data_ptr(), flat.data_ptr(), batch, num_elements, reps,
        thresholds.data_ptr(), thresholds.shape[0] // 2, guide.data_ptr(), guide.shape[0].bit_length() - 1,
        float(table.grid), seed, ops._DTYPE_CODE[out_dtype], bool(channels_last), channels, spatial)
    return out, path


@pytest.mark.parametrize("out_dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,channels_last,misalign,path", [c for c in CASES if not c[2]],
                         ids=[f"{'x'.join(map(str, c[0]))}{'-cl' if c[1] else ''}" for c in CASES if not c[2]])
@pytest.mark.parametrize("sigma,grid", [(0.25, 16), (0.5, 255)])
def test_discrete_paths_write_what_the_cpu_kernel_writes(out_dtype, shape, channels_last, misalign, path, sigma, grid):
    table = ops.discrete_table(sigma, grid)
    gen = torch.Generator().manual_seed(grid)
    v = torch.randint(0, grid + 1, (3, *shape), generator=gen, dtype=torch.int32)
    keys, first = torch.randint(0, 2**40, (3,), generator=gen), torch.randint(0, 10_000, (3,), generator=gen)
    got, taken = discrete_on_host(v, keys, first, 7, table, 12345, out_dtype, channels_last)
    want = ops.noisy_draws_discrete(v, keys, first, 7, table.thresholds, table.guide, grid, 12345, out_dtype,
                                    channels_last)
    assert taken == path
    assert torch.equal(got.contiguous(), want.contiguous())


from drt_fast.ops.rounded_gaussian import guide_of  # noqa: E402
from test_discrete_noise import KNOWN_DISCRETE, _crafted, _words  # noqa: E402


@pytest.mark.parametrize("case,noise", KNOWN_DISCRETE)
def test_discrete_known_answers(case, noise):
    sigma, grid, seed, key, draw, element = case
    table = ops.discrete_table(sigma, grid)
    v = torch.zeros(1, element + 1, dtype=torch.int32)
    got, _ = discrete_on_host(v, torch.tensor([key]), torch.tensor([draw]), 1, table, seed, torch.float32, False)
    assert got[0, element].item() == float(torch.tensor(noise, dtype=torch.float32) / grid)


def test_discrete_low_word_path():
    """A table whose thresholds share their high word with drawn uniforms (tests/test_discrete_noise.py)."""
    seed, key, draw, elements = 11, 5, 3, 64
    hi = [_words(seed, key, draw, (1 << 31) + q)[j] for q in range(elements // 4) for j in range(4)]
    t = _crafted(hi[::3], seed=1)
    thresholds = torch.tensor([u - 2**64 if u >= 2**63 else u for u in t], dtype=torch.int64)
    guide = guide_of(t)
    table = ops.discrete_table(0.25, 16)   # its grid only
    v = torch.zeros(1, elements, dtype=torch.int32)
    keys, first = torch.tensor([key]), torch.tensor([draw])
    got, _ = discrete_on_host(v, keys, first, 1, table, seed, torch.float32, False, thresholds, guide)
    want = ops.noisy_draws_discrete(v, keys, first, 1, thresholds, guide, 16, seed)
    assert torch.equal(got, want)


def test_fast_division_is_exact():
    """fastdiv.h against Python's //, at the edges of its range (n, d < 2^31)."""
    gen = torch.Generator().manual_seed(0)
    divisors = [1, 2, 3, 4, 5, 7, 16, 17, 48, 255, 256, 257, 1000, 65535, 65536, 65537,
                2**30 - 1, 2**30, 2**30 + 1, 2**31 - 1]
    divisors += torch.randint(1, 2**31 - 1, (200,), generator=gen).tolist()
    numerators = [0, 1, 2, 2**16, 2**31 - 2, 2**31 - 1] + torch.randint(0, 2**31, (300,), generator=gen).tolist()
    for d in divisors:
        ns = numerators + [d - 1, d, d + 1, 2 * d - 1, 2 * d, (2**31 - 1) // d * d, (2**31 - 1) // d * d - 1]
        ns = [n for n in ns if 0 <= n < 2**31]
        assert ops._C_cuda.fast_div(ns, d) == [n // d for n in ns], d


# ------------------------------------------------------------------ vote_, few classes
from test_ops import _decision_gap, _logits, _per_draw_labels  # noqa: E402


def host_vote(logits, rows, counts, agg, weights):
    """The few-classes CUDA kernel's per-draw votes, on the host."""
    logits_c, rows_c, weights_c = logits.contiguous(), rows.contiguous(), weights.contiguous()
    members, draws, classes = logits.shape
    done = ops._C_cuda.vote_on_host(logits_c.data_ptr(), ops._DTYPE_CODE[logits.dtype], members, draws, classes,
                                    rows_c.data_ptr(), counts.data_ptr(), counts.shape[0], ops._AGG_CODE[agg],
                                    weights_c.data_ptr())
    assert done == 1


SMALL_SHAPES = [(1, 37, 10), (3, 101, 10), (8, 53, 10), (3, 41, 1), (5, 64, 3), (3, 200, 16), (2, 150, 17),
                (4, 90, 32)]


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("dtype", ops.LOGIT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("members,draws,classes", SMALL_SHAPES)
def test_few_classes_vote_matches_the_reference(agg, dtype, members, draws, classes):
    logits = _logits(members, draws, classes, dtype, seed=members * 1000 + draws + classes)
    weights = torch.rand(members, generator=torch.Generator().manual_seed(draws)) + 0.2
    ours = _per_draw_labels(host_vote, logits, agg, weights)
    ref = _per_draw_labels(ops.reference_vote_, logits, agg, weights)
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    assert not ((ours != ref) & ~near_tie).any()
    assert (ours >= 0).all()


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
def test_few_classes_vote_ties_non_finite_and_rows(agg):
    """Exact ties go to the smaller class (and, in mme, member); a draw with a NaN or inf
    logit casts no vote; votes land in their draw's row; a zero weight is allowed."""
    logits = _logits(3, 60, 10, torch.float32, seed=5)
    logits[:, 0] = 1.0                      # every class tied in every member
    logits[:, 1, :] = 0.0
    logits[:, 1, 7] = logits[:, 1, 3] = 2.0  # classes 3 and 7 tied at the top
    logits[1, 2, 4] = float("nan")
    logits[2, 3, 0] = float("inf")
    logits[0, 4, 9] = -float("inf")
    weights = torch.tensor([1.0, 0.0, 0.5])
    rows = torch.arange(60) // 7
    ours = torch.zeros(9, 10, dtype=torch.int64)
    ref = torch.zeros(9, 10, dtype=torch.int64)
    host_vote(logits, rows, ours, agg, weights)
    ops.reference_vote_(logits, rows, ref, agg, weights)
    labels = _per_draw_labels(host_vote, logits, agg, weights)
    assert labels[0] == 0 and labels[1] == 3
    assert (labels[2:5] == -1).all() and ours.sum() == 57
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    want = _per_draw_labels(ops.reference_vote_, logits, agg, weights)
    assert not ((labels != want) & ~near_tie).any()
    if not near_tie[5:].any():
        assert torch.equal(ours, ref)


def test_more_classes_are_not_the_small_kernel():
    logits = torch.randn(2, 5, 33)
    counts = torch.zeros(5, 33, dtype=torch.int64)
    assert ops._C_cuda.vote_on_host(logits.data_ptr(), 0, 2, 5, 33, torch.arange(5).data_ptr(), counts.data_ptr(),
                                    5, 0, torch.ones(2).data_ptr()) == 0
    assert counts.sum() == 0


def test_majority_vote_sums_weights_in_double_as_the_cpu_kernel():
    """0.1 + 0.2 ties 0.3 in float32 but not in float64: the CPU kernel and the reference sum
    in float64 and give class 1; so must the CUDA kernels."""
    logits = torch.zeros(3, 1, 10)
    logits[0, 0, 0] = logits[1, 0, 0] = 5.0      # members 0 and 1 vote class 0
    logits[2, 0, 1] = 5.0                         # member 2 votes class 1
    weights = torch.tensor([0.1, 0.2, 0.3])
    for vote in (host_vote, ops.vote_, ops.reference_vote_):
        counts = torch.zeros(1, 10, dtype=torch.int64)
        vote(logits, torch.zeros(1, dtype=torch.int64), counts, "mv", weights)
        assert counts[0].tolist() == [0, 1] + [0] * 8, vote


def test_nan_scores_do_not_vote_past_the_row():
    """NaN weights (the op checks them on the CPU, not on CUDA) make every score NaN: the vote
    stays in the draw's row (class 0) instead of landing in the next row."""
    logits = torch.randn(2, 4, 10)
    counts = torch.zeros(2, 10, dtype=torch.int64)
    weights = torch.tensor([float("nan"), 1.0])
    host_vote(logits, torch.tensor([1, 1, 1, 1]), counts, "we", weights)
    assert counts[1, 0] == 4 and counts.sum() == 4


def test_majority_vote_with_zero_weights_picks_a_voted_class():
    """Members 0 and 1 (weight 0) vote class 5 and 7, member 2 (weight 0) too: every sum is
    0, and the winner is the smallest voted class, not class 0, in every implementation."""
    logits = torch.zeros(3, 1, 10)
    logits[0, 0, 5] = logits[1, 0, 7] = logits[2, 0, 7] = 5.0
    for vote in (host_vote, ops.vote_, ops.reference_vote_):
        counts = torch.zeros(1, 10, dtype=torch.int64)
        vote(logits, torch.zeros(1, dtype=torch.int64), counts, "mv", torch.zeros(3))
        assert int(counts[0].argmax()) == 5, vote


def test_a_row_out_of_range_casts_no_vote():
    """The op does not range-check rows on CUDA (it would sync): the kernel drops such a vote
    instead of writing outside counts."""
    logits = torch.randn(2, 6, 10)
    counts = torch.zeros(2, 10, dtype=torch.int64)
    host_vote(logits, torch.tensor([0, 1, -1, 2, 5, 1]), counts, "we", torch.ones(2))
    assert counts.sum() == 3
