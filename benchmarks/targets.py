"""Target extraction throughput: mkdt.train.kd.encode vs a DataLoader with per-image transforms.

Both pipelines feed the same ResNet-18 encoder (mkdt.nn.models, width ``--width``, eval mode, no
grad) with the same normalised inputs (checked before measuring) over random uint8 3x32x32 images
with CIFAR-10 statistics, ``--batch`` images per forward pass:

- ``mkdt``: :func:`mkdt.train.kd.encode` (what the targets stage runs) on the uint8 images already
  resident on the device;
- ``dataloader``: a Dataset over uint8 HWC arrays making a PIL image per item and applying a
  per-image ``torchvision.transforms.v2`` ToImage / ToDtype / Normalize, batched in order by
  ``torch.utils.data.DataLoader`` (pinned memory on CUDA) with each of ``--workers`` worker counts,
  each batch moved to the device and its features back to the CPU.

Stages: ``encode`` is the whole extraction (features of every image, collected on the CPU as
float32); ``data`` only makes the normalised input batches on the device (for mkdt the input path
of ``encode``: ``ImageData.normalize`` of a device slice). Each (stage, pipeline, workers) runs in a
fresh process: one untimed warm-up batch, then one timed pass over ``--batches`` batches. Columns
as in ``benchmarks/teacher.py``: ``images_per_second``, ``vs_best_dataloader`` (over the best
DataLoader rate of the stage), ``peak_memory_mb`` (main process: CPU peak RSS minus RSS at the
start of the pass, CUDA max allocated minus allocated) and ``workers_private_mb`` (peak summed
private memory of the DataLoader workers).

Usage::

    python benchmarks/targets.py --quick --json targets.json   # width 32, < 3 min on 2 CPU cores
    python benchmarks/targets.py                                # teacher width 64, workers 0 and 2
    python benchmarks/targets.py --device cuda --workers 0 4 8 --batches 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PIPELINE_COLUMNS, compare_pipelines, hardware, peak_memory, report  # noqa: E402
from teacher import WorkersMemory, random_data, synchronize  # noqa: E402

from mkdt.config import ModelConfig, TargetsConfig, TeacherConfig  # noqa: E402
from mkdt.data import ImageData  # noqa: E402
from mkdt.nn.models import build_network  # noqa: E402
from mkdt.runtime import seeded  # noqa: E402
from mkdt.train.kd import encode  # noqa: E402


class PerImageInputs(Dataset):
    """uint8 HWC arrays; item i is the normalised float32 (C, H, W) tensor of the PIL image i."""

    def __init__(self, data: ImageData) -> None:
        self.arrays = data.train_images.permute(0, 2, 3, 1).contiguous().numpy()
        self.transform = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)]
        )

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.fromarray(self.arrays[i]))


def reference_batches(
    data: ImageData, batch: int, device: torch.device, workers: int
) -> Callable[[], Iterator[torch.Tensor]]:
    """Passes over the reference's normalised input batches, in order, on ``device``."""
    loader = DataLoader(
        PerImageInputs(data), batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda"
    )
    return lambda: (x.to(device, non_blocking=True) for x in loader)


def mkdt_batches(data: ImageData, batch: int, device: torch.device) -> Callable[[], Iterator[torch.Tensor]]:
    """Passes over encode's input batches: normalised slices of the device-resident uint8 images."""
    images = data.train_images.to(device)
    return lambda: (data.normalize(images[i : i + batch]) for i in range(0, len(images), batch))


def check_inputs(device: torch.device) -> None:
    """Raise AssertionError unless both pipelines give the same normalised inputs (first 8 images)."""
    small = random_data(8)
    ours = next(mkdt_batches(small, 8, device)())
    theirs = next(reference_batches(small, 8, device, 0)())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def reference_encode(encoder: nn.Module, batches: Iterator[torch.Tensor]) -> torch.Tensor:
    """Features of every batch, float32 on the CPU, like ``encode`` returns them."""
    encoder.eval()
    return torch.cat([encoder.features(x).float().cpu() for x in batches])


def timed_pass(
    args: argparse.Namespace, data: ImageData, device: torch.device, workers: int | None
) -> Callable[[], object]:
    """The pass to time for one configuration (``workers`` None: mkdt), after a warm-up batch."""
    if args.stage == "data":
        batches = (
            mkdt_batches(data, args.batch, device)
            if workers is None
            else reference_batches(data, args.batch, device, workers)
        )
        next(batches())
        return lambda: deque(batches(), maxlen=0)
    with seeded(0):
        model = ModelConfig(arch="resnet18", width=args.width)
        encoder = build_network(model, data.channels, data.image_size, None).to(device)
    if workers is None:
        images = data.train_images.to(device)
        encode(encoder, images[: args.batch], args.batch, normalize=data.normalize)
        return lambda: encode(encoder, images, args.batch, normalize=data.normalize)
    batches = reference_batches(data, args.batch, device, workers)
    reference_encode(encoder, iter([next(batches())]))
    return lambda: reference_encode(encoder, batches())


def child(args: argparse.Namespace) -> dict:
    """Measure one (stage, pipeline, workers) in this (fresh) process."""
    device = torch.device(args.device)
    data = random_data(args.batches * args.batch)
    workers = args.child_workers if args.pipeline == "dataloader" else None
    run = timed_pass(args, data, device, workers)
    synchronize(device)
    with peak_memory(device) as peak, WorkersMemory(workers or 0) as workers_memory:
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "stage": args.stage,
        "pipeline": args.pipeline,
        "workers": workers,
        "width": args.width if args.stage == "encode" else None,
        "batch": args.batch,
        "batches": args.batches,
        "images_per_second": args.batches * args.batch / seconds,
        "peak_memory_mb": peak.mb,
        "workers_private_mb": workers_memory.peak_mb if workers else None,
        "device": hardware(device),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="width 32, 2 batches of 1024 (< 3 min on 2 CPU cores)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch",
        type=int,
        default=TargetsConfig().batch_size,
        help="images per forward pass (default: targets.batch_size)",
    )
    parser.add_argument("--batches", type=int, default=5, help="timed batches")
    parser.add_argument(
        "--width",
        type=int,
        default=TeacherConfig().model.width,
        help="ResNet-18 width (default: the teacher's)",
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values to measure"
    )
    parser.add_argument("--stages", nargs="+", default=["data", "encode"], choices=["data", "encode"])
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width, args.batches = 32, 2
    if args.stage is not None:
        print(json.dumps(child(args)))
        return
    check_inputs(torch.device(args.device))
    records = compare_pipelines(
        __file__,
        args.stages,
        args.workers,
        {"device": args.device, "batch": args.batch, "batches": args.batches, "width": args.width},
    )
    report(
        records,
        PIPELINE_COLUMNS,
        f"batch {args.batch}, 3x32x32, inputs of both pipelines checked equal; "
        f"device: {records[0]['device']}; torch {torch.__version__}",
        args.json,
    )


if __name__ == "__main__":
    main()
