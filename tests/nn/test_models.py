"""The networks: ConvNet and ResNet-18 shapes, parameter counts, torchvision names and stems."""

import pytest
import torch
import torchvision
from torch.func import functional_call

from mkdt.config import load_config
from mkdt.errors import ConfigError
from mkdt.nn.models import (
    MODEL_NAMES,
    STEMS,
    ConvNet,
    ResNet,
    build_model,
    convnet_ensemble,
    flatten_params,
    num_params,
    resnet10,
    resnet18,
    unflatten_params,
)
from mkdt.stages import evaluate, targets, teacher
from tests.helpers import tiny_config


def test_convnet_d3_parameter_count_and_shapes():
    net = ConvNet()
    assert num_params(net) == 1_348_608
    x = torch.randn(2, 3, 32, 32)
    assert net.features(x).shape == (2, 128 * 4 * 4) == (2, net.feature_dim)
    assert net(x).shape == (2, 512)
    assert net.out_dim == 512


def test_convnet_d4_on_64px():
    net = ConvNet(image_size=64, depth=4)
    x = torch.randn(2, 3, 64, 64)
    assert net.feature_dim == 128 * 4 * 4
    assert net(x).shape == (2, 512)
    # same count as D3 on 32x32 plus one more conv block (conv 128->128 + GroupNorm affine)
    assert num_params(net) == 1_348_608 + 128 * 128 * 9 + 128 + 2 * 128


def test_convnet_uses_instance_norm_and_avgpool():
    net = ConvNet(in_channels=1, image_size=28, depth=2, width=8, out_dim=4)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 2 and all(m.num_groups == m.num_channels == 8 for m in norms)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in net.modules()) == 2
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 4)


def test_convnet_too_deep_for_image_is_rejected():
    with pytest.raises(ValueError, match="depth"):
        ConvNet(image_size=4, depth=3)


def test_resnet18_state_dict_names_match_torchvision():
    ours = resnet18(out_dim=1000).state_dict()
    ref = torchvision.models.resnet18(num_classes=1000).state_dict()
    assert list(ours.keys()) == list(ref.keys())
    for key, value in ref.items():
        if key != "conv1.weight":
            assert ours[key].shape == value.shape, key
    assert ours["conv1.weight"].shape == (64, 3, 3, 3)


def test_resnet_loads_torchvision_style_state_dict_without_fc():
    ref = torchvision.models.resnet18().state_dict()
    ref = {k: v for k, v in ref.items() if not k.startswith("fc.") and k != "conv1.weight"}
    net = resnet18()
    missing, unexpected = net.load_state_dict(ref, strict=False)
    assert missing == ["conv1.weight"] and unexpected == []


def test_resnet_features_and_heads():
    x = torch.randn(2, 3, 32, 32)
    net = resnet18()
    assert isinstance(net.fc, torch.nn.Identity)
    assert net.features(x).shape == (2, 512) and net(x).shape == (2, 512)
    small = resnet10(width=16, out_dim=10)
    assert small.feature_dim == 128 and small(x).shape == (2, 10)
    assert sum(1 for k in small.state_dict() if k.endswith("conv1.weight")) == 1 + 4


def test_resnet_cifar_stem_keeps_resolution():
    net = ResNet(layers=(1, 1, 1, 1), width=8)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    stem = net.relu(net.bn1(net.conv1(torch.randn(1, 3, 32, 32))))
    assert stem.shape[-2:] == (32, 32)
    bn = net.layer1[0].bn2
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize(
    ("stem", "side", "maxpool"), [("cifar", 32, False), ("cifar-pad2", 34, False), ("imagenet", 8, True)]
)
def test_resnet_stems(stem, side, maxpool):
    net = ResNet(layers=(1, 1, 1, 1), width=8, stem=stem)
    s = STEMS[stem]
    assert net.conv1.kernel_size == (s.kernel, s.kernel) and net.conv1.padding == (s.padding, s.padding)
    assert isinstance(net.maxpool, torch.nn.MaxPool2d) == maxpool
    assert net.maxpool(net.conv1(torch.randn(1, 3, 32, 32))).shape[-2:] == (side, side)
    assert list(net.state_dict()) == list(ResNet(layers=(1, 1, 1, 1), width=8).state_dict())
    with pytest.raises(ValueError, match="stem in cifar, cifar-pad2, imagenet"):
        ResNet(stem="vgg")
    with pytest.raises(ValueError, match="ConvNet has no stem"):
        build_model("convnet", in_channels=3, image_size=32, width=8, depth=3, out_dim=None, stem="imagenet")


def test_model_config_width_defaults_to_the_arch_and_stem_is_checked():
    assert load_config("cifar10-cpu", None, ["evaluate.model.arch=resnet10"]).evaluate.model.width == 64
    assert load_config("demo", None, ["evaluate.model={arch: resnet18}"]).evaluate.model.width == 64
    assert (
        load_config("demo", None, ["evaluate.model={arch: resnet18, width: 16}"]).evaluate.model.width == 16
    )
    assert load_config("demo", None, ["evaluate.model={arch: convnet}"]).evaluate.model.width == 128
    assert load_config(None, None, ["teacher.model.stem=imagenet"]).teacher.model.stem == "imagenet"
    with pytest.raises(
        ConfigError, match="^invalid config teacher.model.stem: must be cifar, cifar-pad2 or imagenet$"
    ):
        load_config(None, None, ["teacher.model.stem=cifar10"])
    with pytest.raises(ConfigError, match="experts.student.stem: imagenet applies to ResNets only"):
        load_config(None, None, ["experts.student.stem=imagenet"])


def test_resnet10_student_is_pretrained_and_probed_at_the_papers_width(tmp_path, monkeypatch):
    """Table 5: ``evaluate.model.arch=resnet10`` pre-trains a width-64 ResNet-10 (not the ConvNet's
    width), end to end through the evaluate stage."""
    torch.save(resnet18(width=4, in_channels=1).state_dict(), tmp_path / "teacher.pt")  # random teacher
    config = tiny_config(
        tmp_path / "cache",
        "data.pool_size=300",
        f"teacher.checkpoint={tmp_path / 'teacher.pt'}",
        "teacher.probe=false",
        "evaluate.methods=[no_pretrain, full]",
        "evaluate.model.arch=resnet10",
        "evaluate.seeds=1",
        "evaluate.epochs=1",
        "evaluate.label_fractions=[0.2]",
    )
    students = []
    pretrain = evaluate.pretrain
    monkeypatch.setattr(evaluate, "pretrain", lambda *a: students.append(pretrain(*a)) or students[-1])
    for stage in (teacher, targets):
        stage.run(config, tmp_path / "run")
    record = evaluate.run(config, tmp_path / "run")
    assert record["defining"]["evaluate"]["model"] == {
        "arch": "resnet10",
        "width": 64,
        "depth": 3,
    }  # the default stem is left out of definitions (runs made before stems existed stay valid)
    (untrained, none), (trained, losses) = students
    assert none == [] and len(losses) == 1
    assert isinstance(trained, ResNet) and trained.feature_dim == 8 * 64 and len(trained.layer1) == 1
    accuracy = {r["method"]: r["mean"] for r in record["result"]["results"]}
    assert set(accuracy) == {"no_pretrain", "full"} and all(10 < a <= 100 for a in accuracy.values())


def test_build_model():
    kw = dict(in_channels=3, image_size=32, width=16, depth=3, out_dim=8)
    for name in MODEL_NAMES:
        assert build_model(name, **kw)(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert isinstance(build_model("resnet18", **{**kw, "out_dim": None}).fc, torch.nn.Identity)
    with pytest.raises(ValueError, match="convnet, resnet10, resnet18"):
        build_model("vgg", **kw)


def test_flatten_unflatten_round_trip_and_functional_call():
    torch.manual_seed(0)
    net = ConvNet(image_size=16, width=8, depth=2, out_dim=5)
    flat = flatten_params(net)
    assert flat.dim() == 1 and flat.numel() == num_params(net) and not flat.requires_grad
    params = unflatten_params(net, flat)
    assert list(params) == [n for n, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        assert torch.equal(params[name], p)
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(functional_call(net, params, (x,)), net(x))
    flat.add_(1.0)  # the flat vector is a clone, the model is untouched
    assert not torch.equal(flatten_params(net), flat)


def test_unflatten_is_differentiable_wrt_flat():
    net = ConvNet(image_size=8, width=4, depth=1, out_dim=3)
    flat = flatten_params(net).requires_grad_(True)
    out = functional_call(net, unflatten_params(net, flat), (torch.randn(2, 3, 8, 8),))
    out.pow(2).sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="elements"):
        unflatten_params(net, flat[:-1])


@pytest.mark.parametrize("out_dim", [5, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_convnet_ensemble_equals_separate_forwards(out_dim, channels_last):
    nets = [ConvNet(2, 16, width=6, depth=3, out_dim=out_dim).double() for _ in range(3)]
    for net in nets:  # non-trivial instance-norm affines, so a mixed-up expert would show
        for p in net.parameters():
            p.data.normal_()
    params, _ = torch.func.stack_module_state(nets)
    x = torch.randn(3, 4, 2, 16, 16, dtype=torch.float64)
    out = convnet_ensemble(params, x, channels_last=channels_last)
    expected = torch.stack([net(x[e]) for e, net in enumerate(nets)])
    assert out.shape == expected.shape == (3, 4, out_dim or 6 * 2 * 2)
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()  # each expert's gradient reaches its own slice
    reference = torch.autograd.grad(expected.square().sum(), nets[1].features_net[0].weight)[0]
    assert torch.allclose(params["features_net.0.weight"].grad[1], reference, rtol=1e-8, atol=1e-10)
