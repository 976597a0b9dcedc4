"""The report certify and predict print on stdout when they end."""
from __future__ import annotations

import os

from .job import Job, Record


def summary(args, job: Job, records: list, resumed: int, elapsed: float) -> str:
    """The final report on stdout: accuracy (certified at several radii), abstains, ACR,
    draws (sequential: against the fixed-n budget), speed. ``records``: the `Record` of
    each input of this run; ``resumed``: rows that were in the file before it."""
    from .. import io

    if args.out:
        results = io.read_results(args.out, job.task)  # all rows, resumed ones included
    else:
        columns = [list(c) for c in zip(*records)] if records else [[] for _ in Record._fields]
        results = io.Results("this run", *columns)
    lines = _setting_lines(args, job, len(results))
    lines += _certify_lines(job, results) if job.task == "certify" else _predict_lines(results)
    lines.append(_speed_line(job, records, resumed, elapsed))
    if args.out:
        lines.append(f"rows written to {args.out} (configuration in {io.sidecar_path(args.out)})")
    else:
        lines.append("rows not saved: pass --out results.tsv to keep them")
    return "\n".join(lines)


def _setting_lines(args, job: Job, count: int) -> list:
    """What ran: the inputs, the smoothing, the engine, the normalization, the threads."""
    cfg = job.config
    source = os.path.basename(cfg["data"]) if cfg["dataset"] == "npz" else f"{cfg['dataset']} ({cfg['split']})"
    n = f"n_max={cfg['n']}" if job.sequential else f"n={cfg['n']}"
    sigma = f"{cfg['sigma']:g}" + (f" (discrete, grid 1/{cfg['grid']})" if cfg.get("noise") == "discrete" else "")
    lines = [f"drt-fast {job.task}: {count} input{'s' if count != 1 else ''} of {source}, sigma={sigma}, "
             f"{'n0=%d, ' % cfg['n0'] if job.task == 'certify' else ''}{n}, alpha={cfg['alpha']:g}, "
             f"mode={cfg['mode']}, precision={cfg['precision']}, on {cfg['device']}"]
    if job.sequential:
        lines.append(f"sequential certification at radii {', '.join(f'{r:g}' for r in cfg['radii'])} "
                     f"(futility test at level {cfg['futility']:g})")
    if cfg["device"].startswith("cuda"):
        lines.append(f"fused members: {job.smoothed.fuse_status}; "
                     f"CUDA graphs: {job.smoothed.graph_status}")
    else:
        lines.append(f"fused members: {job.smoothed.fuse_status}")
    norm = cfg["normalization"]
    lines.append(f"normalization: means {norm['means']}, sds {norm['sds']} ({cfg['normalization_source']})")
    if getattr(args, "thread_note", ""):
        lines.append(args.thread_note)
    return lines


def _certify_lines(job: Job, results) -> list:
    """Certified accuracy at the grid (sequential) or default radii, abstains, ACR; the
    draws a sequential run saved against fixed n."""
    from .. import stats
    from ..analyze import abstain_rate, acr, certified_accuracy, default_radii, radius_label

    cfg, count = job.config, len(results)
    if job.sequential:
        radii = cfg["radii"]
    else:
        radii = default_radii(stats.max_radius(cfg["sigma"], cfg["n"], cfg["alpha"]))
    acc = certified_accuracy(results, radii)
    labels = [radius_label(r) for r in radii]
    width = max(7, *(len(label) + 2 for label in labels))
    header = "radius               " + "".join(label.rjust(width) for label in labels)
    values = "certified accuracy % " + "".join(f"{100 * a:.1f}".rjust(width) for a in acc)
    lines = [header, values,
             f"abstain rate {100 * abstain_rate(results):.1f} %, ACR {acr(results):.3f}"
             + (" (a lower bound: each input counts the largest grid radius it certified)"
                if job.sequential else "")]
    if job.sequential and count:
        used = sum(results.n) + count * cfg["n0"]
        budget = count * (cfg["n0"] + cfg["n"])
        lines.append(f"draws: {used:,} used, {budget:,} at fixed n ({count} x ({cfg['n0']} + {cfg['n']})): "
                     f"{budget / used:.2f}x fewer")
    return lines


def _predict_lines(results) -> list:
    from ..analyze import abstain_rate

    count = len(results)
    accuracy = sum(results.correct) / count if count else 0.0
    return [f"accuracy {100 * accuracy:.1f} %, abstain rate {100 * abstain_rate(results):.1f} %"]


def _speed_line(job: Job, records: list, resumed: int, elapsed: float) -> str:
    new = len(records)
    if new and elapsed > 0:
        draws = sum(job.draws_taken(record) for record in records)
        speed = f"{new / elapsed:.2f} inputs/s, {draws / elapsed:,.0f} draws/s"
    else:
        speed = "nothing left to do"
    return (f"this run: {new} input{'s' if new != 1 else ''} in {elapsed:.2f} s ({speed})"
            + (f"; {resumed} rows were already in the file" if resumed else ""))
