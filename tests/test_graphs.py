"""The engine's CUDA-graph step: replayed batches count exactly what eager batches count.

Capture itself needs a GPU (the CUDA test at the end). The bookkeeping around it -- static
buffers loaded per group, the first draw set per replay, the graph's own counts added to
the group's, one captured step per group shape and task, eager first and partial batches,
giving up on a failed capture -- is tested on the CPU with a stand-in capture that replays
by running the step again.
"""
import numpy as np
import pytest
import torch
from torch import nn

from drt_fast import Ensemble, SmoothedClassifier, smoothing
from drt_fast.errors import DrtFastError

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


def ensemble(device="cpu"):
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 36, K)) for _ in range(3)]
    return Ensemble(members).to(device)


def inputs(num=5):
    return torch.rand(num, 1, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Let the engine 'capture' on the CPU: replay runs the step body again. Returns the
    number of captures and replays so far."""
    calls = {"captures": 0, "replays": 0}

    def capture(body, device):
        calls["captures"] += 1

        def replay():
            calls["replays"] += 1
            body()
        return replay, None

    monkeypatch.setattr(smoothing, "_capture", capture)
    monkeypatch.setattr(SmoothedClassifier, "_graphs_possible",
                        lambda self, xs: self.cuda_graphs is not False)
    return calls


def counts_of(certs):
    return [(c.selection_counts.tolist(), c.estimation_counts.tolist()) for c in certs]


@pytest.mark.parametrize("n0,n,batch", [(20, 1000, 64),     # one input per group, many batches
                                        (16, 300, 1000)])   # groups of 3, 3 and 2 inputs
def test_replayed_steps_count_what_eager_steps_count(graphs_on_cpu, n0, n, batch):
    xs = inputs(8)
    eager = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=False)
    want = eager.certify_many(xs, range(8), n0, n, 0.01, batch)
    graphed = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True)
    got = graphed.certify_many(xs, range(8), n0, n, 0.01, batch)
    assert got == want and counts_of(got) == counts_of(want)
    assert graphs_on_cpu["replays"] > 0 and graphed.graph_status.startswith("on:")
    assert graphed.draws_performed == eager.draws_performed == 8 * (n0 + n)
    if batch == 1000:   # the first group runs eagerly (checks); then 3 and 2 inputs: two steps
        assert graphs_on_cpu["captures"] == 2
    # predict uses its own stream and no split: its own step, same labels as eager
    assert (graphed.predict_many(xs, range(8), 500, 0.01, batch)
            == eager.predict_many(xs, range(8), 500, 0.01, batch))
    # a second certify reuses the captured steps
    before = graphs_on_cpu["captures"]
    assert graphed.certify_many(xs, range(8), n0, n, 0.01, batch) == want
    assert graphs_on_cpu["captures"] == before


def test_members_whose_tensors_move_get_new_graphs(graphs_on_cpu):
    ens, xs = ensemble(), inputs(3)
    smooth = SmoothedClassifier(ens, K, sigma=0.5, cuda_graphs=True)
    first = smooth.certify_many(xs, range(3), 20, 1000, 0.01, 64)
    captured = graphs_on_cpu["captures"]
    assert smooth.certify_many(xs, range(3), 20, 1000, 0.01, 64) == first
    assert graphs_on_cpu["captures"] == captured                    # reused
    ens.to(torch.float64).to(torch.float32)      # same values, tensors at new addresses
    assert smooth.certify_many(xs, range(3), 20, 1000, 0.01, 64) == first
    assert graphs_on_cpu["captures"] == captured + 1                # captured again


def test_auto_leaves_large_batches_eager(graphs_on_cpu, monkeypatch):
    monkeypatch.setattr(SmoothedClassifier, "_GRAPH_AUTO_ELEMENTS", 1000)
    smooth = SmoothedClassifier(ensemble(), K, sigma=0.5)
    smooth.certify_many(inputs(2), range(2), 10, 200, 0.01, 64)      # 64 * 36 > 1000
    assert graphs_on_cpu["captures"] == 0
    assert smooth.graph_status == "off: a batch of draws holds 2,304 input elements (auto is on up to 1,000)"
    forced = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True)
    forced.certify_many(inputs(2), range(2), 10, 200, 0.01, 64)
    assert graphs_on_cpu["captures"] == 1


def test_a_failed_capture_falls_back_to_eager(monkeypatch):
    def capture(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(smoothing, "_capture", capture)
    monkeypatch.setattr(SmoothedClassifier, "_graphs_possible", lambda self, xs: True)
    xs = inputs(3)
    want = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=False).certify_many(
        xs, range(3), 10, 300, 0.01, 64)
    smooth = SmoothedClassifier(ensemble(), K, sigma=0.5)
    assert smooth.certify_many(xs, range(3), 10, 300, 0.01, 64) == want
    assert smooth.graph_status.startswith("off: capture failed (operation not permitted")
    with pytest.raises(DrtFastError, match="cuda_graphs=True: capture failed"):
        SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True).certify_many(
            xs, range(3), 10, 300, 0.01, 64)


def test_graphs_on_the_cpu_are_off_or_refused():
    smooth = SmoothedClassifier(ensemble(), K, sigma=0.5)
    smooth.certify(inputs(1)[0], 10, 100, 0.01, 64)
    assert smooth.graph_status == "off: not on a CUDA device"
    with pytest.raises(DrtFastError, match="cuda_graphs=True: CUDA graphs need"):
        SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True).certify(
            inputs(1)[0], 10, 100, 0.01, 64)
    with pytest.raises(DrtFastError, match="cuda_graphs must be"):
        SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=1)


@pytest.mark.parametrize("case,why", [
    ("no kernels", "drt_fast's CUDA kernels were not built (for this GPU)"),   # the fallbacks sync
    ("batch_members", "the ensemble runs its members batched (batch_members=True)"),
])
def test_graphs_stay_off_where_a_capture_would_be_wrong(monkeypatch, case, why):
    """Checked before any capture; a stand-in CUDA batch (only its device is read)."""
    from drt_fast import ops

    ens = ensemble()
    ens.batch_members = case == "batch_members"
    monkeypatch.setattr(ops, "kernels_run_on", lambda device: case != "no kernels")
    cuda_batch = type("Batch", (), {"device": torch.device("cuda")})()
    smooth = SmoothedClassifier(ens, K, sigma=0.5)
    assert smooth._graphs_possible(cuda_batch) is False and smooth.graph_status == f"off: {why}"
    forced = SmoothedClassifier(ens, K, sigma=0.5, cuda_graphs=True)
    with pytest.raises(DrtFastError, match=rf"cuda_graphs=True: {why.replace('(', '.').replace(')', '.')}"):
        forced._graphs_possible(cuda_batch)


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_give_the_eager_counts(cuda_device, precision):
    xs = inputs(5)
    ens = ensemble(cuda_device)
    results = {}
    for graphs in (False, True):
        smooth = SmoothedClassifier(ens, K, sigma=0.5, precision=precision, cuda_graphs=graphs)
        certs = smooth.certify_many(xs, range(5), 20, 2000, 0.01, 256)
        labels = smooth.predict_many(xs, range(5), 1000, 0.01, 256)
        results[graphs] = (counts_of(certs), labels)
        if graphs:
            assert smooth.graph_status.startswith("on:"), smooth.graph_status
    assert results[True] == results[False]
    assert np.sum(results[True][0][0][1]) == 2000


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_cuda_graphs_on_a_device_that_is_not_the_current_one(cuda_device):
    """--device cuda:1 with cuda:0 current: the capture must record on cuda:1 (otherwise the
    kernels run outside it, the graph is empty and every replay counts nothing)."""
    xs = inputs(3)
    ens = ensemble("cuda:1")
    results = {}
    with torch.cuda.device(0):
        for graphs in (False, True):
            smooth = SmoothedClassifier(ens, K, sigma=0.5, cuda_graphs=graphs)
            results[graphs] = counts_of(smooth.certify_many(xs, range(3), 20, 2000, 0.01, 256))
            if graphs:
                assert smooth.graph_status.startswith("on:"), smooth.graph_status
    assert results[True] == results[False]
