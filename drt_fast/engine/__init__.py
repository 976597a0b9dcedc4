"""The sampling engine behind `drt_fast.SmoothedClassifier`.

* `Sampler` (sampler.py): requests ``(input, key, stream, first_draw, num_draws)`` -> int64
  vote counts, the draws of several requests packed into each batch, new requests admitted
  as others finish, a request extended by further draws of its input.
* `Engine` (steps.py): one batch, ``noisy_draws -> members -> vote_``; eager or replayed as a
  CUDA graph (graphs.py).
* `MemberRunner` (runner.py): the members, or their rewritten copies (rewriters.py), checked
  on their first batch and given up when they disagree.
* `Status` (status.py): what a lever did, a `State` and a reason.
"""
from .graphs import Graphs, capture
from .rewriters import CpuRewriter, CudaRewriter, Rewrite, default_rewriter
from .runner import MemberRunner
from .sampler import Lane, Request, Sampler
from .status import State, Status
from .steps import Engine, Plan, check_votes

__all__ = ["Sampler", "Lane", "Request", "Engine", "Plan", "MemberRunner", "Graphs", "capture",
           "CpuRewriter", "CudaRewriter", "Rewrite", "default_rewriter", "State", "Status",
           "count_ranges", "check_votes"]


def count_ranges(engine: Engine, xs, keys, ranges, batch_size: int, seed: int):
    """Vote counts ``[B, P, K]`` (int64 numpy) of draws ``first .. first+num-1`` for each of
    the P ``ranges`` ``[(first, num), ...]`` of each input xs ``[B, *S]`` (keys ``[B]``).

    The inputs go through in order, ``batch_size // reps`` at a time with ``reps =
    min(sum of nums, batch_size)`` draws each per batch.
    """
    import numpy as np

    total = sum(num for _, num in ranges)
    reps = min(total, batch_size)
    sampler = Sampler(engine, max(1, batch_size // reps), reps)
    requests = []
    for x, key in zip(xs, keys):
        lane = sampler.open(x, key, seed)
        requests.append([lane.request(first, num) for first, num in ranges])
        lane.close()
    for _ in sampler.run():
        pass
    K = engine.num_classes
    return np.array([[r.counts for r in per_input] for per_input in requests],
                    dtype=np.int64).reshape(len(requests), len(ranges), K)
