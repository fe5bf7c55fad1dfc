"""Stage 6: pre-train a fresh student on each set, then linear-probe its frozen features
(docs/method.md, "Evaluation").

Pre-training sets (``evaluate.methods``):

- ``no_pretrain``: none, the student stays at its seeded initialisation;
- ``random`` / ``high_loss``: the real images chosen by the init stage with their teacher targets;
- ``full``: all of D_real with all targets;
- ``mkdt``: the distilled set (its images are already normalised) with its learned alpha_syn as
  learning rate (real sets use ``evaluate.lr``).

For every method and seed s < ``evaluate.seeds`` a student (``evaluate.model``, default
``experts.student``) is initialised from ``derive_seed(seed, "evaluate", method, s, "init")`` and
trained ONCE with the KD loop (:func:`mkdt.train.kd.train_student`, batch order from
``derive_seed(seed, "evaluate", method, s, "batches")``). Its penultimate features are then probed
on every task and label fraction: the labelled images are a fraction of the task's training split
drawn from ``derive_seed(seed, "labels", task, fraction, s)`` (the same for every method), the
accuracy is measured on the whole test split. Task images are resized to the pre-training
resolution, grayscale is repeated to RGB where the student takes 3 channels, and all images are
normalised with D_real's statistics (what the encoder was trained on).

Artifacts: ``evaluate/partial.json`` (every finished (method, seed) with its probe results, so an
interrupted stage resumes), ``OUT/results.json`` and ``OUT/results.md`` (:mod:`mkdt.report`).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt import report
from mkdt.config import Config, ModelConfig
from mkdt.config.schema import parse_task
from mkdt.data import ImageData, load_dataset
from mkdt.data.real import RealData
from mkdt.errors import ConfigError, TrainingDiverged
from mkdt.files import fingerprint
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator, progress, seeded
from mkdt.stages.context import StageContext
from mkdt.store import INIT_METHODS, RunDir, SyntheticSet
from mkdt.train.kd import KDRecipe, encode, train_student
from mkdt.train.probe import linear_probe

STAGE = "evaluate"


def student_model(config: Config) -> ModelConfig:
    """The network pre-trained for evaluation: ``evaluate.model``, or ``experts.student``."""
    return config.evaluate.model or config.experts.student


# ---------------------------------------------------------------- pre-training


def pretraining_sets(
    store: RunDir, config: Config, real: RealData, z: torch.Tensor
) -> dict[str, SyntheticSet | None]:
    """Each method's pre-training set (None for no_pretrain)."""
    methods, lr = config.evaluate.methods, config.evaluate.lr
    indices = store.load_indices(config.init.images) if set(methods) & set(INIT_METHODS) else {}
    sets: dict[str, SyntheticSet | None] = {}
    for method in methods:
        if method == "no_pretrain":
            sets[method] = None
        elif method == "mkdt":
            sets[method] = store.load_synthetic()
        elif method == "full":
            sets[method] = SyntheticSet(real.inputs, z, lr)
        else:
            idx = indices[method].to(real.device)
            sets[method] = SyntheticSet(real.inputs[idx], z[idx], lr)
    return sets


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
    with seeded(derive_seed(config.seed, STAGE, method, seed, "init")):
        student = build_network(student_model(config), data.channels, data.image_size, out_dim).to(device)
    if pset is None:
        return student, []
    v = config.evaluate
    recipe = KDRecipe(
        epochs=v.epochs, lr=pset.lr, momentum=v.momentum, weight_decay=v.weight_decay, batch_size=v.batch_size
    )
    gen = generator(derive_seed(config.seed, STAGE, method, seed, "batches"), device)
    trajectory = train_student(
        student,
        pset.images.to(device),
        pset.targets.to(device),
        recipe,
        [v.epochs],
        gen,
        desc=f"pre-train {method} (seed {seed})",
        runtime=runtime,
        lr_key="distill.lr_lr (mkdt pre-trains at its learned alpha_syn)"
        if method == "mkdt"
        else "evaluate.lr",
    )
    return student, trajectory.loss.tolist()


# ---------------------------------------------------------------- downstream tasks


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


# ---------------------------------------------------------------- stage


def table_header(config: Config, data: ImageData, sets: dict[str, SyntheticSet | None]) -> str:
    """The line above the results table: pre-training data, |D_syn|, seeds, learned lr."""
    parts = [
        f"Linear-probe test accuracy (%), mean ± std over {config.evaluate.seeds} seed(s); "
        f"{student_model(config).arch} students pre-trained on {config.data.name} "
        f"({data.num_train} images)"
    ]
    if set(sets) & {*INIT_METHODS, "mkdt"}:
        parts.append(f"|D_syn| = {config.init.images}")
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


def evaluate_one(
    ctx: StageContext,
    method: str,
    seed: int,
    pset: SyntheticSet | None,
    tasks: dict[str, ImageData],
    out_dim: int,
) -> dict[str, Any]:
    """Pre-train the (method, seed) student and probe it on every task: the run's entry in
    partial.json; a diverged pre-training is recorded as such, without probes."""
    t0, rt = ctx.seconds(), ctx.runtime
    try:
        student, kd_loss = pretrain(ctx.config, method, seed, pset, ctx.real.data, out_dim, rt)
        seconds = ctx.seconds() - t0
        probes = probe(ctx.config, student, tasks, seed, ctx.real.data, rt.device)
        diverged = False
    except TrainingDiverged as exc:  # no accuracy is computed from a diverged encoder
        print(f"evaluate: {exc}; {method} seed {seed} is marked diverged in the results", file=sys.stderr)
        seconds, kd_loss, probes, diverged = ctx.seconds() - t0, [], [], True
    return {
        "method": method,
        "seed": seed,
        "seconds": seconds,
        "kd_loss": kd_loss,
        "probes": probes,
        "diverged": diverged,
    }


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Pre-train and probe every (method, seed), resuming from partial.json; write
    ``out/results.json`` and ``out/results.md``."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    store = ctx.store
    if (done := ctx.finished(force, (store.partial_path,))) is not None:
        return done
    rt, data = ctx.runtime, ctx.real.data
    z = store.load_targets(ctx.real.num_train).to(rt.device)
    sets = pretraining_sets(store, config, ctx.real, z)
    tasks = {entry: load_task(config, entry, data) for entry in task_names(config)}
    fp, v = fingerprint(ctx.spec), config.evaluate
    # every rank starts from rank 0's reading: rank 0 rewrites the file after each round, so a
    # rank reading it later would see fewer runs to do and fall out of step
    runs = rt.gather_objects(store.load_partial(fp) if rt.is_main else None)[0] or {}
    todo = [(m, s) for m in v.methods for s in range(v.seeds) if f"{m}/{s}" not in runs]
    # under torch.distributed the ranks take turns: rank r runs todo[i + r] of each round
    rank, world = (rt.rank, rt.world) if rt.distributed else (0, 1)
    for i in progress(range(0, len(todo), world), desc="evaluate", unit="run" if world == 1 else "round"):
        mine = todo[i + rank] if i + rank < len(todo) else None
        done = evaluate_one(ctx, mine[0], mine[1], sets[mine[0]], tasks, z.shape[1]) if mine else None
        for run in rt.gather_objects(done):
            if run is not None:
                runs[f"{run['method']}/{run['seed']}"] = run
        if rt.is_main:
            store.save_partial(fp, runs)
    probes = [{"method": r["method"], "seed": r["seed"], **p} for r in runs.values() for p in r["probes"]]
    diverged_seeds: dict[str, list[int]] = {}
    for r in runs.values():
        if r.get("diverged"):
            diverged_seeds.setdefault(r["method"], []).append(r["seed"])
    records = report.build_records(probes, v.methods, list(tasks), v.label_fractions, diverged_seeds)
    table = report.results_table(records, table_header(config, data, sets))
    if rt.is_main:
        store.save_results(records, table)
        print(table, end="")
    return ctx.finish(
        {"results": records, "seconds_per_pretraining": pretraining_seconds(runs)},
        (store.path / "results.json", store.path / "results.md"),
    )
