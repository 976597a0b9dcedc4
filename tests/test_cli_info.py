"""drt-fast info (drt_fast.cli.info) of checkpoints, member files and results files."""
import os
import sys

import torch

from drt_fast import checkpoint
from drt_fast.cli import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import ckpt, one_thread, reference_tsv  # noqa: E402,F401 (fixtures; one_thread autouse)


def test_info(ckpt, capsys):
    assert main(["info", ckpt]) == 0
    out = capsys.readouterr().out
    assert "digits_cnn" in out and "members        2" in out


def test_info_of_member_files_shows_each_files_normalization_and_training(tmp_path, capsys):
    """issue 21, item 8: info showed the first file's normalization and trainer for all."""
    from drt_fast.ensemble import Ensemble

    paths = []
    for i, (norm, trainer, sigma) in enumerate(((((0.3052,), (0.376,)), "gaussian", 0.25),
                                                (((0.5,), (0.25,)), "drt", 0.5))):
        paths.append(str(tmp_path / f"m{i}.pt"))
        member = fx.members("digits_cnn", 10, *norm, 1, seed=i)
        checkpoint.save_ensemble(paths[-1], Ensemble(member), arch="digits_cnn", dataset="digits",
                                 num_classes=10, normalization=norm, sigma=sigma,
                                 train_config={"trainer": trainer, "epochs": 3 + i,
                                               "command": f"drt-fast train --trainer {trainer}"})
    cohen = str(tmp_path / "cohen.pth.tar")
    state = fx.members("digits_cnn", 10, (0.0,), (1.0,), 1, seed=5)[0].state_dict()
    torch.save({"arch": "digits_cnn", "state_dict": {k: v for k, v in state.items() if not k.startswith("0.")}},
               cohen)
    assert main(["info", *paths, cohen]) == 0
    out = capsys.readouterr().out.splitlines()
    blocks = [i for i, line in enumerate(out) if line.startswith("member ")]
    assert len(blocks) == 3
    first, second, third = (out[b:e] for b, e in zip(blocks, blocks[1:] + [len(out)]))
    assert first[0].startswith(f"member 0:      {paths[0]} (drt-fast")
    assert "normalization  means [0.3052], sds [0.376]" in first[1] and "sigma          0.25" in first[2]
    assert "trainer=gaussian" in first[3] and "drt-fast train --trainer gaussian" in first[4]
    assert "normalization  means [0.5], sds [0.25]" in second[1] and "sigma          0.5" in second[2]
    assert "trainer=drt" in second[3]
    assert third[0].startswith(f"member 2:      {cohen} (cohen") and "not in the file" in third[1]


def test_info_of_a_results_file_and_of_a_file_without_sidecar(ckpt, reference_tsv, tmp_path, capsys):
    assert main(["info", reference_tsv]) == 0
    out = capsys.readouterr().out
    assert f"results        {reference_tsv}: certify, 30 rows" in out
    assert "certification  fixed n: n0 100, n 200, alpha 0.001" in out
    assert "runs           1\n" in out and "rows 1-30 (idx 0-435)" in out
    cohen = tmp_path / "cohen.tsv"
    cohen.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n")
    assert main(["info", str(cohen)]) == 0
    assert "configuration  unknown: no metadata file" in capsys.readouterr().out
