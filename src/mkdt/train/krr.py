"""KRR-ST (Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning", ICLR 2024;
docs/method.md §2.7): synthetic images and target representations learned by kernel ridge
regression on the features of a pool of students trained on the synthetic set.

State: ``X_syn`` (n images, learned in 0-1 pixel units and shown to the networks normalised),
``Y_syn`` (n, D) targets (learned), a pool of ``num_models`` students (:class:`StudentPool`). One
outer step (:meth:`KRRDistiller.step`):

1. draw a pool member f uniformly;
2. draw ``outer_batch_size`` real images and their targets ``Y_real`` (the caller's
   :data:`RealBatch`: the teacher's features of augmented images, or precomputed targets);
3. :func:`krr_loss` of f's features (eval mode) of ``X_syn`` (differentiated) and of the real batch;
4. one AdamW step on ``X_syn`` and ``Y_syn`` (the learning rate decays linearly from ``outer_lr``
   to ``outer_lr / 1000`` over the iterations);
5. f takes one full-batch SGD step on the MSE between its outputs on ``X_syn`` and ``Y_syn``
   (both detached), or, once it has taken ``online_iterations`` steps, is replaced by a freshly
   initialised student (which then trains again from 0 steps).

Before the first step each member trains for a random number of steps in [1, online_iterations)
(:meth:`StudentPool.warm_up`). Every random choice comes from two seeded generators: the pool's
(on the CPU: members, warm-up lengths) and the step's (on the device: real batches, augmentation);
a member's k-th initialisation is made under a seed the caller derives from (member, k).
:func:`krr_distill` runs the steps with periodic checkpoints of the whole state, so a resumed run
ends with the same bits as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.errors import ArtifactError
from mkdt.nn.models import features_of
from mkdt.runtime import Runtime, progress
from mkdt.train.checkpoint import PeriodicCheckpoint

FINAL_LR_FACTOR = 1e-3
"""The outer learning rate after the last iteration, as a fraction of ``outer_lr`` (the release's
``LinearLR(start_factor=1, end_factor=1e-3)``)."""


@dataclass(frozen=True, kw_only=True)
class KRRRecipe:
    """KRR-ST's math (how it is computed -- device, checkpoints, logging -- is passed apart).

    - ``iterations``: outer steps.
    - ``num_models``: students in the pool.
    - ``online_iterations``: SGD steps a student takes on the synthetic set before it is replaced
      (its warm-up draws a count in [1, online_iterations)); at least 2.
    - ``online_lr``, ``online_momentum``, ``online_weight_decay``: the students' SGD.
    - ``outer_lr``: AdamW learning rate of the images (in 0-1 pixel units) and targets, decayed
      linearly to ``outer_lr * FINAL_LR_FACTOR`` over the iterations; no weight decay.
    - ``outer_batch_size``: real images per outer step (at most |D_real|).
    - ``ridge``: the kernel ridge, relative to the trace of the synthetic kernel.
    """

    iterations: int
    num_models: int
    online_iterations: int
    online_lr: float
    online_momentum: float
    online_weight_decay: float
    outer_lr: float
    outer_batch_size: int
    ridge: float


def krr_loss(
    syn_features: torch.Tensor,
    syn_targets: torch.Tensor,
    real_features: torch.Tensor,
    real_targets: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """The KRR-ST outer loss: kernel ridge regression fitted on the synthetic set, scored on the
    real batch.

    With F_s = [syn_features, 1] (n, d + 1), F_r = [real_features, 1] (m, d + 1) (a constant
    column appended: a bias), K_ss = F_s F_s^T, K_rs = F_r F_s^T and
    lambda = ridge * trace(K_ss) (treated as a constant, not differentiated)::

        L = 1/(m D) * || K_rs (K_ss + lambda I)^{-1} Y_syn - Y_real ||_F^2

    Differentiable w.r.t. every argument but ``ridge``; float32 or float64."""
    ones_s = syn_features.new_ones(len(syn_features), 1)
    ones_r = real_features.new_ones(len(real_features), 1)
    f_s = torch.cat([syn_features, ones_s], dim=1)
    f_r = torch.cat([real_features, ones_r], dim=1)
    k_ss = f_s @ f_s.T
    k_rs = f_r @ f_s.T
    lam = ridge * torch.trace(k_ss.detach())
    eye = torch.eye(len(k_ss), dtype=k_ss.dtype, device=k_ss.device)
    weights = torch.linalg.solve(k_ss + lam * eye, syn_targets)
    return F.mse_loss(k_rs @ weights, real_targets)


StudentMaker = Callable[[int, int], nn.Module]
"""(member index i, generation k) -> a fresh student for member i's k-th initialisation, on the
synthetic set's device; the same arguments give the same weights (seeded by the caller)."""
RealBatch = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""(indices into D_real (b,), the step's generator) -> (network inputs (b, C, H, W), their targets
(b, D)) of that real batch, any augmentation drawn from the generator."""


class StudentPool:
    """The students KRR-ST takes its features from, each with its SGD optimizer, the steps it has
    taken on the synthetic set and how many times it was initialised.

    ``make(i, k)`` builds member i's k-th initialisation (:data:`StudentMaker`); ``gen`` (a CPU
    generator) draws the members and the warm-up lengths, so drawing never waits for a device."""

    def __init__(self, make: StudentMaker, recipe: KRRRecipe, gen: torch.Generator) -> None:
        self.make, self.recipe, self.gen = make, recipe, gen
        self.models = [make(i, 0) for i in range(recipe.num_models)]
        self.optimizers = [self._optimizer(model) for model in self.models]
        self.steps = [0] * recipe.num_models
        self.generations = [0] * recipe.num_models

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        r = self.recipe
        return torch.optim.SGD(
            model.parameters(), lr=r.online_lr, momentum=r.online_momentum, weight_decay=r.online_weight_decay
        )

    def draw(self) -> int:
        """A member index, uniform over the pool."""
        return int(torch.randint(self.recipe.num_models, (1,), generator=self.gen).item())

    def _train_step(self, i: int, images: torch.Tensor, targets: torch.Tensor, runtime: Runtime) -> None:
        """Member i's full-batch SGD step on the MSE of its outputs to ``targets``."""
        model, optimizer = self.models[i], self.optimizers[i]
        model.train()
        with runtime.autocast():
            out = model(runtime.images(images))
        loss = F.mse_loss(out.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def warm_up(self, images: torch.Tensor, targets: torch.Tensor, runtime: Runtime) -> None:
        """Train member i for s_i ~ U{1, ..., online_iterations - 1} steps on the synthetic set
        (the release's start: the members are at different points of their training)."""
        counts = torch.randint(1, self.recipe.online_iterations, (len(self.models),), generator=self.gen)
        for i, count in enumerate(progress(counts.tolist(), desc="krr_st: warm-up", leave=False)):
            for _ in range(count):
                self._train_step(i, images, targets, runtime)
            self.steps[i] = count

    def update(self, i: int, images: torch.Tensor, targets: torch.Tensor, runtime: Runtime) -> None:
        """After an outer step that used member i: one SGD step on the synthetic set, or, when it
        has taken ``online_iterations`` steps, its next initialisation (with its step count reset:
        the release keeps the count, so that member is re-initialised at every later draw)."""
        if self.steps[i] < self.recipe.online_iterations:
            self._train_step(i, images, targets, runtime)
            self.steps[i] += 1
            return
        self.generations[i] += 1
        self.models[i] = self.make(i, self.generations[i])
        self.optimizers[i] = self._optimizer(self.models[i])
        self.steps[i] = 0

    def state_dict(self) -> dict[str, Any]:
        """Every member's weights, optimizer state, step count and generation, and the generator."""
        return {
            "models": [model.state_dict() for model in self.models],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "steps": list(self.steps),
            "generations": list(self.generations),
            "generator": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        for i, model in enumerate(self.models):
            model.load_state_dict(state["models"][i])
            self.optimizers[i].load_state_dict(state["optimizers"][i])
        self.steps, self.generations = list(state["steps"]), list(state["generations"])
        self.gen.set_state(state["generator"])


class KRRDistiller:
    """The learned synthetic set (images, targets), its AdamW optimizer and schedule, and the
    :class:`StudentPool`; :meth:`step` is one outer step.

    ``images`` are network inputs, normalised with ``mean``/``std`` (per channel) as D_real is:
    they are learned as pixels u = x * std + mean (the release's Adam steps are in 0-1 pixel
    units) and shown to the networks as (u - mean) / std. ``real_batch`` maps drawn indices into
    D_real (``num_real`` images) to a real batch; ``gen`` (on the device) draws those indices and
    any augmentation. ``runtime`` runs the forward passes under its autocast; features, kernels,
    losses and updates are float32."""

    def __init__(
        self,
        *,
        pool: StudentPool,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        num_real: int,
        real_batch: RealBatch,
        gen: torch.Generator,
        runtime: Runtime | None = None,
    ) -> None:
        self.pool, self.recipe, self.gen = pool, pool.recipe, gen
        self.num_real, self.real_batch = num_real, real_batch
        self.runtime = runtime or Runtime(images.device)
        self.mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        self.pixels = (images.detach() * self.std + self.mean).requires_grad_(True)
        self.targets = targets.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            [self.pixels, self.targets], lr=self.recipe.outer_lr, weight_decay=0
        )
        self.schedule = torch.optim.lr_scheduler.LinearLR(
            self.optimizer, start_factor=1.0, end_factor=FINAL_LR_FACTOR, total_iters=self.recipe.iterations
        )

    def images(self) -> torch.Tensor:
        """The synthetic images as network inputs (normalised), differentiable w.r.t. the pixels."""
        return (self.pixels - self.mean) / self.std

    def _features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return features_of(model)(self.runtime.images(x)).float()

    def step(self) -> torch.Tensor:
        """One outer step (module docstring); the KRR loss before the update, 0-dim on the device."""
        i = self.pool.draw()
        g = self.gen
        idx = torch.randperm(self.num_real, generator=g, device=g.device)[: self.recipe.outer_batch_size]
        real_inputs, real_targets = self.real_batch(idx.to(self.pixels.device), g)
        model = self.pool.models[i].eval()
        with torch.no_grad():
            real_features = self._features(model, real_inputs)
        loss = krr_loss(
            self._features(model, self.images()), self.targets, real_features, real_targets, self.recipe.ridge
        )
        self.pixels.grad, self.targets.grad = torch.autograd.grad(loss, [self.pixels, self.targets])
        self.optimizer.step()
        self.schedule.step()
        self.pool.update(i, self.images().detach(), self.targets.detach(), self.runtime)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """The set (pixels, targets), the optimizer, schedule, generator and pool (a plain dict)."""
        return {
            "pixels": self.pixels.detach().cpu(),
            "targets": self.targets.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "generator": self.gen.get_state(),
            "pool": self.pool.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        with torch.no_grad():
            self.pixels.copy_(state["pixels"])
            self.targets.copy_(state["targets"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.gen.set_state(state["generator"])
        self.pool.load_state_dict(state["pool"])


@dataclass
class KRRRun:
    """What :func:`krr_distill` did: the loss of every iteration (resumed ones included) and the
    timings of this process."""

    losses: list[float]
    iterations_run: int
    seconds: float


def _read_back(losses: list[float], pending: list[torch.Tensor], done: int) -> None:
    """Append the losses waiting on the device; ArtifactError when one is not finite."""
    new = torch.stack(pending).tolist()
    losses += new
    pending.clear()
    if not all(map(math.isfinite, new)):
        raise ArtifactError(
            f"KRR-ST diverged by iteration {done} (non-finite loss); lower krr_st.outer_lr or "
            "raise krr_st.ridge and rerun with --force"
        )


def krr_distill(distiller: KRRDistiller, checkpoint: PeriodicCheckpoint, *, log_every: int) -> KRRRun:
    """Run ``distiller`` for ``recipe.iterations`` outer steps, resuming from ``checkpoint``
    (which holds the distiller's whole state, the iteration and the losses); a fresh run first
    warms the pool up. Losses are read back from the device every ``log_every`` iterations and at
    each checkpoint; a non-finite one raises ArtifactError naming the options to change."""
    r = distiller.recipe
    resumed = checkpoint.resume({"distiller": distiller})
    start_iter, losses = resumed.get("iteration", 0), list(resumed.get("losses", []))
    start = time.perf_counter()
    if start_iter == 0:
        distiller.pool.warm_up(distiller.images().detach(), distiller.targets.detach(), distiller.runtime)
    pending: list[torch.Tensor] = []
    bar = progress(range(start_iter, r.iterations), desc="krr_st", initial=start_iter, total=r.iterations)
    for it in bar:
        pending.append(distiller.step())
        done = it + 1
        save = checkpoint.due(done, r.iterations)
        if save or done % log_every == 0 or done == r.iterations:
            _read_back(losses, pending, done)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if save:
            checkpoint.save({"distiller": distiller}, iteration=done, losses=losses)
    return KRRRun(losses, r.iterations - start_iter, time.perf_counter() - start)
