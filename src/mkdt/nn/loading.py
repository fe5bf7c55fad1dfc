"""Loading encoder weights from a file: mkdt's own encoders and published ResNet checkpoints.

A checkpoint is a .safetensors file or a torch file (loaded with ``weights_only=True``: no code
runs). Wrapping dicts (``state_dict``, ``model``, ``encoder``, ``backbone``) are opened and the key
segments ``module`` (DDP) and ``_orig_mod`` (``torch.compile``) dropped; then the first of
:data:`LAYOUTS` whose stem key the file holds says where the encoder's tensors are and how they are
named, and they are renamed to mkdt's (= torchvision's) names. Keys outside the layout's prefix
(projectors, online classifiers, momentum copies) and ``fc.*``, ``projector.*``, ``head.*``,
``prototypes.*`` are ignored. A file that matches no layout is read as it is (mkdt's own ConvNet
encoders).

A sequential layout is a ResNet's children in an ``nn.Sequential`` (lightly's
``nn.Sequential(*list(resnet.children())[:-1])``, SimCLR's and mix-bt's ``self.f``): children
are numbered, and only those with tensors appear in the file. Those are, in order, ``conv1``,
``bn1``, ``layer1`` .. ``layer4``, so the numbering does not matter: a max-pool kept, replaced by
``nn.Identity`` or dropped, and ``relu``/``avgpool``, leave no keys. The padding and the max-pool
cannot be read from a state dict; the configured stem (``teacher.model.stem``) must say them, and a
first convolution whose kernel contradicts it is refused. Any other mismatch with the configured
architecture raises ArtifactError too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.errors import ArtifactError
from mkdt.files import load_checkpoint, load_tensors
from mkdt.nn.models import STEMS, NetworkSpec, build_network

_WRAPPERS = ("state_dict", "model", "encoder", "backbone")
_DROPPED_SEGMENTS = frozenset({"module", "_orig_mod"})
_IGNORED = ("fc.", "projector.", "head.", "prototypes.")
_SEQUENTIAL_NAMES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint keeps the encoder (``prefix``) and whether its children are named
    (``conv1``, ``layer1``, ...) or numbered (an ``nn.Sequential`` of the ResNet's children)."""

    name: str
    prefix: str
    sequential: bool

    @property
    def stem_key(self) -> str:
        """The key of the first convolution's weight, which identifies the layout."""
        return self.prefix + ("0.weight" if self.sequential else "conv1.weight")


LAYOUTS: tuple[Layout, ...] = (
    Layout("torchvision / mkdt / KRR-ST", "", sequential=False),
    Layout("solo-learn", "backbone.", sequential=False),
    Layout("solo-learn < 1.0", "encoder.", sequential=False),
    Layout("torchvision under model.", "model.", sequential=False),
    Layout("lightly", "backbone.", sequential=True),
    Layout("SimCLR / mix-bt (f.N)", "f.", sequential=True),
    Layout("nn.Sequential of the children", "", sequential=True),
)
AS_IS = LAYOUTS[0]


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, wrapping dicts opened and ``module.`` / ``_orig_mod.``
    segments dropped from the keys."""
    state: Any = load_tensors(path)[0] if path.suffix == ".safetensors" else load_checkpoint(path)
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} does not hold a state dict")
    return {
        ".".join(part for part in key.split(".") if part not in _DROPPED_SEGMENTS): value
        for key, value in state.items()
        if torch.is_tensor(value)
    }


def layout_of(state: dict[str, torch.Tensor]) -> Layout:
    """The first layout whose stem key ``state`` holds, else :data:`AS_IS`."""
    return next((layout for layout in LAYOUTS if layout.stem_key in state), AS_IS)


def encoder_state(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The encoder's tensors of ``state`` under mkdt's names (see the module docstring)."""
    inside = {k.removeprefix(layout.prefix): v for k, v in state.items() if k.startswith(layout.prefix)}
    if layout.sequential:
        inside = _name_children(inside)
    return {k: v for k, v in inside.items() if not k.startswith(_IGNORED)}


def _name_children(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``N.rest`` -> ``NAME.rest``, NAME the i-th of conv1, bn1, layer1..4 for the i-th numbered
    child with tensors; other keys (and children past the sixth) keep their names."""
    numbered = sorted({int(head) for head, _, _ in (k.partition(".") for k in state) if head.isdigit()})
    names = dict(zip(map(str, numbered), _SEQUENTIAL_NAMES, strict=False))
    renamed = {}
    for key, value in state.items():
        head, dot, rest = key.partition(".")
        renamed[f"{names.get(head, head)}{dot}{rest}"] = value
    return renamed


def _read_as(layout: Layout, raw: dict[str, torch.Tensor]) -> str:
    if layout.stem_key in raw:
        return f"read as the {layout.name} layout"
    return f"no known layout: none of {', '.join(dict.fromkeys(x.stem_key for x in LAYOUTS))}"


def check_stem(
    path: Path, spec: NetworkSpec, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint whose first convolution's kernel contradicts ``spec.stem``."""
    if "conv1.weight" not in own or "conv1.weight" not in state:
        return
    found, built = state["conv1.weight"].shape[-1], own["conv1.weight"].shape[-1]
    if found != built:
        fits = [name for name, stem in STEMS.items() if stem.kernel == found]
        hint = f"set teacher.model.stem={' or '.join(fits)}" if fits else "no teacher.model.stem builds that"
        raise ArtifactError(
            f"{path} has a {found}x{found} first convolution but teacher.model.stem={spec.stem} "
            f"builds {built}x{built}; {hint}"
        )


def load_encoder(path: Path, spec: NetworkSpec, in_channels: int, image_size: int) -> nn.Module:
    """The encoder of ``spec`` (no head) with the weights in ``path``, in eval mode on the CPU;
    a first convolution that contradicts the stem, and missing, unexpected or wrongly shaped keys
    raise ArtifactError."""
    encoder = build_network(spec, in_channels, image_size, out_dim=None)
    raw = read_state(path)
    layout = layout_of(raw)
    state = encoder_state(raw, layout)
    own = encoder.state_dict()
    check_stem(path, spec, own, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise ArtifactError(
            f"{path} does not fit teacher.model={spec.arch} width {spec.width} "
            f"on {in_channels}x{image_size}x{image_size} images ({_read_as(layout, raw)}; {detail})"
        )
    encoder.load_state_dict(state)
    return encoder.eval()
