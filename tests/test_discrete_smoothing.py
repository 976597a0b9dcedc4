"""Certification with discrete noise (SmoothedClassifier(noise="discrete"), drt-fast --noise
discrete): sound on a linear oracle whose smoothed classifier is known exactly, the table's
slack taken off pA_lower, inputs off the grid refused in one line, the same certificates for
any batching and from the reference ops, and the CLI's option."""
import json
import re

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import drt_fast as df
from drt_fast import ops, stats
from drt_fast.cli import main
from drt_fast.errors import InvalidArgument

GRID, SIGMA = 16, 0.25
BOUNDARY = 7.5 / GRID      # a half-grid point, exact in fp32


class Threshold(nn.Module):
    """Class 1 iff pixel (0, 0, 0) > BOUNDARY. On the grid, (v + I) / 16 > 7.5 / 16 iff
    v + I >= 8, exactly in fp32: with the rounding to the grid this is the base classifier
    h(y) = [y_0 >= BOUNDARY], whose Gaussian smoothing is known in closed form."""

    def forward(self, x):
        score = (x[:, 0, 0, 0] - BOUNDARY) * 100.0
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _smoothed(seed=0, **kwargs):
    return df.SmoothedClassifier(Threshold(), num_classes=2, sigma=SIGMA, seed=seed, noise="discrete", grid=GRID,
                                 fuse=False, **kwargs)


def _inputs(levels):
    """Inputs [B, 1, 2, 2] on the grid whose pixel (0, 0) is level / 16."""
    x = torch.full((len(levels), 1, 2, 2), 3 / GRID)
    x[:, 0, 0, 0] = torch.tensor(levels, dtype=torch.float32) / GRID
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certificates_are_sound_on_a_linear_oracle(seed):
    """At x = v / 16 the smoothed classifier of h is class 1 with pA = Phi((x_0 - BOUNDARY) /
    sigma), and it stays class 1 exactly up to the distance x_0 - BOUNDARY: every certificate
    must lie below both (Cohen's bound is tight here: within a few % of them)."""
    levels = [8, 9, 10, 12, 14]
    certs = _smoothed(seed).certify_many(_inputs(levels), list(range(len(levels))), 100, 20_000, 0.001, 4000)
    for level, cert in zip(levels, certs):
        distance = (level - 7.5) / GRID
        exact_pA = scipy.stats.norm.cdf(distance / SIGMA)
        if level == 8 and cert.label == -1:        # pA = 0.55: the selection may pick class 0
            continue
        assert cert.label == 1
        assert cert.pA_lower <= exact_pA
        assert cert.radius <= distance
        assert cert.radius >= distance - 0.05      # and not far below: the noise is the right one


def test_certificates_take_off_the_tables_slack():
    smoothed = _smoothed()
    table = ops.discrete_table(SIGMA, GRID)
    cert = smoothed.certify(_inputs([10])[0], 100, 5000, 0.001, 1000, key=3)
    slack = table.slack(4)
    assert 0 < slack < 1e-15
    assert cert.pA_lower == stats.lower_confidence_bound(cert.count, cert.n, 0.001) - slack
    assert cert.radius == stats.radius(SIGMA, cert.pA_lower)


def test_radius_uses_sigma_itself():
    """The table is built from the double sigma (the Gaussian noise's radius uses the smaller
    of sigma and its fp32 rounding, which the kernels add)."""
    smoothed = df.SmoothedClassifier(Threshold(), 2, sigma=0.12, noise="discrete", grid=255)
    assert smoothed.radius_sigma == 0.12 and smoothed.table.sigma == 0.12
    assert df.SmoothedClassifier(Threshold(), 2, sigma=0.12).radius_sigma < 0.12


def test_inputs_off_the_grid_are_refused():
    smoothed = _smoothed()
    x = _inputs([10])
    x[0, 0, 1, 1] = 0.3
    with pytest.raises(InvalidArgument, match=r"grid of step 1/16 .* pixel \[0, 0, 1, 1\] is 0.3") as info:
        smoothed.certify(x[0], 10, 100, 0.001, 100, key=0)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgument, match="grid of step 1/16"):
        smoothed.predict(x[0], 100, 0.001, 100, key=0)


def test_bad_noise_settings_are_refused():
    with pytest.raises(InvalidArgument, match="noise must be one of gaussian, discrete"):
        df.SmoothedClassifier(Threshold(), 2, sigma=0.25, noise="uniform")
    with pytest.raises(InvalidArgument, match="grid must be in"):
        df.SmoothedClassifier(Threshold(), 2, sigma=0.25, noise="discrete", grid=0)


def test_certificates_do_not_depend_on_batching_or_on_the_ops_in_use():
    levels = [6, 8, 9, 11]
    x, keys = _inputs(levels), [5, 6, 7, 8]
    smoothed = _smoothed(seed=4)
    together = smoothed.certify_many(x, keys, 50, 3000, 0.001, 997)
    alone = [smoothed.certify(x[i], 50, 3000, 0.001, 128, key=keys[i]) for i in range(4)]
    with ops.use_reference():
        reference = _smoothed(seed=4).certify_many(x, keys, 50, 3000, 0.001, 2048)
    assert together == alone == reference
    assert [smoothed.predict(x[i], 500, 0.001, 100, key=keys[i]) for i in range(4)] == \
        smoothed.predict_many(x, keys, 500, 0.001, 333)


def test_discrete_certificates_are_close_to_gaussian_ones():
    """Same model, same counts to within sampling noise: the rounded Gaussian on a fine grid
    is nearly the Gaussian (the radius difference here is about 1e-2)."""
    x, keys = _inputs([9, 11, 13]), [0, 1, 2]
    gaussian = df.SmoothedClassifier(Threshold(), 2, sigma=SIGMA, fuse=False)
    for d, g in zip(_smoothed().certify_many(x, keys, 100, 20_000, 0.001, 5000),
                    gaussian.certify_many(x, keys, 100, 20_000, 0.001, 5000)):
        assert d.label == g.label == 1 and abs(d.radius - g.radius) < 0.03


# ---------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------
RUN = ["--n", "300", "--n0", "20", "--max", "3", "--batch", "400", "--quiet"]


def test_cli_certifies_with_discrete_noise_and_records_it(tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    assert main(["certify", "--noise", "discrete", *RUN, "--out", out]) == 0
    assert "(discrete, grid 1/16)" in capsys.readouterr().out
    with open(out + ".json") as f:
        config = json.load(f)
    assert config["noise"] == "discrete" and config["grid"] == 16
    # a resume must use the same noise
    assert main(["certify", *RUN, "--out", out, "--resume"]) == 2
    assert "noise: 'discrete' in the file, 'gaussian' now" in capsys.readouterr().err


def test_cli_gaussian_sidecars_of_earlier_versions_resume(tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    assert main(["certify", *RUN, "--max", "2", "--out", out]) == 0
    with open(out + ".json") as f:
        config = json.load(f)
    del config["noise"], config["grid"]            # as written before --noise existed
    with open(out + ".json", "w") as f:
        json.dump(config, f)
    assert main(["certify", *RUN, "--out", out, "--resume"]) == 0
    assert main(["certify", "--noise", "discrete", *RUN, "--max", "4", "--out", out, "--resume"]) == 2


def test_cli_refuses_inputs_off_the_grid_in_one_line(tmp_path, capsys):
    data = np.load(df.__path__[0] + "/assets/digits_test.npz")
    x = data["x"].copy()
    x[1, 0, 3, 4] = 0.3
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x, y=data["y"], idx=data["idx"], grid=np.array(16))
    code = main(["certify", "--model", df.__path__[0] + "/assets/default.pt", "--dataset", "npz",
                 "--data-dir", path, "--noise", "discrete", *RUN])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "input idx" in err and "not on the grid of step 1/16" in err and "0.3" in err


@pytest.mark.parametrize("args,message", [
    (["--grid", "255"], "--grid is the pixel grid of --noise discrete"),
    (["--noise", "discrete", "--grid", "0"], r"--grid must be in \[1, 2\^20\]"),
    (["--noise", "discrete", "--grid", "255"], "not on the grid of step 1/255"),
])
def test_cli_bad_grids(args, message, capsys):
    assert main(["certify", *args, *RUN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)


def test_cli_float_npz_without_a_grid_needs_one(tmp_path, capsys):
    data = np.load(df.__path__[0] + "/assets/digits_test.npz")
    path = str(tmp_path / "d.npz")
    np.savez(path, x=data["x"], y=data["y"], idx=data["idx"])
    base = ["certify", "--model", df.__path__[0] + "/assets/default.pt", "--dataset", "npz", "--data-dir", path,
            "--noise", "discrete", *RUN]
    assert main(base) == 2
    assert "pass --grid Q" in capsys.readouterr().err
    assert main([*base, "--grid", "16"]) == 0


def test_datasets_say_their_grid(tmp_path):
    from drt_fast import data
    from drt_fast.errors import DrtFastError

    digits = data.load("digits", "test")
    assert digits.grid == 16 and ops.first_off_grid(digits.x, 16) is None
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", x=x, y=np.zeros(4, dtype=np.int64))
    assert data.load("npz", data_dir=tmp_path / "u8.npz").grid == 255
    np.savez(tmp_path / "f.npz", x=x / 255.0, y=np.zeros(4, dtype=np.int64))
    assert data.load("npz", data_dir=tmp_path / "f.npz").grid is None
    np.savez(tmp_path / "bad.npz", x=x / 255.0, y=np.zeros(4, dtype=np.int64), grid=np.array(2.5))
    with pytest.raises(DrtFastError, match="grid must be one integer"):
        data.load("npz", data_dir=tmp_path / "bad.npz")
