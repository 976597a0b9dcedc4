"""The CUDA noise and vote kernels checked at their first use on each device.

The first ``noisy_draws`` (or ``vote_``) a process runs by the CUDA kernels of a device
first runs the op on a small fixed case there and on the CPU kernels (`compare`): the noise
must agree bit for bit, the counts exactly. Where they differ, or the launch fails, that op
on that device runs its pure-torch reference from then on, with one RuntimeWarning naming
the device and the op (`FirstUseCheck`). The case covers each kernel path: noise with
vector and scalar accesses, channels-last and general indexing, every output dtype, a NaN
input, the top of the draw range and a 64-bit seed; votes of every aggregation mode and
logits dtype, with the thread-per-draw kernels (up to 16 and 32 classes) and the
block-per-draw one, an exact tie and non-finite logits.

`compare` and `FirstUseCheck` take the device runner as a parameter (`EagerOps`, the ops'
own launch code, for the real check), so both can be tested without a GPU.
"""
import threading
import time
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import DrtFastError, first_line
from ..validate import AGGREGATIONS

CHECKED_OPS = ("noisy_draws", "vote_")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VOTE_CLASSES = (10, 20, 40)                        # CUDA vote_: <= 16, <= 32 classes a thread; a block


class EagerOps:
    """The device runner of the real check: the ops' eager twins (`noise.noisy_draws_eager`,
    `vote.vote_eager_`), which launch the kernels of their tensors' device as every call does.
    A stand-in runner has the same two methods."""

    def noisy_draws(self, x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last) -> Tensor:
        from .noise import noisy_draws_eager
        return noisy_draws_eager(x, keys, first_draw, reps, sigma, seed, out_dtype, channels_last)

    def vote_(self, logits, rows, counts, agg, weights) -> None:
        from .vote import vote_eager_
        vote_eager_(logits, rows, counts, agg, weights)


def noise_case() -> list:
    """The fixed ``noisy_draws`` calls, as argument tuples on the CPU: a ``[2, 3, 4, 4]`` input
    (whole quads: vector accesses) in every output dtype, contiguous and channels-last (3
    channels, 16 positions: groups of 4); a 9-element bf16 input (a partial quad: scalar
    accesses); 5 channels channels-last (the general path); NaN and inf inputs, keys near
    2^62, draws up to 2^32 - 1 and a seed above 2^63."""
    gen = torch.Generator().manual_seed(20)
    x = torch.rand(2, 3, 4, 4, generator=gen)
    x[1, 2, 3, 1] = float("nan")
    keys, first = torch.tensor([7, 2**62 + 5]), torch.tensor([0, 2**32 - 3])
    calls = [(x, keys, first, 3, 0.25, 2**63 + 11, dtype, channels_last)
             for dtype in DTYPES for channels_last in (False, True)]
    odd = torch.rand(3, 1, 3, 3, generator=gen).to(torch.bfloat16)
    odd[0, 0, 1, 1], odd[2, 0, 0, 2] = float("inf"), float("nan")
    calls.append((odd, torch.tensor([1, 2, 3]), torch.tensor([5, 0, 99]), 2, 1.0, 3, torch.float16, False))
    wide = torch.rand(1, 5, 2, 2, generator=gen)
    calls.append((wide, torch.tensor([4]), torch.tensor([12]), 2, 0.5, 0, torch.float32, True))
    return calls


def vote_case() -> list:
    """The fixed ``vote_`` calls, as argument tuples on the CPU (counts zero): 3 members, 24
    draws into 2 rows, for each class count of `VOTE_CLASSES`, logits dtype and aggregation
    mode; draw 0 an exact tie (class 0 wins), draws 1 and 2 with a NaN and an inf logit (no
    vote). Its other draws are clear of near-ties (tests/test_ops_extension.py), where float
    rounding could part CPU and GPU."""
    calls = []
    for classes in VOTE_CLASSES:
        gen = torch.Generator().manual_seed(classes)
        logits = torch.randn(3, 24, classes, generator=gen) * 3
        logits[:, 0] = 1.0
        logits[1, 1, classes // 2] = float("nan")
        logits[2, 2, 0] = float("inf")
        rows = torch.arange(24) % 2
        weights = torch.tensor([0.5, 0.3, 0.2])
        for dtype in DTYPES:
            typed = logits.to(dtype)
            for agg in AGGREGATIONS:
                calls.append((typed, rows, torch.zeros(2, classes, dtype=torch.int64), agg, weights))
    return calls


def _copy(args, device, copies: dict):
    """The case's tensors copied to ``device``, each once (``copies``, by id): the calls share
    inputs, and each has counts of its own, which its vote adds to (the case's stay zero)."""
    for a in args:
        if isinstance(a, Tensor) and id(a) not in copies:
            copies[id(a)] = a.to(device, copy=True)
    return tuple(copies[id(a)] if isinstance(a, Tensor) else a for a in args)


def _bits(t: Tensor) -> Tensor:
    """A float tensor's bits, to compare NaNs and signed zeros too."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def compare(op: str, runner, device, expected=None) -> Optional[str]:
    """Run ``op``'s fixed case (`noise_case`, `vote_case`) on ``device`` by ``runner`` and on
    the CPU by ``expected`` (default `EagerOps`: the CPU kernels) -> None where the results
    agree (noise bit for bit, counts exactly), else one line saying what differs or what the
    runner raised. Synchronizes with ``device`` (it reads the results back)."""
    expected = EagerOps() if expected is None else expected
    device = torch.device(device)
    cases = {"noisy_draws": noise_case, "vote_": vote_case}[op]()
    with torch.no_grad():
        try:
            got, copies = [], {}
            for args in cases:
                on_device = _copy(args, device, copies)
                if op == "noisy_draws":
                    got.append(runner.noisy_draws(*on_device))
                else:
                    runner.vote_(*on_device)
                    got.append(on_device[2])
            got = [t.cpu() for t in got]
        except Exception as exc:  # noqa: BLE001 -- a launch that fails is a failed check
            return f"{op} raised {type(exc).__name__}: {first_line(exc)}"
        for i, (args, result) in enumerate(zip(cases, got)):
            if op == "noisy_draws":
                want = expected.noisy_draws(*args)
                what = f"noisy_draws, call {i} (x {list(args[0].shape)}, {str(want.dtype)[6:]}" \
                       f"{', channels-last' if args[7] else ''})"
                if result.shape != want.shape or result.dtype != want.dtype:
                    return f"{what}: {result.dtype} {list(result.shape)} where {list(want.shape)} was expected"
                differ = (_bits(result) != _bits(want)).flatten()
                if differ.any():
                    return (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ from the CPU "
                            f"kernel's, the first at {int(differ.nonzero()[0])}")
            else:
                logits, rows, counts, agg, weights = args
                want = counts.clone()
                expected.vote_(logits, rows, want, agg, weights)
                if not torch.equal(result, want):
                    return (f"vote_, call {i} ({agg}, {str(logits.dtype)[6:]}, {logits.shape[2]} classes): "
                            f"{int((result != want).sum())} of {want.numel()} counts differ from the CPU kernel's "
                            f"(totals {int(result.sum())} and {int(want.sum())})")
    return None


class CheckResult(NamedTuple):
    """One first-use check: ``op`` on ``device`` (as a string), ``why`` it failed (None: it
    passed) and the ``seconds`` it took (both sides, the device's synchronisation included)."""

    op: str
    device: str
    why: Optional[str]
    seconds: float

    @property
    def passed(self) -> bool:
        return self.why is None


# Set while a thread runs a check: the ops it calls run the device's kernels unchecked.
_checking = threading.local()


class FirstUseCheck:
    """Whether an op's kernels on a device passed `compare` with ``runner``, run once a
    process per (op, device) at the first question and remembered.

    `passed` is thread-safe; after the first call for a pair it is a dict lookup (no host
    synchronisation). A failure warns once (RuntimeWarning, one line naming the device and
    the op) where ``warn``. Ops outside `CHECKED_OPS` always pass. While a thread runs a
    check, `passed` answers True to it: the check's own launches run the kernels."""

    def __init__(self, runner=None, warn: bool = True, expected=None):
        self.runner = EagerOps() if runner is None else runner
        self.expected = expected
        self.warn = warn
        self._verdicts: dict = {}
        self._results: dict = {}
        self._lock = threading.Lock()

    def passed(self, op: str, device) -> bool:
        """Whether ``op``'s kernels run on ``device`` (False: its reference runs instead)."""
        verdict = self._verdicts.get((op, device))
        if verdict is not None:
            return verdict
        if op not in CHECKED_OPS or getattr(_checking, "active", False):
            return True
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            verdict = self._verdicts.get((op, device))
            if verdict is None:
                result = self._run(op, device)
                self._results[(op, str(device))] = result
                verdict = result.passed
                self._verdicts[(op, device)] = verdict
        return verdict

    def results(self) -> dict:
        """The checks run so far: ``{(op, device string): CheckResult}``."""
        return dict(self._results)

    def _run(self, op: str, device: torch.device) -> CheckResult:
        if device.type == "cuda" and _capturing(device):
            raise DrtFastError(
                f"drt_fast checks its CUDA {op} kernel on {device} at its first use, which cannot run while "
                f"a CUDA graph is being captured: run {op} once on {device} before capturing (as a warm-up "
                "on a side stream does)")
        start = time.perf_counter()
        _checking.active = True
        try:
            why = compare(op, self.runner, device, self.expected)
        finally:
            _checking.active = False
        result = CheckResult(op, str(device), why, time.perf_counter() - start)
        if why is not None and self.warn:
            name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
            warnings.warn(
                f"drt_fast's {op} kernel on {device}{name} failed its first-use check against the CPU "
                f"kernel ({why}); {op} on {device} runs its slower pure-torch reference from now on.",
                RuntimeWarning, stacklevel=5)
        return result


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of CUDA ``device`` (where the ops launch) captures a graph."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


# The process's checks, which `extension.kernels_for` asks before a CUDA kernel runs.
FIRST_USE = FirstUseCheck()
