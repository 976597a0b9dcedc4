"""Sequential certification at fixed radii (``certify_radii``) vs fixed-n CERTIFY
(``certify_many``), both drt-fast, same process, inputs, keys, n0, n_max = n, alpha, batch.

The ratio is fixed-n time / sequential time; the draws of each side and the certified
accuracy at every grid radius are recorded side by side (the sequential certificate at r
needs its grid's level r, the fixed-n one a radius >= r).

Cases: the embedded default's 225 test inputs, grid 0, 0.25, 0.5, 0.75 and the single
radius 0.25, n_max = 100,000; a linear oracle whose inputs have pA in {0.7, 0.9, 0.99, 1};
on a GPU (skipped without one), 3x CIFAR ResNet-110 with random weights at bf16.
Targets (issue 18): >= 4x fewer draws and >= 3x less time on the default grid, certified
accuracy within one input at every grid radius; >= 10x fewer draws on the oracle mix.
"""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

import drt_fast
from drt_fast import SmoothedClassifier

from test_certify import check_target, random_ensemble, record

N0, N_MAX, ALPHA, BATCH = 100, 100_000, 0.001, 1000
GRID = (0.0, 0.25, 0.5, 0.75)
HAS_CUDA = torch.cuda.is_available() and drt_fast.cuda_available()


def default_inputs():
    """(ensemble, xs, keys, labels, sigma): the embedded default's test subset, as
    ``drt-fast certify`` selects it."""
    assets = Path(drt_fast.__file__).parent / "assets"
    spec_path = assets / "default.json"
    if not spec_path.exists():
        pytest.skip("the embedded default ensemble is not installed")
    spec = json.loads(spec_path.read_text())
    from drt_fast.checkpoint import load_checkpoint

    ensemble, _ = load_checkpoint(assets / spec["model"])
    data = np.load(assets / spec["data"])
    positions = list(range(0, len(data["y"]), spec.get("skip", 1)))[:spec.get("max")]
    keys = data["idx"][positions].tolist() if "idx" in data else positions
    return (ensemble.eval(), torch.from_numpy(data["x"][positions]), keys, np.asarray(data["y"])[positions],
            float(spec["sigma"]))


def accuracy(certs, labels, grid):
    """Inputs certified correctly at each grid radius (a fixed-n certificate counts where its
    radius reaches r; a sequential one where its level is r or above)."""
    return [int(sum(c.label == y and c.radius >= r for c, y in zip(certs, labels))) for r in grid]


_FIXED = {}     # (case, inputs) -> (fixed-n certificates, seconds): one run serves every grid


def compare_sequential(benchmark, name, smooth, xs, keys, labels, grid, *, batch_size=BATCH, sync=None,
                       fixed_key=None):
    """One round of each side (a fixed-n run is long, and is shared by the cases of one
    ``fixed_key``); records the ratio, the draws and the certified accuracy of both."""
    sync = sync or (lambda: None)
    results, times, transfers = {}, {"fixed": [], "sequential": []}, {}

    def fixed():
        if fixed_key not in _FIXED:
            sync()
            start = time.perf_counter()
            certs = smooth.certify_many(xs, keys, N0, N_MAX, ALPHA, batch_size)
            sync()
            _FIXED[fixed_key] = (certs, time.perf_counter() - start)
        results["fixed"], seconds = _FIXED[fixed_key]
        times["fixed"].append(seconds)

    def sequential():
        sync()
        transfers["before"] = smooth.engine.transfers
        start = time.perf_counter()
        results["sequential"] = smooth.certify_radii(xs, keys, grid, N0, N_MAX, ALPHA, batch_size)
        sync()
        times["sequential"].append(time.perf_counter() - start)
        transfers["sequential"] = smooth.engine.transfers - transfers["before"]

    smooth.certify_radii(xs[:1], keys[:1], grid, N0, N_MAX, ALPHA, batch_size)     # warm-up
    if fixed_key is None:
        fixed_key = name
    benchmark.pedantic(sequential, setup=fixed, rounds=1, iterations=1, warmup_rounds=0)
    fixed_draws = len(keys) * (N0 + N_MAX)
    draws = sum(N0 + c.n for c in results["sequential"])
    acc_fixed = accuracy(results["fixed"], labels, grid)
    acc_seq = accuracy(results["sequential"], labels, grid)
    ratio, *_ = record(benchmark, name, times["fixed"], times["sequential"], extra={
        "grid": list(grid), "n0": N0, "n_max": N_MAX, "alpha": ALPHA, "batch_size": batch_size,
        "fixed_draws": fixed_draws, "sequential_draws": draws, "draw_ratio": fixed_draws / draws,
        "certified_fixed": acc_fixed, "certified_sequential": acc_seq, "inputs": len(keys),
        "sequential_host_syncs": transfers["sequential"]})
    print(f"[ratio] {name}: draws {fixed_draws:,} fixed / {draws:,} sequential = {fixed_draws / draws:.2f}x; "
          f"certified at {list(grid)}: fixed {acc_fixed}, sequential {acc_seq} of {len(keys)}; "
          f"{transfers['sequential']} reads of the counts from the device")
    return ratio, fixed_draws / draws, acc_fixed, acc_seq


def test_sequential_digits_default_grid(benchmark):
    ensemble, xs, keys, labels, sigma = default_inputs()
    smooth = SmoothedClassifier(ensemble, 10, sigma)
    ratio, draws, fixed, seq = compare_sequential(
        benchmark, "certify_radii digits default grid 0-0.75 n_max=1e5", smooth, xs, keys, labels, GRID,
        fixed_key="default")
    check_target("sequential: >= 4x fewer draws on the default grid", draws >= 4)
    check_target("sequential: >= 3x less time on the default grid", ratio >= 3)
    check_target("sequential: certified accuracy within one input at every grid radius",
                 all(abs(a - b) <= 1 for a, b in zip(fixed, seq)))


def test_sequential_digits_default_one_radius(benchmark):
    ensemble, xs, keys, labels, sigma = default_inputs()
    smooth = SmoothedClassifier(ensemble, 10, sigma)
    compare_sequential(benchmark, "certify_radii digits default radius 0.25 n_max=1e5", smooth, xs, keys,
                       labels, (0.25,), fixed_key="default")


class LinearScore(nn.Module):
    """Logits [s, -s] with s = w . x, ||w|| = 1: class 0 has probability Phi(s / sigma)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([0.6, -0.8]))

    def forward(self, x):
        s = (x.flatten(1) * self.w).sum(1)
        return torch.stack([s, -s], dim=1)


def test_sequential_linear_oracle_mix(benchmark):
    sigma = 0.25
    pA = np.repeat([0.7, 0.9, 0.99, 1.0], 25)
    s = sigma * norm.isf(np.maximum(1 - pA, 1e-20))                   # pA = 1: s = 9.3 sigma
    xs = torch.tensor(s[:, None] * np.array([[0.6, -0.8]]) + np.array([[0.4, 0.3]]), dtype=torch.float32)
    smooth = SmoothedClassifier(LinearScore(), 2, sigma)
    _, draws, *_ = compare_sequential(benchmark, "certify_radii linear oracle pA 0.7/0.9/0.99/1 grid 0-0.75",
                                      smooth, xs, list(range(len(pA))), np.zeros(len(pA), dtype=int), GRID,
                                      batch_size=10_000)
    check_target("sequential: >= 10x fewer draws on the pA mix 0.7/0.9/0.99/1", draws >= 10)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and CUDA kernels")
def test_sequential_gpu_resnet110_bf16(benchmark):
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    ensemble = random_ensemble("cifar_resnet110", device=device)
    xs = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    smooth = SmoothedClassifier(ensemble, 10, 0.25, precision="bf16")
    labels = [int(c.label) for c in smooth.certify_many(xs, range(20), N0, 1000, ALPHA, 2000)]
    compare_sequential(benchmark, f"certify_radii 3x ResNet-110 bf16 grid 0-0.75 ({torch.cuda.get_device_name()})",
                       smooth, xs, list(range(20)), labels, GRID, batch_size=2000, sync=torch.cuda.synchronize)
