"""certify_many (draws of several inputs packed into one batch) vs one input at a time.

For a small model and small n a single input's draws fill a batch poorly: n0 + n = 200
draws of an 8x8 digit is a tiny forward, and per-call overheads dominate. certify_many packs
``batch_size // (n0 + n)`` inputs into each forward. Cases, 64 digits test inputs, 3 digits
CNNs (the embedded default when it exists, else random weights), n0 = n = 100, on the CPU
and (when there is one) the GPU:

* drt-fast ``certify`` in a loop vs drt-fast ``certify_many`` (the packing alone);
* Cohen's loop (bench/reference.py) in a loop vs drt-fast ``certify_many`` (what a user
  certifying a test set gains end to end).

Same keys on both drt-fast sides, so the certificates must agree (up to draws whose top two
aggregated scores tie to the last bit, see drt_fast/smoothing.py).
"""
import json
from pathlib import Path

import pytest
import torch

import drt_fast
from drt_fast import SmoothedClassifier
from drt_fast import data as df_data

from reference import ReferenceSmooth
from test_certify import random_ensemble, record, timed_pair

N_INPUTS, N0, N, ALPHA, BATCH = 64, 100, 100, 0.001, 6400


def digits_ensemble():
    """(ensemble, sigma, what): the embedded default when present, else 3 random digits CNNs."""
    assets = Path(drt_fast.__file__).parent / "assets"
    spec_path = assets / "default.json"
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        if (assets / spec["model"]).exists():
            from drt_fast.checkpoint import load_checkpoint

            ensemble, meta = load_checkpoint(assets / spec["model"])
            return ensemble.eval(), float(spec.get("sigma", 0.25)), "default"
    return random_ensemble("digits_cnn"), 0.25, "random"


HAS_CUDA = torch.cuda.is_available() and drt_fast.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and CUDA kernels"))]


@pytest.fixture(scope="module", params=DEVICES)
def setup(request):
    ensemble, sigma, what = digits_ensemble()
    test = df_data.load("digits", "test")
    device = request.param
    xs, keys = test.x[:N_INPUTS].to(device), torch.arange(N_INPUTS)
    if device == "cuda":
        what += ", cuda"
    return ensemble.to(device), sigma, what, xs, keys


def _sync(xs):
    return torch.cuda.synchronize if xs.is_cuda else None


def _many(smooth, xs, keys):
    return smooth.certify_many(xs, keys, N0, N, ALPHA, BATCH)


def test_many_vs_one_at_a_time(benchmark, setup):
    ensemble, sigma, what, xs, keys = setup
    smooth = SmoothedClassifier(ensemble, 10, sigma)
    out = {}

    def one_at_a_time():
        out["one"] = [smooth.certify(x, N0, N, ALPHA, BATCH, key=int(k)) for x, k in zip(xs, keys)]

    def many():
        out["many"] = _many(smooth, xs, keys)

    one_at_a_time(), many()                                           # warm-up
    ref_times, ours_times = timed_pair(benchmark, many, one_at_a_time, rounds=3, sync=_sync(xs))
    agree = sum(a == b for a, b in zip(out["one"], out["many"]))
    record(benchmark, f"certify_many vs certify x{N_INPUTS} ({what} digits 3x, n0=n={N}, "
           f"b={BATCH})", ref_times, ours_times, draws=N_INPUTS * (N0 + N),
           extra={"inputs": N_INPUTS, "agreeing_certificates": agree})
    assert agree >= N_INPUTS - 2, f"certify_many disagrees with certify on {N_INPUTS - agree} inputs"


def test_many_vs_reference_loop(benchmark, setup):
    ensemble, sigma, what, xs, keys = setup
    smooth = SmoothedClassifier(ensemble, 10, sigma)
    reference = ReferenceSmooth(ensemble, 10, sigma)

    def ref():
        return [reference.certify(x, N0, N, ALPHA, BATCH) for x in xs]

    def many():
        return _many(smooth, xs, keys)

    ref(), many()                                                     # warm-up
    ref_times, ours_times = timed_pair(benchmark, many, ref, rounds=3, sync=_sync(xs))
    record(benchmark, f"certify_many vs Cohen loop x{N_INPUTS} ({what} digits 3x, n0=n={N}, "
           f"b={BATCH})", ref_times, ours_times, draws=N_INPUTS * (N0 + N),
           extra={"inputs": N_INPUTS})
