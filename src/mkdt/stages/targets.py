"""Stage 2: teacher targets Z_T = f_T(x) for every x in D_real.

The teacher's pre-projection features (8 x teacher width: 512 for a width-64 ResNet-18), computed
once in eval mode from D_real normalised with the teacher's statistics, in batches, and stored as
``targets/targets.safetensors`` (rows in D_real order). Under torch.distributed each rank encodes a
contiguous share of the rows; rank 0 gathers and writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mkdt.config import Config
from mkdt.data import ImageData
from mkdt.data.real import RealData
from mkdt.nn.loading import load_encoder
from mkdt.runtime import Runtime
from mkdt.stages.context import StageContext
from mkdt.store import RunDir
from mkdt.train.kd import encode

STAGE = "targets"


def teacher_targets(
    config: Config, store: RunDir, data: ImageData, inputs: torch.Tensor, desc: str | None = None
) -> torch.Tensor:
    """The KD targets of ``inputs`` (normalised images shaped like D_real's, on the device that
    encodes them): the features of the run's teacher in eval mode, (n, D) float32 on the CPU. The
    stage encodes D_real with it; ``mkdt import`` encodes sets that come without targets."""
    encoder = load_encoder(store.encoder_path, config.teacher.model, data.channels, data.image_size)
    return encode(encoder.to(inputs.device), inputs, config.targets.batch_size, desc=desc)


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Encode D_real with the run's teacher into ``out/targets``; skip if done."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    if (done := ctx.finished(force)) is not None:
        return done
    rt, inputs = ctx.runtime, ctx.real.inputs
    rows = -(-len(inputs) // rt.world)  # rank r encodes rows [r * rows, (r + 1) * rows)
    mine = inputs[rt.rank * rows : (rt.rank + 1) * rows] if rt.distributed else inputs
    targets = teacher_targets(config, ctx.store, ctx.real.data, mine, desc="targets")
    if rt.distributed:
        targets = torch.cat(rt.gather_objects(targets))
    if rt.is_main:
        ctx.store.save_targets(targets)
    return ctx.finish(
        {
            "num_images": len(targets),
            "dim": int(targets.shape[1]),
            "images_per_second": len(targets) / ctx.seconds(),
        },
        (ctx.store.targets_path,),
    )
