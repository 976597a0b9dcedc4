"""Noisy draws -> member logits ``[M, R, K]``: the members themselves, or rewritten copies of
them (`drt_fast.fuse`) that compute the same logits faster.

The copies are built for the members' current tensors, precision, layout (and, on the CPU,
input shape), checked against the members on their first batch (up to 64 draws), and given
up for good -- with one warning, or an error under ``fuse=True`` -- when they disagree or
fail. A copy run by drt-fast's CIFAR ResNet kernel that fails its check costs the kernel
only: the members are rewritten again without it.
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..ensemble import Ensemble
from ..errors import DrtFastError, InvalidArgument, first_line, is_out_of_memory
from . import status as st
from .rewriters import default_rewriter

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what vote_ reads

# Relative L2 difference of the copies' logits from the members' on the first batch that
# is still agreement (rounding: fused kernels sum in another order).
CHECK_TOLERANCE = {"fp32": 1e-2, "bf16": 1e-1, "fp16": 1e-1}
CHECK_DRAWS = 64


class CopiesMismatch(Exception):
    """The rewritten copies do not compute the members' logits."""


@dataclass
class Copies:
    """Rewritten members for one ``key`` (member tensors, precision, layout, input shape)."""
    key: tuple
    ensemble: Optional[Ensemble]   # None: nothing was gained, the members run as they are
    checked: bool = False
    has_kernel: bool = False       # a member runs as drt-fast's CIFAR ResNet kernel


def model_device(model: Ensemble) -> torch.device:
    for tensor in model.members.parameters():
        return tensor.device
    return model.weights.device


def model_dtype(model: Ensemble) -> torch.dtype:
    for tensor in model.members.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def vote_logits(logits: torch.Tensor) -> torch.Tensor:
    """Member logits in a layout and dtype ``vote_`` takes (a float64 model's are cast)."""
    if logits.dtype not in VOTE_DTYPES:
        logits = logits.float()
    return logits.contiguous()


class MemberRunner:
    """Runs the members of ``model`` on noisy draws at ``precision``.

    fuse: None (auto: copies for float32 models where a rewrite gains), True (insist: an
    error where no member can be rewritten) or False (the members as they are).
    rewriter: how members are rewritten (`drt_fast.engine.rewriters`); None picks by device.
    ``status`` says what runs; ``generation`` changes whenever the module that runs does.
    """

    def __init__(self, model: Ensemble, num_classes: int, precision: str, fuse=None, rewriter=None):
        self.model = model
        self.num_classes = num_classes
        self.precision = precision
        self.fuse = fuse
        self.rewriter = rewriter
        self.status = st.UNUSED
        self.copies: Optional[Copies] = None
        self.gave_up: Optional[str] = None          # why the copies were given up, for good
        self.kernel_gave_up: Optional[str] = None   # why the CIFAR ResNet kernel was
        self.generation = 0
        self._checked_shape = None                  # draw shape [*S] the output was checked for
        self._dtype = None                          # model_dtype, as `prepare` last read it

    # ------------------------------------------------------------------ settings
    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def model_dtype(self) -> torch.dtype:
        """The members' floating dtype (read at `prepare`, once per sampler run: the steps
        between use it)."""
        if self._dtype is None:
            self._dtype = model_dtype(self.model)
        return self._dtype

    @property
    def draw_dtype(self) -> torch.dtype:
        """The dtype noisy draws are written in: the precision's, or at fp32 the model's own
        (a float64 model gets fp32 noise cast up)."""
        if self.precision == "fp32":
            return self.model_dtype if self.model_dtype in VOTE_DTYPES else torch.float32
        return PRECISION_DTYPES[self.precision]

    @property
    def module(self) -> torch.nn.Module:
        """The module that runs now: the copies, or the model."""
        if self.copies is None or self.copies.ensemble is None:
            return self.model
        return self.copies.ensemble

    def _rewriter(self, device):
        return self.rewriter if self.rewriter is not None else default_rewriter(device)

    # ------------------------------------------------------------------ building
    def prepare(self, example: torch.Tensor, channels_last: bool) -> None:
        """Have copies for draws like ``example`` ``[1, *S]`` (built when the members'
        tensors, the layout or -- on the CPU -- the input shape changed)."""
        self._dtype = model_dtype(self.model)
        if self.fuse is False or self.gave_up is not None:
            self._set_copies(None)
            self.status = st.off() if self.fuse is False else st.off(self.gave_up)
            return
        rewriter = self._rewriter(example.device)
        why_not = self._unsupported(rewriter, example.device)
        if why_not:
            if self.fuse:
                raise InvalidArgument(f"fuse=True: {why_not}")
            self._set_copies(None)
            self.status = st.off(why_not)
            return
        tensors = list(self.model.members.parameters()) + list(self.model.members.buffers())
        shape = tuple(example.shape[1:]) if rewriter.keyed_by_shape else None
        key = (tuple((t.data_ptr(), t._version) for t in tensors), self.precision, channels_last, shape)
        if self.copies is None or self.copies.key != key:
            self._build(rewriter, key, example, channels_last)

    def _unsupported(self, rewriter, device) -> str:
        why = rewriter.unsupported(device)
        if why:
            return why
        if self.model_dtype != torch.float32:
            return f"the model's weights are {self.model_dtype}, fusion takes float32 models"
        if self.model.batch_members:
            return "the ensemble runs its members batched (batch_members=True)"
        return ""

    def _build(self, rewriter, key, example, channels_last) -> None:
        example = example.to(self.model_dtype)
        run_dtype = self.model_dtype if self.precision == "fp32" else PRECISION_DTYPES[self.precision]
        rewrite = rewriter.rewrite(list(self.model.members), example, run_dtype, channels_last,
                                   use_kernel=self.kernel_gave_up is None)
        rewritten = rewrite.members
        reasons = sorted({r.reason for r in rewritten if r.reason})
        if self.kernel_gave_up is not None:
            reasons.append(f"the CIFAR ResNet kernel was given up on: {self.kernel_gave_up}")
        if sum(r.fused + r.folded_bn + r.dense for r in rewritten) == 0:
            why = "; ".join(reasons) or "nothing to fuse"
            if self.fuse:
                raise InvalidArgument(f"fuse=True: no member could be rewritten ({why})")
            self._set_copies(Copies(key, None))
            self.status = st.off(why)
            return
        ensemble = Ensemble([r.module for r in rewritten], mode=self.model.mode)
        if channels_last:
            ensemble.to(memory_format=torch.channels_last)
        self._set_copies(Copies(key, ensemble, has_kernel=rewrite.kernel))
        self.status = st.on(rewrite.text + (f" ({'; '.join(reasons)})" if reasons else ""))

    def _set_copies(self, copies: Optional[Copies]) -> None:
        if copies is not self.copies:
            self.copies = copies
            self.generation += 1

    # ------------------------------------------------------------------ running
    def run(self, module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """``module``'s output on ``batch`` at this runner's precision."""
        if self.precision == "fp32":
            return module(batch.to(self.model_dtype))
        # No cast cache: each weight is cast once per forward anyway, and a CUDA graph
        # capture must not keep cached casts.
        with torch.autocast(device_type=batch.device.type, dtype=PRECISION_DTYPES[self.precision],
                            cache_enabled=False):
            return module(batch)

    def forward_checked(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of the module that runs, once its output and copies were checked (no
        host synchronisation: what a captured CUDA graph runs)."""
        return vote_logits(self.run(self.module, batch))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Noisy draws ``[R, *S]`` -> member logits ``[M, R, K]`` in a dtype ``vote_`` takes;
        the first batch of a shape checks the output (and explains a model that fails on it),
        the copies' first batch checks them against the members."""
        try:
            if self.module is self.model:
                logits = self.run(self.model, batch)
            else:
                logits = self._copies_forward(batch)
        except RuntimeError as err:
            if self.output_checked(batch) or is_out_of_memory(err):
                raise
            # The first forward is where inputs of the wrong shape for the model show up.
            raise InvalidArgument(f"the model failed on noisy inputs of shape "
                                  f"{list(batch.shape)}: {first_line(err)}") from err
        logits = vote_logits(logits)
        if not self.output_checked(batch):
            if logits.dim() != 3 or logits.shape[1:] != (batch.shape[0], self.num_classes):
                raise InvalidArgument(
                    f"model output does not match num_classes={self.num_classes}: expected "
                    f"logits [{batch.shape[0]}, {self.num_classes}] per member, got "
                    f"{list(logits.shape[1:])}")
            self._checked_shape = tuple(batch.shape[1:])
        return logits

    def output_checked(self, batch: torch.Tensor) -> bool:
        """Whether the output was checked on draws of ``batch``'s shape ``[R, *S]``."""
        return self._checked_shape == tuple(batch.shape[1:])

    @property
    def copies_checked(self) -> bool:
        return self.copies is None or self.copies.ensemble is None or self.copies.checked

    def _copies_forward(self, batch: torch.Tensor) -> torch.Tensor:
        copies = self.copies
        try:
            logits = self.run(copies.ensemble, batch)
            if not copies.checked:
                head = batch[:CHECK_DRAWS]
                want = self.run(self.model, head).float()
                if not bool(torch.isfinite(want).all()):
                    # The model itself gives NaN/inf (e.g. NaN weights): its logits are what
                    # counts (reported as non-finite), the copies are checked on a later batch.
                    return self.run(self.model, batch)
                _compare(logits[:, :head.shape[0]].float(), want, CHECK_TOLERANCE[self.precision])
                copies.checked = True
            return logits
        except (RuntimeError, CopiesMismatch) as err:
            return self._give_up(copies, batch, err)

    def _give_up(self, copies: Copies, batch: torch.Tensor, err: Exception) -> torch.Tensor:
        if copies.has_kernel and self.kernel_gave_up is None:
            # The CIFAR ResNet kernel failed: the same members as copies without it (checked
            # on this batch in turn), not the plain members.
            self.kernel_gave_up = first_line(err)
            warnings.warn(f"drt_fast: the CIFAR ResNet kernel was given up on ({self.kernel_gave_up}); "
                          f"its members run as fused cuDNN copies", RuntimeWarning, stacklevel=4)
            self._build(self._rewriter(batch.device), copies.key, batch[:1], copies.key[2])
            if self.module is self.model:
                return self.run(self.model, batch)
            return self._copies_forward(batch)
        # A model that fails on these inputs fails here too, with its own error.
        logits = self.run(self.model, batch)
        self.gave_up = f"fused copies gave up ({first_line(err)}); running the members as they are"
        self._set_copies(None)
        self.status = st.off(self.gave_up)
        if self.fuse:
            raise DrtFastError(f"fuse=True: the fused copies failed ({first_line(err)})") from err
        warnings.warn(f"drt_fast: {self.gave_up}", RuntimeWarning, stacklevel=4)
        return logits


def _compare(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Raise `CopiesMismatch` unless ``got`` is finite where ``want`` is and within
    ``tolerance`` of it (relative L2)."""
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        raise CopiesMismatch("non-finite logits where the model's are finite, or the other way round")
    err = float((got[finite] - want[finite]).norm() / want[finite].norm().clamp_min(1e-30))
    if err > tolerance:
        raise CopiesMismatch(f"fused logits differ from the model's by {err:.2g} "
                             f"(relative; tolerance {tolerance})")
