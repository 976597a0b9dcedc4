"""drt-fast diagnose: gradient cosines and margins against closed-form linear members."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from drt_fast import cli
from drt_fast.train.diagnose import diagnose, format_table


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def closed_form(ws, xs, y):
    """Per member margins, correctness and margin gradients of linear members (numpy)."""
    out = []
    for w in ws:
        z = xs @ w.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        m, g = [], []
        for b in range(len(xs)):
            others = [c for c in range(w.shape[0]) if c != y[b]]
            r = others[int(np.argmax(p[b, others]))]
            wbar = p[b] @ w
            m.append(p[b, y[b]] - p[b, r])
            g.append(p[b, y[b]] * (w[y[b]] - wbar) - p[b, r] * (w[r] - wbar))
        out.append((np.array(m), np.argmax(z, 1) == y, np.array(g), p))
    return out


def test_matches_closed_form_for_linear_members():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 6))
    ws = [base + 0.7 * rng.normal(size=(4, 6)) for _ in range(3)]
    x = rng.normal(size=(30, 6))
    y = np.argmax(x @ base.T, 1)
    sigma, draws, seed = 0.3, 3, 7
    members = [Linear(w) for w in ws]
    d = diagnose(members, torch.tensor(x), torch.tensor(y), sigma, noise_draws=draws, seed=seed)

    gen = torch.Generator().manual_seed(seed)            # the same noise, drawn the same way
    noisy = [x + sigma * torch.randn(x.shape, generator=gen, dtype=torch.float64).numpy()
             for _ in range(draws)]
    per_draw = [closed_form(ws, xn, y) for xn in noisy]
    margin = [np.mean([pd[i][0] for pd in per_draw]) for i in range(3)]
    acc = [np.mean([pd[i][1] for pd in per_draw]) for i in range(3)]
    cos = {}
    for i, j in itertools.combinations(range(3), 2):
        vals = [np.sum(pd[i][2] * pd[j][2], 1)
                / (np.linalg.norm(pd[i][2], axis=1) * np.linalg.norm(pd[j][2], axis=1))
                for pd in per_draw]
        cos[(i, j)] = np.mean(vals)
    ens_p = [np.mean([pd[i][3] for i in range(3)], 0) for pd in per_draw]
    ens_acc = np.mean([np.argmax(p, 1) == y for p in ens_p])
    ens_margin = np.mean([p[np.arange(len(y)), y] - np.where(np.eye(4, dtype=bool)[y], -np.inf, p).max(1)
                          for p in ens_p])                # on the averaged probabilities

    assert d.num_samples == 90
    assert d.member_margin == pytest.approx(margin, rel=1e-9)
    assert d.member_accuracy == pytest.approx(acc)
    assert d.pair_cosine.keys() == cos.keys()
    for k in cos:
        assert d.pair_cosine[k] == pytest.approx(cos[k], rel=1e-9)
    assert d.ensemble_accuracy == pytest.approx(ens_acc)
    assert d.ensemble_margin == pytest.approx(ens_margin, rel=1e-6)
    assert 0 < min(acc) and max(acc) < 1                  # a non-trivial case


def test_identical_members_have_cosine_one_and_modes_are_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    d = diagnose([net, net], x, y, sigma=0.5, noise_draws=2, batch=16)
    assert d.pair_cosine[(0, 1)] == pytest.approx(1.0, abs=1e-5)
    assert d.member_margin[0] == d.member_margin[1]
    assert net.training and all(p.grad is None for p in net.parameters())
    table = format_table(d)
    assert "gradient cosine" in table and "ensemble (WE)" in table


class _ModeRecording(Linear):
    """A linear member that records its mode at every forward (eval and train differ in
    members with BatchNorm: diagnose must see the eval-mode ones)."""

    def __init__(self, weight):
        super().__init__(weight)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return super().forward(x)


def test_members_are_diagnosed_in_eval_mode_and_restored():
    rng = np.random.default_rng(2)
    members = [_ModeRecording(rng.normal(size=(3, 5))) for _ in range(2)]
    members[1].eval()
    diagnose(members, torch.tensor(rng.normal(size=(8, 5))), torch.tensor([0, 1, 2] * 2 + [0, 1]),
             sigma=0.2, noise_draws=2, batch=4)
    assert all(f.modes == [False] * 4 for f in members)
    assert members[0].training and not members[1].training


def _digits_members(k=2):
    from drt_fast import data, models

    torch.manual_seed(0)
    return [models.with_normalization(models.create("digits_cnn", 10), *data.normalization("digits"))
            for _ in range(k)]


def _save(path, members):
    from drt_fast import Ensemble, data
    from drt_fast.checkpoint import save_ensemble

    save_ensemble(path, Ensemble(members), arch="digits_cnn", dataset="digits", num_classes=10,
                  input_shape=[1, 8, 8], normalization=data.normalization("digits"), sigma=0.25,
                  train_config={})
    return path


def test_cli_prints_the_table(tmp_path, capsys):
    path = _save(tmp_path / "e.pt", _digits_members())
    assert cli.main(["diagnose", str(path), "--n-inputs", "20", "--noise-draws", "2"]) == 0
    out = capsys.readouterr().out
    assert "noisy samples: 40" in out and "0,1" in out
    assert cli.main(["diagnose", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["diagnose", str(path), "--noise-draws", "0"]) == 2
    capsys.readouterr()
    assert cli.main(["diagnose", str(path), "--device", "gpu"]) == 2   # one line, no traceback
    assert capsys.readouterr().err.strip() == \
        "drt-fast: error: --device must be auto, cpu, cuda or cuda:i, got 'gpu'"


def test_cli_refuses_a_model_that_does_not_fit_the_data_in_one_line(tmp_path, capsys):
    """As certify does: shapes and classes are checked before any forward, NaN logits are an
    error, each one line on stderr and exit 2 (no traceback, no table)."""
    from drt_fast import data

    ds = data.load("digits", "test")
    members = _digits_members()
    path = _save(tmp_path / "e.pt", members)
    mnist_like = tmp_path / "m.npz"
    np.savez(mnist_like, x=np.random.rand(4, 1, 28, 28).astype(np.float32), y=np.arange(4))
    five = tmp_path / "five.npz"
    np.savez(five, x=ds.x[:5].numpy(), y=np.arange(5), num_classes=5)
    for data_file, message in [(mnist_like, "shape"), (five, "has 10 classes, the npz data has 5")]:
        assert cli.main(["diagnose", str(path), "--dataset", "npz", "--data-dir", str(data_file),
                         "--n-inputs", "4", "--noise-draws", "1"]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and captured.out == ""
    with torch.no_grad():
        members[1][1].fc.bias[3] = float("nan")
    _save(tmp_path / "nan.pt", members)
    assert cli.main(["diagnose", str(tmp_path / "nan.pt"), "--n-inputs", "4", "--noise-draws", "1"]) == 2
    captured = capsys.readouterr()
    assert "NaN or inf" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


def test_cli_takes_member_files_and_asks_for_sigma_as_certify_does(tmp_path, capsys):
    """issue 21, item 4: DRT saves one file per member, which certify and info accept."""
    members = _digits_members(2)
    paths = []
    for i, member in enumerate(members):         # the DRT code's layout: one Cohen file per member
        paths.append(str(tmp_path / f"m{i}.pth.tar"))
        torch.save({"arch": "digits_cnn", "state_dict": member.state_dict()}, paths[-1])
    assert cli.main(["diagnose", *paths, "--n-inputs", "20", "--noise-draws", "2"]) == 2
    assert capsys.readouterr().err == f"drt-fast: error: checkpoint {', '.join(paths)} has no training sigma; pass --sigma\n"
    assert cli.main(["diagnose", *paths, "--sigma", "0.25", "--n-inputs", "20", "--noise-draws", "2"]) == 0
    joined = capsys.readouterr().out
    assert joined.startswith(f"{', '.join(paths)}: 2 members, digits test (first 20 inputs), sigma 0.25")
    # the same members in one file give the same table
    one = _save(tmp_path / "e.pt", members)
    assert cli.main(["diagnose", str(one), "--n-inputs", "20", "--noise-draws", "2"]) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == joined.split("\n", 1)[1]
