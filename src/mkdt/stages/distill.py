"""Stage 5: trajectory matching of KD expert trajectories (docs/method.md, "Distillation").

D_syn starts as the init subset ``distill.init`` (normalised pixels, learned), Z_syn = their teacher
targets (fixed unless ``distill.learn_targets``), alpha_syn = ``distill.lr_init`` (learned); the
iterations are :func:`mkdt.train.matching.distill`. Writes ``distill/synthetic.safetensors`` (the
set, with ``mean``/``std`` to map images back to pixels), ``distill/grid.png`` and, every
``checkpoint_every`` iterations, the resumable ``distill/checkpoint.pt``.
"""

from __future__ import annotations

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
from mkdt.train.matching import Distiller, distill, resolve_backend

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
    if (done := ctx.finished(force, (store.distill_checkpoint_path,))) is not None:
        return done
    r, rt, data = config.distill, ctx.runtime, ctx.real.data
    indices = store.load_indices(config.init.images)[r.init].to(rt.device)
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
    )
    checkpoint = PeriodicCheckpoint(
        store.distill_checkpoint_path, ctx.spec, r.checkpoint_every, STAGE, rt.is_main
    )
    matched = distill(distiller, checkpoint)
    final = SyntheticSet(
        distiller.images.detach().cpu(), distiller.targets.detach().cpu(), distiller.lr.item()
    )
    if rt.is_main:
        store.save_synthetic(final, data.mean, data.std, r.iterations)
        store.save_grid(final.images, data.mean, data.std)
    history = matched.history
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
    return ctx.finish(result, (store.synthetic_path, store.stage_dir(STAGE) / "grid.png"))
