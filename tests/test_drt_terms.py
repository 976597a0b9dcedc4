"""drt_terms: the DRT regularizers GD and CM against independent computations."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from drt_fast.train.losses import drt_terms, margins


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """f(x) = W x (no bias), x [B, D] -> [B, K]."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def tiny_mlp(seed, d=5, k=4, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, k)).to(dtype)


def expected_terms_linear(ws, x, y, gd_norm):
    """GD and CM for linear members, from the closed-form softmax Jacobian.

    For f = W x and p = softmax(f): dp_c/dx = p_c (W_c - sum_k p_k W_k), so the margin
    gradient is p_y (W_y - W̄) - p_r (W_r - W̄) with W̄ = sum_k p_k W_k.
    """
    per_member = []
    for w in ws:
        z = x @ w.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        rows = []
        for b in range(len(x)):
            others = [c for c in range(w.shape[0]) if c != y[b]]
            r = others[int(np.argmax(p[b, others]))]
            wbar = p[b] @ w
            g = p[b, y[b]] * (w[y[b]] - wbar) - p[b, r] * (w[r] - wbar)
            rows.append((p[b, y[b]] - p[b, r], g, int(np.argmax(z[b])) == y[b]))
        per_member.append(rows)
    cms = [mm for rows in per_member for (mm, _, ok) in rows if ok]
    gds = []
    for i, j in itertools.combinations(range(len(ws)), 2):
        for b in range(len(x)):
            (_, gi, oki), (_, gj, okj) = per_member[i][b], per_member[j][b]
            if oki and okj:
                n = np.linalg.norm(gi + gj)
                gds.append(n if gd_norm == "l2" else n * n)
    return (np.mean(gds) if gds else 0.0), (np.mean(cms) if cms else 0.0), len(gds), len(cms)


@pytest.mark.parametrize("gd_norm", ["l2", "sq"])
def test_linear_members_match_closed_form(gd_norm):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 6))
    ws = [base + 0.8 * rng.normal(size=(4, 6)) for _ in range(3)]   # related, not equal
    x = rng.normal(size=(16, 6))
    y = np.argmax(x @ ws[0].T, axis=1)              # member 0 always right, others sometimes
    y[::5] = (y[::5] + 1) % 4                       # ... and some samples where it is wrong
    gd_ref, cm_ref, n_gd, n_cm = expected_terms_linear(ws, x, y, gd_norm)
    assert 0 < n_gd < 3 * 16 and 0 < n_cm < 3 * 16   # the masks really select something
    members = [Linear(w) for w in ws]
    gd, cm = drt_terms(members, torch.tensor(x), torch.tensor(y), gd_norm=gd_norm)
    assert gd.item() == pytest.approx(gd_ref, rel=1e-10)
    assert cm.item() == pytest.approx(cm_ref, rel=1e-10)


def test_margin_uses_runner_up_over_other_classes():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64))
    m, correct = margins(logits, torch.tensor([0, 0]))
    assert m.tolist() == pytest.approx([0.5 - 0.3, 0.1 - 0.6])
    assert correct.tolist() == [True, False]


@pytest.mark.parametrize("gd_norm", ["l2", "sq"])
def test_gradcheck_wrt_input_and_parameters(gd_norm):
    members = [tiny_mlp(s) for s in range(3)]
    torch.manual_seed(5)
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        y = members[0](x).argmax(1)
    correct = torch.stack([f(x).argmax(1) == y for f in members])
    assert correct[1:].any() and not correct.all()   # some pairs eligible, some not

    x_in = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: drt_terms(members, t, y, gd_norm), (x_in,))

    # with respect to a parameter of member 1: the double-backprop path that trains GD
    def terms_of_weight(w):
        member1 = lambda t: torch.func.functional_call(members[1], {"2.weight": w}, (t,))
        return drt_terms([members[0], member1, members[2]], x, y, gd_norm)

    w_in = members[1][2].weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(terms_of_weight, (w_in,))


def test_wrong_member_contributes_nothing():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    x = torch.tensor(rng.normal(size=(20, 6)))
    y = (x @ torch.tensor(a).T).argmax(1)
    # rolling a's classes by one makes it wrong exactly where a is right: everywhere
    wrong = Linear(np.roll(a, 1, axis=0))
    two = [Linear(a), Linear(b)]
    three = [Linear(a), Linear(b), wrong]
    for norm in ("l2", "sq"):
        gd2, cm2 = drt_terms(two, x, y, norm)
        gd3, cm3 = drt_terms(three, x, y, norm)
        assert gd3.item() == pytest.approx(gd2.item(), rel=1e-12)
        assert cm3.item() == pytest.approx(cm2.item(), rel=1e-12)
    (gd3 - cm3).backward()
    assert wrong.weight.grad is not None and torch.count_nonzero(wrong.weight.grad) == 0
    assert torch.count_nonzero(three[1].weight.grad) > 0


def test_nothing_eligible_gives_zero_with_valid_graph():
    members = [tiny_mlp(s, dtype=torch.float32) for s in range(2)]
    x = torch.randn(4, 5)
    with torch.no_grad():
        y = (members[0](x).argmax(1) + 1) % 4       # member 0 wrong everywhere
    gd, cm_ = drt_terms(members[:1] + members[:1], x, y)
    assert gd.item() == 0.0 and cm_.item() == 0.0
    (gd - cm_).backward()                          # must not raise
    assert all(p.grad is not None for p in members[0].parameters())


def test_parameters_receive_gradient_through_gd():
    """Double backprop: GD alone (no CE, no CM) moves the parameters, and lowering it works."""
    members = [tiny_mlp(s, dtype=torch.float32) for s in range(3)]
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    with torch.no_grad():
        y = torch.stack([f(x) for f in members]).mean(0).argmax(1)
    gd0, _ = drt_terms(members, x, y)
    gd0.backward()
    for f in members:
        assert f[0].weight.grad.abs().sum() > 0       # first layer: only via the input gradient
    params = [p for f in members for p in f.parameters()]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        gd, _ = drt_terms(members, x, y)
        gd.backward()
        opt.step()
    gd1, _ = drt_terms(members, x, y)
    assert gd1.item() < 0.7 * gd0.item()


def test_bad_gd_norm():
    with pytest.raises(ValueError, match="gd_norm"):
        drt_terms([tiny_mlp(0)], torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]), "l1")


def test_saturated_members_give_finite_gradients():
    """Confident float32 members: softmax saturates to exactly 1, the margin gradients are
    exactly 0 and so is ||g_i + g_j||, whose sqrt has an infinite derivative there; the
    parameters' gradient must stay finite (0 here), or one such batch turns the weights NaN."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 6))
    members = [Linear(torch.tensor(500 * w, dtype=torch.float32)),
               Linear(torch.tensor(500 * w + rng.normal(size=(4, 6)), dtype=torch.float32))]
    x = torch.tensor(rng.normal(size=(8, 6)), dtype=torch.float32)
    y = (x @ torch.tensor(w, dtype=torch.float32).T).argmax(1)
    for norm in ("l2", "sq"):
        gd, cm = drt_terms(members, x, y, norm)
        assert gd.item() < 1e-6 and cm.item() == pytest.approx(1.0)
        for f in members:
            f.weight.grad = None
        (gd - cm).backward()
        assert all(bool(torch.isfinite(f.weight.grad).all()) for f in members)
