"""The training loop behind ``drt-fast train``: Gaussian, SmoothAdv, DRT, DRT-SmoothAdv.

All members train jointly in one loop over the same batches:

* ``gaussian``  — Cohen: sum_i CE(f_i(x + eps_i), y), each member with its own noise;
* ``smoothadv`` — Salman: per member, PGD on that member's smoothed soft classifier with m
  noise draws, then CE on the adversarial point plus the same draws;
* ``drt``       — sum_i CE(f_i(x + eps), y) + rho1 * GD - rho2 * CM on m noisy copies per
  input shared by all members (GD compares the members at the same points);
* ``drt-smoothadv`` — as ``drt``, on PGD points of the smoothed *ensemble* (average of the
  members' softmax over the m draws) so that all members are regularized at one point.

Determinism: the data order and all noise of epoch e come from generators seeded by
(seed, e) (and the rank under torchrun), the learning rate is a pure function of the epoch,
and the checkpoint written at the end of each epoch holds the weights and the optimizer's
momentum. So ``--resume`` after any finished epoch gives the weights of an uninterrupted run
(bit-identical on CPU). A step whose loss is not finite stops the run with an error before
the optimizer takes it; the checkpoint of the last finished epoch stays as it was.

Files: ``out`` is a drt-fast ensemble checkpoint (``checkpoint.save_ensemble``), rewritten
atomically after every epoch; ``out + ".state.pt"`` holds what resuming needs (epoch,
optimizer, config); ``log`` gets a line per epoch: a CSV row when its name ends in ``.csv``,
else a JSON line (terms a trainer does not compute are empty / null).

Multi-process (``torchrun``, gloo on CPU / nccl on CUDA): every rank takes a disjoint share
of each batch (shares differ by at most one input; each rank's loss is scaled by its share, so
that the average is the whole batch's mean) with its own noise, and the gradients are averaged
with ``all_reduce`` after ``backward``. The process count is part of the run: a resume must
use the same. (DistributedDataParallel is not used: its hooks do not support the double
backward of GD.) Rank 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..errors import DrtFastError, InvalidArgument
from .inputs import AUGMENTS, TrainInputs, eval_batches, resolve_augment
from .losses import GD_NORMS, drt_terms_from_logits, eval_mode, gaussian_loss, member_forward
from .smoothadv import pgd_smoothed

TRAINERS = ("gaussian", "smoothadv", "drt", "drt-smoothadv")
LR_SCHEDULES = ("step", "cosine")

# Config fields that may differ between a run and its resumption (they do not change the
# weights); every other field must match the checkpoint being resumed.
# ``init`` only matters at the start: a resumed run keeps the value its first command had.
_RESUME_FREE = ("out", "resume", "overwrite", "quiet", "log", "device", "data_dir", "command", "amp",
                "init", "workers")


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


def state_path(out: str) -> str:
    """Where the resumable training state of ``out`` lives."""
    return out + ".state.pt"


def path_for_record(path, out) -> str:
    """``path`` as the record of checkpoint ``out`` keeps it: relative to the folder of
    ``out``, so that nothing of the machine that trained it travels with the file."""
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(out)))


def init_paths(config: TrainConfig) -> list[str]:
    """``--init`` as a list of paths (empty without one)."""
    if not config.init:
        return []
    return [config.init] if isinstance(config.init, (str, os.PathLike)) else [str(p) for p in config.init]


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUME_FREE}


def build_members(config: TrainConfig, num_classes: int, normalization) -> list[nn.Module]:
    """M fresh members ``Sequential(NormalizeLayer, arch)``, initialized from ``config.seed``."""
    from .. import models

    torch.manual_seed(config.seed)
    means, sds = normalization
    return [models.with_normalization(models.create(config.arch, num_classes), means, sds)
            for _ in range(config.members)]


def _load_init(config: TrainConfig, members: list[nn.Module], num_classes: int,
               normalization) -> None:
    """Copy the weights of the ``--init`` checkpoint(s) into ``members``: one drt-fast
    ensemble, or one file per member (Cohen/DRT base models, or drt-fast files), of the run's
    arch, dataset (where the file names one), classes, input normalization and member count."""
    from ..checkpoint import load_checkpoint, same_normalization

    paths = init_paths(config)
    for path in paths:
        if not os.path.isfile(path):
            raise DrtFastError(f"--init checkpoint {path} does not exist")
    what = paths[0] if len(paths) == 1 else f"{paths[0]} ... ({len(paths)} files)"
    # A Cohen file's normalization follows the dataset it is named for (an .npz has none:
    # then its arch's, checked against the file's below).
    ens, meta = load_checkpoint(paths if len(paths) > 1 else paths[0],
                                dataset=None if config.dataset == "npz" else config.dataset)
    archs = set(meta.get("archs") or [meta.get("arch")])
    if archs != {config.arch}:
        raise DrtFastError(f"--init {what} has arch {', '.join(sorted(map(str, archs)))}, "
                           f"this run has {config.arch!r}")
    # (a Cohen file names no dataset: the one its arch implies is no reason to refuse it; an
    # .npz holds any data, which the normalization check below matches)
    if (meta.get("format") != "cohen" and config.dataset != "npz"
            and meta.get("dataset") not in (None, config.dataset)):
        raise DrtFastError(f"--init {what} has dataset {meta.get('dataset')!r}, "
                           f"this run has {config.dataset!r}")
    if meta.get("num_classes") != num_classes:
        raise DrtFastError(f"--init {what} has {meta.get('num_classes')} classes, "
                           f"dataset {config.dataset} has {num_classes}")
    got, want = meta.get("normalization"), normalization
    if got is None or not same_normalization(got, want):
        raise DrtFastError(f"--init {what} normalizes inputs with means {list(got[0]) if got else None}, "
                           f"sds {list(got[1]) if got else None}; dataset {config.dataset} has "
                           f"{list(want[0])}, {list(want[1])} (an .npz sets them with 'means'/'sds')")
    if len(ens.members) != len(members):
        raise DrtFastError(f"--init {what} has {len(ens.members)} member"
                           f"{'s' if len(ens.members) != 1 else ''}, "
                           f"this run has --members {len(members)}")
    for i, (dst, src) in enumerate(zip(members, ens.members)):
        try:
            dst.load_state_dict(src.state_dict())
        except RuntimeError as err:
            raise DrtFastError(f"--init {what}: member {i} does not fit a {config.arch} "
                               f"member: {str(err).strip().splitlines()[-1].strip()}") from None


@torch.no_grad()
def clean_accuracy(members: Sequence[nn.Module], x, y: torch.Tensor, batch: int = 1000,
                   workers: int = 0, group=None) -> float:
    """Accuracy of the clean WE ensemble (mean of member softmax) on x [N, *S] (a tensor or
    `data.LazyImages`, read by ``workers`` processes), y [N], on the members' device.

    Under torchrun (``group`` active; every rank calls it) each rank evaluates a contiguous
    share and the counts are summed: the same number, without every rank decoding the whole
    validation set."""
    device = next(members[0].parameters()).device
    mine = group.share(len(x)) if group is not None else slice(0, len(x))
    start, stop = mine.start, mine.stop
    correct, s = 0, start
    with eval_mode(members):
        for xb in eval_batches(x, batch, device, workers, start, stop):
            p = torch.stack([torch.softmax(f(xb).float(), 1) for f in members]).mean(0)
            correct += int((p.argmax(1).cpu() == y[s:s + len(xb)].cpu()).sum())
            s += len(xb)
    if group is not None and group.active:
        import torch.distributed as dist

        total = torch.tensor([float(correct)], device=device)
        dist.all_reduce(total)
        correct = int(total.item())
    return correct / max(1, len(x))


@torch.no_grad()
def _finite_outputs(members: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether every member's eval-mode logits on ``x`` are finite."""
    with eval_mode(members):
        return all(bool(torch.isfinite(f(x)).all()) for f in members)


class _Step:
    """One optimization step's loss for the configured trainer (returns loss and statistics)."""

    def __init__(self, config: TrainConfig, members: list[nn.Module]):
        self.c = config
        self.members = members
        self.eps = config.eps  # SmoothAdv radius of the current epoch (eps_at)

    def _set_train(self, mode: bool) -> None:
        for f in self.members:
            f.train(mode)

    def __call__(self, x, y, gen, autocast):
        c, M = self.c, len(self.members)
        y_rep = y.repeat_interleave(c.m)
        x_rep = x.repeat_interleave(c.m, dim=0)

        def noise():
            return c.sigma * torch.randn(x_rep.shape, generator=gen, device=x.device, dtype=x.dtype)

        stats = {"gd": None, "cm": None}     # None: not computed by this trainer / these weights
        if c.trainer in ("gaussian", "smoothadv"):
            ce_total, correct = 0.0, 0
            loss = 0.0
            for f in self.members:
                if c.trainer == "smoothadv":
                    eps_i = noise()
                    self._set_train(False)
                    x_adv = pgd_smoothed([f], x, y, eps_i, c.m, self.eps, c.steps)
                    self._set_train(True)
                    with autocast():
                        logits = f(x_adv.repeat_interleave(c.m, dim=0) + eps_i)
                        ce = F.cross_entropy(logits.float(), y_rep)
                else:
                    with autocast():
                        ce, logits = gaussian_loss(f, x_rep, y_rep, c.sigma, gen)
                loss = loss + ce
                ce_total += ce.item()
                correct += int((logits.argmax(1) == y_rep).sum())
            stats.update(ce=ce_total / M, acc=correct / (M * len(y_rep)))
            return loss, stats

        # DRT: the same noisy copies for every member
        eps = noise()
        if c.trainer == "drt-smoothadv":
            self._set_train(False)
            x_adv = pgd_smoothed(self.members, x, y, eps, c.m, self.eps, c.steps)
            self._set_train(True)
            x_noisy = x_adv.repeat_interleave(c.m, dim=0) + eps
        else:
            x_noisy = x_rep + eps
        with autocast():
            views, logits = member_forward(self.members, x_noisy)
            logits = [z.float() for z in logits]
            ces = [F.cross_entropy(z, y_rep) for z in logits]
            need_terms = c.rho1 > 0 or c.rho2 > 0
            if need_terms:
                gd, cm = drt_terms_from_logits(views, logits, y_rep, c.gd_norm,
                                               compute_gd=c.rho1 > 0)
            loss = torch.stack(ces).sum()
            if need_terms:
                loss = loss + c.rho1 * gd - c.rho2 * cm
                stats.update(gd=gd.item() if c.rho1 > 0 else None, cm=cm.item())
        correct = sum(int((z.argmax(1) == y_rep).sum()) for z in logits)
        stats.update(ce=float(torch.stack(ces).detach().mean()), acc=correct / (M * len(y_rep)))
        return loss, stats


def _diverged(config: TrainConfig, epoch: int, steps: int) -> DrtFastError:
    kept = (f"{config.out} holds the last finished epoch ({epoch})" if epoch
            else "no epoch finished, so nothing was written")
    return DrtFastError(f"training diverged: the loss is not finite in epoch {epoch + 1}, step "
                        f"{steps + 1} (try a smaller --lr); {kept}")


def _log_line(path: str | None, record: dict, new: bool = False) -> None:
    """Add ``record`` to the log (``new``: replacing what the file held): a CSV row (a header
    first in a new or empty file; None as an empty field) when ``path`` ends in ``.csv``, else a
    JSON line (None as null)."""
    if not path:
        return
    with open(path, "w" if new else "a", newline="") as fh:
        if path.lower().endswith(".csv"):
            import csv

            writer = csv.DictWriter(fh, fieldnames=list(record))
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(record)
        else:
            fh.write(json.dumps(record) + "\n")


def _check_outputs(config: TrainConfig) -> None:
    """Refuse, before anything is trained, outputs that exist (without --resume or
    --overwrite), that cannot be written, or that collide."""
    from ..io import probe_writable

    if config.resume and config.overwrite:
        raise DrtFastError("--resume continues the run that wrote --out, --overwrite replaces it: "
                           "pass one of them")
    for path, flag in ((config.out, "--out"), (config.log, "--log")):
        if path and os.path.isdir(path):
            raise DrtFastError(f"{flag} {path} is a directory; expected a file path")
    files = [config.out, state_path(config.out)]
    if config.log:
        if os.path.abspath(config.log) in [os.path.abspath(p) for p in files]:
            raise DrtFastError(f"--log {config.log} would overwrite the checkpoint or its training "
                               f"state; choose another file")
        files.append(config.log)
    if not (config.resume or config.overwrite):
        existing = [p for p in files if os.path.exists(p)]
        if existing:
            raise DrtFastError(f"{existing[0]} exists: pass --resume to continue its run, "
                               f"--overwrite to replace it, or another --out / --log")
    for path, what in zip(files, ("the checkpoint", "the training state", "the log")):
        probe_writable(path, what)


def train(config: TrainConfig, on_epoch: Callable[[dict], None] | None = None) -> str:
    """Train (or resume) the ensemble ``config`` describes; return the checkpoint path.

    Everything a user can get wrong is checked before the first file is written.
    ``on_epoch(entry)``: called in the main process after each epoch's checkpoint and log
    line, with the log entry (epoch, ce, gd, cm, train_acc, test_acc, lr, time).
    """
    from .. import data as data_mod
    from .. import distributed, models
    from ..checkpoint import atomic_torch_save, plain_config, safe_load, save_ensemble
    from ..ensemble import Ensemble

    config.validate()
    models.input_shape(config.arch)                       # unknown arch -> DrtFastError
    group = distributed.from_env()
    device = distributed.init(group, distributed.resolve_device(config.device))
    _check_outputs(config)

    train_set = data_mod.load(config.dataset, "train", config.data_dir)
    test_set, no_test_split = _test_split(config)
    augment = resolve_augment(config.augment, config.dataset, isinstance(train_set.x, torch.Tensor))
    expected = tuple(models.input_shape(config.arch))
    if tuple(train_set.x.shape[1:]) != expected:
        raise DrtFastError(f"--arch {config.arch} expects inputs of shape {list(expected)}, "
                           f"dataset {config.dataset} has {list(train_set.x.shape[1:])}")
    if group.active and min(config.batch, len(train_set.y)) < group.world_size:
        raise DrtFastError(f"--batch {config.batch} (of {len(train_set.y)} training inputs) "
                           f"cannot give each of the {group.world_size} processes an input")
    members = build_members(config, train_set.num_classes, train_set.normalization)

    params = [p for f in members for p in f.parameters()]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9,
                                weight_decay=config.weight_decay)
    record = plain_config(dataclasses.asdict(config))     # a Path as init: the state must load
    for key in ("out", "log", "data_dir"):
        if record.get(key):
            record[key] = path_for_record(record[key], config.out)
    if record.get("init"):
        record["init"] = ([path_for_record(p, config.out) for p in record["init"]]
                          if isinstance(record["init"], (list, tuple)) else path_for_record(record["init"], config.out))
    record["world_size"] = group.world_size     # the batch split, hence the weights, depend on it
    record["augment"] = augment                 # what "auto" meant
    start_epoch = 0
    if config.resume:
        path = state_path(config.out)
        if not os.path.isfile(path):
            raise DrtFastError(f"--resume: no training state {path} next to {config.out}")
        state = safe_load(path, "cpu", "training state")
        saved = state.get("config") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or not {"epoch", "members", "optimizer"} <= set(state):
            raise DrtFastError(f"--resume: {path} is not a drt-fast training state")
        # A state written before a setting existed ran as its default did (no augmentation
        # then); world_size was not recorded at first.
        older = {**dataclasses.asdict(TrainConfig()), "augment": "none", "world_size": group.world_size}
        saved = {**older, **saved}
        record["init"] = saved.get("init")
        diff = {k: (saved.get(k), v) for k, v in _comparable(record).items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise DrtFastError(f"--resume: {path} was written by a different run ({shown})")
        for f, sd in zip(members, state["members"]):
            f.load_state_dict(sd)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
    elif config.init:
        _load_init(config, members, train_set.num_classes, train_set.normalization)

    if no_test_split and group.is_main:    # said once, after every check that could refuse the run
        import warnings

        warnings.warn(f"training without a test split ({no_test_split}): the log has no test accuracy")
    for f in members:
        f.to(device).train()
    workers = config.workers
    if workers is None:      # image folders: decode in parallel, sharing the cores among ranks
        # (the cores this process may run on: a batch job or a container gets fewer than
        # the machine has)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(8, max(1, (cores or 1) // group.world_size))
    inputs = TrainInputs(train_set.x, train_set.y, augment, config.seed, device, workers)
    step = _Step(config, members)
    autocast = _autocast_factory(config, device)

    def save(epoch: int) -> None:
        cpu_members = [{k: v.detach().cpu() for k, v in f.state_dict().items()} for f in members]
        atomic_torch_save({"config": record, "epoch": epoch, "members": cpu_members,
                            "optimizer": optimizer.state_dict()}, state_path(config.out))
        ensemble = Ensemble([_cpu_copy(f) for f in members])
        save_ensemble(config.out, ensemble, arch=config.arch, dataset=config.dataset,
                      num_classes=train_set.num_classes, input_shape=list(expected),
                      normalization=train_set.normalization, sigma=config.sigma,
                      train_config={**record, "epochs_done": epoch})

    n_train = len(inputs)
    world = group.world_size
    for epoch in range(start_epoch, config.epochs):
        t0 = time.time()
        lr = lr_at(config, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step.eps = eps_at(config, epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, group.rank))   # anything on the global RNG
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(
            epoch_seed(config.seed, epoch)))
        gen = torch.Generator(device=device).manual_seed(epoch_seed(config.seed, epoch, group.rank + 1))
        totals = {"ce": 0.0, "gd": 0.0, "cm": 0.0, "acc": 0.0}
        counted = dict.fromkeys(totals, 0)
        n_steps = 0
        # under torchrun a last partial batch could leave a rank without inputs: drop it
        last = n_train - config.batch + 1 if group.active else n_train
        chunks = [order[s:s + config.batch] for s in range(0, max(1, last), config.batch)]
        shares = [c[group.share(len(c))] for c in chunks]
        # the batches first: zip then runs their loader to its end, which stops its workers
        bar = _progress(zip(inputs.epoch(epoch, shares), chunks), len(chunks), config, group, epoch)
        for (xb, yb), chunk in bar:
            loss, stats = step(xb, yb, gen, autocast)
            if world > 1 and len(chunk) % world:
                loss = loss * (len(yb) * world / len(chunk))    # shares of unequal size
            # The loss's terms are on the host already (the step's statistics): a non-finite
            # one stops the run before the weights take it. Under torchrun the flag travels
            # with the gradients, so that every rank stops at the same step.
            finite = all(math.isfinite(v) for v in stats.values() if v is not None)
            if not (finite or group.active):
                raise _diverged(config, epoch, n_steps)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if group.active:
                bad = torch.tensor([0.0 if finite else 1.0], device=device)
                _all_reduce_mean([p.grad for p in params] + [bad])
                if float(bad) > 0:
                    raise _diverged(config, epoch, n_steps)
            optimizer.step()
            for k in totals:
                if stats.get(k) is not None:
                    totals[k] += stats[k]
                    counted[k] += 1
            n_steps += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{stats[k]:.3f}" for k in ("ce", "gd", "cm") if stats.get(k) is not None})
        # the epoch's last step is checked here (a step's loss shows the weights before it):
        # finite weights and finite logits on a few training inputs (of the last batch)
        if not (all(bool(torch.isfinite(p).all()) for p in params)
                and _finite_outputs(members, xb[:64])):
            raise _diverged(config, epoch, n_steps - 1)
        # The epoch's weights are saved before the test accuracy, which may fail (an
        # unreadable image in an ImageNet val/ folder) or be interrupted: the epoch stays.
        if group.is_main:
            save(epoch + 1)
        means = {k: v / counted[k] if counted[k] else None for k, v in totals.items()}
        test_acc = None if test_set is None else clean_accuracy(
            members, test_set.x, test_set.y, workers=workers, group=group)
        entry = {"epoch": epoch + 1, "ce": means["ce"], "gd": means["gd"], "cm": means["cm"],
                 "train_acc": means["acc"], "test_acc": test_acc,
                 "lr": lr, "time": round(time.time() - t0, 3)}
        if "smoothadv" in config.trainer:
            entry["eps"] = step.eps
        if group.is_main:
            # a new run (--overwrite included) starts its log with its first epoch
            _log_line(config.log, entry, new=epoch == start_epoch and not config.resume)
            if not config.quiet:
                print(json.dumps(entry), file=sys.stderr)
            if on_epoch is not None:
                on_epoch(entry)
    if start_epoch >= config.epochs and group.is_main and not os.path.exists(config.out):
        save(config.epochs)
    # Leave together (rank 0 may still be writing the last checkpoint), then tear down.
    distributed.barrier(group)
    distributed.shutdown(group)
    return config.out


def _test_split(config: TrainConfig):
    """(the held-out split each epoch's test accuracy is measured on, None) or (None, why
    there is none): an .npz is one set of inputs; an image-folder tree may have no val/."""
    from .. import data as data_mod

    missing = None
    if config.dataset == "npz":
        missing = "an .npz file is one set of inputs"
    elif config.dataset == "imagenet":
        root = config.data_dir or os.environ.get("IMAGENET_DIR")
        if root and not os.path.isdir(os.path.join(root, "val")):
            missing = f"{root} has no val/ folder"
    if missing is None:
        return data_mod.load(config.dataset, "test", config.data_dir), None
    return None, missing


def _cpu_copy(f: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(f).cpu().eval()


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    world = dist.get_world_size()
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _autocast_factory(config: TrainConfig, device: torch.device):
    import contextlib

    if device.type != "cuda" or not config.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # fp16 would need loss scaling for the double backward; bf16 (Ampere and later) does not
    if dtype == torch.float16:
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=dtype)


def _progress(batches, total: int, config: TrainConfig, group, epoch: int):
    if config.quiet or not group.is_main or not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                file=sys.stderr)
