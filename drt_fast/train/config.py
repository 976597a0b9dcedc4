"""A training run's configuration (`TrainConfig`, the ``drt-fast train`` flags) and the
schedules that are pure functions of it and the epoch: learning rate, SmoothAdv radius,
seeds. Being pure functions, a resumed run needs no scheduler state."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import validate
from ..errors import InvalidArgument
from .inputs import AUGMENTS
from .losses import GD_NORMS

TRAINERS = ("gaussian", "smoothadv", "drt", "drt-smoothadv")
LR_SCHEDULES = ("step", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI's flags; see ``drt-fast train -h``)."""

    dataset: str = "digits"
    arch: str = "digits_cnn"
    members: int = 3
    sigma: float = 0.25              # noise level (pixels)
    trainer: str = "gaussian"
    rho1: float = 0.0                # weight of GD
    rho2: float = 0.0                # weight of CM
    gd_norm: str = "l2"
    m: int = 1                       # noise vectors per input
    augment: str = "auto"            # data augmentation (inputs.AUGMENTS; auto: Cohen's per dataset)
    workers: int | None = None       # DataLoader processes decoding image folders (None: up to 8)
    eps: float = 0.25                # SmoothAdv L2 radius (pixels)
    steps: int = 1                   # SmoothAdv PGD steps
    eps_warmup: int = 0              # SmoothAdv: grow eps linearly over this many epochs (0: none)
    epochs: int = 10
    lr: float = 0.1
    lr_schedule: str = "step"        # step: x lr_gamma at 50 % and 75 % of the epochs
    lr_step: int | None = None       # step: x lr_gamma every lr_step epochs instead (Cohen: 30)
    lr_gamma: float = 0.1            # step: the factor of each drop
    batch: int = 64                  # inputs per step (each gives m noisy copies)
    weight_decay: float = 1e-4
    init: str | list | None = None   # checkpoint(s) to start from: a drt-fast ensemble, or
                                     # one file per member (Cohen/DRT or drt-fast)
    out: str = "ensemble.pt"
    data_dir: str | None = None
    resume: bool = False
    overwrite: bool = False          # replace an existing out (and its training state)
    seed: int = 0
    device: str = "auto"
    log: str | None = None
    quiet: bool = False
    amp: bool = True                 # autocast on CUDA (bf16 where supported, else fp16)
    command: str | None = None       # the command line, for the record

    def validate(self) -> None:
        """Raise InvalidArgument (a DrtFastError and a ValueError) on any value a run cannot
        use (before anything is written)."""
        def bad(what, value):
            raise InvalidArgument(f"{what}, got {value!r}")

        if self.trainer not in TRAINERS:
            bad(f"--trainer must be one of {', '.join(TRAINERS)}", self.trainer)
        self.sigma = validate.sigma(self.sigma, "--sigma")
        for name in ("rho1", "rho2", "weight_decay", "eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(f"--{name.replace('_', '-')} must be a finite number >= 0", v)
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("--lr must be a finite number > 0", self.lr)
        for name in ("members", "m", "epochs", "batch", "steps"):
            validate.positive_int(getattr(self, name), f"--{name}")
        if self.eps_warmup < 0:
            bad("--eps-warmup must be >= 0", self.eps_warmup)
        if self.augment not in AUGMENTS:
            bad(f"--augment must be one of {', '.join(AUGMENTS)}", self.augment)
        if self.workers is not None and self.workers < 0:
            bad("--workers must be >= 0", self.workers)
        if self.trainer.startswith("drt") and self.members < 2:
            bad("the DRT trainers compare members and need --members >= 2", self.members)
        if self.gd_norm not in GD_NORMS:
            bad(f"--gd-norm must be one of {', '.join(GD_NORMS)}", self.gd_norm)
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        if self.lr_step is not None and self.lr_step < 1:
            bad("--lr-step must be >= 1", self.lr_step)
        if not (math.isfinite(self.lr_gamma) and 0 < self.lr_gamma <= 1):
            bad("--lr-gamma must be in (0, 1]", self.lr_gamma)
        if self.lr_schedule != "step" and (self.lr_step is not None or self.lr_gamma != 0.1):
            raise InvalidArgument("--lr-step and --lr-gamma shape the step schedule, not "
                                  f"--lr-schedule {self.lr_schedule}")
        validate.seed(self.seed, "--seed")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("--device must be auto, cpu or cuda[:i]", self.device)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``: a pure function, so resuming needs no scheduler state."""
    if config.lr_schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))
    if config.lr_step:
        drops = epoch // config.lr_step
    else:
        drops = sum(epoch >= math.ceil(f * config.epochs) for f in (0.5, 0.75))
    return config.lr * config.lr_gamma ** drops


def eps_at(config: TrainConfig, epoch: int) -> float:
    """SmoothAdv's attack radius in (0-based) ``epoch``: eps * (epoch + 1) / eps_warmup during
    the warm-up, then eps (Salman et al.'s schedule); a pure function, like ``lr_at``."""
    if config.eps_warmup <= 0:
        return config.eps
    return min(config.eps, config.eps * (epoch + 1) / config.eps_warmup)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed for (seed, epoch, rank): independent streams, no arithmetic collisions."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint64)[0] >> 1)
