"""The embedded default: the ensemble and test inputs `drt-fast certify` uses without --model.

``assets/default.json`` describes them (file names relative to ``assets/``): the model, its
test data, the noise level, and the subset of the data certified by default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DrtFastError

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class EmbeddedDefault:
    """What ``assets/default.json`` says, with absolute paths."""

    model: str                 # the drt-fast ensemble file
    data: str                  # its test inputs, an .npz
    sigma: float               # the noise level it was trained at
    skip: int = 1              # certify every skip-th input by default ...
    max: Optional[int] = None  # ... and at most this many of them
    grid: Optional[int] = None # its test inputs' pixel grid, in steps per unit (--noise discrete)
    recipe: str = ""           # the commands that trained it


def load(assets: Optional[Path] = None) -> EmbeddedDefault:
    """The embedded default of the folder ``assets`` (default: `ASSETS`)."""
    assets = Path(ASSETS if assets is None else assets)
    path = assets / "default.json"
    if not path.exists():
        raise DrtFastError(f"no checkpoint given and the embedded default model is not installed "
                           f"({path} is missing); pass --model CKPT")
    with open(path) as f:
        spec = json.load(f)
    return EmbeddedDefault(model=str(assets / spec["model"]), data=str(assets / spec["data"]),
                           sigma=float(spec["sigma"]), skip=int(spec.get("skip", 1)),
                           max=spec.get("max"), grid=spec.get("grid"), recipe=spec.get("recipe", ""))
