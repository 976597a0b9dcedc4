"""The public API as DESIGN.md section 4 writes it: `import drt_fast as df` and the names it
uses, run on a saved digits ensemble (small n)."""
import pytest
import torch

import drt_fast as df
from drt_fast import data, models
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
    label = smooth.predict(xs[0], n=200, alpha=0.001, batch_size=100)
    cert = smooth.certify(xs[0], n0=20, n=200, alpha=0.001, batch_size=100)
    certs = smooth.certify_many(xs, torch.arange(3), n0=20, n=200, alpha=0.001, batch_size=100)
    assert -1 <= label < 10
    assert (cert.label, cert.radius, cert.pA_lower, cert.count, cert.n) == \
        (certs[0].label, certs[0].radius, certs[0].pA_lower, certs[0].count, certs[0].n)
    assert cert.n == 200 and (cert.label == -1) == (cert.radius == 0.0)
