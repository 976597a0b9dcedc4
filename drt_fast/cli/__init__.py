"""The ``drt-fast`` command: certify, predict, analyze, info (and train, diagnose).

The CLI only parses, checks, calls the API and prints: the statistics live in
``smoothing.py`` / ``stats.py``, the file formats in ``io/``, the tables in
``analyze.py``, multi-process plumbing in ``distributed.py``. Every problem a user can
cause ends as one line ``drt-fast: error: <message>`` on stderr and exit status 2.

One module a concern: `entry` (``main``: parse, dispatch, errors as one line), `parser`
(the sub-commands and their options; certify/predict's in ``_add_smoothing_options``),
`info` (info, analyze, the ``--version`` report), and for certify/predict: `prepare`
(bad numbers first, then model, data, normalization, the sidecar's configuration and the
SmoothedClassifier, ``build_smoothed``), `job` (what a run works on), `run` (rounds over
the ranks, rows, resume, interruption), `progress` (the bar), `summary` (the report).
"""
from .entry import main
from .info import build_report, run_analyze, run_info
from .job import DATASETS, Job, Record
from .parser import build_parser
from .run import run_smoothing

__all__ = ["main", "build_parser", "build_report", "run_smoothing", "run_info", "run_analyze",
           "Job", "Record", "DATASETS"]
