"""drt_fast.embedded: the embedded default ensemble's description and the scripts that build it."""
import json
import os
import subprocess

import pytest

from drt_fast import embedded
from drt_fast.errors import DrtFastError


def test_description_paths_are_made_absolute(tmp_path):
    (tmp_path / "default.json").write_text(json.dumps(
        {"model": "m.pt", "data": "t.npz", "sigma": 0.5, "skip": 4, "max": 3, "recipe": "drt-fast train ..."}))
    default = embedded.load(tmp_path)
    assert default == embedded.EmbeddedDefault(model=str(tmp_path / "m.pt"), data=str(tmp_path / "t.npz"),
                                               sigma=0.5, skip=4, max=3, recipe="drt-fast train ...")
    with pytest.raises(DrtFastError, match="pass --model"):
        embedded.load(tmp_path / "empty")


@pytest.mark.parametrize("script", ["make_default.sh", "make_table.sh"])
def test_asset_scripts_run_the_installed_command(script, tmp_path):
    """From the repository root `python -m drt_fast` imports the checkout, which has no
    compiled kernels after a plain `pip install .`: the scripts must run `drt-fast`."""
    lines = (embedded.ASSETS / script).read_text().splitlines()
    line = next(l for l in lines if l.startswith("DRT=") or ("DRT=" in l and l.startswith("if ")))
    fake = tmp_path / "drt-fast"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-c", line + '\necho "$DRT"'], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "drt-fast"


def test_the_default_ships_nothing_of_the_machine_that_built_it():
    """issue 21, item 12: `drt-fast info` showed an init= path and a command whose files lay
    in a temporary folder of the build machine. Paths are relative to the checkpoint."""
    import torch

    record = torch.load(embedded.load().model, weights_only=True)["train_config"]
    assert (record["init"], record["out"], record["log"]) == ("gaussian.pt", "drt.pt", "drt.jsonl")
    words = [word.split("=", 1)[-1] for value in record.values() if isinstance(value, str)
             for word in value.split()]
    assert [w for w in words if os.path.isabs(w) or w.startswith("~")] == []
    assert "--init gaussian.pt --out drt.pt --log drt.jsonl" in record["command"]
