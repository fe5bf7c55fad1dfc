"""Distillation iteration time and peak memory vs N, for the unrolled and recompute backends.

For each N, with a ConvNet student, a random synthetic set and random expert segments, running
:class:`mkdt.train.matching.Distiller` (the product code path):

- ``seconds_per_iteration``: this process builds both backends, runs one warm-up iteration of each,
  then ``--iterations`` timed iterations alternating unrolled, recompute, unrolled, ...; the median
  per backend. Alternating puts both under the same machine load (on a shared VM, separate
  processes minutes apart drifted by +-10%);
- ``peak_memory_mb``: each backend alone in a fresh process, the peak added by its first iteration:
  on CPU the peak RSS (VmHWM, reset just before it) minus the RSS at that moment; on CUDA max
  allocated minus allocated. On CPU that process runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc
  then maps every block above 64 KiB on allocation and unmaps it on free, so RSS follows the live
  tensors. With glibc's default adaptive threshold, freed blocks stay cached in the heap by chance,
  and recompute at width 32, batch 64, N = 10 measured 165-194 MB in repeated runs (with the fixed
  threshold: 109.7 +- 0.1 MB).

Usage::

    python benchmarks/distill.py --quick --json distill.json   # width 16, batch 128, N = 5..40, < 3 min
    python benchmarks/distill.py --width 128 --batch-syn 256 --steps 5 10   # the paper's size
    python benchmarks/distill.py --device cuda --width 128 --batch-syn 256 --steps 5 10 20 40

``unrolled`` is skipped where its estimated graph (mkdt.train.matching.unrolled_graph_bytes) would exceed
``--max-unrolled-gb`` or N exceeds ``--max-unrolled-steps`` (20 with ``--quick``, whose targets compare
the backends at N = 20 and recompute with itself at N = 10 and 40); ``recompute`` always runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, peak_memory, report, run_child  # noqa: E402

from mkdt.config import DistillConfig  # noqa: E402
from mkdt.nn.models import ConvNet, flatten_params  # noqa: E402
from mkdt.stages.distill import matching_recipe  # noqa: E402
from mkdt.train.kd import Trajectory  # noqa: E402
from mkdt.train.matching import Distiller, unrolled_graph_bytes  # noqa: E402

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: RSS follows the live tensors (see above)


def build(args: argparse.Namespace, backend: str, steps: int) -> Distiller:
    """A Distiller over random data: 2 experts whose epochs 0..3 are random walks from the init."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = ConvNet(3, 32, args.width, 3, 512).to(device)
    theta = flatten_params(student).cpu()
    trajectories = []
    for _ in range(2):
        walk = [theta]
        for _ in range(3):
            walk.append(walk[-1] + 0.01 * torch.randn(theta.shape, generator=gen))
        trajectories.append(Trajectory(torch.stack(walk), (0, 1, 2, 3), torch.zeros(3)))
    recipe = matching_recipe(
        DistillConfig(syn_steps=steps, batch_syn=args.batch_syn, trajectories=args.trajectories, iterations=1)
    )
    images = torch.randn(args.images, 3, 32, 32, generator=gen).to(device)
    targets = torch.randn(args.images, 512, generator=gen).to(device)
    return Distiller(
        student=student,
        images=images,
        targets=targets,
        trajectories=trajectories,
        recipe=recipe,
        gen=torch.Generator(device=device).manual_seed(0),
        backend=backend,
    )


def time_backends(args: argparse.Namespace, steps: int, backends: list[str]) -> dict[str, float]:
    """Median seconds per iteration of each backend, their timed iterations alternating."""
    distillers = {b: build(args, b, steps) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in distillers}
    for i in range(args.iterations + 1):  # iteration 0 warms up the allocator and thread pools
        for backend, distiller in distillers.items():
            start = time.perf_counter()
            distiller.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times[backend].append(time.perf_counter() - start)
    return {b: statistics.median(t) for b, t in times.items()}


def memory_child(args: argparse.Namespace) -> dict:
    """Peak memory added by the first iteration of ``args.backend`` in this fresh process."""
    distiller = build(args, args.backend, args.child_steps)
    with peak_memory(torch.device(args.device)) as peak:
        distiller.step()
    return {"backend": args.backend, "peak_memory_mb": peak.mb}


def estimated_graph_gb(args: argparse.Namespace, steps: int) -> float:
    recipe = matching_recipe(
        DistillConfig(syn_steps=steps, batch_syn=args.batch_syn, trajectories=args.trajectories)
    )
    student = ConvNet(3, 32, args.width, 3, 512)
    return unrolled_graph_bytes(recipe, student, torch.Size((3, 32, 32)), args.images) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="width 16, batch_syn 128, 256 images, N = 5 10 20 40 (unrolled up to 20), 2 timed iterations",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=128, help="ConvNetD3 width")
    parser.add_argument("--batch-syn", type=int, default=256, help="synthetic images per inner step")
    parser.add_argument("--images", type=int, default=1000, help="synthetic set size")
    parser.add_argument("--trajectories", type=int, default=1, help="segments per iteration (B)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40], help="values of N")
    parser.add_argument("--backends", nargs="+", default=["unrolled", "recompute"])
    parser.add_argument(
        "--iterations",
        type=int,
        default=3,
        help="timed iterations per backend after 1 warm-up (median reported)",
    )
    parser.add_argument(
        "--max-unrolled-gb",
        type=float,
        default=None,
        help="skip unrolled above this estimated graph size (default: 60%% of RAM or GPU memory)",
    )
    parser.add_argument(
        "--max-unrolled-steps",
        type=int,
        default=10**9,
        help="skip unrolled above this N (--quick: 20, to fit the time)",
    )
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width, args.batch_syn, args.images, args.iterations = 16, 128, 256, 2
        args.max_unrolled_steps = 20
        args.steps = [5, 10, 20, 40]
    if args.child_steps is not None:
        print(json.dumps(memory_child(args)))
        return
    if args.max_unrolled_gb is None:
        total = (
            torch.cuda.get_device_properties(args.device).total_memory
            if args.device.startswith("cuda")
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )
        args.max_unrolled_gb = 0.6 * total / 2**30
    records = []
    common = {
        "device": args.device,
        "width": args.width,
        "batch_syn": args.batch_syn,
        "images": args.images,
        "trajectories": args.trajectories,
        "iterations": args.iterations,
    }
    for steps in args.steps:
        graph_gb = estimated_graph_gb(args, steps)
        fits = graph_gb <= args.max_unrolled_gb and steps <= args.max_unrolled_steps
        backends = [b for b in args.backends if b != "unrolled" or fits]
        if backends != args.backends:
            print(
                f"skip unrolled N={steps}: estimated graph {graph_gb:.1f} GB (limit "
                f"{args.max_unrolled_gb:.1f} GB), N limit {args.max_unrolled_steps}",
                file=sys.stderr,
            )
        for backend, seconds in time_backends(args, steps, backends).items():
            memory = run_child(__file__, {"child_steps": steps, "backend": backend, **common}, env=MEMORY_ENV)
            records.append(
                {
                    "backend": backend,
                    "syn_steps": steps,
                    "batch_syn": args.batch_syn,
                    "width": args.width,
                    "trajectories": args.trajectories,
                    "seconds_per_iteration": seconds,
                    "peak_memory_mb": memory["peak_memory_mb"],
                    "device": hardware(args.device),
                }
            )
            print(
                f"  {backend:9s} N={steps:3d}: {seconds:.3f} s/it, {memory['peak_memory_mb']:.0f} MB",
                file=sys.stderr,
            )
    reference = {r["syn_steps"]: r for r in records if r["backend"] == "unrolled"}
    for r in records:
        ref = reference.get(r["syn_steps"])
        r["time_vs_unrolled"] = r["seconds_per_iteration"] / ref["seconds_per_iteration"] if ref else None
        r["memory_vs_unrolled"] = r["peak_memory_mb"] / ref["peak_memory_mb"] if ref else None
    report(
        records,
        [
            "backend",
            "syn_steps",
            "batch_syn",
            "width",
            "seconds_per_iteration",
            "time_vs_unrolled",
            "peak_memory_mb",
            "memory_vs_unrolled",
        ],
        f"device: {records[0]['device']}; torch {torch.__version__}",
        args.json,
    )


if __name__ == "__main__":
    main()
