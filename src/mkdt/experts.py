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

``experts.parallel`` experts are trained at once (:func:`train_experts`: parameters stacked,
ConvNets run as one grouped-convolution network, other students vmapped; 0 = by device,
:data:`AUTO_PARALLEL`). Each keeps its own init, batch order and SGD state, so the result equals
one-at-a-time training within float tolerance (not bitwise: the batched convolutions sum in another
order). It is a runtime choice, not part of the experts' fingerprint: a run may resume with another.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
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
from mkdt.models import ConvNet, build_model, convnet_ensemble, flatten_params
from mkdt.runtime import (
    FastPath,
    fast_path,
    generator,
    load_real,
    progress,
    rank_and_world,
    resolve_device,
    seeded,
)

STAGE = "experts"
_NOT_DEFINING = ("parallel",)
# experts.parallel=0 by device type; elsewhere one at a time (batched measured 0.86x on a 2-core CPU)
AUTO_PARALLEL = {"cuda": 10}


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
    recipe = {k: v for k, v in dataclasses.asdict(config.experts).items() if k not in _NOT_DEFINING}
    recipe["save_epochs"] = config.expert_save_epochs()
    return {"targets": targets_stage.defining(config), "experts": recipe}


def build_student(model: ModelConfig, data: ImageData, out_dim: int) -> nn.Module:
    return build_model(model.arch, in_channels=data.channels, image_size=data.image_size,
                       width=model.width, depth=model.depth, out_dim=out_dim)


def train_expert(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 recipe: ExpertsConfig, save_epochs: list[int], gen: torch.Generator,
                 desc: str | None = None, fast: FastPath | None = None) -> Trajectory:
    """Train ``student`` in place on normalised ``inputs`` (N, C, H, W) -> ``targets`` (N, D).

    ``fast`` (optional) runs the forward pass under its autocast / layout / compile settings; the
    loss, gradients and SGD state stay float32."""
    fast = fast or FastPath(inputs.device)
    optimizer = torch.optim.SGD(student.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    student.train()
    forward = fast.compiled(fast.prepare(student))
    inputs = fast.images(inputs)

    def step(idx: torch.Tensor) -> torch.Tensor:
        with fast.autocast():
            out = forward(inputs[idx[0]])
        loss = F.mse_loss(out.float(), targets[idx[0]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()[None]

    return _fit(step, lambda: flatten_params(student)[None], inputs, recipe, save_epochs, [gen], desc)[0]


def train_experts(students: Sequence[nn.Module], inputs: torch.Tensor, targets: torch.Tensor,
                  recipe: ExpertsConfig, save_epochs: list[int], gens: Sequence[torch.Generator],
                  desc: str | None = None, fast: FastPath | None = None) -> list[Trajectory]:
    """Train same-architecture ``students`` at once, student k drawing its batches from ``gens[k]``.

    Equals ``[train_expert(s, ..., g) for s, g in zip(students, gens)]`` within float tolerance
    (bitwise for one student); the students are updated in place. ``fast``: autocast and layout
    as in :func:`train_expert` (``compile`` applies to one student at a time only).
    """
    fast = fast or FastPath(inputs.device)
    if len(students) != len(gens):
        raise ValueError(f"got {len(students)} students but {len(gens)} generators")
    if len(students) == 1:
        return [train_expert(students[0], inputs, targets, recipe, save_epochs, gens[0], desc, fast)]
    for student in students:
        student.train()
    params, buffers = torch.func.stack_module_state(list(students))  # (E, ...) copies, trained here
    optimizer = torch.optim.SGD(params.values(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)  # elementwise: per student
    losses_of = _stacked_kd_losses(students[0], fast)
    inputs = fast.images(inputs)

    def step(idx: torch.Tensor) -> torch.Tensor:
        losses = losses_of(params, buffers, inputs[idx], targets[idx])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # student k's parameters get exactly the gradient of its own loss
        optimizer.step()
        return losses.detach()

    def snapshot() -> torch.Tensor:
        return torch.cat([p.detach().flatten(1) for p in params.values()], dim=1)

    trajectories = _fit(step, snapshot, inputs, recipe, save_epochs, gens, desc)
    stacked = params | buffers
    with torch.no_grad():
        for k, student in enumerate(students):
            for name, tensor in [*student.named_parameters(), *student.named_buffers()]:
                tensor.copy_(stacked[name][k])
    return trajectories


def _stacked_kd_losses(student: nn.Module, fast: FastPath) -> Callable[..., torch.Tensor]:
    """(stacked params, stacked buffers, x (E, B, ...), y (E, B, D)) -> the (E,) KD losses of E
    students shaped like ``student``: ConvNets run as one grouped network
    (:func:`mkdt.models.convnet_ensemble`); other modules are vmapped over ``functional_call``."""
    if isinstance(student, ConvNet):
        def convnet_losses(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor) -> torch.Tensor:
            with fast.autocast():
                out = convnet_ensemble(p, x, channels_last=fast.channels_last)
            return (out.float() - y).square().mean(dim=(1, 2))
        return convnet_losses
    template = copy.deepcopy(student).to("meta")

    def kd_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        with fast.autocast():
            out = torch.func.functional_call(template, (p, b), (x,))
        return F.mse_loss(out.float(), y)

    return torch.func.vmap(kd_loss)


def _fit(step: Callable[[torch.Tensor], torch.Tensor], snapshot: Callable[[], torch.Tensor],
         inputs: torch.Tensor, recipe: ExpertsConfig, save_epochs: list[int],
         gens: Sequence[torch.Generator], desc: str | None) -> list[Trajectory]:
    """The epoch loop of E students: each epoch student k permutes the N ``inputs`` with ``gens[k]``;
    ``step`` takes the (E, b) indices of one batch, updates every student and returns their (E,)
    mean losses; ``snapshot`` returns the (E, P) flat parameters."""
    n, device = len(inputs), inputs.device
    saved = [snapshot()] if 0 in save_epochs else []
    losses = []
    for epoch in progress(range(1, recipe.epochs + 1), desc=desc, leave=False, unit="epoch",
                          disable=desc is None):
        perms = torch.stack([torch.randperm(n, generator=g, device=device) for g in gens])
        total = torch.zeros(len(gens), device=device)
        for i in range(0, n, recipe.batch_size):
            idx = perms[:, i:i + recipe.batch_size]
            total += step(idx) * idx.shape[1]
        losses.append([t / n for t in total.tolist()])
        if epoch in save_epochs:
            saved.append(snapshot())
    params = torch.stack(saved, dim=1).cpu()  # (E, S, P)
    loss = torch.tensor(losses).T  # (E, epochs)
    return [Trajectory(params[k].clone(), tuple(save_epochs), loss[k].clone()) for k in range(len(gens))]


def _new_expert(config: Config, data: ImageData, out_dim: int, k: int,
                device: torch.device) -> tuple[nn.Module, torch.Generator]:
    """Expert k's fresh student and its batch-order generator, both seeded from ``k``."""
    with seeded(derive_seed(config.seed, "expert-init", k)):
        student = build_student(config.experts.student, data, out_dim).to(device)
    return student, generator(derive_seed(config.seed, "expert-batches", k), device)


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
    fast = fast_path(config, device)
    inputs = fast.images(data.normalize(data.train_images.to(device)))  # laid out once, not per group
    e, fp, save_epochs = config.experts, fingerprint(spec), config.expert_save_epochs()
    rank, world = rank_and_world()
    parallel = e.parallel or AUTO_PARALLEL.get(device.type, 1)
    todo = [k for k in range(rank, e.num_experts, world) if not _is_current(expert_path(run_dir, k), fp)]
    start = time.perf_counter()
    seconds = 0.0
    groups = [todo[i:i + parallel] for i in range(0, len(todo), parallel)]
    for group in progress(groups, desc="experts", unit="group"):
        t0 = time.perf_counter()
        students, gens = zip(*(_new_expert(config, data, z.shape[1], k, device) for k in group),
                             strict=True)
        desc = ("expert " if len(group) == 1 else "experts ") + ", ".join(map(str, group))
        trajectories = train_experts(students, inputs, z, e, save_epochs, gens, desc, fast)
        for k, traj in zip(group, trajectories, strict=True):
            save_tensors(expert_path(run_dir, k),
                         {"params": traj.params, "epochs": torch.tensor(traj.epochs), "loss": traj.loss},
                         {"fingerprint": fp, "index": k, "arch": dataclasses.asdict(e.student),
                          "final_loss": traj.loss[-1].item()})
        seconds += time.perf_counter() - t0
    paths = [expert_path(run_dir, k) for k in range(e.num_experts)]
    if rank != 0 or not all(_is_current(p, fp) for p in paths):
        return {}
    sizes = [p.stat().st_size for p in paths]
    final_loss = [read_metadata(p)["final_loss"] for p in paths]
    result = {
        "num_experts": e.num_experts, "save_epochs": save_epochs,
        "mb_per_expert": sum(sizes) / len(sizes) / 2**20, "mb_total": sum(sizes) / 2**20,
        "parallel": parallel,
        "seconds_per_epoch": seconds / len(todo) / e.epochs if todo else None,  # per expert
        "final_loss_mean": sum(final_loss) / len(final_loss),
    }
    print(f"experts: {e.num_experts} x {result['mb_per_expert']:.2f} MB on disk, final KD loss "
          f"{result['final_loss_mean']:.4g}" + (f", {result['seconds_per_epoch']:.2f} s/epoch"
                                                f" per expert, {parallel} at once" if todo else ""))
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)
