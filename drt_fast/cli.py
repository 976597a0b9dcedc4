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
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

from . import __version__, embedded, options, validate
from .errors import DrtFastError, first_line, is_out_of_memory
from .threads import fit_threads_to_load

DATASETS = ("digits", "mnist", "cifar10", "imagenet", "npz")

_NO_MODEL = "no --model given: the embedded default is a digits model (8x8 inputs, 10 classes); pass --model"

# Certify packs the draws of several inputs into one batch (certify_many) when n is small;
# this caps a group so that rows (and the progress bar) still advance often.
_MAX_GROUP = 32
# Sequential certification (--radii): inputs per certify_radii call, in batch slots (and at
# most _SEQUENTIAL_MAX_GROUP unless a batch has more slots). On the embedded default, 8
# slots' worth keeps batches 75 % full, against 50 % at 32 inputs (docs/internals.md).
_SEQUENTIAL_FILL = 8
_SEQUENTIAL_MAX_GROUP = 256


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


def build_report(extensions=None) -> str:
    """What ``drt-fast --version`` prints: the version, torch, and which kernels this install
    runs (the CPU build picked at run time; whether the CUDA kernels were built and a device
    answers), the CUDA driver and the CUDA the kernels were built with, and why no device
    answers (`ops.cuda_status`) -- the first things to look at when drt-fast is slower than it
    should be. ``extensions``: an `ops.Extensions` (default: this install's)."""
    import torch

    from . import ops

    ext = ops.extensions() if extensions is None else extensions
    lines = [f"drt-fast {__version__}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    lines.append(f"CPU kernels: {ext.cpu.cpu_isa()}" if ext.cpu is not None
                 else "CPU kernels: not built (pip install . builds them)")
    if ext.cuda_error is not None:
        lines.append(f"CUDA kernels: built, but they fail to load: {ext.cuda_error}")
    elif ext.cuda is None:
        lines.append("CUDA kernels: not built (nvcc was not found, or DRT_FAST_CUDA=0, at install)")
    elif not ops.cuda_available():
        lines.append("CUDA kernels: built; no CUDA device answers")
    else:
        archs = getattr(ext.cuda, "architectures", lambda: "")()
        devices = []
        for i in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(i)
            covered = "" if ops.arch_covers(archs, capability) else ": not built for it (torch fallback)"
            devices.append(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, capability))}{covered})")
        lines.append(f"CUDA kernels: built for {archs or 'unknown architectures'}; {', '.join(devices)}")
    status = ops.cuda_status(ext)
    driver = f"CUDA driver: {ops.extension.driver_text(status.driver_version, status.driver_release)}"
    if status.runtime_version:
        driver += (f"; the kernels' CUDA runtime: {ops.extension.cuda_version_text(status.runtime_version)} "
                   f"(needs driver {ops.extension.driver_needed(status.runtime_version)})")
    lines.append(driver)
    if status.state in ("no driver", "driver too old", "no device"):   # the lines above say the rest
        lines.append(status.message)
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
        default = embedded.load()
    except (DrtFastError, OSError, ValueError, KeyError, TypeError):   # help must not fail over it
        default = None
    for task, doc in (("certify", "Cohen's CERTIFY: certified radius of the smoothed ensemble per input"),
                      ("predict", "Cohen's PREDICT: prediction of the smoothed ensemble per input")):
        p = sub.add_parser(task, help=doc, description=doc, epilog=_smoothing_epilog(task))
        _add_smoothing_options(p, task, default)
        _add_sequential_options(p, task)
        p.set_defaults(func=lambda args, task=task: run_smoothing(args, task))

    p = sub.add_parser("analyze", help="certified-accuracy table (and plot) of results files",
                       description="Certified accuracy at chosen radii and ACR, one column per results file.")
    p.add_argument("files", nargs="+", metavar="results.tsv", help="certify results (drt-fast or Cohen format)")
    p.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="radii of the table rows (default 0, 0.25, ... up to the largest radius)")
    p.add_argument("--plot", metavar="out.png", help="also write a PNG of certified accuracy vs radius")
    p.set_defaults(func=run_analyze)

    p = sub.add_parser("info", help="what a checkpoint or a results file holds",
                       description="Describe a checkpoint, or a results file (its configuration and "
                                   "the runs that wrote it).")
    p.add_argument("checkpoint", metavar="CKPT", nargs="*",
                   help="a checkpoint, or several member files that form one ensemble "
                        "(default: the embedded digits ensemble), or a results TSV")
    p.set_defaults(func=run_info)

    # train and diagnose live with the training code; the CLI works without it.
    if importlib.util.find_spec("drt_fast.train.cli") is not None:
        from .train import cli as train_cli

        train_cli.register(sub)
    for command in sub.choices.values():     # usage errors point at the command's own help
        command.set_defaults(parser=command)
    return parser


def _add_smoothing_options(p: argparse.ArgumentParser, task: str, default) -> None:
    p.add_argument("--model", metavar="CKPT", nargs="+",
                   help="drt-fast ensemble or Cohen/DRT checkpoint, or several member files that form "
                        "one ensemble, as the DRT code saves them (default: the embedded digits ensemble)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", metavar="D", help="dataset folder (for npz: the .npz file)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--sigma", type=float, help="noise level (default: the checkpoint's training sigma)")
    options.add_normalization(p)
    if task == "certify":
        # (--N0 / --N: the spelling of Cohen et al.'s certify.py and predict.py)
        p.add_argument("--n0", "--N0", type=int, default=100, help="selection draws (default: 100)")
    p.add_argument("--n", "--N", type=int, default=100_000, help="estimation draws (default: 100000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default: 0.001)")
    p.add_argument("--batch", type=int, default=1000, help="noisy draws per forward pass (default: 1000)")
    p.add_argument("--skip", type=int, help=f"{task} every skip-th input (default: 1; "
                                             f"{default.skip if default else 1} on the embedded default's test inputs)")
    # A count of inputs: Cohen's certify.py stops at *index* max, which with --skip is
    # easy to get wrong (and never triggers unless max is a multiple of skip).
    p.add_argument("--max", type=int, help=f"at most this many of the selected inputs (default: all; "
                                            f"{(default.max if default else None) or 'all'} on the embedded default's test inputs)")
    p.add_argument("--mode", choices=validate.AGGREGATIONS, help="ensemble aggregation (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:i}",
                   help="auto: cuda when available (default: auto)")
    p.add_argument("--precision", choices=validate.PRECISIONS, default="fp32",
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


# sequential.FUTILITY, for the help text without importing scipy (test_cli checks they agree)
_FUTILITY = 0.01


def _add_sequential_options(p: argparse.ArgumentParser, task: str) -> None:
    """``--radii`` / ``--futility``: certify's sequential certification at grid radii. predict
    takes them only to refuse them in words (`_check_numbers`)."""
    if task != "certify":
        p.add_argument("--radii", type=float, nargs="+", help=argparse.SUPPRESS)
        p.add_argument("--futility", type=float, help=argparse.SUPPRESS)
        return
    p.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="sequential certification at these grid radii: each input takes the draws it "
                        "needs (--n is then the most it may take) and is certified at the largest grid "
                        "radius it reaches, at the same level alpha (docs/sequential.md)")
    p.add_argument("--futility", type=float, metavar="F",
                   help=f"with --radii: level of the test that gives an input up early once its next "
                        f"radius looks out of reach (default: {_FUTILITY}; 0: only once it is out of "
                        f"reach); in [0, 1): it costs certificates, never soundness")


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
            getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}"
                                                  + _positional_hint(args, extra))
    except SystemExit as e:     # --help, --version, or a usage error (already said, one line)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _positional_hint(args, extra: list) -> str:
    """Cohen's certify.py / predict.py take DATASET BASE_CLASSIFIER SIGMA OUTFILE as
    positional arguments: name the flags that say them here."""
    # a word that follows an unknown option is taken for its value
    positional = [word for i, word in enumerate(extra)
                  if not word.startswith("-") and not (i and extra[i - 1].startswith("-"))]
    if getattr(args, "command", None) not in ("certify", "predict") or not positional:
        return ""
    return (f"; {args.command} takes no positional arguments: Cohen's DATASET BASE_CLASSIFIER "
            f"SIGMA OUTFILE are --dataset --model --sigma --out")


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
        if not is_out_of_memory(e):
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

    from . import analyze, io

    paths = args.checkpoint or [embedded.load().model]
    if len(paths) == 1 and io.is_results_file(paths[0]):
        print(analyze.describe(paths[0]))
        return 0
    print(checkpoint.describe_loaded(*checkpoint.open_checkpoints(paths)))
    return 0


def run_analyze(args) -> int:
    from .analyze import analyze

    print(analyze(args.files, args.radii, args.plot))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


# ----------------------------------------------------------------------------- certify, predict

class Record(NamedTuple):
    """What the summary keeps of an input of this run (io.Results' columns, in order)."""

    idx: int
    label: int
    predict: int       # -1: abstain
    radius: float      # exactly what the file holds (0.0 for predict)
    correct: int
    n: int             # estimation draws taken (predict: its draws)


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
    draws_per_input: int  # n0 + n for certify (the most a sequential input may take), n for predict
    group: int  # inputs per engine call (a rank's share of a round)
    channels_last: bool  # whether the draws are written channels-last (what --channels-last became)

    @property
    def sequential(self) -> bool:
        return self.config.get("certification") == "sequential"

    def settings(self) -> dict:
        """This run's `io.SEGMENT_SETTINGS` (what the engine made of fuse and CUDA graphs so far)."""
        from . import fuse

        cfg = self.config
        return {"batch": cfg["batch"], "device": cfg["device"], "fuse": cfg["fuse"],
                "cuda_graphs": cfg["cuda_graphs"],
                "channels_last": f"{cfg['channels_last']}: {'on' if self.channels_last else 'off'}",
                "cifar_resnet_kernel": fuse.cifar_resnet_setting() or None,
                "fused": str(self.smoothed.fuse_status), "graphs": str(self.smoothed.graph_status)}


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
    if device.type == "cpu" and args.precision == "fp16":
        import warnings

        warnings.warn("--precision fp16 on the CPU runs many times slower than fp32 (CPUs have no "
                      "fast fp16 arithmetic); --precision bf16 is the fast reduced precision there")
    try:
        job = _prepare(args, task, device)
        _run(args, job, group)
        # Leave together: a rank that tears its gloo connections down while rank 0 is still
        # writing can abort ("terminate called without an active exception").
        distributed.barrier(group)
    finally:
        distributed.shutdown(group)
    return 0


def _check_numbers(args, task: str) -> None:
    """Refuse bad numbers before loading anything."""
    if task == "certify":
        validate.positive_int(args.n0, "--n0")
    validate.positive_int(args.n, "--n")
    validate.alpha(args.alpha, "--alpha")
    if args.sigma is not None:
        validate.sigma(args.sigma, "--sigma")
    validate.positive_int(args.batch, "--batch")
    for flag, value in (("--skip", args.skip), ("--max", args.max)):
        if value is not None:
            validate.positive_int(value, flag)
    validate.seed(args.seed, "--seed")
    options.normalization(args)
    flags = "--n0 + --n" if task == "certify" else "--n"
    validate.draw_range(0, args.n + (args.n0 if task == "certify" else 0),
                        what=f"an input's draws ({flags} of them)")
    if task == "predict" and (args.radii is not None or args.futility is not None):
        raise DrtFastError(f"{'--radii' if args.radii is not None else '--futility'} is certify's (sequential "
                           f"certification at grid radii); predict certifies no radius")
    if args.futility is not None:
        if args.radii is None:
            raise DrtFastError("--futility sets a test of sequential certification: pass --radii too")
        validate.alpha(args.futility, "--futility", zero=True)
    if args.resume and not args.out:
        raise DrtFastError("--resume needs --out (the results file to continue)")
    if args.out:
        from .io import check_writable

        check_writable(args.out, args.resume)


def _prepare(args, task: str, device) -> Job:
    """Load model and data, check they fit together, choose the inputs, build the sidecar."""
    import torch

    from . import checkpoint, data
    from .smoothing import SmoothedClassifier

    default = embedded.load() if args.model is None else None
    if default is not None and (args.dataset not in (None, "digits", "npz")
                                or (args.data_dir is not None and os.path.isdir(args.data_dir))):
        raise DrtFastError(_NO_MODEL)
    model_paths = [default.model] if default else args.model
    model_path = _one_or_many(model_paths)  # what error messages show
    ensemble, meta = checkpoint.open_checkpoints(model_paths, mode=args.mode, dataset=args.dataset)
    meta = meta or {}

    # The data: explicit --dataset, else the embedded default's test file, else the checkpoint's.
    if args.dataset is not None:
        dataset_name, data_dir = args.dataset, args.data_dir
    elif default is not None:
        dataset_name, data_dir = "npz", args.data_dir or default.data
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
        the_default = args.dataset is None and default is not None and args.data_dir is None
        raise DrtFastError(f"--split {args.split}: an .npz file ({'the embedded default' if the_default else data_dir}) "
                           f"is one set of inputs, with no splits"
                           + ("; for the digits training split pass --dataset digits --split train"
                              if the_default else ""))
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
        sigma = default.sigma if default else meta.get("sigma")
    if sigma is None:
        raise DrtFastError(f"checkpoint {model_path!r} has no training sigma; pass --sigma")
    sigma = float(sigma)
    # The default subset is that of the embedded test inputs, not of data the user names.
    subset = default if default is not None and args.dataset is None and args.data_dir is None else None
    skip = args.skip if args.skip is not None else (subset.skip if subset else 1)
    max_inputs = args.max if args.max is not None else (subset.max if subset else None)

    # A checkpoint's own normalization wins; --means/--sds, else the data's, fill in one that has none.
    source = checkpoint.resolve_normalization(ensemble, meta, options.normalization(args),
                                              ds.normalization if ds.own_normalization else None)
    ensemble = ensemble.to(device).eval()
    try:
        num_classes = checkpoint.check_fits(ensemble, meta, ds, model_path, dataset_name, device)
    except DrtFastError as e:
        if default is None:
            raise
        raise DrtFastError(f"{_NO_MODEL} ({e})") from None

    positions = list(range(0, len(keys), skip))
    if max_inputs is not None:
        positions = positions[:max_inputs]
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
        "n0": args.n0 if task == "certify" else None,
        "n": args.n,
        "alpha": args.alpha,
        "seed": args.seed,
        "mode": mode,
        "normalization": {"means": list(meta["normalization"][0]), "sds": list(meta["normalization"][1])},
        "normalization_source": options.describe_normalization(
            source, meta, os.path.basename(data_dir) if dataset_name == "npz" else dataset_name),
        "precision": args.precision,
        "certification": ("sequential" if args.radii is not None else "fixed-n") if task == "certify" else None,
        "radii": None,             # the grid, checked below
        "futility": None,
        "fuse": {None: "auto", True: "on", False: "off"}[args.fuse],
        "cuda_graphs": {None: "auto", True: "on", False: "off"}[args.cuda_graphs],
        "channels_last": {None: "auto", True: "on", False: "off"}[args.channels_last],
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
                                  fuse=args.fuse, cuda_graphs=args.cuda_graphs)
    draws = args.n0 + args.n if task == "certify" else args.n
    group = max(1, min(_MAX_GROUP, args.batch // draws))
    if args.radii is not None:
        group = _check_sequential(args, config, smoothed.radius_sigma)
    # Build the members' rewrites now: a --fuse that cannot be honored fails before any
    # output, and the first row's time is not charged with the rewrite.
    smoothed.prepare(ds.x[:1])
    channels_last = smoothed.engine.draws_channels_last(ds.x[:1].to(device))
    y = [int(v) for v in torch.as_tensor(ds.y).tolist()]
    return Job(task, smoothed, ds.x, y, keys, positions, config, draws, group, channels_last)


def _check_sequential(args, config: dict, sigma: float) -> int:
    """Check --radii against the noise level (``sigma``: the one radii are computed at) and
    record the grid and the futility level in ``config``; returns the inputs per call."""
    from . import sequential

    try:
        radii = sequential.check_radii(args.radii, sigma, args.n, args.alpha, name="--radii")
    except DrtFastError as e:
        raise DrtFastError(str(e).replace("with n_max = ", "with --n ")) from None
    config["radii"] = list(radii)
    config["futility"] = sequential.FUTILITY if args.futility is None else float(args.futility)
    # A call refills the slots of inputs that stop with inputs still pending, but its last
    # inputs run in a thinning batch: many inputs a call keep batches full, few keep rows
    # flowing (and a killed run loses less). Each slot takes STEP draws a batch.
    slots = max(1, args.batch // min(sequential.STEP, args.batch))
    return min(slots * _SEQUENTIAL_FILL, max(slots, _SEQUENTIAL_MAX_GROUP))


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
        results = io.start_run(args.out, job.task, job.config, job.settings(), args.resume)
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
    round_size = job.group * group.world_size
    records = []  # a Record for each input of this run, for the summary

    progress = _Progress(len(todo), job.draws_per_input, args.quiet or not group.is_main)
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
                results.sync(job.settings())
            progress.advance([_draws(job, record) for _, _, record in rows])
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
        elif isinstance(exc, KeyboardInterrupt) and not args.out and records and group.is_main:
            progress.close()          # (before the summary, on the same terminal)
            print(_summary(args, job, records, 0, time.perf_counter() - start))
            raise KeyboardInterrupt(f"the summary covers the {len(records)} input"
                                    f"{'s' if len(records) != 1 else ''} done before it") from None
        raise
    finally:
        progress.close()
        if results is not None:
            results.close()
    elapsed = time.perf_counter() - start
    if group.is_main:
        print(_summary(args, job, records, len(done), elapsed))


def _draws(job: Job, record: Record) -> int:
    """The draws an input took (selection and estimation)."""
    return record.n + (job.config["n0"] if job.task == "certify" else 0)


def _work(job: Job, positions: list) -> list:
    """Certify or predict the inputs at ``positions``; returns (position, TSV line, record) each."""
    from . import io

    if not positions:
        return []
    cfg = job.config
    xs, keys = job.x[positions], [job.keys[p] for p in positions]
    out = []
    if job.task == "certify":
        t0 = time.perf_counter()
        if job.sequential:
            certs = job.smoothed.certify_radii(xs, keys, cfg["radii"], n0=cfg["n0"], n_max=cfg["n"],
                                               alpha=cfg["alpha"], batch_size=cfg["batch"],
                                               futility=cfg["futility"])
        else:
            certs = job.smoothed.certify_many(xs, keys, n0=cfg["n0"], n=cfg["n"], alpha=cfg["alpha"],
                                              batch_size=cfg["batch"])
        # Inputs certified together share the time: each row gets its share, by its draws.
        seconds = (time.perf_counter() - t0) / sum(cfg["n0"] + cert.n for cert in certs)
        for p, cert in zip(positions, certs):
            idx, label = job.keys[p], job.y[p]
            line = io.certify_row(idx, label, cert, seconds * (cfg["n0"] + cert.n))
            # the file holds exactly cert.radius (never a value above it: io.format_down)
            out.append((p, line, Record(idx, label, cert.label, cert.radius, int(cert.label == label), cert.n)))
    else:
        t0 = time.perf_counter()
        predictions = job.smoothed.predict_many(xs, keys, n=cfg["n"], alpha=cfg["alpha"], batch_size=cfg["batch"])
        seconds = (time.perf_counter() - t0) / len(positions)
        for p, prediction in zip(positions, predictions):
            idx, label = job.keys[p], job.y[p]
            line = io.predict_row(idx, label, prediction, seconds)
            out.append((p, line, Record(idx, label, prediction, 0.0, int(prediction == label), cfg["n"])))
    return out


class _Progress:
    """The progress bar, in draws (tqdm on stderr, only when stderr is a terminal and not
    --quiet). Its total starts at the fixed-n budget of the inputs left (``budget`` draws
    each); an input that stops early (sequential certification) takes the draws it did not
    use off the total: the bar never shows less work left than there may be, and ends full."""

    def __init__(self, inputs: int, budget: int, quiet: bool):
        self.inputs, self.budget, self.done, self.bar = inputs, budget, 0, None
        if quiet or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=inputs * budget, unit="draw", unit_scale=True, file=sys.stderr,
                        dynamic_ncols=True, postfix=f"0/{inputs} inputs")

    def advance(self, draws: list) -> None:
        """Inputs done, ``draws`` taken by each."""
        self.done += len(draws)
        if self.bar is None or not draws:
            return
        self.bar.total -= sum(self.budget - d for d in draws)
        self.bar.set_postfix_str(f"{self.done}/{self.inputs} inputs", refresh=False)
        self.bar.update(sum(draws))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _summary(args, job: Job, records: list, resumed: int, elapsed: float) -> str:
    """The final report on stdout: accuracy (certified at several radii), abstains, ACR,
    draws (sequential: against the fixed-n budget), speed."""
    from . import io, stats
    from .analyze import abstain_rate, acr, certified_accuracy, default_radii, radius_label

    cfg = job.config
    if args.out:
        results = io.read_results(args.out, job.task)  # all rows, resumed ones included
    else:
        columns = [list(c) for c in zip(*records)] if records else [[] for _ in Record._fields]
        results = io.Results("this run", *columns)
    count = len(results)
    source = os.path.basename(cfg["data"]) if cfg["dataset"] == "npz" else f"{cfg['dataset']} ({cfg['split']})"
    n = f"n_max={cfg['n']}" if job.sequential else f"n={cfg['n']}"
    lines = [f"drt-fast {job.task}: {count} input{'s' if count != 1 else ''} of {source}, sigma={cfg['sigma']:g}, "
             f"{'n0=%d, ' % cfg['n0'] if job.task == 'certify' else ''}{n}, alpha={cfg['alpha']:g}, "
             f"mode={cfg['mode']}, precision={cfg['precision']}, on {cfg['device']}"]
    if job.sequential:
        lines.append(f"sequential certification at radii {', '.join(f'{r:g}' for r in cfg['radii'])} "
                     f"(futility test at level {cfg['futility']:g})")
    if cfg["device"].startswith("cuda"):
        lines.append(f"fused members: {job.smoothed.fuse_status}; "
                     f"CUDA graphs: {job.smoothed.graph_status}")
    else:
        lines.append(f"fused members: {job.smoothed.fuse_status}")
    norm = cfg["normalization"]
    lines.append(f"normalization: means {norm['means']}, sds {norm['sds']} ({cfg['normalization_source']})")
    if getattr(args, "thread_note", ""):
        lines.append(args.thread_note)
    if job.task == "certify":
        if job.sequential:
            radii = cfg["radii"]
        else:
            radii = default_radii(stats.max_radius(cfg["sigma"], cfg["n"], cfg["alpha"]))
        acc = certified_accuracy(results, radii)
        labels = [radius_label(r) for r in radii]
        width = max(7, *(len(label) + 2 for label in labels))
        header = "radius               " + "".join(label.rjust(width) for label in labels)
        values = "certified accuracy % " + "".join(f"{100 * a:.1f}".rjust(width) for a in acc)
        lines += [header, values,
                  f"abstain rate {100 * abstain_rate(results):.1f} %, ACR {acr(results):.3f}"
                  + (" (a lower bound: each input counts the largest grid radius it certified)"
                     if job.sequential else "")]
        if job.sequential and count:
            used = sum(results.n) + count * cfg["n0"]
            budget = count * (cfg["n0"] + cfg["n"])
            lines.append(f"draws: {used:,} used, {budget:,} at fixed n ({count} x ({cfg['n0']} + {cfg['n']})): "
                         f"{budget / used:.2f}x fewer")
    else:
        accuracy = sum(results.correct) / count if count else 0.0
        lines.append(f"accuracy {100 * accuracy:.1f} %, abstain rate {100 * abstain_rate(results):.1f} %")
    new = len(records)
    if new and elapsed > 0:
        draws = sum(_draws(job, record) for record in records)
        speed = f"{new / elapsed:.2f} inputs/s, {draws / elapsed:,.0f} draws/s"
    else:
        speed = "nothing left to do"
    lines.append(f"this run: {new} input{'s' if new != 1 else ''} in {elapsed:.2f} s ({speed})"
                 + (f"; {resumed} rows were already in the file" if resumed else ""))
    if args.out:
        lines.append(f"rows written to {args.out} (configuration in {io.sidecar_path(args.out)})")
    else:
        lines.append("rows not saved: pass --out results.tsv to keep them")
    return "\n".join(lines)
