"""Stage 4: the initial synthetic images, as index lists into D_real.

- ``high_loss``: the ``init.images`` real images with the highest KD loss
  l(x) = (1/K) sum_k KDLoss_per_sample(f_{theta*_{k,1}}(x), Z_T[x]) under every expert's epoch-1
  weights (the MKDT init; also the "high-loss subset" baseline);
- ``random``: ``init.images`` real images drawn uniformly without replacement (the "random subset"
  baseline and the "MKDT (Rnd Sub)" ablation).

Both are stored in ``init/indices.safetensors`` with the per-image loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.files import fingerprint
from mkdt.graph import defining
from mkdt.nn.losses import KDLoss
from mkdt.nn.models import build_network, unflatten_params
from mkdt.runtime import Runtime, derive_seed, progress
from mkdt.stages.context import StageContext

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


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Rank D_real by the experts' epoch-1 KD loss and draw the random subset into ``out/init``."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    n, num_train = config.init.images, ctx.real.num_train
    if (done := ctx.finished(force)) is not None:
        return done
    store, device, data = ctx.store, ctx.runtime.device, ctx.real.data
    z = store.load_targets(num_train).to(device)
    student = build_network(config.experts.student, data.channels, data.image_size, z.shape[1]).to(device)
    fp = fingerprint(defining(config, "experts"))
    epoch1 = [store.load_expert(k, fp, [1]).at(1) for k in range(config.experts.num_experts)]
    loss = kd_loss_per_image(student.eval(), epoch1, ctx.real.inputs, z).cpu()
    high_loss = torch.topk(loss, n).indices
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "random-subset"))
    random = torch.randperm(num_train, generator=gen)[:n]
    store.save_indices({"high_loss": high_loss, "random": random}, loss)
    return ctx.finish(
        {
            "images": n,
            "mean_loss": loss.mean().item(),
            "mean_loss_high_loss_subset": loss[high_loss].mean().item(),
            "classes_in_high_loss_subset": torch.bincount(
                data.train_labels[high_loss], minlength=data.num_classes
            ).tolist(),
        },
        (store.indices_path,),
    )
