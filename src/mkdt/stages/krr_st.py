"""The krr_st stage: KRR-ST (Lee et al., ICLR 2024; docs/method.md §2.7), the paper's other
self-supervised dataset distillation, from the run's own teacher, targets and init subsets, so that
the evaluation compares it with MKDT on the same footing.

The synthetic set starts as the init subset ``krr_st.init`` (default ``random``, the release's
start) with its teacher targets; both are learned by :func:`mkdt.train.krr.krr_distill` for
``krr_st.iterations`` outer steps. The pool's students are ``experts.student`` networks with a head
to the teacher's D dimensions, member i's k-th initialisation made under
``derive_seed(seed, "krr_st", "student", i, k)``; the pool draws from
``derive_seed(seed, "krr_st", "pool")`` (CPU), real batches and their augmentation from
``derive_seed(seed, "krr_st", "batches")`` (the device). A real batch is, with ``krr_st.augment``,
a random crop of the zero-padded images and a horizontal flip (the release's training
augmentation, :func:`mkdt.train.finetune.pad_crop_flip`) with the teacher's features of those
images as targets, computed every step; without it, the normalised images and the targets stage's
rows.

Writes ``krr_st/synthetic.safetensors`` (the distilled set's format: ``images`` normalised like
D_real, ``targets``, ``lr`` = ``krr_st.online_lr``, the step size its students trained at; the
evaluation pre-trains it at ``evaluate.lr``, as the real subsets) and, every
``krr_st.checkpoint_every`` steps, the resumable ``krr_st/checkpoint.pt``. Under torchrun every rank
runs the whole loop with the same draws (one result) and rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mkdt.config import Config, KRRSTConfig
from mkdt.data.real import RealData
from mkdt.nn.loading import load_encoder
from mkdt.nn.models import build_network, features_of
from mkdt.runtime import Runtime, derive_seed, generator, seeded
from mkdt.stages.context import StageContext
from mkdt.store import SyntheticSet
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.finetune import crop_padding, pad_crop_flip
from mkdt.train.krr import KRRDistiller, KRRRecipe, RealBatch, StudentMaker, StudentPool, krr_distill

STAGE = "krr_st"


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Distill the KRR-ST set into ``out/krr_st``, resuming from its checkpoint; skip it when done."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    store = ctx.store
    if (done := ctx.finished(force, (store.krr_st_checkpoint_path,))) is not None:
        return done
    k, rt, data = config.krr_st, ctx.runtime, ctx.real.data
    z = store.load_targets(ctx.real.num_train).to(rt.device)
    start = store.load_indices(config.init.images, [k.init])[k.init].to(rt.device)
    recipe = krr_recipe(k)
    pool_gen = generator(derive_seed(config.seed, STAGE, "pool"), torch.device("cpu"))
    distiller = KRRDistiller(
        pool=StudentPool(student_maker(ctx, z.shape[1]), recipe, pool_gen),
        images=ctx.real.inputs[start],
        targets=z[start],
        mean=data.mean,
        std=data.std,
        num_real=ctx.real.num_train,
        real_batch=real_batches(ctx, z),
        gen=generator(derive_seed(config.seed, STAGE, "batches"), rt.device),
        runtime=rt,
    )
    checkpoint = PeriodicCheckpoint(
        store.krr_st_checkpoint_path, ctx.spec, k.checkpoint_every, STAGE, rt.is_main
    )
    distilled = krr_distill(distiller, checkpoint, log_every=k.log_every)
    final = SyntheticSet(distiller.images().detach().cpu(), distiller.targets.detach().cpu(), k.online_lr)
    if rt.is_main:
        store.save_krr_st(final, data.mean, data.std, k.iterations)
    losses = distilled.losses
    window = max(1, min(50, len(losses) // 5))
    result = {
        "iterations": k.iterations,
        "init": k.init,
        "augment": k.augment,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "seconds_per_iteration": distilled.seconds / max(1, distilled.iterations_run),
    }
    if rt.is_main:
        print(f"krr_st: loss {result['loss_first']:.4g} -> {result['loss_last']:.4g} (mean of {window} its)")
    return ctx.finish(result, (store.krr_st_set_path,))


def krr_recipe(k: KRRSTConfig) -> KRRRecipe:
    """The KRR-ST math of the ``krr_st`` section; its settings (``init``, ``augment``,
    ``checkpoint_every``, ``log_every``) are used apart."""
    return KRRRecipe(
        iterations=k.iterations,
        num_models=k.num_models,
        online_iterations=k.online_iterations,
        online_lr=k.online_lr,
        online_momentum=k.online_momentum,
        online_weight_decay=k.online_weight_decay,
        outer_lr=k.outer_lr,
        outer_batch_size=k.outer_batch_size,
        ridge=k.ridge,
    )


def student_maker(ctx: StageContext, out_dim: int) -> StudentMaker:
    """Member i's k-th student: an ``experts.student`` network with an ``out_dim`` head,
    initialised under ``derive_seed(seed, "krr_st", "student", i, k)``, on the device."""
    config, data, rt = ctx.config, ctx.real.data, ctx.runtime

    def make(i: int, k: int) -> torch.nn.Module:
        with seeded(derive_seed(config.seed, STAGE, "student", i, k)):
            student = build_network(config.experts.student, data.channels, data.image_size, out_dim)
        return rt.prepare(student.to(rt.device))

    return make


def real_batches(ctx: StageContext, z: torch.Tensor) -> RealBatch:
    """The real batches of ``krr_st.augment`` (module docstring): network inputs and targets of
    the drawn indices."""
    real, rt = ctx.real, ctx.runtime
    if not ctx.config.krr_st.augment:
        return lambda idx, gen: (real.inputs[idx], z[idx])
    data = real.data
    teacher = load_encoder(ctx.store.encoder_path, ctx.config.teacher.model, data.channels, data.image_size)
    encode = features_of(rt.prepare(teacher.to(rt.device).eval()))
    padding = crop_padding(data.image_size)

    def augmented(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = data.normalize(pad_crop_flip(real.images[idx], padding, gen))
        with torch.no_grad(), rt.autocast():
            return x, encode(rt.images(x)).float()

    return augmented
