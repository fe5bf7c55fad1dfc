"""Stage 4: the initial synthetic images, as index lists into D_real.

- ``high_loss``: the ``init.images`` real images with the highest KD loss
  l(x) = (1/K) sum_k KDLoss_per_sample(f_{theta*_{k,1}}(x), Z_T[x]) under every expert's epoch-1
  weights (the MKDT init; also the "high-loss subset" baseline);
- ``random``: ``init.images`` real images drawn uniformly without replacement (the "random subset"
  baseline and the "MKDT (Rnd Sub)" ablation);
- ``sas``: the SAS subset (the paper's "SAS subset" baseline, :mod:`mkdt.train.sas`): latent classes
  by k-means on the teacher's targets Z_T (k = ``init.sas_clusters``, default the dataset's number
  of classes), class budgets proportional to the cluster sizes, and in each class the greedy
  choice of the examples whose ``init.sas_views`` augmented views (the SSL augmentation) are most
  similar to the other examples of the class under the proxy ``init.sas_proxy``: expert 0 at its
  last saved epoch (default; SAS trains a small proxy briefly with contrastive learning, a KD
  student of the teacher is mkdt's cheap stand-in) or the teacher. Seeds: k-means from
  ``derive_seed(seed, "sas-kmeans")``, views from ``derive_seed(seed, "sas-views")``.

All three are stored in ``init/indices.safetensors`` with the per-image loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.files import fingerprint
from mkdt.graph import defining
from mkdt.nn.augment import SSLAugment
from mkdt.nn.loading import load_encoder
from mkdt.nn.losses import KDLoss
from mkdt.nn.models import build_network, features_of, unflatten_params
from mkdt.runtime import Runtime, derive_seed, progress
from mkdt.stages.context import StageContext
from mkdt.train.sas import encode_views, latent_classes, sas_select

STAGE = "init"


@torch.no_grad()
def kd_loss_per_image(
    student: nn.Module,
    params: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(N,) KD loss of every image, averaged over the parameter vectors ``params``."""
    per_sample = KDLoss("per_sample")
    total = torch.zeros(len(inputs), device=inputs.device)
    for theta in progress(params, desc="init: KD loss per expert", leave=False):
        weights = unflatten_params(student, theta.to(inputs.device))
        for i in range(0, len(inputs), batch_size):
            out = torch.func.functional_call(student, weights, (inputs[i : i + batch_size],))
            total[i : i + batch_size] += per_sample(out, targets[i : i + batch_size])
    return total / len(params)


def sas_proxy(ctx: StageContext, out_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SAS proxy encoder of ``init.sas_proxy`` on the device: expert 0's network at its last
    saved epoch (its regression of the teacher's embedding), or the teacher's features."""
    config, data, device = ctx.config, ctx.real.data, ctx.runtime.device
    if config.init.sas_proxy == "teacher":
        spec = config.teacher.model
        teacher = load_encoder(ctx.store.encoder_path, spec, data.channels, data.image_size)
        return features_of(teacher.to(device).eval())
    student = build_network(config.experts.student, data.channels, data.image_size, out_dim).to(device)
    epoch = max(config.expert_save_epochs())
    fp = fingerprint(defining(config, "experts"))
    weights = unflatten_params(student.eval(), ctx.store.load_expert(0, fp, [epoch]).at(epoch).to(device))
    return lambda x: torch.func.functional_call(student, weights, (x,))


def sas_subset(ctx: StageContext, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (init.images,), latent class of every image (N,)) of the SAS subset."""
    config, data = ctx.config, ctx.real.data
    k = config.init.sas_clusters or min(max(data.num_classes, 1), data.num_train)
    clusters = latent_classes(z, k, derive_seed(config.seed, "sas-kmeans"))
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "sas-views"))
    augment = SSLAugment(data.image_size, data.mean, data.std)
    proxy = sas_proxy(ctx, z.shape[1])
    embeddings = encode_views(proxy, ctx.real.images, augment, config.init.sas_views, gen)
    return sas_select(clusters, embeddings, config.init.images), clusters


def sas_summary(ctx: StageContext, sas: torch.Tensor, clusters: torch.Tensor) -> dict[str, Any]:
    """The SAS part of the stage's record: D_real's classes in the subset, the cluster sizes."""
    labels, classes = ctx.real.data.train_labels, ctx.real.data.num_classes
    return {
        "classes_in_sas_subset": torch.bincount(labels[sas], minlength=classes).tolist(),
        "sas_cluster_sizes": torch.bincount(clusters).tolist(),
    }


def add_sas(ctx: StageContext, done: dict[str, Any]) -> dict[str, Any]:
    """An init finished before the SAS subset existed, with the subset added: its file rewritten
    with the other subsets and the loss unchanged (so distillation made from them stays valid),
    and its record redone."""
    store, n = ctx.store, ctx.config.init.images
    z = store.load_targets(ctx.real.num_train).to(ctx.runtime.device)
    sas, clusters = sas_subset(ctx, z)
    tensors = store.load_indices(n)
    store.save_indices(
        {"high_loss": tensors["high_loss"], "random": tensors["random"], "sas": sas}, tensors["loss"]
    )
    return ctx.finish({**done["result"], **sas_summary(ctx, sas, clusters)}, (store.indices_path,))


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Rank D_real by the experts' epoch-1 KD loss, draw the random subset and select the SAS subset
    into ``out/init``."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    n, num_train = config.init.images, ctx.real.num_train
    if (done := ctx.finished(force)) is not None:
        return done if "sas" in ctx.store.load_indices(n) else add_sas(ctx, done)
    store, device, data = ctx.store, ctx.runtime.device, ctx.real.data
    z = store.load_targets(num_train).to(device)
    student = build_network(config.experts.student, data.channels, data.image_size, z.shape[1]).to(device)
    fp = fingerprint(defining(config, "experts"))
    epoch1 = [store.load_expert(k, fp, [1]).at(1) for k in range(config.experts.num_experts)]
    loss = kd_loss_per_image(student.eval(), epoch1, ctx.real.inputs, z).cpu()
    high_loss = torch.topk(loss, n).indices
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "random-subset"))
    random = torch.randperm(num_train, generator=gen)[:n]
    t0 = ctx.seconds()
    sas, clusters = sas_subset(ctx, z)
    store.save_indices({"high_loss": high_loss, "random": random, "sas": sas}, loss)
    return ctx.finish(
        {
            "images": n,
            "mean_loss": loss.mean().item(),
            "mean_loss_high_loss_subset": loss[high_loss].mean().item(),
            "classes_in_high_loss_subset": torch.bincount(
                data.train_labels[high_loss], minlength=data.num_classes
            ).tolist(),
            **sas_summary(ctx, sas, clusters),
            "sas_seconds": ctx.seconds() - t0,
        },
        (store.indices_path,),
    )
