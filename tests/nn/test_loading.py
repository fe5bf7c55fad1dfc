"""Published teacher checkpoints: each supported layout and stem, saved from a reference network built
here with torchvision (independently of mkdt's ResNet), loads through ``load_encoder`` (what the teacher
stage calls) and gives the reference's features."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet

from mkdt.config import ModelConfig
from mkdt.errors import ArtifactError
from mkdt.nn.loading import load_encoder
from mkdt.stages import targets, teacher
from mkdt.store import RunDir
from tests.helpers import real_data, tiny_config

PADDING = {"cifar": 1, "cifar-pad2": 2}


def _randomise_batch_norms(net: nn.Module) -> None:
    """Non-trivial BN affines and running statistics, so a mixed-up or skipped BN shows."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def _reference(stem: str, depths=(2, 2, 2, 2), in_channels=3, seed=0) -> ResNet:
    """torchvision's ResNet with the stem as the publishers write it: CIFAR variants replace conv1
    (3x3, stride 1, padding 1 or 2) and the max-pool (nn.Identity); fc is nn.Identity."""
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, list(depths))
    if stem != "imagenet":
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=PADDING[stem], bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    _randomise_batch_norms(net)
    return net.eval()


def _lightly(net: ResNet, keep_maxpool: bool = True) -> nn.Module:
    """lightly's recipe: ``backbone = nn.Sequential(*list(resnet.children())[:-1])`` beside a
    projection head; ``keep_maxpool=False`` drops the max-pool child (layer1 becomes child 3)."""
    wrapper = nn.Module()
    children = [m for name, m in net.named_children() if name != "fc" and (keep_maxpool or name != "maxpool")]
    wrapper.backbone = nn.Sequential(*children)
    wrapper.projection_head = nn.Linear(512, 16)
    return wrapper


def _mix_bt(seed=0) -> nn.Module:
    """mix-bt's (the MKDT authors' teacher recipe) CIFAR model, as its model.py builds it: ``f`` the
    children of resnet18 without its Linear and MaxPool2d, conv1 replaced by a 3x3 padding-1 conv;
    ``g`` the projector."""
    torch.manual_seed(seed)
    wrapper, f = nn.Module(), []
    for name, module in resnet18().named_children():
        if name == "conv1":
            module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
            f.append(module)
    wrapper.f = nn.Sequential(*f)
    wrapper.g = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32))
    _randomise_batch_norms(wrapper)
    return wrapper.eval()


def _torchvision_file(net, path):
    state = {**net.state_dict(), "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def _solo_learn_file(net, path):
    """A Lightning checkpoint as solo-learn writes it: ``backbone.*`` beside the projector, the online
    classifier and (momentum methods) a momentum copy of the backbone, which must all be ignored."""
    own = net.state_dict()
    state = {f"backbone.{k}": v for k, v in own.items()}
    state |= {f"momentum_backbone.{k}": v + 1 for k, v in own.items()}
    state |= {"projector.0.weight": torch.randn(32, 512), "classifier.weight": torch.randn(10, 512)}
    torch.save(
        {"state_dict": state, "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.1.0"}, path
    )


def _case(name, tmp_path):
    """(checkpoint path, stem, arch, reference features function) of one published layout."""
    if name == "torchvision-cifar-safetensors":
        net = _reference("cifar")
        _torchvision_file(net, path := tmp_path / "tv.safetensors")
        return path, "cifar", "resnet18", net
    if name == "krr-st-cifar-pad2":  # KRR-ST's teachers: torchvision keys, padding 2, no fc
        net = _reference("cifar-pad2")
        torch.save(net.state_dict(), path := tmp_path / "barlow_twins_resnet18_cifar100.pt")
        return path, "cifar-pad2", "resnet18", net
    if name == "torchvision-imagenet-resnet10":
        net = _reference("imagenet", depths=(1, 1, 1, 1))
        _torchvision_file(net, path := tmp_path / "tv10.pt")
        return path, "imagenet", "resnet10", net
    if name == "solo-learn-cifar-pad2":
        net = _reference("cifar-pad2")
        _solo_learn_file(net, path := tmp_path / "solo.ckpt")
        return path, "cifar-pad2", "resnet18", net
    if name in ("lightly-cifar", "lightly-cifar-no-maxpool-child", "lightly-imagenet"):
        stem = "imagenet" if name == "lightly-imagenet" else "cifar"
        lightly = _lightly(_reference(stem), keep_maxpool=name != "lightly-cifar-no-maxpool-child")
        torch.save(lightly.state_dict(), path := tmp_path / "lightly.pt")
        return path, stem, "resnet18", lightly.backbone
    if name == "mix-bt-ddp":
        mix_bt = _mix_bt()
        torch.save({f"module.{k}": v for k, v in mix_bt.state_dict().items()}, path := tmp_path / "mixbt.pth")
        return path, "cifar", "resnet18", mix_bt.f
    raise AssertionError(name)


CASES = [
    "torchvision-cifar-safetensors",
    "krr-st-cifar-pad2",
    "torchvision-imagenet-resnet10",
    "solo-learn-cifar-pad2",
    "lightly-cifar",
    "lightly-cifar-no-maxpool-child",
    "lightly-imagenet",
    "mix-bt-ddp",
]


@pytest.mark.parametrize("name", CASES)
def test_published_layout_loads_to_the_reference_features(name, tmp_path):
    path, stem, arch, reference = _case(name, tmp_path)
    encoder = load_encoder(path, ModelConfig(arch=arch, width=64, stem=stem), in_channels=3, image_size=16)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():  # the float32 weights as saved, compared in float64
        ours = encoder.double().features(x)
        expected = reference.double()(x).flatten(1)
    assert ours.shape == expected.shape == (3, 512)
    assert (ours - expected).abs().max().item() < 1e-6


def test_a_first_convolution_that_contradicts_the_stem_is_refused(tmp_path):
    torch.save(_reference("imagenet").state_dict(), imagenet := tmp_path / "imagenet.pt")
    refusal = (
        r"7x7 first convolution but teacher.model.stem=cifar builds 3x3; set teacher.model.stem=imagenet$"
    )
    with pytest.raises(ArtifactError, match=refusal):
        load_encoder(imagenet, ModelConfig(arch="resnet18", stem="cifar"), 3, 16)
    torch.save(_reference("cifar-pad2").state_dict(), cifar := tmp_path / "cifar.pt")
    with pytest.raises(
        ArtifactError, match=r"stem=imagenet builds 7x7; set teacher.model.stem=cifar or cifar-pad2"
    ):
        load_encoder(cifar, ModelConfig(arch="resnet18", stem="imagenet"), 3, 16)


def test_the_padding_is_not_in_the_state_dict_so_the_stem_must_say_it(tmp_path):
    """Why ``cifar-pad2`` exists: solo-learn's and KRR-ST's CIFAR checkpoints load without complaint
    into the padding-1 stem, and compute other features."""
    net = _reference("cifar-pad2")
    torch.save(net.state_dict(), path := tmp_path / "pad2.pt")
    wrong = load_encoder(path, ModelConfig(arch="resnet18", stem="cifar"), 3, 16)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (wrong.features(x) - net(x)).abs().max().item() > 1e-2


def test_a_checkpoint_in_no_known_layout_names_the_keys_looked_for(tmp_path):
    torch.save(
        {f"net.{k}": v for k, v in _reference("cifar").state_dict().items()}, path := tmp_path / "x.pt"
    )
    with pytest.raises(ArtifactError, match=r"no known layout: none of conv1.weight, backbone.conv1.weight"):
        load_encoder(path, ModelConfig(arch="resnet18"), 3, 16)


def test_a_pad2_teacher_checkpoint_gives_targets_equal_to_its_features(tmp_path):
    """Through the stages: the stem reaches the loaded teacher, the saved encoder and the targets."""
    net = _reference("cifar-pad2", depths=(1, 1, 1, 1), in_channels=1)
    _solo_learn_file(net, path := tmp_path / "solo.ckpt")
    config = tiny_config(
        tmp_path / "cache",
        "data.pool_size=100",
        "teacher.probe=false",
        f"teacher.checkpoint={path}",
        "teacher.model={arch: resnet10, width: 64, stem: cifar-pad2}",
    )
    teacher.run(config, tmp_path / "run")
    targets.run(config, tmp_path / "run")
    data = real_data(config)
    with torch.no_grad():
        expected = net(data.normalize(data.train_images))
    found = RunDir(tmp_path / "run").load_targets(data.num_train)
    assert torch.allclose(found, expected, rtol=0, atol=1e-5)  # float32, two implementations
