"""Certified accuracy and ACR from results files, as tables and plots.

Definitions (Cohen et al.; docs/method.md): the certified accuracy at radius r is the
fraction of inputs certified *correctly* with radius >= r; the ACR is the mean certified
radius with 0 for wrong or abstained inputs. Radii come from the TSV: drt-fast writes them
never above the radius computed (`io.format_down`); Cohen's files round to 3 significant
digits, to nearest. A file's sidecar (``<file>.json``), when there is one, says how it was
certified: a sequential file (``certify --radii``) holds grid radii, so its ACR is a lower
bound and its default table rows are its grid; and which runs wrote it (`io.segments_of`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from . import io, stats
from .errors import DrtFastError, first_line
from .io import Results, read_results


def certified_accuracy(results: Results, r):
    """Fraction of inputs certified correctly with radius >= ``r`` (a float, or an array for
    an array of radii); 0 for an empty file."""
    return stats.certified_accuracy(results.radius, results.correct, r)


def acr(results: Results) -> float:
    """Average certified radius: mean of radius over inputs, 0 where wrong or abstained."""
    return stats.acr(results.radius, results.correct)


def abstain_rate(results: Results) -> float:
    """Fraction of inputs where the smoothed classifier abstained (predict = -1)."""
    if len(results) == 0:
        return 0.0
    return sum(1 for p in results.predict if p < 0) / len(results)


def default_radii(largest: float, step: float = 0.25) -> list[float]:
    """0, step, 2*step, ... up to ``largest`` (inclusive), at least [0.0]."""
    count = int(math.floor(largest / step + 1e-9)) if largest > 0 else 0
    return [round(i * step, 10) for i in range(count + 1)]


def radius_label(r: float) -> str:
    """A radius as a table shows it: two decimals (``0.25``, ``0.50``) unless it needs more."""
    return f"{r:.2f}" if round(r, 2) == r else f"{r:g}"


@dataclass
class ResultsSet:
    """A results file with what its sidecar says (``meta``: None for a file without one,
    e.g. Cohen's)."""

    results: Results
    meta: dict = None

    @property
    def grid(self):
        """The grid radii of a sequential file, else None."""
        if self.meta and self.meta.get("certification") == "sequential" and self.meta.get("radii"):
            return [float(r) for r in self.meta["radii"]]
        return None

    @property
    def sequential(self) -> bool:
        """Certified sequentially: its sidecar says so, or, without one, its rows took
        different numbers of draws (a fixed-n file has one n)."""
        if self.meta is not None:
            return self.grid is not None
        return self.results.n is not None and len(set(self.results.n)) > 1


def load(path: str) -> ResultsSet:
    """Read a certify results file and its sidecar (if any)."""
    return ResultsSet(read_results(path), io.read_sidecar(path))


def _labels(paths: list[str]) -> list[str]:
    """Short column names: base names, or the paths as given when base names collide."""
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def table(results: list[Results], radii: list[float], certification: list | None = None) -> str:
    """Side-by-side text table: one column per results file, certified accuracy (%) per radius.

    Ends with rows for the ACR, the abstain rate (%), the number of inputs and the mean
    number of estimation draws (where the files say); with ``certification`` (one word per
    file, e.g. "fixed-n", "sequential"), a row that says how each file was certified.
    """
    labels = _labels([r.path for r in results])
    rows = [["radius", *labels]]
    for r in radii:
        rows.append([f"{r:g}", *(f"{100 * certified_accuracy(res, r):.1f}" for res in results)])
    rows.append(["ACR", *(f"{acr(res):.3f}" for res in results)])
    rows.append(["abstain %", *(f"{100 * abstain_rate(res):.1f}" for res in results)])
    rows.append(["inputs", *(str(len(res)) for res in results)])
    if any(res.n is not None for res in results):
        rows.append(["mean n", *(f"{sum(res.n) / len(res):.0f}" if res.n and len(res) else "-"
                                 for res in results)])
    if certification is not None:
        rows.append(["certification", *certification])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["certified accuracy (%) at radius r"]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(radii):
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[Results], out: str) -> None:
    """Plot certified accuracy against radius, one line per results file, in the format the
    name's extension says (png, pdf, svg, ...; png without one)."""
    try:
        # A bare Figure draws with Agg and leaves pyplot's global backend alone.
        from matplotlib.figure import Figure
    except ImportError:
        raise DrtFastError("--plot needs matplotlib, which is not installed "
                           "(pip install matplotlib)") from None

    largest = max((max(res.radius, default=0.0) for res in results), default=0.0)
    grid = [largest * 1.05 * i / 400 for i in range(401)] if largest > 0 else [0.0]
    fig = Figure(figsize=(6, 4))
    extension = os.path.splitext(out)[1][1:].lower()
    formats = fig.canvas.get_supported_filetypes()
    if extension and extension not in formats:
        raise DrtFastError(f"--plot {out}: matplotlib writes {', '.join(sorted(formats))}, "
                           f"not .{extension}")
    ax = fig.add_subplot()
    for label, res in zip(_labels([r.path for r in results]), results):
        ax.plot(grid, certified_accuracy(res, grid), label=label)
    ax.set_xlabel("radius (L2)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(out, format=extension or "png", dpi=120)
    except OSError as e:
        raise DrtFastError(f"cannot write the plot to {out!r}: {e.strerror or e}") from None
    except RuntimeError as e:    # e.g. .pgf without a LaTeX installation ('xelatex' not found)
        raise DrtFastError(f"cannot write the plot to {out!r}: {first_line(e)}") from None


def analyze(paths: list[str], radii: list[float] | None = None, plot_path: str | None = None) -> str:
    """Read results files and return the table and its notes (and write the plot when
    ``plot_path`` is given). Default radii: the grids of the sequential files, and 0, 0.25,
    ... up to the largest radius of the others."""
    sets = [load(p) for p in paths]
    results = [s.results for s in sets]
    empty = [r.path for r in results if len(r) == 0]
    if empty:
        raise DrtFastError(f"results file {empty[0]!r} has no rows (only a header): nothing to analyze")
    grids = [s.grid for s in sets]
    if radii is None:
        radii = {r for grid in grids if grid for r in grid}
        others = [res for res, grid in zip(results, grids) if grid is None]
        if others or not radii:
            radii |= set(default_radii(max((max(r.radius, default=0.0) for r in others), default=0.0)))
    bad = [r for r in radii if not (r >= 0 and math.isfinite(r))]
    if bad:
        raise DrtFastError(f"--radii must be finite and >= 0, got {bad[0]}")
    radii = sorted(radii)
    if plot_path is not None:
        plot(results, plot_path)
    kinds = ["sequential" if s.sequential else "fixed-n" for s in sets]
    text = table(results, radii, kinds if "sequential" in kinds else None)
    return "\n".join([text, *notes(sets, radii)])


def notes(sets: list, radii: list) -> list[str]:
    """The lines under the table: what a sequential file's numbers mean, and which files
    were written by runs whose settings differ."""
    lines = []
    labels = _labels([s.results.path for s in sets])
    for label, s in zip(labels, sets):
        grid = s.grid
        if s.sequential and not grid:
            lines.append(f"{label}: its rows took different numbers of draws, as in a sequential file, but "
                         f"no sidecar ({io.sidecar_path(s.results.path)}) gives its grid: its radii are grid "
                         f"radii, so its ACR is a lower bound")
        if grid:
            off = [r for r in radii if not any(math.isclose(r, g, rel_tol=0, abs_tol=1e-12) for g in grid)]
            lines.append(f"{label}: sequential certification at radii {', '.join(f'{r:g}' for r in grid)} "
                         f"(n_max {s.meta.get('n')}): each input counts the largest grid radius it "
                         f"certified, so its ACR on grid radii is a lower bound"
                         + ("; at radii off the grid it shows the accuracy at the next grid radius up"
                            if off else ""))
        mixed = io.mixed_settings(io.segments_of(s.meta, s.results.idx)) if s.meta else {}
        if mixed:
            lines.append(f"{label}: written by {len(next(iter(mixed.values())))} runs whose settings differ "
                         f"({_mixed_words(mixed)}): each may round the base classifier differently "
                         f"(drt-fast info {s.results.path} lists the runs)")
    return lines


def _mixed_words(mixed: dict) -> str:
    return "; ".join(f"{key} {' / '.join('?' if v is None else str(v) for v in values)}"
                     for key, values in mixed.items())


def describe(path: str) -> str:
    """What ``drt-fast info`` says of a results file: its configuration (from the sidecar)
    and the runs that wrote it."""
    task = io.results_task(path)
    results = read_results(path, task)
    meta = io.read_sidecar(path)
    lines = [f"results        {path}: {task}, {len(results)} row{'s' if len(results) != 1 else ''}"]
    if meta is None:
        lines.append(f"configuration  unknown: no metadata file {io.sidecar_path(path)} (a file of Cohen's code?)")
        return "\n".join(lines)
    n0 = f"n0 {meta.get('n0')}, " if task == "certify" else ""
    if meta.get("certification") == "sequential":
        lines.append(f"certification  sequential at radii {', '.join(f'{r:g}' for r in meta.get('radii') or [])}: "
                     f"{n0}n_max {meta.get('n')}, alpha {meta.get('alpha')}, futility {meta.get('futility')}")
    else:
        lines.append(f"certification  {'fixed n' if task == 'certify' else 'predict'}: {n0}n {meta.get('n')}, "
                     f"alpha {meta.get('alpha')}")
    lines += [f"model          {meta.get('model')} (sha256 {meta.get('model_sha256')})",
              f"data           {meta.get('dataset')} {meta.get('data') or ''} ({meta.get('split')}), "
              f"skip {meta.get('skip')}, max {meta.get('max') or 'all'}",
              f"noise          sigma {meta.get('sigma')}, seed {meta.get('seed')}",
              f"ensemble       mode {meta.get('mode')}, precision {meta.get('precision')}"]
    segments = io.segments_of(meta, results.idx)
    mixed = io.mixed_settings(segments)
    lines.append(f"runs           {len(segments)}"
                 + (f", whose settings differ ({_mixed_words(mixed)}): each may round the base "
                    f"classifier differently" if mixed else
                    (", with the same settings" if len(segments) > 1 else "")))
    for i, segment in enumerate(segments, start=1):
        settings = segment.get("settings") or {}
        rows = segment.get("rows") or 0
        span = (f"rows {segment['first_row'] + 1}-{segment['first_row'] + rows} (idx {segment['idx'][0]}-"
                f"{segment['idx'][1]})" if rows and segment.get("idx") else "no rows")
        versions = "".join(f", {key.replace('_version', '').replace('_', '-')} {segment[key]}"
                           for key in io.SEGMENT_VERSIONS if segment.get(key))
        lines.append(f"  run {i:<9d}{span}, started {segment.get('started') or 'at an unrecorded time'}"
                     f"{versions}{' (' + segment['note'] + ')' if segment.get('note') else ''}")
        known = [f"{key} {settings[key]}" for key in io.SEGMENT_SETTINGS if settings.get(key) is not None]
        if known:
            lines.append(" " * 15 + ", ".join(known))
    return "\n".join(lines)
