"""The public API as DESIGN.md section 4 writes it: `import drt_fast as df` and the names it
uses, run on a saved digits ensemble (small n)."""
import pytest
import torch

import drt_fast as df
from drt_fast import data, models
from drt_fast.engine import State
from drt_fast.models import with_normalization

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_public_name_resolves():
    for name in df.__all__:
        assert getattr(df, name) is not None, name
    with pytest.raises(AttributeError):
        df.no_such_name


def test_design_section_4_runs_as_written(tmp_path):
    torch.manual_seed(0)
    members = [with_normalization(models.create("digits_cnn", 10), *data.normalization("digits"))
               for _ in range(3)]
    ens = df.Ensemble(members, mode="we", weights=None)
    df.save_ensemble(tmp_path / "ckpt.pt", ens, arch="digits_cnn", dataset="digits", num_classes=10,
                     input_shape=(1, 8, 8), normalization=None, sigma=0.25, train_config=None)
    ens = df.load_ensemble(tmp_path / "ckpt.pt")
    assert isinstance(ens, df.Ensemble) and len(ens) == 3 and ens.meta["num_classes"] == 10
    smooth = df.SmoothedClassifier(ens, num_classes=10, sigma=0.25, seed=0)
    xs = torch.rand(3, 1, 8, 8)
    label = smooth.predict(xs[0], n=200, alpha=0.001, batch_size=100, key=0)
    cert = smooth.certify(xs[0], n0=20, n=200, alpha=0.001, batch_size=100, key=0)
    certs = smooth.certify_many(xs, torch.arange(3), n0=20, n=200, alpha=0.001, batch_size=100)
    assert -1 <= label < 10
    assert (cert.label, cert.radius, cert.pA_lower, cert.count, cert.n) == \
        (certs[0].label, certs[0].radius, certs[0].pA_lower, certs[0].count, certs[0].n)
    assert cert.n == 200 and (cert.label == -1) == (cert.radius == 0.0)


def _digits_smoothed():
    torch.manual_seed(0)
    members = [with_normalization(models.create("digits_cnn", 10), *data.normalization("digits"))
               for _ in range(2)]
    return df.SmoothedClassifier(df.Ensemble(members), num_classes=10, sigma=0.25, seed=0)


@pytest.mark.parametrize("call, error, message", [
    (lambda s, x: s.certify(x, n0=0, n=100, alpha=0.001, batch_size=100), ValueError, "n0 must be >= 1"),
    (lambda s, x: s.certify(x, n0=10, n="100", alpha=0.001, batch_size=100), TypeError, "n must be an integer"),
    (lambda s, x: s.certify(x, n0=10, n=100, alpha=float("nan"), batch_size=100), ValueError, "alpha"),
    (lambda s, x: s.certify(x, n0=10, n=100, alpha=None, batch_size=100), TypeError, "alpha"),
    (lambda s, x: s.predict(x, n=100, alpha=1.0, batch_size=100), ValueError, "alpha"),
    (lambda s, x: s.certify(x, n0=10, n=100, alpha=0.001, batch_size=0), ValueError, "batch_size"),
    (lambda s, x: s.certify(x.long(), n0=10, n=100, alpha=0.001, batch_size=100), ValueError, "floating"),
    (lambda s, x: df.SmoothedClassifier(s.model, 10, sigma=-1), ValueError, "sigma"),
    (lambda s, x: df.SmoothedClassifier(s.model, 10, sigma="big"), TypeError, "sigma"),
    (lambda s, x: df.Ensemble([]), ValueError, "at least one member"),
    (lambda s, x: df.Ensemble(list(s.model.members), mode="avg"), ValueError, "mode"),
    (lambda s, x: df.Ensemble(list(s.model.members), weights=[1.0]), ValueError, "weights"),
    (lambda s, x: df.SmoothedClassifier("model", 10, sigma=0.25), TypeError, "nn.Module"),
])
def test_bad_arguments_raise_value_and_type_errors(call, error, message):
    """What Python code expects of a bad argument (and still a DrtFastError, which the CLI
    prints as one line)."""
    with pytest.raises(error, match=message) as info:
        call(_digits_smoothed(), torch.rand(1, 8, 8))
    assert isinstance(info.value, df.DrtFastError)


def test_nan_pixels_are_refused_on_every_call_even_by_rewritten_members():
    """A NaN pixel must never yield a certificate: oneDNN's fused ReLU turns NaN into 0, so
    once the fused copies of a CIFAR ResNet are checked, NaN logits would not show it."""
    torch.manual_seed(0)
    member = with_normalization(models.create("cifar_resnet20", 10), (0.5,) * 3, (0.25,) * 3).eval()
    smooth = df.SmoothedClassifier(member, num_classes=10, sigma=0.25, seed=0)
    x = torch.rand(3, 32, 32)
    first = smooth.certify(x, n0=10, n=100, alpha=0.001, batch_size=110, key=0)
    bad = x.clone()
    bad[1, 4, 4] = float("nan")
    infinite = x.clone()
    infinite[0, 0, 0] = float("inf")
    for call in (lambda: smooth.certify(bad, n0=10, n=100, alpha=0.001, batch_size=110),
                 lambda: smooth.predict(bad, n=100, alpha=0.001, batch_size=110),
                 lambda: smooth.certify_many(torch.stack([x, infinite]), [0, 1], n0=10, n=100,
                                             alpha=0.001, batch_size=220)):
        with pytest.raises(ValueError, match="NaN or infinite pixels"):
            call()
    again = smooth.certify(x, n0=10, n=100, alpha=0.001, batch_size=110, key=0)   # nothing changed
    assert (again.label, again.count) == (first.label, first.count)


def test_a_wrong_input_shape_is_explained_and_leaves_the_classifier_as_it_was():
    smooth = _digits_smoothed()
    x = torch.rand(1, 8, 8)
    first = smooth.certify(x, n0=10, n=100, alpha=0.001, batch_size=110, key=0)
    status = smooth.fuse_status
    with pytest.raises(ValueError, match=r"the model failed on noisy inputs of shape \[110, 3, 32, 32\]"):
        smooth.certify(torch.rand(3, 32, 32), n0=10, n=100, alpha=0.001, batch_size=110)
    again = smooth.certify(x, n0=10, n=100, alpha=0.001, batch_size=110, key=0)
    assert (again.label, again.count) == (first.label, first.count)
    assert smooth.fuse_status == status


def test_nan_weights_are_reported_without_giving_up_the_fused_copies():
    """The model's own NaN logits are the error to report (NonFiniteLogitsError), not a
    disagreement of its fused copies (which would warn and switch them off for good)."""
    import warnings

    torch.manual_seed(0)
    member = with_normalization(models.create("cifar_resnet20", 10), (0.5,) * 3, (0.25,) * 3).eval()
    with torch.no_grad():
        member[1].conv1.weight[0, 0, 0, 0] = float("nan")
    smooth = df.SmoothedClassifier(member, num_classes=10, sigma=0.25, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(df.NonFiniteLogitsError, match="NaN/inf logits on 110 of 110"):
            smooth.certify(torch.rand(3, 32, 32), n0=10, n=100, alpha=0.001, batch_size=110)
    assert smooth.fuse_status.state is not State.OFF


def test_out_of_memory_is_not_called_a_bad_argument():
    """The first forward explains a model's failure as a bad input shape, but running out of
    memory is the batch's size: it stays the allocator's error (the CLI says --batch)."""
    class Hungry(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")

    smooth = df.SmoothedClassifier(Hungry(), num_classes=10, sigma=0.25)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        smooth.certify(torch.rand(1, 8, 8), n0=10, n=100, alpha=0.001, batch_size=110)
    assert not isinstance(info.value, df.DrtFastError)
