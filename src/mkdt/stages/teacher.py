"""Stage 1: the SSL teacher (Barlow Twins or SimCLR), trained (:func:`mkdt.train.ssl.train_ssl`) or
loaded from ``teacher.checkpoint`` (:func:`mkdt.nn.loading.load_encoder`), saved as
``teacher/encoder.safetensors``, and linear-probed on D_real's labels so the user knows its quality.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.nn.augment import SSLAugment
from mkdt.nn.loading import load_encoder
from mkdt.nn.models import build_network, feature_dim
from mkdt.nn.ssl import BarlowTwinsLoss, NTXentLoss, barlow_twins_projector, simclr_projector
from mkdt.runtime import Runtime, derive_seed, generator, seeded
from mkdt.stages.context import StageContext
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.kd import encode
from mkdt.train.probe import linear_probe
from mkdt.train.ssl import SSLRecipe, train_ssl

STAGE = "teacher"


def train_teacher(ctx: StageContext) -> tuple[nn.Module, list[float], list[float]]:
    """Build the encoder, projector and loss (seeded), train them, resuming from the stage's
    checkpoint. Returns the encoder (eval mode, on the device) and the loss and seconds per epoch."""
    config, real, runtime, t = ctx.config, ctx.real, ctx.runtime, ctx.config.teacher
    data = real.data
    with seeded(derive_seed(config.seed, "teacher-init")):
        encoder = build_network(t.model, data.channels, data.image_size, out_dim=None).to(runtime.device)
        if t.method == "barlow_twins":
            projector = barlow_twins_projector(feature_dim(encoder), t.projector_dim, t.projector_dim)
            loss_fn: nn.Module = BarlowTwinsLoss(lambda_offdiag=t.bt_lambda)
        else:
            projector = simclr_projector(feature_dim(encoder), t.projector_dim, t.simclr_out_dim)
            loss_fn = NTXentLoss(temperature=t.temperature)
    projector = projector.to(runtime.device)
    checkpoint = PeriodicCheckpoint(
        ctx.store.teacher_checkpoint_path, ctx.spec, t.checkpoint_every, STAGE, runtime.is_main
    )
    history, seconds = train_ssl(
        encoder,
        projector,
        loss_fn,
        real.images,
        SSLAugment(data.image_size, data.mean, data.std),
        SSLRecipe(
            method=t.method,
            epochs=t.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            warmup_epochs=t.warmup_epochs,
        ),
        generator(derive_seed(config.seed, "teacher-data"), runtime.device),
        runtime,
        checkpoint,
    )
    return encoder, history, seconds


def probe_accuracy(encoder: nn.Module, real: RealData, batch_size: int) -> float:
    """Linear-probe test accuracy of the encoder's features with all training labels of D_real."""
    data = real.data
    train = encode(encoder, real.images, batch_size, "probe features", normalize=data.normalize)
    test = encode(encoder, data.test_images.to(real.device), batch_size, normalize=data.normalize)
    return linear_probe(train, data.train_labels, test, data.test_labels, num_classes=data.num_classes)


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Train (or load) the teacher into ``out/teacher``; skip if done."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    if (done := ctx.finished(force, (ctx.store.teacher_checkpoint_path,))) is not None:
        return done
    t, data = config.teacher, ctx.real.data
    result: dict[str, Any] = {}
    if t.checkpoint is not None:
        encoder = load_encoder(Path(t.checkpoint).expanduser(), t.model, data.channels, data.image_size)
        encoder = encoder.to(ctx.runtime.device)
        result["loaded_from"] = str(t.checkpoint)
    else:
        encoder, result["loss_history"], result["epoch_seconds"] = train_teacher(ctx)
    if ctx.runtime.is_main:
        ctx.store.save_encoder(
            encoder,
            {
                "model": dataclasses.asdict(t.model),
                "in_channels": data.channels,
                "image_size": data.image_size,
                "feature_dim": feature_dim(encoder),
                "mean": list(data.mean),
                "std": list(data.std),
            },
        )
    result["train_seconds"] = ctx.seconds()
    if t.probe and ctx.runtime.is_main:
        result["probe_accuracy"] = probe_accuracy(encoder, ctx.real, config.targets.batch_size)
        print(
            f"teacher linear-probe accuracy on {config.data.name}: "
            f"{100 * result['probe_accuracy']:.2f}% (all {data.num_train} training labels)"
        )
    return ctx.finish(result, (ctx.store.encoder_path,))
