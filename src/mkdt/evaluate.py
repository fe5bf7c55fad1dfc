"""Stage 6: pre-train a fresh student on each set, then linear-probe its frozen features (METHOD.md §5).

Pre-training sets (``evaluate.methods``):

- ``no_pretrain``: none, the student stays at its seeded initialisation;
- ``random`` / ``high_loss``: the real images chosen by the init stage with their teacher targets;
- ``full``: all of D_real with all targets;
- ``mkdt``: the distilled set (its images are already normalised) with its learned alpha_syn as
  learning rate (real sets use ``evaluate.lr``).

For every method and seed s < ``evaluate.seeds`` a student (``evaluate.model``, default
``experts.student``) is initialised from ``derive_seed(seed, "evaluate", method, s, "init")`` and
trained ONCE with the experts' KD loop (:func:`mkdt.experts.train_expert`: MSE to the targets,
SGD with momentum and weight decay, no augmentation; batch order from
``derive_seed(seed, "evaluate", method, s, "batches")``). Its penultimate features are then probed
on every task and label fraction: the labelled images are a fraction of the task's training split
drawn from ``derive_seed(seed, "labels", task, fraction, s)`` (the same for every method), the
accuracy is measured on the whole test split. Task images are resized to the pre-training
resolution, grayscale is repeated to RGB where the student takes 3 channels, and all images are
normalised with D_real's statistics (what the encoder was trained on).

Artifacts: ``evaluate/partial.json`` (every finished (method, seed) with its probe results, so an
interrupted stage resumes; ignored if made with another config), ``OUT/results.json`` (records of
:mod:`mkdt.report`) and ``OUT/results.md`` (the paper-style table).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt import distill as distill_stage
from mkdt import init as init_stage
from mkdt import report
from mkdt import targets as targets_stage
from mkdt.artifacts import RunDir, derive_seed, fingerprint, read_json, write_json, write_text
from mkdt.config import Config, ExpertsConfig, ModelConfig
from mkdt.data import ImageData, load_dataset
from mkdt.distill import SyntheticSet
from mkdt.errors import ConfigError
from mkdt.experts import build_student, train_expert
from mkdt.probe import linear_probe
from mkdt.runtime import fast_path, generator, load_real, progress, resolve_device, seeded
from mkdt.teacher import encode

STAGE = "evaluate"
PARTIAL = "partial.json"
SUBSET_METHODS = ("random", "high_loss")


def student_model(config: Config) -> ModelConfig:
    """The network pre-trained for evaluation: ``evaluate.model``, or ``experts.student``."""
    return config.evaluate.model or config.experts.student


def defining(config: Config) -> dict[str, Any]:
    """The targets, the init and distill stages where a method reads them, and the evaluation
    recipe with the network actually used."""
    methods = set(config.evaluate.methods)
    recipe = dataclasses.asdict(config.evaluate) | {"model": dataclasses.asdict(student_model(config))}
    spec: dict[str, Any] = {"targets": targets_stage.defining(config), "evaluate": recipe}
    if methods & set(SUBSET_METHODS):
        spec["init"] = init_stage.defining(config)
    if "mkdt" in methods:
        spec["distill"] = distill_stage.defining(config)
    return spec


# ---------------------------------------------------------------- pre-training

def pretraining_sets(run: RunDir, config: Config, data: ImageData,
                     z: torch.Tensor) -> dict[str, SyntheticSet | None]:
    """Each method's pre-training set (None for no_pretrain), on the CPU.

    Raises ArtifactError naming the command to run when a method's prerequisite stage is missing.
    """
    methods, lr = config.evaluate.methods, config.evaluate.lr
    indices = init_stage.load_indices(run, config) if set(methods) & set(SUBSET_METHODS) else {}
    sets: dict[str, SyntheticSet | None] = {}
    for method in methods:
        if method == "no_pretrain":
            sets[method] = None
        elif method == "mkdt":
            sets[method] = distill_stage.load_synthetic(run, config)
        elif method == "full":
            sets[method] = SyntheticSet(data.normalize(data.train_images), z, lr)
        else:
            idx = indices[method]
            sets[method] = SyntheticSet(data.normalize(data.train_images[idx]), z[idx], lr)
    return sets


def pretrain(config: Config, method: str, seed: int, pset: SyntheticSet | None, data: ImageData,
             out_dim: int, device: torch.device) -> tuple[nn.Module, list[float]]:
    """A fresh student for (method, seed) KD-trained on ``pset`` (left at its init when None).

    Returns the student (on ``device``) and its mean KD loss per epoch ([] without training).
    """
    with seeded(derive_seed(config.seed, STAGE, method, seed, "init")):
        student = build_student(student_model(config), data, out_dim).to(device)
    if pset is None:
        return student, []
    v = config.evaluate
    recipe = ExpertsConfig(epochs=v.epochs, lr=pset.lr, momentum=v.momentum,
                           weight_decay=v.weight_decay, batch_size=v.batch_size)
    gen = generator(derive_seed(config.seed, STAGE, method, seed, "batches"), device)
    trajectory = train_expert(student, pset.images.to(device), pset.targets.to(device), recipe,
                              [v.epochs], gen, desc=f"pre-train {method} (seed {seed})",
                              fast=fast_path(config, device))
    return student, trajectory.loss.tolist()


# ---------------------------------------------------------------- downstream tasks

def parse_task(entry: str) -> tuple[str, str | None]:
    """``"name"`` -> (name, None); ``"name=root"`` -> (name, root)."""
    name, sep, root = (part.strip() for part in entry.partition("="))
    if not name or (sep and not root):
        raise ConfigError(f"invalid evaluate.tasks entry {entry!r}: expected a dataset name or "
                          "name=root (e.g. cifar100=/data/cifar100)")
    return name, root or None


def task_names(config: Config) -> list[str]:
    """The task entries: ``evaluate.tasks``, or the pre-training dataset alone."""
    return config.evaluate.tasks or [config.data.name]


def match_channels(task: ImageData, channels: int, entry: str) -> ImageData:
    """``task`` with ``channels`` channels: grayscale repeated to RGB; other mismatches raise
    ConfigError."""
    if task.channels == channels:
        return task
    if task.channels == 1 and channels == 3:
        return dataclasses.replace(task, train_images=task.train_images.repeat(1, 3, 1, 1),
                                   test_images=task.test_images.repeat(1, 3, 1, 1),
                                   mean=task.mean * 3, std=task.std * 3)
    raise ConfigError(f"task {entry!r} has {task.channels}-channel images but the encoder was "
                      f"pre-trained on {channels}-channel images; only grayscale -> RGB is "
                      "converted, so drop this task from evaluate.tasks")


def load_task(config: Config, entry: str, reference: ImageData) -> ImageData:
    """A task's whole dataset (not the pool of D_real) at the resolution and channel count of
    ``reference`` (D_real). The pre-training dataset uses ``config.data``'s root and download."""
    name, root = parse_task(entry)
    d = config.data
    if name == d.name and root is None:
        task = load_dataset(name, d.root, download=d.download, cache_dir=d.cache_dir,
                            resolution=reference.image_size)
    else:
        task = load_dataset(name, root, cache_dir=d.cache_dir, resolution=reference.image_size)
    return match_channels(task, reference.channels, entry)


def labelled_subset(task: ImageData, fraction: float, class_balanced: bool,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def probe(config: Config, student: nn.Module, tasks: dict[str, ImageData], seed: int,
          reference: ImageData, device: torch.device) -> list[dict[str, Any]]:
    """Probe the frozen student on every task and fraction: [{"task", "label_fraction",
    "accuracy" (percent), "num_labels"}]."""
    v, results = config.evaluate, []
    for name, task in tasks.items():
        test_x = encode(student, task.test_images, reference, v.batch_size, device)
        for fraction in v.label_fractions:
            images, labels = labelled_subset(task, fraction, v.class_balanced,
                                             derive_seed(config.seed, "labels", name, fraction, seed))
            train_x = encode(student, images, reference, v.batch_size, device)
            accuracy = linear_probe(train_x, labels, test_x, task.test_labels,
                                    num_classes=task.num_classes, l2=v.probe_l2,
                                    max_iter=v.probe_max_iter, device=device)
            results.append({"task": name, "label_fraction": fraction, "accuracy": 100 * accuracy,
                            "num_labels": len(labels)})
    return results


# ---------------------------------------------------------------- stage

def load_partial(path: Path, fp: str) -> dict[str, Any]:
    """Finished (method, seed) runs ``{"method/seed": run}`` of a partial.json with fingerprint ``fp``;
    {} if it is absent or made with another config."""
    if not path.is_file():
        return {}
    partial = read_json(path)
    return partial.get("runs", {}) if partial.get("fingerprint") == fp else {}


def table_header(config: Config, data: ImageData, sets: dict[str, SyntheticSet | None]) -> str:
    """The line above the results table: pre-training data, |D_syn|, seeds, learned lr."""
    parts = [f"Linear-probe test accuracy (%), mean ± std over {config.evaluate.seeds} seed(s); "
             f"{student_model(config).arch} students pre-trained on {config.data.name} "
             f"({data.num_train} images)"]
    if set(sets) & {*SUBSET_METHODS, "mkdt"}:
        parts.append(f"|D_syn| = {config.distill.images}")
    if (mkdt := sets.get("mkdt")) is not None:
        parts.append(f"MKDT learned lr {mkdt.lr:.4g}")
    return "; ".join(parts) + "."


def pretraining_seconds(runs: dict[str, Any]) -> dict[str, float]:
    """Mean seconds of one pre-training per method (no_pretrain, which trains nothing, left out)."""
    seconds: dict[str, list[float]] = {}
    for r in runs.values():
        if r["method"] != "no_pretrain":
            seconds.setdefault(r["method"], []).append(r["seconds"])
    return {method: statistics.fmean(values) for method, values in seconds.items()}


def run(config: Config, out: str | Path, *, force: bool = False,
        data: ImageData | None = None) -> dict[str, Any]:
    """Stage entry point: pre-train and probe every (method, seed), resuming from partial.json;
    write ``out/results.json`` and ``out/results.md``."""
    run_dir = RunDir(out)
    spec = defining(config)
    partial_path = run_dir.stage_dir(STAGE) / PARTIAL
    if (done := run_dir.finished_or_reset(STAGE, spec, force, (partial_path,))) is not None:
        return done
    device = resolve_device(config.device)
    data = data if data is not None else load_real(config)
    z = targets_stage.load_targets(run_dir, config, data.num_train)
    sets = pretraining_sets(run_dir, config, data, z)
    tasks = {entry: load_task(config, entry, data) for entry in task_names(config)}
    fp, v = fingerprint(spec), config.evaluate
    runs = load_partial(partial_path, fp)
    start = time.perf_counter()
    pairs = [(method, seed) for method in v.methods for seed in range(v.seeds)]
    for method, seed in progress(pairs, desc="evaluate", unit="run"):
        if f"{method}/{seed}" in runs:
            continue
        t0 = time.perf_counter()
        student, kd_loss = pretrain(config, method, seed, sets[method], data, z.shape[1], device)
        seconds = time.perf_counter() - t0
        runs[f"{method}/{seed}"] = {"method": method, "seed": seed, "seconds": seconds,
                                    "kd_loss": kd_loss,
                                    "probes": probe(config, student, tasks, seed, data, device)}
        write_json(partial_path, {"fingerprint": fp, "runs": runs})
    probes = [{"method": r["method"], "seed": r["seed"], **p} for r in runs.values() for p in r["probes"]]
    records = report.build_records(probes, v.methods, list(tasks), v.label_fractions)
    table = report.results_table(records, table_header(config, data, sets))
    write_json(run_dir.path / "results.json", records)
    write_text(run_dir.path / "results.md", table)
    print(table, end="")
    result = {"results": records, "seconds_per_pretraining": pretraining_seconds(runs)}
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)
