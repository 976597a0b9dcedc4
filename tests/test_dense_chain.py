"""The CPU kernels of dense members (ops/dense.py: bias_act_, dense_chain) and the block
planner (fuse/planner.py: chain_plan): the plan against the matrices, the kernels against
the torch references in every ISA build, batch invariance, non-finite values, bad plans,
and the member's fallbacks."""
import pytest
import torch
from torch import nn

from drt_fast import fuse, ops
from drt_fast.errors import DrtFastError
from drt_fast.ops.extension import cpu_kernels

from test_fuse import member, rel_err
from test_ops import isa  # noqa: F401 -- the fixture: each CPU kernel build this machine has

pytestmark = pytest.mark.usefixtures("one_thread")


def chain(*widths, relu_last=False, seed=0, sparsity=0.0):
    """Random float32 layers ``[(W, b, relu)]`` of the given widths; ``sparsity``: the share
    of weights set to zero."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        w = torch.randn(n_in, n_out, generator=gen) / n_in ** 0.5
        w[torch.rand(n_in, n_out, generator=gen) < sparsity] = 0.0
        last = i == len(widths) - 2
        layers.append((w, torch.randn(n_out, generator=gen) * 0.1, relu_last if last else True))
    return layers


def torch_chain(layers, x):
    """What the plan must compute, in float64."""
    h = x.double()
    for w, b, relu in layers:
        h = h @ w.double() + b.double()
        if relu:
            h = h.relu()
    return h


def digits_layers():
    """The digits CNN's matrices: convolutions, mostly zeros (the case the blocks are for)."""
    out = fuse.dense_for_inference(member("digits_cnn"), torch.rand(1, 1, 8, 8)).module
    return fuse.chain_layers(out.plan())


def plan(layers):
    meta, params, _ = fuse.chain_plan(layers)
    return meta, params, layers[-1][0].shape[1]


CHAINS = {
    "digits cnn": digits_layers,
    "mlp, odd widths": lambda: chain(20, 33, 7),
    "one layer, no relu": lambda: chain(5, 3),
    "one layer, relu": lambda: chain(64, 40, relu_last=True),
    "deep, sparse": lambda: chain(50, 70, 90, 31, 12, sparsity=0.6),
}


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("rows", [1, 5, 47, 48, 49, 300])
def test_kernel_matches_the_matrices(isa, name, rows):
    layers = CHAINS[name]()
    meta, params, out_cols = plan(layers)
    x = torch.randn(rows, layers[0][0].shape[0], generator=torch.Generator().manual_seed(rows))
    got = ops.dense_chain_cpu(x, meta, params, out_cols)
    want = torch_chain(layers, x)
    assert got.shape == (rows, out_cols) and got.dtype == torch.float32
    assert rel_err(got.double(), want) < 1e-5
    reference = ops.reference_dense_chain(x, meta, params, out_cols)     # the same plan in torch
    assert rel_err(reference.double(), want) < 1e-5
    assert torch.equal(torch.ops.drt_fast.dense_chain(x, meta, params, out_cols), got)


def test_isa_builds_agree():
    layers = digits_layers()
    meta, params, out_cols = plan(layers)
    x = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    previous, outs = cpu_kernels.cpu_isa(), []
    try:
        for name in ("baseline", "avx2", "avx512"):
            try:
                cpu_kernels.set_cpu_isa(name)
            except ValueError:
                continue
            outs.append(ops.dense_chain_cpu(x, meta, params, out_cols))
    finally:
        cpu_kernels.set_cpu_isa(previous)
    assert all(rel_err(o, outs[0]) < 1e-6 for o in outs)


def test_rows_do_not_depend_on_the_batch(isa):
    """Each row is summed in a fixed order: a row alone, in a short tile or in a batch of
    any size gives the same bits (and any thread count: rows are split between threads)."""
    layers = digits_layers()
    meta, params, out_cols = plan(layers)
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(1))
    full = ops.dense_chain_cpu(x, meta, params, out_cols)
    for start, stop in [(0, 1), (3, 10), (17, 65), (500, 1000), (999, 1000)]:
        assert torch.equal(ops.dense_chain_cpu(x[start:stop], meta, params, out_cols), full[start:stop])
    for threads in (2, 16):          # 16: 1000 rows go in tiles of 24 rather than 48
        torch.set_num_threads(threads)
        assert torch.equal(ops.dense_chain_cpu(x, meta, params, out_cols), full)


def test_blocks_keep_every_weight_and_skip_the_zeros():
    """Blocks partition the columns; a block's band holds every nonzero of its columns; the
    digits CNN's convolutions need about half the multiply-adds of their matrices."""
    layers = digits_layers()
    for w, _, _ in layers[:-1]:
        groups = fuse.column_groups(w)
        columns = sorted(c for _, _, cols in groups for c in cols)
        assert columns == list(range(w.shape[1]))
        for lo, hi, cols in groups:
            outside = torch.cat([w[:lo, cols], w[hi:, cols]])
            assert not outside.any()
    out = fuse.dense_for_inference(member("digits_cnn"), torch.rand(1, 1, 8, 8)).module
    dense, blocked = out.chain_stats
    assert dense == 64 * 256 + 256 * 128 + 128 * 10 and blocked < 0.6 * dense
    assert "cpu kernel: 27,904 of 50,432 multiply-adds a row" in repr(out)


def test_dense_matrices_stay_one_block():
    w = torch.randn(40, 70)
    assert fuse.column_groups(w) == [(0, 40, list(range(70)))]


def test_dead_units_and_empty_layers():
    """All-zero columns (a dead unit), an all-zero matrix: the bias alone."""
    layers = chain(16, 40, 9)
    layers[0][0][:, 5:12] = 0.0
    layers[1][0].zero_()
    meta, params, out_cols = plan(layers)
    x = torch.randn(30, 16)
    got = ops.dense_chain_cpu(x, meta, params, out_cols)
    assert rel_err(got.double(), torch_chain(layers, x)) < 1e-6
    assert torch.equal(got, layers[1][1].expand(30, 9))


def test_non_finite_values_propagate(isa):
    """NaN and inf pass through as torch's relu passes them (the engine turns a non-finite
    logit into an error; the ReLU must not hide a NaN)."""
    layers = chain(8, 32, 4)
    meta, params, out_cols = plan(layers)
    x = torch.randn(10, 8)
    x[2, 3] = float("nan")
    x[5, 0] = float("inf")
    got = ops.dense_chain_cpu(x, meta, params, out_cols)
    want = torch_chain(layers, x)
    assert torch.isnan(got[2]).all() and torch.isnan(want[2]).all()
    assert not torch.isfinite(got[5]).all()
    finite = [i for i in range(10) if i not in (2, 5)]
    assert rel_err(got[finite].double(), want[finite]) < 1e-5


def test_strided_and_expanded_inputs():
    layers = chain(12, 33, 5)
    meta, params, out_cols = plan(layers)
    wide = torch.randn(40, 20)
    x = wide[:, 4:16]                                   # rows 20 floats apart
    assert rel_err(ops.dense_chain_cpu(x, meta, params, out_cols).double(), torch_chain(layers, x)) < 1e-5
    row = torch.randn(1, 12).expand(7, 12)              # stride 0
    got = ops.dense_chain_cpu(row, meta, params, out_cols)
    assert torch.equal(got, got[:1].expand(7, 5))
    assert ops.dense_chain(torch.randn(0, 12), meta, params, out_cols).shape == (0, 5)


def tampered(meta, at, value):
    bad = meta.clone()
    bad[at] = value
    return bad


@pytest.mark.parametrize("change,message", [
    (lambda m, p: (tampered(m, 0, 5), p), "truncated"),                 # more layers than described
    (lambda m, p: (m[:-1], p), "truncated"),
    (lambda m, p: (tampered(m, 4, 48), p), "layer width"),             # not whole chunks
    (lambda m, p: (tampered(m, 5, 2), p), "relu flag"),
    (lambda m, p: (tampered(m, 6, 10 ** 9), p), "bias offset"),
    (lambda m, p: (tampered(m, 9, 13), p), "block rows"),              # hi beyond the input
    (lambda m, p: (tampered(m, 10, 32), p), "block columns"),          # a gap in the output
    (lambda m, p: (tampered(m, 12, 10 ** 9), p), "weight offset"),
    (lambda m, p: (m, p[:100]), "offset"),                             # params too short
])
def test_bad_plans_are_refused_before_any_write(change, message):
    layers = chain(12, 33, 5)
    meta, params, out_cols = plan(layers)
    bad_meta, bad_params = change(meta, params)
    with pytest.raises(DrtFastError, match=message):
        ops.dense_chain_cpu(torch.randn(4, 12), bad_meta, bad_params, out_cols)


def zero_row_blocks_that_wrap(meta):
    """The first layer's block split in four that cover its 64 columns only with int64
    wrap-around: two blocks of no rows whose widths are near 2^63 (they would write far
    outside the layer's buffer), then one that starts at column -32."""
    assert meta[7] == 1 and meta[11] == 64  # one block, 64 columns wide
    lo, hi, w_off = int(meta[8]), int(meta[9]), int(meta[12])
    blocks = [lo, hi, 0, 32, w_off, 0, 0, 32, 2**63 - 32, 0, 0, 0, -2**63, 2**63 - 32, 0, lo, hi, -32, 96, w_off]
    return torch.cat([meta[:7], torch.tensor([4] + blocks), meta[13:]])


# Values whose sums and products overflow int64 must be refused, not wrapped past the checks:
# each of these read or wrote outside the tensors (a heap corruption for the last two).
@pytest.mark.parametrize("change,message", [
    (lambda m: tampered(m, 6, 2**63 - 16), "bias offset"),
    (lambda m: tampered(m, 12, 2**63 - 16), "weight offset"),
    (lambda m: tampered(m, 7, 0x3333333333333334), "truncated"),     # 5 * blocks wraps to 4
    (lambda m: tampered(m, 3, 2**62), "sizes"),                       # the scratch's size wraps
    (zero_row_blocks_that_wrap, "block columns"),
], ids=["bias offset", "weight offset", "blocks", "max width", "block widths"])
def test_plans_that_overflow_int64_are_refused(change, message):
    layers = chain(12, 33, 5)
    meta, params, out_cols = plan(layers)
    with pytest.raises(DrtFastError, match=message):
        ops.dense_chain_cpu(torch.randn(4, 12), change(meta), params, out_cols)


def test_bad_arguments():
    layers = chain(12, 33, 5)
    meta, params, out_cols = plan(layers)
    with pytest.raises(DrtFastError, match="plan maps 12 columns to 5"):
        ops.dense_chain(torch.randn(4, 11), meta, params, out_cols)
    with pytest.raises(DrtFastError, match="input or output columns"):
        ops.dense_chain_cpu(torch.randn(4, 12), meta, params, 6)
    with pytest.raises(DrtFastError, match="x must be float32"):
        ops.dense_chain(torch.randn(4, 12).double(), meta, params, out_cols)
    with pytest.raises(DrtFastError, match="meta must be an int64 plan"):
        ops.dense_chain(torch.randn(4, 12), meta.int(), params, out_cols)
    assert ops.dense_chain_cpu(torch.randn(4, 12).double(), meta, params, out_cols) is None  # not ours


def test_opcheck():
    layers = chain(12, 33, 5)
    meta, params, out_cols = plan(layers)
    torch.library.opcheck(torch.ops.drt_fast.dense_chain.default, (torch.randn(6, 12), meta, params, out_cols))


# ------------------------------------------------------------------ in DenseMember
class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 20), nn.Linear(20, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_member_runs_the_kernel_for_relu_chains_that_it_makes_cheaper():
    relu = fuse.dense_for_inference(member("digits_cnn"), torch.rand(1, 1, 8, 8)).module
    assert relu.chained
    tanh = fuse.dense_for_inference(Tanh().eval(), torch.rand(1, 10)).module
    assert isinstance(tanh, fuse.DenseMember) and not tanh.chained
    # one 784 x 10 matrix: padded to 32 columns the kernel would do 3.2x torch.mm's work
    narrow = fuse.dense_for_inference(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), torch.rand(1, 1, 28, 28))
    assert narrow.dense == 1 and not narrow.module.chained
    assert fuse.chain_layers([("relu", None)]) is None                 # a ReLU before any matrix
    w, b = torch.randn(3, 4), torch.randn(4)
    assert fuse.chain_layers([("matrix", (w, b)), ("relu", None), ("relu", None)]) is None
    assert fuse.chain_layers([("matrix", (w.double(), b.double()))]) is None


def test_member_kernel_agrees_with_its_torch_path(monkeypatch):
    m = member("digits_cnn")
    out = fuse.dense_for_inference(m, torch.rand(1, 1, 8, 8)).module
    x = torch.rand(300, 1, 8, 8)
    calls = []
    real = ops.dense_chain_cpu
    monkeypatch.setattr(ops, "dense_chain_cpu", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        kernel = out(x)
        assert calls == [1]
        monkeypatch.setattr(ops, "dense_chain_cpu", lambda *a: None)   # the GEMM path
        gemm = out(x)
        want = m(x)
        channels_last = out(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(kernel, gemm) < 1e-5 and rel_err(kernel, want) < 1e-5
    assert rel_err(channels_last, want) < 1e-5


def test_member_under_autocast_and_in_other_dtypes_skips_the_kernel(monkeypatch):
    out = fuse.dense_for_inference(member("digits_cnn"), torch.rand(1, 1, 8, 8)).module
    monkeypatch.setattr(ops, "dense_chain_cpu", lambda *a: pytest.fail("the kernel ran"))
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert out(x.bfloat16()).dtype == torch.bfloat16
    with torch.no_grad():
        assert out.double()(x.double()).dtype == torch.float64


# ---------------------------------------------------------------------------------------
# bias_act_ (a dense member's layer epilogue)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 17), (1000, 256), (257, 10), (40000, 3)])
@pytest.mark.parametrize("relu", [True, False])
def test_bias_act_matches_reference_bitwise(isa, rows, cols, relu):
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    h = torch.randn(rows, cols, generator=gen) * 3
    h[0, 0] = float("nan")
    if cols > 1:
        h[-1, 1] = float("-inf")
    bias = torch.randn(cols, generator=gen)
    ours, ref = h.clone(), h.clone()
    assert ops.bias_act_cpu_(ours, bias, relu)
    ops.reference_bias_act_(ref, bias, relu)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan()[0, 0]    # NaN stays NaN
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    via_op = h.clone()
    torch.ops.drt_fast.bias_act_(via_op, bias, relu)
    assert torch.equal(via_op.nan_to_num(), ref.nan_to_num())


def test_bias_act_falls_back_where_the_kernel_does_not_apply():
    bias = torch.randn(4)
    for h in (torch.randn(4, 3).T, torch.randn(3, 4, dtype=torch.float64)):   # strided; float64
        b = bias.to(h.dtype)
        assert not ops.bias_act_cpu_(h, b, True)
        want = (h + b).relu()
        ops.bias_act_(h, b, True)                                             # the op still works
        assert torch.equal(h, want)


@pytest.mark.parametrize("h,bias,message", [
    (torch.zeros(3), torch.zeros(3), "h must have shape \\[rows, cols\\]"),
    (torch.zeros(2, 3), torch.zeros(4), "bias must have shape \\[3\\]"),
    (torch.zeros(2, 3), torch.zeros(3, dtype=torch.float64), "h and bias must be one floating dtype"),
    (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), "must be one floating dtype"),
])
def test_bias_act_errors(h, bias, message):
    for fn in (ops.bias_act_, ops.reference_bias_act_):
        with pytest.raises(DrtFastError, match=message):
            fn(h, bias, True)


def test_bias_act_opcheck():
    h = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.drt_fast.bias_act_.default, (h, torch.randn(5), True))
