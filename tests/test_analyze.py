"""drt-fast analyze: certified-accuracy tables and plots from results files."""
import os

import pytest

from drt_fast import io
from drt_fast.analyze import analyze, default_radii
from drt_fast.cli import main

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tpA_lower\tcount\tn\n"

# (predict, label, radius): 5 rows, radii as a file stores them.
ROWS_A = [(1, 1, 0.3), (2, 2, 1.1), (3, 4, 0.9), (-1, 5, 0.0), (6, 6, 0.6)]
ROWS_B = [(1, 1, 0.2), (2, 2, 0.2), (3, 3, 0.8), (4, 4, 0.5)]


def _write(path, rows, cohen=False):
    lines = [HEADER if not cohen else "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"]
    for i, (pred, label, radius) in enumerate(rows):
        row = f"{i}\t{label}\t{pred}\t{radius:.3}\t{int(pred == label)}\t0:00:00.5"
        lines.append(row + ("" if cohen else "\t0.9\t90\t100") + "\n")
    path.write_text("".join(lines))
    return str(path)


def _table_values(text):
    """{row name: [values per file]} from the printed table."""
    values = {}
    for line in text.splitlines()[2:]:
        if not line.startswith("-"):
            name, *cells = line.rsplit(None, 2)  # two files: the last two cells
            values[name.strip()] = cells
    return values


def test_table_values_by_hand(tmp_path):
    a = _write(tmp_path / "a.tsv", ROWS_A)
    b = _write(tmp_path / "b.tsv", ROWS_B, cohen=True)  # Cohen's file: no extra columns
    text = analyze([a, b], radii=[0.0, 0.25, 0.5, 1.0])
    v = _table_values(text)
    # a: correct rows with radii 0.3, 1.1, 0.6 of 5 -> 60, 60, 40, 20 %; ACR (0.3+1.1+0.6)/5
    # b: all correct, radii 0.2, 0.2, 0.8, 0.5 of 4 -> 100, 50, 50, 0 %; ACR 1.7/4
    assert v["0"] == ["60.0", "100.0"]
    assert v["0.25"] == ["60.0", "50.0"]
    assert v["0.5"] == ["40.0", "50.0"]
    assert v["1"] == ["20.0", "0.0"]
    assert v["ACR"] == ["0.400", "0.425"]
    assert v["abstain %"] == ["20.0", "0.0"]
    assert v["inputs"] == ["5", "4"]
    assert text.splitlines()[1].split() == ["radius", "a.tsv", "b.tsv"]


def test_class_zero_is_a_prediction_not_an_abstention_and_radii_are_sorted(tmp_path):
    a = _write(tmp_path / "a.tsv", [(0, 0, 0.4), (-1, 0, 0.0), (0, 1, 0.7), (2, 2, 0.9)])
    text = analyze([a], radii=[0.5, 0.0])
    assert [line.split()[0] for line in text.splitlines()[3:5]] == ["0", "0.5"]
    values = {line.split()[0]: line.split()[-1] for line in text.splitlines()[3:]
              if not line.startswith("-")}
    assert values["abstain"] == "25.0"                     # only the -1 row abstained
    assert (values["0"], values["0.5"]) == ("50.0", "25.0")


def test_default_radii_reach_the_largest_radius(tmp_path):
    assert default_radii(0.8) == [0.0, 0.25, 0.5, 0.75]
    assert default_radii(0.0) == [0.0]
    assert default_radii(0.3, step=0.1) == [0.0, 0.1, 0.2, 0.3]     # 0.3 / 0.1 < 3 in floats
    a = _write(tmp_path / "a.tsv", ROWS_A)
    assert [line.split()[0] for line in analyze([a]).splitlines()[3:8]] == ["0", "0.25", "0.5", "0.75", "1"]


def test_cli_analyze_and_plot(tmp_path, capsys):
    a = _write(tmp_path / "a.tsv", ROWS_A)
    png = tmp_path / "plot.png"
    assert main(["analyze", a, "--radii", "0", "0.5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ACR" in out and "0.400" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the format follows the extension; one matplotlib cannot write is refused
    assert main(["analyze", a, "--plot", str(tmp_path / "plot.pdf")]) == 0
    assert (tmp_path / "plot.pdf").read_bytes()[:5] == b"%PDF-"
    capsys.readouterr()
    assert main(["analyze", a, "--plot", str(tmp_path / "plot.xyz")]) == 2
    assert "not .xyz" in capsys.readouterr().err and not (tmp_path / "plot.xyz").exists()


def test_cli_analyze_plot_that_matplotlib_cannot_write_is_one_line(tmp_path, capsys, monkeypatch):
    """.pgf is a format matplotlib lists, but it needs a LaTeX program to write it."""
    pytest.importorskip("matplotlib")
    a = _write(tmp_path / "a.tsv", ROWS_A)
    monkeypatch.setenv("PATH", str(tmp_path))        # no xelatex to be found
    assert main(["analyze", a, "--plot", str(tmp_path / "plot.pgf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drt-fast: error: cannot write the plot") and "\n" not in err


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n", "radius"),
    ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tbig\t1\t0:00:01\n", "line 2"),
    ("a directory", "Is a directory"),
])
def test_cli_analyze_bad_files_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "r.tsv"
    if content == "a directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drt-fast: error:") and message in err[0]


def test_cli_analyze_negative_radius(tmp_path, capsys):
    a = _write(tmp_path / "a.tsv", ROWS_A)
    assert main(["analyze", a, "--radii", "-1"]) == 2
    assert ">= 0" in capsys.readouterr().err


@pytest.mark.parametrize("radius", [float("nan"), -0.5, float("inf")])
def test_cli_analyze_refuses_a_radius_that_is_no_radius(radius, tmp_path, capsys):
    a = _write(tmp_path / "a.tsv", ROWS_A[:2] + [(3, 3, radius)])
    assert main(["analyze", a]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 4: radius" in err and "\n" not in err


def test_leading_double_dash_is_ignored(tmp_path, capsys):
    """``torchrun ... -m drt_fast -- certify ...`` may pass the ``--`` on to us."""
    a = _write(tmp_path / "a.tsv", ROWS_A)
    assert main(["--", "analyze", a]) == 0
    assert "ACR" in capsys.readouterr().out


def test_a_file_with_no_rows_is_said_to_have_none(tmp_path, capsys):
    """issue 21, item 7: a header-only file printed 0.0 % everywhere."""
    full = _write(tmp_path / "a.tsv", ROWS_A)
    empty = _write(tmp_path / "empty.tsv", [])
    for files in ([empty], [full, empty]):
        assert main(["analyze", *files]) == 2
        err = capsys.readouterr().err
        assert err == f"drt-fast: error: results file {empty!r} has no rows (only a header): nothing to analyze\n"


# ----------------------------------------------------------------------------- sequential files (issue 18)

def _sequential(path, rows, radii=(0.0, 0.25, 0.5), segments=None):
    """A sequential certify file: rows (predict, label, grid radius, n) and its sidecar."""
    lines = [HEADER]
    for i, (pred, label, radius, n) in enumerate(rows):
        lines.append(f"{i}\t{label}\t{pred}\t{radius}\t{int(pred == label)}\t0:00:00.5\t0.9\t{n}\t{n}\n")
    path.write_text("".join(lines))
    meta = {"task": "certify", "certification": "sequential", "radii": list(radii), "futility": 0.01,
            "n0": 100, "n": 2000}
    if segments is not None:
        meta["segments"] = segments
    io.write_json_atomic(io.sidecar_path(str(path)), meta)
    return str(path)


ROWS_S = [(1, 1, 0.5, 300), (2, 2, 0.25, 1200), (3, 4, 0.0, 2000), (-1, 5, 0.0, 2000), (6, 6, 0.0, 500)]


def test_a_sequential_file_is_read_at_its_grid_and_its_acr_called_a_lower_bound(tmp_path):
    s = _sequential(tmp_path / "s.tsv", ROWS_S)
    text = analyze([s])
    assert [line.split()[0] for line in text.splitlines()[3:6]] == ["0", "0.25", "0.5"]   # the grid
    v = {line.split()[0]: line.split()[-1] for line in text.splitlines()[2:] if not line.startswith("-")}
    assert (v["0"], v["0.25"], v["0.5"], v["ACR"]) == ("60.0", "40.0", "20.0", "0.150")
    assert v["mean"] == "1200" and v["certification"] == "sequential"          # mean n
    assert ("s.tsv: sequential certification at radii 0, 0.25, 0.5 (n_max 2000): each input counts the "
            "largest grid radius it certified, so its ACR on grid radii is a lower bound") in text
    assert "off the grid" not in text
    assert "at radii off the grid it shows the accuracy at the next grid radius up" in analyze([s], radii=[0.1])


def test_fixed_n_and_sequential_files_side_by_side_are_told_apart(tmp_path):
    s = _sequential(tmp_path / "s.tsv", ROWS_S)
    f = _write(tmp_path / "f.tsv", ROWS_A)           # fixed n, no sidecar: largest radius 1.1
    c = _write(tmp_path / "c.tsv", ROWS_B, cohen=True)
    text = analyze([s, f, c])
    assert [line.split()[0] for line in text.splitlines()[3:8]] == ["0", "0.25", "0.5", "0.75", "1"]
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:] if not line.startswith("-")}
    assert rows["certification"] == ["sequential", "fixed-n", "fixed-n"]
    assert rows["mean"] == ["n", "1200", "100", "-"]                     # Cohen's file has no n column
    assert rows["1"][0] == "0.0"
    assert sum("sequential certification at radii" in line for line in text.splitlines()) == 1
    # fixed-n files alone: no certification row
    assert "certification" not in analyze([f, c])
    # a sequential file without its sidecar is still told apart, by its n column
    os.remove(s + ".json")
    text = analyze([s, f])
    assert text.splitlines()[-2].split()[1:] == ["sequential", "fixed-n"]
    assert text.splitlines()[-1] == ("s.tsv: its rows took different numbers of draws, as in a sequential file, "
                                     f"but no sidecar ({s}.json) gives its grid: its radii are grid radii, so "
                                     f"its ACR is a lower bound")


# ----------------------------------------------------------------------------- runs of a file (issue 19, item 6)

def test_a_file_written_by_runs_with_other_settings_says_so(tmp_path):
    def written(name, *segments):
        path = _write(tmp_path / name, ROWS_A)
        io.write_json_atomic(io.sidecar_path(path), {"task": "certify", "segments": list(segments)})
        return path

    def segment(first, rows, batch, device="cpu"):
        return {"first_row": first, "rows": rows, "idx": None, "started": "t",
                "settings": {"batch": batch, "device": device}, "torch_version": "2.13"}

    same = written("same.tsv", segment(0, 2, 1000), segment(2, 3, 1000))
    assert "runs" not in analyze([same])
    mixed = written("mixed.tsv", segment(0, 2, 1000), segment(2, 3, 400, "cuda:0 (NVIDIA H100)"))
    assert ("mixed.tsv: written by 2 runs whose settings differ (batch 1000 / 400; device cpu / cuda:0 "
            "(NVIDIA H100)): each may round the base classifier differently") in analyze([mixed])
    # the rows recorded do not matter, the file's do: a run that owns no row mixes nothing in
    empty_run = written("e.tsv", segment(0, 2, 1000), segment(5, 0, 400))
    assert "runs" not in analyze([empty_run])
