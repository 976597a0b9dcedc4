"""CUDA graphs of the engine's step: one whole step (noise, member forwards, vote) captured
over static buffers and replayed, so that a small model is not bound by the launches and
the Python of each step.

A replayed step counts exactly what an eager step counts (the same kernels on the same
inputs). Graphs are used only where a capture is sound: on CUDA, with drt-fast's CUDA
kernels (the pure-torch fallbacks synchronise with the host), members run one by one, and
once the model's output and any rewritten copies were checked on an eager step.
"""
import math
from typing import Callable, Optional

import torch

from .. import ops
from ..errors import DrtFastError, InvalidArgument, first_line
from . import status as st


def capture(body: Callable[[], None], device: torch.device):
    """``body`` captured as a CUDA graph on ``device`` -> (replay, graph). It runs once on a
    side stream first (lazy initialisation and autotuning stay out of the graph); what that
    run writes is the caller's to reset."""
    # On the model's device, which need not be the current one (--device cuda:1): the capture
    # stream and the ops' current_stream(device) must be that device's, or the kernels run
    # outside the capture and the graph records nothing.
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            body()
    return graph.replay, graph


class StepGraph:
    """One step of G inputs x ``reps`` draws captured over static buffers: the inputs and keys
    (loaded when the inputs change), each input's first draw (set per replay), the counts
    row of every draw (set when the layout changes) and its own counts ``[C, K]``, which
    `drain` adds to the caller's."""

    def __init__(self, step: Callable, xs, keys, reps: int, rows, counts_shape, capture_fn):
        device = xs.device
        self.xs, self.keys, self.rows = xs.clone(), keys.clone(), rows.clone()
        self.first = torch.zeros(xs.shape[0], dtype=torch.int64, device=device)
        self.counts = torch.zeros(counts_shape, dtype=torch.int64, device=device)
        self.loaded = (xs, rows)         # the tensors whose values the buffers hold

        def body():
            step(self.xs, self.keys, self.first, reps, self.rows, self.counts)

        self._replay, self.graph = capture_fn(body, device)
        self.counts.zero_()              # the warm-up's votes

    def load(self, xs, keys, rows) -> None:
        if self.loaded[0] is not xs:
            self.xs.copy_(xs)
            self.keys.copy_(keys)
        if self.loaded[1] is not rows:
            self.rows.copy_(rows)
        self.loaded = (xs, rows)

    def replay(self, first) -> None:
        """One step from draw ``first`` on: an int (every input) or a ``[G]`` tensor."""
        if isinstance(first, int):
            self.first.fill_(first)
        else:
            self.first.copy_(first)
        self._replay()

    def drain(self, counts) -> None:
        counts += self.counts
        self.counts.zero_()


class Graphs:
    """Whether steps are graphed, and the captured steps of one engine.

    setting: None (auto: where a step's draws hold at most ``AUTO_ELEMENTS`` input elements),
    True (insist: an error where graphs cannot be used) or False. ``capture_fn`` and
    ``kernels_run_on`` are what capture a graph and tell whether drt-fast's CUDA kernels run
    on a device (`capture`, `drt_fast.ops.kernels_run_on`); ``device_types``, where captures
    run (a stand-in ``capture_fn`` may run on the CPU). ``status`` says what was done.
    """
    AUTO_ELEMENTS = 2**22
    KEPT = 4                             # captured steps kept (group sizes, certify/predict)

    def __init__(self, setting=None, capture_fn=capture, kernels_run_on=None, device_types=("cuda",)):
        self.setting = setting
        self.capture_fn = capture_fn
        self.kernels_run_on = kernels_run_on or ops.kernels_run_on
        self.device_types = device_types
        self.status = st.UNUSED
        self.failed: Optional[str] = None   # why capturing was given up on, for good
        self._steps: dict = {}
        self._owner = None

    def possible(self, device: torch.device, batch_members: bool) -> bool:
        """Whether steps on ``device`` may be graphed at all (``status`` says why not)."""
        if self.setting is False or self.failed is not None:
            self.status = st.off() if self.setting is False else st.off(self.failed)
            return False
        if device.type not in self.device_types:
            if self.setting:
                raise InvalidArgument("cuda_graphs=True: CUDA graphs need the model on a CUDA device")
            self.status = st.off("not on a CUDA device")
            return False
        if ops.reference_in_use():      # the references synchronise with the host too
            why = "the ops run their pure-torch references (drt_fast.ops.use_reference)"
        elif not self.kernels_run_on(device):
            why = "drt_fast's CUDA kernels were not built (for this GPU)"
        elif batch_members:             # its stacked weights are not the module's tensors
            why = "the ensemble runs its members batched (batch_members=True)"
        else:
            return True
        if self.setting:
            raise InvalidArgument(f"cuda_graphs=True: {why}")
        self.status = st.off(why)
        return False

    def wanted(self, device, xs_shape, reps: int, checked: bool) -> bool:
        """Whether a full step of inputs ``xs_shape`` ``[G, *S]`` x ``reps`` draws is replayed
        (once the output and any copies were ``checked`` on an eager step, and the kernels
        passed their first-use check on ``device``: an op that failed it runs its reference,
        which synchronises with the host)."""
        failed = [r.op for r in ops.selfcheck.FIRST_USE.results().values()
                  if r.device == str(device) and not r.passed]
        if failed:
            self.status = st.off(f"drt_fast's CUDA {' and '.join(failed)} failed the first-use check on "
                                 f"{device} (their references run)")
            return False
        elements = xs_shape[0] * reps * math.prod(xs_shape[1:])
        if self.setting is None and elements > self.AUTO_ELEMENTS:
            self.status = st.off(f"a batch of draws holds {elements:,} input elements "
                                 f"(auto is on up to {self.AUTO_ELEMENTS:,})")
            return False
        return checked

    def step_graph(self, key, owner, step, xs, keys, reps, rows, counts_shape) -> Optional[StepGraph]:
        """The captured step for ``key`` (captured on first use); None when capturing fails
        (then every step runs eagerly from now on). ``owner`` identifies the module the
        graphs run (its tensors' addresses): graphs of another owner are dropped."""
        if owner != self._owner:
            self._steps.clear()
            self._owner = owner
        graph = self._steps.get(key)
        if graph is None:
            try:
                graph = StepGraph(step, xs, keys, reps, rows, counts_shape, self.capture_fn)
            except Exception as err:  # noqa: BLE001 -- an op that cannot be captured, ...
                self.failed = f"capture failed ({first_line(err)}); batches run eagerly"
                self.status = st.off(self.failed)
                self._steps.clear()
                if self.setting:
                    raise DrtFastError(f"cuda_graphs=True: {self.failed}") from err
                return None
            while len(self._steps) >= self.KEPT:
                self._steps.pop(next(iter(self._steps)))
            self._steps[key] = graph
        self.status = st.on(f"{len(self._steps)} captured step(s)")
        return graph
