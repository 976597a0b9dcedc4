"""Result files: Cohen-format TSV rows, the JSON metadata sidecar, and resume.

A results file is what Cohen's ``certify.py`` / ``predict.py`` write, so existing analysis
scripts read it unchanged, with drt-fast's extra columns after Cohen's::

    certify:  idx  label  predict  radius  correct  time  pA_lower  count  n
    predict:  idx  label  predict  correct  time

``radius`` and ``pA_lower`` are written rounded down (`format_down`): never above the value
computed, and reading one back gives exactly that value.

Rows are appended and flushed one at a time (and fsync'ed after each group of inputs),
so a run killed at any moment (SIGKILL included) leaves whole rows plus at most one
partial last line, which :func:`open_results` drops on resume.

The sidecar ``<out>.json`` holds the configuration of the latest run at its top level; its
result-determining part (:data:`RESUME_KEYS`) must match for a resume. ``segments`` lists
every run that wrote to the file, in order (`new_segment`): when it started, the rows it
wrote (``first_row``, ``rows``, ``idx`` = [first, last]), its `SEGMENT_SETTINGS` (batch,
device, engine levers: each makes a slightly different floating-point base classifier) and
versions. A sidecar of an earlier version has no ``segments``: it reads as one run.

One module a concern: `rows` (columns and row formats, rounding down), `results` (the TSV:
checked, appended, synced, read back), `sidecar` (its path, the segments), `resume`
(starting a run, resume compatibility), `files` (atomic and probed writes, digests).
"""
from .files import created_file_mode, probe_writable, sha256_file, write_json_atomic
from .results import (Results, ResultsFile, check_writable, is_results_file, open_results, read_results,
                      results_task)
from .resume import RESUME_KEYS, check_resume_compatible, start_run
from .rows import CERTIFY_COLUMNS, COLUMNS, PREDICT_COLUMNS, certify_row, format_down, format_time, predict_row
from .sidecar import (SEGMENT_SETTINGS, SEGMENT_VERSIONS, count_rows, mixed_settings, new_segment, read_sidecar,
                      record_rows, segments_of, sidecar_path)

__all__ = ["CERTIFY_COLUMNS", "PREDICT_COLUMNS", "COLUMNS", "RESUME_KEYS", "SEGMENT_SETTINGS", "SEGMENT_VERSIONS",
           "format_time", "format_down", "certify_row", "predict_row",
           "sha256_file", "probe_writable", "created_file_mode", "write_json_atomic",
           "check_writable", "ResultsFile", "open_results", "Results", "read_results", "results_task",
           "is_results_file",
           "sidecar_path", "read_sidecar", "new_segment", "record_rows", "segments_of", "count_rows",
           "mixed_settings",
           "check_resume_compatible", "start_run"]
