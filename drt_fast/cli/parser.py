"""The ``drt-fast`` parser: its sub-commands and their options.

certify and predict share `_add_smoothing_options` (and `_add_sequential_options`, which
predict takes only to refuse in words); train and diagnose register their own
(`drt_fast.train.cli.register`). Each sub-parser sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib.util

from .. import embedded, options, validate
from ..errors import DrtFastError
from . import info, run
from .job import DATASETS

# sequential.FUTILITY, for the help text without importing scipy (a test checks they agree)
FUTILITY = 0.01


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


class _Report(argparse.Action):
    """``--version``: the report, built only when asked for (it may initialise CUDA)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(info.build_report())
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
        p.set_defaults(func=lambda args, task=task: run.run_smoothing(args, task))

    p = sub.add_parser("analyze", help="certified-accuracy table (and plot) of results files",
                       description="Certified accuracy at chosen radii and ACR, one column per results file.")
    p.add_argument("files", nargs="+", metavar="results.tsv", help="certify results (drt-fast or Cohen format)")
    p.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="radii of the table rows (default 0, 0.25, ... up to the largest radius)")
    p.add_argument("--plot", metavar="out.png", help="also write a PNG of certified accuracy vs radius")
    p.set_defaults(func=info.run_analyze)

    p = sub.add_parser("info", help="what a checkpoint or a results file holds",
                       description="Describe a checkpoint, or a results file (its configuration and "
                                   "the runs that wrote it).")
    p.add_argument("checkpoint", metavar="CKPT", nargs="*",
                   help="a checkpoint, or several member files that form one ensemble "
                        "(default: the embedded digits ensemble), or a results TSV")
    p.set_defaults(func=info.run_info)

    # train and diagnose live with the training code; the CLI works without it.
    if importlib.util.find_spec("drt_fast.train.cli") is not None:
        from ..train import cli as train_cli

        train_cli.register(sub)
    for command in sub.choices.values():     # usage errors point at the command's own help
        command.set_defaults(parser=command)
    return parser


def _add_smoothing_options(p: argparse.ArgumentParser, task: str, default) -> None:
    """certify's and predict's options, in the order ``--help`` lists them: the model and
    its inputs, the smoothing (noise, draws, alpha, aggregation, seed), the engine's levers,
    the output. ``default``: the embedded default (`embedded.load`), or None."""
    p.add_argument("--model", metavar="CKPT", nargs="+",
                   help="drt-fast ensemble or Cohen/DRT checkpoint, or several member files that form "
                        "one ensemble, as the DRT code saves them (default: the embedded digits ensemble)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", metavar="D", help="dataset folder (for npz: the .npz file)")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--sigma", type=float, help="noise level (default: the checkpoint's training sigma)")
    p.add_argument("--noise", choices=validate.NOISES, default="gaussian",
                   help="gaussian: N(0, sigma^2) added in floating point; discrete: that Gaussian rounded "
                        "to the pixels' grid and drawn exactly, so that certificates also hold for the "
                        "floating-point computation (inputs must lie on the grid; docs/certificates.md) "
                        "(default: gaussian)")
    p.add_argument("--grid", type=int, metavar="Q",
                   help="--noise discrete: the pixels are k/Q (default: the data's own grid: 16 for "
                        "digits, 255 for MNIST, CIFAR-10, ImageNet and uint8 .npz files)")
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


def _add_sequential_options(p: argparse.ArgumentParser, task: str) -> None:
    """``--radii`` / ``--futility``: certify's sequential certification at grid radii. predict
    takes them only to refuse them in words (`prepare.check_numbers`)."""
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
                        f"radius looks out of reach (default: {FUTILITY}; 0: only once it is out of "
                        f"reach); in [0, 1): it costs certificates, never soundness")
