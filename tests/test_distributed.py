"""Multi-process certify under torchrun (2 CPU processes, gloo) equals a single-process run."""
import os
import subprocess
import sys

import pytest

from drt_fast.cli import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import one_thread  # noqa: E402,F401 (autouse)

# 7 inputs; 3 inputs per rank per round (n0 + n = 300 draws, batch 1000): a full round of 6
# inputs, then a round where rank 1 has nothing to do.
ARGS = ["--n", "200", "--skip", "64", "--max", "7", "--quiet"]


def _torchrun(*args):
    """``torchrun --standalone --nproc_per_node 2 -m drt_fast -- ARGS``.

    The ``--`` keeps torchrun's own parser from reading ``--n`` / ``--max`` as abbreviations
    of its ``--nnodes`` / ``--max-restarts`` (argparse looks at every argument for that).
    """
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "drt_fast", "--", *map(str, args)], capture_output=True, text=True,
                          env=fx.subprocess_env(), timeout=300, cwd=fx.NEUTRAL_CWD)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single") / "single.tsv")
    with fx.single_thread():
        assert main(["certify", "--model", fx.digits_checkpoint(), *ARGS, "--out", out]) == 0
    return out


def _same_rows_in_two_processes(args, out, single):
    """certify ``args`` under torchrun into ``out``: the rows of the one-process run ``single``."""
    proc = _torchrun("certify", "--model", fx.digits_checkpoint(), *args, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fx.rows_without_time(out) == fx.rows_without_time(single)
    return proc


def test_two_processes_write_the_rows_of_one(single, tmp_path):
    out = str(tmp_path / "two.tsv")
    proc = _same_rows_in_two_processes(ARGS, out, single)
    assert len(fx.rows_without_time(out)) == 8
    # One summary, from rank 0.
    assert proc.stdout.count("drt-fast certify: 7 inputs") == 1

    # Cut the file after 2 rows and half a row; a 2-process resume completes it identically.
    with open(out) as f:
        lines = f.readlines()
    with open(out, "w") as f:
        f.writelines(lines[:3])
        f.write(lines[3][:5])
    proc = _torchrun("certify", "--model", fx.digits_checkpoint(), *ARGS, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fx.rows_without_time(out) == fx.rows_without_time(single)
    assert "2 rows were already in the file" in proc.stdout


def test_refusal_on_rank_0_stops_every_rank(single):
    # The file exists and --resume is missing: all ranks must exit with the one error, not hang.
    proc = _torchrun("certify", "--model", fx.digits_checkpoint(), *ARGS, "--out", single)
    assert proc.returncode != 0
    # Each rank prints the one line (torchrun then adds its own report of failed children).
    assert proc.stderr.count("drt-fast: error: output file") == 2
    assert fx.PACKAGE_DIR not in proc.stderr  # no traceback through our code


def test_device_resolution(monkeypatch):
    """--device cuda:i is checked and made the current device (stand-in CUDA: no GPU here)."""
    import torch

    from drt_fast import distributed
    from drt_fast.errors import DrtFastError

    assert distributed.resolve_device("cpu") == torch.device("cpu")
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.resolve_device("cuda") == torch.device("cuda") and current == []
    assert distributed.resolve_device("cuda:1") == torch.device("cuda:1")
    assert current == [torch.device("cuda:1")]
    for bad, message in (("cuda:2", "torch sees 2 CUDA device"), ("tpu", "must be auto, cpu"),
                         ("cuda:x", "must be auto, cpu")):
        with pytest.raises(DrtFastError, match=message):
            distributed.resolve_device(bad)


def test_two_processes_certify_sequentially_as_one(tmp_path):
    """--radii under torchrun: --batch 100 is one slot, so 8 inputs a certify_radii call and
    16 a round: 2 rounds for 20 inputs, the second one uneven."""
    args = ["--radii", "0", "0.25", "0.5", "--n", "1000", "--batch", "100", "--skip", "20", "--max", "20", "--quiet"]
    single = str(tmp_path / "single.tsv")
    with fx.single_thread():
        assert main(["certify", "--model", fx.digits_checkpoint(), *args, "--out", single]) == 0
    out = str(tmp_path / "two.tsv")
    proc = _same_rows_in_two_processes(args, out, single)
    assert len(fx.rows_without_time(out)) == 21
    assert proc.stdout.count("sequential certification at radii 0, 0.25, 0.5") == 1
