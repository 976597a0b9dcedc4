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

One module a concern: `native` (drt-fast's file: save and read), `cohen` (Cohen/DRT
files), `load` (either, one or several files), `members` (rebuilding and checking members),
`files` (atomic writes, weights-only reads), `fit` (normalization resolution, checks against
the data), `summary` (``drt-fast info``).
"""
from .files import PathLike, atomic_torch_save, plain_config, safe_load
from .fit import check_fits, resolve_normalization, same_normalization
from .load import load_checkpoint, load_ensemble, load_members, open_checkpoints
from .native import FORMAT, VERSION, save_ensemble
from .summary import describe, describe_loaded

__all__ = ["FORMAT", "VERSION", "PathLike", "save_ensemble", "plain_config", "atomic_torch_save",
           "safe_load", "load_checkpoint", "load_ensemble", "load_members", "open_checkpoints",
           "resolve_normalization", "same_normalization", "check_fits", "describe",
           "describe_loaded"]
