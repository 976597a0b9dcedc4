"""Ensembles of base classifiers, smoothed as one classifier (Ensemble-before-Smoothing).

Every member sees the same (noisy) input; ``forward`` returns the stacked member logits
``[M, B, K]`` and the aggregation into one hard label per input happens afterwards — in
the fused ``drt_fast.ops.vote_`` on the certification hot path, or in ``aggregate`` here
(pure torch, same rules) for clean accuracy and tests.

Aggregation modes (docs/DESIGN.md section 3), per input:
* ``we``    — weighted average of member softmax probabilities, argmax (the paper's WE);
* ``logit`` — weighted average of member logits, argmax;
* ``mme``   — the member with the largest softmax top-1 minus top-2 margin decides with
              its own argmax (the paper's MME; weights are not used);
* ``mv``    — weighted hard majority vote of member argmaxes.
Ties break toward the smaller class index and, in ``mme``, the smaller member index.
"""
import copy
import itertools

import torch
from torch import nn
from torch.func import functional_call

from . import validate
from .errors import InvalidArgument, InvalidArgumentType
from .ops import reference_labels

MODES = validate.AGGREGATIONS


class Ensemble(nn.Module):
    """M base classifiers with an aggregation mode and member weights.

    members: nn.Modules mapping ``[B, *S]`` inputs to logits ``[B, K]`` (all with the same K);
    mode: one of ``MODES``; weights: M non-negative numbers (normalized to sum 1 and kept as
    the float32 buffer ``weights``), uniform when None.

    batch_members: when all members share one architecture (same class, same printed
    configuration, same parameter and buffer shapes), run them as one vmapped call over
    their stacked weights (``torch.func.functional_call``) instead of M calls — in eval mode
    without autograd or autocast only, i.e. when certifying at fp32. The first batched call
    is checked against the member-by-member loop and batching turns itself off if they
    disagree or the members do not vmap. Logits agree to rounding (batched matmuls and
    convolutions may sum in another order). Off by default: on CPU (1 thread, idle) it
    measured slower — 3x digits CNN 13.3 vs 5.4 ms per 1000 draws, 3x ResNet-20 1.17 vs
    0.77 s per 100 — since vmapped convolutions become grouped ones; it is a lever to measure
    on GPU, where M small forwards cost M times the launches.
    """

    def __init__(self, members, mode="we", weights=None, batch_members=False):
        super().__init__()
        members = list(members)
        if not members:
            raise InvalidArgument("an Ensemble needs at least one member, got none")
        for i, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise InvalidArgument(
                    f"ensemble members must be torch.nn.Modules, member {i} is {type(member).__name__}")
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.register_buffer("weights", _normalized_weights(weights, len(members)))
        self.batch_members = batch_members
        # None: not yet tried; True/False: the first batched call matched the loop, or not.
        self._batching_works = None
        self._stacked = None        # (key of the member tensors, params, buffers)
        self._meta_member = []      # [members[0] on the meta device]: a list, not a submodule

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, mode):
        self._mode = validate.aggregation(mode, "ensemble mode")

    def __len__(self):
        return len(self.members)

    def forward(self, x):
        """x: ``[B, *S]`` -> stacked member logits ``[M, B, K]``."""
        # vmap runs beneath autocast (the batched matmuls would silently stay in fp32), so
        # low-precision runs use the loop.
        if (self.batch_members and self._batching_works is not False and len(self.members) > 1
                and not self.training and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type)):
            if self._batching_works:
                return self._batched_forward(x)
            return self._try_batching(x)
        return self._looped_forward(x)

    def _looped_forward(self, x):
        outputs = [member(x) for member in self.members]
        first = outputs[0]
        for i, out in enumerate(outputs):
            if out.dim() != 2 or out.shape != first.shape or out.shape[0] != x.shape[0]:
                raise InvalidArgument(
                    f"every member must return logits of shape [B, K] = [{x.shape[0]}, K] with "
                    f"the same K, member {i} returned {list(out.shape)} "
                    f"(member 0: {list(first.shape)})")
        return torch.stack(outputs)

    def _batched_forward(self, x):
        """All members in one vmapped call over their stacked parameters and buffers."""
        params, buffers = self._stacked_state()
        if not self._meta_member:
            self._meta_member.append(copy.deepcopy(self.members[0]).to("meta"))
        meta = self._meta_member[0]

        def member_forward(p, b, inputs):
            return functional_call(meta, (p, b), (inputs,))

        return torch.vmap(member_forward, in_dims=(0, 0, None))(params, buffers, x)

    def _stacked_state(self):
        """Member parameters and buffers stacked on a leading M dimension, restacked whenever a
        member tensor was replaced or changed in place (optimizer step, load_state_dict, .to)."""
        tensors = [t for m in self.members for t in itertools.chain(m.parameters(), m.buffers())]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._stacked is None or self._stacked[0] != key:
            with torch.no_grad():
                named = [dict(m.named_parameters()) for m in self.members]
                params = {k: torch.stack([p[k] for p in named]) for k in named[0]}
                named = [dict(m.named_buffers()) for m in self.members]
                buffers = {k: torch.stack([b[k] for b in named]) for k in named[0]}
            self._stacked = (key, params, buffers)
        return self._stacked[1:]

    def _try_batching(self, x):
        """First batched call: compare with the loop on the same input; keep batching only if
        the logits agree (to rounding of the logits' dtype)."""
        looped = self._looped_forward(x)
        if not _same_architecture(self.members):
            self._batching_works = False
            return looped
        try:
            batched = self._batched_forward(x)
        except Exception:  # an op without a vmap rule, data-dependent control flow, ...
            self._batching_works = False
            return looped
        tol = 1e-3 if looped.dtype in (torch.float32, torch.float64) else 1e-1
        scale = 1.0 + float(looped.float().abs().max()) if looped.numel() else 1.0
        self._batching_works = (batched.shape == looped.shape and batched.dtype == looped.dtype
                                and bool(((batched.float() - looped.float()).abs()
                                          <= tol * scale).all()))
        return looped

    def aggregate(self, logits):
        """Stacked logits ``[M, B, K]`` -> labels ``[B]`` (int64) under this ensemble's mode."""
        return aggregate(logits, self.mode, self.weights)

    @torch.inference_mode()
    def predict(self, x):
        """Clean (un-noised) ensemble labels ``[B]`` of inputs ``x`` ``[B, *S]``."""
        return self.aggregate(self(x))

    def extra_repr(self):
        return f"mode={self.mode!r}, weights={[round(w, 4) for w in self.weights.tolist()]}"


def as_ensemble(model):
    """An Ensemble as is; a bare nn.Module as a one-member Ensemble (its logits unchanged)."""
    if isinstance(model, Ensemble):
        return model
    if isinstance(model, nn.Module):
        return Ensemble([model])
    raise InvalidArgumentType(f"expected an nn.Module or a drt_fast.Ensemble, got {type(model).__name__}")


def aggregate(logits, mode, weights=None):
    """Per-draw ensemble labels from stacked member logits, in pure torch.

    logits: ``[M, R, K]``; mode: one of ``MODES``; weights: ``[M]`` summing to 1 (uniform
    when None). Returns int64 labels ``[R]``; a draw with any non-finite logit gets -1,
    which mirrors ``vote_`` not counting it. Same rules as ``drt_fast.ops.vote_``.
    """
    validate.aggregation(mode, "ensemble mode")
    if logits.dim() != 3:
        raise InvalidArgument(f"logits must have shape [M, R, K], got {list(logits.shape)}")
    M = logits.shape[0]
    w = torch.full((M,), 1.0 / M, dtype=torch.float64) if weights is None else weights
    return reference_labels(logits, mode, w)


def _same_architecture(members):
    """Whether members can share one functional forward: same class, same printed
    configuration (layer hyper-parameters) and the same parameter and buffer names/shapes."""
    def signature(m):
        return (type(m), repr(m),
                [(k, tuple(t.shape)) for k, t in m.named_parameters()],
                [(k, tuple(t.shape)) for k, t in m.named_buffers()])
    first = signature(members[0])
    return all(signature(m) == first for m in members[1:])


def _normalized_weights(weights, M):
    if weights is None:
        return torch.full((M,), 1.0 / M, dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    if w.numel() != M:
        raise InvalidArgument(f"expected {M} ensemble weights (one per member), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise InvalidArgument(f"ensemble weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise InvalidArgument(f"ensemble weights must have a positive sum, got {w.tolist()}")
    return (w / w.sum()).to(torch.float32)
