"""Training inputs: Cohen's augmentations, image-folder (ImageNet) training, determinism."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drt_fast import cli, models
from drt_fast.checkpoint import load_checkpoint
from drt_fast.errors import DrtFastError
from drt_fast.train import inputs
from drt_fast.train import trainer as trainer_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def weights(path):
    ens, meta = load_checkpoint(path)
    return [m.state_dict() for m in ens.members], meta


def assert_same_weights(a, b):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- crop + flip

def test_crop_flip_is_torchvisions_random_crop_and_flip():
    x = torch.rand(6, 3, 32, 32)
    offsets, flips = inputs.crop_flip_plan(6, seed=3, epoch=1)
    out = inputs.crop_flip(x, offsets, flips)
    for i in range(6):        # reference: pad 4 with zeros, crop 32x32 at the offset, then flip
        top, left = offsets[i].tolist()
        ref = F.pad(x[i], (4, 4, 4, 4))[:, top:top + 32, left:left + 32]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_crop_flip_plan_is_seeded_per_epoch_and_uniform():
    a = inputs.crop_flip_plan(20000, seed=0, epoch=0)
    assert all(torch.equal(u, v) for u, v in zip(a, inputs.crop_flip_plan(20000, seed=0, epoch=0)))
    assert not torch.equal(a[0], inputs.crop_flip_plan(20000, seed=0, epoch=1)[0])
    assert not torch.equal(a[0], inputs.crop_flip_plan(20000, seed=1, epoch=0)[0])
    offsets, flips = a
    counts = torch.bincount(offsets.reshape(-1), minlength=9).double()
    assert counts.numel() == 9 and counts.min() > 0           # every offset 0..8 occurs
    expected = 40000 / 9                                      # chi-square, 8 dof: 26.1 at p=0.001
    assert float(((counts - expected) ** 2 / expected).sum()) < 26.1
    assert abs(float(flips.double().mean()) - 0.5) < 4 * 0.5 / math.sqrt(20000)


def test_in_memory_batches_crop_each_input_by_its_own_index():
    """A batch's inputs get the crops and flips the epoch's plan gives their indices (not
    their positions in the batch): the same input, the same augmentation, whatever batch or
    rank it falls in."""
    x = torch.rand(12, 3, 32, 32)
    y = torch.arange(12)
    train = inputs.TrainInputs(x, y, "crop-flip", seed=5, device=torch.device("cpu"))
    lists = [torch.tensor([7, 2, 9]), torch.tensor([0, 11, 4, 5])]
    offsets, flips = inputs.crop_flip_plan(12, seed=5, epoch=3)
    got = list(train.epoch(3, lists))
    assert len(got) == 2
    for (xb, yb), idx in zip(got, lists):
        assert torch.equal(yb, idx)
        assert torch.equal(xb, inputs.crop_flip(x[idx], offsets[idx], flips[idx]))
    assert all(torch.equal(xb, x[idx]) for (xb, _), idx in
               zip(inputs.TrainInputs(x, y, "none", 5, torch.device("cpu")).epoch(3, lists), lists))


# --------------------------------------------------------------------------- resized crop

def test_resized_crop_box_follows_torchvisions_rules():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(4000):
        left, top, w, h = inputs.resized_crop_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375 and w > 0 and h > 0
        fractions.append(w * h / (500 * 375))
        ratios.append(w / h)
    fractions, ratios = np.array(fractions), np.array(ratios)
    assert fractions.min() > 0.075 and fractions.max() <= 1.0
    assert ratios.min() > 0.74 and ratios.max() < 1.35
    # (area fraction, log ratio) uniform on [0.08, 1] x [log 3/4, log 4/3], kept where the
    # crop fits the image: the same law, sampled independently
    mc = np.random.default_rng(1)
    s = mc.uniform(0.08, 1.0, 200000)
    r = np.exp(mc.uniform(math.log(3 / 4), math.log(4 / 3), 200000))
    w, h = np.round(np.sqrt(s * 187500 * r)), np.round(np.sqrt(s * 187500 / r))
    fits = (w <= 500) & (h <= 375)
    from scipy.stats import ks_2samp
    assert ks_2samp(fractions, w[fits] * h[fits] / 187500).pvalue > 0.001
    assert ks_2samp(ratios, w[fits] / h[fits]).pvalue > 0.001
    # a strip no crop of the allowed ratios fits: the central crop of the closest ratio
    assert inputs.resized_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)
    assert inputs.resized_crop_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 13)


def test_resolve_augment():
    assert inputs.resolve_augment("auto", "cifar10", True) == "crop-flip"
    assert inputs.resolve_augment("auto", "imagenet", False) == "resized-crop-flip"
    for name in ("digits", "mnist", "npz"):
        assert inputs.resolve_augment("auto", name, True) == "none"
    assert inputs.resolve_augment("crop-flip", "npz", True) == "crop-flip"
    with pytest.raises(DrtFastError, match="resized-crop-flip is for image folders"):
        inputs.resolve_augment("resized-crop-flip", "cifar10", True)
    with pytest.raises(DrtFastError, match="crop-flip is for datasets held in memory"):
        inputs.resolve_augment("crop-flip", "imagenet", False)


# --------------------------------------------------------------------------- CIFAR-10 training

def write_cifar_train(folder, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_training_crops_and_flips_by_default(tmp_path, monkeypatch):
    folder = write_cifar_train(tmp_path / "cifar-10-batches-py")
    seen = []
    real = inputs.crop_flip
    monkeypatch.setattr(inputs, "crop_flip", lambda *a: seen.append(a[0].shape) or real(*a))
    common = ["train", "--dataset", "cifar10", "--data-dir", folder, "--arch", "cifar_resnet20",
              "--members", 1, "--sigma", 0.25, "--epochs", 1, "--batch", 10, "--quiet"]
    assert run_cli(*common, "--out", tmp_path / "a.pt") == 0
    assert seen == [(10, 3, 32, 32), (10, 3, 32, 32)]          # 20 training inputs, batch 10
    _, meta = weights(tmp_path / "a.pt")
    assert meta["train_config"]["augment"] == "crop-flip"       # what "auto" meant
    seen.clear()
    assert run_cli(*common, "--augment", "none", "--out", tmp_path / "b.pt") == 0
    assert seen == []


def test_augment_that_does_not_apply_is_one_line(tmp_path, capsys):
    folder = write_cifar_train(tmp_path / "c")
    code = run_cli("train", "--dataset", "cifar10", "--data-dir", folder, "--arch", "cifar_resnet20",
                   "--sigma", 0.25, "--augment", "resized-crop-flip", "--out", tmp_path / "x.pt")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "image folders" in err
    assert not os.path.exists(tmp_path / "x.pt")


# --------------------------------------------------------------------------- image folders

class Tiny224(nn.Module):
    """A small network for 3x224x224 inputs, so that folder training runs in a test."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


@pytest.fixture
def tiny224():
    models.register("tiny224", Tiny224, input_shape=(3, 224, 224), dataset="imagenet")
    yield "tiny224"
    models.unregister("tiny224")


def write_image_folder(root, per_class=3, seed=0):
    """train/ and val/ of a 2-class ImageNet-style tree: JPEG, PNG and a grayscale image,
    of different sizes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            (root / split / wnid).mkdir(parents=True)
            for j in range(per_class):
                w, h = int(rng.integers(180, 400)), int(rng.integers(180, 400))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., c] = 255 - arr[..., c] // 4       # a class signal
                img = Image.fromarray(arr)
                if j == 2:
                    img.convert("L").save(root / split / wnid / f"img{j}.png")
                else:
                    img.save(root / split / wnid / f"img{j}.JPEG", quality=90)
    return root


def folder_train(root, out, arch, *extra):
    return run_cli("train", "--dataset", "imagenet", "--data-dir", root, "--arch", arch,
                   "--members", 2, "--sigma", 0.25, "--batch", 4, "--lr", 0.01, "--quiet",
                   "--out", out, *extra)


def test_image_folder_training_is_deterministic_and_resumes(tmp_path, tiny224, monkeypatch):
    root = write_image_folder(tmp_path / "imagenet")
    log = tmp_path / "log.jsonl"
    assert folder_train(root, tmp_path / "w0.pt", tiny224, "--epochs", 2, "--workers", 0,
                        "--trainer", "drt", "--rho1", 0.5, "--rho2", 0.5, "--log", log) == 0
    w0, meta = weights(tmp_path / "w0.pt")
    assert meta["train_config"]["augment"] == "resized-crop-flip"
    assert meta["dataset"] == "imagenet" and meta["num_classes"] == 2
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2] and all(0 <= e["test_acc"] <= 1 for e in lines)
    # worker processes decode the same crops
    assert folder_train(root, tmp_path / "w2.pt", tiny224, "--epochs", 2, "--workers", 2,
                        "--trainer", "drt", "--rho1", 0.5, "--rho2", 0.5) == 0
    assert_same_weights(w0, weights(tmp_path / "w2.pt")[0])
    # interrupted after the first epoch's checkpoint, then --resume: the uninterrupted weights
    def interrupt(entry):
        raise KeyboardInterrupt

    real_train = trainer_mod.train

    def train_then_interrupt(config, on_epoch):      # the CLI's train(), stopped after epoch 1
        def both(entry):
            on_epoch(entry)
            interrupt(entry)
        return real_train(config, on_epoch=both)

    with monkeypatch.context() as mp:
        mp.setattr(trainer_mod, "train", train_then_interrupt)
        assert folder_train(root, tmp_path / "r.pt", tiny224, "--epochs", 2, "--workers", 0,
                            "--trainer", "drt", "--rho1", 0.5, "--rho2", 0.5) != 0
    assert weights(tmp_path / "r.pt")[1]["train_config"]["epochs_done"] == 1
    assert folder_train(root, tmp_path / "r.pt", tiny224, "--epochs", 2, "--workers", 1,
                        "--trainer", "drt", "--rho1", 0.5, "--rho2", 0.5, "--resume") == 0
    assert_same_weights(w0, weights(tmp_path / "r.pt")[0])
    # without augmentation the epoch sees the evaluation view: other weights
    assert folder_train(root, tmp_path / "n.pt", tiny224, "--epochs", 2, "--workers", 0,
                        "--trainer", "drt", "--rho1", 0.5, "--rho2", 0.5, "--augment", "none") == 0
    assert not all(torch.equal(a["1.fc.weight"], b["1.fc.weight"])
                   for a, b in zip(w0, weights(tmp_path / "n.pt")[0]))


def test_resized_crops_differ_per_epoch_and_match_the_box(tmp_path):
    from PIL import Image
    from drt_fast import data

    root = write_image_folder(tmp_path / "imagenet", per_class=1)
    ds = data.load("imagenet", "train", root)
    first = inputs._FolderImages(ds.x, "resized-crop-flip", seed=0, epoch=0)
    a, b = first[0], inputs._FolderImages(ds.x, "resized-crop-flip", seed=0, epoch=1)[0]
    assert a.shape == (3, 224, 224) and not torch.equal(a, b)
    assert torch.equal(a, first[0])                          # a pure function of (seed, epoch, index)
    # reference: the same box and flip, drawn from the same generator, applied as torchvision's
    # F.resized_crop does on a PIL image (crop, then resize: the crop's edge pixels see
    # nothing outside it)
    rng = np.random.default_rng([0, 0, 2**32 - 1, 0])
    with Image.open(ds.x.paths[0]) as img:
        img = img.convert("RGB")
        left, top, w, h = inputs.resized_crop_box(img.width, img.height, rng)
        assert (w, h) != (img.width, img.height)             # a real crop
        ref = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(a, ref)


def test_resized_crops_and_flips_are_drawn_per_image(monkeypatch):
    """Each image of an epoch gets its own box and its own flip (probability 1/2)."""
    from PIL import Image
    from drt_fast import data

    n, size = 300, 8
    ramp = np.tile(np.arange(200, dtype=np.uint8), (150, 1))
    picture = Image.fromarray(np.stack([ramp] * 3, axis=-1))       # brighter to the right
    boxes = []
    real_box = inputs.resized_crop_box

    def full_box(width, height, rng):     # draw the box as usual, then keep the whole image
        boxes.append(real_box(width, height, rng))
        return 0, 0, width, height

    monkeypatch.setattr(inputs, "resized_crop_box", full_box)
    monkeypatch.setattr(inputs, "read_image", lambda path, transform: torch.from_numpy(
        np.asarray(transform(picture.copy(), Image), dtype=np.float32)).permute(2, 0, 1))
    images = inputs._FolderImages(data.LazyImages([f"img{i}" for i in range(n)], crop=size),
                                  "resized-crop-flip", seed=0, epoch=0)
    flipped = []
    for i in range(n):
        row = images[i][0, 0]
        steps = row.diff()
        assert bool((steps > 0).all()) or bool((steps < 0).all())    # the ramp, maybe mirrored
        flipped.append(bool(row[0] > row[-1]))
    assert abs(np.mean(flipped) - 0.5) < 4 * 0.5 / math.sqrt(n)
    assert len(set(boxes)) > n // 2


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_training_image_is_one_line(tmp_path, tiny224, capsys, workers):
    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    bad = root / "train" / "n01440764" / "img1.JPEG"
    bad.write_bytes(b"not a jpeg")
    code = folder_train(root, tmp_path / "x.pt", tiny224, "--epochs", 1, "--workers", workers)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "cannot read image" in err and "img1.JPEG" in err
    assert not os.path.exists(tmp_path / "x.pt")


def test_resnet50_trains_on_an_image_folder_and_certifies(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", per_class=1)
    out = tmp_path / "r50.pt"
    assert run_cli("train", "--dataset", "imagenet", "--data-dir", root, "--arch", "resnet50",
                   "--members", 1, "--sigma", 0.5, "--batch", 2, "--epochs", 1, "--lr", 0.001,
                   "--workers", 0, "--quiet", "--out", out) == 0
    tsv = tmp_path / "cert.tsv"
    assert run_cli("certify", "--model", out, "--dataset", "imagenet", "--data-dir", root,
                   "--n0", 4, "--n", 8, "--batch", 8, "--max", 1, "--quiet", "--out", tsv) == 0
    assert len(tsv.read_text().splitlines()) == 2


def test_a_killed_decoding_worker_is_one_line(tmp_path, tiny224, capsys, monkeypatch):
    """A worker the kernel kills (the OOM killer, a bus error on a full /dev/shm) surfaced as
    torch's RuntimeError with a traceback."""
    import signal

    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    real = inputs.resized_crop_box

    def dies_in_a_worker(*args):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    monkeypatch.setattr(inputs, "resized_crop_box", dies_in_a_worker)
    code = folder_train(root, tmp_path / "x.pt", tiny224, "--epochs", 1, "--workers", 1)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "worker" in err and "--workers" in err
    assert not os.path.exists(tmp_path / "x.pt")


def test_the_epochs_decoding_workers_are_gone_before_the_test_accuracy(tmp_path, tiny224, monkeypatch):
    """The epoch's loader was left suspended after its last batch, so its workers idled (holding
    their memory) through the test accuracy's own workers and the checkpoint writing."""
    import multiprocessing

    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    alive = []
    real = trainer_mod.clean_accuracy

    def counting(*args, **kwargs):
        alive.append(len(multiprocessing.active_children()))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "clean_accuracy", counting)
    assert folder_train(root, tmp_path / "x.pt", tiny224, "--epochs", 2, "--workers", 2) == 0
    assert alive == [0, 0]


_TORCHRUN_WRAPPER = '''
import os, sys
sys.path.insert(0, {tests!r})
from drt_fast import cli, models
from drt_fast.train import inputs
from test_train_inputs import Tiny224

models.register("tiny224", Tiny224, input_shape=(3, 224, 224), dataset="imagenet")
real = inputs._FolderImages.__getitem__


def counted(self, index):       # the evaluation views this rank decodes (--workers 0)
    if self.augment == "none":
        with open({count!r} + os.environ["RANK"], "a") as fh:
            fh.write(f"{{index}}\\n")
    return real(self, index)


inputs._FolderImages.__getitem__ = counted
sys.exit(cli.main(sys.argv[1:]))
'''


def test_torchrun_trains_on_image_folders_and_shares_the_test_accuracy(tmp_path, tiny224):
    """2 gloo processes on an image folder: each rank decodes its share of every batch and of
    the validation set (every rank decoded all of it), and the logged test accuracy is the
    single-process one."""
    import subprocess
    import sys

    import cli_fixtures as fx
    from drt_fast import data

    root = write_image_folder(tmp_path / "imagenet", per_class=3)
    count = str(tmp_path / "eval-rank")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_TORCHRUN_WRAPPER.format(tests=os.path.dirname(__file__), count=count))
    out, log = tmp_path / "d.pt", tmp_path / "d.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(wrapper), "--", "train", "--dataset", "imagenet", "--data-dir", str(root), "--arch",
         "tiny224", "--members", "2", "--sigma", "0.25", "--batch", "4", "--lr", "0.01",
         "--epochs", "2", "--workers", "0", "--out", str(out), "--log", str(log), "--quiet"],
        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300, cwd=fx.NEUTRAL_CWD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 2]
    seen = [sorted(map(int, open(count + str(r)).read().split())) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == sorted(list(range(6)) * 2)     # 6 val images, 2 epochs
    ens, _ = load_checkpoint(out)
    val = data.load("imagenet", "test", root)
    assert entries[-1]["test_acc"] == trainer_mod.clean_accuracy(ens.members, val.x, val.y)


def test_evaluation_batches_of_a_tensor_cover_exactly_start_to_stop():
    """A rank's share [start, stop) of the test set (clean_accuracy under torchrun)."""
    x = torch.arange(23.0)[:, None]
    got = list(inputs.eval_batches(x, 4, torch.device("cpu"), start=5, stop=15))
    assert [len(b) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat(got), x[5:15])
    assert torch.equal(torch.cat(list(inputs.eval_batches(x, 10, torch.device("cpu")))), x)


def test_image_folder_evaluation_batches_stay_small(tmp_path, monkeypatch):
    """The test accuracy asks for batches of 1000; decoded by 8 workers with 2 batches each in
    flight that was ~20 GB of host (and shared) memory per rank on ImageNet's val/."""
    from drt_fast import data

    root = write_image_folder(tmp_path / "imagenet", per_class=1)
    images = data.LazyImages(data.load("imagenet", "test", root).x.paths * 110)   # 220
    monkeypatch.setattr(data.images, "read_image", lambda path, transform: torch.zeros(3, 224, 224))
    sizes = [len(b) for b in inputs.eval_batches(images, 1000, torch.device("cpu"))]
    assert sum(sizes) == 220 and max(sizes) <= 100


def test_default_workers_count_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """os.cpu_count() is the machine's: a batch job given 2 of 64 cores started 8 workers."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    got = []
    real = trainer_mod.TrainInputs

    def recording(*args, **kwargs):
        got.append(args[5] if len(args) > 5 else kwargs["workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "TrainInputs", recording)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert run_cli("train", "--epochs", 1, "--members", 1, "--sigma", 0.25, "--quiet",
                   "--out", tmp_path / "x.pt") == 0
    assert got == [2]


def test_an_unreadable_test_image_keeps_the_epoch(tmp_path, tiny224, capsys):
    """The epoch's checkpoint is written before the test accuracy reads val/: a bad image
    there ends the run with one line, the epoch kept for --resume."""
    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    bad = root / "val" / "n01443537" / "img0.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "k.pt"
    assert folder_train(root, out, tiny224, "--epochs", 2, "--workers", 0) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read image" in err and "img0.JPEG" in err
    assert weights(out)[1]["train_config"]["epochs_done"] == 1
    bad.write_bytes(good)
    assert folder_train(root, out, tiny224, "--epochs", 2, "--workers", 0, "--resume") == 0
    assert weights(out)[1]["train_config"]["epochs_done"] == 2


def test_image_folders_without_val_train_without_a_test_split(tmp_path, tiny224, capsys):
    """issue 21, item 6: ImageNet training required val/."""
    import shutil

    root = write_image_folder(tmp_path / "imagenet")
    shutil.rmtree(root / "val")
    log = tmp_path / "log.jsonl"
    assert folder_train(root, tmp_path / "w.pt", tiny224, "--epochs", 2, "--workers", 0, "--log", log) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"drt-fast: warning: training without a test split ({root} has no val/ folder): the log has no "
        f"test accuracy"]
    assert [json.loads(line)["test_acc"] for line in log.read_text().splitlines()] == [None, None]
