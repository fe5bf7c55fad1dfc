"""Networks: the dataset-distillation student ConvNet and ResNets.

- :class:`ConvNet` is the standard dataset-distillation ConvNet (docs/method.md §3): ``depth`` blocks of
  Conv 3x3 -> instance norm (GroupNorm with one group per channel, affine) -> ReLU -> AvgPool 2x2,
  then a linear head that regresses the teacher's 512-d features. ConvNetD3 on 3x32x32 has
  1,348,608 parameters.
- :class:`ResNet` is a ResNet whose parameter and buffer names match ``torchvision.models.resnet18``
  so torchvision-style state dicts load. Its first layers are one of :data:`STEMS`: the CIFAR stem
  (3x3 conv, stride 1, padding 1, no max-pool; the default), the same with padding 2 (the CIFAR
  checkpoints of solo-learn and KRR-ST), or torchvision's ImageNet stem.

Every model exposes ``features(x)`` (penultimate features, the ones that are probed / regressed) and
``feature_dim``; ``forward(x) = head(features(x))``.

The helpers :func:`flatten_params` / :func:`unflatten_params` convert between a module's parameters
and one flat vector theta, for functional use (``torch.func.functional_call``) in trajectory
matching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("convnet", "resnet10", "resnet18")
DEFAULT_WIDTHS: dict[str, int] = {"convnet": 128, "resnet10": 64, "resnet18": 64}  # the paper's


@dataclass(frozen=True)
class Stem:
    """A ResNet's first layers: ``conv1`` (kernel, stride, padding), then a 3x3 max-pool of stride 2
    and padding 1 when ``maxpool``. None of it changes a parameter's name or shape except the
    kernel size of ``conv1.weight``."""

    kernel: int
    stride: int
    padding: int
    maxpool: bool


STEMS: dict[str, Stem] = {
    "cifar": Stem(3, 1, 1, maxpool=False),
    "cifar-pad2": Stem(3, 1, 2, maxpool=False),
    "imagenet": Stem(7, 2, 3, maxpool=True),
}


class ConvNet(nn.Module):
    """Distillation ConvNet: ``depth`` x [Conv3x3 -> InstanceNorm -> ReLU -> AvgPool2] -> Linear.

    The spatial size after the blocks is ``s = image_size // 2**depth``; the penultimate feature
    size is ``width * s * s`` and the head is ``Linear(width * s * s, out_dim)`` (``nn.Identity()``
    when ``out_dim`` is None, e.g. for a ConvNet teacher).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 128,
        depth: int = 3,
        out_dim: int | None = 512,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1 or (out_dim is not None and out_dim < 1):
            raise ValueError(
                f"ConvNet needs depth, width, in_channels and out_dim >= 1, got depth={depth}, "
                f"width={width}, in_channels={in_channels}, out_dim={out_dim}"
            )
        side = image_size // 2**depth
        if side < 1:
            raise ValueError(
                f"ConvNet depth {depth} pools {image_size}x{image_size} images below 1x1; "
                f"use depth <= {max(image_size.bit_length() - 1, 0)} or larger images"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features_net = nn.Sequential(*layers)
        self.feature_dim = width * side * side
        self.out_dim = out_dim
        self.head: nn.Module = nn.Linear(self.feature_dim, out_dim) if out_dim else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened penultimate features, shape (B, width * s * s)."""
        return self.features_net(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def convnet_ensemble(
    params: dict[str, torch.Tensor], x: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """E same-shape :class:`ConvNet` s evaluated as one network: (E, B, C, H, W) -> (E, B, out_dim).

    ``params[name]`` stacks the E ConvNets' parameter ``name`` along a new dim 0 (as
    ``torch.func.stack_module_state``); ``x[e]`` is ConvNet e's batch. The experts are folded into the
    channel axis, h = (B, E*C, H, W): each 3x3 convolution is one convolution with groups = E (expert
    e's filters see only its own channels), the instance norm is GroupNorm with one group per channel
    (E * width groups), ReLU and pooling act per channel, and the head is a batched matmul. Equals the
    E separate forward passes up to summation order, with one kernel per layer instead of E and no
    vmap. ``channels_last`` runs the convolutions on the channels_last layout.
    """
    e, b = x.shape[:2]
    h = x.transpose(0, 1).reshape(b, e * x.shape[2], *x.shape[3:])
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    depth = sum(1 for name in params if name.startswith("features_net.") and name.endswith(".weight")) // 2
    for i in range(depth):
        conv, norm = f"features_net.{4 * i}", f"features_net.{4 * i + 1}"
        h = nn.functional.conv2d(
            h, params[f"{conv}.weight"].flatten(0, 1), params[f"{conv}.bias"].flatten(), padding=1, groups=e
        )
        h = nn.functional.group_norm(
            h, h.shape[1], params[f"{norm}.weight"].flatten(), params[f"{norm}.bias"].flatten()
        )
        h = nn.functional.avg_pool2d(nn.functional.relu_(h), 2)
    features = h.reshape(b, e, -1).transpose(0, 1)  # (E, B, width * s * s), ConvNet.features order
    if "head.weight" not in params:
        return features
    return torch.baddbmm(params["head.bias"].unsqueeze(1), features, params["head.weight"].transpose(1, 2))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), names as in torchvision."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks and the first layers ``STEMS[stem]`` (default: the CIFAR stem).

    Stages have widths ``width * (1, 2, 4, 8)`` and strides (1, 2, 2, 2); features are the global
    average-pooled output of the last stage, shape (B, 8 * width). ``fc`` is
    ``Linear(8 * width, out_dim)`` or ``nn.Identity()`` when ``out_dim`` is None. Initialisation
    follows torchvision (Kaiming-normal fan_out convs, BatchNorm weight 1 / bias 0).
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        in_channels: int = 3,
        out_dim: int | None = None,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1 or width < 1 or in_channels < 1 or stem not in STEMS:
            raise ValueError(
                f"ResNet needs 4 stage depths >= 1, width, in_channels >= 1 and a stem in "
                f"{', '.join(STEMS)}, got layers={layers}, width={width}, in_channels={in_channels}, "
                f"stem={stem!r}"
            )
        s = STEMS[stem]
        self.conv1 = nn.Conv2d(in_channels, width, s.kernel, stride=s.stride, padding=s.padding, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1) if s.maxpool else nn.Identity()
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        for i, (n_blocks, p, stride) in enumerate(zip(layers, planes, (1, 2, 2, 2), strict=True)):
            blocks = [BasicBlock(in_planes, p, stride)]
            blocks += [BasicBlock(p, p) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = p
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 8 * width
        self.out_dim = out_dim
        self.fc: nn.Module = nn.Linear(self.feature_dim, out_dim) if out_dim else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global average-pooled output of the last stage, shape (B, 8 * width)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (2, 2, 2, 2); keyword arguments go to :class:`ResNet`."""
    return ResNet(layers=(2, 2, 2, 2), **kwargs)


def resnet10(**kwargs: Any) -> ResNet:
    """ResNet-10 (1, 1, 1, 1); keyword arguments go to :class:`ResNet`."""
    return ResNet(layers=(1, 1, 1, 1), **kwargs)


def build_model(
    arch: str,
    *,
    in_channels: int,
    image_size: int,
    width: int,
    depth: int,
    out_dim: int | None,
    stem: str = "cifar",
) -> nn.Module:
    """Build a model by name (one of :data:`MODEL_NAMES`); ``depth`` only applies to the ConvNet,
    ``stem`` (one of :data:`STEMS`) only to ResNets: the ConvNet refuses any but ``cifar``."""
    if arch == "convnet":
        if stem != "cifar":
            raise ValueError(f"the ConvNet has no stem option, got stem={stem!r}")
        return ConvNet(in_channels, image_size, width, depth, out_dim)
    if arch == "resnet18":
        return resnet18(width=width, in_channels=in_channels, out_dim=out_dim, stem=stem)
    if arch == "resnet10":
        return resnet10(width=width, in_channels=in_channels, out_dim=out_dim, stem=stem)
    raise ValueError(f"unknown model arch {arch!r}; choose one of {', '.join(MODEL_NAMES)}")


class NetworkSpec(Protocol):
    """A network's name, size and stem (:class:`mkdt.config.ModelConfig`)."""

    arch: str
    width: int
    depth: int
    stem: str


def build_network(spec: NetworkSpec, in_channels: int, image_size: int, out_dim: int | None) -> nn.Module:
    """:func:`build_model` for a spec: a student with an ``out_dim`` head, or an encoder (None)."""
    return build_model(
        spec.arch,
        in_channels=in_channels,
        image_size=image_size,
        width=spec.width,
        depth=spec.depth,
        out_dim=out_dim,
        stem=spec.stem,
    )


def features_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.features``: the representation every mkdt network exposes (typed for callers)."""
    return cast(Callable[[torch.Tensor], torch.Tensor], model.features)


def feature_dim(model: nn.Module) -> int:
    """``model.feature_dim``: the size of :func:`features_of`'s output."""
    return int(cast(int, model.feature_dim))


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def flatten_params(model: nn.Module) -> torch.Tensor:
    """All parameters concatenated in ``named_parameters`` order: a detached 1-D clone."""
    return torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).clone()


def unflatten_params(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat vector into views shaped like ``model``'s parameters, keyed by name.

    The result is differentiable with respect to ``flat`` (split + view, no copy) and can be passed
    to ``torch.func.functional_call(model, params, x)``.
    """
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(
            f"flat parameter vector must be 1-D with {sum(sizes)} elements for this model, "
            f"got shape {tuple(flat.shape)}"
        )
    chunks = torch.split(flat, sizes)
    return {name: c.view(p.shape) for (name, p), c in zip(named, chunks, strict=True)}
