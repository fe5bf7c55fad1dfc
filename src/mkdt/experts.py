"""Stage 3: K expert trajectories of KD students.

Expert k is a fresh student (its init seeded by ``derive_seed(seed, "expert-init", k)``) trained
with L_KD = mean over batch and dims of (f_S(x) - Z_T[x])^2, SGD with momentum and weight decay,
no augmentation, batches from its own seeded permutation each epoch. Its flat parameter vector
theta (``models.flatten_params`` order) is kept after each epoch in ``save_epochs`` (epoch 0 = the
init) in ``experts/expert_KKKK.safetensors``:

- ``params``: (len(epochs), P) float32, row i = theta after ``epochs[i]`` epochs;
- ``epochs``: (len(epochs),) int64;  ``loss``: (experts.epochs,) float32 mean KD loss per epoch.

Experts are independent files, so an interrupted stage resumes at the next missing expert, and
ranks of a torchrun job each train experts ``rank, rank + world, ...`` into the same folder.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mkdt import targets as targets_stage
from mkdt.artifacts import RunDir, derive_seed, fingerprint, load_tensors, read_metadata, save_tensors
from mkdt.config import Config, ExpertsConfig, ModelConfig
from mkdt.data import ImageData
from mkdt.errors import ArtifactError
from mkdt.models import build_model, flatten_params
from mkdt.runtime import generator, load_real, progress, rank_and_world, resolve_device, seeded

STAGE = "experts"


@dataclass(frozen=True)
class Trajectory:
    """One expert's saved weights: ``params[i]`` is theta after ``epochs[i]`` epochs."""

    params: torch.Tensor  # (S, P)
    epochs: tuple[int, ...]
    loss: torch.Tensor  # (E,)

    def at(self, epoch: int) -> torch.Tensor:
        if epoch not in self.epochs:
            raise ArtifactError(f"expert epoch {epoch} was not saved (saved: {list(self.epochs)}); "
                                "redo experts with experts.save_epochs including it")
        return self.params[self.epochs.index(epoch)]


def defining(config: Config) -> dict[str, Any]:
    """The targets' definition plus the experts' recipe and the epochs kept."""
    recipe = dataclasses.asdict(config.experts) | {"save_epochs": config.expert_save_epochs()}
    return {"targets": targets_stage.defining(config), "experts": recipe}


def build_student(model: ModelConfig, data: ImageData, out_dim: int) -> nn.Module:
    return build_model(model.arch, in_channels=data.channels, image_size=data.image_size,
                       width=model.width, depth=model.depth, out_dim=out_dim)


def train_expert(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 recipe: ExpertsConfig, save_epochs: list[int], gen: torch.Generator,
                 desc: str | None = None) -> Trajectory:
    """Train ``student`` in place on normalised ``inputs`` (N, C, H, W) -> ``targets`` (N, D)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    n, bs = len(inputs), recipe.batch_size
    saved = [flatten_params(student)] if 0 in save_epochs else []
    losses = []
    student.train()
    for epoch in progress(range(1, recipe.epochs + 1), desc=desc, leave=False, unit="epoch",
                          disable=desc is None):
        perm = torch.randperm(n, generator=gen, device=inputs.device)
        total = torch.zeros((), device=inputs.device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = F.mse_loss(student(inputs[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        losses.append(total.item() / n)
        if epoch in save_epochs:
            saved.append(flatten_params(student))
    return Trajectory(torch.stack(saved).cpu(), tuple(save_epochs), torch.tensor(losses))


def expert_path(run: RunDir, k: int) -> Path:
    return run.stage_dir(STAGE) / f"expert_{k:04d}.safetensors"


def load_expert(run: RunDir, config: Config, k: int) -> Trajectory:
    """Expert k of a run, checked against the config."""
    tensors, meta = load_tensors(expert_path(run, k))
    if meta.get("fingerprint") != fingerprint(defining(config)):
        raise ArtifactError(f"{expert_path(run, k)} was made with a different config; "
                            "use another --out or redo experts with --force")
    return Trajectory(tensors["params"], tuple(tensors["epochs"].tolist()), tensors["loss"])


def _is_current(path: Path, fp: str) -> bool:
    if not path.is_file():
        return False
    try:
        return read_metadata(path).get("fingerprint") == fp  # files are written atomically
    except ArtifactError:
        return False


def run(config: Config, out: str | Path, *, force: bool = False,
        data: ImageData | None = None) -> dict[str, Any]:
    """Stage entry point: train the missing experts of this rank; record the stage when all exist."""
    run_dir = RunDir(out)
    spec = defining(config)
    old = tuple(run_dir.stage_dir(STAGE).glob("expert_*.safetensors"))
    if (done := run_dir.finished_or_reset(STAGE, spec, force, old)) is not None:
        return done
    device = resolve_device(config.device)
    data = data if data is not None else load_real(config)
    z = targets_stage.load_targets(run_dir, config, data.num_train).to(device)
    inputs = data.normalize(data.train_images.to(device))
    e, fp, save_epochs = config.experts, fingerprint(spec), config.expert_save_epochs()
    rank, world = rank_and_world()
    start = time.perf_counter()
    trained = []
    for k in progress(range(rank, e.num_experts, world), desc="experts", unit="expert"):
        path = expert_path(run_dir, k)
        if _is_current(path, fp):
            continue
        t0 = time.perf_counter()
        with seeded(derive_seed(config.seed, "expert-init", k)):
            student = build_student(e.student, data, z.shape[1]).to(device)
        gen = generator(derive_seed(config.seed, "expert-batches", k), device)
        traj = train_expert(student, inputs, z, e, save_epochs, gen, desc=f"expert {k}")
        save_tensors(path, {"params": traj.params, "epochs": torch.tensor(traj.epochs),
                            "loss": traj.loss},
                     {"fingerprint": fp, "index": k, "arch": dataclasses.asdict(e.student),
                      "final_loss": traj.loss[-1].item()})
        trained.append(time.perf_counter() - t0)
    paths = [expert_path(run_dir, k) for k in range(e.num_experts)]
    if rank != 0 or not all(_is_current(p, fp) for p in paths):
        return {}
    sizes = [p.stat().st_size for p in paths]
    final_loss = [read_metadata(p)["final_loss"] for p in paths]
    result = {
        "num_experts": e.num_experts, "save_epochs": save_epochs,
        "mb_per_expert": sum(sizes) / len(sizes) / 2**20, "mb_total": sum(sizes) / 2**20,
        "seconds_per_epoch": sum(trained) / len(trained) / e.epochs if trained else None,
        "final_loss_mean": sum(final_loss) / len(final_loss),
    }
    print(f"experts: {e.num_experts} x {result['mb_per_expert']:.2f} MB on disk, final KD loss "
          f"{result['final_loss_mean']:.4g}" + (f", {result['seconds_per_epoch']:.2f} s/epoch"
                                                if trained else ""))
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)
