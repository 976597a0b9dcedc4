"""Running ``drt-fast certify`` / ``drt-fast predict``: the process group and device, then
the rounds of inputs over the ranks, the rows written (and resumed), interruption, and
the summary.

Under torchrun, each round every rank handles a round-robin share of the next inputs and
rank 0 writes all rows of the round in idx order.
"""
from __future__ import annotations

import contextlib
import os
import time

from ..errors import DrtFastError
from ..threads import fit_threads_to_load
from .job import Job, Record
from .prepare import check_numbers, prepare
from .progress import Progress
from .summary import summary


def run_smoothing(args, task: str) -> int:
    """``drt-fast certify`` / ``drt-fast predict``."""
    check_numbers(args, task)  # before importing torch: bad numbers fail at once
    from .. import distributed

    group = distributed.from_env()
    device = distributed.resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise DrtFastError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    device = distributed.init(group, device)
    args.thread_note = fit_threads_to_load() if device.type == "cpu" else ""
    if device.type == "cpu" and args.precision == "fp16":
        import warnings

        warnings.warn("--precision fp16 on the CPU runs many times slower than fp32 (CPUs have no "
                      "fast fp16 arithmetic); --precision bf16 is the fast reduced precision there")
    try:
        job = prepare(args, task, device)
        run_job(args, job, group)
        # Leave together: a rank that tears its gloo connections down while rank 0 is still
        # writing can abort ("terminate called without an active exception").
        distributed.barrier(group)
    finally:
        distributed.shutdown(group)
    return 0


def run_job(args, job: Job, group) -> None:
    """Certify/predict the selected inputs not yet in the results file; write rows, print
    the summary (rank 0)."""
    from .. import distributed

    run = _Run(args, job, group)
    done = distributed.run_on_main(group, run.open_output)
    todo = [p for p in job.positions if job.keys[p] not in done]
    round_size = job.group * group.world_size
    run.begin(len(todo))
    try:
        for first in range(0, len(todo), round_size):
            run.round(todo[first:first + round_size])
    except BaseException as exc:
        instead = run.stopped(exc)
        if instead is None:
            raise
        raise instead from None
    finally:
        run.close()
    elapsed = time.perf_counter() - run.start
    if group.is_main:
        print(summary(args, job, run.records, len(done), elapsed))


class _Run:
    """The state of a run: its results file (rank 0 with --out only), the `Record` of each
    input done, the progress bar and the start time."""

    def __init__(self, args, job: Job, group):
        self.args, self.job, self.group = args, job, group
        self.results = None      # the open io.ResultsFile
        self.records = []        # a Record for each input of this run, for the summary
        self.progress = None     # the Progress bar, from begin()
        self.start = None        # time.perf_counter() at begin()

    def open_output(self) -> set:
        """Start the run on --out (rank 0); returns the idx already in it (none without --out)."""
        args, job = self.args, self.job
        if not args.out:
            return set()
        from .. import io

        self.results = io.start_run(args.out, job.task, job.config, job.settings(), args.resume)
        selectable = set(job.keys[::job.config["skip"]])      # --max may grow on a resume
        foreign = sorted(self.results.done - selectable)
        if foreign:
            self.results.close()
            raise DrtFastError(f"cannot resume {args.out!r}: it has rows for inputs this "
                               f"configuration does not select (idx {foreign[0]}"
                               f"{' and %d more' % (len(foreign) - 1) if len(foreign) > 1 else ''})")
        return self.results.done

    def begin(self, inputs: int) -> None:
        """Show the progress bar of the ``inputs`` inputs left and start the clock."""
        self.progress = Progress(inputs, self.job.draws_per_input, self.args.quiet or not self.group.is_main)
        self.start = time.perf_counter()

    def round(self, chunk: list) -> None:
        """Certify/predict the inputs at positions ``chunk``, a share on each rank; write and
        record their rows in idx order, up to the first input that failed on any rank."""
        from .. import distributed

        job, group = self.job, self.group
        mine = chunk[group.rank::group.world_size]
        try:
            payload = ("ok", _work(job, mine))
        except DrtFastError as e:
            payload = ("error", str(e), mine[0] if mine else None)
        gathered = distributed.gather(group, payload)
        rows = sorted((r for p in gathered if p[0] == "ok" for r in p[1]), key=lambda r: r[0])
        errors = [p for p in gathered if p[0] == "error"]
        if errors:
            # Keep only rows before the first failed input: the file stays a prefix of a full run.
            first_bad = min(p[2] for p in errors)
            rows = [r for r in rows if r[0] < first_bad]
        for _, line, record in rows:
            if self.results is not None:
                self.results.append(line)
            self.records.append(record)
        if self.results is not None and rows:
            self.results.sync(job.settings())
        self.progress.advance([job.draws_taken(record) for _, _, record in rows])
        if errors:
            raise DrtFastError(errors[0][1])

    def stopped(self, exc: BaseException) -> BaseException | None:
        """Leave behind what a run stopped by ``exc`` should; returns what to raise instead
        of ``exc`` (None: ``exc`` itself)."""
        args, results, records = self.args, self.results, self.records
        if results is not None and not results.done and not records:
            # Nothing was certified: no header-only file (and sidecar) is left to block a
            # rerun of the same command.
            from .. import io

            results.close()
            for path in (args.out, io.sidecar_path(args.out)):
                with contextlib.suppress(OSError):
                    os.remove(path)
        elif isinstance(exc, KeyboardInterrupt) and results is not None:
            # said on the one "interrupted" line that entry._dispatch prints
            return KeyboardInterrupt(f"{len(records)} new rows kept in {args.out}; continue with --resume")
        elif isinstance(exc, KeyboardInterrupt) and not args.out and records and self.group.is_main:
            self.progress.close()          # (before the summary, on the same terminal)
            print(summary(args, self.job, records, 0, time.perf_counter() - self.start))
            return KeyboardInterrupt(f"the summary covers the {len(records)} input"
                                     f"{'s' if len(records) != 1 else ''} done before it")
        return None

    def close(self) -> None:
        self.progress.close()
        if self.results is not None:
            self.results.close()


def _work(job: Job, positions: list) -> list:
    """Certify or predict the inputs at ``positions``; returns (position, TSV line, record) each."""
    if not positions:
        return []
    xs, keys = job.x[positions], [job.keys[p] for p in positions]
    return _certify(job, positions, xs, keys) if job.task == "certify" else _predict(job, positions, xs, keys)


def _certify(job: Job, positions: list, xs, keys: list) -> list:
    from .. import io

    cfg = job.config
    t0 = time.perf_counter()
    if job.sequential:
        certs = job.smoothed.certify_radii(xs, keys, cfg["radii"], n0=cfg["n0"], n_max=cfg["n"],
                                           alpha=cfg["alpha"], batch_size=cfg["batch"],
                                           futility=cfg["futility"])
    else:
        certs = job.smoothed.certify_many(xs, keys, n0=cfg["n0"], n=cfg["n"], alpha=cfg["alpha"],
                                          batch_size=cfg["batch"])
    # Inputs certified together share the time: each row gets its share, by its draws.
    seconds = (time.perf_counter() - t0) / sum(cfg["n0"] + cert.n for cert in certs)
    out = []
    for p, cert in zip(positions, certs):
        idx, label = job.keys[p], job.y[p]
        line = io.certify_row(idx, label, cert, seconds * (cfg["n0"] + cert.n))
        # the file holds exactly cert.radius (never a value above it: io.format_down)
        out.append((p, line, Record(idx, label, cert.label, cert.radius, int(cert.label == label), cert.n)))
    return out


def _predict(job: Job, positions: list, xs, keys: list) -> list:
    from .. import io

    cfg = job.config
    t0 = time.perf_counter()
    predictions = job.smoothed.predict_many(xs, keys, n=cfg["n"], alpha=cfg["alpha"], batch_size=cfg["batch"])
    seconds = (time.perf_counter() - t0) / len(positions)
    out = []
    for p, prediction in zip(positions, predictions):
        idx, label = job.keys[p], job.y[p]
        line = io.predict_row(idx, label, prediction, seconds)
        out.append((p, line, Record(idx, label, prediction, 0.0, int(prediction == label), cfg["n"])))
    return out
