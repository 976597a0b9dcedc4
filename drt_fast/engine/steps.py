"""The engine of one smoothed classifier: its noise, its members and its step.

A step is ``noisy_draws -> members -> vote_``: draws of several inputs, written in the
precision's dtype and layout, through the members (or their checked rewritten copies),
voted into rows of an int64 counts tensor on the model's device. Eager or replayed as a
CUDA graph; both count the same.
"""
import itertools
from dataclasses import dataclass

import torch

from .. import ops
from ..ensemble import Ensemble
from ..errors import NonFiniteLogitsError
from .graphs import Graphs
from .runner import MemberRunner


@dataclass
class Plan:
    """What the steps of one sampler run share: the device, the draws' layout and dtype,
    the member weights on the device and whether CUDA graphs may be used."""
    device: torch.device
    channels_last: bool
    draw_dtype: torch.dtype
    weights: torch.Tensor
    weights_key: tuple
    graphs: bool
    owner: tuple = None              # see Engine._owner


class Engine:
    """Noise at ``sigma`` (pixel units), members run at ``precision``; ``channels_last``:
    None decides from the first 4-d inputs (on for CUDA, and on the CPU for 3 or more
    channels), and converts the model in place; ``fuse`` / ``rewriter``: see `MemberRunner`;
    ``cuda_graphs``: see `Graphs`; ``discrete``: a `drt_fast.ops.DiscreteTable` for discrete
    noise (inputs on its grid, checked by the caller), None for Gaussian noise.
    ``draws_performed`` counts noisy draws (each seen by every member) and ``transfers`` the
    reads of vote counts from the device (each a host synchronisation on CUDA); the sampler
    counts both."""

    def __init__(self, model: Ensemble, num_classes: int, sigma: float, precision: str,
                 channels_last=None, fuse=None, cuda_graphs=None, rewriter=None, discrete=None):
        self.model = model
        self.num_classes = num_classes
        self.sigma = sigma
        self.discrete = discrete
        self.channels_last = channels_last
        self._model_channels_last = False
        if channels_last:
            self._to_channels_last()
        self.runner = MemberRunner(model, num_classes, precision, fuse, rewriter)
        self.graphs = Graphs(cuda_graphs)
        self.draws_performed = 0
        self.transfers = 0

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def draws_channels_last(self, example: torch.Tensor) -> bool:
        """Whether the draws of inputs like ``example`` ``[G, *S]`` are written channels-last
        (the model follows, converted once)."""
        if example.dim() != 4:
            return False
        wanted = self.channels_last
        if wanted is None:
            wanted = example.device.type == "cuda" or example.shape[1] >= 3
        if wanted:
            self._to_channels_last()
        return wanted

    def _to_channels_last(self) -> None:
        if not self._model_channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._model_channels_last = True

    def begin(self, example: torch.Tensor) -> Plan:
        """Ready the engine for draws of inputs like ``example`` ``[1, *S]`` (on the model's
        device): layout, rewritten copies, graphs."""
        channels_last = self.draws_channels_last(example)
        if self.discrete is not None:   # its table on the device now: a copy inside a graph capture fails
            self.discrete.tensors_on(example.device)
        self.runner.prepare(example, channels_last)
        weights = self.model.weights.to(device=example.device, dtype=torch.float32)
        graphs = self.graphs.possible(example.device, self.model.batch_members)
        return Plan(example.device, channels_last, self.runner.draw_dtype, weights,
                    tuple(self.model.weights.tolist()), graphs)

    # ------------------------------------------------------------------ the step
    def noise(self, plan: Plan, xs, keys, first, reps: int, seed: int) -> torch.Tensor:
        """Draws ``first[g] .. first[g]+reps-1`` of inputs xs ``[G, *S]`` -> ``[G*reps, *S]``."""
        # The ops' bodies without the dispatcher: its overhead is a few % of a small batch.
        table = self.discrete
        if table is not None:
            thresholds, guide = table.tensors_on(xs.device)
            return ops.noisy_draws_discrete_eager(ops.to_grid(xs, table.grid), keys, first, reps, thresholds,
                                                  guide, table.grid, seed, out_dtype=plan.draw_dtype,
                                                  channels_last=plan.channels_last)
        return ops.noisy_draws_eager(xs, keys, first, reps, self.sigma, seed,
                                     out_dtype=plan.draw_dtype, channels_last=plan.channels_last)

    def vote(self, plan: Plan, batch, rows, counts, checked: bool = False) -> None:
        """Draws ``batch`` ``[R, *S]`` through the members; draw r votes in ``counts[rows[r]]``.
        ``checked``: the output was checked already (a captured step: no checks)."""
        logits = self.runner.forward_checked(batch) if checked else self.runner.forward(batch)
        ops.vote_eager_(logits, rows, counts, self.model.mode, plan.weights)

    def _owner(self, plan: Plan) -> tuple:
        """What identifies the module the graphs run: its tensors' addresses, read once per
        sampler run and module (graphs of another owner are dropped)."""
        generation = self.runner.generation
        if plan.owner is None or plan.owner[0] != generation:
            module = self.runner.module
            plan.owner = (generation, id(module),
                          tuple(t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers())))
        return plan.owner

    def graphed_step(self, plan: Plan, xs, keys, reps: int, seed: int, rows, counts_shape):
        """(the captured step for inputs xs ``[G, *S]`` x ``reps`` draws of stream ``seed``,
        loaded with xs, keys and rows, or None where graphs are off or not wanted yet;
        whether that answer is final for these inputs)."""
        if not plan.graphs:
            return None, True
        checked = self.runner.output_checked(xs[:1]) and self.runner.copies_checked
        if not self.graphs.wanted(xs.device, xs.shape, reps, checked):
            return None, checked
        owner = self._owner(plan)
        key = (tuple(xs.shape), str(xs.device), reps, seed, counts_shape, plan.channels_last,
               self.runner.precision, self.model.mode, plan.weights_key, self.sigma)

        def step(xs_, keys_, first_, reps_, rows_, counts_):
            self.vote(plan, self.noise(plan, xs_, keys_, first_, reps_, seed), rows_, counts_, checked=True)

        graph = self.graphs.step_graph(key, owner, step, xs, keys, reps, rows, counts_shape)
        if graph is not None:
            graph.load(xs, keys, rows)
        return graph, True


def check_votes(counts, draws: int, key: int) -> None:
    """``counts`` of ``draws`` draws of input ``key`` must hold a vote per draw: ``vote_`` casts
    none for a draw with a non-finite logit, so missing votes are the model's NaN/inf."""
    counted = int(counts.sum())
    if counted != draws:
        raise NonFiniteLogitsError(f"model produced NaN/inf logits on {draws - counted} of "
                                   f"{draws} noisy draws of input {key}")
