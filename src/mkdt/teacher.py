"""Stage 1: the SSL teacher (Barlow Twins or SimCLR), trained or loaded from a checkpoint.

Training keeps D_real on the device as uint8; a step draws an index batch from a seeded
permutation, makes two augmented views with batched tensor code (:mod:`mkdt.augment`), and
minimises the SSL loss of the projected features with Adam (lr x batch/256, linear warm-up then
cosine decay per step). A resumable checkpoint is written every ``checkpoint_every`` epochs; the
encoder is saved as ``teacher/encoder.safetensors``. At the end the encoder's features are
linear-probed on the dataset's labels so the user knows the teacher's quality.

Loading a checkpoint (``teacher.checkpoint=PATH``): a ResNet state dict in torchvision's naming
(``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), as a .safetensors file or a torch file
(loaded with ``weights_only=True``). Wrapping dicts (``state_dict``, ``model``, ``encoder``,
``backbone``) and key prefixes (``module.``, ``backbone.``, ``encoder.``, ``model.``) are
removed, so checkpoints of solo-learn and lightly (``backbone.*``), of DDP (``module.*``) and of
the MKDT authors' release load as they are; ``fc.*``, ``projector.*`` and ``head.*`` keys are
ignored. The architecture (teacher.model) must match, and the teacher is assumed to have been
trained with the dataset's normalisation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.artifacts import (
    RunDir,
    derive_seed,
    file_sha256,
    fingerprint,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    save_tensors,
)
from mkdt.augment import SSLAugment
from mkdt.config import Config, ModelConfig
from mkdt.data import ImageData
from mkdt.errors import ArtifactError, ConfigError
from mkdt.models import build_model
from mkdt.probe import linear_probe
from mkdt.runtime import data_identity, fast_path, generator, load_real, progress, resolve_device, seeded
from mkdt.ssl import BarlowTwinsLoss, NTXentLoss, barlow_twins_projector, simclr_projector

STAGE = "teacher"
_NOT_DEFINING = ("checkpoint_every", "probe")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
_IGNORED = ("fc.", "projector.", "head.", "prototypes.")


def defining(config: Config) -> dict[str, Any]:
    """Config keys that define the teacher: the data, and the recipe or the checkpoint's hash."""
    t = config.teacher
    if t.checkpoint is not None:
        teacher = {"checkpoint_sha256": file_sha256(Path(t.checkpoint).expanduser()),
                   "model": dataclasses.asdict(t.model)}
    else:
        teacher = {k: v for k, v in dataclasses.asdict(t).items() if k not in _NOT_DEFINING}
    return {"data": data_identity(config), "teacher": teacher}


def build_encoder(model: ModelConfig, data: ImageData) -> nn.Module:
    """The teacher encoder; ``encoder.features(x)`` gives the representation."""
    return build_model(model.arch, in_channels=data.channels, image_size=data.image_size,
                       width=model.width, depth=model.depth, out_dim=None)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """lr factor: linear warm-up over ``warmup`` steps, then 0.5 (1 + cos(pi t)) down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def epoch_views(images: torch.Tensor, augment: SSLAugment, method: str, batch_size: int,
                gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (view 1, view 2) training batches of uint8 ``images`` (B, C, H, W).

    Index batches of a permutation drawn from ``gen`` (on the images' device; the last partial
    batch is dropped), each augmented as a batch: the asymmetric pair for barlow_twins, two draws of
    view 1 otherwise.
    """
    perm = torch.randperm(len(images), generator=gen, device=images.device)
    for i in range(len(images) // batch_size):
        batch = images[perm[i * batch_size:(i + 1) * batch_size]]
        if method == "barlow_twins":
            yield augment.two_views(batch, gen)
        else:
            yield augment(batch, gen), augment(batch, gen)


def train_teacher(config: Config, data: ImageData, device: torch.device,
                  checkpoint_path: Path | None = None) -> tuple[nn.Module, list[float], list[float]]:
    """Train the SSL teacher; resume from ``checkpoint_path`` if it holds a compatible state.

    Returns the encoder (eval mode, on ``device``), the mean loss and the wall seconds of every epoch.
    """
    t = config.teacher
    n = data.num_train
    if t.batch_size > n:
        raise ConfigError(f"teacher.batch_size ({t.batch_size}) is larger than D_real ({n} images)")
    with seeded(derive_seed(config.seed, "teacher-init")):
        encoder = build_encoder(t.model, data).to(device)
        if t.method == "barlow_twins":
            projector = barlow_twins_projector(encoder.feature_dim, t.projector_dim, t.projector_dim)
            loss_fn: nn.Module = BarlowTwinsLoss(lambda_offdiag=t.bt_lambda)
        else:
            projector = simclr_projector(encoder.feature_dim, t.projector_dim, t.simclr_out_dim)
            loss_fn = NTXentLoss(temperature=t.temperature)
    projector = projector.to(device)
    fast = fast_path(config, device)
    features = fast.compiled(fast.prepare(encoder).features)
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.Adam(params, lr=t.lr * t.batch_size / 256, weight_decay=t.weight_decay)
    steps_per_epoch = n // t.batch_size
    total = t.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total, t.warmup_epochs * steps_per_epoch))
    augment = SSLAugment(data.image_size, data.mean, data.std)
    gen = generator(derive_seed(config.seed, "teacher-data"), device)
    images = data.train_images.to(device)
    history: list[float] = []
    seconds: list[float] = []
    start = 0
    spec = defining(config)
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        RunDir(checkpoint_path.parent.parent).check_compatible(STAGE, state, spec)
        encoder.load_state_dict(state["encoder"])
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start, history = state["epoch"], list(state["history"])
        seconds = list(state.get("epoch_seconds", []))

    bar = progress(range(start, t.epochs), desc=f"teacher ({t.method})", initial=start,
                   total=t.epochs, unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        encoder.train()
        projector.train()
        total_loss = torch.zeros((), device=device)
        for view1, view2 in epoch_views(images, augment, t.method, t.batch_size, gen):
            with fast.autocast():
                p1, p2 = projector(features(fast.images(view1))), projector(features(fast.images(view2)))
            loss = loss_fn(p1.float(), p2.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach()
        history.append(total_loss.item() / steps_per_epoch)  # .item() waits for the device
        seconds.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{history[-1]:.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = epoch + 1
        if checkpoint_path is not None and (done % t.checkpoint_every == 0 or done == t.epochs):
            save_checkpoint(checkpoint_path, {
                "encoder": encoder.state_dict(), "projector": projector.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(), "epoch": done, "history": history, "epoch_seconds": seconds,
                "fingerprint": fingerprint(spec), "defining": spec})
    return encoder.eval(), history, seconds


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


def load_teacher_checkpoint(path: Path, model: ModelConfig, data: ImageData) -> nn.Module:
    """Build the configured encoder and load ``path`` into it; mismatches raise ArtifactError."""
    encoder = build_encoder(model, data)
    state = load_state_dict_file(path)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise ArtifactError(f"{path} does not fit teacher.model={model.arch} width {model.width} "
                            f"on {data.channels}x{data.image_size}x{data.image_size} images ({detail})")
    encoder.load_state_dict(state)
    return encoder.eval()


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, data: ImageData, batch_size: int,
           device: torch.device, desc: str | None = None) -> torch.Tensor:
    """``encoder.features`` of uint8 images in eval mode, normalised like ``data``: (N, D) float32 CPU.

    The uint8 images move to ``device`` once; batches are slices of that device-resident tensor."""
    encoder.eval()
    images = images.to(device)
    chunks = range(0, len(images), batch_size)
    out = [encoder.features(data.normalize(images[i:i + batch_size])).float()
           for i in progress(chunks, desc=desc, leave=False, disable=desc is None)]
    return torch.cat(out).cpu()


def probe_accuracy(encoder: nn.Module, data: ImageData, device: torch.device,
                   batch_size: int) -> float:
    """Linear-probe test accuracy of the encoder's features with all training labels of D_real."""
    train = encode(encoder, data.train_images, data, batch_size, device, "probe features")
    test = encode(encoder, data.test_images, data, batch_size, device)
    return linear_probe(train, data.train_labels, test, data.test_labels,
                        num_classes=data.num_classes)


def save_encoder(path: Path, encoder: nn.Module, model: ModelConfig, data: ImageData) -> None:
    meta = {"model": dataclasses.asdict(model), "in_channels": data.channels,
            "image_size": data.image_size, "feature_dim": encoder.feature_dim,
            "mean": list(data.mean), "std": list(data.std)}
    save_tensors(path, encoder.state_dict(), meta)


def load_encoder(run: RunDir, model: ModelConfig, data: ImageData) -> nn.Module:
    """The teacher encoder saved in a run directory."""
    return load_teacher_checkpoint(run.stage_dir(STAGE) / "encoder.safetensors", model, data)


def run(config: Config, out: str | Path, *, force: bool = False,
        data: ImageData | None = None) -> dict[str, Any]:
    """Stage entry point: train (or load) the teacher into ``out/teacher``; skip if done."""
    run_dir = RunDir(out)
    spec = defining(config)
    ckpt = run_dir.stage_dir(STAGE) / "checkpoint.pt"
    if (done := run_dir.finished_or_reset(STAGE, spec, force, (ckpt,))) is not None:
        return done
    device = resolve_device(config.device)
    data = data if data is not None else load_real(config)
    start = time.perf_counter()
    t = config.teacher
    result: dict[str, Any] = {}
    if t.checkpoint is not None:
        encoder = load_teacher_checkpoint(Path(t.checkpoint).expanduser(), t.model, data).to(device)
        result["loaded_from"] = str(t.checkpoint)
    else:
        encoder, history, seconds = train_teacher(config, data, device, ckpt)
        result["loss_history"], result["epoch_seconds"] = history, seconds
    save_encoder(run_dir.stage_dir(STAGE) / "encoder.safetensors", encoder, t.model, data)
    result["train_seconds"] = time.perf_counter() - start
    if t.probe:
        result["probe_accuracy"] = probe_accuracy(encoder, data, device, config.targets.batch_size)
        print(f"teacher linear-probe accuracy on {config.data.name}: "
              f"{100 * result['probe_accuracy']:.2f}% (all {data.num_train} training labels)")
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)
