"""``main``: parse, dispatch to the sub-command, and turn every problem a user can cause
into one line ``drt-fast: error: <message>`` on stderr and exit status 2."""
from __future__ import annotations

import os
import sys

from ..errors import DrtFastError, first_line, is_out_of_memory
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``drt-fast`` and ``python -m drt_fast``; returns the exit status.

    Under torchrun, a process that joined the process group ends here with os._exit
    (see `drt_fast.distributed.exit_cli_process`)."""
    from .. import distributed

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
