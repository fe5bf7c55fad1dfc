"""Stage 5: trajectory matching of KD expert trajectories (docs/method.md, "Distillation").

D_syn starts as the init subset ``distill.init`` (normalised pixels, learned), Z_syn = their teacher
targets (fixed unless ``distill.learn_targets``), alpha_syn = ``distill.lr_init`` (learned); the
iterations are :func:`mkdt.train.matching.distill`. Writes ``distill/synthetic.safetensors`` (the
set, with ``mean``/``std`` to map images back to pixels), ``distill/grid.png``, a copy of the set
after each iteration of ``distill.snapshots`` (``distill/snapshot_<it>.safetensors``, same format)
and, every ``checkpoint_every`` iterations, the resumable ``distill/checkpoint.pt`` and the rows of
``distill/history.csv`` (per iteration: loss, alpha_syn, pixel change, the segments drawn).

Each init subset of ``distill.variants`` (e.g. ``random``, the paper's "MKDT (Rnd Sub)") is then
distilled the same way into ``distill/variants/<subset>/`` (the same files): the same settings and
the same seed stream ``derive_seed(seed, "distill")`` (the same segments and batch orders), so a
variant is the set a run with ``distill.init=<subset>`` makes, and differs from the main set by its
initial images alone. Variants are not part of the stage's definition: the record lists those made
(``result.variants``, their files under ``artifacts``), and a finished stage given a new variant
distills that one alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.config import Config, DistillConfig
from mkdt.data.real import RealData
from mkdt.files import fingerprint
from mkdt.graph import defining
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator
from mkdt.stages.context import StageContext, check_disk, distilled_set_bytes
from mkdt.store import RunDir, SyntheticSet
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.kd import Trajectory
from mkdt.train.matching import Distiller, History, MatchingRecipe, distill, resolve_backend

STAGE = "distill"


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Distill into ``out/distill`` and each of ``distill.variants`` into
    ``out/distill/variants/<subset>``, resuming from their checkpoints; skip what is done."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    if (done := ctx.finished(force, scratch_files(ctx.store))) is not None:
        return add_variants(ctx, done)
    inputs = MatchingInputs.load(ctx)
    result, artifacts = distill_set(ctx, inputs, ctx.store)
    variants = {}
    for init in config.distill.variants:
        variants[init], made = distill_set(ctx, inputs, ctx.store.variant(init))
        artifacts += made
    return ctx.finish({**result, "variants": variants} if variants else result, artifacts)


def add_variants(ctx: StageContext, done: dict[str, Any]) -> dict[str, Any]:
    """The record of a finished stage, after distilling the variants of ``distill.variants`` it
    does not list (the main set and the variants it lists are left as they are)."""
    made = done["result"].get("variants", {})
    missing = [init for init in ctx.config.distill.variants if init not in made]
    if not missing:
        return done
    store = ctx.store
    check_disk(store, len(missing) * distilled_set_bytes(ctx.config, ctx.real.data), "distill.variants")
    if ctx.runtime.is_main:
        print(f"distill: the main set is done; adding distill.variants {', '.join(missing)}")
    inputs = MatchingInputs.load(ctx)
    variants, artifacts = dict(made), tuple(map(store.artifact_path, done["artifacts"]))
    for init in missing:
        variants[init], files = distill_set(ctx, inputs, store.variant(init))
        artifacts += files
    ctx.continue_from(done)  # the record's times: the earlier work and this addition
    return ctx.finish({**done["result"], "variants": variants}, artifacts)


def scratch_files(store: RunDir) -> tuple[Path, ...]:
    """What ``--force`` removes: the checkpoint and snapshots of the main set and of every variant
    on disk, listed or not (their sets are rewritten or, no longer recorded, never read)."""
    views = [store, *(store.variant(init) for init in store.variants_on_disk())]
    return tuple(path for v in views for path in (v.distill_checkpoint_path, *v.snapshot_paths()))


def matching_recipe(d: DistillConfig) -> MatchingRecipe:
    """The matching math of the ``distill`` section; its settings (``backend``, ``log_every``,
    ``checkpoint_every``, ``snapshots``, ``variants``) are passed apart."""
    return MatchingRecipe(
        iterations=d.iterations,
        syn_steps=d.syn_steps,
        expert_epochs=d.expert_epochs,
        max_start_epoch=d.max_start_epoch,
        batch_syn=d.batch_syn,
        lr_img=d.lr_img,
        lr_lr=d.lr_lr,
        lr_init=d.lr_init,
        momentum=d.momentum,
        learn_targets=d.learn_targets,
        lr_targets=d.lr_targets,
        trajectories=d.trajectories,
    )


@dataclass
class MatchingInputs:
    """What every set of the stage is matched with: the teacher targets of D_real, the experts'
    trajectories, the student network, the recipe and the resolved backend."""

    z: torch.Tensor
    trajectories: list[Trajectory]
    student: nn.Module
    recipe: MatchingRecipe
    backend: str

    @classmethod
    def load(cls, ctx: StageContext) -> MatchingInputs:
        """Read the targets and experts of the run (the targets on the device)."""
        config, rt, data = ctx.config, ctx.runtime, ctx.real.data
        z = ctx.store.load_targets(ctx.real.num_train).to(rt.device)
        fp, needed = fingerprint(defining(config, "experts")), config.required_expert_epochs()
        trajectories = [ctx.store.load_expert(k, fp, needed) for k in range(config.experts.num_experts)]
        student = build_network(config.experts.student, data.channels, data.image_size, z.shape[1])
        student = student.to(rt.device)
        recipe, shape = matching_recipe(config.distill), ctx.real.inputs.shape[1:]
        backend = resolve_backend(
            config.distill.backend, recipe, student, shape, rt.device, config.init.images
        )
        return cls(z, trajectories, student, recipe, backend)


def distill_set(
    ctx: StageContext, inputs: MatchingInputs, files: RunDir
) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """Distill the set that starts from the init subset ``files.variant_init`` (``distill.init``
    for the run's own ``files``) into ``files``' distill folder, resuming from its checkpoint, which
    holds the stage's definition with that subset as ``distill.init``; returns (the set's part of
    the record, its artifacts)."""
    config, r, rt, data = ctx.config, ctx.config.distill, ctx.runtime, ctx.real.data
    init = files.variant_init or r.init
    indices = ctx.store.load_indices(config.init.images, [init])[init].to(rt.device)
    distiller = Distiller(
        student=inputs.student,
        images=rt.images(ctx.real.inputs[indices]),
        targets=inputs.z[indices],
        trajectories=inputs.trajectories,
        recipe=inputs.recipe,
        gen=generator(derive_seed(config.seed, "distill"), rt.device),
        backend=inputs.backend,
        runtime=rt,
        pixel_std=data.std,
    )
    spec = {**ctx.spec, "distill": {**ctx.spec["distill"], "init": init}}
    checkpoint = PeriodicCheckpoint(
        files.distill_checkpoint_path, spec, r.checkpoint_every, STAGE, rt.is_main
    )

    def write_history(history: History, since: int) -> None:
        if rt.is_main:
            files.write_history(history, since)

    def snapshot(done: int) -> None:
        if rt.is_main and done in r.snapshots:
            files.save_synthetic(current(distiller), data.mean, data.std, done, files.snapshot_path(done))

    matched = distill(
        distiller, checkpoint, log_every=r.log_every, on_history=write_history, on_iteration=snapshot
    )
    final = current(distiller)
    if rt.is_main:
        files.save_synthetic(final, data.mean, data.std, r.iterations)
        files.save_grid(final.images, data.mean, data.std)
    snapshots = existing_snapshots(ctx, files) if rt.is_main else []
    history = matched.history.loss
    window = max(1, min(50, len(history) // 5))
    result = {
        "learned_lr": final.lr,
        "iterations": r.iterations,
        "backend": inputs.backend,
        "loss_first": sum(history[:window]) / window,
        "loss_last": sum(history[-window:]) / window,
        "seconds_per_iteration": matched.seconds / max(1, matched.iterations_run),
        "seconds_first_iteration": matched.seconds_first_iteration,
    }
    if rt.is_main:
        name = "distill" if files.variant_init is None else f"distill ({init} init, distill.variants)"
        print(
            f"{name}: loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} "
            f"(mean of {window} its), learned lr {final.lr:.4f}"
        )
    return result, (files.synthetic_path, files.grid_path, files.history_path, *snapshots)


def current(distiller: Distiller) -> SyntheticSet:
    """The distiller's synthetic set as it is now, on the CPU."""
    return SyntheticSet(
        distiller.images.detach().cpu(), distiller.targets.detach().cpu(), distiller.lr.item()
    )


def existing_snapshots(ctx: StageContext, files: RunDir) -> list[Path]:
    """The snapshot files of ``distill.snapshots`` in ``files``' distill folder; a warning names
    those a run resumed past before the setting was given could not write (``--force`` writes
    them)."""
    wanted = {it: files.snapshot_path(it) for it in ctx.config.distill.snapshots}
    missing = [it for it, path in wanted.items() if not path.is_file()]
    if missing:
        print(
            f"mkdt: warning: no snapshot of iteration(s) {missing}: the distillation resumed past "
            "them; rerun `mkdt distill --force` to write them",
            file=sys.stderr,
        )
    return [path for path in wanted.values() if path.is_file()]
