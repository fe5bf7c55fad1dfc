"""The evaluation's protocol, shared by the evaluate stage, the pipeline and the analyses: the
matched window and the evaluation's pre-training in SGD steps, the pre-training of a method's
student, downstream tasks and the probe.

A task entry is a registered dataset name, optionally ``name=root``. Its images are resized to
D_real's resolution, grayscale is repeated to RGB where the encoder takes 3 channels, and all
images are normalised with D_real's statistics (what the encoder was trained on). For label
fraction f and probe seed s, the labelled images are a fraction f of the task's training split
drawn from ``derive_seed(seed, "labels", task, f, s)`` (the same for every method and every
analysis), and the accuracy is measured on the whole test split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mkdt.config import Config, ModelConfig
from mkdt.config.schema import parse_task
from mkdt.data import ImageData, load_dataset
from mkdt.errors import ConfigError
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator, seeded
from mkdt.store import INIT_METHODS, SyntheticSet
from mkdt.train.kd import KDRecipe, encode, train_student
from mkdt.train.probe import linear_probe


@dataclass(frozen=True)
class Window:
    """The matched part of the expert trajectories, in epochs and in SGD steps of the experts."""

    end_epoch: int  # T+ - 1 + M
    steps_per_epoch: int

    @property
    def end_step(self) -> int:
        return self.end_epoch * self.steps_per_epoch


def window_of(config: Config, num_real: int) -> Window:
    """Epochs [0, T+ - 1 + M] of the experts, who take ceil(|D_real| / experts.batch_size) steps
    per epoch (the last batch may be partial)."""
    d = config.distill
    return Window(d.max_start_epoch - 1 + d.expert_epochs, -(-num_real // config.experts.batch_size))


def window_summary(config: Config, num_real: int, syn_images: int | None = None) -> str:
    """One line stating the matched window and the evaluation's pre-training in SGD steps."""
    w, v, d = window_of(config, num_real), config.evaluate, config.distill
    n = syn_images if syn_images is not None else config.init.images
    eval_steps = v.epochs * -(-n // v.batch_size)
    return (
        f"matched window: expert epochs 0-{w.end_epoch} ({w.end_step} expert SGD steps of batch "
        f"{config.experts.batch_size}), reproduced by {d.syn_steps} synthetic steps of batch "
        f"{d.batch_syn}; evaluation pre-trains |D_syn| = {n} for {v.epochs} epochs = {eval_steps} "
        f"steps of batch {min(n, v.batch_size)}"
    )


def student_model(config: Config) -> ModelConfig:
    """The network pre-trained for evaluation: ``evaluate.model``, or ``experts.student``."""
    return config.evaluate.model or config.experts.student


def pretrain(
    config: Config,
    method: str,
    seed: int,
    pset: SyntheticSet | None,
    data: ImageData,
    out_dim: int,
    runtime: Runtime,
) -> tuple[nn.Module, list[float]]:
    """A fresh student for (method, seed) KD-trained on ``pset`` (left at its init when None).

    Returns the student (on the device) and its mean KD loss per epoch ([] without training).
    """
    device = runtime.device
    with seeded(derive_seed(config.seed, "evaluate", method, seed, "init")):
        student = build_network(student_model(config), data.channels, data.image_size, out_dim).to(device)
    if pset is None:
        return student, []
    v = config.evaluate
    recipe = KDRecipe(
        epochs=v.epochs, lr=pset.lr, momentum=v.momentum, weight_decay=v.weight_decay, batch_size=v.batch_size
    )
    gen = generator(derive_seed(config.seed, "evaluate", method, seed, "batches"), device)
    trajectory = train_student(
        student,
        pset.images.to(device),
        pset.targets.to(device),
        recipe,
        [v.epochs],
        gen,
        desc=f"pre-train {method} (seed {seed})",
        runtime=runtime,
        lr_key="evaluate.lr"
        if method in ("full", "mtt_ssl") or method in INIT_METHODS
        else f"distill.lr_lr ({method} pre-trains at MKDT's learned alpha_syn)",
    )
    return student, trajectory.loss.tolist()


def task_names(config: Config) -> list[str]:
    """The task entries: ``evaluate.tasks``, or the pre-training dataset alone."""
    return config.evaluate.tasks or [config.data.name]


def match_channels(task: ImageData, channels: int, entry: str) -> ImageData:
    """``task`` with ``channels`` channels: grayscale repeated to RGB; other mismatches raise
    ConfigError."""
    if task.channels == channels:
        return task
    if task.channels == 1 and channels == 3:
        return dataclasses.replace(
            task,
            train_images=task.train_images.repeat(1, 3, 1, 1),
            test_images=task.test_images.repeat(1, 3, 1, 1),
            mean=task.mean * 3,
            std=task.std * 3,
        )
    raise ConfigError(
        f"task {entry!r} has {task.channels}-channel images but the encoder was "
        f"pre-trained on {channels}-channel images; only grayscale -> RGB is "
        "converted, so drop this task from evaluate.tasks"
    )


def load_task(config: Config, entry: str, reference: ImageData) -> ImageData:
    """A task's whole dataset (not the pool of D_real) at the resolution and channel count of
    ``reference`` (D_real). The pre-training dataset uses ``config.data``'s root and download."""
    name, root = parse_task(entry)
    d = config.data
    if name == d.name and root is None:
        task = load_dataset(
            name, d.root, download=d.download, cache_dir=d.cache_dir, resolution=reference.image_size
        )
    else:
        task = load_dataset(name, root, cache_dir=d.cache_dir, resolution=reference.image_size)
    return match_channels(task, reference.channels, entry)


def labelled_subset(
    task: ImageData, fraction: float, class_balanced: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of ``fraction`` of the task's training split, drawn from ``seed``.

    At least num_classes images: uniformly without replacement, or class-balanced
    (:meth:`ImageData.subset`: equal shares, so at least one image per class).
    """
    k = min(task.num_train, max(task.num_classes, round(fraction * task.num_train)))
    if class_balanced:
        chosen = task.subset(k, seed)
        return chosen.train_images, chosen.train_labels
    idx = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(seed))[:k]
    return task.train_images[idx], task.train_labels[idx]


def probe(
    config: Config,
    student: nn.Module,
    tasks: dict[str, ImageData],
    seed: int,
    reference: ImageData,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Probe the frozen student on every task and fraction: [{"task", "label_fraction",
    "accuracy" (percent), "num_labels"}]."""
    v, results = config.evaluate, []
    for name, task in tasks.items():
        test_x = encode(student, task.test_images.to(device), v.batch_size, normalize=reference.normalize)
        for fraction in v.label_fractions:
            images, labels = labelled_subset(
                task, fraction, v.class_balanced, derive_seed(config.seed, "labels", name, fraction, seed)
            )
            train_x = encode(student, images.to(device), v.batch_size, normalize=reference.normalize)
            accuracy = linear_probe(
                train_x,
                labels,
                test_x,
                task.test_labels,
                num_classes=task.num_classes,
                l2=v.probe_l2,
                max_iter=v.probe_max_iter,
                device=device,
            )
            results.append(
                {
                    "task": name,
                    "label_fraction": fraction,
                    "accuracy": 100 * accuracy,
                    "num_labels": len(labels),
                }
            )
    return results
