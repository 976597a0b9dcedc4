"""The ``drt-fast`` command: certify, predict, analyze, info (and train, diagnose).

The CLI only parses, checks, calls the API and prints: the statistics live in
``smoothing.py`` / ``stats.py``, the file formats in ``io.py``, the tables in
``analyze.py``, multi-process plumbing in ``distributed.py``. Every problem a user can
cause ends as one line ``drt-fast: error: <message>`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import DrtFastError, first_line

DATASETS = ("digits", "mnist", "cifar10", "imagenet", "npz")
MODES = ("we", "logit", "mme", "mv")
ASSETS = Path(__file__).resolve().parent / "assets"

# Certify packs the draws of several inputs into one batch (certify_many) when n is small;
# this caps a group so that rows (and the progress bar) still advance often.
_MAX_GROUP = 32


# ----------------------------------------------------------------------------- parser

def _smoothing_epilog(task: str) -> str:
    columns = "idx label predict radius correct time" if task == "certify" else "idx label predict correct time"
    return (f"Without --out nothing is written and only the summary is printed. Rows go to the "
            f"--out TSV in Cohen's format ({columns}"
            f"{', then extra columns' if task == 'certify' else ''}), the configuration to "
            f"<out>.json; --resume continues a stopped run. Several processes (GPUs): torchrun "
            f"--nproc_per_node P -m drt_fast -- {task} ... (the -- keeps torchrun from reading "
            f"--n as its own option) writes one merged file.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, worded as every other error: ``drt-fast: error:
    ... (see drt-fast certify --help)`` instead of the usage block and the message."""

    def error(self, message):
        self.exit(2, f"drt-fast: error: {message} (see {self.prog} --help)\n")


def build_report() -> str:
    """What ``drt-fast --version`` prints: the version, torch, and which kernels this install
    runs (the CPU build picked at run time; whether the CUDA kernels were built and a device
    answers) -- the first things to look at when drt-fast is slower than it should be."""
    import torch

    from . import ops

    lines = [f"drt-fast {__version__}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    lines.append(f"CPU kernels: {ops._C.cpu_isa()}" if ops._C is not None
                 else "CPU kernels: not built (pip install . builds them)")
    if ops._C_CUDA_IMPORT_ERROR is not None:
        lines.append(f"CUDA kernels: built, but they fail to load: {ops._C_CUDA_IMPORT_ERROR}")
    elif ops._C_cuda is None:
        lines.append("CUDA kernels: not built (nvcc was not found, or DRT_FAST_CUDA=0, at install)")
    elif not ops.cuda_available():
        lines.append("CUDA kernels: built; no CUDA device answers")
    else:
        archs = getattr(ops._C_cuda, "architectures", lambda: "")()
        devices = []
        for i in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(i)
            covered = "" if ops.arch_covers(archs, capability) else ": not built for it (torch fallback)"
            devices.append(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, capability))}{covered})")
        lines.append(f"CUDA kernels: built for {archs or 'unknown architectures'}; {', '.join(devices)}")
    return "\n".join(lines)


class _Report(argparse.Action):
    """``--version``: the report, built only when asked for (it may initialise CUDA)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(build_report())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="drt-fast",
        description="Certify and train robust ensembles with randomized smoothing (DRT, ICLR 2022).")
    parser.add_argument("--version", action=_Report,
                        help="the version, torch, and which CPU and CUDA kernels this install runs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    try:                         # the embedded default's own skip/max, for the help text
        embedded = _embedded_default()
    except (DrtFastError, OSError, ValueError, KeyError):     # help must not fail over it
        embedded = {}
    for task, doc in (("certify", "Cohen's CERTIFY: certified radius of the smoothed ensemble per input"),
                      ("predict", "Cohen's PREDICT: prediction of the smoothed ensemble per input")):
        p = sub.add_parser(task, help=doc, description=doc, epilog=_smoothing_epilog(task))
        _add_smoothing_options(p, task, embedded)
        p.set_defaults(func=lambda args, task=task: run_smoothing(args, task))

    p = sub.add_parser("analyze", help="certified-accuracy table (and plot) of results files",
                       description="Certified accuracy at chosen radii and ACR, one column per results file.")
    p.add_argument("files", nargs="+", metavar="results.tsv", help="certify results (drt-fast or Cohen format)")
    p.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="radii of the table rows (default 0, 0.25, ... up to the largest radius)")
    p.add_argument("--plot", metavar="out.png", help="also write a PNG of certified accuracy vs radius")
    p.set_defaults(func=run_analyze)

    p = sub.add_parser("info", help="what a checkpoint holds", description="Describe a checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", nargs="*",
                   help="a checkpoint, or several member files that form one ensemble "
                        "(default: the embedded digits ensemble)")
    p.set_defaults(func=run_info)

    # train and diagnose live with the training code; the CLI works without it.
    if importlib.util.find_spec("drt_fast.train.cli") is not None:
        from .train import cli as train_cli

        train_cli.register(sub)
    for command in sub.choices.values():     # usage errors point at the command's own help
        command.set_defaults(parser=command)
    return parser


def _add_smoothing_options(p: argparse.ArgumentParser, task: str, embedded: dict) -> None:
    p.add_argument("--model", metavar="CKPT", nargs="+",
                   help="drt-fast ensemble or Cohen/DRT checkpoint, or several member files that form "
                        "one ensemble, as the DRT code saves them (default: the embedded digits ensemble)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", metavar="D", help="dataset folder (for npz: the .npz file)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--sigma", type=float, help="noise level (default: the checkpoint's training sigma)")
    p.add_argument("--noise", choices=("gaussian", "discrete"), default="gaussian",
                   help="gaussian: N(0, sigma^2) added in floating point; discrete: that Gaussian rounded "
                        "to the pixels' grid and drawn exactly, so that certificates also hold for the "
                        "floating-point computation (inputs must lie on the grid; docs/certificates.md) "
                        "(default: gaussian)")
    p.add_argument("--grid", type=int, metavar="Q",
                   help="--noise discrete: the pixels are k/Q (default: the data's own grid: 16 for "
                        "digits, 255 for MNIST, CIFAR-10, ImageNet and uint8 .npz files)")
    if task == "certify":
        # (--N0 / --N: the spelling of Cohen et al.'s certify.py and predict.py)
        p.add_argument("--n0", "--N0", type=int, default=100, help="selection draws (default: 100)")
    p.add_argument("--n", "--N", type=int, default=100_000, help="estimation draws (default: 100000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default: 0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noisy draws per forward pass (default: 1000)")
    p.add_argument("--skip", type=int, help=f"{task} every skip-th input (default: 1; "
                                             f"{embedded.get('skip', 1)} on the embedded default's test inputs)")
    # A count of inputs: Cohen's certify.py stops at *index* max, which with --skip is
    # easy to get wrong (and never triggers unless max is a multiple of skip).
    p.add_argument("--max", type=int, help=f"at most this many of the selected inputs (default: all; "
                                            f"{embedded.get('max') or 'all'} on the embedded default's test inputs)")
    p.add_argument("--mode", choices=MODES, help="ensemble aggregation (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:i}",
                   help="auto: cuda when available (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="precision of the noisy draws and the forward pass (default: fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="write 4-D noisy draws and run the members channels-last (default: on "
                        "for CUDA, and on the CPU for inputs of 3 or more channels)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="run rewritten copies of the members: BatchNorms folded and "
                        "conv(+add)+ReLU chains as fused cuDNN (CUDA) or oneDNN (CPU) calls; on "
                        "the CPU, chains of affine layers on small inputs as dense matrices "
                        "(default: on where it applies; --no-fuse runs the members as they are)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each full batch's step (noise, members, vote) as a CUDA graph "
                        "(default: on for CUDA where a batch of draws holds at most 2^22 input "
                        "elements: small models, which are otherwise bound by launches)")
    p.add_argument("--out", metavar="results.tsv", help="write rows here (and the configuration to <out>.json)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``drt-fast`` and ``python -m drt_fast``; returns the exit status.

    Under torchrun, a process that joined the process group ends here with os._exit
    (see `drt_fast.distributed.exit_cli_process`)."""
    from . import distributed

    with distributed.cli_process():
        status = _main(argv)
        distributed.exit_cli_process(status)
    return status


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:
        # `torchrun ... -m drt_fast -- certify --n ...`: the `--` shields our options from
        # torchrun's parser (it would take --n for its --nnodes); some Pythons pass it on.
        argv = argv[1:]
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:     # --help, --version, or a usage error (already said, one line)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, like errors (not Python's two, with a source line)."""
    lines = str(message).strip().splitlines()
    print(f"drt-fast: warning: {lines[0] if lines else category.__name__}", file=sys.stderr)


def _dispatch(args) -> int:
    try:
        return args.func(args) or 0
    except DrtFastError as e:
        # the engine's API names its options; the command line has flags for them
        message = str(e).replace("fuse=True:", "--fuse:", 1).replace("cuda_graphs=True:", "--cuda-graphs:", 1)
        print(f"drt-fast: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        from .errors import is_out_of_memory

        if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
            raise
        print(f"drt-fast: error: out of memory ({first_line(e)[:200]}); try a smaller --batch",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("drt-fast: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read stdout has gone (`drt-fast ... | head`): stop quietly. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ImportError as e:  # e.g. the compiled kernels were never built: an install problem
        print(f"drt-fast: error: {first_line(e)}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- info, analyze

def run_info(args) -> int:
    from . import checkpoint

    paths = args.checkpoint or [_embedded_default()["model"]]
    for path in paths:
        _require_file(path, "checkpoint")
    print(checkpoint.describe(_one_or_many(paths)))
    return 0


def run_analyze(args) -> int:
    from .analyze import analyze

    print(analyze(args.files, args.radii, args.plot))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


# ----------------------------------------------------------------------------- certify, predict

@dataclass
class Job:
    """Everything a certify/predict run needs, resolved from the arguments and the checkpoint."""

    task: str
    smoothed: object  # SmoothedClassifier
    x: object  # [N, C, H, W] float32 in [0, 1] (a tensor, or data.LazyImages for image folders)
    y: list  # [N] labels
    keys: list  # [N] dataset index of each input: the TSV idx and the noise key
    positions: list  # selected positions in x, in order
    config: dict  # the sidecar
    draws_per_input: int


def run_smoothing(args, task: str) -> int:
    """``drt-fast certify`` / ``drt-fast predict``."""
    _check_numbers(args, task)  # before importing torch: bad numbers fail at once
    from . import distributed

    group = distributed.from_env()
    device = distributed.resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise DrtFastError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    device = distributed.init(group, device)
    args.thread_note = fit_threads_to_load() if device.type == "cpu" else ""
    try:
        job = _prepare(args, task, device)
        _run(args, job, group)
        # Leave together: a rank that tears its gloo connections down while rank 0 is still
        # writing can abort ("terminate called without an active exception").
        distributed.barrier(group)
    finally:
        distributed.shutdown(group)
    return 0


def fit_threads_to_load() -> str:
    """Use fewer CPU threads when other processes keep cores busy (OMP_NUM_THREADS unset).

    torch takes a thread per core; when another job holds a core, its OpenMP threads wait
    for one another at every barrier and a small model runs several times slower (measured:
    the README's certify of 20 digits inputs, 2 cores, one kept busy: 3.3-10x slower on 2
    threads than on 1; idle, 2 threads are 1.3-1.5x faster). The cores busy now (`_busy_cores`, not the load average, which
    still counts a build that just ended) are left alone; at least one thread, never more
    than torch's. Returns what was done, for the summary ('' if nothing)."""
    import torch

    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or threads <= 1:
        return ""
    busy = _busy_cores()
    if busy is None:
        return ""
    free = max(1, min(threads, len(os.sched_getaffinity(0))) - int(busy + 0.5))
    if free >= threads:
        return ""
    torch.set_num_threads(free)
    return (f"{free} CPU thread{'s' if free != 1 else ''} of {threads}: other processes keep "
            f"{busy:.1f} cores busy; OMP_NUM_THREADS=N chooses")


def _busy_cores(window: float = 0.1):
    """How many of the cores this process may run on other processes keep busy now: the
    non-idle share of those CPUs' time over ``window`` seconds (Linux /proc/stat; this process
    sleeps meanwhile), times their count. None where /proc/stat cannot be read."""
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None

    def ticks():
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or (mine is not None and name not in mine):
                    continue
                values = [int(v) for v in fields[:8]]
                total, idle = total + sum(values), idle + values[3] + values[4]   # idle + iowait
        return total, idle

    try:
        total0, idle0 = ticks()
        time.sleep(window)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cpus = len(mine) if mine else (os.cpu_count() or 1)
    return cpus * (1 - (idle1 - idle0) / (total1 - total0))


def _check_numbers(args, task: str) -> None:
    """Refuse bad numbers before loading anything."""
    if task == "certify" and args.n0 < 1:
        raise DrtFastError(f"--n0 must be >= 1, got {args.n0}")
    if args.n < 1:
        raise DrtFastError(f"--n must be >= 1, got {args.n}")
    if not 0.0 < args.alpha < 1.0:
        raise DrtFastError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.sigma is not None and not (0.0 < args.sigma < math.inf):
        raise DrtFastError(f"--sigma must be > 0 and finite, got {args.sigma}")
    if args.batch < 1:
        raise DrtFastError(f"--batch must be >= 1, got {args.batch}")
    if args.grid is not None:
        if args.noise != "discrete":
            raise DrtFastError("--grid is the pixel grid of --noise discrete; it has no use with --noise gaussian")
        if not 1 <= args.grid <= 2 ** 20:
            raise DrtFastError(f"--grid must lie in [1, 2^20] (the pixels are k/Q), got {args.grid}")
    if args.skip is not None and args.skip < 1:
        raise DrtFastError(f"--skip must be >= 1, got {args.skip}")
    if args.max is not None and args.max < 1:
        raise DrtFastError(f"--max must be >= 1, got {args.max}")
    if not 0 <= args.seed < 2 ** 63:
        raise DrtFastError(f"--seed must lie in [0, 2^63), got {args.seed}")
    draws = args.n + (args.n0 if task == "certify" else 0)
    if draws > 2 ** 32:
        raise DrtFastError(f"{'--n0 + --n' if task == 'certify' else '--n'} must be at most 2^32 "
                           f"(an input's draws are numbered with 32 bits), got {draws}")
    if args.resume and not args.out:
        raise DrtFastError("--resume needs --out (the results file to continue)")
    if args.out:
        from .io import check_writable

        check_writable(args.out, args.resume)


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise DrtFastError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise DrtFastError(f"{what} {path!r} is a directory, expected a file")


def _embedded_default() -> dict:
    """The embedded default's description (assets/default.json), paths made absolute."""
    path = ASSETS / "default.json"
    if not path.exists():
        raise DrtFastError(f"no checkpoint given and the embedded default model is not installed "
                           f"({path} is missing); pass --model CKPT")
    with open(path) as f:
        spec = json.load(f)
    spec["model"] = str(ASSETS / spec["model"])
    spec["data"] = str(ASSETS / spec["data"])
    return spec


def _prepare(args, task: str, device) -> Job:
    """Load model and data, check they fit together, choose the inputs, build the sidecar."""
    import torch

    from . import checkpoint, data
    from .smoothing import SmoothedClassifier

    default = _embedded_default() if args.model is None else None
    model_paths = [default["model"]] if default else args.model
    for path in model_paths:
        _require_file(path, "checkpoint")
    model_path = _one_or_many(model_paths)  # what load_checkpoint takes, and error messages show
    try:
        # A Cohen/DRT file's normalization follows the dataset (its arch's by default).
        cohen_dataset = args.dataset if args.dataset not in (None, "npz") else None
        ensemble, meta = checkpoint.load_checkpoint(model_path, mode=args.mode, dataset=cohen_dataset)
    except DrtFastError:
        raise
    except Exception as e:  # a format the loader did not anticipate is still the user's file
        raise DrtFastError(f"cannot load checkpoint {model_path!r}: {first_line(e)}") from None
    meta = meta or {}

    # The data: explicit --dataset, else the embedded default's test file, else the checkpoint's.
    if args.dataset is not None:
        dataset_name, data_dir = args.dataset, args.data_dir
    elif default is not None:
        dataset_name, data_dir = "npz", args.data_dir or default["data"]
    elif meta.get("dataset"):
        dataset_name, data_dir = meta["dataset"], args.data_dir
    else:
        raise DrtFastError(f"checkpoint {model_path!r} does not say which dataset it was trained on; "
                           f"pass --dataset ({'|'.join(DATASETS)})")
    if dataset_name not in DATASETS:
        raise DrtFastError(f"unknown dataset {dataset_name!r} (from the checkpoint); "
                           f"expected one of {', '.join(DATASETS)}: pass --dataset")
    if dataset_name == "npz" and data_dir is None:
        raise DrtFastError("--dataset npz needs --data-dir FILE.npz")
    if dataset_name == "npz" and args.split != "test":
        embedded = args.dataset is None and default is not None and args.data_dir is None
        raise DrtFastError(f"--split {args.split}: an .npz file ({'the embedded default' if embedded else data_dir}) "
                           f"is one set of inputs, with no splits"
                           + ("; for the digits training split pass --dataset digits --split train"
                              if embedded else ""))
    try:
        ds = data.load(dataset_name, split=args.split, data_dir=data_dir)
    except DrtFastError:
        raise
    except Exception as e:
        raise DrtFastError(f"cannot read the {dataset_name} data at {data_dir!r}: {first_line(e)}") from None
    # The dataset index of each row (an npz may hold a subset): TSV idx and noise key.
    keys = [int(k) for k in ds.idx.tolist()]

    sigma = args.sigma
    if sigma is None:
        sigma = default["sigma"] if default else meta.get("sigma")
    if sigma is None:
        raise DrtFastError(f"checkpoint {model_path!r} has no training sigma; pass --sigma")
    sigma = float(sigma)
    # The default subset is that of the embedded test inputs, not of data the user names.
    subset = default if default is not None and args.dataset is None and args.data_dir is None else {}
    skip = args.skip if args.skip is not None else subset.get("skip", 1)
    max_inputs = args.max if args.max is not None else subset.get("max")

    ensemble = ensemble.to(device).eval()
    num_classes = checkpoint.check_fits(ensemble, meta, ds, model_path, dataset_name, device)

    positions = list(range(0, len(keys), skip))
    if max_inputs is not None:
        positions = positions[:max_inputs]
    grid = _noise_grid(args, ds, subset, positions, keys) if args.noise == "discrete" else None
    mode = args.mode or getattr(ensemble, "mode", None) or meta.get("mode")
    config = {
        "task": task,
        "command": "drt-fast " + shlex.join(args.argv),
        "model": _one_or_many([os.path.abspath(p) for p in model_paths]),
        "model_sha256": meta["sha256"],
        "dataset": dataset_name,
        "data": os.path.abspath(data_dir) if data_dir else None,
        "data_sha256": data.fingerprint(ds),
        "split": args.split,
        "sigma": sigma,
        "noise": args.noise,
        "grid": grid,
        "n0": args.n0 if task == "certify" else None,
        "n": args.n,
        "alpha": args.alpha,
        "seed": args.seed,
        "mode": mode,
        "precision": args.precision,
        "fuse": {None: "auto", True: "on", False: "off"}[args.fuse],
        "cuda_graphs": {None: "auto", True: "on", False: "off"}[args.cuda_graphs],
        "batch": args.batch,
        "skip": skip,
        "max": max_inputs,
        "drt_fast_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
    }
    if device.type == "cuda":
        # Fixed input shapes batch after batch: let cuDNN pick its fastest convolutions once.
        torch.backends.cudnn.benchmark = True
    smoothed = SmoothedClassifier(ensemble, num_classes=num_classes, sigma=sigma, seed=args.seed,
                                  precision=args.precision, channels_last=args.channels_last,
                                  fuse=args.fuse, cuda_graphs=args.cuda_graphs, noise=args.noise,
                                  grid=grid or 255)
    # Build the members' rewrites now: a --fuse that cannot be honored fails before any
    # output, and the first row's time is not charged with the rewrite.
    smoothed.prepare(ds.x[:1])
    y = [int(v) for v in torch.as_tensor(ds.y).tolist()]
    draws = args.n0 + args.n if task == "certify" else args.n
    return Job(task, smoothed, ds.x, y, keys, positions, config, draws)


def _noise_grid(args, ds, subset: dict, positions: list, keys: list) -> int:
    """--noise discrete: the pixels' grid (--grid, else the data's, else the embedded
    default's), with the selected inputs checked to lie on it."""
    from .data import LazyImages
    from .ops import first_off_grid

    grid = args.grid or ds.grid or subset.get("grid")
    if grid is None:
        raise DrtFastError("--noise discrete needs the pixels' grid, which this data does not say: "
                           "pass --grid Q (the pixels are k/Q; 255 for 8-bit images)")
    if not isinstance(ds.x, LazyImages):  # image folders decode 8-bit pixels: always on 1/255
        selected = ds.x[positions]
        flat = first_off_grid(selected, grid)
        if flat is not None:
            per_input = selected[0].numel()
            value = float(selected.reshape(-1)[flat])
            raise DrtFastError(f"--noise discrete: input idx {keys[positions[flat // per_input]]} is not on "
                               f"the grid of step 1/{grid} (its pixel {flat % per_input} is {value!r}, "
                               f"{value * grid:.6g} steps); pass --grid with the data's own grid or use "
                               f"--noise gaussian")
    return grid


def _one_or_many(paths: list):
    """A single path as itself, several as the list (checkpoint.load_checkpoint takes both)."""
    return paths[0] if len(paths) == 1 else list(paths)


def _run(args, job: Job, group) -> None:
    """Certify/predict the selected inputs not yet in the results file; write rows, print summary.

    Under torchrun, each round every rank handles a round-robin share of the next inputs and
    rank 0 writes all rows of the round in idx order.
    """
    from . import distributed
    from . import io

    results = None  # the open results file (rank 0 with --out only)

    def open_output():
        nonlocal results
        if not args.out:
            return set()
        if args.resume and os.path.exists(args.out):
            old = io.read_sidecar(args.out)
            if old is None:
                raise DrtFastError(f"cannot resume {args.out!r}: its metadata file "
                                   f"{io.sidecar_path(args.out)!r} is missing, so its configuration is unknown")
            io.check_resume_compatible(old, job.config, args.out)
        try:
            # Sidecar first: a run killed in between leaves no rows without their configuration.
            io.write_json_atomic(io.sidecar_path(args.out), job.config)
            results = io.open_results(args.out, job.task, args.resume)
        except OSError as e:
            raise DrtFastError(f"cannot write results to {args.out!r}: {e.strerror or e}") from None
        selectable = set(job.keys[::job.config["skip"]])      # --max may grow on a resume
        foreign = sorted(results.done - selectable)
        if foreign:
            results.close()
            raise DrtFastError(f"cannot resume {args.out!r}: it has rows for inputs this "
                               f"configuration does not select (idx {foreign[0]}"
                               f"{' and %d more' % (len(foreign) - 1) if len(foreign) > 1 else ''})")
        return results.done

    done = distributed.run_on_main(group, open_output)
    todo = [p for p in job.positions if job.keys[p] not in done]
    per_rank = _group_size(args, job)
    round_size = per_rank * group.world_size
    records = []  # (idx, label, predict, radius, correct) of this run, for the summary

    progress = _progress_bar(len(todo), args.quiet or not group.is_main)
    start = time.perf_counter()
    try:
        for first in range(0, len(todo), round_size):
            chunk = todo[first:first + round_size]
            mine = chunk[group.rank::group.world_size]
            try:
                payload = ("ok", _work(job, mine))
            except DrtFastError as e:
                payload = ("error", str(e), mine[0] if mine else None)
            gathered = distributed.gather(group, payload)
            rows = sorted((r for p in gathered if p[0] == "ok" for r in p[1]), key=lambda r: r[0])
            errors = [p for p in gathered if p[0] == "error"]
            if errors:
                # Keep only rows before the first failed input: the file stays a prefix of a full run.
                first_bad = min(p[2] for p in errors)
                rows = [r for r in rows if r[0] < first_bad]
            for _, line, record in rows:
                if results is not None:
                    results.append(line)
                records.append(record)
            if results is not None and rows:
                results.sync()
            progress.update(len(rows))
            if errors:
                raise DrtFastError(errors[0][1])
    except BaseException as exc:
        nothing = results is not None and not results.done and not records
        if nothing:
            # Nothing was certified: no header-only file (and sidecar) is left to block a
            # rerun of the same command.
            results.close()
            for path in (args.out, io.sidecar_path(args.out)):
                with contextlib.suppress(OSError):
                    os.remove(path)
        elif isinstance(exc, KeyboardInterrupt) and results is not None:
            # said on the one "interrupted" line that _main prints
            raise KeyboardInterrupt(f"{len(records)} new rows kept in {args.out}; "
                                    f"continue with --resume") from None
        raise
    finally:
        progress.close()
        if results is not None:
            results.close()
    elapsed = time.perf_counter() - start
    if group.is_main:
        print(_summary(args, job, records, len(done), elapsed))


def _group_size(args, job: Job) -> int:
    """Inputs per engine call: with small n, the draws of several inputs share one batch of
    about --batch draws (the engine packs them); with large n, one input at a time."""
    return max(1, min(_MAX_GROUP, args.batch // job.draws_per_input))


def _work(job: Job, positions: list) -> list:
    """Certify or predict the inputs at ``positions``; returns (position, TSV line, record) each."""
    from . import io

    if not positions:
        return []
    cfg = job.config
    out = []
    if job.task == "certify":
        t0 = time.perf_counter()
        certs = job.smoothed.certify_many(job.x[positions], [job.keys[p] for p in positions],
                                          n0=cfg["n0"], n=cfg["n"], alpha=cfg["alpha"], batch_size=cfg["batch"])
        # Inputs certified together share the time: each row gets its share.
        seconds = (time.perf_counter() - t0) / len(positions)
        for p, cert in zip(positions, certs):
            idx, label = job.keys[p], job.y[p]
            line = io.certify_row(idx, label, cert, seconds)
            # The summary uses the radius as the file stores it (3 significant digits).
            out.append((p, line, (idx, label, cert.label, float(f"{cert.radius:.3}"), int(cert.label == label))))
    else:
        t0 = time.perf_counter()
        predictions = job.smoothed.predict_many(job.x[positions], [job.keys[p] for p in positions],
                                                n=cfg["n"], alpha=cfg["alpha"], batch_size=cfg["batch"])
        seconds = (time.perf_counter() - t0) / len(positions)
        for p, prediction in zip(positions, predictions):
            idx, label = job.keys[p], job.y[p]
            line = io.predict_row(idx, label, prediction, seconds)
            out.append((p, line, (idx, label, prediction, 0.0, int(prediction == label))))
    return out


class _NoBar:
    def update(self, n): pass
    def close(self): pass


def _progress_bar(total: int, quiet: bool):
    """tqdm on stderr, only when stderr is a terminal and not --quiet."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="input", file=sys.stderr, dynamic_ncols=True)


def _summary(args, job: Job, records: list, resumed: int, elapsed: float) -> str:
    """The final report on stdout: accuracy (certified at several radii), abstains, ACR, speed."""
    from . import io, stats
    from .analyze import abstain_rate, acr, certified_accuracy, default_radii

    cfg = job.config
    if args.out:
        results = io.read_results(args.out, job.task)  # all rows, resumed ones included
    else:
        columns = [list(c) for c in zip(*records)] if records else [[] for _ in range(5)]
        results = io.Results("this run", *columns)  # idx, label, predict, radius, correct
    count = len(results)
    source = os.path.basename(cfg["data"]) if cfg["dataset"] == "npz" else f"{cfg['dataset']} ({cfg['split']})"
    sigma = f"{cfg['sigma']:g}" + (f" (discrete, grid 1/{cfg['grid']})" if cfg.get("noise") == "discrete" else "")
    lines = [f"drt-fast {job.task}: {count} input{'s' if count != 1 else ''} of {source}, sigma={sigma}, "
             f"{'n0=%d, ' % cfg['n0'] if job.task == 'certify' else ''}n={cfg['n']}, alpha={cfg['alpha']:g}, "
             f"mode={cfg['mode']}, precision={cfg['precision']}, on {cfg['device']}"]
    if cfg["device"].startswith("cuda"):
        lines.append(f"fused members: {job.smoothed.fuse_status}; "
                     f"CUDA graphs: {job.smoothed.graph_status}")
    else:
        lines.append(f"fused members: {job.smoothed.fuse_status}")
    if getattr(args, "thread_note", ""):
        lines.append(args.thread_note)
    if job.task == "certify":
        radii = default_radii(stats.max_radius(cfg["sigma"], cfg["n"], cfg["alpha"]))
        acc = certified_accuracy(results, radii)
        header = "radius               " + "".join(f"{r:>7.2f}" for r in radii)
        values = "certified accuracy % " + "".join(f"{100 * a:>7.1f}" for a in acc)
        lines += [header, values,
                  f"abstain rate {100 * abstain_rate(results):.1f} %, "
                  f"ACR {acr(results):.3f}"]
    else:
        accuracy = sum(results.correct) / count if count else 0.0
        lines.append(f"accuracy {100 * accuracy:.1f} %, abstain rate {100 * abstain_rate(results):.1f} %")
    new = len(records)
    if new and elapsed > 0:
        speed = f"{new / elapsed:.2f} inputs/s, {new * job.draws_per_input / elapsed:,.0f} draws/s"
    else:
        speed = "nothing left to do"
    lines.append(f"this run: {new} input{'s' if new != 1 else ''} in {elapsed:.2f} s ({speed})"
                 + (f"; {resumed} rows were already in the file" if resumed else ""))
    if args.out:
        lines.append(f"rows written to {args.out} (configuration in {io.sidecar_path(args.out)})")
    else:
        lines.append("rows not saved: pass --out results.tsv to keep them")
    return "\n".join(lines)
