"""drt-fast's parser and main (drt_fast.cli.entry, drt_fast.cli.parser): usage errors and bad
numbers as one line, exit statuses, warnings, --version, Cohen's spellings."""
import json
import os
import subprocess
import sys

import pytest
import torch

from drt_fast.cli import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import one_thread  # noqa: E402,F401 (fixtures; one_thread autouse)


def test_version_says_which_kernels_run(capsys):
    import drt_fast
    from drt_fast import ops
    from drt_fast.cli import build_report

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"drt-fast {drt_fast.__version__}"
    assert out[1].startswith(f"torch {torch.__version__} (CUDA build: ")
    ext = ops.extensions()
    assert out[2] == f"CPU kernels: {ext.cpu.cpu_isa()}"
    if ext.cuda is None:
        assert out[3].startswith("CUDA kernels: not built")
    elif not ops.cuda_available():
        assert out[3] == "CUDA kernels: built; no CUDA device answers"
    else:
        assert out[3].startswith(f"CUDA kernels: built for {ext.cuda.architectures()}; ")
        assert torch.cuda.get_device_name(0) in out[3]
    no_cuda = ext._replace(cuda=None, cuda_error=None)        # a build without nvcc
    assert build_report(no_cuda).splitlines()[3].startswith("CUDA kernels: not built")
    broken = no_cuda._replace(cuda_error=ImportError("_C_cuda.so: undefined symbol: x"))
    assert build_report(broken).splitlines()[3] == (
        "CUDA kernels: built, but they fail to load: _C_cuda.so: undefined symbol: x")
    assert build_report(no_cuda._replace(cpu=None)).splitlines()[2].startswith("CPU kernels: not built")


@pytest.mark.parametrize("argv, message", [
    (["certify", "--mode", "avg"], "argument --mode: invalid choice: 'avg' (choose from 'we', 'logit', "
                                  "'mme', 'mv') (see drt-fast certify --help)"),
    (["certify", "--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
    (["certify", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["certify", "--n", "abc"], "argument --n/--N: invalid int value: 'abc'"),
    (["predict", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["certify", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:i, got 'tpu'"),
    (["certify", "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:i, got 'cuda:x'"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    """Unknown choices and malformed values: one line (no usage block), exit 2."""
    assert main(argv) == 2
    assert message in fx.error_line(capsys)


def test_usage_errors_name_the_command_and_draw_limit(capsys):
    assert main(["predict", "--n0", "5"]) == 2
    assert fx.error_line(capsys).endswith("unrecognized arguments: --n0 5 (see drt-fast predict --help)")
    assert main(["certify", "--n", str(2**32)]) == 2
    assert "(--n0 + --n of them) must be >= 0 and stay below 2^32" in fx.error_line(capsys)


def test_cohen_style_positional_arguments_name_the_flags(capsys):
    """item 11: `drt-fast certify cifar10 ckpt 0.25 out.txt` got a bare 'unrecognized arguments'."""
    assert main(["certify", "cifar10", "ckpt.pth.tar", "0.25", "out.txt"]) == 2
    line = fx.error_line(capsys)
    assert "unrecognized arguments: cifar10 ckpt.pth.tar 0.25 out.txt" in line
    assert "--dataset --model --sigma --out" in line
    assert main(["predict", "--frobnicate"]) == 2
    assert "--dataset --model" not in fx.error_line(capsys)


def test_defaults_are_cohens():
    """Cohen et al.'s certify.py / predict.py defaults: N0 = 100, N = 100000, alpha = 0.001."""
    from drt_fast.cli import build_parser

    certify = build_parser().parse_args(["certify"])
    assert (certify.n0, certify.n, certify.alpha, certify.seed) == (100, 100_000, 0.001, 0)
    predict = build_parser().parse_args(["predict"])
    assert (predict.n, predict.alpha, predict.seed) == (100_000, 0.001, 0)


def test_cohens_spelling_of_n0_and_n(tmp_path, capsys):
    """--N0 / --N as in Cohen et al.'s certify.py and predict.py: the same run as --n0 / --n."""
    runs = {"cohen": ["--N0", "12", "--N", "40"], "ours": ["--n0", "12", "--n", "40"]}
    for name, flags in runs.items():
        assert main(["certify", *flags, "--max", "3", "--quiet", "--out", str(tmp_path / f"{name}.tsv")]) == 0
        assert main(["predict", flags[2], flags[3], "--max", "3", "--quiet",
                     "--out", str(tmp_path / f"{name}-p.tsv")]) == 0
    assert json.loads((tmp_path / "cohen.tsv.json").read_text())["n"] == 40
    for suffix in (".tsv", "-p.tsv"):
        assert (fx.rows_without_time(tmp_path / f"cohen{suffix}")
                == fx.rows_without_time(tmp_path / f"ours{suffix}"))


def test_warnings_and_out_of_memory_are_one_line(monkeypatch, capsys):
    import warnings

    from drt_fast.cli import info

    def warns(args):
        warnings.warn("drt_fast: something to know\nwith a second line", RuntimeWarning)
        return 0

    def out_of_memory(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "400000000000 bytes.\nmore detail")

    def bug(args):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(info, "run_info", warns)
    assert main(["info"]) == 0
    assert capsys.readouterr().err == "drt-fast: warning: drt_fast: something to know\n"
    monkeypatch.setattr(info, "run_info", out_of_memory)
    assert main(["info"]) == 2
    assert "out of memory (DefaultCPUAllocator" in fx.error_line(capsys)
    monkeypatch.setattr(info, "run_info", bug)
    with pytest.raises(RuntimeError, match="an internal error"):   # bugs keep their traceback
        main(["info"])


def test_closed_stdout_is_no_traceback():
    """`drt-fast info | head -1`: a reader that leaves early gets no traceback on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)                       # every write to stdout now fails (EPIPE)
    proc = subprocess.Popen([sys.executable, "-m", "drt_fast", "info"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, env=fx.subprocess_env(),
                            cwd=fx.NEUTRAL_CWD)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == ""


def test_subprocess_bad_number_exit_code():
    proc = fx.run_cli("certify", "--n", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "drt-fast: error: --n must be >= 1, got 0\n"
