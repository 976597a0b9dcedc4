"""Ensemble checkpoints: drt-fast's own file, and import of Cohen/DRT checkpoints.

A drt-fast ensemble file (``torch.save`` of plain containers, read back with
``torch.load(weights_only=True)``)::

    {"format": "drt-fast-ensemble", "version": 1,
     "arch": str, "dataset": str, "num_classes": int, "input_shape": [C, H, W],
     "normalization": {"means": [C floats], "sds": [C floats]},
     "members": [state_dict of Sequential(NormalizeLayer, model), ...],
     "weights": [M floats], "mode": str, "sigma": float | None, "train_config": dict}

A Cohen/DRT checkpoint is ``{"arch": str, "state_dict": ..., ["epoch", "optimizer"]}``
holding one ``Sequential(NormalizeLayer, model)`` whose NormalizeLayer kept its means/sds
out of the state dict, possibly inside ``DataParallel`` (``module.`` anywhere in the keys).
It imports as one member; the dataset (and so the normalization) is inferred from the
architecture unless given. The DRT code saves one such file per member: `load_members`
(or `load_checkpoint` with a list of paths) joins them into one ensemble.

Every member is rebuilt as ``with_normalization(create(arch, num_classes), means, sds)``
and its state dict loaded strictly, so a file that does not match its architecture never
loads silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from . import data, models
from .ensemble import Ensemble, as_ensemble
from .errors import DrtFastError, InvalidArgument, first_line
from .io import created_file_mode, sha256_file
from .models.normalize import NormalizeLayer

FORMAT = "drt-fast-ensemble"
VERSION = 1

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ save

def save_ensemble(path: PathLike, ensemble: nn.Module, *, arch: str, dataset: str,
                  num_classes: int, input_shape: Sequence[int] | None = None,
                  normalization=None, sigma: float | None = None,
                  train_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``ensemble`` (an `Ensemble`, or one module) as a drt-fast ensemble file.

    Members are either ``with_normalization(model, ...)`` (their NormalizeLayer is saved as
    is) or bare ``arch`` models (the NormalizeLayer is added from ``normalization``).
    ``input_shape`` defaults to the architecture's, ``normalization`` (``(means, sds)`` or
    ``{"means", "sds"}``) to the members' NormalizeLayer or else the dataset's. Every
    member is checked against ``arch`` before anything is written. The write is atomic
    (temporary file in the same folder, then ``os.replace``). Returns the path.
    """
    ensemble = as_ensemble(ensemble)
    input_shape = tuple(int(v) for v in (input_shape or models.input_shape(arch)))
    if len(input_shape) != 3:
        raise InvalidArgument(f"input_shape must be (C, H, W), got {input_shape}")
    means, sds = _normalization_of(ensemble, normalization, dataset)
    if len(means) != input_shape[0]:
        raise InvalidArgument(f"normalization has {len(means)} channels but input_shape "
                           f"{input_shape} has {input_shape[0]}")
    if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise InvalidArgument(f"sigma must be a positive number or None, got {sigma!r}")

    expected = _new_member(arch, num_classes, means, sds).state_dict()
    members = []
    for i, member in enumerate(ensemble.members):
        state = _member_state(member, means, sds, what=f"member {i}")
        _check_state_dict(state, expected, arch, num_classes, what=f"member {i}")
        members.append(state)

    payload = {
        "format": FORMAT, "version": VERSION,
        "arch": arch, "dataset": dataset, "num_classes": int(num_classes),
        "input_shape": list(input_shape),
        "normalization": {"means": list(means), "sds": list(sds)},
        "members": members,
        "weights": [float(w) for w in ensemble.weights.tolist()],
        "mode": ensemble.mode,
        "sigma": None if sigma is None else float(sigma),
        "train_config": plain_config(dict(train_config or {})),
    }
    return atomic_torch_save(payload, Path(path))


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


def _normalization_of(ensemble: Ensemble, normalization, dataset: str):
    """(means, sds) as tuples of floats, from the argument, the first member's
    NormalizeLayer, or the dataset, in that order."""
    if isinstance(normalization, Mapping):
        normalization = (normalization.get("means"), normalization.get("sds"))
    if normalization is None:
        first = ensemble.members[0]
        if isinstance(first, nn.Sequential) and isinstance(first[0], NormalizeLayer):
            normalization = (_floats(first[0].means), _floats(first[0].sds))
        else:
            normalization = data.normalization(dataset)
    try:
        means, sds = normalization
        means = tuple(float(v) for v in means)
        sds = tuple(float(v) for v in sds)
    except (TypeError, ValueError):
        raise InvalidArgument(f"normalization must be (means, sds), got {normalization!r}") from None
    if not means or len(means) != len(sds) or min(sds) <= 0:
        raise InvalidArgument(f"normalization needs equally many means and positive sds, got "
                           f"means={list(means)} sds={list(sds)}")
    return means, sds


def _member_state(member: nn.Module, means, sds, what: str) -> dict[str, torch.Tensor]:
    """CPU state dict in the ``Sequential(NormalizeLayer, model)`` layout."""
    if isinstance(member, nn.Sequential) and len(member) == 2 and isinstance(member[0], NormalizeLayer):
        own = (_floats(member[0].means), _floats(member[0].sds))
        if not (len(own[0]) == len(means) and all(
                math.isclose(a, b, rel_tol=1e-6) for a, b in zip(own[0] + own[1], means + sds))):
            raise DrtFastError(f"{what}'s NormalizeLayer has means {list(own[0])}, sds "
                               f"{list(own[1])}; the file would say {list(means)}, {list(sds)}")
        state = member.state_dict()
    else:
        state = {f"1.{k}": v for k, v in member.state_dict().items()}
        state["0.means"] = torch.tensor(means, dtype=torch.float32).view(-1, 1, 1)
        state["0.sds"] = torch.tensor(sds, dtype=torch.float32).view(-1, 1, 1)
    # clone: a view would save its whole underlying storage.
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


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


# ------------------------------------------------------------------------------ load

def load_checkpoint(path: PathLike | Sequence[PathLike], mode: str | None = None,
                  map_location="cpu", dataset: str | None = None):
    """Load a drt-fast ensemble file or a Cohen/DRT checkpoint (one member); a list of
    paths joins their members (see `load_members`).

    Returns ``(Ensemble in eval mode, meta)``; meta holds ``arch``, ``archs`` (one per
    member), ``dataset``, ``num_classes``, ``input_shape`` (C, H, W), ``normalization``
    ``(means, sds)``, ``sigma`` (None when unknown; for Cohen files read from a
    ``noise_<sigma>`` folder in the path when there is one), ``train_config``, ``format``
    (``"drt-fast"`` or ``"cohen"``), ``mode``, ``weights``, ``members`` (M), ``paths`` and
    ``sha256`` (of the file; with several files, of their hashes in order). ``mode``
    overrides the file's; ``dataset`` overrides the one a Cohen file's arch implies.
    """
    if isinstance(path, (list, tuple)):
        return load_members(path, mode=mode, map_location=map_location, dataset=dataset)
    parts, meta = _read_members(Path(path), map_location, dataset)
    ensemble = Ensemble(parts, mode=mode or meta["mode"], weights=meta["weights"])
    meta["mode"] = ensemble.mode
    return ensemble.eval(), meta


def load_ensemble(path: PathLike | Sequence[PathLike], mode: str | None = None,
                  map_location="cpu", dataset: str | None = None) -> Ensemble:
    """The public loader of docs/DESIGN.md section 4: `load_checkpoint`'s Ensemble, with its
    metadata dict attached as ``ensemble.meta``."""
    ensemble, meta = load_checkpoint(path, mode=mode, map_location=map_location, dataset=dataset)
    ensemble.meta = meta
    return ensemble


def load_members(paths: Sequence[PathLike], mode: str | None = None, weights=None,
                 map_location="cpu", dataset: str | None = None):
    """One ensemble from several checkpoint files (Cohen/DRT members, or drt-fast files),
    members in the order given. They must agree on classes, input shape and dataset.
    Weights: the argument, else each file's member weights (uniform for Cohen files)
    rescaled by its number of members, i.e. every member counts equally by default.
    Returns ``(Ensemble, meta)`` as `load_checkpoint`."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InvalidArgument("expected at least one checkpoint path, got none")
    members, metas = [], []
    for p in paths:
        parts, meta = _read_members(p, map_location, dataset)
        members += parts
        metas.append(meta)
    first = metas[0]
    for p, meta in zip(paths[1:], metas[1:]):
        for key in ("num_classes", "input_shape", "dataset"):
            if meta[key] != first[key]:
                raise DrtFastError(f"checkpoints disagree on {key}: {paths[0]} has "
                                   f"{first[key]}, {p} has {meta[key]}")
    if weights is None and len(metas) > 1:
        # Each file's weights sum to 1; scale by its member count so members count equally.
        weights = [w * m["members"] for m in metas for w in m["weights"]]
    elif weights is None:
        weights = first["weights"]
    ensemble = Ensemble(members, mode=mode or first["mode"], weights=weights)
    archs = [a for m in metas for a in m["archs"]]
    meta = dict(first)
    meta.update(
        arch=archs[0] if len(set(archs)) == 1 else ",".join(dict.fromkeys(archs)),
        archs=archs, mode=ensemble.mode, weights=ensemble.weights.tolist(),
        own_normalization=[own for m in metas for own in m["own_normalization"]], files=metas,
        members=len(members), paths=[str(p) for p in paths],
        format=first["format"] if len({m["format"] for m in metas}) == 1 else "mixed",
        sha256=first["sha256"] if len(metas) == 1 else hashlib.sha256(
            "".join(m["sha256"] for m in metas).encode()).hexdigest(),
        sigma=first["sigma"] if len({m["sigma"] for m in metas}) == 1 else None,
    )
    return ensemble.eval(), meta


def open_checkpoints(paths: Sequence[PathLike], mode: str | None = None, dataset: str | None = None):
    """`load_checkpoint` of the file(s) a user named (one path, or several member files):
    every failure, a missing file or one the loader cannot read, is one DrtFastError line.
    ``dataset`` is the data's name: a Cohen file's normalization follows it (an ``npz``
    states none of its own; see `resolve_normalization`)."""
    for path in paths:
        if not os.path.exists(path):
            raise DrtFastError(f"checkpoint {os.fspath(path)!r} does not exist")
        if os.path.isdir(path):
            raise DrtFastError(f"checkpoint {os.fspath(path)!r} is a directory, expected a file")
    target = os.fspath(paths[0]) if len(paths) == 1 else [os.fspath(p) for p in paths]
    try:
        return load_checkpoint(target, mode=mode, dataset=dataset if dataset != "npz" else None)
    except DrtFastError:
        raise
    except Exception as e:  # a format the loader did not anticipate is still the user's file
        raise DrtFastError(f"cannot load checkpoint {target!r}: {first_line(e)}") from None


def resolve_normalization(ensemble: Ensemble, meta: dict, given=None, data=None) -> str:
    """Settle the input normalization of a loaded ensemble, the way users of Cohen's code
    expect: a checkpoint's own normalization wins; a member that carries none (a Cohen
    file, whose NormalizeLayer kept its means/sds out of the state dict) takes ``given``
    (``(means, sds)`` the user set explicitly), else ``data`` (the normalization the data
    states: a named dataset's, an .npz file's ``means``/``sds``), else keeps the one of the
    dataset its arch implies (what `load_checkpoint` gave it).

    ``given`` that differs from a member's own normalization is a conflict (DrtFastError).
    Updates ``meta["normalization"]`` and returns where it came from: ``"checkpoint"``,
    ``"given"``, ``"data"`` or ``"arch"`` (members of several sources: e.g. ``"checkpoint,
    given"``).
    """
    own = list(meta.get("own_normalization") or [True] * len(ensemble.members))
    sources = []
    for member, has_own in zip(ensemble.members, own):
        layer = member[0] if isinstance(member, nn.Sequential) and len(member) else None
        if not isinstance(layer, NormalizeLayer):
            raise DrtFastError(f"{_name(meta)}: a member has no NormalizeLayer to normalize with")
        current = (_floats(layer.means), _floats(layer.sds))
        if has_own:
            if given is not None and not same_normalization(current, given):
                raise DrtFastError(f"{_name(meta)} carries its own normalization (means "
                                   f"{list(current[0])}, sds {list(current[1])}); --means/--sds set it "
                                   f"only for a checkpoint that has none")
            sources.append("checkpoint")
            continue
        chosen, source = (given, "given") if given is not None else (data, "data") if data is not None \
            else (None, "arch")
        if chosen is not None:
            means, sds = (tuple(float(v) for v in chosen[0]), tuple(float(v) for v in chosen[1]))
            if len(means) != layer.means.numel() or len(sds) != len(means) or min(sds) <= 0:
                what = "--means/--sds" if source == "given" else "the data's normalization"
                raise DrtFastError(f"{what} must hold {layer.means.numel()} values each (sds > 0) for "
                                   f"{_name(meta)}, got means {list(means)}, sds {list(sds)}")
            with torch.no_grad():
                layer.means.copy_(torch.tensor(means).view_as(layer.means))
                layer.sds.copy_(torch.tensor(sds).view_as(layer.sds))
        sources.append(source)
    first = ensemble.members[0][0]
    meta["normalization"] = (_floats(first.means), _floats(first.sds))
    return ", ".join(dict.fromkeys(sources))


def same_normalization(a, b) -> bool:
    """Whether two ``(means, sds)`` are the same, up to float32 rounding."""
    return len(a[0]) == len(b[0]) and len(a[1]) == len(b[1]) and all(
        math.isclose(float(x), float(y), rel_tol=1e-5, abs_tol=1e-7)
        for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]]))


def _name(meta: Mapping) -> str:
    paths = meta.get("paths") or ["checkpoint"]
    return f"checkpoint {paths[0]}" if len(paths) == 1 else f"checkpoints {', '.join(paths)}"


def _read_members(path: Path, map_location, dataset: str | None):
    """(list of member modules, meta) of one file."""
    checkpoint, sha = _torch_load(path, map_location)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        parts, meta = _from_drt_fast(checkpoint, path)
    elif isinstance(checkpoint, dict) and "arch" in checkpoint and "state_dict" in checkpoint:
        parts, meta = _from_cohen(checkpoint, path, dataset)
    elif isinstance(checkpoint, dict) and checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        # torch.save(model.state_dict()): name its size, not its hundreds of keys
        raise DrtFastError(f"{path} is a bare state dict ({len(checkpoint)} tensors, e.g. "
                           f"{_few(list(map(str, checkpoint)))}) with no architecture; save it "
                           f"as {{'arch': NAME, 'state_dict': ...}} (arch one of "
                           f"{', '.join(models.names())})")
    else:
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        if isinstance(keys, list) and len(keys) > 10:
            keys = f"{keys[:10]} and {len(keys) - 10} more keys"
        raise DrtFastError(f"{path} is neither a drt-fast ensemble file nor a Cohen/DRT "
                           f"checkpoint ({{'arch', 'state_dict'}}); it holds {keys}")
    meta.update(sha256=sha, paths=[str(path)], members=len(parts))
    return parts, meta


def _torch_load(path: Path, map_location):
    if not path.exists():
        raise DrtFastError(f"checkpoint {path.name} not found in {path.parent.resolve()}")
    if not path.is_file():
        raise DrtFastError(f"checkpoint {path} is not a file")
    sha = sha256_file(path)
    return safe_load(path, map_location, "checkpoint"), sha


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


def _from_drt_fast(ckpt: dict, path: Path):
    version = ckpt.get("version")
    if version != VERSION:
        raise DrtFastError(f"{path}: drt-fast ensemble file version {version!r}; this "
                           f"drt-fast reads version {VERSION}")
    try:
        arch, dataset = str(ckpt["arch"]), str(ckpt["dataset"])
        num_classes = int(ckpt["num_classes"])
        input_shape = tuple(int(v) for v in ckpt["input_shape"])
        means = tuple(float(v) for v in ckpt["normalization"]["means"])
        sds = tuple(float(v) for v in ckpt["normalization"]["sds"])
        states = list(ckpt["members"])
        weights = [float(w) for w in ckpt["weights"]]
        mode = str(ckpt["mode"])
        sigma = None if ckpt.get("sigma") is None else float(ckpt["sigma"])
        train_config = dict(ckpt.get("train_config") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise DrtFastError(f"{path}: malformed drt-fast ensemble file ({type(exc).__name__}: "
                           f"{exc})") from None
    if not states:
        raise DrtFastError(f"{path}: the ensemble file holds no members")
    if len(weights) != len(states):
        raise DrtFastError(f"{path}: {len(states)} members but {len(weights)} weights")
    if len(input_shape) != 3 or input_shape[0] != len(means):
        raise DrtFastError(f"{path}: input_shape {list(input_shape)} does not match the "
                           f"{len(means)}-channel normalization")
    parts = [_build_member(state, arch, num_classes, means, sds, f"{path} member {i}")
             for i, state in enumerate(states)]
    meta = dict(arch=arch, archs=[arch] * len(parts), dataset=dataset,
                num_classes=num_classes, input_shape=input_shape,
                normalization=(means, sds), own_normalization=[True] * len(parts), sigma=sigma,
                train_config=train_config, format="drt-fast", version=VERSION, mode=mode,
                weights=weights)
    return parts, meta


def _from_cohen(ckpt: dict, path: Path, dataset: str | None):
    arch = str(ckpt["arch"])
    dataset = dataset or models.default_dataset(arch)   # also rejects unknown archs
    means, sds = data.normalization(dataset)
    channels = models.input_shape(arch)[0]
    if len(means) != channels:
        raise DrtFastError(f"{path}: {arch} takes {channels}-channel inputs but dataset "
                           f"{dataset!r} has {len(means)} channel(s)")
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DrtFastError(f"{path}: 'state_dict' must map names to tensors")
    state = _cohen_layout(state)
    num_classes = _classifier_outputs(state, arch, path)
    own = "0.means" in state and "0.sds" in state      # codebases whose NormalizeLayer has buffers
    # Cohen's NormalizeLayer kept means/sds as attributes: fill them from the dataset.
    state.setdefault("0.means", torch.tensor(means, dtype=torch.float32).view(-1, 1, 1))
    state.setdefault("0.sds", torch.tensor(sds, dtype=torch.float32).view(-1, 1, 1))
    member = _build_member(state, arch, num_classes, means, sds, str(path))
    means, sds = _floats(member[0].means), _floats(member[0].sds)
    meta = dict(arch=arch, archs=[arch], dataset=dataset, num_classes=num_classes,
                input_shape=models.input_shape(arch), normalization=(means, sds),
                own_normalization=[own], sigma=_sigma_from_path(path), format="cohen",
                version=None, mode="we",
                weights=[1.0],
                train_config={k: ckpt[k] for k in ("epoch",) if k in ckpt})
    return [member], meta


def _cohen_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module`` (DataParallel/DDP) wherever it sits in a key; a bare model's state
    dict (no ``0.``/``1.`` prefix) is put under ``1.``."""
    out = {".".join(p for p in key.split(".") if p != "module"): v for key, v in state.items()}
    if not any(k.startswith(("0.", "1.")) for k in out):
        out = {f"1.{k}": v for k, v in out.items()}
    for key in ("0.means", "0.sds"):   # codebases whose NormalizeLayer has [C] buffers
        if key in out and out[key].dim() == 1:
            out[key] = out[key].view(-1, 1, 1)
    return out


def _classifier_outputs(state: Mapping[str, torch.Tensor], arch: str, path: Path) -> int:
    """num_classes = rows of the architecture's final linear layer in ``state``."""
    key = f"1.{models.classifier_name(arch)}.weight"
    if key not in state or state[key].dim() != 2:
        raise DrtFastError(f"{path}: state dict has no 2-d {key!r} (the classifier of "
                           f"{arch}); is the arch right?")
    return int(state[key].shape[0])


def _sigma_from_path(path: Path) -> float | None:
    """Cohen's released models live in ``.../noise_0.25/checkpoint.pth.tar``."""
    for part in reversed(path.resolve().parts):
        match = re.fullmatch(r"noise_(\d+(?:\.\d+)?)", part)
        if match:
            return float(match.group(1))
    return None


def _floats(buffer: torch.Tensor) -> tuple[float, ...]:
    """A float32 buffer as the shortest decimals that round-trip (0.3052, not
    0.30520001053810120)."""
    return tuple(float(str(v)) for v in buffer.detach().cpu().flatten().numpy())


def _check_state_dict(state, expected, arch: str, num_classes: int, what: str) -> None:
    """DrtFastError unless ``state`` has exactly the keys and shapes of ``expected`` (the
    state dict of a fresh ``arch`` member), with a message naming the differences."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_few(wrong)}")
    if problems:
        raise DrtFastError(f"{what} does not match architecture {arch} with {num_classes} "
                           f"classes: {'; '.join(problems)}")


def _few(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _new_member(arch: str, num_classes: int, means, sds) -> nn.Sequential:
    return models.with_normalization(models.create(arch, num_classes), means, sds)


def _build_member(state, arch, num_classes, means, sds, what: str) -> nn.Sequential:
    """A member rebuilt from ``state``, checked key by key and loaded strictly."""
    if not isinstance(state, Mapping):
        raise DrtFastError(f"{what}: expected a state dict, got {type(state).__name__}")
    member = _new_member(arch, num_classes, means, sds)
    expected = member.state_dict()
    # BatchNorm's num_batches_tracked (torch >= 0.4.1) is not in older checkpoints, Cohen's
    # released models among them; it plays no part in eval mode: keep the fresh member's.
    state = {**{k: v for k, v in expected.items() if k.endswith(".num_batches_tracked")}, **state}
    _check_state_dict(state, expected, arch, num_classes, what)
    member.load_state_dict(state, strict=True)   # copies, casting to the member's float32
    return member.eval()


# -------------------------------------------------------------------------- describe

def describe(path: PathLike | Sequence[PathLike]) -> str:
    """A human-readable summary of a checkpoint (or member files), for ``drt-fast info``."""
    return describe_loaded(*load_checkpoint(path))


def describe_loaded(ensemble: Ensemble, meta: Mapping) -> str:
    """`describe` of an ensemble `load_checkpoint` gave, with its ``meta``. Several member
    files: the ensemble, then each file's normalization, sigma and training."""
    counts = [sum(p.numel() for p in m.parameters()) for m in ensemble.members]
    shape = "x".join(str(v) for v in meta["input_shape"])
    files = meta.get("files") or [meta]
    lines = [
        f"file           {', '.join(meta['paths'])}",
        f"sha256         {meta['sha256']}",
        f"format         {meta['format']}" + (f" (version {meta['version']})" if meta.get("version") else ""),
        f"arch           {meta['arch']}",
        f"dataset        {meta['dataset']}",
        f"classes        {meta['num_classes']}",
        f"input shape    {shape}",
    ]
    if len(files) == 1:
        lines.append(_normalization_line(meta))
    lines.append(f"members        {meta['members']}")
    for i, (arch, count) in enumerate(zip(meta["archs"], counts)):
        lines.append(f"  member {i}     {arch}, {count:,} parameters")
    lines += [
        f"weights        {[round(w, 4) for w in meta['weights']]}",
        f"mode           {meta['mode']}",
    ]
    if len(files) == 1:
        lines.append(_sigma_line(meta))
        lines += _describe_training(meta.get("train_config") or {})
        return "\n".join(lines)
    first = 0
    for f in files:           # each member file's own record
        span = f"member {first}" if f["members"] == 1 else f"members {first}-{first + f['members'] - 1}"
        first += f["members"]
        lines.append(f"{span + ':':<15}{', '.join(f['paths'])} ({f['format']}, sha256 {f['sha256'][:12]})")
        lines += ["  " + line for line in [_normalization_line(f), _sigma_line(f),
                                             *_describe_training(f.get("train_config") or {})]]
    return "\n".join(lines)


def _normalization_line(meta: Mapping) -> str:
    means, sds = meta["normalization"]
    own = meta.get("own_normalization") or [True]
    note = "" if all(own) else " (not in the file: its arch's dataset's, unless the data or --means/--sds set one)"
    return f"normalization  means {list(means)}, sds {list(sds)}{note}"


def _sigma_line(meta: Mapping) -> str:
    return (f"sigma          {'unknown' if meta['sigma'] is None else meta['sigma']}"
            + (" (from the file's noise_<sigma> folder)" if meta["sigma"] is not None
               and meta.get("format") == "cohen" else ""))


# What a `drt-fast train` configuration says about the weights (the rest is plumbing:
# paths, verbosity, device), and the settings only some trainers use.
_TRAINING_SHOWN = ("trainer", "rho1", "rho2", "gd_norm", "m", "eps", "steps", "eps_warmup", "epochs",
                   "lr", "lr_schedule", "batch", "weight_decay", "seed", "init", "world_size")
_TRAINER_ONLY = {"rho1": "drt", "rho2": "drt", "gd_norm": "drt", "eps": "smoothadv",
                 "steps": "smoothadv", "eps_warmup": "smoothadv"}


def _describe_training(config: Mapping) -> list[str]:
    """The ``training`` (and ``command``) lines of `describe`."""
    if not config:
        return ["training       (no configuration recorded)"]
    trainer = str(config.get("trainer", ""))
    if not trainer:                                # not drt-fast's (e.g. a Cohen file's epoch)
        return ["training       " + ", ".join(f"{k}={v}" for k, v in config.items())]
    shown = []
    for key in _TRAINING_SHOWN:
        value = config.get(key)
        if value is None or (key in _TRAINER_ONLY and _TRAINER_ONLY[key] not in trainer):
            continue
        if key == "epochs" and config.get("epochs_done") not in (None, value):
            value = f"{value} ({config['epochs_done']} done)"
        if key == "world_size" and value == 1:
            continue
        shown.append(f"{key}={value}")
    lines = ["training       " + ", ".join(shown)]
    if config.get("command"):
        lines.append(f"command        {config['command']}")
    return lines


def check_fits(ensemble, meta: Mapping, ds, model_path, dataset_name: str, device) -> int:
    """Check that the checkpoint's classes and input shape match the data ``ds`` (a
    `data.Dataset`), with one clean forward pass of its first input; returns the number
    of classes to smooth over. That is the data's, or the model's where the data's count
    is only a lower bound (`data.Dataset.classes_from_labels`) and the model has more."""
    shape = tuple(ds.x.shape[1:])
    data_classes = ds.num_classes

    def fits(model_classes: int) -> bool:
        return model_classes == data_classes or (ds.classes_from_labels and model_classes > data_classes)

    def refuse(what: str, model_classes: int):
        hint = (" (its labels; an npz entry num_classes sets the count)"
                if ds.classes_from_labels else "")
        if model_classes > data_classes and dataset_name == "imagenet":
            hint += (": an image folder's labels are the positions of its sorted class folders, so "
                     "to certify some of the model's classes keep all its class folders (empty "
                     "ones count), or write an .npz whose y holds the model's class indices, with "
                     f"num_classes={model_classes}")
        elif model_classes > data_classes:
            hint += (f": to certify some of the model's classes, write an .npz whose y holds the "
                     f"model's class indices, with num_classes={model_classes}")
        raise DrtFastError(f"checkpoint {model_path!r} {what} classes, the {dataset_name} data has "
                           f"{data_classes}{hint}")

    if meta.get("num_classes") is not None and not fits(int(meta["num_classes"])):
        refuse(f"has {meta['num_classes']}", int(meta["num_classes"]))
    expected = tuple(meta["input_shape"]) if meta.get("input_shape") is not None else None
    if expected is not None and expected != shape:
        # x written as N, H, W, C (numpy/PIL/Keras order) reads as C = H
        hwc = len(shape) == 3 and shape == (*expected[1:], expected[0])
        raise DrtFastError(f"checkpoint {model_path!r} takes inputs of shape {expected}, "
                           f"the {dataset_name} data has shape {shape}"
                           + ("; if x is N, H, W, C, transpose it to N, C, H, W "
                              "(x.transpose(0, 3, 1, 2))" if hwc else ""))
    try:
        with torch.inference_mode():
            logits = ensemble(ds.x[:1].to(device=device, dtype=torch.float32))
    except RuntimeError as e:
        raise DrtFastError(f"checkpoint {model_path!r} cannot take the {dataset_name} inputs of shape "
                           f"{shape}: {first_line(e)}") from None
    if not fits(logits.shape[-1]):          # logits: [M, 1, K]
        refuse(f"outputs {logits.shape[-1]}", int(logits.shape[-1]))
    return int(logits.shape[-1])
