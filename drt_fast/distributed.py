"""Multi-process certification under ``torchrun``: process group, sharding, gathering.

``torchrun --nproc_per_node P -m drt_fast -- certify ...`` starts P copies of the CLI with
RANK / WORLD_SIZE / LOCAL_RANK set (the ``--`` stops torchrun's own option parser from
reading ``--n`` and ``--max`` as abbreviations of its ``--nnodes`` and ``--max-restarts``).
Every rank loads the model and data and certifies a round-robin share of the inputs; each
round, rank 0 gathers the rows of all ranks and writes them in idx order, so the merged
file has the rows of a single-process run (noise depends only on seed, input key and draw
index, never on which rank draws it).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DrtFastError

if TYPE_CHECKING:
    import torch

# Long enough for a slow rank to finish one round of inputs at n = 100,000 on a big model.
_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class ProcessGroup:
    """This process's place among the ranks (``world_size == 1``: a plain single run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, length: int) -> slice:
        """This rank's contiguous share of ``length`` items (shares differ by at most one)."""
        return slice(self.rank * length // self.world_size, (self.rank + 1) * length // self.world_size)


def from_env() -> ProcessGroup:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when unset)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DrtFastError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them), "
                           f"got RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DrtFastError(f"expected 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world_size}")
    return ProcessGroup(rank, world_size, local_rank)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:i``.

    A device torch cannot use is a DrtFastError (one line), never a traceback later on.
    ``cuda:i`` becomes the current CUDA device.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DrtFastError(f"--device must be auto, cpu, cuda or cuda:i, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise DrtFastError(f"--device must be auto, cpu, cuda or cuda:i, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DrtFastError(f"--device {name} was asked for, but no CUDA device is available "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DrtFastError(f"--device {name} was asked for, but torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s)")
        if device.index is not None:
            # made current, so that what follows the current device (pinned-memory copies,
            # CUDA graphs, streams) creates nothing on GPU 0
            torch.cuda.set_device(device)
    return device


def init(group: ProcessGroup, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU); return this rank's device."""
    if not group.active:
        return device
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    return device


def barrier(group: ProcessGroup) -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if group.active:
        import torch.distributed as dist

        dist.barrier()


# A `drt-fast` process (the CLI) that joined a process group ends with os._exit once the
# command is done (`exit_cli_process`) instead of tearing the group down: Gloo's C++
# teardown can abort a rank when its peer tears down at the same moment (docs/internals.md,
# CLI). Library callers (train() from Python) keep the orderly teardown.
_cli_process = False


@contextlib.contextmanager
def cli_process():
    """The CLI's main() runs inside: `shutdown` leaves the teardown to `exit_cli_process`."""
    global _cli_process
    saved, _cli_process = _cli_process, True
    try:
        yield
    finally:
        _cli_process = saved


def shutdown(group: ProcessGroup) -> None:
    """Leave the process group (no-op for a single process; deferred to
    `exit_cli_process` in a CLI process)."""
    if group.active and not _cli_process:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def exit_cli_process(status: int) -> None:
    """In a CLI process that joined a process group: flush stdout/stderr and end the
    process now with ``status``, skipping the group's C++ teardown. Returns otherwise."""
    import sys

    dist = sys.modules.get("torch.distributed")       # never import torch just for this
    if not (_cli_process and dist is not None and dist.is_available() and dist.is_initialized()):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def gather(group: ProcessGroup, obj) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` for a single process)."""
    if not group.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(group: ProcessGroup, fn):
    """Run ``fn()`` on rank 0 only and give its result to every rank.

    A ``DrtFastError`` raised by ``fn`` on rank 0 is raised on every rank, so that all
    ranks stop together instead of the others waiting forever at the next collective.
    """
    result, error = None, None
    if group.is_main:
        try:
            result = fn()
        except DrtFastError as e:
            error = str(e)
    if group.active:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise DrtFastError(error)
    return result
