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

The loop is `train`; a step's loss per trainer kind is `steps.Step`; the configuration and
its schedules are in `config`; the run's state, checkpoint, resume and ``--init`` in
`state`; the log and progress bar in `log`.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Sequence

import torch
from torch import nn

from .. import data, distributed, models
from ..errors import DrtFastError
from .config import LR_SCHEDULES, TRAINERS, TrainConfig, epoch_seed, eps_at, lr_at
from .inputs import TrainInputs, eval_batches, resolve_augment
from .log import EpochStats, progress, report
from .losses import eval_mode
from .state import (Run, build_members, check_outputs, init_paths, load_init, new_record,
                    path_for_record, resume, save, state_path)
from .steps import Step

_Step = Step         # its former name, kept importable for scripts written against it

__all__ = ["train", "clean_accuracy", "TrainConfig", "TRAINERS", "LR_SCHEDULES", "lr_at", "eps_at",
           "epoch_seed", "state_path", "path_for_record", "init_paths", "build_members", "Step"]


def train(config: TrainConfig, on_epoch: Callable[[dict], None] | None = None) -> str:
    """Train (or resume) the ensemble ``config`` describes; return the checkpoint path.

    Everything a user can get wrong is checked before the first file is written.
    ``on_epoch(entry)``: called in the main process after each epoch's checkpoint and log
    line, with the log entry (epoch, ce, gd, cm, train_acc, test_acc, lr, time).
    """
    config.validate()
    models.input_shape(config.arch)                       # unknown arch -> DrtFastError
    group = distributed.from_env()
    device = distributed.init(group, distributed.resolve_device(config.device))
    check_outputs(config)
    run = _start(config, group, device)
    for epoch in range(run.start_epoch, config.epochs):
        entry = _train_epoch(run, epoch)
        if group.is_main:
            # a new run (--overwrite included) starts its log with its first epoch
            report(config, entry, new=epoch == run.start_epoch and not config.resume)
            if on_epoch is not None:
                on_epoch(entry)
    if run.start_epoch >= config.epochs and group.is_main and not os.path.exists(config.out):
        save(run, config.epochs)
    # Leave together (rank 0 may still be writing the last checkpoint), then tear down.
    distributed.barrier(group)
    distributed.shutdown(group)
    return config.out


def _start(config: TrainConfig, group, device: torch.device) -> Run:
    """The run's data, members and optimizer, fresh, resumed or from ``--init``."""
    train_set = data.load(config.dataset, "train", config.data_dir)
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
    record = new_record(config, group, augment)
    start_epoch = 0
    if config.resume:
        start_epoch = resume(config, record, members, optimizer, group)
    elif config.init:
        load_init(config, members, train_set.num_classes, train_set.normalization)
    if no_test_split and group.is_main:    # said once, after every check that could refuse the run
        import warnings

        warnings.warn(f"training without a test split ({no_test_split}): the log has no test accuracy")
    for f in members:
        f.to(device).train()
    workers = config.workers if config.workers is not None else _default_workers(group)
    inputs = TrainInputs(train_set.x, train_set.y, augment, config.seed, device, workers)
    return Run(config, group, device, members, params, optimizer, record, train_set, test_set,
               inputs, Step(config, members), _autocast_factory(config, device), workers,
               start_epoch)


def _train_epoch(run: Run, epoch: int) -> dict:
    """One epoch: its steps, the checks of its weights, its checkpoint (main process), its
    test accuracy; returns its log entry."""
    config = run.config
    t0 = time.time()
    lr = lr_at(config, epoch)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.step.eps = eps_at(config, epoch)
    means, last_x, n_steps = _take_steps(run, epoch)
    # the epoch's last step is checked here (a step's loss shows the weights before it):
    # finite weights and finite logits on a few training inputs (of the last batch)
    if not (all(bool(torch.isfinite(p).all()) for p in run.params)
            and _finite_outputs(run.members, last_x[:64])):
        raise _diverged(config, epoch, n_steps - 1)
    # The epoch's weights are saved before the test accuracy, which may fail (an
    # unreadable image in an ImageNet val/ folder) or be interrupted: the epoch stays.
    if run.group.is_main:
        save(run, epoch + 1)
    test_acc = None if run.test_set is None else clean_accuracy(
        run.members, run.test_set.x, run.test_set.y, workers=run.workers, group=run.group)
    entry = {"epoch": epoch + 1, "ce": means["ce"], "gd": means["gd"], "cm": means["cm"],
             "train_acc": means["acc"], "test_acc": test_acc,
             "lr": lr, "time": round(time.time() - t0, 3)}
    if "smoothadv" in config.trainer:
        entry["eps"] = run.step.eps
    return entry


def _take_steps(run: Run, epoch: int):
    """The optimizer steps of ``epoch``, over this rank's share of each batch; returns the
    means of the step statistics, the last batch's inputs and the number of steps."""
    config, group = run.config, run.group
    n_train, world = len(run.inputs), group.world_size
    torch.manual_seed(epoch_seed(config.seed, epoch, group.rank))   # anything on the global RNG
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(
        epoch_seed(config.seed, epoch)))
    gen = torch.Generator(device=run.device).manual_seed(epoch_seed(config.seed, epoch, group.rank + 1))
    stats_of_epoch = EpochStats()
    n_steps = 0
    # under torchrun a last partial batch could leave a rank without inputs: drop it
    last = n_train - config.batch + 1 if group.active else n_train
    chunks = [order[s:s + config.batch] for s in range(0, max(1, last), config.batch)]
    shares = [c[group.share(len(c))] for c in chunks]
    # the batches first: zip then runs their loader to its end, which stops its workers
    bar = progress(zip(run.inputs.epoch(epoch, shares), chunks), len(chunks), config, group, epoch)
    for (xb, yb), chunk in bar:
        loss, stats = run.step(xb, yb, gen, run.autocast)
        if world > 1 and len(chunk) % world:
            loss = loss * (len(yb) * world / len(chunk))    # shares of unequal size
        _optimize(run, loss, stats, epoch, n_steps)
        stats_of_epoch.add(stats)
        n_steps += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{stats[k]:.3f}" for k in ("ce", "gd", "cm") if stats.get(k) is not None})
    return stats_of_epoch.means(), xb, n_steps


def _optimize(run: Run, loss: torch.Tensor, stats: dict, epoch: int, n_steps: int) -> None:
    """Backpropagate ``loss`` and take the optimizer step, unless the loss is not finite."""
    # The loss's terms are on the host already (the step's statistics): a non-finite
    # one stops the run before the weights take it. Under torchrun the flag travels
    # with the gradients, so that every rank stops at the same step.
    finite = all(math.isfinite(v) for v in stats.values() if v is not None)
    if not (finite or run.group.active):
        raise _diverged(run.config, epoch, n_steps)
    run.optimizer.zero_grad(set_to_none=False)
    loss.backward()
    if run.group.active:
        bad = torch.tensor([0.0 if finite else 1.0], device=run.device)
        _all_reduce_mean([p.grad for p in run.params] + [bad])
        if float(bad) > 0:
            raise _diverged(run.config, epoch, n_steps)
    run.optimizer.step()


def _default_workers(group) -> int:
    """Image-decoding processes when ``--workers`` is not given: the cores this process may
    run on (a batch job or a container gets fewer than the machine has), shared among the
    ranks, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(1, (cores or 1) // group.world_size))


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


def _diverged(config: TrainConfig, epoch: int, steps: int) -> DrtFastError:
    kept = (f"{config.out} holds the last finished epoch ({epoch})" if epoch
            else "no epoch finished, so nothing was written")
    return DrtFastError(f"training diverged: the loss is not finite in epoch {epoch + 1}, step "
                        f"{steps + 1} (try a smaller --lr); {kept}")


def _test_split(config: TrainConfig):
    """(the held-out split each epoch's test accuracy is measured on, None) or (None, why
    there is none): an .npz is one set of inputs; an image-folder tree may have no val/."""
    missing = None
    if config.dataset == "npz":
        missing = "an .npz file is one set of inputs"
    elif config.dataset == "imagenet":
        root = config.data_dir or os.environ.get("IMAGENET_DIR")
        if root and not os.path.isdir(os.path.join(root, "val")):
            missing = f"{root} has no val/ folder"
    if missing is None:
        return data.load(config.dataset, "test", config.data_dir), None
    return None, missing


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
