"""Run under ``torchrun`` by tests/system/test_distributed.py (or directly, as one process): one teacher
step or one distillation step on fixed data, each rank taking its share; rank 0 saves the loss and
the updated values to the path given, for comparison with a single process.

    torchrun --standalone --nproc_per_node=2 tests/system/distributed_worker.py {teacher|distill} OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mkdt.config import DistillConfig
from mkdt.nn.distributed import globalise_batch_norms
from mkdt.nn.models import ConvNet, flatten_params, resnet10
from mkdt.nn.ssl import BarlowTwinsLoss, NTXentLoss, barlow_twins_projector
from mkdt.runtime import Runtime
from mkdt.stages.distill import matching_recipe
from mkdt.train.kd import Trajectory
from mkdt.train.matching import Distiller
from mkdt.train.ssl import ssl_step

GLOBAL_BATCH = 8


def teacher_step(runtime: Runtime, method: str) -> dict[str, torch.Tensor]:
    """One SSL step of a ResNet-10 (batch norm everywhere) on a fixed global batch of two views."""
    torch.manual_seed(0)
    encoder = resnet10(width=4, in_channels=3)
    projector = barlow_twins_projector(32, 16, 16)
    if runtime.distributed:
        globalise_batch_norms(encoder)
        globalise_batch_norms(projector)
    gen = torch.Generator().manual_seed(1)
    views = torch.randn(2, GLOBAL_BATCH, 3, 8, 8, generator=gen)
    share = GLOBAL_BATCH // runtime.world
    mine = views[:, runtime.rank * share : (runtime.rank + 1) * share]
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss_fn = BarlowTwinsLoss() if method == "barlow_twins" else NTXentLoss()
    loss = ssl_step(
        lambda x: projector(encoder.features(x)), loss_fn, mine[0], mine[1], params, optimizer, runtime
    )
    return {
        "loss": loss,
        "params": torch.cat([p.detach().flatten() for p in params]),
        "running_mean": encoder.bn1.running_mean.clone(),
    }


def distill_step(runtime: Runtime) -> dict[str, torch.Tensor]:
    """One distillation iteration with B = 4 segments of 3 random-walk experts."""
    torch.manual_seed(0)
    student = ConvNet(1, 8, width=4, depth=2, out_dim=6).double()
    theta = flatten_params(student)
    gen = torch.Generator().manual_seed(2)
    experts = []
    for _ in range(3):
        walk = [theta]
        for _ in range(3):
            walk.append(walk[-1] + 0.05 * torch.randn(theta.shape, generator=gen, dtype=torch.float64))
        experts.append(Trajectory(torch.stack(walk), (0, 1, 2, 3)))
    images = torch.randn(12, 1, 8, 8, generator=gen, dtype=torch.float64)
    targets = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    recipe = matching_recipe(
        DistillConfig(
            syn_steps=3,
            batch_syn=4,
            trajectories=4,
            max_start_epoch=2,
            expert_epochs=2,
            learn_targets=True,
            lr_img=10.0,
            lr_targets=1.0,
        )
    )
    distiller = Distiller(
        student=student,
        images=images,
        targets=targets,
        trajectories=experts,
        recipe=recipe,
        gen=torch.Generator().manual_seed(3),
        backend="recompute",
        runtime=runtime,
    )
    distiller.lr.data = distiller.lr.data.double()
    loss = distiller.step()
    return {
        "loss": loss,
        "images": distiller.images.detach(),
        "targets": distiller.targets.detach(),
        "lr": distiller.lr.detach(),
    }


def main(argv: list[str]) -> int:
    what, out = argv[0], Path(argv[1])
    runtime = Runtime.create("cpu")
    if what == "distill":
        result = distill_step(runtime)
    else:
        result = teacher_step(runtime, what)
    if runtime.is_main:
        torch.save(result, out)
    runtime.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
