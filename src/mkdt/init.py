"""Stage 4: the initial synthetic images, as index lists into D_real.

- ``high_loss``: the |D_syn| real images with the highest KD loss
  l(x) = (1/K) sum_k mean_d (f_{theta*_{k,1}}(x) - Z_T[x])_d^2 under every expert's epoch-1 weights
  (the MKDT init; also the "high-loss subset" baseline);
- ``random``: |D_syn| real images drawn uniformly without replacement (the "random subset"
  baseline and the "MKDT (Rnd Sub)" ablation).

Both are stored in ``init/indices.safetensors`` (int64 tensors ``high_loss``, ``random``, and the
float32 per-image loss ``loss`` of shape (N,)).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkdt import experts as experts_stage
from mkdt import targets as targets_stage
from mkdt.artifacts import RunDir, derive_seed, load_tensors, save_tensors
from mkdt.config import Config
from mkdt.data import ImageData
from mkdt.errors import ArtifactError, ConfigError
from mkdt.models import unflatten_params
from mkdt.runtime import load_real, progress, resolve_device

STAGE = "init"
FILE = "indices.safetensors"


def defining(config: Config) -> dict[str, Any]:
    return {"experts": experts_stage.defining(config), "images": config.distill.images}


@torch.no_grad()
def kd_loss_per_image(student: nn.Module, params: list[torch.Tensor], inputs: torch.Tensor,
                      targets: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """(N,) KD loss of every image, averaged over the parameter vectors ``params``."""
    total = torch.zeros(len(inputs), device=inputs.device)
    for theta in progress(params, desc="init: KD loss per expert", leave=False):
        weights = unflatten_params(student, theta.to(inputs.device))
        for i in range(0, len(inputs), batch_size):
            out = torch.func.functional_call(student, weights, (inputs[i:i + batch_size],))
            total[i:i + batch_size] += (out - targets[i:i + batch_size]).pow(2).mean(dim=1)
    return total / len(params)


def run(config: Config, out: str | Path, *, force: bool = False,
        data: ImageData | None = None) -> dict[str, Any]:
    """Stage entry point: rank D_real by the experts' epoch-1 KD loss; draw the random subset."""
    run_dir = RunDir(out)
    spec = defining(config)
    data = data if data is not None else load_real(config)
    n = config.distill.images
    if n > data.num_train:
        raise ConfigError(f"distill.images ({n}) is larger than D_real ({data.num_train} images)")
    if (done := run_dir.finished_or_reset(STAGE, spec, force)) is not None:
        return done
    run_dir.require(experts_stage.STAGE, experts_stage.defining(config), "mkdt experts")
    device = resolve_device(config.device)
    start = time.perf_counter()
    z = targets_stage.load_targets(run_dir, config, data.num_train).to(device)
    inputs = data.normalize(data.train_images.to(device))
    student = experts_stage.build_student(config.experts.student, data, z.shape[1]).to(device)
    epoch1 = [experts_stage.load_expert(run_dir, config, k).at(1)
              for k in range(config.experts.num_experts)]
    loss = kd_loss_per_image(student.eval(), epoch1, inputs, z).cpu()
    high_loss = torch.topk(loss, n).indices
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "random-subset"))
    random = torch.randperm(data.num_train, generator=gen)[:n]
    save_tensors(run_dir.stage_dir(STAGE) / FILE,
                 {"high_loss": high_loss, "random": random, "loss": loss}, {"images": n})
    result = {"images": n, "mean_loss": loss.mean().item(),
              "mean_loss_high_loss_subset": loss[high_loss].mean().item(),
              "classes_in_high_loss_subset": torch.bincount(
                  data.train_labels[high_loss], minlength=data.num_classes).tolist()}
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)


def load_indices(run: RunDir, config: Config) -> dict[str, torch.Tensor]:
    """{"high_loss": (n,), "random": (n,), "loss": (N,)} of a finished init stage."""
    run.require(STAGE, defining(config), "mkdt init")
    tensors, _ = load_tensors(run.stage_dir(STAGE) / FILE)
    if len(tensors["high_loss"]) != config.distill.images:
        raise ArtifactError(f"{run.stage_dir(STAGE) / FILE} does not hold {config.distill.images} "
                            "indices; redo init with --force")
    return tensors
