"""Ensemble checkpoints: drt-fast files round trip; Cohen/DRT checkpoints import; every
bad file is a one-line DrtFastError."""
import os
import pickle

import pytest
import torch

from drt_fast import checkpoint, data, models
from drt_fast.checkpoint import describe, load_checkpoint, load_members, save_ensemble
from drt_fast.ensemble import Ensemble
from drt_fast.errors import DrtFastError
from drt_fast.models import with_normalization

DIGITS_NORM = data.normalization("digits")
CIFAR_NORM = data.normalization("cifar10")


pytestmark = pytest.mark.usefixtures("one_thread")


def digits_members(k=3, seed=0):
    torch.manual_seed(seed)
    return [with_normalization(models.create("digits_cnn", 10), *DIGITS_NORM) for _ in range(k)]


def save_digits(path, members=None, **kw):
    ens = Ensemble(members or digits_members(), mode=kw.pop("mode", "we"),
                   weights=kw.pop("weights", None))
    args = dict(arch="digits_cnn", dataset="digits", num_classes=10, input_shape=(1, 8, 8),
                normalization=DIGITS_NORM, sigma=0.25, train_config={"rho1": 0.5, "epochs": 3})
    args.update(kw)
    return ens, save_ensemble(path, ens, **args)


def cohen_state(model):
    """A state dict as Cohen's code saves it: NormalizeLayer without state, so only the
    ``1.`` keys of Sequential(NormalizeLayer, model)."""
    return {f"1.{k}": v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------- drt-fast files

def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    ens, path = save_digits(tmp_path / "ens.pt", mode="mme", weights=[1, 2, 1])
    loaded, meta = load_checkpoint(path)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ens.eval()(x), loaded(x))
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert loaded.mode == "mme" and torch.allclose(loaded.weights, torch.tensor([0.25, 0.5, 0.25]))
    assert meta["arch"] == "digits_cnn" and meta["archs"] == ["digits_cnn"] * 3
    assert meta["dataset"] == "digits" and meta["num_classes"] == 10
    assert meta["input_shape"] == (1, 8, 8) and meta["normalization"] == DIGITS_NORM
    assert meta["sigma"] == 0.25 and meta["train_config"] == {"rho1": 0.5, "epochs": 3}
    assert meta["format"] == "drt-fast" and meta["members"] == 3
    import hashlib
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # the file is plain containers: weights_only loading works, and the layout is as documented
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "drt-fast-ensemble" and raw["version"] == 1
    assert set(raw["members"][0]) == set(ens.members[0].state_dict())
    assert raw["normalization"] == {"means": [0.3052], "sds": [0.376]}
    # the mode can be overridden at load time
    assert load_checkpoint(path, mode="mv")[0].mode == "mv"
    with pytest.raises(DrtFastError, match="mode"):
        load_checkpoint(path, mode="median")


def test_load_ensemble_is_the_public_loader_with_metadata_attached(tmp_path):
    ens, path = save_digits(tmp_path / "ens.pt", mode="mme")
    loaded = checkpoint.load_ensemble(path)
    assert isinstance(loaded, Ensemble) and loaded.mode == "mme" and len(loaded) == 3
    assert loaded.meta == load_checkpoint(path)[1]
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ens.eval()(x), loaded(x))


def test_bare_members_get_the_normalization_layer(tmp_path):
    torch.manual_seed(1)
    bare = [models.create("digits_cnn", 10) for _ in range(2)]
    save_ensemble(tmp_path / "bare.pt", Ensemble(bare), arch="digits_cnn", dataset="digits",
                  num_classes=10, input_shape=None, normalization=None, sigma=None,
                  train_config=None)
    loaded, meta = load_checkpoint(tmp_path / "bare.pt")
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = torch.stack([with_normalization(m, *DIGITS_NORM).eval()(x) for m in bare])
        torch.testing.assert_close(loaded(x), expected)
    assert meta["normalization"] == DIGITS_NORM and meta["sigma"] is None
    # a single module is a one-member ensemble
    save_ensemble(tmp_path / "one.pt", bare[0], arch="digits_cnn", dataset="digits", num_classes=10)
    assert len(load_checkpoint(tmp_path / "one.pt")[0]) == 1


def test_save_is_atomic_and_checks_before_writing(tmp_path):
    _, path = save_digits(tmp_path / "ens.pt")
    before = path.read_bytes()
    # a member that is not the declared arch: refused, old file untouched, no temp files
    with pytest.raises(DrtFastError, match="does not match architecture lenet"):
        save_digits(path, arch="lenet", input_shape=(1, 28, 28))
    with pytest.raises(DrtFastError, match="does not match architecture digits_cnn with 5 classes"):
        save_digits(path, num_classes=5)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ens.pt"]
    # overwriting works and leaves no temp file
    save_digits(path, members=digits_members(seed=5))
    assert path.read_bytes() != before and sorted(os.listdir(tmp_path)) == ["ens.pt"]
    with pytest.raises(DrtFastError, match="folder .* does not exist"):
        save_digits(tmp_path / "missing" / "ens.pt")
    with pytest.raises(DrtFastError, match="sigma"):
        save_digits(tmp_path / "x.pt", sigma=-1.0)
    with pytest.raises(DrtFastError, match="channels"):
        save_digits(tmp_path / "x.pt", input_shape=(3, 8, 8))
    with pytest.raises(DrtFastError, match="member 0's NormalizeLayer has means"):
        save_digits(tmp_path / "x.pt", normalization=((0.5,), (0.5,)))
    assert sorted(os.listdir(tmp_path)) == ["ens.pt"]


def test_save_to_unwritable_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(DrtFastError, match="cannot write checkpoint"):
            save_digits(folder / "ens.pt")
    finally:
        folder.chmod(0o700)


def test_describe_says_what_the_file_holds(tmp_path):
    _, path = save_digits(tmp_path / "ens.pt", mode="mme")
    text = describe(path)
    for expected in ("digits_cnn", "digits", "1x8x8", "members        3", "6,202 parameters",
                     "mme", "0.25", "rho1=0.5", checkpoint.load_checkpoint(path)[1]["sha256"]):
        assert expected in text, expected


def test_describe_shows_what_training_did_not_its_plumbing():
    """The embedded default's training: the settings that made its weights, the command on its
    own line, not paths, verbosity or a trainer's unused settings."""
    from pathlib import Path

    import drt_fast

    text = describe(Path(drt_fast.__file__).parent / "assets" / "default.pt")
    training = next(line for line in text.splitlines() if line.startswith("training"))
    assert "trainer=drt" in training and "rho1=0.5" in training and "m=4" in training
    for hidden in ("quiet=", "out=", "log=", "eps=", "steps=", "resume="):
        assert hidden not in training, hidden
    assert "\ncommand        drt-fast train " in text


# ----------------------------------------------------------------- Cohen/DRT checkpoints

@pytest.mark.parametrize("prefix", ["1.module.", "module.1.", "1."])
def test_cohen_cifar_checkpoint_loads_as_one_member(tmp_path, prefix):
    torch.manual_seed(0)
    model = models.create("cifar_resnet20", 10)
    # give BatchNorm non-trivial statistics, so that loading them matters
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))
    model.eval()
    state = {k.replace("1.", prefix, 1): v for k, v in cohen_state(model).items()}
    folder = tmp_path / "cifar10" / "resnet20" / "noise_0.50"
    folder.mkdir(parents=True)
    path = folder / "checkpoint.pth.tar"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": state,
                "optimizer": optimizer.state_dict()}, path)

    ens, meta = load_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model((x - torch.tensor(CIFAR_NORM[0]).view(3, 1, 1))
                          / torch.tensor(CIFAR_NORM[1]).view(3, 1, 1))
        torch.testing.assert_close(ens(x)[0], reference)
    assert meta["format"] == "cohen" and meta["dataset"] == "cifar10"
    assert meta["normalization"] == CIFAR_NORM and meta["num_classes"] == 10
    assert meta["input_shape"] == (3, 32, 32) and meta["sigma"] == 0.5
    assert meta["train_config"] == {"epoch": 90} and ens.mode == "we"
    # another dataset's normalization can be asked for, if its channels fit
    assert load_checkpoint(path, dataset="imagenet")[1]["normalization"] == data.normalization("imagenet")
    with pytest.raises(DrtFastError, match="3-channel inputs but dataset 'mnist' has 1"):
        load_checkpoint(path, dataset="mnist")
    # checkpoints of torch < 0.4.1 (Cohen's released models) have no num_batches_tracked
    legacy = folder / "legacy.pth.tar"
    torch.save({"arch": "cifar_resnet20",
                "state_dict": {k: v for k, v in state.items() if "num_batches_tracked" not in k}}, legacy)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(legacy)[0](x)[0], reference)


def test_legacy_serialization_and_mnist_lenet_with_identity_normalization(tmp_path):
    torch.manual_seed(0)
    model = models.create("lenet", 10).eval()
    path = tmp_path / "lenet.pth.tar"
    # old torch versions wrote the non-zip format
    torch.save({"arch": "lenet", "state_dict": cohen_state(model)}, path,
               _use_new_zipfile_serialization=False)
    ens, meta = load_checkpoint(path)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ens(x)[0], model(x))   # the DRT code's MNIST layer is Identity
    assert meta["dataset"] == "mnist" and meta["sigma"] is None and meta["normalization"] == ((0.0,), (1.0,))


def test_imagenet_resnet50_dataparallel_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.create("resnet50", 1000).eval()
    state = {f"1.module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"arch": "resnet50", "state_dict": state}, tmp_path / "r50.pth.tar")
    ens, meta = load_checkpoint(tmp_path / "r50.pth.tar")
    assert meta["dataset"] == "imagenet" and meta["num_classes"] == 1000
    assert meta["normalization"] == data.normalization("imagenet")
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(meta["normalization"][0]).view(3, 1, 1)
    sd = torch.tensor(meta["normalization"][1]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ens(x)[0], model((x - mean) / sd))


def test_load_members_joins_one_file_per_member(tmp_path):
    torch.manual_seed(0)
    nets = [models.create("cifar_resnet20", 10).eval() for _ in range(3)]
    paths = []
    for i, net in enumerate(nets):
        paths.append(tmp_path / f"m{i}.pth.tar")
        torch.save({"arch": "cifar_resnet20", "state_dict": cohen_state(net)}, paths[-1])
    ens, meta = load_members(paths, mode="mme")
    same, meta2 = load_checkpoint([str(p) for p in paths])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = ens(x)
        assert out.shape == (3, 2, 10)
        assert torch.equal(out, same(x))
        norm = with_normalization(nets[2], *CIFAR_NORM).eval()
        torch.testing.assert_close(out[2], norm(x))
    assert ens.mode == "mme" and meta["members"] == 3 and len(meta["paths"]) == 3
    torch.testing.assert_close(ens.weights, torch.full((3,), 1 / 3))
    assert meta["sha256"] == meta2["sha256"] and meta["format"] == "cohen"
    # a drt-fast file and a Cohen file of another dataset do not mix
    _, digits_path = save_digits(tmp_path / "d.pt")
    with pytest.raises(DrtFastError, match="disagree on num_classes|disagree on input_shape"):
        load_members([paths[0], digits_path])
    # mixing two drt-fast files: every member counts equally
    _, one = save_digits(tmp_path / "one.pt", members=digits_members(1))
    joined, meta3 = load_members([digits_path, one])
    assert len(joined) == 4
    torch.testing.assert_close(joined.weights, torch.full((4,), 0.25))


def test_a_cohen_files_own_normalization_and_innermost_noise_folder_win(tmp_path):
    """A codebase whose NormalizeLayer keeps [C] buffers: the file's means/sds are used (not
    the dataset's); the sigma comes from the innermost noise_<sigma> folder."""
    torch.manual_seed(0)
    model = models.create("cifar_resnet20", 10).eval()
    state = {**cohen_state(model), "0.means": torch.tensor([0.5, 0.4, 0.3]),
             "0.sds": torch.tensor([0.25, 0.2, 0.1])}
    folder = tmp_path / "noise_1.00" / "cifar10" / "noise_0.25"
    folder.mkdir(parents=True)
    torch.save({"arch": "cifar_resnet20", "state_dict": state}, folder / "checkpoint.pth.tar")
    ens, meta = load_checkpoint(folder / "checkpoint.pth.tar")
    assert meta["normalization"] == ((0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    assert meta["sigma"] == 0.25
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model((x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1))
                     / torch.tensor([0.25, 0.2, 0.1]).view(3, 1, 1))
        torch.testing.assert_close(ens(x)[0], want)


def test_load_members_of_different_sigmas_or_datasets(tmp_path):
    """Members trained at different noise levels have no one sigma; files of different
    datasets (same shapes and classes) do not join."""
    _, a = save_digits(tmp_path / "a.pt", members=digits_members(1), sigma=0.25)
    _, b = save_digits(tmp_path / "b.pt", members=digits_members(1, seed=1), sigma=0.5)
    assert load_members([a, a])[1]["sigma"] == 0.25
    assert load_members([a, b])[1]["sigma"] is None
    _, c = save_digits(tmp_path / "c.pt", members=digits_members(1), dataset="npz")
    with pytest.raises(DrtFastError, match="disagree on dataset"):
        load_members([a, c])


# --------------------------------------------------------------------------- bad files

def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(DrtFastError, match="checkpoint nope.pt not found in"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(DrtFastError, match="is not a file"):
        load_checkpoint(tmp_path)
    _, path = save_digits(tmp_path / "ens.pt")
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.pt").write_bytes(b"hello, I am not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "junk.pt", "empty.pt"):
        with pytest.raises(DrtFastError, match="cannot read checkpoint") as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)


def test_checkpoints_with_a_namespace_and_numpy_scalars_load(tmp_path):
    """Training scripts often save their argparse arguments and numpy scalars beside the
    state dict: harmless objects that the weights-only load is allowed to build."""
    import argparse

    import numpy as np

    model = models.create("digits_cnn", 10).eval()
    path = tmp_path / "with_args.pth.tar"
    torch.save({"arch": "digits_cnn", "state_dict": cohen_state(model), "epoch": np.int64(30),
                "best_acc": np.float64(0.97), "args": argparse.Namespace(lr=0.1, noise_sd=0.25)}, path)
    ens, meta = load_checkpoint(path, dataset="digits")
    x = torch.rand(3, 1, 8, 8)
    mean, sd = DIGITS_NORM
    with torch.no_grad():
        torch.testing.assert_close(ens(x)[0], model((x - mean[0]) / sd[0]))


def test_pickled_objects_are_named_in_one_short_line(tmp_path):
    """A whole pickled module (torch.save(model)) is not unpickled; the error names its class
    and is one short line, not torch's advice to load untrusted files unsafely."""
    torch.save(models.create("lenet", 10), tmp_path / "whole.pt")
    with pytest.raises(DrtFastError) as err:
        load_checkpoint(tmp_path / "whole.pt")
    message = str(err.value)
    assert "it holds a drt_fast.models.lenet.LeNet object" in message
    assert "\n" not in message and "weights_only` set to `False`" not in message
    assert len(message) - len(str(tmp_path / "whole.pt")) < 200
    (tmp_path / "junk.pt").write_bytes(os.urandom(3000))
    with pytest.raises(DrtFastError) as err:
        load_checkpoint(tmp_path / "junk.pt")
    assert str(err.value).endswith("junk.pt: corrupt, truncated or not a torch file")


def test_arbitrary_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"arch": "lenet", "state_dict": Payload()}, f, protocol=2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(DrtFastError, match="cannot read checkpoint"):
            load_checkpoint(tmp_path / "evil.pt")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "pwned").exists()


def test_wrong_format_and_unknown_arch(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DrtFastError, match="neither a drt-fast ensemble file nor a Cohen"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "dict.pt")
    with pytest.raises(DrtFastError, match=r"it holds \['model'\]"):
        load_checkpoint(tmp_path / "dict.pt")
    # torch.save(model.state_dict()): one short line that says what is missing, not 300 keys
    torch.save(models.create("resnet50", 1000).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(DrtFastError, match=r"bare state dict \(320 tensors.*no architecture") as err:
        load_checkpoint(tmp_path / "bare.pth")
    assert len(str(err.value)) < 400
    torch.save({f"key{i}": i for i in range(50)}, tmp_path / "many.pt")
    with pytest.raises(DrtFastError, match="and 40 more keys") as err:
        load_checkpoint(tmp_path / "many.pt")
    assert len(str(err.value)) < 400
    torch.save({"arch": "cifar_densenet40", "state_dict": {}}, tmp_path / "dense.pt")
    with pytest.raises(DrtFastError, match="unknown architecture 'cifar_densenet40'"):
        load_checkpoint(tmp_path / "dense.pt")
    torch.save({"arch": "cifar_resnet20", "state_dict": {"fc.weight": 3}}, tmp_path / "odd.pt")
    with pytest.raises(DrtFastError, match="must map names to tensors"):
        load_checkpoint(tmp_path / "odd.pt")


def test_mismatched_state_dicts(tmp_path):
    model = models.create("cifar_resnet20", 10)
    state = cohen_state(model)
    # the arch says ResNet-110 but the weights are a ResNet-20
    torch.save({"arch": "cifar_resnet110", "state_dict": state}, tmp_path / "a.pt")
    with pytest.raises(DrtFastError, match="does not match architecture cifar_resnet110.*missing"):
        load_checkpoint(tmp_path / "a.pt")
    broken = dict(state)
    broken["1.layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    torch.save({"arch": "cifar_resnet20", "state_dict": broken}, tmp_path / "b.pt")
    with pytest.raises(DrtFastError, match=r"wrong shape 1.layer1.0.conv1.weight \[16, 16, 5, 5\]"):
        load_checkpoint(tmp_path / "b.pt")
    del broken["1.fc.weight"]
    torch.save({"arch": "cifar_resnet20", "state_dict": broken}, tmp_path / "c.pt")
    with pytest.raises(DrtFastError, match="no 2-d '1.fc.weight'"):
        load_checkpoint(tmp_path / "c.pt")
    extra = dict(state)
    extra["1.extra.weight"] = torch.zeros(1)
    torch.save({"arch": "cifar_resnet20", "state_dict": extra}, tmp_path / "d.pt")
    with pytest.raises(DrtFastError, match="unexpected 1.extra.weight"):
        load_checkpoint(tmp_path / "d.pt")


def test_malformed_drt_fast_files(tmp_path):
    _, path = save_digits(tmp_path / "ens.pt")
    good = torch.load(path, weights_only=True)

    def write(**changes):
        bad = dict(good)
        bad.update(changes)
        torch.save(bad, tmp_path / "bad.pt")
        return tmp_path / "bad.pt"

    with pytest.raises(DrtFastError, match="version 2; this drt-fast reads version 1"):
        load_checkpoint(write(version=2))
    with pytest.raises(DrtFastError, match="3 members but 2 weights"):
        load_checkpoint(write(weights=[0.5, 0.5]))
    with pytest.raises(DrtFastError, match="holds no members"):
        load_checkpoint(write(members=[], weights=[]))
    with pytest.raises(DrtFastError, match="malformed"):
        load_checkpoint(write(normalization=None))
    with pytest.raises(DrtFastError, match="member 1 does not match architecture digits_cnn"):
        members = list(good["members"])
        members[1] = {k: v for k, v in members[1].items() if k != "1.fc.bias"}
        load_checkpoint(write(members=members))
    with pytest.raises(DrtFastError, match="does not match the 1-channel normalization"):
        load_checkpoint(write(input_shape=[3, 8, 8]))
