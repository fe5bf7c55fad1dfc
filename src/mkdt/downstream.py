"""The evaluation's protocol, shared by the evaluate stage, the pipeline and the analyses: the
matched window and the evaluation's pre-training in SGD steps, the pre-training of a method's
student, downstream tasks, the probe and fine-tuning.

A task entry is a registered dataset name, optionally ``name=root``. Its images are resized to
D_real's resolution, grayscale is repeated to RGB where the encoder takes 3 channels, and all
images are normalised with D_real's statistics (what the encoder was trained on). For label
fraction f and probe seed s, the labelled images are a fraction f of the task's training split
drawn from ``derive_seed(seed, "labels", task, f, s)`` (the same for every method and every
analysis, and for both protocols), and the accuracy is measured on the whole test split.
Fine-tuning (:mod:`mkdt.train.finetune`) trains a copy of the encoder with a new head whose init
and batch order (with augmentation) come from ``derive_seed(seed, "finetune", task, f, s, "head")``
and ``(..., "batches")``: the same for every method too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mkdt.config import Config, ModelConfig
from mkdt.config.schema import parse_task
from mkdt.data import ImageData, load_dataset
from mkdt.data.registry import locate_dataset
from mkdt.errors import ConfigError, DataError, TrainingDiverged
from mkdt.methods import parse_method
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator, seeded
from mkdt.store import SyntheticSet
from mkdt.train.finetune import FinetuneRecipe, fine_tune, top1_accuracy
from mkdt.train.kd import KDRecipe, encode, train_student, train_students
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


def student_streams(config: Config, method: str, seed: int) -> tuple[int, int]:
    """The seeds of the (method, seed) student's initialisation and batch order.

    Under ``evaluate.selection=tuned`` they are ``derive_seed(seed, "evaluate", s, "init")`` and
    ``(..., "batches")``: common random numbers, the same for every method and step size, so the
    methods' differences at one seed are paired. Under ``fixed`` each method draws its own
    (``derive_seed(seed, "evaluate", method, s, ...)``), as before the tuned protocol existed."""
    key = () if config.evaluate.selection == "tuned" else (method,)
    return (
        derive_seed(config.seed, "evaluate", *key, seed, "init"),
        derive_seed(config.seed, "evaluate", *key, seed, "batches"),
    )


def candidate_lrs(config: Config, method: str, pset: SyntheticSet | None) -> list[float]:
    """The pre-training step sizes tried for a set, ascending: under ``fixed`` its own
    (``pset.lr``); under ``tuned`` ``evaluate.lr_grid``, plus the set's own step size when it
    pre-trains at a learned one (a distilled set, an lr-matched control, an imported set). [] without
    a set (no pre-training). A set's candidates depend on it alone, so its results do not change
    when other sets join the evaluation; the lr-matched controls ``<subset>@alpha`` try the same
    step sizes as MKDT."""
    if pset is None:
        return []
    if config.evaluate.selection == "fixed":
        return [pset.lr]
    own = {pset.lr} if parse_method(method).step_size in ("alpha", "own") else set()
    return sorted(set(config.evaluate.lr_grid) | own)


def pretrain(
    config: Config,
    method: str,
    seed: int,
    pset: SyntheticSet | None,
    data: ImageData,
    out_dim: int,
    runtime: Runtime,
    lr: float | None = None,
) -> tuple[nn.Module, list[float]]:
    """A fresh student for (method, seed) KD-trained on ``pset`` at step size ``lr`` (default: the
    set's own, ``pset.lr``), or left at its init when ``pset`` is None; seeds from
    :func:`student_streams`.

    Returns the student (on the device) and its mean KD loss per epoch ([] without training).
    """
    device = runtime.device
    init_seed, batch_seed = student_streams(config, method, seed)
    student = _fresh_student(config, data, out_dim, init_seed, device)
    if pset is None:
        return student, []
    step = pset.lr if lr is None else lr
    trajectory = train_student(
        student,
        pset.images.to(device),
        pset.targets.to(device),
        _pretrain_recipe(config, step),
        [config.evaluate.epochs],
        generator(batch_seed, device),
        desc=f"pre-train {method} (seed {seed}, lr {step:.4g})",
        runtime=runtime,
        lr_key=lr_key(config, method),
    )
    return student, trajectory.loss.tolist()


def pretrain_grid(
    config: Config,
    method: str,
    seed: int,
    pset: SyntheticSet,
    data: ImageData,
    out_dim: int,
    runtime: Runtime,
    lrs: Sequence[float],
    parallel: int,
) -> dict[float, tuple[nn.Module | None, list[float]]]:
    """:func:`pretrain` of (method, seed) on ``pset`` at each step size of ``lrs``: ``{lr: (student,
    mean KD loss per epoch)}`` in the order of ``lrs``, ``(None, [])`` for a step size whose
    pre-training diverged. Every student has the same initialisation and batch order
    (:func:`student_streams`); ``parallel`` of them train at once
    (:func:`~mkdt.train.kd.train_students` with ``lrs``, equal to one at a time within float
    tolerance; a diverged one does not stop the others), ``parallel=1`` one at a time through
    :func:`pretrain` (bit for bit as before)."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    out: dict[float, tuple[nn.Module | None, list[float]]] = {}
    if parallel == 1:
        for lr in lrs:
            try:
                out[lr] = pretrain(config, method, seed, pset, data, out_dim, runtime, lr)
            except TrainingDiverged:
                out[lr] = None, []
        return out
    device, v = runtime.device, config.evaluate
    init_seed, batch_seed = student_streams(config, method, seed)
    images, targets = pset.images.to(device), pset.targets.to(device)
    for i in range(0, len(lrs), parallel):
        group = list(lrs[i : i + parallel])
        students = [_fresh_student(config, data, out_dim, init_seed, device) for _ in group]
        trajectories = train_students(
            students,
            images,
            targets,
            _pretrain_recipe(config, group[0]),
            [v.epochs],
            [generator(batch_seed, device) for _ in group],
            desc=f"pre-train {method} (seed {seed}, lr {', '.join(f'{lr:.4g}' for lr in group)})",
            runtime=runtime,
            lr_key=lr_key(config, method),
            lrs=group,
            on_divergence="keep",
        )
        for lr, student, trajectory in zip(group, students, trajectories, strict=True):
            out[lr] = (None, []) if trajectory.diverged else (student, trajectory.loss.tolist())
    return out


def _fresh_student(
    config: Config, data: ImageData, out_dim: int, init_seed: int, device: torch.device
) -> nn.Module:
    """The evaluation's student (:func:`student_model`) initialised from ``init_seed``, on ``device``."""
    with seeded(init_seed):
        return build_network(student_model(config), data.channels, data.image_size, out_dim).to(device)


def _pretrain_recipe(config: Config, lr: float) -> KDRecipe:
    """``evaluate``'s KD recipe at step size ``lr``."""
    v = config.evaluate
    return KDRecipe(
        epochs=v.epochs, lr=lr, momentum=v.momentum, weight_decay=v.weight_decay, batch_size=v.batch_size
    )


def lr_key(config: Config, method: str) -> str:
    """The config key that sets ``method``'s pre-training step size (named when it diverges)."""
    if config.evaluate.selection == "tuned":
        return "evaluate.lr_grid (a diverged step size is left out of the choice)"
    if parse_method(method).distilled_step:
        return f"distill.lr_lr ({method} pre-trains at MKDT's learned alpha_syn)"
    return "evaluate.lr"


def task_names(config: Config) -> list[str]:
    """The task entries: ``evaluate.tasks``, or the pre-training dataset alone."""
    return config.evaluate.tasks or [config.data.name]


def available_tasks(config: Config) -> tuple[list[str], dict[str, str]]:
    """The task entries whose files are found, and ``{entry: one line saying where it was looked
    for and how to provide it}`` for the others, which ``evaluate.missing_tasks=skip`` skips; with
    ``error`` the first missing task raises DataError. Only looks for the files (nothing is
    decoded), so it runs before any compute; D_real's own dataset, loaded first, is not looked for."""
    present, skipped = [], {}
    for entry in task_names(config):
        name, root = parse_task(entry)
        try:
            if name != config.data.name or root is not None:
                locate_dataset(name, root)
        except DataError as exc:
            why = f"{str(exc).split('; ')[0]}; put it there or give it as {name}=ROOT in evaluate.tasks"
            if config.evaluate.missing_tasks == "error":
                skip = "evaluate.missing_tasks=skip evaluates the others"
                raise DataError(f"evaluate task {entry!r}: {why} ({skip})") from None
            skipped[entry] = f"evaluate: skipping task {entry!r}: {why}"
        else:
            present.append(entry)
    if not present:
        raise DataError(f"no task of evaluate.tasks was found ({', '.join(skipped)}): give them as name=ROOT")
    return present, skipped


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
    "accuracy" (percent), "num_labels", "protocol": "probe"}]."""
    v, results = config.evaluate, []
    for name, task in tasks.items():
        test_x = encode(student, task.test_images.to(device), v.batch_size, normalize=reference.normalize)
        for fraction in v.label_fractions:
            images, labels = task_labels(config, name, task, fraction, seed)
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
                    "protocol": "probe",
                }
            )
    return results


def task_labels(
    config: Config, name: str, task: ImageData, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images of task entry ``name`` at ``fraction`` for evaluation seed ``seed``,
    the same for every method and protocol (:func:`labelled_subset`)."""
    stream = derive_seed(config.seed, "labels", name, fraction, seed)
    return labelled_subset(task, fraction, config.evaluate.class_balanced, stream)


def validation_split(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) indices into ``labels``: of each class with n >= 2 labelled images,
    ``max(1, min(n - 1, round(fraction * n)))`` drawn from ``seed`` are held out; a class with one
    image stays in the fit part. Both index tensors are sorted."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for label in range(num_classes):
        members = (labels == label).nonzero().flatten()
        n = len(members)
        if n >= 2:
            k = max(1, min(n - 1, round(fraction * n)))
            held.append(members[torch.randperm(n, generator=gen)[:k]])
    out = torch.zeros(len(labels), dtype=torch.bool)
    if held:
        out[torch.cat(held)] = True
    return (~out).nonzero().flatten(), out.nonzero().flatten()


def task_validation_split(
    config: Config, name: str, task: ImageData, fraction: float, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (fit, held-out) split of :func:`task_labels` of ``name`` at ``fraction`` for evaluation
    seed ``seed``, drawn from ``derive_seed(seed, "validation", task, fraction, s)``: the same for
    every method and step size. DataError when nothing can be held out (every class has a single
    labelled image)."""
    if labels is None:  # the labels of task_labels, drawn here unless the caller has them
        _, labels = task_labels(config, name, task, fraction, seed)
    stream = derive_seed(config.seed, "validation", name, fraction, seed)
    fit, held = validation_split(labels, config.evaluate.validation_fraction, task.num_classes, stream)
    if len(held) == 0:
        raise DataError(
            f"task {name!r} at label fraction {fraction:g} has {len(labels)} labelled image(s), one per "
            "class at most, so none can be held out to choose the step size; raise "
            "evaluate.label_fractions or use evaluate.selection=fixed"
        )
    return fit, held


def check_validation_splits(config: Config, name: str, task: ImageData) -> None:
    """DataError (:func:`task_validation_split`) when some label fraction and seed of task
    ``name`` leave nothing to hold out; run before any compute under the tuned protocol."""
    for fraction in config.evaluate.label_fractions:
        for seed in range(config.evaluate.seeds):
            task_validation_split(config, name, task, fraction, seed)


def probe_accuracy(
    config: Config,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    device: torch.device,
) -> float:
    """Accuracy (percent) on ``test`` (features, labels) of the probe fitted on ``train``."""
    v = config.evaluate
    accuracy = linear_probe(
        *train, *test, num_classes=num_classes, l2=v.probe_l2, max_iter=v.probe_max_iter, device=device
    )
    return 100 * accuracy


def tuned_probe(
    config: Config,
    students: dict[float, nn.Module],
    tasks: dict[str, ImageData],
    seed: int,
    reference: ImageData,
    device: torch.device,
) -> list[dict[str, Any]]:
    """The tuned protocol's probes of one (method, seed), ``students`` by pre-training step size
    (ascending; diverged ones left out). For every task and fraction: probe each student on the fit
    part of the labelled images (:func:`task_validation_split`), keep the step size with the best
    held-out accuracy (the smallest on a tie), refit its probe on all the labelled images and
    measure the test accuracy once. Records as :func:`probe`'s plus ``lr`` (the chosen step
    size), ``lr_candidates``, ``val_accuracies`` (percent, in the candidates' order) and
    ``num_val``."""
    v, results = config.evaluate, []
    for name, task in tasks.items():
        test_x: dict[float, torch.Tensor] = {}
        for fraction in v.label_fractions:
            images, labels = task_labels(config, name, task, fraction, seed)
            fit, held = task_validation_split(config, name, task, fraction, seed, labels)
            features = {
                lr: encode(s, images.to(device), v.batch_size, normalize=reference.normalize)
                for lr, s in students.items()
            }
            val = {
                lr: probe_accuracy(
                    config, (x[fit], labels[fit]), (x[held], labels[held]), task.num_classes, device
                )
                for lr, x in features.items()
            }
            chosen = max(val, key=val.__getitem__)
            if chosen not in test_x:
                test_x[chosen] = encode(
                    students[chosen], task.test_images.to(device), v.batch_size, normalize=reference.normalize
                )
            accuracy = probe_accuracy(
                config,
                (features[chosen], labels),
                (test_x[chosen], task.test_labels),
                task.num_classes,
                device,
            )
            results.append(
                {
                    "task": name,
                    "label_fraction": fraction,
                    "accuracy": accuracy,
                    "num_labels": len(labels),
                    "protocol": "probe",
                    "lr": chosen,
                    "lr_candidates": list(val),
                    "val_accuracies": list(val.values()),
                    "num_val": len(held),
                }
            )
    return results


def finetune(
    config: Config,
    student_for: Callable[[str, float], nn.Module],
    tasks: dict[str, ImageData],
    seed: int,
    reference: ImageData,
    runtime: Runtime,
) -> list[dict[str, Any]]:
    """Fine-tune a copy of ``student_for(task, fraction)`` (left unchanged: the student of one
    pre-training, or the tuned protocol's choice for that task and fraction) with a new linear
    head on every task and fraction, on the probe's labelled images, by ``evaluate.finetune``'s
    recipe: [{"task", "label_fraction", "accuracy" (percent, on the test split), "num_labels",
    "protocol": "finetune"}]."""
    v, f, device, results = config.evaluate, config.evaluate.finetune, runtime.device, []
    recipe = FinetuneRecipe(
        steps=f.steps,
        lr=f.lr,
        momentum=f.momentum,
        weight_decay=f.weight_decay,
        batch_size=f.batch_size,
        augment=f.augment,
    )
    for name, task in tasks.items():
        test_x, test_y = task.test_images.to(device), task.test_labels.to(device)
        for fraction in v.label_fractions:
            images, labels = task_labels(config, name, task, fraction, seed)
            stream = (config.seed, "finetune", name, fraction, seed)
            model = fine_tune(
                student_for(name, fraction),
                images.to(device),
                labels.to(device),
                task.num_classes,
                reference.normalize,
                recipe,
                derive_seed(*stream, "head"),
                generator(derive_seed(*stream, "batches"), device),
                runtime,
                desc=f"fine-tune on {name}, {fraction:g} of the labels (seed {seed})",
            )
            results.append(
                {
                    "task": name,
                    "label_fraction": fraction,
                    "accuracy": 100 * top1_accuracy(model, test_x, test_y, v.batch_size, reference.normalize),
                    "num_labels": len(labels),
                    "protocol": "finetune",
                }
            )
    return results
