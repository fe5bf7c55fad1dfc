"""The KD training loop and encoding: students regress teacher targets; encoders give features.

One loop trains every KD student in mkdt: the expert trajectories and the evaluation's
pre-training. It minimises :class:`~mkdt.nn.losses.KDLoss` with SGD (momentum, weight decay), no
augmentation, batches from a seeded permutation of the inputs each epoch, and returns the
:class:`Trajectory` of flat parameter vectors after the requested epochs.

:func:`train_students` trains E same-architecture students at once (parameters stacked; ConvNets
run as one grouped-convolution network, :func:`mkdt.nn.models.convnet_ensemble`, other students
through ``torch.func.vmap``); each keeps its own init, batch order and SGD state, so the result
equals E calls of :func:`train_student` within float tolerance (not bitwise: the batched
convolutions sum in another order). With ``lrs`` each student takes its own step size (the
evaluation's grid of step sizes trained together), and ``on_divergence="keep"`` lets the others
finish when one diverges.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mkdt.errors import ArtifactError, TrainingDiverged
from mkdt.nn.losses import KDLoss
from mkdt.nn.models import ConvNet, convnet_ensemble, features_of, flatten_params
from mkdt.runtime import Runtime, progress

DIVERGENCE_POLICIES = ("raise", "keep")


@dataclass(frozen=True, kw_only=True)
class KDRecipe:
    """How a KD student is trained (the loop's math only; progress and devices are passed apart).

    - ``epochs``: passes over the inputs (count).
    - ``lr``: SGD learning rate (step size, constant over the epochs).
    - ``momentum``: SGD momentum (dimensionless, in [0, 1)).
    - ``weight_decay``: SGD weight decay (adds ``weight_decay * theta`` to the gradient).
    - ``batch_size``: images per step (the last batch of an epoch may be smaller).
    """

    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256


@dataclass(frozen=True)
class Trajectory:
    """One student's saved weights: ``params[i]`` is theta after ``epochs[i]`` epochs."""

    params: torch.Tensor  # (S, P)
    epochs: tuple[int, ...]
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (epochs trained,)

    @property
    def diverged(self) -> bool:
        """True when some epoch's loss is non-finite (kept by ``on_divergence="keep"``): its
        weights are then meaningless and the caller leaves the student out."""
        return not bool(torch.isfinite(self.loss).all())

    def at(self, epoch: int) -> torch.Tensor:
        """theta after ``epoch`` epochs; ArtifactError if that epoch was not saved."""
        if epoch not in self.epochs:
            raise ArtifactError(
                f"expert epoch {epoch} was not saved (saved: {list(self.epochs)}); "
                "redo experts with experts.save_epochs including it"
            )
        return self.params[self.epochs.index(epoch)]


def train_student(
    student: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    recipe: KDRecipe,
    save_epochs: Sequence[int],
    gen: torch.Generator,
    desc: str | None = None,
    runtime: Runtime | None = None,
    lr_key: str = "the learning rate",
    on_divergence: str = "raise",
) -> Trajectory:
    """Train ``student`` in place on normalised ``inputs`` (N, C, H, W) -> ``targets`` (N, D).

    ``runtime`` (optional) runs the forward pass under its autocast / layout / compile settings;
    the loss, gradients and SGD state stay float32. A non-finite epoch loss raises TrainingDiverged
    advising to lower ``lr_key`` (the config key of the learning rate), or with
    ``on_divergence="keep"`` training goes on and the Trajectory is :attr:`~Trajectory.diverged`."""
    runtime = runtime or Runtime(inputs.device)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    student.train()
    forward = runtime.compiled(runtime.prepare(student))
    inputs = runtime.images(inputs)
    kd_loss = KDLoss()

    def step(idx: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            out = forward(inputs[idx[0]])
        loss = kd_loss(out, targets[idx[0]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()[None]

    def snapshot() -> torch.Tensor:
        return flatten_params(student)[None]

    return _fit(step, snapshot, inputs, recipe, save_epochs, [gen], desc, lr_key, on_divergence)[0]


def train_students(
    students: Sequence[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    recipe: KDRecipe,
    save_epochs: Sequence[int],
    gens: Sequence[torch.Generator],
    desc: str | None = None,
    runtime: Runtime | None = None,
    lr_key: str = "the learning rate",
    *,
    lrs: Sequence[float] | None = None,
    on_divergence: str = "raise",
) -> list[Trajectory]:
    """Train same-architecture ``students`` at once, student k drawing its batches from ``gens[k]``.

    Equals ``[train_student(s, ..., g) for s, g in zip(students, gens)]`` within float tolerance
    (bitwise for one student); the students are updated in place. ``runtime``: autocast and layout
    as in :func:`train_student` (``compile`` applies to one student at a time only).

    ``lrs`` (optional): student k's step size ``lrs[k]`` instead of ``recipe.lr`` (momentum and
    weight decay from ``recipe``), so the result equals ``train_student`` with ``recipe.lr =
    lrs[k]`` within float tolerance. The stacked SGD runs at step size 1 on the scaled gradient
    ``g'_k = lrs[k] * (g_k + weight_decay * theta_k)``, so its momentum buffer
    ``b'_k <- momentum * b'_k + g'_k`` stays ``lrs[k]`` times SGD's ``b_k <- momentum * b_k + g_k +
    weight_decay * theta_k`` and its update ``theta_k -= b'_k`` is SGD's ``theta_k -= lrs[k] * b_k``
    (exact in real arithmetic).

    ``on_divergence``: ``"raise"`` (default) raises TrainingDiverged for the whole batch when
    some student's epoch loss is non-finite; ``"keep"`` trains on and returns that student's
    Trajectory :attr:`~Trajectory.diverged` (the epoch's loss non-finite), for the caller to
    leave out. The other students are unaffected: every operation acts per student.
    """
    runtime = runtime or Runtime(inputs.device)
    if len(students) != len(gens):
        raise ValueError(f"got {len(students)} students but {len(gens)} generators")
    if lrs is not None and len(lrs) != len(students):
        raise ValueError(f"got {len(students)} students but {len(lrs)} step sizes")
    if len(students) == 1:
        own = recipe if lrs is None else dataclasses.replace(recipe, lr=lrs[0])
        return [
            train_student(
                students[0], inputs, targets, own, save_epochs, gens[0], desc, runtime, lr_key, on_divergence
            )
        ]
    for student in students:
        student.train()
    params, buffers = torch.func.stack_module_state(list(students))  # (E, ...) copies, trained here
    optimizer, scale_gradients = _stacked_sgd(params, recipe, lrs)  # elementwise: per student
    losses_of = _stacked_kd_losses(students[0], runtime)
    inputs = runtime.images(inputs)

    def step(idx: torch.Tensor) -> torch.Tensor:
        losses = losses_of(params, buffers, inputs[idx], targets[idx])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # student k's parameters get exactly the gradient of its own loss
        scale_gradients()
        optimizer.step()
        return losses.detach()

    def snapshot() -> torch.Tensor:
        return torch.cat([p.detach().flatten(1) for p in params.values()], dim=1)

    trajectories = _fit(step, snapshot, inputs, recipe, save_epochs, gens, desc, lr_key, on_divergence)
    stacked = params | buffers
    with torch.no_grad():
        for k, student in enumerate(students):
            for name, tensor in [*student.named_parameters(), *student.named_buffers()]:
                tensor.copy_(stacked[name][k])
    return trajectories


def _stacked_sgd(
    params: dict[str, torch.Tensor], recipe: KDRecipe, lrs: Sequence[float] | None
) -> tuple[torch.optim.SGD, Callable[[], None]]:
    """(optimizer, scale_gradients) for stacked (E, ...) ``params``: without ``lrs`` the recipe's SGD
    and a no-op; with ``lrs`` SGD at step size 1 without weight decay, and a function that
    replaces each gradient g of student k by ``lrs[k] * (g + weight_decay * theta)`` (see
    :func:`train_students`), to call between ``backward`` and ``step``."""
    if lrs is None:
        sgd = torch.optim.SGD(
            params.values(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
        return sgd, lambda: None
    sgd = torch.optim.SGD(params.values(), lr=1.0, momentum=recipe.momentum, weight_decay=0.0)
    first = next(iter(params.values()))
    step_sizes = torch.tensor(lrs, dtype=first.dtype, device=first.device)

    @torch.no_grad()
    def scale_gradients() -> None:
        for p in params.values():
            if p.grad is not None:
                p.grad.add_(p, alpha=recipe.weight_decay).mul_(step_sizes.view(-1, *[1] * (p.dim() - 1)))

    return sgd, scale_gradients


StackedLosses = Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor
]


def _stacked_kd_losses(student: nn.Module, runtime: Runtime) -> StackedLosses:
    """(stacked params, stacked buffers, x (E, B, ...), y (E, B, D)) -> the (E,) KD losses of E
    students shaped like ``student``: ConvNets run as one grouped network
    (:func:`mkdt.nn.models.convnet_ensemble`); other modules are vmapped over ``functional_call``."""
    if isinstance(student, ConvNet):
        per_member = KDLoss("per_member")

        def convnet_losses(
            p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            with runtime.autocast():
                out = convnet_ensemble(p, x, channels_last=runtime.channels_last)
            return per_member(out, y)

        return convnet_losses
    template = copy.deepcopy(student).to("meta")
    mean = KDLoss()

    def kd_loss(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        with runtime.autocast():
            out = torch.func.functional_call(template, (p, b), (x,))
        return mean(out, y)

    vmapped: StackedLosses = torch.func.vmap(kd_loss)
    return vmapped


def _fit(
    step: Callable[[torch.Tensor], torch.Tensor],
    snapshot: Callable[[], torch.Tensor],
    inputs: torch.Tensor,
    recipe: KDRecipe,
    save_epochs: Sequence[int],
    gens: Sequence[torch.Generator],
    desc: str | None,
    lr_key: str,
    on_divergence: str = "raise",
) -> list[Trajectory]:
    """The epoch loop of E students: each epoch student k permutes the N ``inputs`` with ``gens[k]``;
    ``step`` takes the (E, b) indices of one batch, updates every student and returns their (E,)
    mean losses; ``snapshot`` returns the (E, P) flat parameters. A non-finite epoch loss raises
    TrainingDiverged advising to lower ``lr_key``, or with ``on_divergence="keep"`` is recorded
    in that student's Trajectory.loss while every student trains on."""
    if on_divergence not in DIVERGENCE_POLICIES:
        raise ValueError(f"on_divergence must be one of {DIVERGENCE_POLICIES}, got {on_divergence!r}")
    n, device = len(inputs), inputs.device
    saved = [snapshot()] if 0 in save_epochs else []
    losses = []
    for epoch in progress(
        range(1, recipe.epochs + 1), desc=desc, leave=False, unit="epoch", disable=desc is None
    ):
        perms = torch.stack([torch.randperm(n, generator=g, device=device) for g in gens])
        total = torch.zeros(len(gens), device=device)
        for i in range(0, n, recipe.batch_size):
            idx = perms[:, i : i + recipe.batch_size]
            total += step(idx) * idx.shape[1]
        losses.append([t / n for t in total.tolist()])
        if on_divergence == "raise" and not all(map(math.isfinite, losses[-1])):
            raise TrainingDiverged(
                f"KD training{f' ({desc})' if desc else ''} diverged in epoch {epoch} "
                f"(non-finite KD loss); lower {lr_key}"
            )
        if epoch in save_epochs:
            saved.append(snapshot())
    params = torch.stack(saved, dim=1).cpu()  # (E, S, P)
    loss = torch.tensor(losses).T  # (E, epochs)
    return [Trajectory(params[k].clone(), tuple(save_epochs), loss[k].clone()) for k in range(len(gens))]


@torch.no_grad()
def encode(
    encoder: nn.Module,
    inputs: torch.Tensor,
    batch_size: int,
    desc: str | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``encoder.features`` of ``inputs`` in eval mode, in batches: (N, D) float32 on the CPU.

    ``inputs`` are network inputs on the encoder's device, or uint8 images together with
    ``normalize`` (applied batch by batch, so the float copy of a large set is never made)."""
    encoder.eval()
    features = features_of(encoder)
    chunks = range(0, len(inputs), batch_size)
    out = []
    for i in progress(chunks, desc=desc, leave=False, disable=desc is None):
        batch = inputs[i : i + batch_size]
        out.append(features(normalize(batch) if normalize else batch).float())
    return torch.cat(out).cpu()
