"""Results TSV rows, sidecar and resume bookkeeping (drt_fast.io)."""
import csv
import json
import os
import re
from decimal import Decimal

import numpy as np
import pytest

from drt_fast import io, stats
from drt_fast.analyze import certified_accuracy
from drt_fast.errors import DrtFastError
from drt_fast.smoothing import Certificate


def test_certify_row_is_cohen_format_with_extra_columns():
    cert = Certificate(label=3, radius=0.123456, pA_lower=0.7312345678, count=912, n=1000)
    row = io.certify_row(17, 3, cert, seconds=1.5)
    fields = row.rstrip("\n").split("\t")
    assert row.endswith("\n") and len(fields) == len(io.CERTIFY_COLUMNS)
    # Cohen's columns and order; radius and pA_lower rounded down, read back exactly
    assert fields[:6] == ["17", "3", "3", "0.12345599999999999", "1", "0:00:01.500000"]
    assert fields[6:] == ["0.73123456779999995", "912", "1000"]
    assert float(fields[3]) == cert.radius and float(fields[6]) == cert.pA_lower
    grid = Certificate(label=3, radius=0.25, pA_lower=0.9999999, count=1000, n=1000)
    assert io.certify_row(17, 3, grid, 1.5).split("\t")[3::3] == ["0.25", "0.9999999"]


# ----------------------------------------------------------------------------- issue 19, item 1

def _never_above(text, value):
    """The decimal ``text`` is at most ``value`` (exactly, as decimals) and reads back as it."""
    return Decimal(text) <= Decimal(value) and float(text) == value


def test_a_radius_just_below_a_grid_radius_is_never_written_or_counted_at_it(tmp_path):
    """sigma 0.25, n 100,000, alpha 0.001, nA 84,444: radius 0.24951, which Cohen's {:.3}
    wrote as 0.25 (and the summary and analyze then counted as certified at 0.25)."""
    pA_lower = stats.lower_confidence_bound(84_444, 100_000, 0.001)
    radius = stats.radius(0.25, pA_lower)
    assert 0.2495 < radius < 0.2496 and f"{radius:.3}" == "0.25"       # what the old code wrote
    row = io.certify_row(0, 1, Certificate(1, radius, pA_lower, 84_444, 100_000), 1.0)
    fields = row.split("\t")
    assert fields[3].startswith("0.24951") and _never_above(fields[3], radius)
    assert _never_above(fields[6], pA_lower)
    path = tmp_path / "r.tsv"
    path.write_text("\t".join(io.CERTIFY_COLUMNS) + "\n" + row)
    results = io.read_results(str(path))
    assert results.radius == [radius]
    assert certified_accuracy(results, 0.25) == 0.0 and certified_accuracy(results, 0.2495) == 1.0
    # Cohen's analyze.py: pandas.read_csv(path, delimiter="\t"); correct & (radius >= r)
    with open(path) as f:
        (cohen,) = csv.DictReader(f, delimiter="\t")
    assert float(cohen["radius"]) < 0.25 and int(cohen["correct"]) == 1


def test_every_written_radius_and_bound_is_at_most_its_value():
    """Property: over many nA (and the 48 of n = 100,000 that {:.3} wrote up to 0.25), the
    radius and pA_lower a row holds are never above the values computed, and read back as them."""
    counts = list(range(50_001, 100_001, 37)) + list(range(84_400, 84_460))
    rng = np.random.default_rng(0)
    for nA in counts:
        pA_lower = stats.lower_confidence_bound(nA, 100_000, 0.001)
        radius = stats.radius(0.25, pA_lower) if pA_lower >= 0.5 else 0.0
        fields = io.certify_row(0, 1, Certificate(1, radius, pA_lower, nA, 100_000), 0.0).split("\t")
        assert _never_above(fields[3], radius) and _never_above(fields[6], pA_lower), nA
        if radius < 0.25:
            assert float(fields[3]) < 0.25, nA
    for value in [*rng.random(2000), *(10.0 ** rng.uniform(-12, 3, 500)), 1 - 1e-7, 1.0, 0.1, 0.3, 2.0]:
        text = io.format_down(value)
        assert _never_above(text, value) and "e" not in text.lower(), value
    assert io.format_down(0.0) == "0.0" and io.format_down(1.0) == "1.0" and io.format_down(0.5) == "0.5"


def test_abstain_and_wrong_rows_are_not_correct():
    abstain = Certificate(label=-1, radius=0.0, pA_lower=0.3, count=300, n=1000)
    fields = io.certify_row(5, 2, abstain, 0.25).split("\t")
    assert fields[2:5] == ["-1", "0.0", "0"]
    wrong = Certificate(label=1, radius=2.0, pA_lower=0.99, count=999, n=1000)
    assert io.certify_row(5, 2, wrong, 0.25).split("\t")[4] == "0"


def test_predict_row_is_cohen_predict_layout():
    assert io.predict_row(4, 7, 7, 0.0).split("\t") == ["4", "7", "7", "1", "0:00:00\n"]
    assert io.predict_row(4, 7, -1, 2.25).rstrip("\n").split("\t") == ["4", "7", "-1", "0", "0:00:02.250000"]


def test_time_format_is_str_of_timedelta():
    assert io.format_time(3723.000001) == "1:02:03.000001"
    assert re.fullmatch(r"\d+:\d\d:\d\d(\.\d{6})?", io.format_time(0.1234567))


def test_open_results_writes_header_and_resume_drops_partial_line(tmp_path):
    out = str(tmp_path / "r.tsv")
    f = io.open_results(out, "certify", resume=False)
    cert = Certificate(1, 0.5, 0.9, 90, 100)
    f.append(io.certify_row(0, 1, cert, 0.1))
    f.append(io.certify_row(3, 1, cert, 0.1))
    f.close()
    with open(out, "a") as g:
        g.write("6\t1\t1\t0.")  # a row cut short by SIGKILL
    f = io.open_results(out, "certify", resume=True)
    assert f.done == {0, 3}
    f.close()
    with open(out) as g:
        lines = g.read().splitlines()
    assert lines[0] == "\t".join(io.CERTIFY_COLUMNS) and len(lines) == 3


def test_resume_refuses_a_file_of_the_other_task(tmp_path):
    out = str(tmp_path / "r.tsv")
    io.open_results(out, "predict", resume=False).close()
    with pytest.raises(DrtFastError, match="header"):
        io.open_results(out, "certify", resume=True)


def test_resume_compatibility_ignores_batch_device_and_max():
    old = {k: 1 for k in io.RESUME_KEYS} | {"batch": 1000, "device": "cpu", "max": 10}
    io.check_resume_compatible(old, old | {"batch": 7, "device": "cuda:0", "max": 20}, "r.tsv")
    with pytest.raises(DrtFastError, match=r"sigma: 1 in the file, 0.5 now"):
        io.check_resume_compatible(old, old | {"sigma": 0.5}, "r.tsv")


# Spelled out (not io.RESUME_KEYS): a key dropped from RESUME_KEYS must fail here.
@pytest.mark.parametrize("key", ["task", "model_sha256", "dataset", "data_sha256", "split", "sigma",
                                 "n0", "n", "alpha", "seed", "mode", "precision", "skip",
                                 "certification", "radii", "futility"])
def test_resume_compatibility_compares_every_result_determining_setting(key):
    old = {k: 1 for k in io.RESUME_KEYS}
    with pytest.raises(DrtFastError, match=f"{key}: 1 in the file, 2 now"):
        io.check_resume_compatible(old, old | {key: 2}, "r.tsv")


def test_check_writable_refuses_existing_and_unwritable(tmp_path):
    out = tmp_path / "r.tsv"
    io.check_writable(str(out), resume=False)
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind
    out.write_text("x")
    with pytest.raises(DrtFastError, match="already exists"):
        io.check_writable(str(out), resume=False)
    io.check_writable(str(out), resume=True)
    with pytest.raises(DrtFastError, match="cannot write"):
        io.check_writable(str(out / "inside-a-file.tsv"), resume=False)
    with pytest.raises(DrtFastError, match="cannot write"):
        io.check_writable(str(tmp_path / "no" / "such" / "dir.tsv"), resume=False)
    assert out.read_text() == "x"


def test_sidecar_written_atomically(tmp_path):
    out = str(tmp_path / "r.tsv")
    io.write_json_atomic(io.sidecar_path(out), {"sigma": 0.25})
    io.write_json_atomic(io.sidecar_path(out), {"sigma": 0.5})
    assert io.read_sidecar(out) == {"sigma": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["r.tsv.json"]  # no temp file left
    (tmp_path / "r.tsv.json").write_text("{not json")
    with pytest.raises(DrtFastError, match="cannot read"):
        io.read_sidecar(out)


def test_read_results_by_column_name(tmp_path):
    p = tmp_path / "cohen.tsv"
    p.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                 "0\t1\t1\t0.52\t1\t0:00:01.1\n"
                 "10\t2\t-1\t0.0\t0\t0:00:01.2\n")
    r = io.read_results(str(p))
    assert (r.idx, r.radius, r.correct, r.predict) == ([0, 10], [0.52, 0.0], [1, 0], [1, -1])
    p.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n")
    with pytest.raises(DrtFastError, match="radius"):
        io.read_results(str(p))
    p.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\tone\t0.5\t1\t0:00:01\n")
    with pytest.raises(DrtFastError, match="line 2"):
        io.read_results(str(p))
    json.dumps(r.__dict__)  # plain Python values


def test_a_sidecar_of_an_earlier_version_is_a_fixed_n_one():
    """Sidecars written before sequential certification lack certification, radii and
    futility: they resume fixed-n runs, and refuse sequential ones."""
    old = {k: 1 for k in io.RESUME_KEYS if k not in ("certification", "radii", "futility")} | {"task": "certify"}
    now = old | {"certification": "fixed-n", "radii": None, "futility": None}
    io.check_resume_compatible(old, now, "r.tsv")
    with pytest.raises(DrtFastError, match=r"certification: 'fixed-n' in the file, 'sequential' now"):
        io.check_resume_compatible(old, now | {"certification": "sequential", "radii": [0.25],
                                               "futility": 0.01}, "r.tsv")
    predict = {k: 1 for k in io.RESUME_KEYS if k not in ("certification", "radii", "futility")} | {"task": "predict"}
    io.check_resume_compatible(predict, predict | {"certification": None, "radii": None, "futility": None}, "r.tsv")


# ----------------------------------------------------------------------------- issue 19, item 6

SETTINGS = {"batch": 1000, "device": "cpu", "fuse": "auto", "cuda_graphs": "auto", "channels_last": "auto: off",
            "cifar_resnet_kernel": None, "fused": "on: dense", "graphs": "off"}
CONFIG = {k: 1 for k in io.RESUME_KEYS} | {"task": "certify", "command": "drt-fast certify", "batch": 1000,
                                            "device": "cpu", "drt_fast_version": "1", "torch_version": "2"}


def _run(out, rows, settings, config=CONFIG, resume=True):
    results = io.start_run(out, "certify", config, settings, resume)
    for idx in rows:
        results.append(io.certify_row(idx, 1, Certificate(1, 0.5, 0.9, 90, 100), 0.1))
    results.sync(settings)
    results.close()
    return io.read_sidecar(out)


def test_every_run_of_a_file_is_kept_in_the_sidecar(tmp_path):
    out = str(tmp_path / "r.tsv")
    meta = _run(out, [0, 2, 4], SETTINGS, resume=False)
    (first,) = meta["segments"]
    assert (first["first_row"], first["rows"], first["idx"], first["settings"]) == (0, 3, [0, 4], SETTINGS)
    assert first["command"] == "drt-fast certify" and first["drt_fast_version"] == "1" and first["started"]
    assert io.mixed_settings(io.segments_of(meta)) == {}
    other = SETTINGS | {"batch": 700, "device": "cuda:0 (H100)"}
    meta = _run(out, [6, 8], other, CONFIG | {"batch": 700, "torch_version": "3"})
    assert [(s["first_row"], s["rows"], s["idx"]) for s in meta["segments"]] == [(0, 3, [0, 4]), (3, 2, [6, 8])]
    assert meta["segments"][0]["settings"] == SETTINGS and meta["segments"][1]["settings"] == other
    assert meta["batch"] == 700                                     # the top level: the latest run
    assert io.mixed_settings(io.segments_of(meta)) == {
        "batch": [1000, 700], "device": ["cpu", "cuda:0 (H100)"], "torch_version": ["2", "3"]}
    # a run that wrote nothing (the file was complete) mixes nothing in
    meta = _run(out, [], SETTINGS | {"batch": 5})
    assert meta["segments"][2]["rows"] == 0
    assert set(io.mixed_settings(io.segments_of(meta))) == {"batch", "device", "torch_version"}


def test_rows_a_killed_run_did_not_record_are_counted_from_the_file(tmp_path):
    out = str(tmp_path / "r.tsv")
    _run(out, [0, 2], SETTINGS, resume=False)
    with open(out, "a") as f:                  # written, then killed before the sidecar update
        f.write(io.certify_row(4, 1, Certificate(1, 0.5, 0.9, 90, 100), 0.1))
    assert io.read_sidecar(out)["segments"][0]["rows"] == 2
    meta = _run(out, [6], SETTINGS)
    assert [(s["first_row"], s["rows"], s["idx"]) for s in meta["segments"]] == [(0, 3, [0, 4]), (3, 1, [6, 6])]


def test_a_sidecar_without_segments_still_resumes(tmp_path):
    """A file from before runs were recorded: its sidecar is the plain configuration."""
    out = str(tmp_path / "r.tsv")
    results = io.open_results(out, "certify", resume=False)
    for idx in (0, 3):
        results.append(io.certify_row(idx, 1, Certificate(1, 0.5, 0.9, 90, 100), 0.1))
    results.close()
    io.write_json_atomic(io.sidecar_path(out), CONFIG | {"fuse": "auto", "cuda_graphs": "auto"})
    meta = _run(out, [5], SETTINGS | {"batch": 300}, CONFIG | {"batch": 300})
    old, new = meta["segments"]
    assert (old["first_row"], old["rows"], old["idx"], old["started"]) == (0, 2, [0, 3], None)
    assert old["settings"]["batch"] == 1000 and old["settings"]["channels_last"] is None
    assert "rebuilt" in old["note"]
    assert (new["first_row"], new["rows"], new["idx"]) == (2, 1, [5, 5])
    # channels_last was not recorded then: not compared; batch was, and differs
    assert io.mixed_settings(io.segments_of(meta)) == {"batch": [1000, 300]}


def test_a_resume_refused_leaves_the_sidecar_alone(tmp_path):
    out = str(tmp_path / "r.tsv")
    _run(out, [0], SETTINGS, resume=False)
    before = open(out + ".json").read()
    with pytest.raises(DrtFastError, match="sigma"):
        io.start_run(out, "certify", CONFIG | {"sigma": 2}, SETTINGS, True)
    assert open(out + ".json").read() == before
    os.remove(out + ".json")
    with pytest.raises(DrtFastError, match="metadata file"):
        io.start_run(out, "certify", CONFIG, SETTINGS, True)
