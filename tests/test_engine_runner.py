"""drt_fast.engine's member runner: rewritten copies of the members (dense matrices, fused
convolutions, the CIFAR ResNet kernel) are built, checked on their first batch against the
members, rebuilt when the members change and given up when they disagree.

CUDA's rewrites are tested on the CPU through `CudaRewriter`'s seams: plain-torch or
oneDNN convolutions stand in for cuDNN's, a variant function for the GPU's kernel choice.
"""
import pytest
import torch
from torch import nn

from drt_fast import fuse
from drt_fast.engine import CudaRewriter, State
from drt_fast.ensemble import Ensemble
from drt_fast.errors import DrtFastError
from drt_fast.smoothing import SmoothedClassifier
from test_fuse import member
from test_cifar_resnet_kernel import _bottleneck, pixels, rel, resnet_member

pytestmark = pytest.mark.usefixtures("one_thread")

CERT = dict(n0=20, n=300, alpha=0.01, batch_size=256)


def digits_ensemble():
    return Ensemble([member("digits_cnn", seed) for seed in range(3)])


def certs(smooth, xs):
    return smooth.certify_many(xs, range(len(xs)), **CERT)


class CountingRewriter(CudaRewriter):
    """CUDA's rewrites with ``conv_ops`` for cuDNN's (plain torch by default: exact for a
    model without BatchNorm, relu(conv2d(x)) is what the member computes); counts the
    members it rewrote."""

    def __init__(self, conv_ops=None, **kwargs):
        super().__init__(conv_ops=conv_ops or fuse.reference_ops(), require_cudnn=False, **kwargs)
        self.rewritten = 0

    def rewrite(self, members, *args, **kwargs):
        self.rewritten += len(members)
        return super().rewrite(members, *args, **kwargs)


# ------------------------------------------------------------------ the CPU's rewrites
def test_engine_lowers_members_to_dense_matrices_on_the_cpu():
    xs = torch.rand(4, 1, 8, 8)
    ens = digits_ensemble()
    plain = certs(SmoothedClassifier(ens, 10, sigma=0.25, fuse=False), xs)
    smooth = SmoothedClassifier(ens, 10, sigma=0.25)
    dense = certs(smooth, xs)
    assert str(smooth.fuse_status) == ("on: 3 of 3 member(s) as dense matrices (9 matrices; 3 run by "
                                       "the block-sparse CPU kernel, 55% of the multiply-adds)")
    assert all(isinstance(m, fuse.DenseMember) for m in smooth.engine.runner.module.members)
    # the same noise; a vote flips only where rounding moves a draw across a boundary
    for p, d in zip(plain, dense):
        assert p.label == d.label and abs(p.count - d.count) <= 2, (plain, dense)
    assert certs(smooth, xs) == dense                                  # deterministic
    with torch.no_grad():                                              # a member changes
        ens.members[2][1].fc.weight.mul_(-1.0)
    changed = certs(smooth, xs)
    again = certs(SmoothedClassifier(ens, 10, sigma=0.25, fuse=False), xs)
    assert [c.label for c in changed] == [c.label for c in again]


def big_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 10))


def test_engine_on_the_cpu_mixes_dense_and_onednn_rewrites_and_forced_fusion():
    xs = torch.rand(2, 1, 28, 28)
    mixed = Ensemble([member("lenet"), nn.Sequential(nn.Flatten(), nn.Linear(784, 10))])
    smooth = SmoothedClassifier(mixed, 10, sigma=0.25)
    certs(smooth, xs)
    want = "on: 1 of 2 member(s) as dense matrices (1 matrix)"
    if fuse.onednn_available():          # LeNet: not a chain (max-pool), its convs fused
        want += "; 2 fused convolutions (oneDNN), 0 BatchNorms folded in 1 member(s)"
    else:
        want += " (max_pool2d() is neither affine nor elementwise; this torch build has no oneDNN)"
    assert str(smooth.fuse_status) == want
    nothing = Ensemble([big_mlp()])      # too big for a matrix, no convolution to fuse
    smooth = SmoothedClassifier(nothing, 10, sigma=0.25)
    certs(smooth, xs)
    assert smooth.fuse_status.state is State.OFF
    assert smooth.fuse_status.reason.startswith("the layers ") and smooth.fuse_status.reason.endswith(
        "would be a 784x1000 matrix (more than 262,144 entries)")
    with pytest.raises(DrtFastError, match=r"fuse=True: no member could be rewritten "
                                           r"\(the layers .* would be a 784x1000 matrix"):
        certs(SmoothedClassifier(nothing, 10, sigma=0.25, fuse=True), xs)
    with pytest.raises(DrtFastError, match="fuse must be"):
        SmoothedClassifier(digits_ensemble(), 10, sigma=0.25, fuse="yes")


@pytest.mark.skipif(not fuse.onednn_available(), reason="this torch build has no oneDNN")
def test_engine_says_why_bf16_nchw_resnets_are_not_fused():
    if not fuse.onednn_available(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 kernels for this CPU")
    smooth = SmoothedClassifier(Ensemble([member("cifar_resnet20")]), 10, sigma=0.25,
                                precision="bf16", channels_last=False)
    smooth.prepare(torch.rand(1, 3, 32, 32))
    assert smooth.fuse_status.state is State.OFF
    assert smooth.fuse_status.reason.startswith("it is not a chain of layers")
    assert smooth.fuse_status.reason.endswith("; oneDNN's bf16 fusion needs channels-last draws")


@pytest.mark.skipif(not fuse.onednn_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_fuses_resnets_with_onednn_on_the_cpu(precision):
    if precision == "bf16" and not fuse.onednn_available(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 kernels for this CPU")
    torch.manual_seed(0)
    ens = Ensemble([member("cifar_resnet20", seed) for seed in range(3)])
    xs = torch.rand(2, 3, 32, 32)
    run = dict(n0=10, n=100, alpha=0.01, batch_size=110)
    plain = SmoothedClassifier(ens, 10, sigma=0.25, precision=precision, fuse=False)
    smooth = SmoothedClassifier(ens, 10, sigma=0.25, precision=precision)
    a = plain.certify_many(xs, range(2), **run)
    b = smooth.certify_many(xs, range(2), **run)
    assert str(smooth.fuse_status) == "on: 57 fused convolutions (oneDNN), 63 BatchNorms folded in 3 member(s)"
    for p, f in zip(a, b):       # the same noise; rounding may move a draw across a boundary
        assert p.label == f.label and abs(p.count - f.count) <= 3, (precision, a, b)


# ------------------------------------------------------------------ CUDA's rewrites, on the CPU
def test_engine_fused_copies_give_the_same_certificates():
    xs = torch.rand(3, 1, 8, 8)
    ens = digits_ensemble()
    plain = certs(SmoothedClassifier(ens, 10, sigma=0.25, fuse=False), xs)
    rewriter = CountingRewriter()
    smooth = SmoothedClassifier(ens, 10, sigma=0.25, rewriter=rewriter)
    assert certs(smooth, xs) == plain
    assert str(smooth.fuse_status) == "on: 6 fused convolutions, 0 BatchNorms folded in 3 member(s)"
    assert rewriter.rewritten == 3                      # one rewrite per member
    certs(smooth, xs)
    assert rewriter.rewritten == 3                      # reused
    with torch.no_grad():                               # a member changes: rebuilt
        ens.members[1][1].conv1.weight.mul_(1.5)
    changed = certs(smooth, xs)
    assert rewriter.rewritten == 6
    assert changed == certs(SmoothedClassifier(ens, 10, sigma=0.25, fuse=False), xs)


def test_engine_gives_up_fused_copies_that_disagree():
    def wrong(x, w, b, *conf):
        return torch.relu(torch.nn.functional.conv2d(x, w, b, *conf)) + 1.0

    wrong_ops = fuse.FusedOps(wrong, fuse.reference_ops().conv_add_relu)
    xs = torch.rand(2, 1, 8, 8)
    ens = digits_ensemble()
    plain = certs(SmoothedClassifier(ens, 10, sigma=0.25, fuse=False), xs)
    smooth = SmoothedClassifier(ens, 10, sigma=0.25, rewriter=CountingRewriter(wrong_ops))
    with pytest.warns(RuntimeWarning, match="fused copies gave up .*fused logits differ"):
        assert certs(smooth, xs) == plain
    assert smooth.fuse_status.state is State.OFF
    assert smooth.fuse_status.reason.startswith("fused copies gave up")
    with pytest.raises(DrtFastError, match="fuse=True: the fused copies failed"):
        certs(SmoothedClassifier(ens, 10, sigma=0.25, fuse=True, rewriter=CountingRewriter(wrong_ops)), xs)


def test_engine_runs_the_kernel_only_in_bf16_and_when_asked(monkeypatch):
    bottleneck = _bottleneck()
    members = [resnet_member(8, seed=0), bottleneck, resnet_member(8, seed=1)]
    example = pixels(1)
    monkeypatch.setenv(fuse.CIFAR_RESNET_ENV, "wmma")
    rewriter = CudaRewriter(kernel_variant=lambda device: 0, require_cudnn=False)
    rewrite = rewriter.rewrite(members, example, torch.bfloat16, channels_last=False)
    assert [isinstance(r.module, fuse.CifarResNetMember) for r in rewrite.members] == [True, False, True]
    assert rewrite.kernel and rewrite.members[0].module.variant == 0
    assert rewrite.text.startswith("2 member(s) as one CIFAR ResNet kernel each (DRT_FAST_CIFAR_RESNET=wmma); "
                                   "28 fused convolutions, 31 BatchNorms folded in 1 member(s)"), rewrite.text
    with torch.no_grad():                           # on the CPU: the kernel's torch reference
        assert rel(rewrite.members[2].module(pixels(4)), members[2](pixels(4))) < 2e-2
    for dtype in (torch.float32, torch.float16):    # the kernel computes in bf16: bf16 runs only
        rewrite = rewriter.rewrite(members, example, dtype, channels_last=False)
        assert not any(isinstance(r.module, fuse.CifarResNetMember) for r in rewrite.members)
        assert not rewrite.kernel and "kernel" not in rewrite.text
    monkeypatch.undo()
    for value in ("1", "mma", "wmma"):              # never on the CPU
        monkeypatch.setenv(fuse.CIFAR_RESNET_ENV, value)
        assert fuse.cifar_resnet_variant(torch.device("cpu")) is None
    for value in ("0", "", "yes"):                  # off, whatever the device
        monkeypatch.setenv(fuse.CIFAR_RESNET_ENV, value)
        assert fuse.cifar_resnet_variant(torch.device("cuda")) is None


def test_engine_replaces_a_failing_kernel_by_the_fused_copies(monkeypatch):
    """A kernel member that fails its first-batch check costs the kernel, not the fusion:
    certification goes on with every member as a fused copy (cuDNN's on a GPU; here oneDNN's
    stand in), whose counts are those of a run that never asked for the kernel."""
    if not fuse.onednn_available(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 kernels for this CPU")
    ensemble = Ensemble([resnet_member(8, seed=s) for s in range(2)]).eval()
    x, keys = pixels(1), torch.tensor([0])

    def counts(variant):
        rewriter = CudaRewriter(conv_ops=fuse.onednn_ops(), kernel_variant=lambda device: variant,
                                require_cudnn=False)
        smooth = SmoothedClassifier(ensemble, 10, 0.25, seed=3, precision="bf16", channels_last=True,
                                    rewriter=rewriter)
        return smooth, smooth.sample_counts(x, keys, 300, 100)

    plain, want = counts(None)
    assert plain.fuse_status.on and "kernel" not in str(plain.fuse_status), plain.fuse_status
    kernel_forward = fuse.CifarResNetMember.forward
    monkeypatch.setattr(fuse.CifarResNetMember, "forward", lambda self, x: kernel_forward(self, x) * -1.0)
    calls = []                                      # draws the plain member runs
    hook = ensemble.members[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with pytest.warns(RuntimeWarning, match="CIFAR ResNet kernel was given up on"):
        smooth, got = counts(1)
    hook.remove()
    assert (got == want).all()
    assert calls == [64, 64]    # only the two first-batch checks: the later batches ran copies
    runner = smooth.engine.runner
    assert runner.gave_up is None and not runner.copies.has_kernel
    assert smooth.fuse_status.on and "kernel was given up on: fused logits differ" in \
        smooth.fuse_status.reason, smooth.fuse_status
    # for good: new copies (the members' tensors changed) are built without the kernel
    with torch.no_grad():
        ensemble.members[0][1].fc.bias.add_(0.0)
    assert (smooth.sample_counts(x, keys, 300, 100) == want).all()
    assert not runner.copies.has_kernel


# ------------------------------------------------------------------ on a GPU
def test_cuda_engine_fuses_by_default_and_agrees_with_the_members(cuda_device):
    torch.manual_seed(0)
    ens = Ensemble([member("cifar_resnet20", seed) for seed in range(3)]).to(cuda_device)
    xs = torch.rand(3, 3, 32, 32)
    for precision in ("fp32", "bf16"):
        plain = SmoothedClassifier(ens, 10, sigma=0.25, precision=precision, fuse=False)
        smooth = SmoothedClassifier(ens, 10, sigma=0.25, precision=precision)
        a, b = certs(plain, xs), certs(smooth, xs)
        assert str(smooth.fuse_status).startswith("on: 57 fused convolutions, 63 BatchNorms folded")
        # the same noise; a vote flips only where rounding moves a draw across a boundary
        for p, f in zip(a, b):
            assert p.label == f.label and abs(p.count - f.count) <= 3, (precision, a, b)


@pytest.mark.parametrize("name, value", [(fuse.CIFAR_RESNET_ENV, "mma"), (fuse.CIFAR_RESNET_ENV, "wmma"),
                                         (fuse.CIFAR_RESNET_ENV_ALIAS, "mma")])
def test_cuda_certify_runs_resnet_members_by_the_kernel_when_asked(cuda_device, monkeypatch, name, value):
    ensemble = Ensemble([resnet_member(20, seed=s) for s in range(3)]).to(cuda_device).eval()
    x = pixels(1)[0].to(cuda_device)
    counts = {}
    monkeypatch.delenv(fuse.CIFAR_RESNET_ENV, raising=False)
    monkeypatch.delenv(fuse.CIFAR_RESNET_ENV_ALIAS, raising=False)
    for env in ("0", value):
        monkeypatch.setenv(name, env)
        smooth = SmoothedClassifier(ensemble, 10, 0.25, seed=3, precision="bf16")
        counts[env] = smooth.sample_counts(x[None], torch.tensor([0]), 2000, 1000)
        # the kernel ran (a kernel that fails its first-batch check is replaced, with a warning)
        status = str(smooth.fuse_status)
        ran = "as one CIFAR ResNet kernel each" in status and "given up" not in status
        assert ran == (env == value), status
    # bf16 both ways, different kernels: the top class and its count nearly agree
    assert counts["0"].argmax() == counts[value].argmax()
    assert abs(int(counts["0"].max()) - int(counts[value].max())) <= 60
