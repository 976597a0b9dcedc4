"""The CUDA kernels' per-item code, run on the host (test hooks of ``_C_cuda``; no GPU needed).

* noisy_draws and noisy_draws_discrete (``noisy_draws_on_host``,
  ``noisy_draws_discrete_on_host``): every path -- contiguous with vector or scalar
  accesses, channels-last by groups of 4 positions, general -- writes each element exactly
  as the CPU kernel does (which is bit-identical to the torch reference, tests/test_ops.py,
  tests/test_discrete_noise.py); the known answers of both noises.
* vote_ (``vote_on_host``): each draw's label, as the thread-per-draw kernel (K <= 32) and
  the block-per-draw kernel (any K; its reductions in the GPU's order, its score row whole
  or in chunks, within a given shared-memory budget) compute it, against the torch
  reference and the CPU kernel (ties, non-finite logits, every mode and dtype, the class
  counts at each shared-memory limit). The warp's aggregation of the votes (one atomic per
  distinct vote), the barriers and the shared-memory attribute are GPU code: the CUDA tests
  at the end run the same sizes on a device.

On a GPU the kernels themselves are compared with the CPU by the CUDA tests in
tests/test_ops.py; these cover their indexing and per-draw logic everywhere.
"""
import math

import pytest
import torch

from drt_fast import ops
from drt_fast.ops import reference

pytestmark = pytest.mark.skipif(ops.extension.cuda_kernels is None, reason="drt_fast was built without its CUDA kernels")

GENERAL, CONTIGUOUS, CHANNELS_LAST = 0, 1, 2
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def on_host(x, keys, first, reps, sigma, seed, out_dtype, channels_last, misalign=False, fill=float("nan")):
    """The CUDA kernel's items on the host -> (output, path). ``misalign``: the output starts
    one element into its buffer (not 16-byte aligned); ``fill``: what it holds before."""
    batch, num_elements = x.shape[0], math.prod(x.shape[1:])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch * reps, *x.shape[1:])
    if misalign:
        buffer = torch.full((math.prod(shape) + 1,), fill, dtype=out_dtype)
        flat = buffer[1:]
    else:
        flat = torch.full((math.prod(shape),), fill, dtype=out_dtype)
    if channels_last:            # the storage order of a channels-last [N, C, H, W] tensor
        n, c, h, w = shape
        out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
        assert out.numel() == 0 or out.is_contiguous(memory_format=memory_format)
    else:
        out = flat.view(shape)
    channels, spatial = (x.shape[1], x.shape[2] * x.shape[3]) if channels_last else (1, num_elements)
    x32 = x.contiguous()
    path = ops.extension.cuda_kernels.noisy_draws_on_host(
        x32.data_ptr(), keys.data_ptr(), first.data_ptr(), flat.data_ptr(), batch, num_elements, reps,
        float(sigma), seed, ops.extension.DTYPE_CODES[out_dtype], bool(channels_last), channels, spatial)
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


# The one NaN of each output dtype (csrc/kernels.h): the GPU's arithmetic gives 0x7FFFFFFF and
# its conversions 0x7FFF, x86 keeps an input NaN's sign and payload; every implementation
# writes these instead.
CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def with_nans(x):
    """x with NaNs of several signs and payloads (quiet, signalling, negative) in every row."""
    x = x.clone()
    flat = x.view(x.shape[0], -1).view(torch.int32)
    for j, pattern in enumerate([0x7FC00000, -0x00400000, 0x7F800001, -1, 0x7FC0DEAD]):  # -: sign bit set
        flat[:, (7 * j + 1) % flat.shape[1]] = pattern
    return x


@pytest.mark.parametrize("out_dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,channels_last,misalign,path", CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}{'-cl' if c[1] else ''}{'-misaligned' if c[2] else ''}"
                              for c in CASES])
def test_a_nan_input_gives_the_one_canonical_nan_on_every_path(out_dtype, shape, channels_last, misalign, path):
    x, keys, first = inputs(2, shape, seed=11)
    x = with_nans(x)
    got, taken = on_host(x, keys, first, 3, 0.37, 12345, out_dtype, channels_last, misalign, fill=2.0)
    cpu = ops.noisy_draws(x, keys, first, 3, 0.37, 12345, out_dtype, channels_last)
    ref = ops.reference_noisy_draws(x, keys, first, 3, 0.37, 12345, out_dtype, channels_last)
    assert taken == path
    got, cpu, ref = (t.contiguous().view(BITS[out_dtype]) for t in (got, cpu, ref))
    assert torch.equal(got, cpu) and torch.equal(cpu, ref)
    nan = torch.isnan(x.repeat_interleave(3, dim=0))   # (the outputs' logical order)
    assert nan.any() and (got[nan] == CANONICAL_NAN[out_dtype]).all()


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
    path = ops.extension.cuda_kernels.noisy_draws_discrete_on_host(
        v.data_ptr(), keys.data_ptr(), first.data_ptr(), flat.data_ptr(), batch, num_elements, reps,
        thresholds.data_ptr(), thresholds.shape[0] // 2, guide.data_ptr(), guide.shape[0].bit_length() - 1,
        float(table.grid), seed, ops.extension.DTYPE_CODES[out_dtype], bool(channels_last), channels, spatial)
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
        assert ops.extension.cuda_kernels.fast_div(ns, d) == [n // d for n in ns], d


# ------------------------------------------------------------------ vote_
from test_ops import _decision_gap, _logits, _per_draw_labels  # noqa: E402

# The block kernel's shared memory (csrc/cuda/vote.cu): 32 bytes static (its reductions'
# scratch, `ptxas -v`); the dynamic part may use the rest of the device's opt-in limit per
# block (cudaDevAttrMaxSharedMemoryPerBlockOptin), or 48 KiB less the static part without the
# opt-in. `room` is that dynamic budget: the launch plans within it, the host runs within it.
STATIC_SHARED = 32
ROOM = {"48K": 48 * 1024 - STATIC_SHARED, "A100": 166_912 - STATIC_SHARED, "H100": 232_448 - STATIC_SHARED}
THREAD_16, THREAD_32, BLOCK = 16, 32, 0  # VotePlan.kernel


def host_vote(logits, rows, counts, agg, weights, room=ROOM["H100"]):
    """The CUDA kernels' per-draw votes on the host, as `room` makes the launch plan them;
    returns the plan (kernel, dynamic shared bytes, we/logit classes a chunk)."""
    logits_c, rows_c, weights_c = logits.contiguous(), rows.contiguous(), weights.contiguous()
    members, draws, classes = logits.shape
    return ops.extension.cuda_kernels.vote_on_host(logits_c.data_ptr(), ops.extension.DTYPE_CODES[logits.dtype], members, draws, classes,
                                    rows_c.data_ptr(), counts.data_ptr(), counts.shape[0], ops.AGGREGATION_CODES[agg],
                                    weights_c.data_ptr(), room)


def host_vote_in(room):
    return lambda logits, rows, counts, agg, weights: host_vote(logits, rows, counts, agg, weights, room)


def plan(members, classes, agg, room):
    """The launch plan alone (no draw to run)."""
    logits = torch.zeros(members, 0, classes)
    return host_vote(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(1, classes, dtype=torch.int64), agg,
                     torch.ones(members), room)


def assert_labels_match(vote, logits, agg, weights):
    """Each draw's label: the reference's and the CPU kernel's, except at near-ties."""
    ours = _per_draw_labels(vote, logits, agg, weights)
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    for other in (ops.reference_vote_, ops.vote_):
        want = _per_draw_labels(other, logits, agg, weights)
        differ = (ours != want) & ~near_tie
        assert not differ.any(), f"draws {differ.nonzero().flatten().tolist()} differ from {other.__name__}"
    assert (ours >= 0).all()
    return ours


SMALL_SHAPES = [(1, 37, 10), (3, 101, 10), (8, 53, 10), (3, 41, 1), (5, 64, 3), (3, 200, 16), (2, 150, 17),
                (4, 90, 32)]


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("dtype", ops.LOGIT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("members,draws,classes", SMALL_SHAPES)
def test_few_classes_vote_matches_the_reference(agg, dtype, members, draws, classes):
    logits = _logits(members, draws, classes, dtype, seed=members * 1000 + draws + classes)
    weights = torch.rand(members, generator=torch.Generator().manual_seed(draws)) + 0.2
    assert plan(members, classes, agg, ROOM["H100"])[0] == (THREAD_16 if classes <= 16 else THREAD_32)
    assert_labels_match(host_vote, logits, agg, weights)


# the block kernel: K > 32, its score row whole (every dtype), or in chunks where `room` is small
BLOCK_SHAPES = [(1, 20, 33), (3, 40, 33), (3, 30, 100), (8, 12, 257), (2, 23, 1000)]
BLOCK_CASES = ([(shape, dtype, ROOM["H100"]) for shape in BLOCK_SHAPES + [(5, 9, 4099)] for dtype in ops.LOGIT_DTYPES]
               + [(shape, torch.float32, room) for shape in BLOCK_SHAPES for room in (1024, 4 * 33)])


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("shape,dtype,room", BLOCK_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}" for c in BLOCK_CASES])
def test_more_classes_vote_matches_the_reference(agg, shape, dtype, room):
    members, draws, classes = shape
    logits = _logits(members, draws, classes, dtype, seed=members * 1000 + draws + classes)
    weights = torch.rand(members, generator=torch.Generator().manual_seed(draws)) + 0.2
    kernel, dynamic, chunk = host_vote(logits, torch.zeros(draws, dtype=torch.int64),
                                       torch.zeros(1, classes, dtype=torch.int64), agg, weights, room)
    assert kernel == BLOCK and dynamic <= room
    if agg in ("we", "logit"):
        assert chunk == min(classes, room // 4) and dynamic == 4 * chunk
    else:   # mme keeps no row, mv one (label, weight) pair a member
        assert dynamic == (12 * members if agg == "mv" else 0)
    assert_labels_match(host_vote_in(room), logits, agg, weights)


def planted(members, classes, chunk, seed=0):
    """Draws whose winners sit where a chunked row can go wrong: the last class; each side of
    the first chunk boundary; an exact tie across it, and between the first and last class
    (ties go to the smaller class: every member's logits are equal there); a random draw.
    Returns (logits, the labels expected, except -1 for the random draw)."""
    gen = torch.Generator().manual_seed(seed)
    spots = [classes - 1, min(chunk, classes - 1), max(chunk - 1, 0), classes // 2]
    ties = [(max(chunk - 1, 0), min(chunk, classes - 1)), (0, classes - 1)]
    draws = len(spots) + len(ties) + 1
    logits = torch.randn(members, draws, classes, generator=gen)
    expected = []
    for r, k in enumerate(spots):
        logits[:, r, k] += 9.0
        expected.append(k)
    for j, (a, b) in enumerate(ties):
        r = len(spots) + j
        logits[:, r, a] = logits[:, r, b] = 12.0 + j
        expected.append(min(a, b))
    expected.append(-1)
    return logits, torch.tensor(expected)


# The class counts at which the kernel of 2026-11-26 failed, at and past each limit: mv at
# 6141-6144 and we/logit/mme at 12281-12288 (the opt-in above 48 KiB forgot the 32 static
# bytes), mv from 20,861 (A100) and 29,053 (H100), the others from 41,721 / 58,105 (a row
# past a block's shared memory); ImageNet-21k's 21,841. Each runs at the room of the GPU
# whose limit it probes, and of the others.
BOUNDARIES = [(6140, "48K"), (6141, "48K"), (6144, "48K"), (12280, "48K"), (12281, "48K"), (12288, "48K"),
              (20860, "A100"), (20861, "A100"), (21841, "A100"), (29052, "H100"), (29053, "H100"),
              (41720, "A100"), (41721, "A100"), (58104, "H100"), (58105, "H100"), (100_003, "A100")]


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("classes,gpu", BOUNDARIES, ids=[f"{k}-{g}" for k, g in BOUNDARIES])
def test_any_number_of_classes_at_each_shared_memory_boundary(agg, classes, gpu):
    room = ROOM[gpu]
    members = 3
    kernel, dynamic, chunk = plan(members, classes, agg, room)
    assert kernel == BLOCK and dynamic + STATIC_SHARED <= room + STATIC_SHARED   # within the opt-in limit
    if agg in ("we", "logit"):
        assert chunk == min(classes, room // 4)
        assert (chunk < classes) == (classes > room // 4)                        # chunked past the limit
    logits, expected = planted(members, classes, chunk if chunk else classes // 3, seed=classes)
    weights = torch.tensor([0.5, 0.3, 0.2])
    labels = assert_labels_match(host_vote_in(room), logits, agg, weights)
    assert torch.equal(labels[expected >= 0], expected[expected >= 0])


@pytest.mark.parametrize("agg", ["we", "logit"])
@pytest.mark.parametrize("chunk", [1, 2, 31, 127, 128, 129, 500, 999, 1000])
def test_every_chunk_size_finds_the_first_largest_score(agg, chunk):
    """Chunks of 1 class up to the whole row (1000), each boundary crossed by a winner or a tie."""
    logits, expected = planted(2, 1000, chunk, seed=chunk)
    labels = assert_labels_match(host_vote_in(4 * chunk), logits, agg, torch.tensor([0.7, 0.4]))
    assert torch.equal(labels[expected >= 0], expected[expected >= 0])
    assert plan(2, 1000, agg, 4 * chunk)[2] == chunk


def test_majority_vote_keeps_a_pair_a_member_whatever_the_classes():
    """mv's shared memory is 12 bytes a member (label, summed weight), not a row of classes:
    100,000 classes fit 48 KiB; more members than the room holds is a clear error."""
    assert plan(5, 100_000, "mv", ROOM["48K"]) == (BLOCK, 60, 0)
    assert plan(10, 40, "mv", 120)[1] == 120
    with pytest.raises(ValueError, match="11 members need 132 bytes"):
        plan(11, 40, "mv", 120)


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("classes,room", [(10, ROOM["H100"]), (100, ROOM["H100"]), (100, 4 * 9)],
                         ids=["thread", "block", "block-chunks"])
def test_vote_ties_non_finite_and_rows(agg, classes, room):
    """Exact ties go to the smaller class (and, in mme, member); a draw with a NaN or inf
    logit casts no vote; votes land in their draw's row; a zero weight is allowed."""
    vote = host_vote_in(room)
    logits = _logits(3, 60, classes, torch.float32, seed=5)
    logits[:, 0] = 1.0                      # every class tied in every member
    logits[:, 1, :] = 0.0
    logits[:, 1, 7] = logits[:, 1, 3] = 2.0  # classes 3 and 7 tied at the top
    logits[1, 2, 4] = float("nan")
    logits[2, 3, 0] = float("inf")
    logits[0, 4, 9] = -float("inf")
    weights = torch.tensor([1.0, 0.0, 0.5])
    rows = torch.arange(60) // 7
    ours = torch.zeros(9, classes, dtype=torch.int64)
    ref = torch.zeros(9, classes, dtype=torch.int64)
    vote(logits, rows, ours, agg, weights)
    ops.reference_vote_(logits, rows, ref, agg, weights)
    labels = _per_draw_labels(vote, logits, agg, weights)
    assert labels[0] == 0 and labels[1] == 3
    assert (labels[2:5] == -1).all() and ours.sum() == 57
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    want = _per_draw_labels(ops.reference_vote_, logits, agg, weights)
    assert not ((labels != want) & ~near_tie).any()
    if not near_tie[5:].any():
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("classes", [10, 100])
def test_majority_vote_sums_weights_in_double_as_the_cpu_kernel(classes):
    """0.1 + 0.2 ties 0.3 in float32 but not in float64: the CPU kernel and the reference sum
    in float64 and give class 1; so must the CUDA kernels."""
    logits = torch.zeros(3, 1, classes)
    logits[0, 0, 0] = logits[1, 0, 0] = 5.0      # members 0 and 1 vote class 0
    logits[2, 0, 1] = 5.0                         # member 2 votes class 1
    weights = torch.tensor([0.1, 0.2, 0.3])
    for vote in (host_vote, ops.vote_, ops.reference_vote_):
        counts = torch.zeros(1, classes, dtype=torch.int64)
        vote(logits, torch.zeros(1, dtype=torch.int64), counts, "mv", weights)
        assert counts[0].tolist() == [0, 1] + [0] * (classes - 2), vote


@pytest.mark.parametrize("classes,room", [(10, ROOM["H100"]), (100, ROOM["H100"]), (100, 4 * 9)])
@pytest.mark.parametrize("agg", ["we", "logit", "mv"])
def test_nan_scores_do_not_vote_past_the_row(agg, classes, room):
    """NaN weights (the op checks them on the CPU, not on CUDA) make every score NaN: the vote
    stays in the draw's row instead of landing in the next row -- class 0 (no score wins), or
    for mv the smallest class no member voted for (at -1, it beats the NaN sums)."""
    logits = torch.randn(2, 4, classes)
    counts = torch.zeros(2, classes, dtype=torch.int64)
    weights = torch.tensor([float("nan"), float("nan")])
    host_vote(logits, torch.tensor([1, 1, 1, 1]), counts, agg, weights, room)
    assert counts[1].sum() == 4 and counts.sum() == 4
    for r in range(4):
        voted = set(logits[:, r].argmax(1).tolist())
        want = min(set(range(classes)) - voted) if agg == "mv" else 0
        assert counts[1, want] >= 1


@pytest.mark.parametrize("classes", [10, 100])
def test_majority_vote_with_zero_weights_picks_a_voted_class(classes):
    """Members 0 and 1 (weight 0) vote class 5 and 7, member 2 (weight 0) too: every sum is
    0, and the winner is the smallest voted class, not class 0, in every implementation."""
    logits = torch.zeros(3, 1, classes)
    logits[0, 0, 5] = logits[1, 0, 7] = logits[2, 0, 7] = 5.0
    for vote in (host_vote, ops.vote_, ops.reference_vote_):
        counts = torch.zeros(1, classes, dtype=torch.int64)
        vote(logits, torch.zeros(1, dtype=torch.int64), counts, "mv", torch.zeros(3))
        assert int(counts[0].argmax()) == 5, vote


@pytest.mark.parametrize("classes", [4, 10, 17, 20, 32, 33, 100])
def test_majority_vote_with_negative_weights_agrees_everywhere(classes):
    """The raw op takes negative weights (the public Ensemble refuses them): every class
    starts at -1, a vote sets its class to max(score, 0) + weight. The CPU kernel's row path
    (K > 16) once summed from 0 and never let an unvoted class win; now the CPU kernel, both
    CUDA kernels (run on the host) and the reference pick the same class."""
    gen = torch.Generator().manual_seed(classes)
    members, draws = 5, 200
    logits = torch.randn(members, draws, min(classes, 4), generator=gen)   # few distinct labels
    logits = torch.cat([logits, torch.full((members, draws, classes - logits.shape[2]), -9.0)], dim=2)
    cases = [torch.tensor(w) for w in ([-2.0, -2.0, -2.0, -2.0, -2.0], [-0.5, -0.5, 1.0, -3.0, 0.25],
                                       [-1.0, 0.0, -1.0, 0.0, -0.0], [0.5, -0.7, 0.2, -0.1, -2.5])]
    cases.append(torch.randn(members, generator=gen) * 2)
    for weights in cases:
        want = _per_draw_labels(ops.reference_vote_, logits, "mv", weights)
        for vote in (ops.vote_, host_vote):
            got = _per_draw_labels(vote, logits, "mv", weights)
            assert torch.equal(got, want), (vote, weights)
    # one member voting class 2 at weight -2: class 0, never voted for, is at -1 and wins
    one = torch.full((1, 1, classes), -9.0)
    one[0, 0, 2] = 5.0
    for vote in (ops.vote_, host_vote, ops.reference_vote_):
        assert int(_per_draw_labels(vote, one, "mv", torch.tensor([-2.0]))[0]) == 0, vote


@pytest.mark.parametrize("classes,room", [(10, ROOM["H100"]), (100, ROOM["H100"]), (100, 4 * 9)])
def test_a_row_out_of_range_casts_no_vote(classes, room):
    """The op does not range-check rows on CUDA (it would sync): the kernel drops such a vote
    instead of writing outside counts."""
    logits = torch.randn(2, 6, classes)
    counts = torch.zeros(2, classes, dtype=torch.int64)
    host_vote(logits, torch.tensor([0, 1, -1, 2, 5, 1]), counts, "we", torch.ones(2), room)
    assert counts.sum() == 3


# ------------------------------------------------------------------ the same on a GPU
@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("classes,gpu", BOUNDARIES, ids=[f"{k}-{g}" for k, g in BOUNDARIES])
def test_cuda_vote_any_number_of_classes(cuda_device, agg, classes, gpu):
    """The boundary sizes on the device (its own room): counts equal to the CPU kernel's for
    draws with clear winners and exact ties; the planted labels where they are certain."""
    logits, expected = planted(3, classes, min(classes - 1, ROOM[gpu] // 4), seed=classes)
    weights = torch.tensor([0.5, 0.3, 0.2])
    rows = torch.arange(logits.shape[1])
    cpu = torch.zeros(len(rows), classes, dtype=torch.int64)
    ops.vote_(logits, rows, cpu, agg, weights)
    gpu_counts = torch.zeros_like(cpu, device=cuda_device)
    ops.vote_(logits.to(cuda_device), rows.to(cuda_device), gpu_counts, agg, weights.to(cuda_device))
    got = gpu_counts.cpu()
    labels = got.argmax(1)
    assert torch.equal(labels[expected >= 0], expected[expected >= 0]) and int(got.sum()) == len(rows)
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    assert not ((labels != cpu.argmax(1)) & ~near_tie).any()


def test_cuda_vote_threads_with_different_class_counts(cuda_device):
    """Threads launching the block kernel with small and large rows at once: none may lower
    the shared-memory limit another's launch needs (it is set once, to the device's most)."""
    import threading

    errors = []

    def run(classes):
        try:
            for _ in range(20):
                logits, expected = planted(2, classes, classes // 2, seed=classes)
                counts = torch.zeros(logits.shape[1], classes, dtype=torch.int64, device=cuda_device)
                ops.vote_(logits.to(cuda_device), torch.arange(logits.shape[1], device=cuda_device), counts, "we",
                          torch.ones(2, device=cuda_device))
                labels = counts.cpu().argmax(1)
                assert torch.equal(labels[expected >= 0], expected[expected >= 0])
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in (100, 13_000, 40_000, 60_000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
