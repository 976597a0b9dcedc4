"""``drt-fast train`` and ``drt-fast diagnose``: parse, call drt_fast.train, print."""
from __future__ import annotations

import os
import shlex
import sys

from .. import options, validate
from ..errors import DrtFastError, first_line
from .losses import GD_NORMS
from .inputs import AUGMENTS
from .config import LR_SCHEDULES, TRAINERS, TrainConfig


def register(subparsers) -> None:
    """Add the ``train`` and ``diagnose`` sub-commands to the ``drt-fast`` parser."""
    _add_train(subparsers)
    _add_diagnose(subparsers)


def _add_train(subparsers) -> None:
    """``drt-fast train``: one add_argument a flag, in the order ``-h`` lists them."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train an ensemble: Gaussian, SmoothAdv, DRT, DRT-SmoothAdv",
        description="Train M members jointly; loss = sum_i CE_i (+ rho1*GD - rho2*CM for DRT) on "
                    "noisy inputs. Writes a drt-fast ensemble checkpoint after every epoch.")
    # --dataset, --arch and --members default to None: what an --init checkpoint fixes fills them.
    p.add_argument("--dataset", help=f"dataset name (default: the --init checkpoint's, else {d.dataset})")
    p.add_argument("--data-dir", metavar="D", help="dataset folder (for npz: the .npz file)")
    p.add_argument("--arch", help=f"member architecture (default: the --init checkpoint's, else {d.arch})")
    p.add_argument("--members", type=int,
                   help=f"ensemble size (default: the --init checkpoint's, else {d.members})")
    p.add_argument("--sigma", type=float, required=True, help="training noise level, pixels")
    p.add_argument("--trainer", choices=TRAINERS, default=d.trainer, help=f"default: {d.trainer}")
    # The trainer-specific flags default to None here, so that one given to a trainer that
    # does not use it is refused (run_train) rather than silently ignored.
    p.add_argument("--rho1", type=float, help="DRT: weight of GD (default: 0)")
    p.add_argument("--rho2", type=float, help="DRT: weight of CM (default: 0)")
    p.add_argument("--gd-norm", choices=GD_NORMS,
                   help="DRT: GD as ||g_i+g_j|| (l2, the paper; default) or its square (sq, the "
                        "public code)")
    p.add_argument("--m", type=int, default=d.m, help="noise vectors per input (default: 1)")
    p.add_argument("--eps", type=float, help="SmoothAdv L2 radius, pixels (default: 0.25)")
    p.add_argument("--steps", type=int, help="SmoothAdv PGD steps (default: 1)")
    p.add_argument("--eps-warmup", type=int, metavar="EPOCHS",
                   help="SmoothAdv: grow --eps linearly over the first EPOCHS epochs, as Salman "
                        "et al.'s --warmup (default: 0, the full radius from the start)")
    p.add_argument("--augment", choices=AUGMENTS, default=d.augment,
                   help="data augmentation, as Cohen et al.'s train.py: crop-flip (pad 4, random "
                        "crop, flip; cifar10's default), resized-crop-flip (random 8-100%% crop "
                        "resized to 224, flip; imagenet's default), none (the other datasets' "
                        "default); auto picks the dataset's (default: auto)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes decoding image folders (imagenet) during training; 0 decodes "
                        "in the main process (default: up to 8, the cores shared among ranks)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default: {d.epochs}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"initial SGD learning rate (default: {d.lr})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="step: x0.1 at 50%% and 75%% of the epochs (or as --lr-step, --lr-gamma "
                        "say); cosine (default: step)")
    p.add_argument("--lr-step", type=int, metavar="EPOCHS",
                   help="step schedule: drop the learning rate every EPOCHS epochs, as Cohen et "
                        "al.'s --lr_step_size (default: at 50%% and 75%% of the epochs)")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma,
                   help=f"step schedule: the factor of each drop (default: {d.lr_gamma})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"inputs per step (default: {d.batch})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default: {d.weight_decay}")
    p.add_argument("--init", metavar="CKPT", nargs="+",
                   help="start from these weights: a drt-fast ensemble (e.g. the Gaussian base), "
                        "or one checkpoint per member (Cohen/DRT base models, drt-fast files)")
    p.add_argument("--out", metavar="CKPT", required=True, help="output ensemble checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run that wrote --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out and its training state (default: refuse)")
    p.add_argument("--seed", type=int, default=d.seed, help="default: 0")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:i (default: auto)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast on CUDA")
    p.add_argument("--log", metavar="FILE",
                   help="a line per epoch (CE, GD, CM, accuracy, lr, time): CSV when FILE ends "
                        "in .csv, else JSON lines; continued by --resume, replaced by --overwrite")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")
    p.set_defaults(func=run_train)


def _add_diagnose(subparsers) -> None:
    """``drt-fast diagnose``."""
    p = subparsers.add_parser(
        "diagnose", help="member gradient cosines and margins on noisy inputs",
        description="Per member pair the mean cosine of margin input-gradients, per member and "
                    "for the ensemble the mean confidence margin and accuracy, on noisy inputs.",
        epilog="margin: the softmax probability of the true class minus the largest other one "
               "(the paper's confidence margin; negative where the input is misclassified). "
               "gradient cosine: cosine of two members' input gradients of their margins (DRT's "
               "GD term drives it down: diverse members).")
    p.add_argument("checkpoint", metavar="CKPT", nargs="*",
                   help="a drt-fast ensemble or Cohen/DRT checkpoint, or several member files that form "
                        "one ensemble, as the DRT code saves them (default: the embedded digits ensemble)")
    p.add_argument("--dataset", help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", metavar="D", help="dataset folder (for npz: the .npz file)")
    p.add_argument("--split", default="test", help="default: test")
    p.add_argument("--sigma", type=float, help="default: the checkpoint's training sigma")
    options.add_normalization(p)
    p.add_argument("--n-inputs", type=int, default=500, help="first N inputs of the split (default: 500)")
    p.add_argument("--noise-draws", type=int, default=8, help="noise vectors per input (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i (default: auto)")
    p.set_defaults(func=run_diagnose)


# Flags that only some trainers use.
_TRAINER_FLAGS = {"rho1": ("drt", "drt-smoothadv"), "rho2": ("drt", "drt-smoothadv"),
                  "gd_norm": ("drt", "drt-smoothadv"), "eps": ("smoothadv", "drt-smoothadv"),
                  "steps": ("smoothadv", "drt-smoothadv"), "eps_warmup": ("smoothadv", "drt-smoothadv")}


def run_train(args) -> int:
    import torch

    from .. import distributed
    from .state import path_for_record

    fields = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields and k != "command"}
    for name, trainers in _TRAINER_FLAGS.items():
        if values.get(name) is None:
            values.pop(name, None)                  # TrainConfig's default
        elif args.trainer not in trainers:
            raise DrtFastError(f"--{name.replace('_', '-')} applies to the "
                               f"{' and '.join(trainers)} trainers, not --trainer {args.trainer}")
    values.update(_fixed_by_init(args))
    for name in ("dataset", "arch", "members"):
        if values.get(name) is None:
            values.pop(name, None)                  # TrainConfig's default
    if values.get("init") and len(values["init"]) == 1:
        values["init"] = values["init"][0]
    argv = getattr(args, "argv", None)
    if argv is not None:
        # paths as the record of --out keeps them: relative to its folder (train_config)
        paths = {p for p in [*(args.init or []), args.out, args.log, args.data_dir] if p}

        def portable(token):
            flag, eq, value = token.partition("=")
            if eq and flag.startswith("--") and value in paths:
                return f"{flag}={path_for_record(value, args.out)}"
            return path_for_record(token, args.out) if token in paths else token

        values["command"] = "drt-fast " + shlex.join(portable(token) for token in argv)
    config = TrainConfig(**values)
    config.validate()               # a bad value is the only line, before any note
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        from ..threads import fit_threads_to_load

        note = fit_threads_to_load()
        if note and not args.quiet:
            print(f"drt-fast: note: {note}", file=sys.stderr)
    is_main = distributed.from_env().is_main
    existed = os.path.exists(config.out)
    finished = []                   # epochs this run finished
    try:
        path = _train(config, on_epoch=lambda entry: finished.append(entry["epoch"]))
    except KeyboardInterrupt:
        if finished or config.resume:
            where = f"epoch {finished[-1]} of {config.epochs}" if finished else "the epochs done before"
            raise KeyboardInterrupt(f"{config.out} holds {where}; continue with --resume") from None
        raise KeyboardInterrupt(f"no epoch finished; {config.out} was "
                                + ("left as it was" if existed else "not written")) from None
    if not args.quiet and is_main:
        if config.resume and not finished and existed:
            print(f"nothing to train: {path} holds all {config.epochs} epochs of its run")
        else:
            print(f"wrote {path}")
    return 0


def _fixed_by_init(args) -> dict:
    """What the --init checkpoint(s) fix and the command line leaves open: arch, dataset
    (a Cohen file names none: its arch's) and the member count."""
    if (not args.init or None not in (args.arch, args.dataset, args.members)
            or not all(os.path.isfile(path) for path in args.init)):      # train() names a missing one
        return {}
    from ..checkpoint import open_checkpoints

    _, meta = open_checkpoints(args.init, dataset=args.dataset)
    fixed = {}
    archs = set(meta.get("archs") or [meta.get("arch")])
    if args.arch is not None and archs != {args.arch}:
        return fixed                # a conflict, which train() names (--init has arch ...)
    if args.arch is None and len(archs) == 1:
        fixed["arch"] = archs.pop()
    if args.dataset is None and meta.get("dataset"):
        fixed["dataset"] = meta["dataset"]
    if args.members is None:
        fixed["members"] = meta["members"]
    return fixed


def _train(config: TrainConfig, on_epoch):
    """`trainer.train`, a decoding worker's death said in one line."""
    from .trainer import train

    try:
        return train(config, on_epoch=on_epoch)
    except RuntimeError as err:
        # torch's report of a DataLoader worker the kernel ended (the OOM killer, a bus error
        # on a full /dev/shm); it may come from its SIGCHLD handler at any point of a step
        if not str(err).startswith("DataLoader worker"):
            raise
        raise DrtFastError(f"an image-decoding worker process stopped ({first_line(err)}): out of "
                           f"memory or of shared memory (/dev/shm)? try fewer --workers") from None


def run_diagnose(args) -> int:
    from .. import data, distributed, embedded
    from ..checkpoint import check_fits, open_checkpoints, resolve_normalization
    from .diagnose import diagnose, format_table

    validate.positive_int(args.n_inputs, "--n-inputs")
    validate.positive_int(args.noise_draws, "--noise-draws")
    validate.seed(args.seed, "--seed")
    if args.sigma is not None:
        validate.sigma(args.sigma, "--sigma")
    given = options.normalization(args)
    paths = args.checkpoint or [embedded.load().model]
    name = paths[0] if len(paths) == 1 else ", ".join(paths)
    ensemble, meta = open_checkpoints(paths, dataset=args.dataset)
    dataset = args.dataset or meta.get("dataset")
    sigma = args.sigma if args.sigma is not None else meta.get("sigma")
    if dataset is None:
        raise DrtFastError(f"checkpoint {name} does not name its dataset; pass --dataset")
    if sigma is None:
        raise DrtFastError(f"checkpoint {name} has no training sigma; pass --sigma")
    ds = data.load(dataset, args.split, args.data_dir)
    resolve_normalization(ensemble, meta, given, ds.normalization if ds.own_normalization else None)
    device = distributed.resolve_device(args.device)
    ensemble = ensemble.to(device).eval()
    check_fits(ensemble, meta, ds, name, dataset, device)
    members = list(ensemble.members)
    n = min(args.n_inputs, len(ds))
    x, y = ds.x[:n].to(device), ds.y[:n].to(device)
    result = diagnose(members, x, y, float(sigma), noise_draws=args.noise_draws, seed=args.seed)
    if not result.finite:
        raise DrtFastError(f"checkpoint {name}: the members give NaN or inf logits or "
                           f"gradients on the noisy {dataset} inputs")
    print(f"{name}: {len(members)} member{'s' if len(members) != 1 else ''}, {dataset} {args.split} "
          f"(first {n} inputs), sigma {sigma}")
    print(format_table(result))
    return 0
