"""Randomized smoothing of an ensemble: Cohen et al.'s PREDICT and CERTIFY on fused ops.

The algorithm is the one of Cohen's ``core.py`` (see paper-notes.md); the speed lives in
``drt_fast.ops``:

    noisy_draws  ->  ensemble members  ->  vote_  (counts stay on the model's device)

and the counts cross to the host once per group of inputs, never once per batch.

Noise is counter-based (docs/DESIGN.md section 3): draw ``d`` of the input with key ``k`` is a
pure function of ``(seed, k, d)``. CERTIFY selects with draws ``0 .. n0-1`` and estimates
with draws ``n0 .. n0+n-1`` of stream ``seed``; PREDICT uses draws ``0 .. n-1`` of stream
``seed ^ PREDICT_STREAM``. The key is the input's dataset index. So the same seed gives
the same certificates whatever the batch size, the packing of inputs into batches or the
order of inputs — exactly so for a model whose output for one row does not depend on the
other rows of its batch. (Big models can differ in the last bits of their logits between
batch sizes because BLAS/cuDNN pick different blockings; a draw whose top two aggregated
scores are that close may then be counted for the other class.)
"""
import itertools
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops, stats
from .ensemble import as_ensemble
from .errors import DrtFastError, InvalidArgument, InvalidArgumentType, NonFiniteLogitsError, first_line

ABSTAIN = -1

# PREDICT's noise stream is seed ^ PREDICT_STREAM so that predict and certify never share
# noise (docs/internals.md).
PREDICT_STREAM = 0x5EED_0F_9EDC7

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one input.

    label: certified class, or -1 (abstain); radius: certified L2 radius in pixel units,
    0.0 when abstaining; pA_lower: Clopper-Pearson lower bound on the top-class
    probability; count: estimation draws that voted for the selected class; n: estimation
    draws. The raw vote counts ``[K]`` of the selection and estimation samples ride along
    (not compared by ``==``).
    """
    label: int
    radius: float
    pA_lower: float
    count: int
    n: int
    selection_counts: np.ndarray = field(default=None, repr=False, compare=False)
    estimation_counts: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def abstained(self):
        return self.label == ABSTAIN


def _vote_logits(logits):
    """Member logits in a layout and dtype ``vote_`` takes."""
    if logits.dtype not in _LOGIT_DTYPES:
        logits = logits.float()                            # e.g. a float64 model
    return logits.contiguous()


class _StepGraph:
    """One step of `SmoothedClassifier._count` captured as a CUDA graph over static
    buffers: the group's inputs and keys (loaded per group), the first draw index (set per
    replay) and its own counts, which the caller adds to the group's."""

    def __init__(self, engine, xs, keys, counts_shape, step):
        device = xs.device
        self.xs, self.keys = xs.clone(), keys.clone()
        self.first = torch.zeros(xs.shape[0], dtype=torch.int64, device=device)
        self.counts = torch.zeros(counts_shape, dtype=torch.int64, device=device)
        step = dict(step, weights=step["weights"].clone(), group_rows=step["group_rows"].clone())

        def body():
            engine._step(self.xs, self.keys, self.first, self.counts, step, checked=True)

        self._replay, self.graph = _capture(body, device)
        self.step = step                             # keep what the graph reads alive

    def load(self, xs, keys):
        self.xs.copy_(xs)
        self.keys.copy_(keys)
        self.counts.zero_()

    def replay(self, first):
        self.first.fill_(first)
        self._replay()


def _capture(body, device):
    """``body`` captured as a CUDA graph on ``device`` -> (replay, graph). It runs once on a
    side stream first (lazy initialisation, autotuning stay out of the graph); what that
    run writes is the caller's to reset."""
    # On the model's device, which need not be the current one (--device cuda:1): torch's
    # capture stream and the ops' current_stream(device) must be that device's, or the
    # kernels run outside the capture and the graph records nothing.
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


def _vote_rows(step, r, first, known_first):
    """Row of the counts each of the step's draws votes into: its input's, in the selection
    (draw < split) or estimation part. With ``known_first`` (eager steps) a batch on one side
    of the split reuses a cached tensor; a graphed step computes them from ``first``."""
    group_rows, split = step["group_rows"], step["split"]
    if split is not None and (known_first is None or known_first < split < known_first + r):
        draws = first[:1] + torch.arange(r, device=first.device)
        return (group_rows + (draws >= split).to(torch.int64)[None, :]).reshape(-1)
    part = 0 if split is None or known_first < split else 1
    rows = step["rows"].get((r, part)) if known_first is not None else None
    if rows is None:
        rows = (group_rows + part).expand(group_rows.shape[0], r).reshape(-1).contiguous()
        if known_first is not None:
            step["rows"][(r, part)] = rows
    return rows


class _FusionMismatch(Exception):
    """The fused copies of the members do not compute the members' logits."""


class SmoothedClassifier:
    """The smoothed ensemble g(x) = argmax_c P(ensemble(x + N(0, sigma^2 I)) = c).

    model: a drt_fast.Ensemble or a bare nn.Module (one member) mapping ``[B, *S]`` pixels
    to logits ``[B, num_classes]``; it is switched to eval mode here and at every call that
    samples, as in Cohen's ``core.py`` (smoothing assumes a fixed base classifier).
    sigma: noise level in pixel units. seed: noise stream, 0 <= seed < 2^63.
    precision: "fp32" runs the model in its own dtype; "bf16"/"fp16" write the noisy draws
    in that dtype and run the model under ``torch.autocast`` (weights stay as they are,
    matmuls and convolutions run in the low precision). channels_last: write 4-D draws
    channels-last and convert the model (in place) to channels-last; None (the default)
    decides from the first 4-D inputs: on for CUDA, and on the CPU for inputs of 3 or more
    channels (measured 1.1-1.2x on 3x ResNet-20; slower for the 1-channel digits CNN).
    fuse: run rewritten copies of the members (`drt_fast.fuse`). On CUDA: BatchNorms folded
    into the convolutions, conv(+residual add)+ReLU chains as single cuDNN calls (measured
    on an H100: member forwards 1.8x (fp32) and 2.1x (bf16) faster on 3x ResNet-110, 2.2x
    on 3x ResNet-50). On the CPU: a member that is a chain of affine layers and elementwise
    activations on small inputs becomes a chain of dense matrices, one per run of affine
    layers, which drt-fast's block-sparse CPU kernel runs in float32 (the digits CNN: member
    forwards 3-8x faster on 2 cores); any other
    member gets the same rewrite as on CUDA with oneDNN's fused convolutions, for fp32 runs
    and bf16 runs on channels-last draws (3x ResNet-20: 1.5-1.7x fp32, 2.9x bf16). None (the
    default) is on for float32 models; True insists (an error where no member can be
    rewritten); False runs the members as they are. The copies are checked against the
    members on the first batch and rebuilt when the members' tensors change; a member that
    cannot be rewritten runs as it is. ``fuse_status`` says what was done.

    cuda_graphs: on CUDA, capture one whole step (noise, member forwards, vote) as a CUDA
    graph and replay it for every full batch, so that a small model is not bound by the
    launches and Python of each step. None (the default) is on where a batch of draws holds
    at most 2^22 input elements (the digits and MNIST models at any usual batch; a CIFAR
    ResNet's batch of 2000 is over it, where graphs measured only 1-2 % faster and would hold
    a second copy of the activations); True/False force it. The counts equal the eager ones
    (same kernels, same inputs). A model that cannot be captured runs eagerly;
    ``graph_status`` says what was done.

    ``draws_performed`` counts the noisy draws made so far (each seen by all members).
    """

    def __init__(self, model, num_classes, sigma, seed=0, precision="fp32", channels_last=None,
                 fuse=None, cuda_graphs=None):
        self.model = as_ensemble(model).eval()
        self.num_classes = _positive_int(num_classes, "num_classes")
        try:
            sigma = float(sigma)
        except (TypeError, ValueError):
            raise InvalidArgumentType(f"sigma must be a number > 0, got {sigma!r}") from None
        if not (math.isfinite(sigma) and sigma > 0):
            raise InvalidArgument(f"sigma must be a finite number > 0, got {sigma}")
        self.sigma = sigma
        self.seed = _int_in_range(seed, "seed", 0, 2**63)
        if precision not in PRECISIONS:
            raise InvalidArgument(
                f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.channels_last = None if channels_last is None else bool(channels_last)
        self._model_channels_last = False
        if self.channels_last:
            self._to_channels_last()
        if not (fuse is None or isinstance(fuse, bool)):
            raise InvalidArgumentType(f"fuse must be None (auto), True or False, got {fuse!r}")
        self.fuse = fuse
        self.fuse_status = "not used yet"
        self._fused = None          # (key, Ensemble of rewritten members, checked?) or None
        self._fuse_failed = None    # why fusion was given up on, for good
        self._kernel_failed = None  # why the CIFAR ResNet kernel was given up on, for good
        self._kernel_copies_replaced = None  # the fused copies with the kernel, once replaced
        if not (cuda_graphs is None or isinstance(cuda_graphs, bool)):
            raise InvalidArgumentType(f"cuda_graphs must be None (auto), True or False, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.graph_status = "not used yet"
        self._graphs = {}           # key -> _StepGraph (a few: group sizes, certify/predict)
        self._graphs_owner = None   # (id, tensor addresses) of the module the graphs run
        self._graphs_failed = None  # why capturing was given up on, for good
        self.draws_performed = 0
        self._checked_shape = None  # input shape [*S] the model's output was checked for

    # ----------------------------------------------------------------- Cohen's API
    def predict(self, x, n, alpha, batch_size, key=0):
        """PREDICT for one input x ``[*S]`` with dataset index ``key``: the top class, or -1
        when the two-sided binomial test of the top two counts has p-value > alpha."""
        return self.predict_many(_one(x), [key], n, alpha, batch_size)[0]

    def certify(self, x, n0, n, alpha, batch_size, key=0):
        """CERTIFY for one input x ``[*S]`` with dataset index ``key`` -> Certificate."""
        return self.certify_many(_one(x), [key], n0, n, alpha, batch_size)[0]

    def predict_many(self, xs, keys, n, alpha, batch_size):
        """PREDICT for inputs xs ``[B, *S]`` with dataset indices ``keys`` ``[B]`` -> B labels."""
        n = _positive_int(n, "n")
        alpha = _check_alpha(alpha)
        labels = []
        for keys_g, counts in self._sample_groups(xs, keys, n, batch_size, self._predict_seed):
            for key, c in zip(keys_g, counts[:, 0]):
                self._check_total(c.sum(), n, key)
                top2 = np.argsort(-c, kind="stable")[:2]         # stable: ties -> smaller class
                nA, nB = int(c[top2[0]]), int(c[top2[1]]) if len(c) > 1 else 0
                labels.append(ABSTAIN if stats.binom_pvalue(nA, nA + nB) > alpha
                              else int(top2[0]))
        return labels

    def certify_many(self, xs, keys, n0, n, alpha, batch_size):
        """CERTIFY for inputs xs ``[B, *S]`` with dataset indices ``keys`` ``[B]``.

        Draws of several inputs share a batch (``batch_size // min(n0 + n, batch_size)``
        inputs per forward); the certificates equal those of ``certify`` on each input.
        """
        n0, n = _positive_int(n0, "n0"), _positive_int(n, "n")
        alpha = _check_alpha(alpha)
        certs = []
        for keys_g, counts in self._sample_groups(xs, keys, n0 + n, batch_size, self.seed,
                                                  split=n0):
            for key, (selection, estimation) in zip(keys_g, counts):
                self._check_total(selection.sum() + estimation.sum(), n0 + n, key)
                cA = int(selection.argmax())                   # ties -> smaller class
                nA = int(estimation[cA])
                pA_lower = stats.lower_confidence_bound(nA, n, alpha)
                if pA_lower < 0.5:
                    certs.append(Certificate(ABSTAIN, 0.0, pA_lower, nA, n, selection, estimation))
                else:
                    certs.append(Certificate(cA, stats.radius(self.sigma, pA_lower), pA_lower,
                                             nA, n, selection, estimation))
        return certs

    def sample_counts(self, xs, keys, num, batch_size, first_draw=0, stream="certify"):
        """Raw vote counts ``[B, K]`` (int64, numpy) of draws ``first_draw .. first_draw+num-1``
        of each input, from the certify stream (``seed``) or the predict stream."""
        if stream not in ("certify", "predict"):
            raise InvalidArgument(f"stream must be 'certify' or 'predict', got {stream!r}")
        seed = self.seed if stream == "certify" else self._predict_seed
        num = _positive_int(num, "num")
        first_draw = _int_in_range(first_draw, "first_draw", 0, None)
        groups = self._sample_groups(xs, keys, num, batch_size, seed, first_draw=first_draw)
        return np.concatenate([np.zeros((0, self.num_classes), dtype=np.int64)]
                              + [counts[:, 0] for _, counts in groups])

    def prepare(self, xs):
        """Build now what the first batch of inputs like xs ``[B, *S]`` would build: the
        layout and the fused copies of the members. A ``fuse=True`` that cannot be honored
        fails here, before any work (the copies are still checked on the first batch)."""
        xs = torch.as_tensor(xs)[:1].to(device=self._model_device, dtype=torch.float32)
        self._runner(xs, self._draws_channels_last(xs))

    # ----------------------------------------------------------------- the hot path
    @property
    def _predict_seed(self):
        return self.seed ^ PREDICT_STREAM

    def _sample_groups(self, xs, keys, num, batch_size, seed, split=None, first_draw=0):
        """Yield ``(keys of the group, counts [G, P, K] numpy int64)`` group by group.

        Each input gets draws ``first_draw .. first_draw+num-1``; with ``split`` the draws
        below it count into part 0 (selection) and the rest into part 1 (estimation), P = 2,
        else P = 1. A group holds ``batch_size // reps`` inputs with ``reps =
        min(num, batch_size)`` draws each per forward; its counts cross to the host once.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        # Every call, as Cohen's core.py: a model put back in train mode since (a training
        # loop between certifications) would sample with dropout and batch statistics, and
        # update its BatchNorm running statistics.
        self.model.eval()
        if first_draw + num > 2**32:
            raise InvalidArgument(f"draw indices must stay below 2^32, got draws up to "
                               f"{first_draw + num - 1}")
        xs, keys = self._inputs(xs, keys)
        reps = min(num, batch_size)
        per_group = max(1, batch_size // reps)
        device = self._model_device
        for start in range(0, xs.shape[0], per_group):
            group = slice(start, start + per_group)
            # Inputs move to the device a group at a time (a whole dataset may not fit there).
            xs_g = xs[group].to(device=device, dtype=torch.float32).contiguous()
            counts = self._count(xs_g, keys[group].to(device), first_draw, num, reps, seed, split)
            yield keys[group].tolist(), counts.cpu().numpy()       # the group's one transfer

    def _count(self, xs, keys, first_draw, num, reps, seed, split):
        """Counts ``[G, P, K]`` (on the model's device) of draws ``first_draw ..
        first_draw+num-1`` of inputs xs ``[G, *S]``, ``reps`` draws per input per forward."""
        G, K = xs.shape[0], self.num_classes
        parts = 1 if split is None else 2
        device = xs.device
        counts = torch.zeros(G * parts, K, dtype=torch.int64, device=device)
        weights = self.model.weights.to(device=device, dtype=torch.float32)
        group_rows = torch.arange(G, device=device)[:, None] * parts          # [G, 1]
        draw_dtype, model_dtype = self._draw_dtype, self._model_dtype
        channels_last = self._draws_channels_last(xs)
        runner = self._runner(xs, channels_last)
        step = dict(reps=reps, seed=seed, split=split, channels_last=channels_last,
                    runner=runner, weights=weights, group_rows=group_rows,
                    draw_dtype=draw_dtype, model_dtype=model_dtype, rows={})
        graph, try_graph = None, self._graphs_possible(xs)
        with torch.inference_mode():
            for done in range(0, num, reps):
                r = min(reps, num - done)
                first = first_draw + done
                if r == reps and graph is None and try_graph and self._graph_wanted(xs, reps):
                    graph = self._step_graph(xs, keys, counts.shape, step)
                    try_graph = graph is not False
                if graph and r == reps:
                    graph.replay(first)
                else:
                    self._step(xs, keys, torch.full((G,), first, device=device), counts,
                               dict(step, reps=r), checked=False, known_first=first)
                self.draws_performed += G * r
            if graph:
                counts += graph.counts
        return counts.view(G, parts, K)

    def _step(self, xs, keys, first, counts, step, checked, known_first=None):
        """One batch: ``step['reps']`` noisy draws of each input from draw ``first`` ``[G]``
        (a device tensor) on, through the members, into ``counts``. ``checked``: the model's
        output was checked already (the graphed step skips the checks). ``known_first``: the
        same first draw as a Python int, when the caller has it (eager steps)."""
        r = step["reps"]
        # The ops' bodies without the dispatcher: its overhead is a few % of a small batch.
        batch = ops.noisy_draws_eager(xs, keys, first, r, self.sigma, step["seed"],
                                      out_dtype=step["draw_dtype"],
                                      channels_last=step["channels_last"])
        if checked:
            logits = _vote_logits(self._run(self._live(step["runner"]), batch, step["model_dtype"]))
        else:
            logits = self._forward(batch, step["model_dtype"], step["runner"])
        ops.vote_eager_(logits, _vote_rows(step, r, first, known_first), counts,
                        self.model.mode, step["weights"])

    def _run(self, model, batch, model_dtype):
        if self.precision == "fp32":
            return model(batch.to(model_dtype))
        # No cast cache: each weight is cast once per forward anyway, and a CUDA graph
        # capture must not keep cached casts (PyTorch's CUDA-graph notes).
        with torch.autocast(device_type=batch.device.type, dtype=PRECISIONS[self.precision],
                            cache_enabled=False):
            return model(batch)

    def _forward(self, batch, model_dtype, runner=None):
        """Noisy draws ``[R, *S]`` -> member logits ``[M, R, K]`` in a dtype ``vote_`` takes."""
        try:
            live = self._live(runner)
            if live is not self.model:
                logits = self._fused_forward(live, batch, model_dtype)
            else:
                logits = self._run(self.model, batch, model_dtype)
        except RuntimeError as err:
            if self._output_checked(batch) or _out_of_memory(err):
                raise
            # The first forward is where inputs of the wrong shape for the model show up.
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise InvalidArgument(f"the model failed on noisy inputs of shape "
                               f"{list(batch.shape)}: {message}") from err
        logits = _vote_logits(logits)
        if not self._output_checked(batch):
            if logits.dim() != 3 or logits.shape[1:] != (batch.shape[0], self.num_classes):
                raise InvalidArgument(
                    f"model output does not match num_classes={self.num_classes}: expected "
                    f"logits [{batch.shape[0]}, {self.num_classes}] per member, got "
                    f"{list(logits.shape[1:])}")
            self._checked_shape = tuple(batch.shape[1:])
        return logits

    # ----------------------------------------------------------------- fusion
    def _runner(self, xs, channels_last):
        """The module whose forward gives the member logits: the fused copies or the model."""
        device = xs.device
        if self.fuse is False or self._fuse_failed is not None:
            self.fuse_status = "off" if self.fuse is False else f"off: {self._fuse_failed}"
            return self.model
        why_not = self._fusion_unsupported(device)
        if why_not:
            if self.fuse:
                raise InvalidArgument(f"fuse=True: {why_not}")
            self.fuse_status = f"off: {why_not}"
            return self.model
        tensors = list(self.model.members.parameters()) + list(self.model.members.buffers())
        # and, on the CPU, the input shape: the dense rewrite is built for one
        shape = None if self._rewrites_with_cudnn(device) else tuple(xs.shape[1:])
        key = (tuple((t.data_ptr(), t._version) for t in tensors), self.precision, channels_last, shape)
        if self._fused is None or self._fused[0] != key:
            return self._build_fused(key, xs[:1])
        return self._fused[1]

    def _build_fused(self, key, example):
        """Rewrite the members for ``key`` (tensors, precision, channels-last) from one input
        ``example`` ``[1, *S]`` -> the fused copies (unchecked), or the model when nothing
        was gained."""
        from .ensemble import Ensemble

        channels_last = key[2]
        example = example.to(self._model_dtype)
        members = list(self.model.members)
        run_dtype = self._model_dtype if self.precision == "fp32" else PRECISIONS[self.precision]
        if self._rewrites_with_cudnn(example.device):
            rewritten, status = self._cuda_rewrites(members, example, run_dtype,
                                                    use_kernel=self._kernel_failed is None)
        else:
            rewritten, status = self._cpu_rewrites(members, example, run_dtype, channels_last)
        gained = sum(r.fused + r.folded_bn + r.dense for r in rewritten)
        fused = Ensemble([r.module for r in rewritten], mode=self.model.mode)
        if channels_last:
            fused.to(memory_format=torch.channels_last)
        self._fused = [key, fused, False]
        reasons = sorted({r.reason for r in rewritten if r.reason})
        if self._kernel_failed is not None:
            reasons.append(f"the CIFAR ResNet kernel was given up on: {self._kernel_failed}")
        self.fuse_status = status + (f" ({'; '.join(reasons)})" if reasons else "")
        if gained == 0:                          # nothing gained: run the model itself
            self._fused = None
            self.fuse_status = f"off: {'; '.join(reasons) or 'nothing to fuse'}"
            if self.fuse:
                raise InvalidArgument(f"fuse=True: no member could be rewritten "
                                   f"({'; '.join(reasons) or 'nothing to fuse'})")
            return self.model
        return fused

    def _live(self, runner):
        """``runner``, unless it is fused copies that were given up on since: then the model,
        or the copies that replaced them (copies with the CIFAR ResNet kernel, which failed
        their check, are replaced by copies without it)."""
        if self._fused is None or runner is self.model:
            return self.model
        if runner is self._fused[1]:
            return runner
        replaced = runner is not None and runner is self._kernel_copies_replaced
        return self._fused[1] if replaced else self.model

    @staticmethod
    def _kernel_members(fused):
        """Whether the fused copies run a member by drt-fast's CIFAR ResNet kernel."""
        from . import fuse

        return any(isinstance(m, fuse.CifarResNetMember) for m in fused.members)

    @staticmethod
    def _rewrites_with_cudnn(device):
        """The rewrite of the members: cuDNN fusion on CUDA, `_cpu_rewrites` elsewhere."""
        return device.type == "cuda"

    @staticmethod
    def _cuda_rewrites(members, example, run_dtype, use_kernel=True):
        """Each member with BatchNorms folded and conv(+add)+ReLU as cuDNN calls; in bf16,
        with ``DRT_FAST_RESNET_KERNEL=mma|wmma|1`` (experimental) and ``use_kernel``, a CIFAR
        ResNet member as one call of drt-fast's whole-network kernel instead
        -> (rewritten, status)."""
        from . import fuse

        rewritten = []
        wanted = use_kernel and run_dtype == torch.bfloat16
        variant = fuse.cifar_resnet_variant(example.device) if wanted else None
        for member in members:
            if variant is not None:
                kernel = fuse.cifar_resnet_for_inference(member, variant)
                if kernel.fused:
                    rewritten.append(kernel)
                    continue
            rewritten.append(fuse.for_inference(member, fuse.cudnn_ops(), run_dtype, example))
        cudnn = [r for r in rewritten if not isinstance(r.module, fuse.CifarResNetMember)]
        kernels = len(rewritten) - len(cudnn)
        parts = []
        if kernels:
            parts.append(f"{kernels} member(s) as one CIFAR ResNet kernel each "
                         f"({fuse.cifar_resnet_setting()})")
        if cudnn:
            parts.append(f"{sum(r.fused for r in cudnn)} fused convolutions, "
                         f"{sum(r.folded_bn for r in cudnn)} BatchNorms folded in {len(cudnn)} member(s)")
        return rewritten, "on: " + "; ".join(parts)

    def _cpu_rewrites(self, members, example, run_dtype, channels_last):
        """Each member as dense matrices where it lowers (`fuse.dense_for_inference`), else
        with BatchNorms folded and conv(+add)+ReLU as oneDNN calls: fp32 runs, and bf16 runs
        on channels-last draws (oneDNN's bf16 conv + add has no NCHW kernel); a member that
        gains nothing keeps the dense rewrite's reason -> (rewritten, status)."""
        from . import fuse

        if not fuse.onednn_available():
            no_onednn = "this torch build has no oneDNN"
        elif run_dtype not in (torch.float32, torch.bfloat16):
            no_onednn = f"oneDNN fusion runs fp32 and bf16, not {self.precision}"
        elif run_dtype == torch.bfloat16 and not fuse.onednn_available(torch.bfloat16):
            no_onednn = "oneDNN has no bf16 kernels for this CPU"
        elif run_dtype == torch.bfloat16 and not channels_last:
            no_onednn = "oneDNN's bf16 fusion needs channels-last draws"
        else:
            no_onednn = ""
        rewritten = []
        for member in members:
            dense = fuse.dense_for_inference(member, example)
            if not dense.dense and not no_onednn:
                fused = fuse.for_inference(member, fuse.onednn_ops(), run_dtype, example)
                dense = fused if fused.fused or fused.folded_bn else dense
            elif not dense.dense:
                dense.reason = f"{dense.reason}; {no_onednn}"
            rewritten.append(dense)
        lowered = [r for r in rewritten if r.dense]
        matrices = sum(r.dense for r in lowered)
        parts = []
        if lowered:
            # float32 runs of ReLU chains go through drt-fast's block kernel (DenseMember)
            chained = [r.module for r in lowered if r.module.chained] if run_dtype == torch.float32 else []
            kernel = ""
            if chained:
                dense_macs = sum(m.chain_stats[0] for m in chained)
                kernel = (f"; {len(chained)} run by the block-sparse CPU kernel, "
                          f"{sum(m.chain_stats[1] for m in chained) / dense_macs:.0%} of the multiply-adds")
            parts.append(f"{len(lowered)} of {len(rewritten)} member(s) as dense matrices "
                         f"({matrices} {'matrix' if matrices == 1 else 'matrices'}{kernel})")
        convs = [r for r in rewritten if r.fused or r.folded_bn]
        if convs:
            parts.append(f"{sum(r.fused for r in convs)} fused convolutions (oneDNN), "
                         f"{sum(r.folded_bn for r in convs)} BatchNorms folded in "
                         f"{len(convs)} member(s)")
        return rewritten, "on: " + "; ".join(parts)

    def _fusion_unsupported(self, device):
        """Why the fused copies cannot be used here ('' when they can)."""
        if self._rewrites_with_cudnn(device) and not (torch.backends.cudnn.is_available()
                                                      and torch.backends.cudnn.enabled):
            return "cuDNN is not available or is disabled"
        if self._model_dtype != torch.float32:
            return f"the model's weights are {self._model_dtype}, fusion takes float32 models"
        if self.model.batch_members:
            return "the ensemble runs its members batched (batch_members=True)"
        return ""

    def _fused_forward(self, fused, batch, model_dtype):
        """Logits of the fused copies; on their first batch they are checked against the
        model on up to 64 draws, and given up on (with a warning) when they disagree or fail."""
        record = self._fused
        try:
            logits = self._run(fused, batch, model_dtype)
            if not record[2]:
                head = batch[:64]
                want = self._run(self.model, head, model_dtype).float()
                got = logits[:, :head.shape[0]].float()
                tol = 1e-2 if self.precision == "fp32" else 1e-1
                finite = torch.isfinite(want)
                if not bool(finite.all()):
                    # The model itself gives NaN/inf (e.g. NaN weights): its logits are what
                    # counts (no vote for those draws, reported as NonFiniteLogitsError), and
                    # the copies, not at fault, are checked on a later batch.
                    return self._run(self.model, batch, model_dtype)
                if not torch.equal(finite, torch.isfinite(got)):
                    raise _FusionMismatch("non-finite logits where the model's are finite, "
                                          "or the other way round")
                err = float((got[finite] - want[finite]).norm() / want[finite].norm().clamp_min(1e-30))
                if err > tol:
                    raise _FusionMismatch(f"fused logits differ from the model's by {err:.2g} "
                                          f"(relative; tolerance {tol})")
                record[2] = True
            return logits
        except (RuntimeError, _FusionMismatch) as err:
            import warnings

            if self._kernel_members(fused) and self._kernel_failed is None:
                # drt-fast's CIFAR ResNet kernel failed: the same members as cuDNN's fused
                # copies instead (checked on this batch in turn), not the plain members
                self._kernel_failed = first_line(err)
                self._kernel_copies_replaced = fused
                runner = self._build_fused(record[0], batch[:1])
                warnings.warn(f"drt_fast: the CIFAR ResNet kernel was given up on "
                              f"({self._kernel_failed}); its members run as fused cuDNN copies",
                              RuntimeWarning, stacklevel=3)
                if runner is self.model:
                    return self._run(self.model, batch, model_dtype)
                return self._fused_forward(runner, batch, model_dtype)
            # A model that fails on these inputs fails here too, with its own error.
            logits = self._run(self.model, batch, model_dtype)
            self._fuse_failed = (f"fused copies gave up ({first_line(err)}); "
                                 f"running the members as they are")
            self._fused = None
            self.fuse_status = f"off: {self._fuse_failed}"
            if self.fuse:
                raise DrtFastError(f"fuse=True: the fused copies failed ({first_line(err)})") from err
            warnings.warn(f"drt_fast: {self._fuse_failed}", RuntimeWarning, stacklevel=3)
            return logits

    # ----------------------------------------------------------------- CUDA graphs
    _GRAPH_AUTO_ELEMENTS = 2**22   # auto: graphs where a batch of draws is at most this big
    _GRAPHS_KEPT = 4

    def _graphs_possible(self, xs):
        """Whether this group may use a CUDA graph at all (sets ``graph_status`` when not)."""
        if self.cuda_graphs is False or self._graphs_failed is not None:
            self.graph_status = "off" if self.cuda_graphs is False else f"off: {self._graphs_failed}"
            return False
        if xs.device.type != "cuda":
            if self.cuda_graphs:
                raise InvalidArgument("cuda_graphs=True: CUDA graphs need the model on a CUDA device")
            self.graph_status = "off: not on a CUDA device"
            return False
        if not ops.kernels_run_on(xs.device):   # the torch fallbacks sync with the host
            why = "drt_fast's CUDA kernels were not built (for this GPU)"
        elif self.model.batch_members:      # its stacked weights are not the module's tensors
            why = "the ensemble runs its members batched (batch_members=True)"
        else:
            return True
        if self.cuda_graphs:
            raise InvalidArgument(f"cuda_graphs=True: {why}")
        self.graph_status = f"off: {why}"
        return False

    def _graph_wanted(self, xs, reps):
        """Whether the full batches of this group run as a replayed CUDA graph (once the
        model's output and any fused copies have been checked on an eager batch)."""
        elements = xs.shape[0] * reps * math.prod(xs.shape[1:])
        if self.cuda_graphs is None and elements > self._GRAPH_AUTO_ELEMENTS:
            self.graph_status = (f"off: a batch of draws holds {elements:,} input elements "
                                 f"(auto is on up to {self._GRAPH_AUTO_ELEMENTS:,})")
            return False
        fused_unchecked = self._fused is not None and not self._fused[2]
        return self._output_checked(xs) and not fused_unchecked

    def _step_graph(self, xs, keys, counts_shape, step):
        """The captured step for this group (captured on first use), loaded with its inputs;
        False when capturing fails (then every batch runs eagerly from now on)."""
        # A graph reads the module's tensors where they were at capture: a module whose
        # tensors moved (.to(), rebuilt fused copies) gets new graphs, and the old ones go.
        runner = self._live(step["runner"])
        owner = (id(runner), tuple(t.data_ptr() for t in itertools.chain(runner.parameters(),
                                                                        runner.buffers())))
        if owner != self._graphs_owner:
            self._graphs.clear()
            self._graphs_owner = owner
        key = (tuple(xs.shape), str(xs.device), step["reps"], step["seed"], step["split"],
               step["channels_last"], self.precision, self.model.mode,
               tuple(step["weights"].tolist()), self.sigma)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = _StepGraph(self, xs, keys, counts_shape, step)
            except Exception as err:  # noqa: BLE001 -- an op that cannot be captured, ...
                self._graphs_failed = f"capture failed ({first_line(err)}); batches run eagerly"
                self.graph_status = f"off: {self._graphs_failed}"
                self._graphs.clear()
                if self.cuda_graphs:
                    raise DrtFastError(f"cuda_graphs=True: {self._graphs_failed}") from err
                return False
            while len(self._graphs) >= self._GRAPHS_KEPT:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = graph
        graph.load(xs, keys)                         # also clears the warm-up's votes
        self.graph_status = f"on: {len(self._graphs)} captured step(s)"
        return graph

    # ----------------------------------------------------------------- helpers
    def _output_checked(self, batch):
        """Whether the model's output was checked on inputs of ``batch``'s shape ``[R, *S]``
        (a call with inputs of another shape is checked, and its errors explained, anew)."""
        return self._checked_shape == tuple(batch.shape[1:])

    @property
    def _model_device(self):
        for tensor in self.model.members.parameters():
            return tensor.device
        return self.model.weights.device

    @property
    def _model_dtype(self):
        for tensor in self.model.members.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    @property
    def _draw_dtype(self):
        if self.precision == "fp32":
            # The noise is computed in fp32; a float64 model gets the fp32 draws cast up.
            return self._model_dtype if self._model_dtype in _LOGIT_DTYPES else torch.float32
        return PRECISIONS[self.precision]

    def _draws_channels_last(self, xs):
        """Whether the draws of 4-D inputs xs ``[G, C, H, W]`` are written channels-last
        (the model follows, converted once)."""
        if xs.dim() != 4:
            return False
        wanted = self.channels_last
        if wanted is None:
            wanted = xs.device.type == "cuda" or xs.shape[1] >= 3
        if wanted:
            self._to_channels_last()
        return wanted

    def _to_channels_last(self):
        if not self._model_channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._model_channels_last = True

    def _inputs(self, xs, keys):
        """Validated inputs ``[B, *S]`` (floating, where they are) and keys ``[B]`` (int64, CPU)."""
        if isinstance(xs, (list, tuple)) and xs and all(isinstance(x, torch.Tensor) for x in xs):
            # B inputs [*S] as a list (torch.as_tensor takes only one-element tensors there)
            try:
                xs = torch.stack(list(xs))
            except RuntimeError as err:
                raise InvalidArgument(f"inputs given as a list of tensors must have one shape "
                                      f"and device: {first_line(err)}") from None
        xs = torch.as_tensor(xs)
        if xs.numel() == 0 and xs.dim() < 2:
            xs = xs.reshape(0, 0).float()           # no inputs (e.g. a plain []): no work
        if not xs.is_floating_point():
            raise InvalidArgument(f"inputs must be floating-point pixels, got dtype {xs.dtype}")
        if xs.dim() < 2:
            raise InvalidArgument(f"inputs must have shape [B, *S], got {list(xs.shape)}")
        finite = torch.isfinite(xs).flatten(1).all(1)
        if not bool(finite.all()):
            # checked here: a fused or rewritten member need not carry a NaN through (oneDNN's
            # ReLU turns it into 0), so NaN logits would not reliably report it
            raise InvalidArgument(f"input {int((~finite).nonzero()[0])} of {xs.shape[0]} has NaN "
                                  f"or infinite pixels")
        try:
            keys = torch.as_tensor(keys).cpu().reshape(-1)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:   # None, "3", 2**64
            raise InvalidArgumentType(f"keys must be integer dataset indices in [0, 2^63), got "
                                      f"{keys!r} ({first_line(err)})") from None
        if keys.numel() == 0 == xs.shape[0]:
            keys = keys.to(torch.int64)             # torch.as_tensor([]) is float32
        if keys.is_floating_point() or keys.dtype == torch.bool or keys.numel() != xs.shape[0]:
            raise InvalidArgument(
                f"expected {xs.shape[0]} integer keys (one dataset index per input), got "
                f"{keys.numel()} of dtype {keys.dtype}")
        if keys.numel() and (keys.min() < 0):
            raise InvalidArgument(f"keys (dataset indices) must be >= 0, got {keys.min().item()}")
        return xs, keys.to(torch.int64)

    @staticmethod
    def _check_total(counted, expected, key):
        # vote_ casts no vote for a draw with a non-finite logit: missing votes are NaN/inf.
        counted = int(counted)
        if counted != expected:
            raise NonFiniteLogitsError(
                f"model produced NaN/inf logits on {expected - counted} of {expected} noisy "
                f"draws of input {key}")


def _out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA) or the CPU allocator's failure: the batch is too big,
    which the caller should hear as such (the CLI suggests a smaller --batch)."""
    text = first_line(err)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def _one(x):
    x = torch.as_tensor(x)
    return x.unsqueeze(0)


def _positive_int(value, name):
    return _int_in_range(value, name, 1, None)


def _int_in_range(value, name, low, high):
    try:
        value = operator.index(value)
    except TypeError:
        raise InvalidArgumentType(f"{name} must be an integer, got {value!r}") from None
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise InvalidArgument(f"{name} must be {bound}, got {value}")
    return value


def _check_alpha(alpha):
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise InvalidArgumentType(f"alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < value < 1.0:
        raise InvalidArgument(f"alpha must lie in (0, 1), got {alpha}")
    return value
