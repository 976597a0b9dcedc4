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

from drt_fast import Ensemble, SmoothedClassifier
from drt_fast.engine import Graphs, State
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


def stand_in_graphs(setting, capture):
    """The engine's graph machinery on the CPU, with ``capture`` in place of CUDA's."""
    return Graphs(setting, capture_fn=capture, kernels_run_on=lambda device: True, device_types=("cpu",))


@pytest.fixture
def graphs_on_cpu():
    """Let engines 'capture' on the CPU: replay runs the step body again. Returns the number
    of captures and replays so far, and ``install(smooth)``, which gives a classifier these
    graphs."""
    calls = {"captures": 0, "replays": 0}

    def capture(body, device):
        calls["captures"] += 1

        def replay():
            calls["replays"] += 1
            body()
        return replay, None

    def install(smooth):
        smooth.engine.graphs = stand_in_graphs(smooth.engine.graphs.setting, capture)
        return smooth

    calls["install"] = install
    return calls


def counts_of(certs):
    return [(c.selection_counts.tolist(), c.estimation_counts.tolist()) for c in certs]


@pytest.mark.parametrize("n0,n,batch", [(20, 1000, 64),     # one input per group, many batches
                                        (16, 300, 1000)])   # groups of 3, 3 and 2 inputs
def test_replayed_steps_count_what_eager_steps_count(graphs_on_cpu, n0, n, batch):
    xs = inputs(8)
    eager = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=False)
    want = eager.certify_many(xs, range(8), n0, n, 0.01, batch)
    graphed = graphs_on_cpu["install"](SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True))
    got = graphed.certify_many(xs, range(8), n0, n, 0.01, batch)
    assert got == want and counts_of(got) == counts_of(want)
    assert graphs_on_cpu["replays"] > 0 and graphed.graph_status.on
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
    smooth = graphs_on_cpu["install"](SmoothedClassifier(ens, K, sigma=0.5, cuda_graphs=True))
    first = smooth.certify_many(xs, range(3), 20, 1000, 0.01, 64)
    captured = graphs_on_cpu["captures"]
    assert smooth.certify_many(xs, range(3), 20, 1000, 0.01, 64) == first
    assert graphs_on_cpu["captures"] == captured                    # reused
    ens.to(torch.float64).to(torch.float32)      # same values, tensors at new addresses
    assert smooth.certify_many(xs, range(3), 20, 1000, 0.01, 64) == first
    assert graphs_on_cpu["captures"] == captured + 1                # captured again


def test_auto_leaves_large_batches_eager(graphs_on_cpu, monkeypatch):
    monkeypatch.setattr(Graphs, "AUTO_ELEMENTS", 1000)
    smooth = graphs_on_cpu["install"](SmoothedClassifier(ensemble(), K, sigma=0.5))
    smooth.certify_many(inputs(2), range(2), 10, 200, 0.01, 64)      # 64 * 36 > 1000
    assert graphs_on_cpu["captures"] == 0
    assert smooth.graph_status.state == State.OFF and str(smooth.graph_status) == \
        "off: a batch of draws holds 2,304 input elements (auto is on up to 1,000)"
    forced = graphs_on_cpu["install"](SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True))
    forced.certify_many(inputs(2), range(2), 10, 200, 0.01, 64)
    assert graphs_on_cpu["captures"] == 1


def test_a_failed_capture_falls_back_to_eager(monkeypatch):
    def capture(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    xs = inputs(3)
    want = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=False).certify_many(
        xs, range(3), 10, 300, 0.01, 64)
    smooth = SmoothedClassifier(ensemble(), K, sigma=0.5)
    smooth.engine.graphs = stand_in_graphs(None, capture)
    assert smooth.certify_many(xs, range(3), 10, 300, 0.01, 64) == want
    assert smooth.graph_status.state == State.OFF
    assert smooth.graph_status.reason.startswith("capture failed (operation not permitted")
    forced = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True)
    forced.engine.graphs = stand_in_graphs(True, capture)
    with pytest.raises(DrtFastError, match="cuda_graphs=True: capture failed"):
        forced.certify_many(xs, range(3), 10, 300, 0.01, 64)


def test_graphs_on_the_cpu_are_off_or_refused():
    smooth = SmoothedClassifier(ensemble(), K, sigma=0.5)
    smooth.certify(inputs(1)[0], 10, 100, 0.01, 64)
    assert str(smooth.graph_status) == "off: not on a CUDA device"
    with pytest.raises(DrtFastError, match="cuda_graphs=True: CUDA graphs need"):
        SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True).certify(
            inputs(1)[0], 10, 100, 0.01, 64)
    with pytest.raises(DrtFastError, match="cuda_graphs must be"):
        SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=1)


@pytest.mark.parametrize("case,why", [
    ("no kernels", "drt_fast's CUDA kernels were not built (for this GPU)"),   # the fallbacks sync
    ("batch_members", "the ensemble runs its members batched (batch_members=True)"),
])
def test_graphs_stay_off_where_a_capture_would_be_wrong(case, why):
    """Checked before any capture (no CUDA device is touched)."""
    batch_members = case == "batch_members"
    kernels = lambda device: case != "no kernels"      # noqa: E731
    graphs = Graphs(None, kernels_run_on=kernels)
    assert graphs.possible(torch.device("cuda"), batch_members) is False
    assert str(graphs.status) == f"off: {why}"
    forced = Graphs(True, kernels_run_on=kernels)
    with pytest.raises(DrtFastError, match=rf"cuda_graphs=True: {why.replace('(', '.').replace(')', '.')}"):
        forced.possible(torch.device("cuda"), batch_members)


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
            assert smooth.graph_status.on, smooth.graph_status
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
                assert smooth.graph_status.on, smooth.graph_status
    assert results[True] == results[False]


def test_sequential_certification_with_graphs_counts_what_eager_counts(graphs_on_cpu):
    """certify_radii changes its layout at every decision point (lanes finish and are
    extended): the captured steps are reloaded with each layout's rows and inputs."""
    xs = inputs(7)
    run = dict(radii=[0.0, 0.2], n0=40, n_max=3000, alpha=0.01, batch_size=256)
    want = SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=False).certify_radii(xs, range(7), **run)
    graphed = graphs_on_cpu["install"](SmoothedClassifier(ensemble(), K, sigma=0.5, cuda_graphs=True))
    got = graphed.certify_radii(xs, range(7), **run)
    assert got == want and [c.n for c in got] == [c.n for c in want]
    assert graphs_on_cpu["replays"] > 0 and graphed.graph_status.on


def test_graphs_stay_off_where_a_kernel_failed_its_first_use_check(graphs_on_cpu, monkeypatch):
    """An op whose kernels failed the first-use check runs its reference, which synchronises
    with the host: no capture, and the status says why."""
    from drt_fast import ops

    class Failed:
        def results(self):
            return {("vote_", "cpu"): ops.selfcheck.CheckResult("vote_", "cpu", "counts differ", 0.0)}

    monkeypatch.setattr(ops.selfcheck, "FIRST_USE", Failed())
    smooth = graphs_on_cpu["install"](SmoothedClassifier(ensemble(), K, sigma=0.5))
    smooth.certify_many(inputs(2), range(2), 10, 300, 0.01, 64)
    assert graphs_on_cpu["captures"] == 0
    assert str(smooth.graph_status) == "off: drt_fast's CUDA vote_ failed the first-use check on cpu (their references run)"
