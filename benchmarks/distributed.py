"""Benchmark: distillation iterations and teacher steps with 1 and 2 ranks of torch.distributed.

    python benchmarks/distributed.py [--device cpu|cuda] [--ranks 1 2] [--iterations 5] [--json FILE]

The same global work is done with every number of ranks (B trajectory segments per distillation
iteration, a global teacher batch), each rank count in a fresh ``torchrun --standalone`` job; the
median seconds per step of rank 0 are reported with their ratio to 1 rank. On a CPU the ranks share
the cores (gloo), so the ratio shows the communication and coordination overhead rather than a
speed-up; on a machine with several GPUs (``--device cuda``, NCCL) it is the scaling efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import hardware, report  # noqa: E402

from mkdt.config import DistillConfig  # noqa: E402
from mkdt.nn.distributed import globalise_batch_norms  # noqa: E402
from mkdt.nn.models import ConvNet, flatten_params, resnet18  # noqa: E402
from mkdt.nn.ssl import BarlowTwinsLoss, barlow_twins_projector  # noqa: E402
from mkdt.runtime import Runtime  # noqa: E402
from mkdt.stages.distill import matching_recipe  # noqa: E402
from mkdt.train.kd import Trajectory  # noqa: E402
from mkdt.train.matching import Distiller  # noqa: E402
from mkdt.train.ssl import ssl_step  # noqa: E402


def _timed(step, iterations: int, device: torch.device) -> float:
    step()  # warm-up
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(args: argparse.Namespace) -> None:
    runtime = Runtime.create(args.device)
    device = runtime.device
    torch.manual_seed(0)
    student = ConvNet(3, 32, 16, 3, 512).to(device)
    theta = flatten_params(student).cpu()
    gen = torch.Generator().manual_seed(0)
    experts = [
        Trajectory(
            torch.stack([theta + 0.01 * k * torch.randn(theta.shape, generator=gen) for k in range(4)]),
            (0, 1, 2, 3),
        )
        for _ in range(2)
    ]
    recipe = matching_recipe(DistillConfig(syn_steps=5, batch_syn=64, trajectories=4))
    images = torch.randn(256, 3, 32, 32, generator=gen).to(device)
    targets = torch.randn(256, 512, generator=gen).to(device)
    distiller = Distiller(
        student=student,
        images=images,
        targets=targets,
        trajectories=experts,
        recipe=recipe,
        gen=torch.Generator(device=device).manual_seed(0),
        backend="unrolled",
        runtime=runtime,
    )
    distill_s = _timed(distiller.step, args.iterations, device)
    encoder, projector = resnet18(width=8).to(device), barlow_twins_projector(64, 128, 128).to(device)
    if runtime.distributed:
        globalise_batch_norms(encoder)
        globalise_batch_norms(projector)
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    share = 128 // runtime.world
    views = torch.randn(2, share, 3, 32, 32, generator=gen).to(device)

    def teacher() -> None:
        ssl_step(
            lambda x: projector(encoder.features(x)),
            BarlowTwinsLoss(),
            views[0],
            views[1],
            params,
            optimizer,
            runtime,
        )

    teacher_s = _timed(teacher, args.iterations, device)
    if runtime.is_main:
        Path(args.child_json).write_text(
            json.dumps({"distill": distill_s, "teacher": teacher_s, "threads": torch.get_num_threads()})
        )
    runtime.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_json:
        child(args)
        return
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    records, base = [], {}
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            subprocess.run(
                [
                    torchrun,
                    "--standalone",
                    f"--nproc_per_node={ranks}",
                    __file__,
                    "--device",
                    args.device,
                    "--iterations",
                    str(args.iterations),
                    "--child-json",
                    str(out),
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "MKDT_PROGRESS": "0"},
            )
            timings = json.loads(out.read_text())
        threads = timings.pop("threads")
        for what, seconds in timings.items():
            base.setdefault(what, seconds)
            records.append(
                {
                    "work": what,
                    "ranks": ranks,
                    "seconds_per_step": seconds,
                    "ratio_to_1_rank": seconds / base[what],
                    "threads_per_rank": threads,
                    "device": hardware(args.device).split(" (")[0],
                }
            )
    report(
        records,
        ["work", "ranks", "seconds_per_step", "ratio_to_1_rank", "threads_per_rank", "device"],
        "same global work per step; on CPU the ranks share the cores (the ratio is the overhead)",
        args.json,
    )


if __name__ == "__main__":
    main()
