"""Stage 5: trajectory matching of KD expert trajectories (docs/method.md, "Distillation").

D_syn starts as the init subset ``distill.init`` (normalised pixels, learned), Z_syn = their teacher
targets (fixed unless ``distill.learn_targets``), alpha_syn = ``distill.lr_init`` (learned); the
iterations are :func:`mkdt.train.matching.distill`. Writes ``distill/synthetic.safetensors`` (the
set, with ``mean``/``std`` to map images back to pixels), ``distill/grid.png``, a copy of the set
after each iteration of ``distill.snapshots`` (``distill/snapshot_<it>.safetensors``, same format)
and, every ``checkpoint_every`` iterations, the resumable ``distill/checkpoint.pt`` and the rows of
``distill/history.csv`` (per iteration: loss, alpha_syn, pixel change, the segments drawn).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.files import fingerprint
from mkdt.graph import defining
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator
from mkdt.stages.context import StageContext
from mkdt.store import SyntheticSet
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.matching import Distiller, History, distill, resolve_backend

STAGE = "distill"


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Distill into ``out/distill``, resuming from its checkpoint; skip if done."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    store = ctx.store
    scratch = (store.distill_checkpoint_path, *store.snapshot_paths())
    if (done := ctx.finished(force, scratch)) is not None:
        return done
    r, rt, data = config.distill, ctx.runtime, ctx.real.data
    indices = store.load_indices(config.init.images, [r.init])[r.init].to(rt.device)
    z = store.load_targets(ctx.real.num_train).to(rt.device)
    images = rt.images(ctx.real.inputs[indices])
    fp, needed = fingerprint(defining(config, "experts")), config.required_expert_epochs()
    trajectories = [store.load_expert(k, fp, needed) for k in range(config.experts.num_experts)]
    student = build_network(config.experts.student, data.channels, data.image_size, z.shape[1]).to(rt.device)
    backend = resolve_backend(r, student, images.shape[1:], rt.device, len(images))
    distiller = Distiller(
        student,
        images,
        z[indices],
        trajectories,
        r,
        generator(derive_seed(config.seed, "distill"), rt.device),
        backend,
        rt,
        data.std,
    )
    checkpoint = PeriodicCheckpoint(
        store.distill_checkpoint_path, ctx.spec, r.checkpoint_every, STAGE, rt.is_main
    )

    def write_history(history: History, since: int) -> None:
        if rt.is_main:
            store.write_history(history, since)

    def snapshot(done: int) -> None:
        if rt.is_main and done in r.snapshots:
            store.save_synthetic(current(distiller), data.mean, data.std, done, store.snapshot_path(done))

    matched = distill(distiller, checkpoint, write_history, snapshot)
    final = current(distiller)
    if rt.is_main:
        store.save_synthetic(final, data.mean, data.std, r.iterations)
        store.save_grid(final.images, data.mean, data.std)
    snapshots = existing_snapshots(ctx) if rt.is_main else []
    history = matched.history.loss
    window = max(1, min(50, len(history) // 5))
    result = {
        "learned_lr": final.lr,
        "iterations": r.iterations,
        "backend": backend,
        "loss_first": sum(history[:window]) / window,
        "loss_last": sum(history[-window:]) / window,
        "seconds_per_iteration": matched.seconds / max(1, matched.iterations_run),
        "seconds_first_iteration": matched.seconds_first_iteration,
    }
    if rt.is_main:
        print(
            f"distill: loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} "
            f"(mean of {window} its), learned lr {final.lr:.4f}"
        )
    artifacts = (store.synthetic_path, store.grid_path, store.history_path, *snapshots)
    return ctx.finish(result, artifacts)


def current(distiller: Distiller) -> SyntheticSet:
    """The distiller's synthetic set as it is now, on the CPU."""
    return SyntheticSet(
        distiller.images.detach().cpu(), distiller.targets.detach().cpu(), distiller.lr.item()
    )


def existing_snapshots(ctx: StageContext) -> list[Path]:
    """The snapshot files of ``distill.snapshots``; a warning names those a run resumed past before
    the setting was given could not write (``--force`` writes them)."""
    wanted = {it: ctx.store.snapshot_path(it) for it in ctx.config.distill.snapshots}
    missing = [it for it, path in wanted.items() if not path.is_file()]
    if missing:
        print(
            f"mkdt: warning: no snapshot of iteration(s) {missing}: the distillation resumed past "
            "them; rerun `mkdt distill --force` to write them",
            file=sys.stderr,
        )
    return [path for path in wanted.values() if path.is_file()]
