"""Stage 5: trajectory matching of KD expert trajectories (MKDT, METHOD.md §2.5).

D_syn starts as the chosen real images (normalised pixels, learned), Z_syn = their teacher
targets (fixed by default), alpha_syn = a learnable step size. Each iteration:

1. draw an expert k uniformly from the K experts and a start epoch s uniformly from {0..T+-1};
2. theta_0 = theta*_{k,s}; for n < N:
   theta_{n+1} = theta_n - alpha_syn * grad L_MSE(f_{theta_n}(x_b), Z_syn[b]) on mini-batches b
   of ``batch_syn`` synthetic images (a fresh random permutation, re-drawn when used up);
3. L_DD = ||theta_N - theta*_{k,s+M}||^2 / ||theta*_{k,s} - theta*_{k,s+M}||^2;
4. back-propagate through all N steps to the pixels and alpha_syn (and Z_syn when learned); SGD
   with momentum on each.

Artifacts in ``distill/``: ``synthetic.safetensors`` (``images`` (n, C, H, W) float32 in the
normalised space of D_real, ``targets`` (n, D) float32, ``lr`` () float32 = alpha_syn; metadata
``mean``/``std`` to map images back to pixels: x * std + mean in [0, 1]), ``grid.png`` (the images,
one per cell) and ``checkpoint.pt`` (resumable state every ``checkpoint_every`` iterations).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mkdt import experts as experts_stage
from mkdt import init as init_stage
from mkdt import targets as targets_stage
from mkdt.artifacts import (
    RunDir,
    atomic_path,
    derive_seed,
    fingerprint,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    save_tensors,
)
from mkdt.config import Config, DistillConfig
from mkdt.data import ImageData
from mkdt.errors import ArtifactError
from mkdt.models import unflatten_params
from mkdt.runtime import generator, load_real, progress, resolve_device

STAGE = "distill"
FILE = "synthetic.safetensors"
_NOT_DEFINING = ("checkpoint_every",)


@dataclass
class SyntheticSet:
    """A distilled set: normalised images, their regression targets and the learned step size."""

    images: torch.Tensor  # (n, C, H, W) float32, normalised like D_real
    targets: torch.Tensor  # (n, D) float32
    lr: float


def defining(config: Config) -> dict[str, Any]:
    recipe = {k: v for k, v in dataclasses.asdict(config.distill).items() if k not in _NOT_DEFINING}
    return {"init": init_stage.defining(config), "distill": recipe}


def sample_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, min(batch_size, n)) indices: consecutive chunks of random permutations of range(n),
    a new permutation drawn whenever one is used up."""
    b = min(batch_size, n)
    per_perm = n // b
    perms = [torch.randperm(n, generator=gen, device=gen.device)[:per_perm * b].view(per_perm, b)
             for _ in range(math.ceil(steps / per_perm))]
    return torch.cat(perms)[:steps]


def unrolled_matching_loss(student: nn.Module, start: torch.Tensor, target: torch.Tensor,
                           images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                           batches: torch.Tensor) -> torch.Tensor:
    """L_DD with the full autograd graph through the N = len(batches) SGD steps.

    Differentiable w.r.t. ``images``, ``targets`` and ``lr``; memory grows linearly with N.
    """
    with torch.enable_grad():  # the inner gradients are needed even under no_grad
        theta = start.detach().requires_grad_(True)
        for idx in batches:
            out = torch.func.functional_call(student, unflatten_params(student, theta), (images[idx],))
            grad = torch.autograd.grad(F.mse_loss(out, targets[idx]), theta, create_graph=True)[0]
            theta = theta - lr * grad
        return (theta - target).pow(2).sum() / (start - target).pow(2).sum()


class Distiller:
    """The trainable synthetic set and its optimizers; one :meth:`step` is one iteration."""

    def __init__(self, student: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 trajectories: list[experts_stage.Trajectory], recipe: DistillConfig,
                 gen: torch.Generator) -> None:
        self.student, self.recipe, self.gen = student, recipe, gen
        self.trajectories = trajectories
        self.images = images.detach().clone().requires_grad_(True)
        self.targets = targets.detach().clone().requires_grad_(recipe.learn_targets)
        self.lr = torch.tensor(recipe.lr_init, device=images.device, requires_grad=True)
        self.opt_images = torch.optim.SGD([self.images], lr=recipe.lr_img, momentum=recipe.momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=recipe.lr_lr, momentum=recipe.momentum)
        self.opt_targets = (torch.optim.SGD([self.targets], lr=recipe.lr_targets,
                                            momentum=recipe.momentum)
                            if recipe.learn_targets else None)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"images": self.opt_images, "lr": self.opt_lr}
        return opts | ({"targets": self.opt_targets} if self.opt_targets is not None else {})

    def draw_segment(self) -> tuple[int, int]:
        """(expert k, start epoch s), uniform over all K experts and {0, ..., T+ - 1}."""
        k = torch.randint(len(self.trajectories), (1,), generator=self.gen, device=self.gen.device)
        s = torch.randint(self.recipe.max_start_epoch, (1,), generator=self.gen, device=self.gen.device)
        return int(k), int(s)

    def step(self) -> float:
        """One iteration: draw (k, s), match the segment, update pixels, alpha_syn (and Z_syn)."""
        r, device = self.recipe, self.images.device
        k, s = self.draw_segment()
        traj = self.trajectories[k]
        start, target = traj.at(s).to(device), traj.at(s + r.expert_epochs).to(device)
        batches = sample_batches(len(self.images), r.batch_syn, r.syn_steps, self.gen).to(device)
        loss = unrolled_matching_loss(self.student, start, target, self.images, self.targets,
                                      self.lr, batches)
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers().values():
            opt.step()
        return loss.item()

    def state(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu(), "targets": self.targets.detach().cpu(),
                "lr": self.lr.detach().cpu(), "generator": self.gen.get_state(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.targets.copy_(state["targets"])
            self.lr.copy_(state["lr"])
        self.gen.set_state(state["generator"])
        for key, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][key])


def save_grid(path: Path, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              max_images: int = 400) -> None:
    """A PNG grid of (up to ``max_images``) normalised images mapped back to pixels."""
    from torchvision.utils import save_image

    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pixels = (images[:max_images].detach().cpu() * s + m).clamp(0, 1)
    nrow = max(1, int(math.sqrt(len(pixels))))
    with atomic_path(path) as tmp:
        save_image(pixels, tmp, nrow=nrow, padding=1, format="png")


def load_synthetic(run: RunDir, config: Config) -> SyntheticSet:
    """The distilled set of a finished distill stage."""
    run.require(STAGE, defining(config), "mkdt distill")
    tensors, _ = load_tensors(run.stage_dir(STAGE) / FILE)
    return SyntheticSet(tensors["images"], tensors["targets"], float(tensors["lr"]))


def run(config: Config, out: str | Path, *, force: bool = False,
        data: ImageData | None = None) -> dict[str, Any]:
    """Stage entry point: distill into ``out/distill``, resuming from its checkpoint."""
    run_dir = RunDir(out)
    spec = defining(config)
    ckpt = run_dir.stage_dir(STAGE) / "checkpoint.pt"
    if (done := run_dir.finished_or_reset(STAGE, spec, force, (ckpt,))) is not None:
        return done
    device = resolve_device(config.device)
    data = data if data is not None else load_real(config)
    r = config.distill
    indices = init_stage.load_indices(run_dir, config)[r.init]
    z = targets_stage.load_targets(run_dir, config, data.num_train)
    images = data.normalize(data.train_images[indices]).to(device)
    trajectories = [experts_stage.load_expert(run_dir, config, k)
                    for k in range(config.experts.num_experts)]
    student = experts_stage.build_student(config.experts.student, data, z.shape[1]).to(device)
    distiller = Distiller(student, images, z[indices].to(device), trajectories, r,
                          generator(derive_seed(config.seed, "distill"), device))
    history: list[float] = []
    start_iter = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        run_dir.check_compatible(STAGE, state, spec)
        distiller.load_state(state["distiller"])
        start_iter, history = state["iteration"], list(state["history"])
    start = time.perf_counter()
    bar = progress(range(start_iter, r.iterations), desc="distill", initial=start_iter,
                   total=r.iterations, unit="it")
    for it in bar:
        history.append(distiller.step())
        if not math.isfinite(history[-1]) or not math.isfinite(distiller.lr.item()):
            raise ArtifactError(f"distillation diverged at iteration {it + 1} (non-finite loss or "
                                "alpha_syn); lower distill.lr_img or distill.lr_lr and rerun with --force")
        bar.set_postfix(loss=f"{history[-1]:.4f}", lr=f"{distiller.lr.item():.4f}")
        if (it + 1) % r.checkpoint_every == 0 or it + 1 == r.iterations:
            save_checkpoint(ckpt, {"distiller": distiller.state(), "iteration": it + 1,
                                   "history": history, "fingerprint": fingerprint(spec),
                                   "defining": spec})
    final = SyntheticSet(distiller.images.detach().cpu(), distiller.targets.detach().cpu(),
                         distiller.lr.item())
    if final.lr <= 0 or not torch.isfinite(final.images).all():
        raise ArtifactError(f"distillation ended with alpha_syn = {final.lr:.4g} or non-finite images; "
                            "lower distill.lr_img or distill.lr_lr and rerun with --force")
    save_tensors(run_dir.stage_dir(STAGE) / FILE,
                 {"images": final.images, "targets": final.targets, "lr": torch.tensor(final.lr)},
                 {"mean": list(data.mean), "std": list(data.std), "iterations": r.iterations})
    save_grid(run_dir.stage_dir(STAGE) / "grid.png", final.images, data.mean, data.std)
    window = max(1, min(50, len(history) // 5))
    result = {"learned_lr": final.lr, "iterations": r.iterations,
              "loss_first": sum(history[:window]) / window,
              "loss_last": sum(history[-window:]) / window,
              "seconds_per_iteration": (time.perf_counter() - start) / max(1, r.iterations - start_iter)}
    print(f"distill: loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} "
          f"(mean of {window} its), learned lr {final.lr:.4f}")
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)
