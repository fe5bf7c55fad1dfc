"""Trajectory matching (docs/method.md, "Distillation"): the gradient of the matching loss through
N inner SGD steps on the synthetic set, two ways, and the loop that optimises the set.

One iteration draws B segments (expert k, start epoch s), starts a student at theta*_{k,s}, takes
N steps theta_{n+1} = theta_n - alpha_syn * grad L_in(theta_n; x_b, z_b) on synthetic mini-batches
(images x, targets z), and scores theta_N with :func:`~mkdt.nn.losses.matching_distance` against
theta*_{k,s+M}. The inner loss L_in is an argument (:data:`InnerLoss`); by default it is the KD loss
KDLoss(f_theta(x_b), z_b) (:func:`kd_inner_loss`), and ``mkdt analyze mtt`` passes its SSL and
cross-entropy losses. The gradient with respect to the pixels, alpha_syn (and Z_syn when learned)
comes from one of two backends with the same values:

- ``unrolled`` (:func:`unrolled_matching_loss`): the full autograd graph (memory grows with N);
- ``recompute`` (:func:`recompute_matching_grads`): keeps only the N + 1 parameter vectors and
  rebuilds one step at a time in reverse, with Hessian-vector products (memory independent of N).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mkdt.errors import ArtifactError
from mkdt.nn.losses import KDLoss, matching_distance
from mkdt.nn.models import unflatten_params
from mkdt.runtime import Runtime, progress
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.kd import Trajectory

_GRAPH_FACTOR = 2  # measured with benchmarks/distill.py (1.6-1.8 on CPU for ConvNetD3), see BENCHMARKS.md
_PER_MEMBER = KDLoss("per_member")
Autocast = Callable[[], Any]


@dataclass(frozen=True, kw_only=True)
class MatchingRecipe:
    """The matching problem and its optimisation (the math; how it is computed -- the backend, how
    often the loss is read back, checkpoints -- is passed apart)."""

    iterations: int  # iterations of :func:`distill`
    syn_steps: int  # N: inner SGD steps per segment
    expert_epochs: int  # M: the expert epochs a segment spans (theta*_s -> theta*_{s+M})
    max_start_epoch: int  # T+: segments start at an epoch s in [0, T+)
    batch_syn: int  # synthetic images per inner step (at most the set's size)
    lr_img: float  # SGD learning rate of the pixels
    lr_lr: float  # SGD learning rate of alpha_syn
    lr_init: float  # initial alpha_syn
    momentum: float  # SGD momentum of every optimizer of the set
    learn_targets: bool  # whether Z_syn is learned
    lr_targets: float  # SGD learning rate of Z_syn when learned
    trajectories: int  # B: segments matched per iteration (their losses averaged)


InnerLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(student, theta (B, P), x (B, b, C, H, W), z (B, b, ...), step n) -> the sum over the B segments
of segment b's inner loss at parameters theta_b on its batch (x_b, z_b), so that its gradient w.r.t.
theta gives each segment its own. A fixed function of its arguments: the ``recompute`` backend
rebuilds step n from them. z is whatever the loss regresses or classifies on (a loss may ignore it)."""
InnerLossMaker = Callable[[torch.Tensor, torch.Generator], InnerLoss]
"""(an iteration's batches (N, B, b), the generator) -> that iteration's :data:`InnerLoss`, its
randomness (e.g. augmentation parameters) drawn from the generator once."""


def sample_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, min(batch_size, n)) indices: consecutive chunks of random permutations of range(n),
    a new permutation drawn whenever one is used up."""
    b = min(batch_size, n)
    per_perm = n // b
    perms = [
        torch.randperm(n, generator=gen, device=gen.device)[: per_perm * b].view(per_perm, b)
        for _ in range(math.ceil(steps / per_perm))
    ]
    return torch.cat(perms)[:steps]


def kd_inner_loss(
    student: nn.Module, theta: torch.Tensor, x: torch.Tensor, z: torch.Tensor, n: int
) -> torch.Tensor:
    """The distillation's :data:`InnerLoss`: sum_b KDLoss(f_{theta_b}(x_b), z_b) (the mean squared
    error to the teacher targets z; the step n is not used).

    ``theta`` (B, P), ``x`` (B, b, C, H, W), ``z`` (B, b, D). B > 1 runs the students with
    ``torch.func.vmap``. Buffers (batch-norm running statistics, which a training-mode forward
    updates but never reads) get one scratch copy per segment there, so vmap can update them.
    """
    if theta.shape[0] == 1:
        out = torch.func.functional_call(student, unflatten_params(student, theta[0]), (x[0],))[None]
    else:
        buffers = {name: b.expand(len(theta), *b.shape).clone() for name, b in student.named_buffers()}

        def forward(t: torch.Tensor, buf: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(student, (unflatten_params(student, t), buf), (xb,))

        out = torch.func.vmap(forward)(theta, buffers, x)
    return _PER_MEMBER(out, z).sum()


def _segment_grads(
    student: nn.Module,
    theta: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    create_graph: bool,
    inner_loss: InnerLoss,
    n: int,
) -> torch.Tensor:
    """Inner gradients g_b = grad_theta L_in(theta_b; x_b, z_b) of B segments at step n at once:
    ``theta`` (B, P), ``x`` (B, b, C, H, W), ``z`` (B, b, ...) -> (B, P)."""
    loss = inner_loss(student, theta, x, z, n)
    return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


def _as_segments(
    start: torch.Tensor, target: torch.Tensor, batches: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept one segment ((P,), (P,), (N, b)) or B segments ((B, P), (B, P), (N, B, b))."""
    if start.dim() == 1:
        return start[None], target[None], batches[:, None]
    return start, target, batches


def unrolled_matching_loss(
    student: nn.Module,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    batches: torch.Tensor,
    autocast: Autocast = nullcontext,
    inner_loss: InnerLoss = kd_inner_loss,
) -> torch.Tensor:
    """L_DD with the full autograd graph through the N = len(batches) SGD steps on ``inner_loss``
    (the reference).

    One segment (``start``/``target`` (P,), ``batches`` (N, b)) or B segments ((B, P), (N, B, b)),
    whose losses are averaged. Differentiable w.r.t. ``images``, ``targets`` and ``lr``; memory
    grows linearly with N.
    """
    start, target, batches = _as_segments(start, target, batches)
    with torch.enable_grad():  # the inner gradients are needed even under no_grad
        theta = start.detach().requires_grad_(True)
        for n, idx in enumerate(batches):
            with autocast():
                grad = _segment_grads(student, theta, images[idx], targets[idx], True, inner_loss, n)
            theta = theta - lr * grad
        return matching_distance(theta, start, target)


def inner_steps(
    student: nn.Module,
    start: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    batches: torch.Tensor,
    autocast: Autocast = nullcontext,
    inner_loss: InnerLoss = kd_inner_loss,
) -> torch.Tensor:
    """theta_N of the inner loop of one segment, without a graph: from ``start`` (P,), N =
    len(batches) steps theta_{n+1} = theta_n - lr * grad L_in(theta_n; images[b_n], targets[b_n])
    (``batches`` (N, b); ``inner_loss`` is called with B = 1), exactly the steps the distillation
    differentiates through (for replaying a finished set, or searching a step size)."""
    theta = start.detach()
    for n, idx in enumerate(batches):
        with torch.enable_grad():
            theta = theta.requires_grad_(True)
            with autocast():
                x, z = images[idx][None], targets[idx][None]
                grad = _segment_grads(student, theta[None], x, z, False, inner_loss, n)[0]
        theta = (theta - lr * grad).detach()
    return theta


@dataclass
class MatchingGrads:
    """L_DD and its gradients w.r.t. the synthetic images, targets and step size."""

    loss: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor | None
    lr: torch.Tensor


def recompute_matching_grads(
    student: nn.Module,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    batches: torch.Tensor,
    learn_targets: bool = False,
    autocast: Autocast = nullcontext,
    inner_loss: InnerLoss = kd_inner_loss,
) -> MatchingGrads:
    """The exact gradient of :func:`unrolled_matching_loss` in memory independent of N.

    Forward: theta_{n+1} = theta_n - alpha g_n(theta_n) without a graph, keeping the N + 1 parameter
    vectors. Reverse, with lambda_N = dL/dtheta_N = 2 (theta_N - theta*) / ||theta*_s - theta*||^2 / B
    and, for n = N-1 .. 0, the step's graph rebuilt from theta_n alone:
    dL/dalpha -= <lambda_{n+1}, g_n>; dL/d(x, z)[b_n] -= alpha (dg_n/d(x, z))^T lambda_{n+1};
    lambda_n = lambda_{n+1} - alpha H_n lambda_{n+1} (one double-backward gives all three products).
    """
    start, target, batches = _as_segments(start, target, batches)
    alpha = lr.detach()
    images_d, targets_d = images.detach(), targets.detach()
    thetas = start.new_empty((len(batches) + 1, *start.shape))  # one buffer: no fragmentation
    thetas[0] = start.detach()
    for n, idx in enumerate(batches):
        theta = thetas[n].detach().requires_grad_(True)
        with torch.enable_grad(), autocast():
            grad = _segment_grads(student, theta, images_d[idx], targets_d[idx], False, inner_loss, n)
        torch.sub(thetas[n], alpha * grad, out=thetas[n + 1])
        del grad
    theta_n = thetas[-1]
    with torch.no_grad():
        loss = matching_distance(theta_n, start, target)
        lam = 2 * (theta_n - target) / (start - target).pow(2).sum(1, keepdim=True) / len(start)
    grad_images = torch.zeros_like(images_d)
    grad_targets = torch.zeros_like(targets_d) if learn_targets else None
    grad_lr = torch.zeros((), dtype=lr.dtype, device=lr.device)
    for n in reversed(range(len(batches))):  # (reversed() of a tensor would copy it)
        idx, theta = batches[n], thetas[n].detach().requires_grad_(True)
        x = images_d[idx].requires_grad_(True)
        z = targets_d[idx].requires_grad_(learn_targets)
        with torch.enable_grad():
            with autocast():
                grad = _segment_grads(student, theta, x, z, True, inner_loss, n)
            inputs = (theta, x, z) if learn_targets else (theta, x)
            products = torch.autograd.grad(grad, inputs, grad_outputs=lam)
        grad_lr -= (lam * grad.detach()).sum()
        flat = idx.reshape(-1)
        grad_images.index_add_(0, flat, -alpha * products[1].reshape(-1, *images_d.shape[1:]))
        if grad_targets is not None:
            grad_targets.index_add_(0, flat, -alpha * products[2].reshape(-1, targets_d.shape[1]))
        lam = lam - alpha * products[0]
        del grad, products  # free this step's graph before the next one is built
    return MatchingGrads(loss, grad_images, grad_targets, grad_lr)


def matching_grads(
    backend: str,
    student: nn.Module,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    batches: torch.Tensor,
    learn_targets: bool = False,
    autocast: Autocast = nullcontext,
    inner_loss: InnerLoss = kd_inner_loss,
) -> MatchingGrads:
    """L_DD and its gradients with the ``unrolled`` or the ``recompute`` backend (same values)."""
    if backend == "recompute":
        return recompute_matching_grads(
            student, start, target, images, targets, lr, batches, learn_targets, autocast, inner_loss
        )
    leaves = (
        images.detach().requires_grad_(True),
        targets.detach().requires_grad_(learn_targets),
        lr.detach().requires_grad_(True),
    )
    loss = unrolled_matching_loss(student, start, target, *leaves, batches, autocast, inner_loss)
    wrt = leaves if learn_targets else (leaves[0], leaves[2])
    grads = torch.autograd.grad(loss, wrt)
    return MatchingGrads(loss.detach(), grads[0], grads[1] if learn_targets else None, grads[-1])


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Distiller:
    """The trainable synthetic set and its optimizers; one :meth:`step` is one iteration of
    ``recipe`` with the ``backend`` (``unrolled`` or ``recompute``).

    ``runtime`` runs the inner steps' forward passes under its autocast (the caller lays the
    images out with ``runtime.images``); parameters, gradients and the matching loss stay float32.
    ``pixel_std`` (the data's per-channel std) puts :meth:`pixel_change` in pixel units.
    ``make_inner_loss`` builds each iteration's inner loss from its batches and the generator,
    after the segments and batches are drawn (:data:`InnerLossMaker`); None: the KD loss
    :func:`kd_inner_loss` on ``targets``.

    The expert epochs a segment can start or end at (0 .. T+ - 1 + M) of every trajectory are
    stacked once into one (K, T+ + M, P) bank, kept on the synthetic set's device when it takes at
    most a quarter of its memory (else on the host, rows copied per iteration); segments are drawn
    and gathered there, so an iteration does not wait for the host.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        trajectories: Sequence[Trajectory],
        recipe: MatchingRecipe,
        gen: torch.Generator,
        backend: str = "recompute",
        runtime: Runtime | None = None,
        pixel_std: Sequence[float] | None = None,
        make_inner_loss: InnerLossMaker | None = None,
    ) -> None:
        self.student, self.recipe, self.gen = student, recipe, gen
        self.runtime = runtime or Runtime(images.device)
        self.backend = backend
        self.make_inner_loss = make_inner_loss
        device = images.device
        epochs = range(recipe.max_start_epoch + recipe.expert_epochs)
        bank = torch.stack([torch.stack([t.at(e) for e in epochs]) for t in trajectories])
        fits = bank.numel() * bank.element_size() <= device_memory_bytes(device) // 4
        self.bank = bank.to(device) if fits else bank
        self.images = images.detach().clone().requires_grad_(True)
        self.init_images = images.detach()
        std = pixel_std if pixel_std is not None else (1.0,) * images.shape[1]
        self.pixel_std = torch.tensor(std, dtype=images.dtype, device=device).view(1, -1, 1, 1)
        self.targets = targets.detach().clone().requires_grad_(recipe.learn_targets)
        self.lr = torch.tensor(recipe.lr_init, device=device, requires_grad=True)
        self.opt_images = torch.optim.SGD([self.images], lr=recipe.lr_img, momentum=recipe.momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=recipe.lr_lr, momentum=recipe.momentum)
        self.opt_targets = (
            torch.optim.SGD([self.targets], lr=recipe.lr_targets, momentum=recipe.momentum)
            if recipe.learn_targets
            else None
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The SGD optimizers by what they update: images, lr (and targets when learned)."""
        opts: dict[str, torch.optim.Optimizer] = {"images": self.opt_images, "lr": self.opt_lr}
        return opts | ({"targets": self.opt_targets} if self.opt_targets is not None else {})

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) experts k and (B,) start epochs s, uniform over the K experts and {0..T+-1}, on the
        generator's device (what :meth:`step` draws first when it is not given them)."""
        g, r = self.gen, self.recipe
        ks = torch.randint(len(self.bank), (r.trajectories,), generator=g, device=g.device)
        ss = torch.randint(r.max_start_epoch, (r.trajectories,), generator=g, device=g.device)
        return ks, ss

    def draw_segments(self) -> list[tuple[int, int]]:
        """``distill.trajectories`` pairs (expert k, start epoch s), as :meth:`step` draws them."""
        ks, ss = self.draw()
        return list(zip(ks.tolist(), ss.tolist(), strict=True))

    def pixel_change(self) -> torch.Tensor:
        """Mean |x - x_init| over the synthetic images, 0-dim on the device: in pixel units (0-1)
        when the constructor was given the data's ``pixel_std``, else in normalised units."""
        return ((self.images.detach() - self.init_images).abs() * self.pixel_std).mean()

    def step(self, drawn: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One iteration: match B segments (``drawn`` by :meth:`draw`, drawn here when None),
        update pixels, alpha_syn (and Z_syn). Returns the matching loss as a 0-dim tensor on the
        device (reading it syncs).

        Under torch.distributed every rank draws the same B segments and batches (the generator
        is seeded alike) and matches segments ``rank, rank + world, ...``; the gradients of the
        mean loss (each rank's share weighted by its number of segments) are summed over the
        ranks, so every rank takes the same update as one process matching all B."""
        r, device, rt = self.recipe, self.images.device, self.runtime
        ks, ss = drawn if drawn is not None else self.draw()
        ks, ss = ks.to(self.bank.device), ss.to(self.bank.device)
        start = self.bank[ks, ss].to(device)
        target = self.bank[ks, ss + r.expert_epochs].to(device)
        batches = torch.stack(
            [
                sample_batches(len(self.images), r.batch_syn, r.syn_steps, self.gen)
                for _ in range(r.trajectories)
            ],
            dim=1,
        ).to(device)  # (N, B, b)
        inner = kd_inner_loss if self.make_inner_loss is None else self.make_inner_loss(batches, self.gen)
        if rt.distributed:
            result = self._distributed_grads(start, target, batches, inner)
        else:
            result = matching_grads(
                self.backend,
                self.student,
                start,
                target,
                self.images,
                self.targets,
                self.lr,
                batches,
                r.learn_targets,
                rt.autocast,
                inner,
            )
        self.images.grad, self.lr.grad = result.images, result.lr
        if self.opt_targets is not None:
            self.targets.grad = result.targets
        for opt in self.optimizers().values():
            opt.step()
        return result.loss

    def _distributed_grads(
        self, start: torch.Tensor, target: torch.Tensor, batches: torch.Tensor, inner: InnerLoss
    ) -> MatchingGrads:
        """This rank's segments matched, weighted by their share of B, summed over the ranks."""
        rt, r = self.runtime, self.recipe
        mine = list(range(rt.rank, r.trajectories, rt.world))
        if mine:
            local = matching_grads(
                self.backend,
                self.student,
                start[mine],
                target[mine],
                self.images,
                self.targets,
                self.lr,
                batches[:, mine],
                r.learn_targets,
                rt.autocast,
                inner,
            )
            share = len(mine) / r.trajectories
            parts = [local.loss * share, local.images * share, local.lr * share]
            if r.learn_targets:
                parts.append(
                    local.targets * share if local.targets is not None else torch.zeros_like(self.targets)
                )
        else:  # fewer segments than ranks: this rank contributes nothing
            parts = [
                torch.zeros((), device=self.images.device),
                torch.zeros_like(self.images),
                torch.zeros_like(self.lr),
            ]
            if r.learn_targets:
                parts.append(torch.zeros_like(self.targets))
        flat = rt.all_reduce_sum(torch.cat([p.detach().reshape(-1) for p in parts]))
        sizes = [p.numel() for p in parts]
        pieces = [piece.view_as(p) for piece, p in zip(flat.split(sizes), parts, strict=True)]
        return MatchingGrads(pieces[0], pieces[1], pieces[3] if r.learn_targets else None, pieces[2])

    def state_dict(self) -> dict[str, Any]:
        """The synthetic set, alpha_syn, the generator and the optimizers (a plain dict)."""
        return {
            "images": self.images.detach().cpu(),
            "targets": self.targets.detach().cpu(),
            "lr": self.lr.detach().cpu(),
            "generator": self.gen.get_state(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.targets.copy_(state["targets"])
            self.lr.copy_(state["lr"])
        self.gen.set_state(state["generator"])
        for key, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][key])


@dataclass
class History:
    """Per-iteration record of a distillation (entry i is iteration i + 1): the matching loss,
    alpha_syn and :meth:`Distiller.pixel_change` after the update, and the B segments' experts k
    and start epochs s."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    pixel_change: list[float] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    start_epochs: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    def extend(self, rows: list[list[float]]) -> None:
        """Append iterations read back from the device, each ``[loss, lr, change, k_1..k_B,
        s_1..s_B]`` (see :func:`_iteration_row`)."""
        for row in rows:
            b = (len(row) - 3) // 2
            self.loss.append(row[0])
            self.lr.append(row[1])
            self.pixel_change.append(row[2])
            self.experts.append([int(k) for k in row[3 : 3 + b]])
            self.start_epochs.append([int(s) for s in row[3 + b :]])

    def state(self) -> dict[str, list[Any]]:
        """The columns as a plain dict (what a checkpoint stores)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Any) -> History:
        """Inverse of :meth:`state`; None (a fresh run) gives an empty history. A checkpoint of an
        earlier mkdt, which kept the losses alone, raises ArtifactError."""
        if state is None:
            return cls()
        if not isinstance(state, dict):
            raise ArtifactError(
                "the distillation checkpoint was written by an earlier mkdt (it lacks the "
                "per-iteration history); rerun the distill stage with --force"
            )
        return cls(**state)


def _iteration_row(
    loss: torch.Tensor, distiller: Distiller, drawn: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """One iteration's :class:`History` entry as one float64 vector on the device, so that a whole
    block of iterations is read back with one sync (integers below 2^53 are exact)."""
    stats = torch.stack([t.detach().double() for t in (loss, distiller.lr, distiller.pixel_change())])
    return torch.cat([stats, drawn[0].double().to(stats.device), drawn[1].double().to(stats.device)])


@dataclass
class MatchingRun:
    """What :func:`distill` did: the history of every iteration, and timings of this process."""

    history: History
    iterations_run: int
    seconds: float
    seconds_first_iteration: float | None


def distill(
    distiller: Distiller,
    checkpoint: PeriodicCheckpoint,
    *,
    log_every: int,
    on_history: Callable[[History, int], None] | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> MatchingRun:
    """Run ``distiller`` for ``recipe.iterations`` iterations, resuming from ``checkpoint``.

    The :class:`History` stays on the device and is read back every ``log_every``
    iterations and at each checkpoint (progress bar, divergence check); a non-finite loss or
    alpha_syn raises ArtifactError naming the options to lower. ``on_history(history, since)`` is
    called once after resuming with ``since=0`` (the history the checkpoint holds) and then before
    each checkpoint is written with the number of entries it had at the previous call, so that a
    writer can append the new ones; ``on_iteration(done)`` after every update (e.g. snapshots).
    """
    r = distiller.recipe
    resumed = checkpoint.resume({"distiller": distiller})
    start_iter = resumed.get("iteration", 0)
    history = History.from_state(resumed.get("history"))
    if on_history is not None:
        on_history(history, 0)
    written = len(history)
    pending: list[torch.Tensor] = []
    start = time.perf_counter()
    first: float | None = None  # seconds of this process's first iteration (warm-up included)
    bar = progress(
        range(start_iter, r.iterations),
        desc=f"distill ({distiller.backend})",
        initial=start_iter,
        total=r.iterations,
        unit="it",
    )
    for it in bar:
        drawn = distiller.draw()
        pending.append(_iteration_row(distiller.step(drawn), distiller, drawn))
        done = it + 1
        if on_iteration is not None:
            on_iteration(done)
        save = checkpoint.due(done, r.iterations)
        if first is None or save or done % log_every == 0 or done == r.iterations:
            history.extend(torch.stack(pending).tolist())  # waits for the device
            pending.clear()
            if first is None:
                first = time.perf_counter() - start
            recent = history.loss[-log_every:] + history.lr[-1:]
            if not all(map(math.isfinite, recent)):
                raise ArtifactError(
                    f"distillation diverged by iteration {done} (non-finite loss or "
                    "alpha_syn); lower distill.lr_img or distill.lr_lr and rerun with "
                    "--force"
                )
            bar.set_postfix(loss=f"{history.loss[-1]:.4f}", lr=f"{history.lr[-1]:.4f}")
        if save:
            if on_history is not None:
                on_history(history, written)
            written = len(history)
            checkpoint.save({"distiller": distiller}, iteration=done, history=history.state())
    return MatchingRun(history, r.iterations - start_iter, time.perf_counter() - start, first)


def unrolled_graph_bytes(
    recipe: MatchingRecipe, student: nn.Module, image_shape: torch.Size, num_images: int
) -> int:
    """Rough size of the unrolled backend's autograd graph: N x B x batch_syn x the activations of
    one image (every module output, x ``_GRAPH_FACTOR`` for the double-backward graph), for a
    synthetic set of ``num_images``."""
    elements = 0

    def count(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal elements
        elements += output.numel()

    leaves = [m for m in student.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    training = student.training
    try:  # two images in eval mode: batch norm neither fails on one image nor updates its statistics
        with torch.no_grad():
            p = next(student.parameters())
            student.eval()(torch.zeros(2, *image_shape, device=p.device, dtype=p.dtype))
    finally:
        student.train(training)
        for h in hooks:
            h.remove()
    batch = min(recipe.batch_syn, num_images)
    return _GRAPH_FACTOR * 4 * elements // 2 * batch * recipe.syn_steps * recipe.trajectories


def resolve_backend(
    backend: str,
    recipe: MatchingRecipe,
    student: nn.Module,
    image_shape: torch.Size,
    device: torch.device,
    num_images: int,
) -> str:
    """``backend`` (one of :data:`BACKENDS`); ``auto`` = ``unrolled`` (a little faster) while its
    graph for ``recipe`` would take at most a quarter of the device's memory, ``recompute`` (memory
    independent of N) above."""
    if backend != "auto":
        return backend
    graph = unrolled_graph_bytes(recipe, student, image_shape, num_images)
    return "unrolled" if graph <= device_memory_bytes(device) // 4 else "recompute"
