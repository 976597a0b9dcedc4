"""drt_fast.ops.extension: which implementation runs an op. A missing build raises a clear
ImportError; the reference switch (`ops.use_reference`, ``DRT_FAST_REFERENCE_OPS=1``) makes
every op, custom op and eager twin, run its pure-torch reference (ops/reference.py) -- with
the same results, noise bit for bit. (The build itself: test_build.py.)"""
import subprocess
import sys

import pytest
import torch

import drt_fast
from cli_fixtures import NEUTRAL_CWD, subprocess_env
from drt_fast import ops


def _noisy_args():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 3, 3, generator=gen)
    return (x, torch.tensor([3, 9]), torch.tensor([0, 5]), 4, 0.5, 7)


def _vote_args():
    logits = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(1))
    return logits, torch.arange(12) // 4, torch.zeros(3, 5, dtype=torch.int64), "we", torch.ones(3)


def test_missing_cpu_kernels_raise_import_error(monkeypatch):
    monkeypatch.setattr(ops.extension, "cpu_kernels", None)
    monkeypatch.setattr(ops.extension, "cpu_import_error", ImportError("no module"))
    with pytest.raises(ImportError, match="pip install"):
        ops.noisy_draws(*_noisy_args())


def test_cuda_available_is_a_bool():
    assert isinstance(drt_fast.cuda_available(), bool)
    assert drt_fast.cuda_available() is ops.cuda_available()


@pytest.fixture
def spies(monkeypatch):
    """Calls of each public reference, counted by name (the ops reach them through
    `drt_fast.ops.reference`)."""
    calls = {}
    for name in ("reference_noisy_draws", "reference_vote_", "reference_bias_act_", "reference_dense_chain",
                 "reference_cifar_resnet"):
        real = getattr(ops.reference, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops.reference, name, spy)
    return calls


def _dense_plan():
    """dense_chain's arguments: a dense member's plan (fuse.DenseMember) and a batch."""
    from drt_fast import fuse

    gen = torch.Generator().manual_seed(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    dense = fuse.dense_for_inference(mlp, torch.rand(1, 6, generator=gen)).module
    assert dense.chained
    return torch.rand(5, 6, generator=gen), dense.chain_meta, dense.chain_params, dense.chain_out


def _run_every_cpu_op():
    """Each op with a CPU kernel, as custom op and eager twin (for bias_act_ and dense_chain:
    the direct kernel calls) -> their results."""
    noisy = [ops.noisy_draws(*_noisy_args()), ops.noisy_draws_eager(*_noisy_args())]
    counts = []
    for vote in (ops.vote_, ops.vote_eager_):
        args = _vote_args()
        vote(*args)
        counts.append(args[2])
    gen = torch.Generator().manual_seed(3)
    h, bias = torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)
    biased = h.clone()
    ops.bias_act_(biased, bias, True)
    direct = [ops.bias_act_cpu_(h.clone(), bias, True), ops.dense_chain_cpu(*_dense_plan())]
    return noisy, counts, [biased], ops.dense_chain(*_dense_plan()), direct


def test_reference_switch_runs_every_op_as_its_reference(spies):
    kernels = _run_every_cpu_op()
    assert spies == {}                                       # the C++ kernels ran
    assert not ops.reference_in_use()
    with ops.use_reference():
        assert ops.reference_in_use()
        references = _run_every_cpu_op()
    assert not ops.reference_in_use()
    # each op and its eager twin went to the reference; the direct kernel calls of dense
    # members did nothing and said so (their callers fall back to the references)
    assert spies == {"reference_noisy_draws": 2, "reference_vote_": 2, "reference_bias_act_": 1,
                     "reference_dense_chain": 1}
    assert kernels[4][0] is True and kernels[4][1] is not None
    assert references[4] == [False, None]
    for ours, ref in zip(kernels[0] + kernels[1] + kernels[2], references[0] + references[1] + references[2]):
        assert torch.equal(ours, ref)                        # noise bit for bit, the same votes
    torch.testing.assert_close(references[3], kernels[3])


def test_reference_switch_as_a_function_and_nested():
    previous = ops.use_reference(True)         # a call sets it for the process...
    try:
        assert ops.reference_in_use()
        with ops.use_reference(False):          # ...a context restores what was before
            assert not ops.reference_in_use()
        assert ops.reference_in_use()
    finally:
        with previous:                          # exiting the first call's object restores it
            pass
    assert not ops.reference_in_use()
    with pytest.raises(RuntimeError), ops.use_reference():
        raise RuntimeError("restored on errors too")
    assert not ops.reference_in_use()


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), (None, False)])
def test_reference_switch_from_the_environment(value, on):
    """DRT_FAST_REFERENCE_OPS=1 at import: the ops run their references from the start."""
    code = ("import drt_fast.ops as o, torch\n"
            "calls = []\n"
            "real = o.reference.reference_vote_\n"
            "o.reference.reference_vote_ = lambda *a: calls.append(1) or real(*a)\n"
            "counts = torch.zeros(1, 3, dtype=torch.int64)\n"
            "o.vote_(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.int64), counts, 'mv', torch.ones(2))\n"
            "print(o.reference_in_use(), len(calls), int(counts.sum()))\n")
    # the drt_fast under test (an installed one, or a source tree built in place), from a
    # folder that holds no other
    env = {k: v for k, v in subprocess_env().items() if k != ops.extension.REFERENCE_ENV}
    if value is not None:
        env[ops.extension.REFERENCE_ENV] = value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=NEUTRAL_CWD)
    assert out.stdout.split() == [str(on), "1" if on else "0", "4"]


def test_cuda_reference_switch_runs_the_references_on_the_gpu(cuda_device, spies):
    from test_cifar_resnet_kernel import kernel_member, pixels, resnet_member

    x, keys, first, *rest = _noisy_args()
    args = (x.to(cuda_device), keys.to(cuda_device), first.to(cuda_device), *rest)
    logits, rows, counts, agg, weights = (t.to(cuda_device) if torch.is_tensor(t) else t for t in _vote_args())
    k = kernel_member(resnet_member(8)).to(cuda_device)
    kernel_logits = ops.cifar_resnet(pixels(2).to(cuda_device), k.weights, k.biases, k.norm, k.fc_w, k.fc_b,
                                     k.blocks, k.variant)
    assert spies == {}
    with ops.use_reference():
        assert not ops.kernels_run_on(cuda_device)
        assert torch.equal(ops.noisy_draws(*args), ops.noisy_draws(*args))
        ops.vote_(logits, rows, counts, agg, weights)
        ops.vote_eager_(logits, rows, counts, agg, weights)
        ref_logits = ops.cifar_resnet(pixels(2).to(cuda_device), k.weights, k.biases, k.norm, k.fc_w, k.fc_b,
                                      k.blocks, k.variant)
    assert spies == {"reference_noisy_draws": 2, "reference_vote_": 2, "reference_cifar_resnet": 1}
    assert int(counts.sum()) == 24
    assert torch.equal(ops.noisy_draws(*args), ops.noisy_draws_eager(*args))      # kernels again
    assert float((kernel_logits - ref_logits).norm() / ref_logits.norm()) < 5e-3
