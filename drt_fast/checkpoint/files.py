"""Torch files as drt-fast writes and reads them: atomic writes, weights-only reads."""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Union

import torch

from ..errors import DrtFastError
from ..io import created_file_mode

PathLike = Union[str, os.PathLike]


def atomic_torch_save(payload: dict, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    a reader (or a crash) never sees half a file. Errors are DrtFastErrors."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DrtFastError(f"cannot write checkpoint {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DrtFastError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, created_file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise DrtFastError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
        raise
    return path


def plain_config(value):
    """``value`` with every ``os.PathLike`` (a ``pathlib.Path`` given to the Python API) made
    a str, through nested dicts, lists and tuples: a weights-only load cannot rebuild a Path,
    so a file holding one could never be read back."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_config(v) for v in value)
    return value


def _safe_globals() -> list:
    """Harmless classes that research checkpoints often hold beside their tensors (the
    training script's argparse.Namespace, numpy scalars such as a best accuracy), which a
    weights-only load may build: none of them runs code when unpickled."""
    import argparse

    import numpy as np

    allowed = [argparse.Namespace, np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(importlib.import_module(module).scalar)
            break
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)           # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def safe_load(path, map_location, what: str):
    """``torch.load(path, weights_only=True)`` (plus `_safe_globals`); any failure is one
    DrtFastError line that says what is wrong with the file ``what`` (e.g. "checkpoint")."""
    try:
        context = torch.serialization.safe_globals(_safe_globals())
    except AttributeError:                          # torch < 2.5: weights-only defaults only
        context = contextlib.nullcontext()
    try:
        with context:
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:   # torch raises many types for truncated/foreign files
        text = str(exc)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsupported:
            reason = (f"it holds a {unsupported.group(1)} object; drt-fast unpickles only "
                      f"tensors and plain containers (weights_only), so re-save it without it")
        else:
            reason = "corrupt, truncated or not a torch file"
        raise DrtFastError(f"cannot read {what} {path}: {reason}") from None
