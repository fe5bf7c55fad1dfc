"""The SSL training loop of the teacher (Barlow Twins or SimCLR).

The images stay on the device as uint8; a step draws an index batch from a seeded permutation,
makes two augmented views with batched tensor code (:class:`mkdt.nn.augment.SSLAugment`), and
minimises the SSL loss of the projected features with Adam (lr x batch/256, linear warm-up then
cosine decay per step). A :class:`~mkdt.train.checkpoint.PeriodicCheckpoint` makes it resumable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from mkdt.errors import TrainingDiverged
from mkdt.nn.augment import SSLAugment
from mkdt.nn.models import features_of
from mkdt.runtime import Runtime, progress
from mkdt.train.checkpoint import PeriodicCheckpoint


class SSLRecipe(Protocol):
    """What the loop reads of the teacher's config (:class:`mkdt.config.TeacherConfig`)."""

    method: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """lr factor: linear warm-up over ``warmup`` steps, then 0.5 (1 + cos(pi t)) down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def epoch_views(
    images: torch.Tensor, augment: SSLAugment, method: str, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (view 1, view 2) training batches of uint8 ``images`` (B, C, H, W).

    Index batches of a permutation drawn from ``gen`` (on the images' device; the last partial
    batch is dropped), each augmented as a batch: the asymmetric pair for barlow_twins, two draws of
    view 1 otherwise.
    """
    perm = torch.randperm(len(images), generator=gen, device=images.device)
    for i in range(len(images) // batch_size):
        batch = images[perm[i * batch_size : (i + 1) * batch_size]]
        if method == "barlow_twins":
            yield augment.two_views(batch, gen)
        else:
            yield augment(batch, gen), augment(batch, gen)


def train_ssl(
    encoder: nn.Module,
    projector: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    augment: SSLAugment,
    recipe: SSLRecipe,
    gen: torch.Generator,
    runtime: Runtime,
    checkpoint: PeriodicCheckpoint,
) -> tuple[list[float], list[float]]:
    """Train ``encoder`` (and ``projector``) in place on uint8 ``images`` on the device; resume
    from ``checkpoint`` when it holds a state. Returns the mean loss and the wall seconds of
    every epoch (of earlier processes too); the encoder is left in eval mode."""
    n = len(images)
    features = runtime.compiled(features_of(runtime.prepare(encoder)))
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.Adam(
        params, lr=recipe.lr * recipe.batch_size / 256, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = n // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total, recipe.warmup_epochs * steps_per_epoch)
    )
    objects = {
        "encoder": encoder,
        "projector": projector,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "generator": gen,
    }
    resumed = checkpoint.resume(objects)
    start = resumed.get("epoch", 0)
    history: list[float] = list(resumed.get("history", []))
    seconds: list[float] = list(resumed.get("epoch_seconds", []))
    bar = progress(
        range(start, recipe.epochs),
        desc=f"teacher ({recipe.method})",
        initial=start,
        total=recipe.epochs,
        unit="epoch",
    )
    for epoch in bar:
        t0 = time.perf_counter()
        encoder.train()
        projector.train()
        total_loss = torch.zeros((), device=images.device)
        for view1, view2 in epoch_views(images, augment, recipe.method, recipe.batch_size, gen):
            with runtime.autocast():
                p1 = projector(features(runtime.images(view1)))
                p2 = projector(features(runtime.images(view2)))
            loss = loss_fn(p1.float(), p2.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach()
        history.append(total_loss.item() / steps_per_epoch)  # .item() waits for the device
        if not math.isfinite(history[-1]):
            raise TrainingDiverged(
                f"teacher training diverged in epoch {epoch + 1} (non-finite SSL loss); lower teacher.lr"
            )
        seconds.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{history[-1]:.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if checkpoint.due(epoch + 1, recipe.epochs):
            checkpoint.save(objects, epoch=epoch + 1, history=history, epoch_seconds=seconds)
    encoder.eval()
    return history, seconds
