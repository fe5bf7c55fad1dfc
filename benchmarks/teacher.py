"""Teacher training throughput: mkdt's data pipeline vs a DataLoader with per-image transforms.

Two pipelines make two Barlow Twins views per image with the same augmentations (independent
random draws; mkdt's jitter order is fixed and its hue shift is the YIQ rotation described in
:mod:`mkdt.augment`), batch ``--batch``, random uint8 3x32x32 images, CIFAR-10 statistics:

- ``mkdt``: the images resident on the device as uint8, index batches of a seeded permutation,
  :class:`mkdt.nn.augment.SSLAugment` two views per batch (:func:`mkdt.train.ssl.epoch_views`, the loop
  of ``train_teacher``);
- ``dataloader``: the torchvision-CIFAR pattern: a Dataset over uint8 HWC arrays making a PIL image
  per item and applying a per-image ``torchvision.transforms.v2`` Compose per view with the
  parameters of SSLAugment (RandomResizedCrop scale and ratio, horizontal flip, ColorJitter with
  its probability, RandomGrayscale, Gaussian blur and solarize with the view's probability where
  non-zero, ToImage / ToDtype / Normalize), batched by ``torch.utils.data.DataLoader``
  (shuffle, drop_last, pinned memory on CUDA) with each of ``--workers`` worker counts, the views
  moved to the device.

Stages: ``data`` only makes the views; ``train_step`` feeds them to one ResNet-18 Barlow Twins
step (mkdt.nn.models encoder of width ``--width``, the teacher's projector, loss and Adam, as in
``train_teacher`` without the lr schedule). Each (stage, pipeline, workers) runs in a fresh
process: one untimed warm-up batch (and train step), then one timed epoch of ``--batches``
(``--train-batches``) batches from a fresh iterator, DataLoader worker start-up included.
Reported per row:

- ``images_per_second``: images (each giving two views) per second of the timed epoch;
- ``vs_best_dataloader``: that rate over the best DataLoader rate of the same stage;
- ``peak_memory_mb``: added in the main process during the timed epoch (CPU: peak RSS via VmHWM
  minus RSS at its start; CUDA: max allocated minus allocated);
- ``workers_private_mb``: the peak of the summed private memory (Private_Clean + Private_Dirty of
  /proc/PID/smaps_rollup, sampled every 0.1 s) of the DataLoader worker processes, i.e. what they
  hold beyond the pages shared with the main process.

Usage::

    python benchmarks/teacher.py --quick --json teacher.json   # width 16, < 3 min on 2 CPU cores
    python benchmarks/teacher.py                                # teacher width 64, workers 0 and 2
    python benchmarks/teacher.py --device cuda --workers 0 4 8 --batches 50 --train-batches 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PIPELINE_COLUMNS, compare_pipelines, hardware, peak_memory, report  # noqa: E402

from mkdt.config import ModelConfig, TeacherConfig  # noqa: E402
from mkdt.data import ImageData  # noqa: E402
from mkdt.nn.augment import SSLAugment  # noqa: E402
from mkdt.nn.models import build_network  # noqa: E402
from mkdt.nn.ssl import BarlowTwinsLoss, barlow_twins_projector  # noqa: E402
from mkdt.runtime import generator, seeded  # noqa: E402
from mkdt.train.ssl import epoch_views  # noqa: E402

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
Views = tuple[torch.Tensor, torch.Tensor]


def random_data(n: int, size: int = 32, seed: int = 0) -> ImageData:
    """n random uint8 3 x size x size training images (test split: 2 images), CIFAR-10 statistics."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageData(
        "random",
        images,
        labels,
        images[:2].clone(),
        labels[:2].clone(),
        tuple(str(c) for c in range(10)),
        *CIFAR10_STATS,
    )


def reference_transform(augment: SSLAugment, view: int) -> v2.Compose:
    """A per-image PIL transform of view ``view`` with the parameters of ``augment``."""
    steps: list[Callable] = [
        v2.RandomResizedCrop(augment.image_size, scale=augment.crop_scale, ratio=augment.crop_ratio),
        v2.RandomHorizontalFlip(augment.flip_p),
        v2.RandomApply([v2.ColorJitter(*augment.jitter)], p=augment.jitter_p),
        v2.RandomGrayscale(augment.grayscale_p),
    ]
    if augment.blur_p[view] > 0:
        blur = v2.GaussianBlur(augment.blur_kernel, sigma=augment.blur_sigma)
        steps.append(v2.RandomApply([blur], p=augment.blur_p[view]))
    if augment.solarize_p[view] > 0:
        steps.append(v2.RandomSolarize(128, p=augment.solarize_p[view]))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.mean, augment.std)]
    return v2.Compose(steps)


class PerImageViews(Dataset):
    """uint8 HWC arrays; item i is (view 1, view 2) of the PIL image of array i, labels omitted."""

    def __init__(self, images: torch.Tensor, augment: SSLAugment) -> None:
        self.arrays = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.views = reference_transform(augment, 0), reference_transform(augment, 1)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> Views:
        image = Image.fromarray(self.arrays[i])
        return self.views[0](image), self.views[1](image)


def mkdt_pipeline(data: ImageData, batch: int, device: torch.device) -> Callable[[], Iterable[Views]]:
    """Epochs of mkdt's teacher views: device-resident uint8 images, batched augmentation."""
    images = data.train_images.to(device)
    augment = SSLAugment(data.image_size, data.mean, data.std)
    gen = generator(0, device)
    return lambda: epoch_views(images, augment, "barlow_twins", batch, gen)


def dataloader_pipeline(
    data: ImageData, batch: int, device: torch.device, workers: int
) -> Callable[[], Iterable[Views]]:
    """Epochs of the reference views: DataLoader over per-image transforms, moved to ``device``."""
    dataset = PerImageViews(data.train_images, SSLAugment(data.image_size, data.mean, data.std))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )

    def epoch() -> Iterator[Views]:
        for view1, view2 in loader:
            yield view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)

    return epoch


def train_step(width: int, data: ImageData, device: torch.device, batch: int) -> Callable[[Views], None]:
    """One Barlow Twins step of the teacher recipe (ResNet-18 of ``width``, projector, Adam)."""
    t = TeacherConfig()
    with seeded(0):
        encoder = (
            build_network(ModelConfig(arch="resnet18", width=width), data.channels, data.image_size, None)
            .to(device)
            .train()
        )
        projector = barlow_twins_projector(encoder.feature_dim, t.projector_dim, t.projector_dim)
    projector = projector.to(device).train()
    loss_fn = BarlowTwinsLoss(lambda_offdiag=t.bt_lambda)
    optimizer = torch.optim.Adam(
        [*encoder.parameters(), *projector.parameters()], lr=t.lr * batch / 256, weight_decay=t.weight_decay
    )

    def step(views: Views) -> None:
        loss = loss_fn(projector(encoder.features(views[0])), projector(encoder.features(views[1])))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _private_kb(pid: str) -> int:
    """Private memory of process ``pid`` in KiB (0 once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in lines if line.startswith("Private_"))


def _children() -> list[str]:
    """Pids of this process's children (from /proc/*/stat)."""
    me, pids = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                pids.append(stat.parent.name)
        except (OSError, IndexError):
            continue
    return pids


class WorkersMemory:
    """Context manager: ``peak_mb``, the peak of the summed private memory of ``workers`` child
    processes, sampled by a thread every 0.1 s while the block runs."""

    def __init__(self, workers: int) -> None:
        self.workers, self.peak_mb = workers, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> WorkersMemory:
        if self.workers:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.workers:
            self._thread.join()

    def _sample(self) -> None:
        pids: list[str] = []
        while not self._stop.wait(0.1):
            if len(pids) < self.workers:
                pids = _children()
            self.peak_mb = max(self.peak_mb, sum(_private_kb(pid) for pid in pids) / 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args: argparse.Namespace) -> dict:
    """Measure one (stage, pipeline, workers) in this (fresh) process."""
    device = torch.device(args.device)
    batches = args.batches if args.stage == "data" else args.train_batches
    data = random_data(batches * args.batch)
    if args.pipeline == "mkdt":
        epoch = mkdt_pipeline(data, args.batch, device)
    else:
        epoch = dataloader_pipeline(data, args.batch, device, args.child_workers)
    consume = train_step(args.width, data, device, args.batch) if args.stage == "train_step" else None
    warm = next(iter(epoch()))  # the iterator is dropped: its DataLoader workers shut down
    if consume is not None:
        consume(warm)
    synchronize(device)
    del warm
    workers = args.child_workers if args.pipeline == "dataloader" else None
    with peak_memory(device) as peak, WorkersMemory(workers or 0) as workers_memory:
        start = time.perf_counter()
        for views in epoch():
            if consume is not None:
                consume(views)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "stage": args.stage,
        "pipeline": args.pipeline,
        "workers": workers,
        "width": args.width if consume is not None else None,
        "batch": args.batch,
        "batches": batches,
        "images_per_second": batches * args.batch / seconds,
        "peak_memory_mb": peak.mb,
        "workers_private_mb": workers_memory.peak_mb if workers else None,
        "device": hardware(device),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="width 16, 8 data batches, 3 train-step batches (< 3 min on 2 CPU cores)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (two views each)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches of the data stage")
    parser.add_argument("--train-batches", type=int, default=5, help="timed batches of train_step")
    parser.add_argument(
        "--width",
        type=int,
        default=TeacherConfig().model.width,
        help="ResNet-18 width of the train step (default: the teacher's)",
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values to measure"
    )
    parser.add_argument("--stages", nargs="+", default=["data", "train_step"], choices=["data", "train_step"])
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width, args.batches, args.train_batches = 16, 8, 3
    if args.stage is not None:
        print(json.dumps(child(args)))
        return
    records = compare_pipelines(
        __file__,
        args.stages,
        args.workers,
        {
            "device": args.device,
            "batch": args.batch,
            "batches": args.batches,
            "train_batches": args.train_batches,
            "width": args.width,
        },
    )
    report(
        records,
        PIPELINE_COLUMNS,
        f"batch {args.batch}, 3x32x32; device: {records[0]['device']}; torch {torch.__version__}",
        args.json,
    )


if __name__ == "__main__":
    main()
