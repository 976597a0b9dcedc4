"""Datasets: tiny files written here in the real formats (idx, gz idx, CIFAR pickles,
image folders, npz), read back through drt_fast.data."""
import gzip
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from drt_fast import data
from drt_fast.cli import main
from drt_fast.errors import DrtFastError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import RUN, ckpt, reference_tsv  # noqa: E402,F401 (fixtures)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- digits

def test_digits_splits_are_fixed_stratified_and_disjoint():
    train, test = data.load("digits", "train"), data.load("digits")   # default split: test
    assert (len(train), len(test)) == (1347, 450)
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8) and ds.input_shape == (1, 8, 8)
        assert ds.x.min() >= 0 and ds.x.max() == 1.0            # pixels / 16
        assert ds.num_classes == 10 and ds.name == "digits"
        assert torch.equal(ds.idx, torch.arange(len(ds)))
    # stratified: every class keeps about 25 % of its examples in test
    counts_train, counts_test = torch.bincount(train.y), torch.bincount(test.y)
    share = counts_test.float() / (counts_train + counts_test).float()
    assert ((share - 0.25).abs() < 0.01).all()
    # together they are exactly the bundled set (as a multiset of rows)
    from sklearn.datasets import load_digits
    full = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)
    both = torch.cat([train.x, test.x]).flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, full.flatten(1).tolist()))
    # the same every time (scikit-learn random_state=0)
    again = data.load("digits", "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)


def test_digits_normalization_is_the_training_split_statistics():
    train = data.load("digits", "train")
    (mean,), (sd,) = data.normalization("digits")
    assert abs(train.x.mean().item() - mean) < 1e-3
    assert abs(train.x.std().item() - sd) < 1e-3
    assert train.normalization == data.normalization("digits")


def test_names_and_normalizations():
    assert data.names() == ["digits", "mnist", "cifar10", "imagenet", "npz"]
    assert data.normalization("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert data.normalization("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert data.normalization("mnist") == ((0.0,), (1.0,))
    with pytest.raises(DrtFastError, match="unknown dataset 'svhn'"):
        data.normalization("svhn")
    with pytest.raises(DrtFastError, match="npz"):
        data.normalization("npz")


def test_bad_names_splits_and_missing_dirs(tmp_path):
    with pytest.raises(DrtFastError, match="unknown dataset 'svhn'"):
        data.load("svhn")
    with pytest.raises(DrtFastError, match="splits train, test; got 'val'"):
        data.load("digits", "val")
    with pytest.raises(DrtFastError, match="needs a data directory"):
        data.load("mnist")
    with pytest.raises(DrtFastError, match="does not exist"):
        data.load("cifar10", data_dir=tmp_path / "nowhere")


# ------------------------------------------------------------------------------ mnist

def idx_bytes(array, dims):
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, split, images, labels, gz=False):
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(arr, arr.shape)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / name).write_bytes(raw)


@pytest.fixture
def mnist_arrays():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([3, 1, 4, 1, 5], np.uint8)


@pytest.mark.parametrize("layout", ["flat", "torchvision", "gz"])
def test_mnist_idx_files(tmp_path, mnist_arrays, layout):
    images, labels = mnist_arrays
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    write_mnist(folder, "test", images, labels, gz=(layout == "gz"))
    ds = data.load("mnist", "test", tmp_path)
    assert ds.x.shape == (5, 1, 28, 28) and ds.x.dtype == torch.float32
    torch.testing.assert_close(ds.x[:, 0], torch.from_numpy(images).float() / 255)
    assert ds.y.tolist() == [3, 1, 4, 1, 5] and ds.y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.normalization == data.normalization("mnist")
    # the train split reads the train files, which are not there
    with pytest.raises(DrtFastError, match="train-images-idx3-ubyte.*not found"):
        data.load("mnist", "train", tmp_path)


def test_mnist_missing_file_names_file_and_folder(tmp_path):
    with pytest.raises(DrtFastError) as err:
        data.load("mnist", "test", tmp_path)
    assert "t10k-images-idx3-ubyte" in str(err.value) and str(tmp_path) in str(err.value)


def test_mnist_corrupt_files(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    write_mnist(tmp_path, "test", images, labels)
    image_file = tmp_path / "t10k-images-idx3-ubyte"
    good = image_file.read_bytes()

    image_file.write_bytes(good[:-10])                       # truncated
    with pytest.raises(DrtFastError, match="truncated or corrupt"):
        data.load("mnist", "test", tmp_path)
    image_file.write_bytes(b"\x00\x00\x08\x01" + good[4:])   # labels' magic on images
    with pytest.raises(DrtFastError, match="magic number 0x00000801, expected 0x00000803"):
        data.load("mnist", "test", tmp_path)
    image_file.write_bytes(b"\x00\x00")
    with pytest.raises(DrtFastError, match="not an idx file"):
        data.load("mnist", "test", tmp_path)
    image_file.write_bytes(good)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:4], (4,)))
    with pytest.raises(DrtFastError, match="5 images but 4 labels"):
        data.load("mnist", "test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 3, 4, 12]), (5,)))
    with pytest.raises(DrtFastError, match="labels must be 0..9"):
        data.load("mnist", "test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DrtFastError, match="cannot read idx file"):
        data.load("mnist", "test", tmp_path)
    # a gzip header followed by a damaged deflate stream (a reserved block type): zlib.error
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x07" + bytes(20))
    with pytest.raises(DrtFastError, match="cannot read idx file"):
        data.load("mnist", "test", tmp_path)


# ---------------------------------------------------------------------------- cifar10

def write_cifar_batch(path, data_u8, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data_u8, b"labels": list(labels),
                     b"filenames": [b"f"] * len(labels)}, f, protocol=2)


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(6)]
    for i in range(5):
        write_cifar_batch(folder / f"data_batch_{i + 1}", batches[i], [i, 9 - i])
    write_cifar_batch(folder / "test_batch", batches[5], [7, 2])

    test = data.load("cifar10", "test", tmp_path)
    assert test.x.shape == (2, 3, 32, 32) and test.y.tolist() == [7, 2]
    # rows are [R(1024) G(1024) B(1024)], row-major 32x32 planes
    torch.testing.assert_close(test.x[1, 2, 0, 5], torch.tensor(batches[5][1, 2048 + 5] / 255.0,
                                                                dtype=torch.float32))
    torch.testing.assert_close(test.x.flatten(1), torch.from_numpy(batches[5]).float() / 255)
    train = data.load("cifar10", "train", folder)             # the batch folder itself works too
    assert len(train) == 10 and train.y.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    torch.testing.assert_close(train.x[8:].flatten(1), torch.from_numpy(batches[4]).float() / 255)
    assert train.normalization == data.normalization("cifar10")

    (folder / "data_batch_3").unlink()
    with pytest.raises(DrtFastError, match="data_batch_3.*not found"):
        data.load("cifar10", "train", tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_refuses_foreign_pickles_and_bad_batches(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [1]}, f)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(DrtFastError, match="cannot read CIFAR-10 batch"):
            data.load("cifar10", "test", tmp_path)
        assert not (tmp_path / "pwned").exists()
    finally:
        os.chdir(cwd)
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 100), np.uint8), [1, 2])
    with pytest.raises(DrtFastError, match=r"uint8 \[N, 3072\]"):
        data.load("cifar10", "test", tmp_path)
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 3072), np.uint8), [1])
    with pytest.raises(DrtFastError, match="labels must be 2 integers"):
        data.load("cifar10", "test", tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DrtFastError, match="cannot read CIFAR-10 batch"):
        data.load("cifar10", "test", tmp_path)
    # a damaged length field: pickle raises OverflowError, not an UnpicklingError
    (tmp_path / "test_batch").write_bytes(b"\x80\x05\x96" + (2**64 - 1).to_bytes(8, "little"))
    with pytest.raises(DrtFastError, match="cannot read CIFAR-10 batch"):
        data.load("cifar10", "test", tmp_path)


# --------------------------------------------------------------------------- imagenet

def test_imagenet_folder_resize_and_center_crop(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(2)
    sizes = {"n02": [(300, 400)], "n01": [(256, 256), (500, 260)]}   # (width, height)
    pixels = {}
    for wnid, dims in sizes.items():
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for j, (w, h) in enumerate(dims):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "val" / wnid / f"img{j}.png")
            pixels[(wnid, j)] = arr
    (tmp_path / "val" / "n01" / "notes.txt").write_text("not an image")

    ds = data.load("imagenet", "test", tmp_path)      # "test" reads val/
    assert len(ds) == 3 and ds.num_classes == 2
    assert ds.y.tolist() == [0, 0, 1]                 # classes sorted by folder name
    assert ds.x.shape == (3, 3, 224, 224) and ds.input_shape == (3, 224, 224)
    one = ds.x[2]
    assert one.shape == (3, 224, 224) and one.dtype == torch.float32
    assert 0 <= one.min() and one.max() <= 1
    # reference: shorter side to 256 (bilinear), then the centered 224 square
    img = Image.fromarray(pixels[("n02", 0)]).resize((256, int(256 * 400 / 300)), Image.BILINEAR)
    top = int(round((img.size[1] - 224) / 2))
    left = int(round((256 - 224) / 2))
    ref = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    torch.testing.assert_close(one, torch.from_numpy(ref).permute(2, 0, 1))
    # a 256x256 image is only cropped
    torch.testing.assert_close(ds.x[0], torch.from_numpy(pixels[("n01", 0)][16:240, 16:240] / 255.0).float().permute(2, 0, 1))
    assert ds.x[0:2].shape == (2, 3, 224, 224)
    torch.testing.assert_close(ds.x[[2, 0]], torch.stack([ds.x[2], ds.x[0]]))
    torch.testing.assert_close(ds.x[torch.tensor([1])][0], ds.x[1])
    with pytest.raises(IndexError):
        ds.x[3]

    with pytest.raises(DrtFastError, match="expected folder train/"):
        data.load("imagenet", "train", tmp_path)


def test_imagenet_env_variable_and_unreadable_image(tmp_path, monkeypatch):
    (tmp_path / "val" / "n01").mkdir(parents=True)
    (tmp_path / "val" / "n01" / "broken.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    ds = data.load("imagenet", "val")
    with pytest.raises(DrtFastError, match="cannot read image .*broken.jpg"):
        ds.x[0]
    (tmp_path / "val" / "n01" / "broken.jpg").unlink()
    with pytest.raises(DrtFastError, match="no images"):
        data.load("imagenet", "val")


# -------------------------------------------------------------------------------- npz

def test_npz_float_and_uint8(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((4, 3, 5, 5), dtype=np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 2, 1, 2]))
    ds = data.load("npz", data_dir=tmp_path / "f.npz")
    torch.testing.assert_close(ds.x, torch.from_numpy(x))
    assert ds.y.tolist() == [0, 2, 1, 2] and ds.num_classes == 3
    assert ds.normalization == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.equal(ds.idx, torch.arange(4))

    u8 = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)            # N, H, W
    np.savez(tmp_path / "u.npz", x=u8, y=np.array([1, 0, 1]), idx=np.array([10, 20, 30]),
             means=np.array([0.3]), sds=np.array([0.4]), num_classes=np.array(10))
    ds = data.load("npz", data_dir=tmp_path / "u.npz")
    assert ds.x.shape == (3, 1, 8, 8)
    torch.testing.assert_close(ds.x[:, 0], torch.from_numpy(u8).float() / 255)
    assert ds.idx.tolist() == [10, 20, 30] and ds.idx.dtype == torch.int64
    assert ds.num_classes == 10 and ds.normalization == ((0.3,), (0.4,))


@pytest.mark.parametrize("arrays,message", [
    (dict(x=np.full((2, 1, 4, 4), 1.5, np.float32), y=np.array([0, 1])), r"in \[0, 1\]"),
    (dict(x=np.full((2, 1, 4, 4), np.nan, np.float32), y=np.array([0, 1])), "finite"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32)), "expected an array 'y'"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1, 1])), "y must be 2 integer labels"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0.0, 1.0])), "y must be 2 integer labels"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, -1])), "labels must be >= 0"),
    (dict(x=np.zeros((2, 16), np.float32), y=np.array([0, 1])), r"x must be \[N, C, H, W\]"),
    (dict(x=np.zeros((2, 1, 4, 4), np.int32), y=np.array([0, 1])), "float in"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 5]), num_classes=np.array(3)), "below num_classes=3"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1]), idx=np.array([1])), "idx must be 2 integers"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1]), num_classes=np.array([10, 10])), "num_classes must be one integer"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1]), num_classes=np.array("ten")), "num_classes must be one integer"),
    (dict(x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1]), means=np.array(["a"]), sds=np.ones(1)), "means must be finite numbers"),
    (dict(x=np.zeros((2, 3, 4, 4), np.float32), y=np.array([0, 1]), means=np.zeros(1), sds=np.ones(1)), "means/sds must hold 3"),
    # channels last: the means/sds of its 3 channels do not fit "32 channels"; say why
    (dict(x=np.zeros((2, 32, 32, 3), np.float32), y=np.array([0, 1]), means=np.zeros(3), sds=np.ones(3)),
     r"must hold 32 values .*if that is N, H, W, C, write it as N, C, H, W"),
])
def test_npz_validation(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DrtFastError, match=message):
        data.load("npz", data_dir=tmp_path / "bad.npz")


def test_npz_missing_and_corrupt(tmp_path):
    with pytest.raises(DrtFastError, match="expected file none.npz in"):
        data.load("npz", data_dir=tmp_path / "none.npz")
    with pytest.raises(DrtFastError, match="needs the path"):
        data.load("npz")
    # a folder (e.g. the one holding the file) exists: "not found" would mislead
    with pytest.raises(DrtFastError, match="is a folder; dataset 'npz' reads one .npz file"):
        data.load("npz", data_dir=tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DrtFastError, match="cannot read"):
        data.load("npz", data_dir=tmp_path / "junk.npz")
    # numpy.savez_compressed with a damaged deflate stream (zlib.error, not BadZipFile)
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "c.npz", x=rng.random((20, 3, 8, 8)), y=np.zeros(20, np.int64))
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    for i in range(200, len(raw) // 2, 13):
        raw[i] ^= 0xff
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    with pytest.raises(DrtFastError, match="cannot read .* as .npz"):
        data.load("npz", data_dir=tmp_path / "c.npz")
    # a zip whose members use a method zipfile lacks (Deflate64, 9): NotImplementedError
    np.savez(tmp_path / "d64.npz", x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 1]))
    raw = bytearray((tmp_path / "d64.npz").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):   # local, central headers
        at = raw.find(signature)
        while at >= 0:
            raw[at + offset] = 9
            at = raw.find(signature, at + 4)
    (tmp_path / "d64.npz").write_bytes(bytes(raw))
    with pytest.raises(DrtFastError, match="cannot read .* as .npz: .*compression method"):
        data.load("npz", data_dir=tmp_path / "d64.npz")


def test_cifar10_batches_resaved_by_python3(tmp_path):
    """A batch re-pickled in Python 3 has str keys (torchvision reads it; so do we)."""
    rng = np.random.default_rng(4)
    data_u8 = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "x", "data": data_u8, "labels": [1, 0, 9]}, f)
    ds = data.load("cifar10", "test", tmp_path)
    assert ds.y.tolist() == [1, 0, 9]
    torch.testing.assert_close(ds.x, torch.from_numpy(data_u8.reshape(3, 3, 32, 32)).float() / 255)


def test_imagenet_walks_sub_folders_in_imagefolder_order(tmp_path):
    from PIL import Image
    for rel in ("n01/b.png", "n01/sub/a.png", "n01/a.png", "n01/sub/deeper/c.png", "n02/z.png"):
        (tmp_path / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / rel)
    ds = data.load("imagenet", "val", tmp_path)
    # torchvision: sorted(os.walk(class folder)), each folder's files sorted
    assert [str(p.relative_to(tmp_path / "val")) for p in ds.x.paths] == [
        "n01/a.png", "n01/b.png", "n01/sub/a.png", "n01/sub/deeper/c.png", "n02/z.png"]
    assert ds.y.tolist() == [0, 0, 0, 0, 1]


def test_imagenet_decompression_bomb_is_one_error(tmp_path, monkeypatch):
    from PIL import Image
    (tmp_path / "val" / "n01").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "val" / "n01" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # 4096 pixels > 2x the limit
    with pytest.raises(DrtFastError, match="cannot read image .*big.png"):
        data.load("imagenet", "val", tmp_path).x[0]

# ----------------------------------------------------------------------------- through drt-fast certify

def _random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_certify_reads_mnist_idx_files(tmp_path):
    folder = fx.write_mnist(tmp_path / "mnist", _random_images(4, (28, 28)), np.array([1, 2, 3, 4], np.uint8))
    model = fx.save(tmp_path / "lenet.pt", fx.members("lenet", 10, (0.0,), (1.0,), 1), "lenet", "mnist", 10,
                    (1, 28, 28), ((0.0,), (1.0,)))
    out = str(tmp_path / "m.tsv")
    assert main(["certify", "--model", model, "--data-dir", folder, "--n0", "10", "--n", "20",
                 "--quiet", "--out", out]) == 0
    rows = fx.rows_without_time(out)[1:]
    assert [r[:2] for r in rows] == [["0", "1"], ["1", "2"], ["2", "3"], ["3", "4"]]


def test_certify_reads_cifar_pickles(tmp_path):
    folder = fx.write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", _random_images(2, (3, 32, 32)), [7, 9])
    model = fx.save(tmp_path / "r20.pt", fx.members("cifar_resnet20", 10, *data.normalization("cifar10"), 1),
                    "cifar_resnet20", "cifar10", 10, (3, 32, 32), data.normalization("cifar10"), sigma=0.5)
    out = str(tmp_path / "c.tsv")
    assert main(["certify", "--model", model, "--data-dir", str(tmp_path / "cifar"), "--n0", "8", "--n", "16",
                 "--batch", "24", "--quiet", "--out", out]) == 0
    assert [r[:2] for r in fx.rows_without_time(out)[1:]] == [["0", "7"], ["1", "9"]]
    assert json.load(open(out + ".json"))["sigma"] == 0.5  # the checkpoint's training sigma


def test_npz_with_idx_uses_the_dataset_index(ckpt, reference_tsv, tmp_path):
    test = data.load("digits", "test")
    rows = [30, 60, 90]
    npz = fx.write_npz(tmp_path / "subset.npz", test.x[rows].numpy(), test.y[rows].numpy(), idx=np.array(rows),
                       num_classes=10)
    out = str(tmp_path / "s.tsv")
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", npz, "--n", "200", "--quiet",
                 "--out", out]) == 0
    ours = fx.rows_without_time(out)[1:]
    ref = {r[0]: r for r in fx.rows_without_time(reference_tsv)[1:]}
    assert [r[0] for r in ours] == ["30", "60", "90"]
    assert ours == [ref[r[0]] for r in ours]  # same noise: the key is the dataset index
    # resume skips the rows by their idx (the dataset index), not by their position in the file
    with open(out) as f:
        lines = f.readlines()
    with open(out, "w") as f:
        f.writelines(lines[:2])                  # header and the row of idx 30
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", npz, "--n", "200", "--quiet",
                 "--out", out, "--resume"]) == 0
    assert fx.rows_without_time(out)[1:] == ours


def test_npz_subset_whose_labels_miss_the_top_classes(ckpt, tmp_path, capsys):
    """Without a num_classes entry an npz's class count is max(y) + 1, a lower bound: the
    rows of a 10-class test set that hold no 8 or 9 still fit a 10-class model, and certify
    as they do in the whole file (same key, same draws, counts over all 10 classes)."""
    test = data.load("digits", "test")
    rows = [i for i in range(60) if int(test.y[i]) < 8][:12]
    sub = fx.write_npz(tmp_path / "sub8.npz", test.x[rows].numpy(), test.y[rows].numpy(), idx=np.array(rows))
    whole = fx.write_npz(tmp_path / "whole.npz", test.x[:60].numpy(), test.y[:60].numpy(), num_classes=10)
    run = ["--n", "300", "--skip", "1", "--quiet"]
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", sub, *run,
                 "--out", str(tmp_path / "sub.tsv")]) == 0
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", whole, *run,
                 "--out", str(tmp_path / "whole.tsv")]) == 0
    capsys.readouterr()

    def rows_of(name):
        lines = (tmp_path / name).read_text().splitlines()[1:]
        return {line.split("\t")[0]: [c for i, c in enumerate(line.split("\t")) if i != 5] for line in lines}
    sub_rows, whole_rows = rows_of("sub.tsv"), rows_of("whole.tsv")
    assert len(sub_rows) == 12 and all(sub_rows[k] == whole_rows[k] for k in sub_rows)


def test_data_in_the_wrong_format(ckpt, tmp_path, capsys):
    text = tmp_path / "notes.npz"
    text.write_text("not a numpy archive")
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", str(text), *RUN]) == 2
    assert "notes.npz" in fx.error_line(capsys)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
    assert main(["certify", "--model", ckpt, "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"),
                 *RUN]) == 2
    assert "idx" in fx.error_line(capsys)
    assert main(["certify", "--model", ckpt, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                 *RUN]) == 2
    assert "nowhere" in fx.error_line(capsys)


@pytest.mark.parametrize("content, message", [
    ("empty", "holds no inputs"),
    ("duplicate idx", "idx must be distinct"),
    ("text", "not a zip archive"),
])
def test_bad_npz_files_are_one_line(content, message, ckpt, tmp_path, capsys):
    path = tmp_path / "d.npz"
    if content == "empty":
        fx.write_npz(path, np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    elif content == "duplicate idx":
        fx.write_npz(path, np.zeros((3, 1, 8, 8), np.float32), np.zeros(3, np.int64),
                     idx=np.array([0, 5, 0]))
    else:
        path.write_text("1 2 3\n4 5 6\n")
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", str(path), *RUN]) == 2
    assert message in fx.error_line(capsys)


def test_split_of_an_npz_is_refused(tmp_path, capsys):
    assert main(["certify", "--split", "train", *RUN]) == 2
    assert "--dataset digits --split train" in fx.error_line(capsys)
