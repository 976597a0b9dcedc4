"""A training run's state and its files: the live `Run`, the record of its configuration,
the checkpoint and resumable state written after each epoch, ``--resume`` and ``--init``.

``out`` is a drt-fast ensemble checkpoint (`drt_fast.checkpoint.save_ensemble`);
``state_path(out)`` holds what resuming needs (epoch, members, optimizer, the record).
The record keeps paths relative to the folder of ``out`` (`path_for_record`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import models
from ..checkpoint import (atomic_torch_save, load_checkpoint, plain_config, safe_load,
                          same_normalization, save_ensemble)
from ..data import Dataset
from ..distributed import ProcessGroup
from ..ensemble import Ensemble
from ..errors import DrtFastError
from ..io import probe_writable
from .config import TrainConfig
from .inputs import TrainInputs
from .steps import Step


@dataclass
class Run:
    """What a training run carries from epoch to epoch."""

    config: TrainConfig
    group: ProcessGroup                   # the torchrun process group (inactive: one process)
    device: torch.device
    members: list[nn.Module]          # Sequential(NormalizeLayer, arch), on ``device``
    params: list[nn.Parameter]        # every member's, in the optimizer's order
    optimizer: torch.optim.Optimizer
    record: dict                      # the configuration as the files record it (`new_record`)
    train_set: Dataset
    test_set: Dataset | None          # None: no held-out split (see the log's test_acc)
    inputs: TrainInputs               # each epoch's batches
    step: Step                        # the trainer's loss
    autocast: Callable                # () -> the context of a step's forward passes
    workers: int                      # image-decoding processes
    start_epoch: int                  # epochs done before this process started


# Config fields that may differ between a run and its resumption (they do not change the
# weights); every other field must match the checkpoint being resumed.
# ``init`` only matters at the start: a resumed run keeps the value its first command had.
_RESUME_FREE = ("out", "resume", "overwrite", "quiet", "log", "device", "data_dir", "command", "amp",
                "init", "workers")


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
    torch.manual_seed(config.seed)
    means, sds = normalization
    return [models.with_normalization(models.create(config.arch, num_classes), means, sds)
            for _ in range(config.members)]


def load_init(config: TrainConfig, members: list[nn.Module], num_classes: int,
               normalization) -> None:
    """Copy the weights of the ``--init`` checkpoint(s) into ``members``: one drt-fast
    ensemble, or one file per member (Cohen/DRT base models, or drt-fast files), of the run's
    arch, dataset (where the file names one), classes, input normalization and member count."""
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


def check_outputs(config: TrainConfig) -> None:
    """Refuse, before anything is trained, outputs that exist (without --resume or
    --overwrite), that cannot be written, or that collide."""
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


def new_record(config: TrainConfig, group: ProcessGroup, augment: str) -> dict:
    """The configuration as the checkpoint and the training state record it: plain values
    (a Path as init: the state must load weights-only), paths relative to the folder of
    ``out``, plus the process count and the augmentation "auto" meant."""
    record = plain_config(dataclasses.asdict(config))
    for key in ("out", "log", "data_dir"):
        if record.get(key):
            record[key] = path_for_record(record[key], config.out)
    if record.get("init"):
        record["init"] = ([path_for_record(p, config.out) for p in record["init"]]
                          if isinstance(record["init"], (list, tuple)) else path_for_record(record["init"], config.out))
    record["world_size"] = group.world_size     # the batch split, hence the weights, depend on it
    record["augment"] = augment                 # what "auto" meant
    return record


def resume(config: TrainConfig, record: dict, members: list[nn.Module],
           optimizer: torch.optim.Optimizer, group: ProcessGroup) -> int:
    """Load the training state of ``config.out`` into ``members`` and ``optimizer``, after
    checking that ``record`` (whose ``init`` it sets to the first command's) describes the
    same run; returns the number of epochs it holds."""
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
    return state["epoch"]


def save(run: Run, epoch: int) -> None:
    """Write the training state, then the ensemble checkpoint, of ``run`` after ``epoch``
    epochs (each file atomically)."""
    config, train_set = run.config, run.train_set
    cpu_members = [{k: v.detach().cpu() for k, v in f.state_dict().items()} for f in run.members]
    atomic_torch_save({"config": run.record, "epoch": epoch, "members": cpu_members,
                        "optimizer": run.optimizer.state_dict()}, state_path(config.out))
    ensemble = Ensemble([copy.deepcopy(f).cpu().eval() for f in run.members])
    save_ensemble(config.out, ensemble, arch=config.arch, dataset=config.dataset,
                  num_classes=train_set.num_classes, input_shape=list(models.input_shape(config.arch)),
                  normalization=train_set.normalization, sigma=config.sigma,
                  train_config={**run.record, "epochs_done": epoch})
