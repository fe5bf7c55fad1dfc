"""Fine-tuning evaluation: a copy of a pre-trained encoder plus a new linear head, all trained with
cross-entropy on a task's labelled images (docs/method.md §5, "Fine-tuning").

The recipe is KRR-ST's (Lee et al., "Self-supervised dataset distillation for transfer learning",
ICLR 2024; github.com/db-Lee/selfsup_dd, ``test.py`` and ``algorithms/finetune.py``), the setting
of the MKDT paper's appendix B: SGD with momentum 0.9 and weight decay 5e-4 on every parameter,
learning rate 0.01 annealed to 0 by a cosine schedule over the steps (no warm-up), batches of 256
taken from a fresh permutation of the labelled images on each pass (the last batch of a pass may
be smaller), each batch augmented by a random crop of the zero-padded images (4 pixels, fewer
below 32 px: :func:`crop_padding`) and a horizontal flip with probability 1/2, then normalised.
The test images are only normalised and the network is evaluated in eval mode. The head starts
from PyTorch's default ``nn.Linear`` initialisation under its own seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.errors import TrainingDiverged
from mkdt.nn.models import feature_dim, features_of
from mkdt.runtime import Runtime, progress, seeded

Normalize = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class FinetuneRecipe:
    """How the encoder and its head are fine-tuned (the loop's math only; progress and devices are
    passed apart).

    - ``steps``: SGD steps (count; batches, not epochs).
    - ``lr``: initial SGD learning rate, cosine-annealed to 0 over ``steps``.
    - ``momentum``: SGD momentum (dimensionless, in [0, 1)).
    - ``weight_decay``: SGD weight decay on every parameter (adds ``weight_decay * theta`` to
      the gradient).
    - ``batch_size``: labelled images per step (the last batch of a pass may be smaller).
    - ``augment``: crop the zero-padded images (:func:`crop_padding` pixels) and flip them
      left-right with probability 1/2, per batch (flag).
    """

    steps: int = 10000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: bool = True


class Classifier(nn.Module):
    """``head(encoder.features(x))``: a pre-trained encoder with a new linear head. The encoder's
    own (KD) head is not used, so it gets no gradient and SGD leaves it alone."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim(encoder), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(features_of(self.encoder)(x))


def crop_padding(image_size: int) -> int:
    """Zero padding of the random crop: KRR-ST's 4 pixels (at 32, 64 and 224 px), at most 1/8 of
    the side for smaller images (1 pixel for 8x8 digits)."""
    return min(4, image_size // 8)


def pad_crop_flip(images: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of the batch (B, C, H, W) cropped back to H x W from its copy zero-padded by
    ``padding`` on every side (offsets uniform in [0, 2 * padding]), then flipped left-right with
    probability 1/2; the random draws come from ``gen``. Same dtype as ``images``."""
    b, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=gen.device).to(dev)
    rows = offsets[0, :, None] + torch.arange(h, device=dev)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=dev)  # (B, W)
    batch = torch.arange(b, device=dev)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def batch_indices(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into range(n): consecutive passes, each over a fresh
    permutation drawn from ``gen`` and cut into batches of ``batch_size`` (the last one of a pass
    may be smaller), like KRR-ST's endless shuffled loader."""
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen, device=gen.device)
        for i in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size]
            done += 1


def fine_tune(
    encoder: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    normalize: Normalize,
    recipe: FinetuneRecipe,
    head_seed: int,
    gen: torch.Generator,
    runtime: Runtime | None = None,
    desc: str | None = None,
) -> Classifier:
    """A :class:`Classifier` of a copy of ``encoder`` (left unchanged) and a head initialised under
    ``head_seed``, trained on the uint8 ``images`` (N, C, H, W) and ``labels`` (N,) by the recipe;
    batch order and augmentation draw from ``gen`` (on the images' device). ``runtime`` runs the
    forward pass under its autocast / layout / compile settings. A non-finite loss raises
    TrainingDiverged advising to lower ``evaluate.finetune.lr``."""
    runtime = runtime or Runtime(images.device)
    with seeded(head_seed):
        model = Classifier(copy.deepcopy(encoder), num_classes).to(images.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    model.train()
    forward = runtime.compiled(runtime.prepare(model))
    padding = crop_padding(images.shape[-1])
    total = torch.zeros((), device=images.device)
    steps = batch_indices(len(images), recipe.batch_size, recipe.steps, gen)
    for idx in progress(steps, desc=desc, leave=False, total=recipe.steps, unit="step", disable=desc is None):
        x = pad_crop_flip(images[idx], padding, gen) if recipe.augment else images[idx]
        with runtime.autocast():
            logits = forward(runtime.images(normalize(x)))
        loss = F.cross_entropy(logits.float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.detach()
    if not math.isfinite(total.item()):
        where = f" ({desc})" if desc else ""
        raise TrainingDiverged(f"fine-tuning{where} diverged (non-finite loss); lower evaluate.finetune.lr")
    return model


@torch.no_grad()
def top1_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Normalize
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on uint8 ``images`` and ``labels``."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i : i + batch_size]))
        correct += (logits.argmax(dim=1) == labels[i : i + batch_size]).sum()
    return correct.item() / len(images)
