"""Benchmark: E expert students trained batched (:func:`mkdt.train.kd.train_students`) vs one at a time
(:func:`mkdt.train.kd.train_student`), measured in the same run on random data of CIFAR shape
(3x32x32 images, 512-d targets, ConvNetD3 students, the experts' default SGD recipe).

Usage::

    python benchmarks/experts.py --quick                    # < 3 minutes on 2 CPU cores
    python benchmarks/experts.py --device cuda --experts 10 --json experts-h100.json
    python benchmarks/experts.py --width 128 --experts 4 --images 2048 --epochs 1

Prints one row per mode: seconds, students per hour, the ratio of students per hour to one at a
time, peak memory (CUDA max allocated above the data on GPU; peak RSS above the start on CPU,
Linux), the largest difference of the final weights from one-at-a-time training, the hardware and
the torch version. ``--json PATH`` also writes the rows as a JSON list.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, peak_memory, report  # noqa: E402

from mkdt.nn.models import ConvNet  # noqa: E402
from mkdt.runtime import seeded  # noqa: E402
from mkdt.train.kd import KDRecipe, Trajectory, train_student, train_students  # noqa: E402

QUICK = {"experts": 4, "width": 32, "images": 4096, "epochs": 1}
DEFAULTS = {"experts": 10, "width": 128, "images": 10000, "epochs": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"small run for a 2-core CPU (defaults become {QUICK})"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to train (default: cuda if available, else cpu)",
    )
    parser.add_argument("--experts", type=int, help=f"E, students per mode (default {DEFAULTS['experts']})")
    parser.add_argument("--width", type=int, help=f"ConvNet width (default {DEFAULTS['width']})")
    parser.add_argument("--images", type=int, help=f"random training images (default {DEFAULTS['images']})")
    parser.add_argument("--epochs", type=int, help=f"epochs per student (default {DEFAULTS['epochs']})")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.experts, args.width, args.images, args.epochs, args.batch_size) < 1:
        parser.error("--experts, --width, --images, --epochs and --batch-size must be >= 1")
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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.images, 3, 32, 32, generator=gen).to(device)
    targets = torch.randn(args.images, 512, generator=gen).to(device)
    recipe = KDRecipe(epochs=args.epochs, batch_size=args.batch_size)
    save_epochs = list(range(args.epochs + 1))

    def student(k: int) -> ConvNet:
        with seeded(k):
            return ConvNet(3, 32, args.width, 3, 512).to(device)

    def batches(k: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(1000 + k)

    def one_at_a_time(images: torch.Tensor, z: torch.Tensor, rec: KDRecipe) -> list[Trajectory]:
        return [
            train_student(student(k), images, z, rec, save_epochs, batches(k)) for k in range(args.experts)
        ]

    def batched(images: torch.Tensor, z: torch.Tensor, rec: KDRecipe) -> list[Trajectory]:
        return train_students(
            [student(k) for k in range(args.experts)],
            images,
            z,
            rec,
            save_epochs,
            [batches(k) for k in range(args.experts)],
        )

    warm = KDRecipe(epochs=args.epochs, batch_size=min(args.batch_size, args.images))
    for mode in (one_at_a_time, batched):  # first calls: allocator, cuDNN autotuning, vmap tracing
        mode(inputs[: warm.batch_size], targets[: warm.batch_size], warm)

    rows, reference = [], None
    for name, mode in (("one-at-a-time", one_at_a_time), ("batched", batched)):
        trajs, seconds, peak = measure(lambda m=mode: m(inputs, targets, recipe), device)
        final = torch.stack([t.params[-1] for t in trajs])
        reference = final if reference is None else reference
        per_hour = args.experts / seconds * 3600
        rows.append(
            {
                "mode": name,
                "experts": args.experts,
                "width": args.width,
                "images": args.images,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seconds": seconds,
                "students_per_hour": per_hour,
                "ratio": per_hour / rows[0]["students_per_hour"] if rows else 1.0,
                "peak_mb": peak,
                "max_weight_diff": (final - reference).abs().max().item(),
                "device": device.type,
                "hardware": hardware(device),
                "torch": torch.__version__,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    report(
        rows,
        [
            "mode",
            "experts",
            "width",
            "images",
            "epochs",
            "seconds",
            "students_per_hour",
            "ratio",
            "peak_mb",
            "max_weight_diff",
            "hardware",
            "torch",
        ],
        None,
        args.json,
    )


if __name__ == "__main__":
    main()
