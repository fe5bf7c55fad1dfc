"""Stage 3: K expert trajectories of KD students (:func:`mkdt.train.kd.train_students`).

Expert k is a fresh ``experts.student`` (its init seeded by ``derive_seed(seed, "expert-init", k)``,
its batch order by ``derive_seed(seed, "expert-batches", k)``) trained on D_real against the
teacher targets; its flat parameter vector theta is kept after each epoch in the stored epochs
(:meth:`mkdt.config.Config.expert_save_epochs`; epoch 0 = the init) in
``experts/expert_KKKK.safetensors``.

Experts are independent files, so an interrupted stage resumes at the next missing expert, and
ranks of a torchrun job each train experts ``rank, rank + world, ...`` into the same folder; the
stage is recorded once all exist. ``experts.parallel`` experts are trained at once (0 = by device,
:data:`AUTO_PARALLEL`); the result equals one-at-a-time training within float tolerance, so it is a
runtime choice, not part of the experts' definition.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.files import fingerprint
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator, progress, seeded
from mkdt.stages.context import StageContext
from mkdt.train.kd import KDRecipe, train_students

STAGE = "experts"
# experts.parallel=0 by device type; elsewhere one at a time (batched measured 0.86x on a 2-core CPU)
AUTO_PARALLEL = {"cuda": 10}


def new_expert(config: Config, real: RealData, out_dim: int, k: int) -> tuple[nn.Module, torch.Generator]:
    """Expert k's fresh student and its batch-order generator, both seeded from ``k``."""
    data = real.data
    with seeded(derive_seed(config.seed, "expert-init", k)):
        student = build_network(config.experts.student, data.channels, data.image_size, out_dim)
    return student.to(real.device), generator(derive_seed(config.seed, "expert-batches", k), real.device)


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Train the missing experts of this rank; record the stage when all exist."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    store = ctx.store
    old = tuple(store.expert_paths())
    if (done := ctx.finished(force, old)) is not None:
        return done
    rt, e, fp = ctx.runtime, config.experts, fingerprint(ctx.spec)
    z = store.load_targets(ctx.real.num_train).to(rt.device)
    inputs = rt.images(ctx.real.inputs)  # laid out once, not per group
    save_epochs = config.expert_save_epochs()
    recipe = KDRecipe(
        epochs=e.epochs, lr=e.lr, momentum=e.momentum, weight_decay=e.weight_decay, batch_size=e.batch_size
    )
    parallel = e.parallel or AUTO_PARALLEL.get(rt.device.type, 1)
    todo = [k for k in range(rt.rank, e.num_experts, rt.world) if not store.has_expert(k, fp)]
    seconds = 0.0
    groups = [todo[i : i + parallel] for i in range(0, len(todo), parallel)]
    for group in progress(groups, desc="experts", unit="group"):
        t0 = ctx.seconds()
        students, gens = zip(*(new_expert(config, ctx.real, z.shape[1], k) for k in group), strict=True)
        desc = ("expert " if len(group) == 1 else "experts ") + ", ".join(map(str, group))
        trajectories = train_students(students, inputs, z, recipe, save_epochs, gens, desc, rt, "experts.lr")
        for k, traj in zip(group, trajectories, strict=True):
            store.save_expert(
                k, traj, fp, {"arch": dataclasses.asdict(e.student), "final_loss": traj.loss[-1].item()}
            )
        seconds += ctx.seconds() - t0
    rt.barrier()  # every rank's experts are written
    if not all(store.has_expert(k, fp) for k in range(e.num_experts)):
        return {}  # ranks without a process group: the last one to finish records the stage
    sizes = [store.expert_path(k).stat().st_size for k in range(e.num_experts)]
    final_loss = [store.expert_metadata(k)["final_loss"] for k in range(e.num_experts)]
    result = {
        "num_experts": e.num_experts,
        "save_epochs": save_epochs,
        "mb_per_expert": sum(sizes) / len(sizes) / 2**20,
        "mb_total": sum(sizes) / 2**20,
        "parallel": parallel,
        "seconds_per_epoch": seconds / len(todo) / e.epochs if todo else None,  # per expert
        "final_loss_mean": sum(final_loss) / len(final_loss),
    }
    if rt.is_main:
        print(
            f"experts: {e.num_experts} x {result['mb_per_expert']:.2f} MB on disk, final KD loss "
            f"{result['final_loss_mean']:.4g}"
            + (f", {result['seconds_per_epoch']:.2f} s/epoch per expert, {parallel} at once" if todo else "")
        )
    return ctx.finish(result, tuple(store.expert_path(k) for k in range(e.num_experts)))
