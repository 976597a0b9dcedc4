"""drt_fast.ops' sampling ops, noisy_draws (ops/noise.py) and vote_ (ops/vote.py): the C++
kernels against the pure-torch references (ops/reference.py), their checks (ops/checks.py),
opcheck, compile. The dense members' ops are in test_dense_chain.py, the CIFAR ResNet
kernel's in test_cifar_resnet_kernel.py, loading and the reference switch in
test_ops_extension.py."""
import pytest
import torch

from drt_fast import ops
from drt_fast.errors import DrtFastError
from drt_fast.ops.extension import cpu_kernels


def _supported_isas():
    found, current = [], cpu_kernels.cpu_isa()
    for isa in ("baseline", "avx2", "avx512"):
        try:
            cpu_kernels.set_cpu_isa(isa)
            found.append(isa)
        except ValueError:
            pass
    cpu_kernels.set_cpu_isa(current)
    return found


ISAS = _supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with each CPU kernel build this machine supports."""
    previous = cpu_kernels.cpu_isa()
    cpu_kernels.set_cpu_isa(request.param)
    yield request.param
    cpu_kernels.set_cpu_isa(previous)


def _inputs(batch, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=gen)
    keys = torch.randint(0, 2**40, (batch,), generator=gen)
    first = torch.randint(0, 10_000, (batch,), generator=gen)
    return x, keys, first


# ---------------------------------------------------------------------------------------
# noisy_draws
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", ops.NOISE_DTYPES)
@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7), False), ((3, 5, 7), True), ((1, 8, 8), True),
                                                 ((13,), False), ((1,), False), ((2, 2, 2, 3), False)])
def test_noisy_draws_matches_reference_bitwise(isa, out_dtype, shape, channels_last):
    x, keys, first = _inputs(3, shape)
    args = (x, keys, first, 7, 0.37, 2**40 + 5, out_dtype, channels_last)
    ours, ref = ops.noisy_draws(*args), ops.reference_noisy_draws(*args)
    assert ours.dtype == out_dtype and ours.shape == (21, *shape)
    assert ours.stride() == ref.stride()
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(ours, ref)


_NAN_BITS = {torch.float32: (torch.int32, 0x7FC00000), torch.bfloat16: (torch.int16, 0x7FC0),
             torch.float16: (torch.int16, 0x7E00)}


@pytest.mark.parametrize("out_dtype", ops.NOISE_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_noisy_draws_writes_one_nan_pattern(isa, out_dtype, channels_last):
    """A NaN input, whatever its sign and payload, gives the dtype's one canonical NaN
    (csrc/kernels.h), in the kernel and the reference: a GPU's arithmetic and conversions
    write other bits (0x7FFFFFFF, 0x7FFF) than x86's, which keep the input's."""
    x, keys, first = _inputs(2, (3, 4, 4))
    x.view(torch.int32).view(2, -1)[:, [0, 5, 17, 30]] = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001, -1],
                                                                       dtype=torch.int32)
    args = (x, keys, first, 3, 0.37, 11, out_dtype, channels_last)
    view, bits = _NAN_BITS[out_dtype]
    ours, ref = (t.contiguous().view(view) for t in (ops.noisy_draws(*args), ops.reference_noisy_draws(*args)))
    assert torch.equal(ours, ref)
    nan = torch.isnan(x.repeat_interleave(3, dim=0))
    assert int(nan.sum()) == 24 and (ours[nan] == bits).all()


def test_noisy_draws_rows_are_input_plus_noise():
    x, keys, first = _inputs(4, (2, 3, 3))
    out = ops.noisy_draws(x, keys, first, 5, 0.0, 0)
    assert torch.equal(out, x.repeat_interleave(5, dim=0))  # sigma 0: exact copies
    noise = ops.noisy_draws(torch.zeros_like(x), keys, first, 5, 1.0, 0)
    scaled = ops.noisy_draws(x, keys, first, 5, 0.5, 0)
    torch.testing.assert_close(scaled, x.repeat_interleave(5, 0) + 0.5 * noise, rtol=0, atol=1e-6)


def test_noisy_draws_is_invariant_to_batching():
    x, keys, first = _inputs(6, (3, 4, 4))
    whole = ops.noisy_draws(x, keys, first, 10, 0.5, 3)
    # one input at a time, and its draws in two pieces (first_draw shifted)
    for b in range(6):
        one = ops.noisy_draws(x[b:b + 1], keys[b:b + 1], first[b:b + 1], 10, 0.5, 3)
        assert torch.equal(one, whole[b * 10:(b + 1) * 10])
        head = ops.noisy_draws(x[b:b + 1], keys[b:b + 1], first[b:b + 1], 4, 0.5, 3)
        tail = ops.noisy_draws(x[b:b + 1], keys[b:b + 1], first[b:b + 1] + 4, 6, 0.5, 3)
        assert torch.equal(torch.cat([head, tail]), one)
    # the same input twice in one batch, at different draws
    twice = ops.noisy_draws(x[[2, 2]], keys[[2, 2]], torch.stack([first[2], first[2] + 5]), 5, 0.5, 3)
    assert torch.equal(twice, whole[20:30])


def test_noisy_draws_depends_on_seed_key_and_draw():
    x, keys, first = _inputs(2, (16,))
    base = ops.noisy_draws(x, keys, first, 2, 1.0, 11)
    for other in (ops.noisy_draws(x, keys, first, 2, 1.0, 12), ops.noisy_draws(x, keys + 1, first, 2, 1.0, 11),
                  ops.noisy_draws(x, keys, first + 2, 2, 1.0, 11)):
        assert not torch.isclose(base, other).any()


def test_noisy_draws_accepts_other_input_dtypes():
    x, keys, first = _inputs(2, (3, 4, 4))
    ref = ops.noisy_draws(x, keys, first, 3, 0.25, 1)
    assert torch.equal(ops.noisy_draws(x.double(), keys, first, 3, 0.25, 1), ref)  # float64 -> fp32 output
    half = x.half()
    out = ops.noisy_draws(half, keys, first, 3, 0.25, 1)
    assert out.dtype == torch.float16
    assert torch.equal(out, ops.noisy_draws(half.float(), keys, first, 3, 0.25, 1, torch.float16))
    cl = x.contiguous(memory_format=torch.channels_last)  # a channels-last input reads the same values
    assert torch.equal(ops.noisy_draws(cl, keys, first, 3, 0.25, 1), ref)
    # float64 pixels that fp32 cannot hold: rounded to fp32 first, then summed in fp32 (a float64
    # sum rounded once differs in the last bit for some elements), by the kernel and the reference
    fine = x.double() + torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-8
    want = ops.noisy_draws(fine.float(), keys, first, 3, 0.25, 1)
    assert torch.equal(ops.noisy_draws(fine, keys, first, 3, 0.25, 1), want)
    assert torch.equal(ops.reference_noisy_draws(fine, keys, first, 3, 0.25, 1), want)


def test_noisy_draws_gradient_sums_over_draws():
    x, keys, first = _inputs(3, (2, 3, 3))
    x.requires_grad_(True)
    out = ops.noisy_draws(x, keys, first, 4, 0.5, 0)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.view(3, 4, 2, 3, 3).sum(1))


def test_noisy_draws_is_torch_op():
    x, keys, first = _inputs(2, (3, 2, 2))
    assert torch.equal(torch.ops.drt_fast.noisy_draws(x, keys, first, 3, 0.5, 9),
                       ops.noisy_draws(x, keys, first, 3, 0.5, 9))


@pytest.mark.parametrize("channels_last", [False, True])
def test_noisy_draws_opcheck(channels_last):
    x, keys, first = _inputs(2, (3, 4, 5))
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.drt_fast.noisy_draws.default, (x, keys, first, 3, 0.5, 9),
                          {"out_dtype": torch.bfloat16 if channels_last else None, "channels_last": channels_last})


# ---------------------------------------------------------------------------------------
# vote_
# ---------------------------------------------------------------------------------------
def _logits(members, draws, classes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(members, draws, classes, generator=gen) * 3).to(dtype)


def _per_draw_labels(vote, logits, agg, weights):
    """Label of every draw (-1: not counted), by voting each draw into its own counts row."""
    draws, classes = logits.shape[1], logits.shape[2]
    counts = torch.zeros(draws, classes, dtype=torch.int64)
    vote(logits, torch.arange(draws), counts, agg, weights)
    labels = counts.argmax(1)
    labels[counts.sum(1) == 0] = -1
    assert counts.sum(1).max() <= 1
    return labels


def _decision_gap(logits, agg, weights):
    """Per draw, how close the decision is to a tie (float64): the margin that rounding could flip.

    Exact ties between a member's own logits are not near-ties: the logits are exact inputs and
    every implementation breaks them toward the smaller class index.
    """
    z, w = logits.double(), weights.double()[:, None, None]
    members, draws, classes = z.shape
    if classes == 1:
        return torch.full((draws,), float("inf"), dtype=torch.float64)

    def top2_gap(score):
        top = score.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    def member_gap():  # how close each member is to changing its own argmax
        gap = top2_gap(z)
        return torch.where(gap == 0, torch.full_like(gap, float("inf")), gap).min(0).values

    if agg == "we":
        return top2_gap((w * torch.softmax(z, 2)).sum(0))
    if agg == "logit":
        return top2_gap((w * z).sum(0))
    if agg == "mv":
        return member_gap()
    margins = torch.softmax(z, 2).topk(2, 2).values  # mme: the members' margins, and their own argmaxes
    margin = margins[..., 0] - margins[..., 1]  # [M, R]
    decider_gap = top2_gap(margin.T) if members > 1 else torch.full((draws,), float("inf"), dtype=torch.float64)
    return torch.minimum(decider_gap, member_gap())


SHAPES = [(1, 37, 10), (3, 101, 10), (8, 53, 10), (3, 41, 1), (2, 23, 1000), (8, 7, 1000), (5, 64, 3),
          # several 256-draw column blocks with a partial last one; the column path's widest
          # K (16) and the row path's narrowest (17)
          (4, 700, 10), (3, 513, 16), (2, 300, 17)]


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("dtype", ops.LOGIT_DTYPES)
@pytest.mark.parametrize("members,draws,classes", SHAPES)
def test_vote_matches_reference(isa, agg, dtype, members, draws, classes):
    logits = _logits(members, draws, classes, dtype, seed=members * 1000 + draws + classes)
    weights = torch.rand(members, generator=torch.Generator().manual_seed(draws)) + 0.2  # non-uniform
    ours = _per_draw_labels(ops.vote_, logits, agg, weights)
    ref = _per_draw_labels(ops.reference_vote_, logits, agg, weights)
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    differ = ours != ref
    assert not (differ & ~near_tie).any(), f"draws {differ.nonzero().flatten().tolist()} differ and are no near-ties"
    assert near_tie.float().mean() < 0.05  # near-ties are rare, so the comparison means something


@pytest.mark.parametrize("vote", [ops.vote_, ops.reference_vote_], ids=["kernel", "reference"])
@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
def test_vote_counts_into_rows(vote, agg):
    members, draws, classes, batch = 3, 999, 10, 7
    logits = _logits(members, draws, classes, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(6)
    rows = torch.randint(0, batch, (draws,), generator=gen)
    weights = torch.rand(members, generator=gen) + 0.1
    counts = torch.randint(0, 5, (batch, classes), generator=gen)  # votes add to what is there
    expected = counts.clone()
    labels = _per_draw_labels(vote, logits, agg, weights)
    expected.index_put_((rows, labels), torch.ones(draws, dtype=torch.int64), accumulate=True)
    vote(logits, rows, counts, agg, weights)
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("vote", [ops.vote_, ops.reference_vote_], ids=["kernel", "reference"])
@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("dtype", ops.LOGIT_DTYPES)
def test_vote_skips_non_finite_draws(vote, agg, dtype):
    logits = _logits(3, 20, 10, dtype, seed=8)
    logits[0, 2, 3] = float("nan")
    logits[2, 5, 9] = float("inf")
    logits[1, 7, 0] = -float("inf")
    labels = _per_draw_labels(vote, logits, agg, torch.ones(3))
    assert (labels[[2, 5, 7]] == -1).all()
    assert (labels[[0, 1, 3, 4, 6]] >= 0).all()
    # the same in a later 256-draw column block of a long batch (CPU kernel: few classes)
    long = _logits(3, 600, 10, dtype, seed=9)
    long[1, 300, 4] = float("nan")
    long[2, 599, 0] = float("inf")
    labels = _per_draw_labels(vote, long, agg, torch.ones(3))
    assert (labels[[300, 599]] == -1).all() and (labels[:300] >= 0).all()
    assert (labels[301:599] >= 0).all()


@pytest.mark.parametrize("vote", [ops.vote_, ops.reference_vote_], ids=["kernel", "reference"])
@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
def test_vote_ties_go_to_the_smaller_index(vote, agg):
    equal = torch.zeros(3, 4, 6)  # every class tied in every member
    assert (_per_draw_labels(vote, equal, agg, torch.ones(3)) == 0).all()
    # member 0 says class 2, member 1 class 0, with exactly equal margins (the exps of -200 vanish
    # next to 1 in any order of summation): mme takes member 0, the other modes tie -> class 0
    logits = torch.tensor([[[-200.0, -200.0, 0.0]], [[0.0, -200.0, -200.0]]])
    label = int(_per_draw_labels(vote, logits, agg, torch.ones(2))[0])
    assert label == (2 if agg == "mme" else 0)


@pytest.mark.parametrize("vote", [ops.vote_, ops.reference_vote_], ids=["kernel", "reference"])
def test_mv_at_zero_weights_a_class_no_member_voted_for_never_wins(vote):
    # member 0 votes 3, member 1 votes 2; classes 0 and 1 got no vote. At zero weights the
    # voted classes tie at 0 (the smaller, 2, wins), the unvoted ones stay below.
    logits = torch.tensor([[[0.0, 1.0, 0.0, 5.0]], [[0.0, 0.0, 3.0, 0.0]]])
    for weights, label in [([0.0, 0.0], 2), ([0.0, 1.0], 2), ([1.0, 0.0], 3)]:
        assert int(_per_draw_labels(vote, logits, "mv", torch.tensor(weights))[0]) == label


@pytest.mark.parametrize("classes", [10, 16, 17, 40])
def test_mv_with_negative_weights_agrees_with_the_reference(isa, classes):
    """The raw op takes negative weights (the public Ensemble refuses them). Every class starts
    at -1 and a vote sets its class to max(score, 0) + weight, in the column path (K <= 16),
    the row path (K > 16, which once summed from 0 and never let an unvoted class win) and
    the reference alike."""
    gen = torch.Generator().manual_seed(classes)
    members, draws = 5, 300
    logits = torch.randn(members, draws, 4, generator=gen)   # 4 labels voted for, at most
    logits = torch.cat([logits, torch.full((members, draws, classes - 4), -9.0)], dim=2)
    for weights in ([-2.0] * 5, [-0.5, -0.5, 1.0, -3.0, 0.25], [-1.0, 0.0, -1.0, 0.0, -0.0],
                    torch.randn(members, generator=gen).mul(2).tolist()):
        weights = torch.tensor(weights)
        ours = _per_draw_labels(ops.vote_, logits, "mv", weights)
        assert torch.equal(ours, _per_draw_labels(ops.reference_vote_, logits, "mv", weights)), weights


def test_vote_weights_matter():
    # member 0 says class 0, members 1 and 2 say class 1
    logits = torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]], [[0.0, 5.0]]])
    heavy_first = torch.tensor([3.0, 1.0, 1.0])
    for agg in ("we", "logit", "mv"):
        assert int(_per_draw_labels(ops.vote_, logits, agg, torch.ones(3))[0]) == 1
        assert int(_per_draw_labels(ops.vote_, logits, agg, heavy_first)[0]) == 0


def test_vote_is_torch_op():
    logits = _logits(2, 9, 4, torch.float32, seed=1)
    counts = torch.zeros(1, 4, dtype=torch.int64)
    torch.ops.drt_fast.vote_(logits, torch.zeros(9, dtype=torch.int64), counts, "we", torch.ones(2))
    assert counts.sum() == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vote_opcheck(dtype):
    logits = _logits(3, 17, 5, dtype, seed=2)
    rows = torch.randint(0, 4, (17,), generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(4, 5, dtype=torch.int64)
    torch.library.opcheck(torch.ops.drt_fast.vote_.default, (logits, rows, counts, "mme", torch.ones(3)))


def test_ops_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def step(x, keys, first, counts, weights):
        noisy = torch.ops.drt_fast.noisy_draws(x, keys, first, 4, 0.5, 0)
        logits = noisy.flatten(1)[:, :3].unsqueeze(0)  # a stand-in "model": 3 classes, 1 member
        torch.ops.drt_fast.vote_(logits, torch.arange(8) // 4, counts, "we", weights)
        return noisy

    x, keys, first = _inputs(2, (1, 2, 2))
    counts = torch.zeros(2, 3, dtype=torch.int64)
    noisy = step(x, keys, first, counts, torch.ones(1))
    assert torch.equal(noisy, ops.noisy_draws(x, keys, first, 4, 0.5, 0))
    assert counts.sum() == 8


# ---------------------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------------------
def _noisy_ok():
    x, keys, first = _inputs(2, (1, 3, 3))
    return dict(x=x, keys=keys, first_draw=first, reps=3, sigma=0.5, seed=1)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(2, 3, dtype=torch.int64)), "x must be a floating tensor"),
    (dict(keys=torch.zeros(3, dtype=torch.int64)), "keys must have shape \\[2\\]"),
    (dict(keys=torch.zeros(2, dtype=torch.int32)), "keys must be int64"),
    (dict(first_draw=torch.zeros(2, 1, dtype=torch.int64)), "first_draw must have shape"),
    (dict(reps=0), "reps must be >= 1"),
    (dict(reps=2**40), "reps must be at most 2\\*\\*32"),
    (dict(reps=2**62), "reps must be at most 2\\*\\*32"),
    (dict(first_draw=torch.tensor([0, -1])), "draw indices must be >= 0 and stay below 2\\^32"),
    (dict(first_draw=torch.tensor([2**32 - 2, 0])), "got draws 4294967294 .. 4294967296"),
    (dict(sigma=-1.0), "sigma must be"),
    (dict(sigma=float("nan")), "sigma must be"),
    (dict(seed=-1), "seed must be in"),
    (dict(out_dtype=torch.float64), "out_dtype must be one of"),
    (dict(x=torch.zeros(2, 9), channels_last=True), "channels_last output needs a 4-d input"),
    (dict(x=torch.zeros(()).expand(2, 2**16, 2**16 + 1)), "at most 2\\*\\*32 elements"),  # a view: no memory
])
def test_noisy_draws_errors(change, message):
    kwargs = {**_noisy_ok(), **change}
    for fn in (ops.noisy_draws, ops.reference_noisy_draws):
        with pytest.raises(DrtFastError, match=message):
            fn(**kwargs)


def _vote_ok():
    return dict(logits=torch.zeros(2, 5, 3), rows=torch.zeros(5, dtype=torch.int64),
                counts=torch.zeros(4, 3, dtype=torch.int64), agg="we", weights=torch.ones(2))


@pytest.mark.parametrize("change,message", [
    (dict(logits=torch.zeros(5, 3)), "logits must have shape \\[M, R, K\\]"),
    (dict(logits=torch.zeros(2, 5, 3, dtype=torch.float64)), "logits must be float32, bfloat16 or float16"),
    (dict(rows=torch.zeros(4, dtype=torch.int64)), "rows must have shape \\[5\\]"),
    (dict(counts=torch.zeros(4, 3, dtype=torch.int32)), "counts must be int64"),
    (dict(counts=torch.zeros(4, 2, dtype=torch.int64)), "counts must have shape \\[B, 3\\]"),
    (dict(counts=torch.zeros(3, 4, dtype=torch.int64).T), "counts must be contiguous"),
    (dict(agg="mode"), "agg must be one of we, logit, mme, mv"),
    (dict(weights=torch.ones(3)), "weights must be float32 with shape \\[2\\]"),
    (dict(weights=torch.ones(2, dtype=torch.float64)), "weights must be float32"),
    (dict(weights=torch.tensor([1.0, float("nan")])), "weights must be finite"),
    (dict(weights=torch.tensor([float("inf"), 1.0])), "weights must be finite"),
])
def test_vote_errors(change, message):
    for fn in (ops.vote_, ops.reference_vote_):
        kwargs = {**_vote_ok(), **change}
        with pytest.raises(DrtFastError, match=message):
            fn(**kwargs)


@pytest.mark.parametrize("bad_row", [-1, 4])
def test_vote_rows_out_of_range_leave_counts_untouched(bad_row):
    for fn in (ops.vote_, ops.reference_vote_):
        kwargs = _vote_ok()
        kwargs["rows"] = torch.tensor([0, 1, 2, bad_row, 3])
        with pytest.raises(DrtFastError, match="rows must index counts' first dimension, in \\[0, 4\\)"):
            fn(**kwargs)
        assert kwargs["counts"].sum() == 0


# ---------------------------------------------------------------------------------------
# CUDA (run when a GPU and the CUDA kernels are present)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", ops.NOISE_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_noisy_draws_bitwise_equal_to_cpu(cuda_device, out_dtype, channels_last):
    x, keys, first = _inputs(5, (3, 9, 7))
    args = (7, 0.37, 2**40 + 5, out_dtype, channels_last)
    cpu = ops.noisy_draws(x, keys, first, *args)
    gpu = ops.noisy_draws(x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *args)
    assert gpu.stride() == cpu.stride()
    assert torch.equal(gpu.cpu(), cpu)


def test_cuda_known_normals(cuda_device):
    """tests/test_philox.py's known answers on the GPU (x = 0, sigma = 1: the output is the noise)."""
    from test_philox import KNOWN_NORMALS, f32_bits
    for (seed, key, draw, element), bits in KNOWN_NORMALS:
        x = torch.zeros(1, element + 1, device=cuda_device)
        out = ops.noisy_draws_eager(x, torch.tensor([key], device=cuda_device),
                                    torch.tensor([draw], device=cuda_device), 1, 1.0, seed)
        assert f32_bits(out[0, element].item()) == bits


@pytest.mark.parametrize("out_dtype", ops.NOISE_DTYPES)
@pytest.mark.parametrize("shape,channels_last", [((1, 8, 8), False), ((3, 32, 32), False), ((3, 32, 32), True),
                                                  ((2, 4, 6), True), ((4, 8, 8), True), ((3, 5, 7), True)])
def test_cuda_noisy_draws_fast_paths_bitwise_equal_to_cpu(cuda_device, out_dtype, shape, channels_last):
    """Shapes that take the CUDA kernel's vector and channels-last paths (csrc/cuda/noise.cu),
    and a misaligned input view, which falls back to scalar accesses."""
    x, keys, first = _inputs(3, shape)
    args = (37, 0.25, 99, out_dtype, channels_last)
    cpu = ops.noisy_draws(x, keys, first, *args)
    gpu = ops.noisy_draws(x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *args)
    assert gpu.stride() == cpu.stride() and torch.equal(gpu.cpu(), cpu)
    shifted = torch.empty(x.numel() + 1, device=cuda_device)[1:].view_as(x)   # 4 bytes off alignment
    shifted.copy_(x)
    gpu = ops.noisy_draws(shifted, keys.to(cuda_device), first.to(cuda_device), *args)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("out_dtype", ops.NOISE_DTYPES)
def test_cuda_noisy_draws_writes_the_cpu_nan_pattern(cuda_device, out_dtype):
    x, keys, first = _inputs(2, (3, 8, 8))
    x.view(torch.int32).view(2, -1)[:, [0, 5, 17, 30]] = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001, -1],
                                                                       dtype=torch.int32)
    args = (5, 0.3, 7, out_dtype)
    view = _NAN_BITS[out_dtype][0]
    cpu = ops.noisy_draws(x, keys, first, *args)
    gpu = ops.noisy_draws(x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *args)
    ref = ops.reference_noisy_draws(x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *args)
    assert torch.equal(gpu.cpu().view(view), cpu.view(view)) and torch.equal(ref.cpu().view(view), cpu.view(view))


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("classes", [10, 32, 100])
def test_cuda_vote_shared_rows_count_what_the_cpu_counts(cuda_device, agg, classes):
    """Many draws per row (the warp adds equal votes with one atomic), a draw count that is
    not a multiple of 32, non-finite draws; clear winners, so the counts must be equal."""
    gen = torch.Generator().manual_seed(classes)
    members, draws = 3, 1000 + 13
    logits = torch.randn(members, draws, classes, generator=gen)
    winners = torch.randint(0, classes, (draws,), generator=gen)
    logits[:, torch.arange(draws), winners] += 12.0
    logits[1, 5, 2] = float("nan")
    logits[0, 700, 0] = float("inf")
    rows = torch.arange(draws) // 7
    weights = torch.tensor([0.2, 0.5, 0.3])
    cpu = torch.zeros(int(rows[-1]) + 1, classes, dtype=torch.int64)
    ops.vote_(logits, rows, cpu, agg, weights)
    gpu = torch.zeros_like(cpu, device=cuda_device)
    ops.vote_(logits.to(cuda_device), rows.to(cuda_device), gpu, agg, weights.to(cuda_device))
    assert torch.equal(gpu.cpu(), cpu) and int(cpu.sum()) == draws - 2


@pytest.mark.parametrize("agg", ops.AGGREGATIONS)
@pytest.mark.parametrize("dtype", ops.LOGIT_DTYPES)
@pytest.mark.parametrize("members,draws,classes", SHAPES)
def test_cuda_vote_matches_reference(cuda_device, agg, dtype, members, draws, classes):
    logits = _logits(members, draws, classes, dtype, seed=members + draws + classes)
    weights = torch.rand(members, generator=torch.Generator().manual_seed(draws)) + 0.2
    gpu_vote = lambda lg, rows, counts, a, w: _on_cuda_vote(lg, rows, counts, a, w, cuda_device)  # noqa: E731
    ours = _per_draw_labels(gpu_vote, logits, agg, weights)
    ref = _per_draw_labels(ops.reference_vote_, logits, agg, weights)
    near_tie = _decision_gap(logits, agg, weights) < 1e-5
    assert not ((ours != ref) & ~near_tie).any()


def _on_cuda_vote(logits, rows, counts, agg, weights, device):
    counts_gpu = counts.to(device)
    ops.vote_(logits.to(device), rows.to(device), counts_gpu, agg, weights.to(device))
    counts.copy_(counts_gpu.cpu())


def test_eager_entry_points_are_the_ops_without_the_dispatcher():
    x, keys, first = _inputs(3, (1, 4, 4))
    args = (x, keys, first, 5, 0.3, 7, torch.bfloat16, True)
    assert torch.equal(ops.noisy_draws_eager(*args), ops.noisy_draws(*args))
    logits = torch.randn(3, 15, 4, generator=torch.Generator().manual_seed(1))
    rows = torch.arange(15) // 5
    a, b = torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64)
    ops.vote_eager_(logits, rows, a, "mme", torch.ones(3))
    ops.vote_(logits, rows, b, "mme", torch.ones(3))
    assert torch.equal(a, b) and a.sum() == 15
    with pytest.raises(DrtFastError, match="agg must be one of"):      # the same checks
        ops.vote_eager_(logits, rows, a, "median", torch.ones(3))
