"""The sampler: vote counts of noisy draws for a changing set of requests, in full batches.

A *lane* is one input's draws on one noise stream (its key and seed). A *request* asks for
the vote counts ``[K]`` of the lane's draws ``first_draw .. first_draw + num_draws - 1``.
Lanes take the sampler's slots in the order they were opened. Every step, each occupied
slot contributes up to ``reps`` draws of its lane's requests, in order (a step may cross
from one request into the next), so a batch holds ``slots x reps`` draws while there is
work. A lane keeps its slot until it is closed and its requests are done; the next lane
then takes it, so batches stay full while inputs come and go.

`Sampler.run` yields the requests that finished in a step, their counts read from the
device in one transfer; before resuming it, the caller may extend them (further draws of
the same input, counted into the same request), open lanes and close lanes.

Noise is a function of (seed, key, draw, element), so the counts of a request do not depend
on the slots, the steps or the other lanes -- exactly so for a model whose output for a row
does not depend on the rest of its batch.
"""
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from .. import validate
from ..errors import InvalidArgument
from .steps import Engine


@dataclass(eq=False)
class Request:
    """Counts of draws ``first_draw .. first_draw + num_draws - 1`` of ``lane``'s input.

    ``counts`` ``[K]`` (int64, numpy) holds the counts of every draw counted, once the
    request finished; ``done`` is how many draws were counted.
    """
    lane: "Lane"
    first_draw: int
    num_draws: int
    counts: Optional[np.ndarray] = None
    done: int = 0
    row: int = field(default=-1, repr=False)    # its row of the device counts while in flight

    @property
    def finished(self) -> bool:
        return self.done == self.num_draws and self.row < 0

    def extend(self, num_draws: int) -> None:
        """Count ``num_draws`` further draws of the same input (the next ones), into this
        request; only for the lane's last request, while the lane is open."""
        num_draws = validate.positive_int(num_draws, "num_draws")
        lane = self.lane
        if lane.closed:
            raise InvalidArgument("cannot extend a request of a closed lane")
        if lane.last is not self:
            raise InvalidArgument("only a lane's last request can be extended")
        validate.draw_range(self.first_draw, self.num_draws + num_draws)
        if self.done == self.num_draws:
            lane.queue.append(self)
        self.num_draws += num_draws
        lane.sampler._changed()


class Lane:
    """One input ``x`` ``[*S]`` (dataset index ``key``) on the noise stream ``seed``."""

    def __init__(self, sampler: "Sampler", x: torch.Tensor, key: int, seed: int):
        self.sampler, self.x, self.key, self.seed = sampler, x, key, seed
        self.queue: deque = deque()    # requests with draws left, in order
        self.last: Optional[Request] = None
        self.closed = False

    def request(self, first_draw: int, num_draws: int) -> Request:
        """Counts of draws ``first_draw ..`` (served after the lane's earlier requests)."""
        if self.closed:
            raise InvalidArgument("cannot add a request to a closed lane")
        first_draw = validate.int_in_range(first_draw, "first_draw", 0)
        num_draws = validate.positive_int(num_draws, "num_draws")
        validate.draw_range(first_draw, num_draws)
        request = Request(self, first_draw, num_draws)
        self.queue.append(request)
        self.last = request
        self.sampler._changed()
        return request

    def close(self) -> None:
        """No more requests: the slot goes to the next lane once the queued ones are done."""
        self.closed = True
        self.sampler._changed()


@dataclass
class _Segment:
    """Draws ``first .. first+length-1`` of the ``pos``-th occupied slot's lane, counted in
    the rows of ``pieces`` ``[(request, draws)]`` in order."""
    pos: int
    first: int
    length: int
    seed: int
    pieces: list


@dataclass
class _Layout:
    """One step: the occupied slots' draws and the rows each draw votes in."""
    segments: list
    xs: torch.Tensor                 # [G, *S] on the device
    keys: torch.Tensor               # [G]
    rows: torch.Tensor               # [R]
    uniform: bool                    # one segment per lane, one length, one seed
    repeats: int                     # further steps this layout serves, the draws advanced
    first: object = None             # uniform: the first draw (int) or firsts [G] on the device
    graph: object = None             # uniform full steps: the captured step, or None
    graph_tried: bool = False        # the answer for this layout is final


class Sampler:
    """Requests -> vote counts on ``engine``, ``slots`` lanes at a time, ``reps`` draws a lane
    a step (a batch of ``slots * reps`` draws). Inputs of one sampler share a shape."""

    def __init__(self, engine: Engine, slots: int, reps: int):
        self.engine = engine
        self.slots = validate.positive_int(slots, "slots")
        self.reps = validate.positive_int(reps, "reps")
        self.device = engine.device
        self._pending: deque = deque()
        self._occupied: list = [None] * self.slots
        self._shape = None
        self._plan = None
        self._counts = None
        self._free_rows: list = []
        self._graphs_used: list = []
        self._layout: Optional[_Layout] = None
        self._inputs_cache = (None, None, None)
        self._rows_cache: dict = {}

    def open(self, x: torch.Tensor, key: int, seed: int) -> Lane:
        """A lane for input ``x`` ``[*S]`` (floating pixels) with dataset index ``key`` on
        the noise stream ``seed`` (in [0, 2^64))."""
        if self._shape is None:
            self._shape = tuple(x.shape)
        elif tuple(x.shape) != self._shape:
            raise InvalidArgument(f"inputs of one sampler share a shape: {list(self._shape)}, "
                                  f"then {list(x.shape)}")
        lane = Lane(self, x, validate.int_in_range(key, "key", 0, validate.SEED_LIMIT),
                    validate.stream(seed))
        self._pending.append(lane)
        self._changed()
        return lane

    def _changed(self) -> None:
        self._layout = None

    # ------------------------------------------------------------------ running
    def run(self) -> Iterator[list]:
        """Step until no lane has draws left; after each step in which requests finished,
        yield them (their ``counts`` read)."""
        while True:
            layout = self._layout or self._next_layout()
            if layout is None:
                return
            finished = self._step(layout)
            if finished:
                self._read(finished)
                yield finished
                self._release()

    def _release(self) -> None:
        for slot, lane in enumerate(self._occupied):
            if lane is not None and lane.closed and not lane.queue:
                self._occupied[slot] = None
                self._changed()

    def _next_layout(self) -> Optional[_Layout]:
        self._release()
        for slot, lane in enumerate(self._occupied):
            while lane is None and self._pending:
                lane = self._pending.popleft()
                if lane.closed and not lane.queue:      # nothing was asked of it
                    lane = None
            self._occupied[slot] = lane
        lanes = [lane for lane in self._occupied if lane is not None and lane.queue]
        if not lanes:
            if any(lane is not None for lane in self._occupied):
                raise InvalidArgument("an open lane has no request left: extend one of its "
                                      "requests or close it")
            return None
        if self._plan is None:
            example = lanes[0].x[None].to(device=self.device, dtype=torch.float32)
            self._plan = self.engine.begin(example)
        self._layout = self._build(lanes)
        return self._layout

    def _build(self, lanes: list) -> _Layout:
        segments = []
        for pos, lane in enumerate(lanes):
            take, seg = self.reps, None
            for request in lane.queue:
                n = min(take, request.num_draws - request.done)
                first = request.first_draw + request.done
                if request.row < 0:
                    request.row = self._row()
                if seg is None or seg.first + seg.length != first:
                    seg = _Segment(pos, first, 0, lane.seed, [])
                    segments.append(seg)
                seg.length += n
                seg.pieces.append((request, n))
                take -= n
                if take == 0:
                    break
        xs, keys = self._inputs(lanes)
        uniform = (len(segments) == len(lanes) and len({s.length for s in segments}) == 1
                   and len({s.seed for s in segments}) == 1)
        repeats = 0
        if uniform and all(len(s.pieces) == 1 and s.length == self.reps for s in segments):
            repeats = min((r.num_draws - r.done) // self.reps - 1 for s in segments for r, _ in s.pieces)
        layout = _Layout(segments, xs, keys, self._rows(segments), uniform, repeats)
        if uniform:
            firsts = [s.first for s in segments]
            layout.first = (firsts[0] if len(set(firsts)) == 1
                            else torch.tensor(firsts, dtype=torch.int64, device=self.device))
        return layout

    def _rows(self, segments: list) -> torch.Tensor:
        """The counts row of every draw of a step ``[R]`` on the device; the same pieces give
        the same tensor (a lane extended step by step keeps its row)."""
        pieces = tuple((request.row, n) for seg in segments for request, n in seg.pieces)
        rows = self._rows_cache.get(pieces)
        if rows is None:
            values, lengths = np.array(pieces, dtype=np.int64).T
            rows = torch.from_numpy(np.repeat(values, lengths)).to(self.device)
            if len(self._rows_cache) >= 256:
                self._rows_cache.clear()
            self._rows_cache[pieces] = rows
        return rows

    def _inputs(self, lanes: list):
        """The lanes' inputs ``[G, *S]`` and keys ``[G]`` on the device (kept while the
        occupied lanes stay the same)."""
        cached = self._inputs_cache[0]
        if cached is None or len(cached) != len(lanes) or any(a is not b for a, b in zip(cached, lanes)):
            xs = torch.stack([lane.x for lane in lanes]).to(device=self.device, dtype=torch.float32)
            keys = torch.tensor([lane.key for lane in lanes], dtype=torch.int64, device=self.device)
            self._inputs_cache = (list(lanes), xs.contiguous(), keys)
        return self._inputs_cache[1:]

    def _row(self) -> int:
        if not self._free_rows:
            self._grow()
        return self._free_rows.pop()

    def _grow(self) -> None:
        """More counts rows (twice as many); captured steps count into their own rows."""
        if self._counts is not None:
            self._drain()
        old = self._counts
        size = 2 * self.slots if old is None else 2 * old.shape[0]
        self._counts = torch.zeros(size, self.engine.num_classes, dtype=torch.int64, device=self.device)
        if old is not None:
            self._counts[:old.shape[0]] = old
        self._free_rows.extend(range(size - 1, size // 2 - 1 if old is not None else -1, -1))

    def _step(self, layout: _Layout) -> list:
        engine, plan, counts = self.engine, self._plan, self._counts
        if layout.uniform:
            reps = layout.segments[0].length
            if reps == self.reps and not layout.graph_tried:
                layout.graph, layout.graph_tried = engine.graphed_step(
                    plan, layout.xs, layout.keys, reps, layout.segments[0].seed, layout.rows,
                    tuple(counts.shape))
            if layout.graph is not None:
                layout.graph.replay(layout.first)
                if layout.graph not in self._graphs_used:
                    self._graphs_used.append(layout.graph)
            else:
                with torch.inference_mode():
                    first = layout.first
                    if isinstance(first, int):
                        first = torch.full((layout.xs.shape[0],), first, dtype=torch.int64, device=self.device)
                    batch = engine.noise(plan, layout.xs, layout.keys, first, reps, layout.segments[0].seed)
                    engine.vote(plan, batch, layout.rows, counts)
        else:
            with torch.inference_mode():
                engine.vote(plan, self._mixed_batch(layout), layout.rows, counts)
        engine.draws_performed += layout.rows.shape[0]
        return self._advance(layout)

    def _mixed_batch(self, layout: _Layout) -> torch.Tensor:
        """The draws of a step whose segments differ in length or stream: one noise call
        per segment, in segment order."""
        parts = []
        for seg in layout.segments:
            pos = torch.tensor([seg.pos], device=self.device)
            first = torch.tensor([seg.first], dtype=torch.int64, device=self.device)
            parts.append(self.engine.noise(self._plan, layout.xs.index_select(0, pos),
                                           layout.keys.index_select(0, pos), first, seg.length, seg.seed))
        return torch.cat(parts)

    def _advance(self, layout: _Layout) -> list:
        """Count the step's draws in its requests; the requests that finished."""
        finished = []
        for seg in layout.segments:
            for request, n in seg.pieces:
                request.done += n
                if request.done == request.num_draws:
                    request.lane.queue.popleft()
                    finished.append(request)
            seg.first += seg.length
        if layout.repeats > 0 and not finished:
            layout.repeats -= 1
            if isinstance(layout.first, int):
                layout.first += self.reps
            else:
                layout.first = layout.first + self.reps
        else:
            self._changed()
        return finished

    def _drain(self) -> None:
        for graph in self._graphs_used:
            graph.drain(self._counts)
        self._graphs_used.clear()

    def _read(self, finished: list) -> None:
        """The counts of ``finished`` requests, in one transfer; their rows are freed."""
        self.engine.transfers += 1
        self._drain()
        rows = [r.row for r in finished]
        if self._counts.device.type == "cpu":
            table = self._counts.numpy()
            values = table[rows]
            table[rows] = 0
        else:
            index = torch.tensor(rows, device=self.device)
            values = self._counts.index_select(0, index).cpu().numpy()
            self._counts.index_fill_(0, index, 0)
        for request, counts in zip(finished, values):
            request.counts = counts if request.counts is None else request.counts + counts
            self._free_rows.append(request.row)
            request.row = -1
