"""drt_fast.ensemble: member stacking, the four aggregation modes, validation."""
import pytest
import torch
from torch import nn

from drt_fast import ops
from drt_fast.ensemble import Ensemble, aggregate, as_ensemble
from drt_fast.errors import DrtFastError


def _logits(*members):
    """Stacked logits [M, 1, K] of one draw from per-member lists of K logits."""
    return torch.tensor(members, dtype=torch.float32)[:, None, :]


def _label(members, mode, weights=None):
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    return int(aggregate(_logits(*members), mode, w)[0])


def test_we_and_logit_differ_and_we_ties_go_to_the_smaller_class():
    members = ([1.0, 0.0, -100.0], [-100.0, 0.0, 1.0])
    # logit average [-49.5, 0, -49.5]: class 1
    assert _label(members, "logit") == 1
    # softmax: [0.731, 0.269, 0] and [0, 0.269, 0.731]; average [0.366, 0.269, 0.366]:
    # classes 0 and 2 tie exactly -> 0
    assert _label(members, "we") == 0
    assert _label(members[::-1], "we") == 0


def test_weights_move_we_and_logit():
    members = ([3.0, 0.0], [0.0, 1.0])
    assert _label(members, "logit") == 0                         # [1.5, 0.5]
    assert _label(members, "logit", [0.1, 0.9]) == 1             # [0.3, 0.9]
    assert _label(members, "we", [0.2, 0.8]) == 1                # 0.2*0.953 + 0.8*0.269 = 0.40 < 0.5
    assert _label(members, "we", [0.5, 0.5]) == 0                # 0.611 > 0.5


def test_logit_tie_goes_to_the_smaller_class():
    assert _label(([1.0, 2.0, 0.0], [2.0, 1.0, 0.0]), "logit") == 0


def test_mme_picks_the_member_with_the_largest_margin():
    # member 0 votes 0 with a tiny margin; member 1 votes 2 with a big one; member 2 votes 0
    members = ([2.0, 1.9, 0.0], [0.0, 0.0, 5.0], [3.0, 0.0, 0.0])
    assert _label(members, "mme") == 2
    assert _label(members, "mme", [0.45, 0.1, 0.45]) == 2        # weights play no part in mme
    assert _label(members, "mv") == 0                            # two of three vote 0
    assert _label(members, "we") == 0


def test_mme_member_tie_goes_to_the_smaller_member():
    # equal margins: member 0 decides
    assert _label(([5.0, 0.0, 0.0], [0.0, 5.0, 0.0]), "mme") == 0
    assert _label(([0.0, 5.0, 0.0], [5.0, 0.0, 0.0]), "mme") == 1


def test_mv_weighted_vote_and_ties():
    members = ([2.0, 1.9, 0.0], [0.0, 0.0, 5.0], [3.0, 0.0, 0.0])
    assert _label(members, "mv", [0.2, 0.6, 0.2]) == 2           # 0.6 for class 2 vs 0.4
    assert _label(([0.0, 1.0], [1.0, 0.0]), "mv") == 0           # 1 : 1 -> smaller class
    assert _label(([0.0, 1.0], [1.0, 0.0]), "mv", [1, 3]) == 0   # member 1 votes 0 with 0.75
    assert _label(([0.0, 1.0], [1.0, 0.0]), "mv", [3, 1]) == 1


def test_non_finite_draws_get_minus_one():
    logits = torch.zeros(2, 3, 4)
    logits[1, 1, 2] = float("nan")
    logits[0, 2, 0] = float("inf")
    for mode in ("we", "logit", "mme", "mv"):
        assert aggregate(logits, mode).tolist() == [0, -1, -1]


@pytest.mark.parametrize("mode", ["we", "logit", "mme", "mv"])
def test_aggregate_agrees_with_reference_vote(mode):
    # Random logits, some coarsely quantized so that exact ties occur in every mode.
    g = torch.Generator().manual_seed(1)
    M, R, K = 3, 400, 5
    logits = torch.randn(M, R, K, generator=g)
    logits[:, :200] = logits[:, :200].mul(2).round()
    weights = torch.tensor([0.5, 0.25, 0.25])
    labels = aggregate(logits, mode, weights)
    counts = torch.zeros(R, K, dtype=torch.int64)
    ops.reference_vote_(logits, torch.arange(R), counts, mode, weights)
    assert counts.sum(1).eq(1).all()
    assert torch.equal(counts.argmax(1), labels)


class _Affine(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32))
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def test_forward_stacks_members_and_predict_aggregates():
    m0 = _Affine([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    m1 = _Affine([[0.0, 1.0], [1.0, 0.0]], [0.0, 0.0])
    ens = Ensemble([m0, m1], mode="logit", weights=[3, 1])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = ens(x)
    assert logits.shape == (2, 2, 2)
    assert torch.equal(logits[0], m0(x)) and torch.equal(logits[1], m1(x))
    # weighted logits: 0.75 * m0 + 0.25 * m1 -> each input's own coordinate wins
    assert ens.predict(x).tolist() == [0, 1]
    assert ens.weights.dtype == torch.float32 and ens.weights.tolist() == [0.75, 0.25]
    assert isinstance(ens.members, nn.ModuleList) and len(ens) == 2


def test_as_ensemble():
    m = _Affine([[1.0, 0.0]], [0.0])
    one = as_ensemble(m)
    assert isinstance(one, Ensemble) and len(one) == 1 and one.members[0] is m
    assert one.weights.tolist() == [1.0] and one.mode == "we"
    assert as_ensemble(one) is one
    with pytest.raises(DrtFastError, match="nn.Module"):
        as_ensemble(lambda x: x)


def test_validation():
    m = _Affine([[1.0, 0.0]], [0.0])
    with pytest.raises(DrtFastError, match="mode must be one of"):
        Ensemble([m], mode="avg")
    with pytest.raises(DrtFastError, match="expected 2 ensemble weights"):
        Ensemble([m, m], weights=[1.0])
    with pytest.raises(DrtFastError, match="non-negative"):
        Ensemble([m, m], weights=[1.0, -0.5])
    with pytest.raises(DrtFastError, match="positive sum"):
        Ensemble([m, m], weights=[0.0, 0.0])
    with pytest.raises(DrtFastError, match="at least one member"):
        Ensemble([])
    with pytest.raises(DrtFastError, match="member 1"):
        Ensemble([m, "not a module"])
    ens = Ensemble([m])
    with pytest.raises(DrtFastError, match="mode must be one of"):
        ens.mode = "max"
    with pytest.raises(DrtFastError, match="mode must be one of"):
        aggregate(torch.zeros(1, 1, 2), "vote")


def test_members_with_different_class_counts_are_refused():
    ens = Ensemble([_Affine([[1.0, 0.0]] * 3, [0.0] * 3), _Affine([[1.0, 0.0]] * 4, [0.0] * 4)])
    with pytest.raises(DrtFastError, match="member 1 returned \\[2, 4\\]"):
        ens(torch.zeros(2, 2))


# ------------------------------------------------------------------ batched members (vmap)
def _convnet(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16, 5)).eval()


def _perturb_batchnorm(ens):
    for i, m in enumerate(ens.members):       # non-trivial running stats, different per member
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)


def test_same_architecture_members_run_batched_with_the_same_logits():
    ens = Ensemble([_convnet(s) for s in range(3)], batch_members=True).eval()
    with torch.no_grad():
        _perturb_batchnorm(ens)
    x = torch.rand(32, 1, 4, 4)
    with torch.enable_grad():
        looped = ens(x).detach()                       # autograd on: the member loop
    assert ens._batching_works is None
    with torch.inference_mode():
        first = ens(x)                                 # checked against the loop
        assert ens._batching_works is True
        batched = ens(x)                               # the vmapped call
        assert ens._batched_forward(x).shape == (3, 32, 5)
    torch.testing.assert_close(first, looped)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    # a member changed in place is restacked
    with torch.no_grad():
        ens.members[1][4].bias.add_(10.0)
    with torch.inference_mode():
        changed = ens(x)
    assert torch.allclose(changed[1], looped[1] + 10.0, atol=1e-4)
    torch.testing.assert_close(changed[0], looped[0], rtol=1e-5, atol=1e-5)


def test_batching_is_off_for_mixed_architectures_training_and_unvmappable_members():
    mixed = Ensemble([_convnet(0), nn.Sequential(nn.Flatten(), nn.Linear(16, 5))], batch_members=True)
    with torch.inference_mode():
        mixed.eval()(torch.rand(2, 1, 4, 4))
    assert mixed._batching_works is False
    # a member whose forward reads a tensor's value cannot be vmapped: falls back to the loop
    class Thresholded(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.lin = _Affine(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)),
                               [0.0, 0.0, 0.0])

        def forward(self, x):
            out = self.lin(x)
            return out * 2 if out.max().item() > 100 else out

    ens = Ensemble([Thresholded(0), Thresholded(1)], batch_members=True).eval()
    x = torch.rand(8, 4)
    with torch.inference_mode():
        expected = torch.stack([m(x) for m in ens.members])
        assert torch.equal(ens(x), expected) and ens._batching_works is False
        assert torch.equal(ens(x), expected)
    # training mode and autograd always use the loop
    same = Ensemble([_convnet(s) for s in range(2)], batch_members=True)
    same.train()
    y = same(torch.rand(4, 1, 4, 4))
    assert y.requires_grad and same._batching_works is None
