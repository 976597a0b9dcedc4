"""Kernel benchmarks: drt-fast's fused ops against the plain torch they replace.

CPU targets (issue 3): noisy_draws at least as fast as ``x.repeat_interleave + sigma * randn``;
vote_ at least 2x the torch reference (softmax, weighted mean, argmax, bincount).
GPU targets: vote_ >= 5x the torch reference. CUDA cases skip without a GPU.
Run: ``pytest bench/test_kernels.py`` (ratios in the table at the end).
"""
import pytest
import torch

import drt_fast
from drt_fast import ops

SIGMA = 0.25


def _devices():
    cuda = torch.cuda.is_available() and drt_fast.cuda_available()
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not cuda, reason="needs a GPU and CUDA kernels"))]


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else None


# (name, input shape, inputs per batch, draws per input): a batch of 1000 noisy draws (CPU)
NOISE_CASES = [
    ("digits 1x8x8", (1, 8, 8), 1, 1000),
    ("cifar 3x32x32", (3, 32, 32), 1, 1000),
    ("cifar 3x32x32, 10 inputs", (3, 32, 32), 10, 100),
    ("imagenet 3x224x224", (3, 224, 224), 1, 32),
]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name,shape,batch,reps", NOISE_CASES, ids=[c[0] for c in NOISE_CASES])
def test_noisy_draws(compare, device, name, shape, batch, reps):
    if device == "cuda":
        reps *= 10  # a GPU batch is bigger
    x = torch.rand(batch, *shape, device=device)
    keys = torch.arange(batch, device=device)
    first = torch.zeros(batch, dtype=torch.int64, device=device)

    def ours():
        return ops.noisy_draws(x, keys, first, reps, SIGMA, 0)

    def ref():  # Cohen's _sample_noise: repeat, then add sigma * randn
        batch_x = x.repeat_interleave(reps, dim=0)
        return batch_x + SIGMA * torch.randn_like(batch_x)

    ratio = compare(f"noisy_draws {device} {name} x{reps} fp32", ours, ref, rounds=15, sync=_sync(device))
    assert ratio > 0


def reference_vote(logits, rows, counts, weights):
    """What vote_('we') replaces: softmax, weighted mean over members, argmax, bincount."""
    members, draws, classes = logits.shape
    probs = torch.softmax(logits.float(), dim=2)
    score = (weights[:, None, None] * probs).sum(0) / weights.sum()
    labels = score.argmax(1)
    counts += torch.bincount(rows * classes + labels, minlength=counts.numel()).view_as(counts)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize("members", [1, 3, 8])
def test_vote(compare, device, members, classes):
    draws = 1000 if device == "cpu" else 10_000
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(members, draws, classes, generator=gen) * 3).to(device)
    rows = (torch.arange(draws) // 100).to(device)
    weights = (torch.rand(members, generator=gen) + 0.5).to(device)
    counts = torch.zeros(draws // 100, classes, dtype=torch.int64, device=device)

    def ours():
        ops.vote_(logits, rows, counts, "we", weights)

    def ref():
        reference_vote(logits, rows, counts, weights)

    ratio = compare(f"vote_ {device} we M={members} K={classes} R={draws}", ours, ref, rounds=15,
                    sync=_sync(device))
    assert ratio > 0


@pytest.mark.parametrize("cols", [256, 128])
def test_dense_layer_epilogue(compare, cols):
    """A dense member's layer on the CPU (fuse.DenseMember): torch.mm + bias_act_ (one pass)
    against torch.addmm + relu_ (the bias copied into the output first, then a second pass).
    1000 draws of the digits CNN's layers (64 -> 256, 256 -> 128)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 64 if cols == 256 else 256, generator=gen)
    weight, bias = torch.randn(x.shape[1], cols, generator=gen), torch.randn(cols, generator=gen)

    def ours():
        h = torch.mm(x, weight)
        assert ops.bias_act_cpu_(h, bias, True), "the bias_act_ CPU kernel did not run"

    def ref():
        torch.addmm(bias, x, weight).relu_()

    ratio = compare(f"dense layer cpu {x.shape[1]}->{cols} x1000: mm + bias_act_ vs addmm + relu_",
                    ours, ref, rounds=15)
    assert ratio > 0
