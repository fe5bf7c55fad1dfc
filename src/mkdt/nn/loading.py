"""Loading encoder weights from a file: mkdt's own encoders and published ResNet checkpoints.

A checkpoint is a ResNet state dict in torchvision's naming (``conv1.weight``,
``layer1.0.bn1.running_mean``, ...), as a .safetensors file or a torch file (loaded with
``weights_only=True``: no code runs). Wrapping dicts (``state_dict``, ``model``, ``encoder``,
``backbone``) and key prefixes (``module.``, ``backbone.``, ``encoder.``, ``model.``) are removed,
so checkpoints of solo-learn and lightly (``backbone.*``), of DDP (``module.*``) and of the MKDT
authors' release load as they are; ``fc.*``, ``projector.*``, ``head.*`` and ``prototypes.*`` keys
are ignored. The architecture must match the configured one; a mismatch raises ArtifactError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.errors import ArtifactError
from mkdt.files import load_checkpoint, load_tensors
from mkdt.nn.models import NetworkSpec, build_network

_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
_IGNORED = ("fc.", "projector.", "head.", "prototypes.")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's encoder state dict, unwrapped and with known prefixes removed."""
    if path.suffix == ".safetensors":
        state: Any = load_tensors(path)[0]
    else:
        state = load_checkpoint(path)
    for key in ("state_dict", "model", "encoder", "backbone"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} does not hold a state dict")
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        if torch.is_tensor(value) and not key.startswith(_IGNORED):
            cleaned[key] = value
    return cleaned


def load_encoder(path: Path, spec: NetworkSpec, in_channels: int, image_size: int) -> nn.Module:
    """The encoder of ``spec`` (no head) with the weights in ``path``, in eval mode on the CPU;
    missing, unexpected or wrongly shaped keys raise ArtifactError."""
    encoder = build_network(spec, in_channels, image_size, out_dim=None)
    state = load_state_dict_file(path)
    own = encoder.state_dict()
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
            f"on {in_channels}x{image_size}x{image_size} images ({detail})"
        )
    encoder.load_state_dict(state)
    return encoder.eval()
