"""Where certify time goes, drt-fast vs Cohen's loop: noise, member forwards, vote/count, rest.

    OMP_NUM_THREADS=1 python bench/profile_engine.py [--arch default|digits_cnn|cifar_resnet20]
        [--n 100000] [--batch 1000] [--repeats 3] [--mode we] [--precision fp32]
        [--channels-last]

Each phase is timed with a wall clock around the calls (drt-fast: ``ops.noisy_draws_eager``,
the engine's ``MemberRunner.forward``, ``ops.vote_eager_``; reference: ``repeat + randn``, the member
forwards, aggregation + ``.cpu()`` + bincount); "rest" is the total minus the phases
(Python, statistics, allocation). The best of ``--repeats`` runs is printed. Not collected
by pytest (no ``test_`` prefix).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import drt_fast  # noqa: E402
from drt_fast import SmoothedClassifier, ops  # noqa: E402
from reference import ReferenceSmooth, aggregate, lower_confidence_bound  # noqa: E402


class _Clock:
    def __init__(self):
        self.seconds = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed


def profile_ours(ensemble, x, n0, n, batch, sigma, precision, channels_last=None):
    clock = _Clock()
    if channels_last is not False:  # may convert the model in place: keep the reference's as it is
        ensemble = copy.deepcopy(ensemble)
    smooth = SmoothedClassifier(ensemble, 10, sigma, precision=precision,
                                channels_last=channels_last)
    smooth.certify(x, n0, min(n, batch), 0.001, batch)                      # warm-up
    runner = smooth.engine.runner
    runner.forward = clock.wrap("forward", runner.forward)
    real = ops.noisy_draws_eager, ops.vote_eager_
    ops.noisy_draws_eager = clock.wrap("noise", real[0])     # the engine calls them through drt_fast.ops
    ops.vote_eager_ = clock.wrap("vote", real[1])
    try:
        start = time.perf_counter()
        smooth.certify(x, n0, n, 0.001, batch)
        total = time.perf_counter() - start
    finally:
        ops.noisy_draws_eager, ops.vote_eager_ = real
    return total, clock.seconds


def profile_reference(ensemble, x, n0, n, batch, sigma):
    """ReferenceSmooth.certify with each phase of _sample_noise timed (same code, split)."""
    ref = ReferenceSmooth(ensemble, 10, sigma)
    clock = {"noise": 0.0, "forward": 0.0, "vote": 0.0}

    def sample(num):
        counts = np.zeros(ref.num_classes, dtype=np.int64)
        with torch.no_grad():
            for _ in range(math.ceil(num / batch)):
                t0 = time.perf_counter()
                this = min(batch, num)
                num -= this
                b = x.repeat((this,) + (1,) * x.dim())
                noisy = b + torch.randn_like(b) * sigma
                t1 = time.perf_counter()
                logits = torch.stack([m(noisy) for m in ref.members])
                t2 = time.perf_counter()
                labels = aggregate(logits, ref.mode, ref.weights)
                counts += np.bincount(labels.cpu().numpy(), minlength=ref.num_classes)
                t3 = time.perf_counter()
                clock["noise"] += t1 - t0
                clock["forward"] += t2 - t1
                clock["vote"] += t3 - t2
        return counts

    sample(min(n, batch))                                                   # warm-up
    for key in clock:
        clock[key] = 0.0
    start = time.perf_counter()
    selection = sample(n0)
    estimation = sample(n)
    lower_confidence_bound(int(estimation[selection.argmax()]), n, 0.001)
    return time.perf_counter() - start, clock


def build(arch):
    if arch == "default":
        assets = Path(drt_fast.__file__).parent / "assets"
        spec = json.loads((assets / "default.json").read_text())
        from drt_fast.checkpoint import load_checkpoint
        ensemble, _ = load_checkpoint(assets / spec["model"])
        x = torch.from_numpy(np.load(assets / spec["data"])["x"][0])
        return ensemble.eval(), x, float(spec["sigma"])
    from test_certify import random_ensemble, random_input
    return random_ensemble(arch), random_input(arch), 0.25


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="default")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--channels-last", action="store_true",
                        help="drt-fast writes channels-last draws and converts its model copy "
                             "(default: the engine's own choice, channels-last for 3+ channels)")
    args = parser.parse_args(argv)
    ensemble, x, sigma = build(args.arch)
    if args.mode:
        ensemble.mode = args.mode
    rows = {}
    for _ in range(args.repeats):
        for side, run in (("reference", lambda: profile_reference(ensemble, x, args.n0, args.n,
                                                                   args.batch, sigma)),
                          ("drt-fast", lambda: profile_ours(ensemble, x, args.n0, args.n,
                                                            args.batch, sigma, args.precision,
                                                            True if args.channels_last else None))):
            total, phases = run()
            if side not in rows or total < rows[side][0]:
                rows[side] = (total, phases)
    print(f"{args.arch} x{len(ensemble)} {ensemble.mode} n0={args.n0} n={args.n} "
          f"batch={args.batch} precision={args.precision} channels_last={'on' if args.channels_last else 'engine default'} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.1f}")
    print(f"{'':10} {'total s':>8} {'noise':>14} {'forward':>14} {'vote/count':>14} {'rest':>14}")
    for side, (total, phases) in rows.items():
        rest = total - sum(phases.values())
        cells = [f"{phases.get(k, 0.0):7.3f} ({phases.get(k, 0.0) / total:4.0%})"
                 for k in ("noise", "forward", "vote")] + [f"{rest:7.3f} ({rest / total:4.0%})"]
        print(f"{side:10} {total:8.3f} " + " ".join(f"{c:>14}" for c in cells))
    ratio = rows["reference"][0] / rows["drt-fast"][0]
    print(f"ratio (reference / drt-fast): {ratio:.2f}x")


if __name__ == "__main__":
    main()
