"""Stage 2: teacher targets Z_T = f_T(x) for every x in D_real.

The 512-d (8 x teacher width) pre-projection features, computed once in eval mode with the
teacher's normalisation, in batches, and stored as ``targets/targets.safetensors`` (tensor
``targets`` of shape (N, D), float32, rows in D_real order).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mkdt import teacher
from mkdt.artifacts import RunDir, load_tensors, save_tensors
from mkdt.config import Config
from mkdt.data import ImageData
from mkdt.errors import ArtifactError
from mkdt.runtime import load_real, resolve_device

STAGE = "targets"
FILE = "targets.safetensors"


def defining(config: Config) -> dict[str, Any]:
    """Targets depend only on the teacher (and its data); the batch size does not change them."""
    return {"teacher": teacher.defining(config)}


def load_targets(run: RunDir, config: Config, num_images: int) -> torch.Tensor:
    """The stored targets, checked against the config and the size of D_real."""
    run.require(STAGE, defining(config), "mkdt targets")
    tensors, _ = load_tensors(run.stage_dir(STAGE) / FILE)
    targets = tensors["targets"]
    if len(targets) != num_images:
        raise ArtifactError(f"{run.stage_dir(STAGE) / FILE} has {len(targets)} rows but D_real has "
                            f"{num_images} images; redo the stage with --force")
    return targets


def run(config: Config, out: str | Path, *, force: bool = False,
        data: ImageData | None = None) -> dict[str, Any]:
    """Stage entry point: encode D_real with the run's teacher into ``out/targets``."""
    run_dir = RunDir(out)
    spec = defining(config)
    if (done := run_dir.finished_or_reset(STAGE, spec, force)) is not None:
        return done
    run_dir.require(teacher.STAGE, teacher.defining(config), "mkdt teacher")
    device = resolve_device(config.device)
    data = data if data is not None else load_real(config)
    start = time.perf_counter()
    encoder = teacher.load_encoder(run_dir, config.teacher.model, data).to(device)
    targets = teacher.encode(encoder, data.train_images, data, config.targets.batch_size, device,
                             desc="targets")
    save_tensors(run_dir.stage_dir(STAGE) / FILE, {"targets": targets},
                 {"num_images": len(targets), "dim": targets.shape[1]})
    seconds = time.perf_counter() - start
    result = {"num_images": len(targets), "dim": int(targets.shape[1]),
              "images_per_second": len(targets) / seconds}
    return run_dir.finish(STAGE, spec, seconds, result)
