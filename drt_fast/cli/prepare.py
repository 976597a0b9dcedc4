"""Preparing a certify/predict `Job`: the numbers checked before anything loads, then the
model, the data, the noise level, the inputs chosen, the normalization, the sidecar's
configuration and the `SmoothedClassifier` (`build_smoothed`)."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from .. import __version__, embedded, options, validate
from ..errors import DrtFastError, first_line
from .job import DATASETS, Job

_NO_MODEL = "no --model given: the embedded default is a digits model (8x8 inputs, 10 classes); pass --model"

# Certify packs the draws of several inputs into one batch (certify_many) when n is small;
# this caps a group so that rows (and the progress bar) still advance often.
_MAX_GROUP = 32
# Sequential certification (--radii): inputs per certify_radii call, in batch slots (and at
# most _SEQUENTIAL_MAX_GROUP unless a batch has more slots). On the embedded default, 8
# slots' worth keeps batches 75 % full, against 50 % at 32 inputs (docs/internals.md).
_SEQUENTIAL_FILL = 8
_SEQUENTIAL_MAX_GROUP = 256


def check_numbers(args, task: str) -> None:
    """Refuse bad numbers before loading anything."""
    if task == "certify":
        validate.positive_int(args.n0, "--n0")
    validate.positive_int(args.n, "--n")
    validate.alpha(args.alpha, "--alpha")
    if args.sigma is not None:
        validate.sigma(args.sigma, "--sigma")
    validate.positive_int(args.batch, "--batch")
    if args.grid is not None:
        if args.noise != "discrete":
            raise DrtFastError("--grid is the pixel grid of --noise discrete; it has no use with --noise gaussian")
        validate.grid(args.grid, "--grid")
    for flag, value in (("--skip", args.skip), ("--max", args.max)):
        if value is not None:
            validate.positive_int(value, flag)
    validate.seed(args.seed, "--seed")
    options.normalization(args)
    flags = "--n0 + --n" if task == "certify" else "--n"
    validate.draw_range(0, args.n + (args.n0 if task == "certify" else 0),
                        what=f"an input's draws ({flags} of them)")
    if task == "predict" and (args.radii is not None or args.futility is not None):
        raise DrtFastError(f"{'--radii' if args.radii is not None else '--futility'} is certify's (sequential "
                           f"certification at grid radii); predict certifies no radius")
    if args.futility is not None:
        if args.radii is None:
            raise DrtFastError("--futility sets a test of sequential certification: pass --radii too")
        validate.alpha(args.futility, "--futility", zero=True)
    if args.resume and not args.out:
        raise DrtFastError("--resume needs --out (the results file to continue)")
    if args.out:
        from ..io import check_writable

        check_writable(args.out, args.resume)


@dataclass
class _Model:
    """The checkpoint(s) of --model, or of the embedded default (``default``) without it."""

    ensemble: object  # Ensemble
    meta: dict  # what the checkpoint says (checkpoint.open_checkpoints)
    paths: list  # its files
    default: object  # embedded.Default when no --model was given, else None

    @property
    def shown(self):
        """The model as error messages show it."""
        return _one_or_many(self.paths)


@dataclass
class _Inputs:
    """The inputs: a dataset of `DATASETS` read from ``folder``."""

    name: str
    folder: str | None  # --data-dir, or the embedded default's test file
    ds: object  # data.Dataset
    keys: list  # [N] dataset index of each input (an npz may hold a subset): TSV idx and noise key


def prepare(args, task: str, device) -> Job:
    """Load model and data, check they fit together, choose the inputs, build the sidecar."""
    import torch

    model = _open_model(args)
    inputs = _open_inputs(args, model)
    sigma = _sigma(args, model)
    skip, max_inputs = _subset(args, model)
    num_classes, normalization = _fit(args, model, inputs, device)
    positions = list(range(0, len(inputs.keys), skip))
    if max_inputs is not None:
        positions = positions[:max_inputs]
    grid = _noise_grid(args, model, inputs, positions) if args.noise == "discrete" else None
    config = _sidecar_config(args, task, model, inputs, sigma=sigma, skip=skip, max_inputs=max_inputs,
                             normalization=normalization, device=device, grid=grid)
    if device.type == "cuda":
        # Fixed input shapes batch after batch: let cuDNN pick its fastest convolutions once.
        torch.backends.cudnn.benchmark = True
    smoothed = build_smoothed(args, model.ensemble, num_classes, sigma, grid)
    draws = args.n0 + args.n if task == "certify" else args.n
    group = max(1, min(_MAX_GROUP, args.batch // draws))
    if args.radii is not None:
        group = _check_sequential(args, config, smoothed.radius_sigma)
    # Build the members' rewrites now: a --fuse that cannot be honored fails before any
    # output, and the first row's time is not charged with the rewrite.
    x = inputs.ds.x
    smoothed.prepare(x[:1])
    channels_last = smoothed.engine.draws_channels_last(x[:1].to(device))
    y = [int(v) for v in torch.as_tensor(inputs.ds.y).tolist()]
    return Job(task, smoothed, x, y, inputs.keys, positions, config, draws, group, channels_last)


def build_smoothed(args, ensemble, num_classes: int, sigma: float, grid=None):
    """The `SmoothedClassifier` of ``ensemble`` (on its device) with the command line's
    smoothing and engine settings (``grid``: the pixels' grid of --noise discrete)."""
    from ..smoothing import SmoothedClassifier

    return SmoothedClassifier(ensemble, num_classes=num_classes, sigma=sigma, seed=args.seed,
                              precision=args.precision, channels_last=args.channels_last,
                              fuse=args.fuse, cuda_graphs=args.cuda_graphs, noise=args.noise,
                              grid=grid or 255)


def _noise_grid(args, model: _Model, inputs: _Inputs, positions: list) -> int:
    """--noise discrete: the pixels' grid (--grid, else the data's, else the embedded
    default's for its own test inputs), with the selected inputs checked to lie on it."""
    from ..data import LazyImages
    from ..ops import first_off_grid

    embedded = model.default.grid if model.default is not None and args.data_dir is None else None
    grid = args.grid or inputs.ds.grid or embedded
    if grid is None:
        raise DrtFastError("--noise discrete needs the pixels' grid, which this data does not say: "
                           "pass --grid Q (the pixels are k/Q; 255 for 8-bit images)")
    if not isinstance(inputs.ds.x, LazyImages):   # image folders decode 8-bit pixels: always on 1/255
        selected = inputs.ds.x[positions]
        flat = first_off_grid(selected, grid)
        if flat is not None:
            per_input = selected[0].numel()
            value = float(selected.reshape(-1)[flat])
            raise DrtFastError(f"--noise discrete: input idx {inputs.keys[positions[flat // per_input]]} is not "
                               f"on the grid of step 1/{grid} (its pixel {flat % per_input} is {value!r}, "
                               f"{value * grid:.6g} steps); pass --grid with the data's own grid or use "
                               f"--noise gaussian")
    return grid


def _open_model(args) -> _Model:
    """--model's checkpoint(s), else the embedded default's (which only reads digits-shaped data)."""
    from .. import checkpoint

    default = embedded.load() if args.model is None else None
    if default is not None and (args.dataset not in (None, "digits", "npz")
                                or (args.data_dir is not None and os.path.isdir(args.data_dir))):
        raise DrtFastError(_NO_MODEL)
    paths = [default.model] if default else args.model
    ensemble, meta = checkpoint.open_checkpoints(paths, mode=args.mode, dataset=args.dataset)
    return _Model(ensemble, meta or {}, paths, default)


def _open_inputs(args, model: _Model) -> _Inputs:
    """The data: explicit --dataset, else the embedded default's test file, else the checkpoint's."""
    from .. import data

    default, meta = model.default, model.meta
    if args.dataset is not None:
        name, folder = args.dataset, args.data_dir
    elif default is not None:
        name, folder = "npz", args.data_dir or default.data
    elif meta.get("dataset"):
        name, folder = meta["dataset"], args.data_dir
    else:
        raise DrtFastError(f"checkpoint {model.shown!r} does not say which dataset it was trained on; "
                           f"pass --dataset ({'|'.join(DATASETS)})")
    if name not in DATASETS:
        raise DrtFastError(f"unknown dataset {name!r} (from the checkpoint); "
                           f"expected one of {', '.join(DATASETS)}: pass --dataset")
    if name == "npz" and folder is None:
        raise DrtFastError("--dataset npz needs --data-dir FILE.npz")
    if name == "npz" and args.split != "test":
        the_default = args.dataset is None and default is not None and args.data_dir is None
        raise DrtFastError(f"--split {args.split}: an .npz file ({'the embedded default' if the_default else folder}) "
                           f"is one set of inputs, with no splits"
                           + ("; for the digits training split pass --dataset digits --split train"
                              if the_default else ""))
    try:
        ds = data.load(name, split=args.split, data_dir=folder)
    except DrtFastError:
        raise
    except Exception as e:
        raise DrtFastError(f"cannot read the {name} data at {folder!r}: {first_line(e)}") from None
    return _Inputs(name, folder, ds, [int(k) for k in ds.idx.tolist()])


def _sigma(args, model: _Model) -> float:
    """--sigma, else the embedded default's, else the checkpoint's training sigma."""
    sigma = args.sigma
    if sigma is None:
        sigma = model.default.sigma if model.default else model.meta.get("sigma")
    if sigma is None:
        raise DrtFastError(f"checkpoint {model.shown!r} has no training sigma; pass --sigma")
    return float(sigma)


def _subset(args, model: _Model) -> tuple:
    """(skip, max): --skip and --max, else the embedded default's subset of its own test
    inputs (not of data the user names), else every input."""
    subset = model.default if model.default is not None and args.dataset is None and args.data_dir is None else None
    skip = args.skip if args.skip is not None else (subset.skip if subset else 1)
    max_inputs = args.max if args.max is not None else (subset.max if subset else None)
    return skip, max_inputs


def _fit(args, model: _Model, inputs: _Inputs, device) -> tuple:
    """Settle the ensemble's normalization, move it to ``device`` and check that it fits the
    data; returns (number of classes, where the normalization came from)."""
    from .. import checkpoint

    # A checkpoint's own normalization wins; --means/--sds, else the data's, fill in one that has none.
    source = checkpoint.resolve_normalization(model.ensemble, model.meta, options.normalization(args),
                                              inputs.ds.normalization if inputs.ds.own_normalization else None)
    model.ensemble = model.ensemble.to(device).eval()
    try:
        num_classes = checkpoint.check_fits(model.ensemble, model.meta, inputs.ds, model.shown, inputs.name, device)
    except DrtFastError as e:
        if model.default is None:
            raise
        raise DrtFastError(f"{_NO_MODEL} ({e})") from None
    return num_classes, source


def _sidecar_config(args, task: str, model: _Model, inputs: _Inputs, *, sigma: float, skip: int,
                    max_inputs: int | None, normalization: str, device, grid=None) -> dict:
    """The sidecar's top level: what determines the rows (`io.RESUME_KEYS`), then what the
    reader should know (paths, the command, settings, versions, the device)."""
    import torch

    from .. import data

    meta = model.meta
    return {
        "task": task,
        "command": "drt-fast " + shlex.join(args.argv),
        "model": _one_or_many([os.path.abspath(p) for p in model.paths]),
        "model_sha256": meta["sha256"],
        "dataset": inputs.name,
        "data": os.path.abspath(inputs.folder) if inputs.folder else None,
        "data_sha256": data.fingerprint(inputs.ds),
        "split": args.split,
        "sigma": sigma,
        "noise": args.noise,
        "grid": grid,
        "n0": args.n0 if task == "certify" else None,
        "n": args.n,
        "alpha": args.alpha,
        "seed": args.seed,
        "mode": args.mode or getattr(model.ensemble, "mode", None) or meta.get("mode"),
        "normalization": {"means": list(meta["normalization"][0]), "sds": list(meta["normalization"][1])},
        "normalization_source": options.describe_normalization(
            normalization, meta, os.path.basename(inputs.folder) if inputs.name == "npz" else inputs.name),
        "precision": args.precision,
        "certification": ("sequential" if args.radii is not None else "fixed-n") if task == "certify" else None,
        "radii": None,             # the grid, checked by _check_sequential
        "futility": None,
        "fuse": _auto_on_off(args.fuse),
        "cuda_graphs": _auto_on_off(args.cuda_graphs),
        "channels_last": _auto_on_off(args.channels_last),
        "batch": args.batch,
        "skip": skip,
        "max": max_inputs,
        "drt_fast_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
    }


def _auto_on_off(flag) -> str:
    """A --flag/--no-flag left out (None), given, or negated, as the sidecar says it."""
    return {None: "auto", True: "on", False: "off"}[flag]


def _check_sequential(args, config: dict, sigma: float) -> int:
    """Check --radii against the noise level (``sigma``: the one radii are computed at) and
    record the grid and the futility level in ``config``; returns the inputs per call."""
    from .. import sequential

    try:
        radii = sequential.check_radii(args.radii, sigma, args.n, args.alpha, name="--radii")
    except DrtFastError as e:
        raise DrtFastError(str(e).replace("with n_max = ", "with --n ")) from None
    config["radii"] = list(radii)
    config["futility"] = sequential.FUTILITY if args.futility is None else float(args.futility)
    # A call refills the slots of inputs that stop with inputs still pending, but its last
    # inputs run in a thinning batch: many inputs a call keep batches full, few keep rows
    # flowing (and a killed run loses less). Each slot takes STEP draws a batch.
    slots = max(1, args.batch // min(sequential.STEP, args.batch))
    return min(slots * _SEQUENTIAL_FILL, max(slots, _SEQUENTIAL_MAX_GROUP))


def _one_or_many(paths: list):
    """A single path as itself, several as the list (checkpoint.load_checkpoint takes both)."""
    return paths[0] if len(paths) == 1 else list(paths)
