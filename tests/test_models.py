"""Model registry, NormalizeLayer, and module names that Cohen/DRT/torchvision checkpoints need."""
import pytest
import torch
import torch.nn.functional as F

from drt_fast import data, models
from drt_fast.errors import DrtFastError
from drt_fast.models import NormalizeLayer, with_normalization


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_architecture_with_its_input_shape():
    assert models.names() == ["digits_cnn", "lenet", "cifar_resnet20", "cifar_resnet110",
                              "resnet50"]
    assert models.input_shape("digits_cnn") == (1, 8, 8)
    assert models.input_shape("lenet") == (1, 28, 28)
    assert models.input_shape("cifar_resnet20") == (3, 32, 32)
    assert models.input_shape("cifar_resnet110") == (3, 32, 32)
    assert models.input_shape("resnet50") == (3, 224, 224)


def test_register_adds_an_architecture_that_checkpoints_and_create_know(tmp_path):
    """A model of one's own (timm's register_model): created by name, saved and loaded as a
    member; unregister forgets it."""
    from drt_fast.checkpoint import load_checkpoint, save_ensemble

    class Tiny(torch.nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.head = torch.nn.Linear(4, num_classes)

        def forward(self, x):
            return self.head(x.flatten(1))

    models.register("tiny", Tiny, input_shape=(1, 2, 2), dataset="digits", classifier="head")
    try:
        assert models.names()[-1] == "tiny" and models.input_shape("tiny") == (1, 2, 2)
        assert models.default_dataset("tiny") == "digits" and models.classifier_name("tiny") == "head"
        with pytest.raises(DrtFastError, match="'tiny' is already registered"):
            models.register("tiny", Tiny, input_shape=(1, 2, 2), dataset="digits")
        member = with_normalization(models.create("tiny", 3), *data.normalization("digits"))
        save_ensemble(tmp_path / "t.pt", member, arch="tiny", dataset="digits", num_classes=3)
        ens, meta = load_checkpoint(tmp_path / "t.pt")
        assert meta["arch"] == "tiny" and meta["num_classes"] == 3
        torch.save({"arch": "tiny", "state_dict": member.state_dict()}, tmp_path / "cohen.pt")
        assert load_checkpoint(tmp_path / "cohen.pt")[1]["num_classes"] == 3   # via classifier
    finally:
        models.unregister("tiny")
    assert "tiny" not in models.names()
    with pytest.raises(DrtFastError, match="unknown architecture 'tiny'"):
        models.create("tiny", 3)
    with pytest.raises(DrtFastError, match="unknown architecture"):
        models.unregister("tiny")


@pytest.mark.parametrize("shape", [(8, 8), (1, 0, 8), (1.0, 8, 8)])
def test_register_refuses_a_malformed_input_shape(shape):
    with pytest.raises(DrtFastError, match="input_shape of 'bad' must be"):
        models.register("bad", torch.nn.Identity, input_shape=shape, dataset="digits")
    assert "bad" not in models.names()


@pytest.mark.parametrize("name", ["digits_cnn", "lenet", "cifar_resnet20"])
def test_create_maps_inputs_to_logits(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=7).eval()
    x = torch.rand(3, *models.input_shape(name))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # different inputs, different logits: the model is not constant
    assert not torch.allclose(out[0], out[1])


def test_big_models_have_the_published_sizes():
    # Parameter counts of the reference implementations: torchvision's resnet50 (1000
    # classes), bearpaw/Cohen's CIFAR ResNet-20/110, the consistency/DRT LeNet.
    assert n_params(models.create("resnet50", 1000)) == 25_557_032
    assert n_params(models.create("cifar_resnet110", 10)) == 1_730_714
    assert n_params(models.create("cifar_resnet20", 10)) == 272_474
    assert n_params(models.create("lenet", 10)) == 431_080


def test_resnet50_forward_shape_and_stride_on_the_3x3_conv():
    model = models.create("resnet50", 5).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5)   # adaptive pooling
    # torchvision's "v1.5": the downsampling stride is on conv2 (3x3), not conv1 (1x1)
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)


def _cohen_cifar_keys(depth):
    """State-dict keys of Cohen's archs/cifar_resnet.py ResNet(depth), written from its
    structure, independently of our code."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    n = (depth - 2) // 6
    for layer in (1, 2, 3):
        for b in range(n):
            p = f"layer{layer}.{b}."
            keys += [p + "conv1.weight"] + [p + f"bn1.{k}" for k in bn]
            keys += [p + "conv2.weight"] + [p + f"bn2.{k}" for k in bn]
            if b == 0 and layer > 1:
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{k}" for k in bn]
    return set(keys + ["fc.weight", "fc.bias"])


@pytest.mark.parametrize("name,depth", [("cifar_resnet20", 20), ("cifar_resnet110", 110)])
def test_cifar_resnet_module_names_match_cohen(name, depth):
    model = models.create(name, 10)
    assert set(model.state_dict()) == _cohen_cifar_keys(depth)
    assert isinstance(model.avgpool, torch.nn.AvgPool2d) and model.avgpool.kernel_size == 8
    assert model.layer3[0].downsample[0].kernel_size == (1, 1)


def test_resnet50_module_names_match_torchvision():
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    for layer, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            for i in (1, 2, 3):
                keys += [p + f"conv{i}.weight"] + [p + f"bn{i}.{k}" for k in bn]
            if b == 0:
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{k}" for k in bn]
    keys += ["fc.weight", "fc.bias"]
    state = models.create("resnet50", 1000).state_dict()
    assert len(state) == 320
    assert set(state) == set(keys)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)


def test_lenet_module_names_match_the_drt_code():
    state = models.create("lenet", 10).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
        "fc1.weight": (500, 800), "fc1.bias": (500,),
        "fc2.weight": (10, 500), "fc2.bias": (10,),
    }


def test_unknown_architecture_and_bad_classes_are_user_errors():
    with pytest.raises(DrtFastError, match="unknown architecture 'vgg16'.*digits_cnn"):
        models.create("vgg16", 10)
    with pytest.raises(DrtFastError, match="unknown architecture"):
        models.input_shape("resnet18")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DrtFastError, match="num_classes"):
            models.create("digits_cnn", bad)


def test_normalize_layer_normalizes_per_channel_with_buffers():
    layer = NormalizeLayer([0.5, 0.25, 0.0], [0.5, 2.0, 1.0])
    x = torch.rand(4, 3, 5, 6)
    out = layer(x)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0, x[:, 2]], dim=1)
    torch.testing.assert_close(out, expected)
    assert set(layer.state_dict()) == {"means", "sds"}
    assert list(layer.buffers())[0].shape == (3, 1, 1)
    # buffers follow .to(), and the layer follows the input dtype
    assert layer.to(torch.float64)(x.double()).dtype == torch.float64
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_normalize_layer_rejects_bad_parameters():
    with pytest.raises(ValueError):
        NormalizeLayer([0.5, 0.5], [0.5])
    with pytest.raises(ValueError):
        NormalizeLayer([0.5], [0.0])


def test_with_normalization_has_cohens_layout():
    model = models.create("digits_cnn", 10)
    member = with_normalization(model, (0.3, ), (0.4, ))
    keys = list(member.state_dict())
    assert keys[:2] == ["0.means", "0.sds"]
    assert set(keys[2:]) == {f"1.{k}" for k in model.state_dict()}
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(member(x), model((x - 0.3) / 0.4))


def test_digits_cnn_is_small():
    # The embedded default certifies 3 members at n=100000 on CPU: keep it tiny.
    model = models.create("digits_cnn", 10)
    assert n_params(model) < 10_000
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            macs += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            macs += module.in_features * module.out_features

    for m in model.modules():
        m.register_forward_hook(count)
    model(torch.rand(1, 1, 8, 8))
    assert macs <= 30_000


def test_digits_cnn_reaches_95_percent_clean_accuracy():
    torch.manual_seed(0)
    train, test = data.load("digits", "train"), data.load("digits", "test")
    member = with_normalization(models.create("digits_cnn", 10), *train.normalization)
    opt = torch.optim.Adam(member.parameters(), lr=1e-2)
    for epoch in range(15):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 128):
            b = perm[i:i + 128]
            loss = F.cross_entropy(member(train.x[b]), train.y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (member(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy >= 0.95, accuracy
