"""The whole-network CIFAR ResNet kernel (``ops.cifar_resnet``, ops/cifar_resnet.py and
ops/cifar_resnet_layout.py; csrc/cuda/cifar_resnet.cu) and its member rewrite
(``fuse.cifar_resnet_for_inference``, fuse/cifar_resnet.py).

Without a GPU, the kernel's CTA program runs on the host (``ops.cifar_resnet_on_host``,
the same code with wmma replaced by loops over 16x16 tiles): it must agree with
``ops.reference_cifar_resnet`` (the same roundings in torch) to float rounding, whatever the
order in which each phase's warps run, for every input dtype and layout. The reference must
agree with the member itself to bf16 rounding. On a GPU, the ``cuda`` tests compare the
kernel with both.
"""
import pytest
import torch
from torch import nn

from drt_fast import fuse, models, ops
from drt_fast.errors import DrtFastError

cuda_kernels = ops.extension.cuda_kernels
needs_cuda_build = pytest.mark.skipif(cuda_kernels is None, reason="drt_fast was built without its CUDA kernels")

MEANS, SDS = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


def resnet_member(depth=20, classes=10, seed=0, normalize=True):
    """A CIFAR ResNet member in eval mode with BatchNorm statistics far from the identity (so
    that folding them matters), activations kept in range."""
    torch.manual_seed(seed)
    net = models.cifar_resnet.ResNet(depth, num_classes=classes)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.3, 0.7)
            m.bias.data.uniform_(-0.2, 0.2)
    member = models.with_normalization(net, MEANS, SDS) if normalize else net
    return member.eval()


VARIANTS = [0, 1]      # wmma, mma.sync


def kernel_member(member, variant=1):
    rewritten = fuse.cifar_resnet_for_inference(member, variant)
    assert rewritten.reason is None and isinstance(rewritten.module, fuse.CifarResNetMember)
    return rewritten.module


def on_host(k, x, order=0):
    return ops.cifar_resnet_on_host(x, k.weights, k.biases, k.norm, k.fc_w, k.fc_b, k.blocks, k.variant, order)


def reference(k, x):
    return ops.reference_cifar_resnet(x, k.weights, k.biases, k.norm, k.fc_w, k.fc_b, k.blocks, k.variant)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def per_draw_rel(a, b):
    return (a.float() - b.float()).norm(dim=1) / b.float().norm(dim=1)


def pixels(batch, seed=1):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- the rewrite and the reference ---------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_packing_round_trips(variant):
    for cin, cout, k in ((16, 16, 3), (16, 32, 3), (32, 64, 1), (64, 64, 3)):
        w = torch.randn(cout, cin, k, k)
        tiles = ops.pack_cifar_resnet_weight(w, variant)
        assert tiles.numel() == w.numel()
        assert torch.equal(ops.unpack_cifar_resnet_weight(tiles, cin, cout, k * k, variant), w)
        if variant:                        # the same tiles, each in the fragment order
            plain = ops.pack_cifar_resnet_weight(w, 0).view(-1, 256)
            assert torch.equal(tiles.view(-1, 256).sort(dim=1).values, plain.sort(dim=1).values)


@needs_cuda_build
def test_mma_tile_order_is_the_kernels():
    order = ops.mma_tile_order()
    assert sorted(order.tolist()) == list(range(256))
    assert order.tolist() == cuda_kernels.cifar_resnet_b_order()
    # a tile is [input channel][output channel] of one tap: the first tile's row 1 is input 1
    w = torch.arange(32 * 16 * 9, dtype=torch.float32).view(32, 16, 3, 3)
    tiles = ops.pack_cifar_resnet_weight(w).view(-1, 16, 16)
    assert torch.equal(tiles[0][1], w[:16, 1, 0, 0])
    assert torch.equal(tiles[1][0], w[16:, 0, 0, 0])        # then the second output chunk


@pytest.mark.parametrize("depth", [8, 20, 110])
def test_reference_matches_the_member(depth):
    member = resnet_member(depth)
    k = kernel_member(member)
    assert k.blocks == (depth - 2) // 6
    x = pixels(16)
    with torch.no_grad():
        want = member(x)
    got = reference(k, x)
    assert got.dtype == torch.float32 and got.shape == (16, 10)
    assert rel(got, want) < 2e-2                       # bf16 weights and activations
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9


def test_the_member_without_normalization_and_on_any_input_dtype():
    member = resnet_member(20, normalize=False)
    k = kernel_member(member)
    assert torch.equal(k.norm, torch.tensor([0.0, 0, 0, 1, 1, 1]))
    x = pixels(8)
    with torch.no_grad():
        want = member(x)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert rel(k(x.to(dtype)), want) < 3e-2


def test_rewrite_counts_and_describes_the_member():
    rewritten = fuse.cifar_resnet_for_inference(resnet_member(20))
    assert rewritten.fused == rewritten.folded_bn == 21          # stem, 2 per block, 2 downsamples
    assert "depth=20" in repr(rewritten.module) and "mma" in repr(rewritten.module)


def test_rewrite_takes_convolution_and_linear_biases_into_account():
    member = resnet_member(8)
    net = member[1]
    net.layer2[0].conv1 = nn.Conv2d(16, 32, 3, 2, 1, bias=True)   # a bias the BatchNorm folds in
    nn.init.uniform_(net.layer2[0].conv1.bias, -0.5, 0.5)
    net.fc = nn.Linear(64, 10, bias=False)
    member.eval()
    k = kernel_member(member)
    x = pixels(8)
    with torch.no_grad():
        assert rel(k(x), member(x)) < 2e-2


def _bottleneck():
    return models.with_normalization(models.cifar_resnet.ResNet(29, block_name="Bottleneck"), MEANS, SDS).eval()


def _strided():
    member = resnet_member(20)
    member[1].layer1[1].conv2.stride = (2, 2)
    return member


def _leaky():
    member = resnet_member(20)
    member[1].layer2[0].relu = nn.LeakyReLU()
    return member


def _no_running_stats():
    member = resnet_member(8)
    member[1].layer3[0].bn2 = nn.BatchNorm2d(64, track_running_stats=False).eval()
    return member


def _extra_layer():
    member = resnet_member(20)
    return nn.Sequential(member[0], member[1], nn.Identity()).eval()


@pytest.mark.parametrize("build, why", [
    (lambda: resnet_member(20).train(), "training mode"),
    (_bottleneck, "BasicBlocks"),
    (_strided, "convolution"),
    (_leaky, "ReLU"),
    (_no_running_stats, "running statistics"),
    (_extra_layer, "not a CIFAR ResNet"),
    (lambda: models.with_normalization(models.create("digits_cnn", 10), [0.5], [0.5]).eval(), "not a CIFAR ResNet"),
    (lambda: models.with_normalization(models.create("cifar_resnet20", 10), [0.5], [0.5]).eval(), "3"),
])
def test_rewrite_refuses_what_the_kernel_does_not_run(build, why):
    member = build()
    rewritten = fuse.cifar_resnet_for_inference(member)
    assert rewritten.module is member and rewritten.fused == 0
    assert why in rewritten.reason


def test_op_checks_its_arguments():
    k = kernel_member(resnet_member(8))
    x = pixels(2)
    args = [k.weights, k.biases, k.norm, k.fc_w, k.fc_b]
    bad = [
        ((x[:, :2],) + tuple(args) + (k.blocks,), "x must be"),
        ((x.double(),) + tuple(args) + (k.blocks,), "x must be"),
        ((x, k.weights[:-256]) + tuple(args[1:]) + (k.blocks,), "weights must be"),
        ((x, k.weights.float()) + tuple(args[1:]) + (k.blocks,), "weights must be"),
        ((x,) + tuple(args) + (k.blocks + 1,), "weights must be"),
        ((x,) + tuple(args) + (0,), "blocks"),
        ((x,) + tuple(args) + (k.blocks, 2), "variant"),
        ((x, k.weights, k.biases[:-1]) + tuple(args[2:]) + (k.blocks,), "biases must be"),
        ((x, k.weights, k.biases, k.norm[:3], k.fc_w, k.fc_b, k.blocks), "norm must be"),
        ((x, k.weights, k.biases, k.norm, k.fc_w[:, :63], k.fc_b, k.blocks), "fc_w must be"),
        ((x, k.weights, k.biases, k.norm, k.fc_w, k.fc_b[:-1], k.blocks), "fc_b must be"),
    ]
    for call, message in bad:
        with pytest.raises(DrtFastError, match=message):
            ops.cifar_resnet(*call)


def test_opcheck():
    k = kernel_member(resnet_member(8))
    torch.library.opcheck(torch.ops.drt_fast.cifar_resnet.default,
                          (pixels(2), k.weights, k.biases, k.norm, k.fc_w, k.fc_b, k.blocks),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the kernel's CTA program on the host --------------------------------------------------
@needs_cuda_build
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("depth, classes", [(8, 10), (20, 10), (20, 300), (20, 1), (110, 10)])
def test_host_program_matches_the_reference(depth, classes, variant):
    k = kernel_member(resnet_member(depth, classes), variant)
    x = pixels(6 if depth < 110 else 3)
    got, want = on_host(k, x), reference(k, x)
    assert got.shape == (x.shape[0], classes) and torch.isfinite(got).all()
    assert rel(got, want) < 5e-3     # the sums' order differs: a few activations round the other way


@needs_cuda_build
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_host_program_reads_any_dtype_and_layout(dtype, layout, variant):
    k = kernel_member(resnet_member(8), variant)
    x = pixels(4).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":                        # a window of a larger batch of images
        x = torch.rand(8, 5, 40, 36).to(dtype)[::2, 1:4, 3:35, 2:34]
    assert torch.equal(on_host(k, x), on_host(k, x.contiguous()))
    assert rel(on_host(k, x), reference(k, x)) < 5e-3


@needs_cuda_build
@pytest.mark.parametrize("variant", VARIANTS)
def test_host_program_does_not_depend_on_the_order_of_warps(variant):
    k = kernel_member(resnet_member(20), variant)
    x = pixels(3)
    first = on_host(k, x, 0)
    for order in (1, 2):
        assert torch.equal(on_host(k, x, order), first)


@needs_cuda_build
@pytest.mark.parametrize("variant", VARIANTS)
def test_host_program_propagates_non_finite_inputs_and_handles_empty_batches(variant):
    k = kernel_member(resnet_member(8), variant)
    x = pixels(3)
    x[1, 2, 5, 7] = float("nan")
    got, want = on_host(k, x), reference(k, x)
    assert torch.isnan(got[1]).all() and torch.isnan(want[1]).all()
    assert torch.isfinite(got[[0, 2]]).all()
    assert on_host(k, x[:0]).shape == (0, 10)


@needs_cuda_build
def test_host_variants_agree():
    member = resnet_member(20)
    x = pixels(4)
    wmma, mma = (on_host(kernel_member(member, v), x) for v in VARIANTS)
    assert rel(wmma, mma) < 5e-3            # the same network; only the sums' order differs


@needs_cuda_build
def test_host_program_refuses_weights_that_do_not_make_the_network():
    k = kernel_member(resnet_member(8))
    x = pixels(1)
    out = torch.empty(1, 10)
    args = list(ops.cifar_resnet_binding_args(x, k.weights, k.biases, k.norm, k.fc_w, k.fc_b, k.blocks, 1, out))
    weights, weights_len, biases_len, blocks, variant = 7, 8, 10, 15, 17   # positions in the binding's arguments
    biases = 9
    for index, value, message in ((weights, args[weights] + 2, "aligned"),
                                  (biases, args[biases] + 4, "aligned"),
                                  (weights_len, args[weights_len] - 256, "weights"),
                                  (blocks, 2, "weights"),
                                  (biases_len, args[biases_len] + 1, "biases"),
                                  (variant, 2, "variant")):
        bad = list(args)
        bad[index] = value
        with pytest.raises(ValueError, match=message):
            cuda_kernels.cifar_resnet_on_host(*bad, 0)
    convs = ops.cifar_resnet_convs(18)
    for variant in VARIANTS:
        tiles, biases, smem = cuda_kernels.cifar_resnet_sizes(18, variant)
        assert tiles == sum(taps * cin * cout for cin, cout, taps, _, _ in convs)
        assert biases == sum(cout for _, cout, _, _, _ in convs) and len(convs) == 111
        assert smem <= 113 * 1024     # two CTAs per SM on an H100 (228 KB)
    assert cuda_kernels.cifar_resnet_sizes(18, 0)[2] <= 99 * 1024   # an RTX 30/40 too
    assert cuda_kernels.cifar_resnet_sizes(18, 1)[2] <= 81 * 1024   # mma.sync: two CTAs an SM on an A100


def test_the_former_environment_variable_still_asks_for_the_kernel(monkeypatch):
    """DRT_FAST_RESNET_KERNEL, the variable's former name, is read after DRT_FAST_CIFAR_RESNET."""
    assert fuse.CIFAR_RESNET_ENV_ALIAS == "DRT_FAST_RESNET_KERNEL"
    monkeypatch.delenv(fuse.CIFAR_RESNET_ENV, raising=False)
    monkeypatch.delenv(fuse.CIFAR_RESNET_ENV_ALIAS, raising=False)
    assert fuse.cifar_resnet_setting() == ""
    monkeypatch.setenv(fuse.CIFAR_RESNET_ENV_ALIAS, "wmma")
    assert fuse.cifar_resnet_setting() == "DRT_FAST_RESNET_KERNEL=wmma"
    monkeypatch.setenv(fuse.CIFAR_RESNET_ENV, "0")                 # the new name wins
    assert fuse.cifar_resnet_setting() == "DRT_FAST_CIFAR_RESNET=0"
    assert fuse.cifar_resnet_variant(torch.device("cuda")) is None


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("depth", [8, 110])
def test_cuda_kernel_matches_the_host_program_and_the_reference(cuda_device, variant, depth):
    k_cpu = kernel_member(resnet_member(depth), variant)
    k = kernel_member(resnet_member(depth), variant).to(cuda_device)
    x = pixels(64)
    got = ops.cifar_resnet(x.to(cuda_device), k.weights, k.biases, k.norm, k.fc_w, k.fc_b, k.blocks, variant).cpu()
    assert torch.isfinite(got).all()
    host = on_host(k_cpu, x)
    assert rel(got, host) < 5e-3
    assert rel(got, reference(k_cpu, x)) < 5e-3
    # draw by draw too (host and reference differ by at most 1.6e-3 a draw at depth 110): a
    # fault confined to a few draws or positions does not hide in the batch's norm
    assert per_draw_rel(got, host).max() < 1e-2
    # the same draw gives the same logits in any batch (a CTA per draw)
    assert torch.equal(k(x[5:6].to(cuda_device)).cpu(), got[5:6])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_kernel_is_deterministic(cuda_device, variant):
    """A CTA computes its draw in a fixed order, so any difference between runs is a race
    between warps (a missing barrier) or uninitialised shared memory: run many draws, several
    waves of CTAs, three times and in other batches."""
    k = kernel_member(resnet_member(110), variant).to(cuda_device)
    x = pixels(2000, seed=4).to(cuda_device)
    first = k(x)
    assert torch.isfinite(first).all()
    for _ in range(2):
        assert torch.equal(k(x), first)
    assert torch.equal(k(x[777:1500]), first[777:1500])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_reads_any_layout_and_empty_batches(cuda_device, dtype, variant):
    k_cpu = kernel_member(resnet_member(20), variant)
    k = kernel_member(resnet_member(20), variant).to(cuda_device)
    x = pixels(300).to(cuda_device, dtype)                   # more draws than one wave of CTAs
    want = k(x.contiguous())
    assert torch.equal(k(x.contiguous(memory_format=torch.channels_last)), want)
    assert rel(want.cpu(), reference(k_cpu, x.cpu())) < 5e-3
    assert k(x[:0]).shape == (0, 10)
    x[7, 0, 3, 3] = float("nan")
    out = k(x)
    assert torch.isnan(out[7]).all() and torch.isfinite(out[:7]).all()


# ---- the debugging hook: shared memory after a phase --------------------------------------
@needs_cuda_build
@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshots_show_the_activations_after_a_phase(variant):
    import torch.nn.functional as F

    k = kernel_member(resnet_member(8), variant)
    x = pixels(2)
    args = (x, k.weights, k.biases, k.norm, k.fc_w, k.fc_b, k.blocks, variant)
    # after the stem: region 0 holds relu(conv(normalized x) + b) in bf16
    stem = ops.cifar_resnet_map(ops.cifar_resnet_snapshot(*args, 1, on_host=True), variant, 0, 0, 16)
    w = ops.unpack_cifar_resnet_weight(k.weights[:9 * 256], 16, 16, 9, variant).float()
    normalized = ((x - k.norm[:3].view(1, 3, 1, 1)) / k.norm[3:].view(1, 3, 1, 1)).to(torch.bfloat16).float()
    want = F.relu(F.conv2d(F.pad(normalized, (0, 0, 0, 0, 0, 13)), w, k.biases[:16], padding=1))
    assert rel(stem, want) < 1e-2 and stem.shape == (2, 16, 32, 32)
    # after the last phase: region 1 holds the 64-channel 8x8 map the head pools
    last = ops.cifar_resnet_map(ops.cifar_resnet_snapshot(*args, 1 + 6 * k.blocks, on_host=True),
                                 variant, 1, 2, 64)
    logits = last.mean(dim=(2, 3)) @ k.fc_w.t() + k.fc_b
    assert rel(logits, on_host(k, x)) < 1e-5
    with pytest.raises(DrtFastError, match="stop_after"):
        ops.cifar_resnet_snapshot(*args, 2 + 6 * k.blocks, on_host=True)
