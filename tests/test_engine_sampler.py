"""drt_fast.engine.Sampler: requests -> vote counts, whatever the packing.

A request's counts are a function of (seed, key, its draw range) alone -- not of the
slots, the draws a lane takes a step, the other lanes in a batch, how the range is split
into requests and extensions, or when a lane is opened -- for a model whose rows do not
depend on their batch. Batches stay full while lanes come and go.
"""
import numpy as np
import pytest
import torch
from torch import nn

from drt_fast import ops
from drt_fast.engine import Engine, Sampler
from drt_fast.ensemble import Ensemble
from drt_fast.errors import DrtFastError

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
SIGMA = 0.4


class RowwiseAffine(nn.Module):
    """K-class affine logits in float64 via elementwise products (batch-independent rows);
    records the size of every batch it sees."""

    def __init__(self, d, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(K, d, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64) * 0.1)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return (x.flatten(1).double()[:, None, :] * self.weight).sum(-1) + self.bias


def engine(members=2):
    ens = Ensemble([RowwiseAffine(12, seed) for seed in range(members)])
    return Engine(ens, K, SIGMA, "fp32", fuse=False, cuda_graphs=False)


def inputs(num, seed=0):
    return torch.rand(num, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def direct(eng, x, key, seed, first, num):
    """The counts of draws first .. first+num-1, the plain way: reference noise in one
    batch, torch aggregation, bincount."""
    draws = ops.reference_noisy_draws(x[None], torch.tensor([key]), torch.tensor([first]), num, SIGMA, seed)
    with torch.inference_mode():
        labels = eng.model.aggregate(eng.model(draws))
    return np.bincount(labels.numpy(), minlength=K)


def drain(sampler):
    finished = []
    for done in sampler.run():
        finished += done
    return finished


@pytest.mark.parametrize("slots,reps", [(1, 1000), (3, 64), (4, 7), (16, 100)])
def test_counts_do_not_depend_on_the_packing(slots, reps):
    eng, xs = engine(), inputs(6)
    plan = [(0, 100), (100, 450)], [(0, 37)], [(5, 1), (6, 300), (1000, 80)], [(0, 512)], \
        [(2**32 - 50, 50)], [(0, 3), (3, 3), (6, 3)]
    sampler = Sampler(eng, slots, reps)
    requests = []
    for i, ranges in enumerate(plan):
        seed = 7 if i % 2 else 2**40 + 1                  # two streams share the batches
        lane = sampler.open(xs[i], 10 * i, seed)
        requests += [(i, seed, first, num, lane.request(first, num)) for first, num in ranges]
        lane.close()
    finished = drain(sampler)
    assert len(finished) == len(requests) and all(r.finished for *_, r in requests)
    for i, seed, first, num, request in requests:
        assert request.done == num and request.counts.sum() == num
        assert (request.counts == direct(eng, xs[i], 10 * i, seed, first, num)).all(), (i, first)
    assert eng.draws_performed == sum(num for *_, num, _ in requests)


def test_extended_requests_count_the_draws_of_one_longer_request():
    eng, xs = engine(), inputs(3)
    sampler = Sampler(eng, 2, 50)
    lanes = [sampler.open(x, key, 3) for key, x in enumerate(xs)]
    requests = [lane.request(10, 60) for lane in lanes]
    extensions = {0: [40, 100], 1: [1], 2: []}
    for done in sampler.run():
        for request in done:
            key = request.lane.key
            if extensions[key]:
                assert request.counts.sum() == request.num_draws     # counted so far
                request.extend(extensions[key].pop(0))
            else:
                request.lane.close()
    for key, request, total in zip(range(3), requests, (200, 61, 60)):
        assert request.num_draws == total and request.finished
        assert (request.counts == direct(eng, xs[key], key, 3, 10, total)).all()


def test_lanes_opened_while_running_fill_the_slots_so_batches_stay_full():
    eng, xs = engine(1), inputs(12)
    member = eng.model.members[0]
    sampler = Sampler(eng, 4, 25)
    lengths = [25 * (1 + k % 5) for k in range(12)]       # lanes finish at different steps
    opened = 0

    def open_next():
        nonlocal opened
        lane = sampler.open(xs[opened], opened, 1)
        lane.request(0, lengths[opened])
        lane.close()
        opened += 1

    for _ in range(4):
        open_next()
    for done in sampler.run():
        for _ in done:
            if opened < 12:
                open_next()
    total = sum(lengths)
    assert sum(member.batches) == total
    full = [b for b in member.batches if b == 100]
    # every batch is full until fewer than 4 lanes have draws left
    assert member.batches[:len(full)] == full and len(full) >= (total - 3 * 125) // 100


def test_a_slot_is_kept_while_its_lane_is_open():
    eng, x = engine(), inputs(2)
    sampler = Sampler(eng, 1, 10)
    first = sampler.open(x[0], 0, 1)
    request = first.request(0, 10)
    second = sampler.open(x[1], 1, 1)
    second.request(0, 10)
    second.close()
    run = sampler.run()
    assert next(run) == [request]
    with pytest.raises(DrtFastError, match="an open lane has no request left"):
        next(run)                    # the first lane neither extended nor closed


def test_bad_requests_are_refused():
    eng, x = engine(), inputs(2)
    sampler = Sampler(eng, 2, 10)
    lane = sampler.open(x[0], 0, 1)
    with pytest.raises(DrtFastError, match="below 2\\^32"):
        lane.request(2**32 - 5, 6)
    with pytest.raises(DrtFastError, match="num_draws must be >= 1"):
        lane.request(0, 0)
    earlier = lane.request(0, 5)
    lane.request(5, 5)
    with pytest.raises(DrtFastError, match="only a lane's last request"):
        earlier.extend(3)
    with pytest.raises(DrtFastError, match="share a shape"):
        sampler.open(torch.rand(3, 4, 4), 1, 1)
    with pytest.raises(DrtFastError, match="key must be"):
        sampler.open(x[1], -1, 1)
    lane.close()
    with pytest.raises(DrtFastError, match="closed lane"):
        lane.request(10, 5)
    with pytest.raises(DrtFastError, match="closed lane"):
        lane.last.extend(5)
    assert [r.num_draws for r in drain(sampler)] == [5, 5]
