"""The SSL training loop of the teacher (Barlow Twins or SimCLR).

The images stay on the device as uint8; a step draws an index batch from a seeded permutation,
makes two augmented views with batched tensor code (:class:`mkdt.nn.augment.SSLAugment`), and
minimises the SSL loss of the projected features with Adam (lr x batch/256, linear warm-up then
cosine decay per step). A :class:`~mkdt.train.checkpoint.PeriodicCheckpoint` makes it resumable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mkdt.errors import ConfigError, TrainingDiverged
from mkdt.nn.augment import SSLAugment
from mkdt.nn.distributed import gather_batch, globalise_batch_norms
from mkdt.nn.models import features_of
from mkdt.runtime import Runtime, derive_seed, generator, progress
from mkdt.train.checkpoint import PeriodicCheckpoint


@dataclass(frozen=True, kw_only=True)
class SSLRecipe:
    """How the teacher is trained (the loop's math only; checkpoint interval and devices are passed
    apart). Built from :class:`mkdt.config.TeacherConfig`; every field is required.

    - ``method``: the SSL method, ``"barlow_twins"`` (asymmetric view pair) or ``"simclr"``.
    - ``epochs``: passes over the images (count; the last partial batch of each is dropped).
    - ``batch_size``: images per step, each giving two views (the global batch under
      torch.distributed).
    - ``lr``: Adam learning rate per 256 images (the loop uses ``lr * batch_size / 256``).
    - ``weight_decay``: Adam weight decay (adds ``weight_decay * theta`` to the gradient).
    - ``warmup_epochs``: epochs of linear warm-up before the cosine decay (count, <= ``epochs``).
    """

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
    images: torch.Tensor,
    augment: SSLAugment,
    method: str,
    batch_size: int,
    gen: torch.Generator,
    augment_gen: torch.Generator | None = None,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (view 1, view 2) training batches of uint8 ``images`` (B, C, H, W).

    Index batches of a permutation drawn from ``gen`` (on the images' device; the last partial
    batch is dropped), each augmented as a batch (with ``augment_gen``, default ``gen``): the
    asymmetric pair for barlow_twins, two draws of view 1 otherwise. ``part = (r, n)`` keeps the
    r-th of n equal slices of every batch (rank r's share of a global batch).
    """
    aug = augment_gen or gen
    rank, world = part
    share = batch_size // world
    perm = torch.randperm(len(images), generator=gen, device=images.device)
    for i in range(len(images) // batch_size):
        batch = images[perm[i * batch_size : (i + 1) * batch_size][rank * share : (rank + 1) * share]]
        if method == "barlow_twins":
            yield augment.two_views(batch, aug)
        else:
            yield augment(batch, aug), augment(batch, aug)


def ssl_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
) -> torch.Tensor:
    """One optimisation step on a batch of two views; returns the loss (detached).

    Under torch.distributed each rank passes its slice of the global batch: the projections are
    gathered (:func:`mkdt.nn.distributed.gather_batch`) so that the loss, Barlow Twins'
    standardisation and SimCLR's negatives cover the global batch, and the gradients are averaged
    over the ranks (every rank computes the same global loss, whose gradient reaches its own rows
    once per rank). This is data parallelism as DistributedDataParallel does it, written out
    because the two views need two forward passes before one backward pass."""
    with runtime.autocast():
        p1 = forward(runtime.images(view1))
        p2 = forward(runtime.images(view2))
    loss = loss_fn(gather_batch(p1.float()), gather_batch(p2.float()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if runtime.distributed:
        grads = [p.grad for p in params if p.grad is not None]
        flat = runtime.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / runtime.world
        for g, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(piece.view_as(g))
    optimizer.step()
    return loss.detach()


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
    if runtime.distributed:  # batch statistics of the global batch
        globalise_batch_norms(encoder)
        globalise_batch_norms(projector)
        if recipe.batch_size % runtime.world:
            raise ConfigError(
                f"teacher.batch_size ({recipe.batch_size}) must be a multiple of the number of "
                f"ranks ({runtime.world}): it is the global batch, split evenly"
            )
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
    base_seed = int(gen.initial_seed())  # read before resuming restores the generator's state
    resumed = checkpoint.resume(objects)

    def rank_augmentation(epoch: int) -> tuple[torch.Generator | None, tuple[int, int]]:
        """Under torch.distributed: this rank's augmentation stream for ``epoch`` (re-seeded each
        epoch, so a resumed run draws the same) and its share of each batch."""
        if not runtime.distributed:
            return None, (0, 1)
        seed = derive_seed(base_seed, "augment", epoch, runtime.rank)
        return generator(seed, images.device), (runtime.rank, runtime.world)

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
        views = epoch_views(images, augment, recipe.method, recipe.batch_size, gen, *rank_augmentation(epoch))
        for view1, view2 in views:
            total_loss += ssl_step(
                lambda x: projector(features(x)), loss_fn, view1, view2, params, optimizer, runtime
            )
            scheduler.step()
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
