"""Benchmark: the tuned evaluation's pre-training of one set (every step size of a grid x S seeds)
one student at a time vs trained together (:func:`mkdt.train.kd.train_students` with ``lrs``),
measured in the same run on random data at cifar10-cpu's scale (1000 images of 3x32x32, 512-d
targets, ConvNet width 32 depth 3, 20 epochs of batch 256, momentum 0.9, weight decay 1e-4).

Usage::

    python benchmarks/evaluate.py --quick                   # 4 epochs: ~4 minutes on 1 CPU thread
    python benchmarks/evaluate.py --device cuda --seeds 5 --json evaluate-cuda.json
    python benchmarks/evaluate.py --lrs 0.01 0.1 1 --width 128 --images 5000

Rows: (a) one at a time; (b) the grid's students of one seed together (they share the init and
batch order); (c) every step size and seed together; (d) one at a time in the channels_last layout.
Each prints seconds, students per hour, the ratio of students per hour to (a), peak memory (CUDA max
allocated above the data on GPU; peak RSS above the start on CPU, Linux), the largest difference of
the final weights from (a) (over the students that did not diverge), how many diverged, the
hardware and the torch version. ``--json PATH`` also writes the rows as a JSON list.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, peak_memory, report  # noqa: E402

from mkdt.nn.models import ConvNet  # noqa: E402
from mkdt.runtime import Runtime, seeded  # noqa: E402
from mkdt.train.kd import KDRecipe, Trajectory, train_student, train_students  # noqa: E402

QUICK = {"epochs": 4}
DEFAULTS = {"epochs": 20}

Students = dict[tuple[int, float], Trajectory]  # (seed, lr) -> the student's trajectory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"small run for a CPU (defaults become {QUICK})")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to train (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0], help="the step-size grid"
    )
    parser.add_argument("--seeds", type=int, default=2, help="S, evaluation seeds (default 2)")
    parser.add_argument("--width", type=int, default=32, help="ConvNet width (default 32)")
    parser.add_argument("--images", type=int, default=1000, help="images of the set (default 1000)")
    parser.add_argument("--epochs", type=int, help=f"epochs per student (default {DEFAULTS['epochs']})")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.seeds, args.width, args.images, args.epochs, args.batch_size) < 1:
        parser.error("--seeds, --width, --images, --epochs and --batch-size must be >= 1")
    if min(args.lrs) <= 0:
        parser.error("--lrs must be positive")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here")
    return args


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(fn(), seconds, peak memory in MiB added while it ran)."""
    with peak_memory(device) as peak:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return out, seconds, peak.mb


def modes(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[..., Students]]:
    """The four ways to pre-train every (seed, lr), each a function (images, targets, recipe)."""
    pairs = [(s, lr) for s in range(args.seeds) for lr in args.lrs]

    def student(seed: int) -> ConvNet:  # the same init for every step size of a seed
        with seeded(seed):
            return ConvNet(3, 32, args.width, 3, 512).to(device)

    def batches(seed: int) -> torch.Generator:  # the same batch order too
        return torch.Generator(device=device).manual_seed(1000 + seed)

    def together(group: list[tuple[int, float]], x: torch.Tensor, z: torch.Tensor, rec: KDRecipe) -> Students:
        trajectories = train_students(
            [student(s) for s, _ in group],
            x,
            z,
            rec,
            [rec.epochs],
            [batches(s) for s, _ in group],
            lrs=[lr for _, lr in group],
            on_divergence="keep",
        )
        return dict(zip(group, trajectories, strict=True))

    def one_at_a_time(
        x: torch.Tensor, z: torch.Tensor, rec: KDRecipe, runtime: Runtime | None = None
    ) -> Students:
        return {
            (s, lr): train_student(
                student(s),
                x,
                z,
                dataclasses.replace(rec, lr=lr),
                [rec.epochs],
                batches(s),
                runtime=runtime,
                on_divergence="keep",
            )
            for s, lr in pairs
        }

    def per_seed(x: torch.Tensor, z: torch.Tensor, rec: KDRecipe) -> Students:
        out: Students = {}
        for seed in range(args.seeds):
            out |= together([p for p in pairs if p[0] == seed], x, z, rec)
        return out

    channels_last = Runtime(device, channels_last=True)
    return {
        "(a) one at a time": one_at_a_time,
        "(b) grid per seed": per_seed,
        "(c) grid x seeds": lambda x, z, rec: together(pairs, x, z, rec),
        "(d) one at a time, channels_last": lambda x, z, rec: one_at_a_time(x, z, rec, channels_last),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.images, 3, 32, 32, generator=gen).to(device)
    targets = torch.randn(args.images, 512, generator=gen).to(device)
    recipe = KDRecipe(epochs=args.epochs, momentum=0.9, weight_decay=1e-4, batch_size=args.batch_size)
    ways = modes(args, device)
    warm = KDRecipe(epochs=1, batch_size=min(args.batch_size, args.images))
    for mode in ways.values():  # first calls: allocator, cuDNN autotuning, kernel selection
        mode(inputs[: warm.batch_size], targets[: warm.batch_size], warm)

    rows: list[dict[str, Any]] = []
    reference: Students = {}
    at_once = {"(b) grid per seed": len(args.lrs), "(c) grid x seeds": len(args.lrs) * args.seeds}
    for name, mode in ways.items():
        students, seconds, peak = measure(lambda m=mode: m(inputs, targets, recipe), device)
        reference = reference or students
        kept = [k for k, t in students.items() if not t.diverged and not reference[k].diverged]
        diff = max(
            ((students[k].params[-1] - reference[k].params[-1]).abs().max().item() for k in kept), default=0.0
        )
        per_hour = len(students) / seconds * 3600
        rows.append(
            {
                "mode": name,
                "students": len(students),
                "at_once": at_once.get(name, 1),
                "width": args.width,
                "images": args.images,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lrs": args.lrs,
                "seeds": args.seeds,
                "seconds": seconds,
                "students_per_hour": per_hour,
                "ratio": per_hour / rows[0]["students_per_hour"] if rows else 1.0,
                "peak_mb": peak,
                "max_weight_diff": diff,
                "diverged": sum(t.diverged for t in students.values()),
                "device": device.type,
                "hardware": hardware(device),
                "torch": torch.__version__,
            }
        )
        print(f"  {name}: {seconds:.1f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    report(
        rows,
        [
            "mode",
            "students",
            "at_once",
            "images",
            "epochs",
            "seconds",
            "students_per_hour",
            "ratio",
            "peak_mb",
            "max_weight_diff",
            "diverged",
            "hardware",
            "torch",
        ],
        f"step sizes {args.lrs} x {args.seeds} seeds, width {args.width}, batch {args.batch_size}",
        args.json,
    )


if __name__ == "__main__":
    main()
