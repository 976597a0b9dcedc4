"""drt_fast.fuse: BatchNorm folding and conv(+add)+ReLU fusion compute the member's function."""
import pytest
import torch
from torch import nn

from drt_fast import fuse, models, ops
from drt_fast.models import with_normalization

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {  # arch -> (BatchNorms folded, convolutions fused)
    "cifar_resnet20": (21, 19),       # every conv but the 2 shortcut ones ends in a ReLU
    "resnet50": (53, 49),             # 4 shortcut convs stay
    "digits_cnn": (0, 2),
    "lenet": (0, 2),
}


def member(arch, seed=0):
    """A normalized ``arch`` member whose BatchNorms are not the identity."""
    torch.manual_seed(seed)
    channels = models.input_shape(arch)[0]
    m = with_normalization(models.create(arch, 10), [0.4] * channels, [0.3] * channels)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.7, 1.3)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rewrite_computes_the_same_function(arch):
    m = member(arch)
    x = torch.rand(3, *models.input_shape(arch))
    out = fuse.for_inference(m, fuse.reference_ops(), example=x[:2])
    assert (out.folded_bn, out.fused) == ARCHS[arch] and out.reason is None
    assert not any(isinstance(q, nn.BatchNorm2d) for q in out.module.modules())
    with torch.no_grad():
        assert rel_err(out.module(x), m(x)) < 1e-5
    # the original is untouched (a copy was rewritten), and stays in its mode
    assert any(isinstance(q, nn.BatchNorm2d) for q in m.modules()) == (ARCHS[arch][0] > 0)


def test_without_an_example_additions_stay_unfused():
    m = member("cifar_resnet20")
    out = fuse.for_inference(m, fuse.reference_ops())
    assert out.folded_bn == 21 and out.fused == 10          # stem + the 9 blocks' first conv
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(out.module(x), m(x)) < 1e-5


class Broadcast(nn.Module):
    """conv -> + bias-like [C,1,1] tensor -> relu: the add broadcasts, so it is not fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.shift).flatten(1)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return (y.relu() if y.sum() > 0 else y).flatten(1)


def test_broadcasting_add_and_shared_conv_outputs_are_left_alone():
    m = Broadcast().eval()
    x = torch.randn(2, 2, 5, 5)
    out = fuse.for_inference(m, fuse.reference_ops(), example=x)
    assert out.fused == 0 and out.reason == "nothing to fold or fuse"
    with torch.no_grad():
        assert torch.equal(out.module(x), m(x))


def test_untraceable_member_runs_unchanged():
    m = Branchy().eval()
    out = fuse.for_inference(m, fuse.reference_ops(), example=torch.randn(2, 2, 5, 5))
    assert out.fused == 0 and out.reason.startswith("torch.fx could not trace it")
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert torch.equal(out.module(x), m(x))


class Uncopyable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu().flatten(1)

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle '_thread.lock' object")


def test_uncopyable_member_runs_unchanged():
    m = Uncopyable().eval()
    out = fuse.for_inference(m, fuse.reference_ops(), example=torch.randn(2, 2, 5, 5))
    assert out.module is m and out.fused == 0
    assert out.reason == "it could not be copied: cannot pickle '_thread.lock' object"


def test_weights_are_stored_in_the_run_dtype():
    out = fuse.for_inference(member("digits_cnn"), fuse.reference_ops(), torch.bfloat16,
                             example=torch.rand(2, 1, 8, 8))
    fused = [q for q in out.module.modules() if isinstance(q, fuse.FusedConvReLU)]
    assert len(fused) == 2 and all(q.weight.dtype == torch.bfloat16 for q in fused)


# ------------------------------------------------------------------ dense lowering (CPU)
class Mlp(nn.Module):
    """Normalization, BatchNorm1d, GELU, dropout and inline arithmetic: all lowered."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.bn = nn.BatchNorm1d(20)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(20, 5)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        h = (x - 0.5) * self.scale                      # inline normalization
        h = self.drop(nn.functional.gelu(self.bn(self.fc1(h.flatten(1)))))
        return self.fc2(-h / 3.0)


class FunctionalCnn(nn.Module):
    """Functional activations, x.view(x.size(0), -1), average pooling, padding."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = nn.functional.avg_pool2d(x, 2)
        x = nn.functional.leaky_relu(self.conv2(nn.functional.pad(x, (1, 1, 1, 1))), 0.1)
        return self.fc(x.view(x.size(0), -1))


def randomize_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.7, 1.3)
    return m.eval()


@pytest.mark.parametrize("make,shape,matrices", [
    (lambda: member("digits_cnn"), (1, 8, 8), [(64, 256), (256, 128), (128, 10)]),
    (Mlp, (3, 4), [(12, 20), (20, 5)]),
    (FunctionalCnn, (3, 6, 6), [(108, 216), (216, 72), (72, 4)]),
])
def test_dense_lowering_computes_the_same_function(make, shape, matrices):
    torch.manual_seed(0)
    m = randomize_bn(make())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(64, *shape)
    out = fuse.dense_for_inference(m, x[:1])
    assert out.reason is None and out.dense == len(matrices)
    assert isinstance(out.module, fuse.DenseMember)
    got_shapes = [tuple(t.shape) for n, t in out.module.named_buffers() if n.startswith("weight")]
    assert got_shapes == matrices
    with torch.no_grad():
        want = m(x)
        assert rel_err(out.module(x), want) < 1e-5
        # any input layout: the rows are read in C order
        if x.dim() == 4:
            assert rel_err(out.module(x.contiguous(memory_format=torch.channels_last)), want) < 1e-5
        # bf16 autocast runs the matrices in bf16 (what --precision bf16 does)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = out.module(x.bfloat16())
        assert low.dtype == torch.bfloat16 and rel_err(low.float(), want) < 5e-2
    state = m.state_dict()                                            # the original is untouched
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert not isinstance(m, torch.fx.GraphModule) and not m.training


def test_dense_lowering_leaves_a_training_member_as_it_is():
    torch.manual_seed(0)
    m = randomize_bn(Mlp()).train()
    stats = [t.clone() for t in m.bn.buffers()]
    out = fuse.dense_for_inference(m, torch.rand(1, 3, 4))
    assert out.dense == 2 and m.training
    assert all(torch.equal(a, b) for a, b in zip(stats, m.bn.buffers()))   # no batch statistics
    x = torch.rand(16, 3, 4)
    with torch.no_grad():
        assert rel_err(out.module(x), m.eval()(x)) < 1e-5                   # the eval function


def test_dense_member_epilogue_kernel_agrees_with_torch(monkeypatch):
    """float32 on the CPU without the chain kernel (tests/test_dense_chain.py) runs torch.mm
    + the bias/ReLU kernel; the fallbacks must agree."""
    m = member("digits_cnn")
    out = fuse.dense_for_inference(m, torch.rand(1, 1, 8, 8)).module
    x = torch.rand(300, 1, 8, 8)
    monkeypatch.setattr(ops, "dense_chain_cpu", lambda *args: None)
    with torch.no_grad():
        kernel = out(x)
        with ops.use_reference():                               # bias_act_cpu_ does nothing
            torch_epilogue = out(x)                              # mm + add_ + relu_ in torch
    assert torch.equal(kernel, torch_epilogue)
    h = torch.addmm(out.bias0, x.reshape(300, -1), out.weight0).relu_()
    h = torch.addmm(out.bias1, h, out.weight1).relu_()
    assert rel_err(kernel, torch.addmm(out.bias2, h, out.weight2)) < 1e-6


class ReluFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.act(x))


def test_dense_member_leaves_its_input_alone():
    m = ReluFirst().eval()
    out = fuse.dense_for_inference(m, torch.randn(1, 6))
    assert out.dense == 1
    x = torch.randn(10, 6)
    before = x.clone()
    with torch.no_grad():
        assert rel_err(out.module(x), nn.Linear.forward(m.fc, before.relu())) < 1e-6
    assert torch.equal(x, before)


class Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x * x)


class Reciprocal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(2.0 / x)


class BatchStats(nn.Module):
    """A BatchNorm without running statistics normalizes by the batch's: not affine."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.fc(x))


class MixesDraws(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x - x.mean(0))


@pytest.mark.parametrize("make,shape,reason", [
    (lambda: member("cifar_resnet20"), (3, 32, 32), "it is not a chain of layers"),
    (lambda: member("lenet"), (1, 28, 28), "max_pool2d() is neither affine nor elementwise"),
    (lambda: nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 28 * 28, 10)),
     (1, 28, 28), "would be a 784x25088 matrix (more than 262,144 entries)"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)),
     (1, 12, 12), "would be a 144x576 matrix, 16x their 5,184 multiply-adds (limit 8x)"),
    (Square, (4,), "it is not a chain of layers"),
    (Reciprocal, (4,), "truediv() is neither affine nor elementwise"),
    (BatchStats, (4,), "layer bn (BatchNorm1d) is neither affine nor elementwise"),
    (MixesDraws, (4,), "it is not a chain of layers"),
    (Branchy, (2, 5, 5), "torch.fx could not trace it"),
    (lambda: member("resnet50"), (3, 224, 224), "it has 23,528,522 parameters, too many for dense "
                                                 "matrices (limit 4,194,304)"),
])
def test_dense_lowering_refuses_what_it_cannot_lower(make, shape, reason):
    m = make().eval()
    out = fuse.dense_for_inference(m, torch.rand(1, *shape))
    assert out.module is m and out.dense == 0
    assert reason in out.reason, out.reason


@pytest.mark.skipif(not fuse.onednn_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("arch", ["cifar_resnet20", "digits_cnn", "lenet"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_onednn_fused_matches_the_member(arch, dtype, tol):
    if not fuse.onednn_available(dtype):
        pytest.skip(f"oneDNN has no {dtype} kernels for this CPU")
    m = member(arch)
    x = torch.rand(8, *models.input_shape(arch))
    # bf16: channels-last only (the engine's CPU layout for 3 channels; oneDNN's bf16
    # conv + add has no NCHW kernel, so the engine does not use it there)
    layouts = [torch.channels_last] + ([torch.contiguous_format] if dtype == torch.float32 else [])
    for layout in layouts:
        out = fuse.for_inference(m, fuse.onednn_ops(), dtype, example=x[:2])
        assert (out.folded_bn, out.fused) == ARCHS[arch]
        fused = out.module.to(memory_format=layout)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                             enabled=dtype != torch.float32):
            got = fused(x.contiguous(memory_format=layout).to(dtype))
        with torch.no_grad():
            want = m.double()(x.double()).float()
            m.float()
        assert rel_err(got.float(), want) < tol, (layout, rel_err(got.float(), want))


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@pytest.mark.parametrize("arch", ["cifar_resnet20", "resnet50", "digits_cnn"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 5e-2)])
def test_cuda_cudnn_fused_matches_the_member(cuda_device, arch, dtype, tol):
    m = member(arch).to(cuda_device)
    x = torch.rand(64, *models.input_shape(arch), device=cuda_device)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = fuse.for_inference(m, fuse.cudnn_ops(), dtype, example=x[:2])
        assert out.fused == ARCHS[arch][1]
        fused = out.module.to(memory_format=layout)
        xl = x.contiguous(memory_format=layout)
        with torch.no_grad():
            want = m.double()(x.double()).float()
            m.float()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32):
                got = fused(xl.to(dtype))
        assert torch.isfinite(got).all()
        assert rel_err(got.float(), want) < tol, (layout, rel_err(got.float(), want))


def test_cuda_dense_members_match_the_member(cuda_device):
    """The CPU's rewrite is device-agnostic (bench/gpu_levers.py times it on the GPU)."""
    m = member("digits_cnn").to(cuda_device)
    x = torch.rand(64, 1, 8, 8, device=cuda_device)
    out = fuse.dense_for_inference(m, x[:1])
    assert out.dense == 3 and out.module.weight0.device == x.device
    with torch.no_grad():
        want = m.double()(x.double()).float()
        m.float()
        assert rel_err(out.module(x), want) < 5e-3          # cuDNN may run TF32 convolutions
