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
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from mkdt.runtime import fast_path, generator, load_real, progress, resolve_device

STAGE = "distill"
FILE = "synthetic.safetensors"
_NOT_DEFINING = ("checkpoint_every", "backend")
_GRAPH_FACTOR = 2  # measured with benchmarks/distill.py (1.6-1.8 on CPU for ConvNetD3), see BENCHMARKS.md


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


def _segment_grads(student: nn.Module, theta: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                   create_graph: bool) -> torch.Tensor:
    """Inner gradients g_b = grad_theta L_MSE(f_{theta_b}(x_b), z_b) of B segments at once.

    ``theta`` (B, P), ``x`` (B, b, C, H, W), ``z`` (B, b, D) -> (B, P). B > 1 runs the students with
    ``torch.func.vmap``; the loss summed over segments gives each segment its own gradient. Buffers
    (batch-norm running statistics, which a training-mode forward updates but never reads) get one
    scratch copy per segment there, so vmap can update them.
    """
    if theta.shape[0] == 1:
        out = torch.func.functional_call(student, unflatten_params(student, theta[0]), (x[0],))[None]
    else:
        buffers = {name: b.expand(len(theta), *b.shape).clone() for name, b in student.named_buffers()}

        def forward(t: torch.Tensor, buf: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(student, (unflatten_params(student, t), buf), (xb,))
        out = torch.func.vmap(forward)(theta, buffers, x)
    loss = (out.to(z.dtype) - z).pow(2).mean(dim=(1, 2)).sum()
    return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


def _as_segments(start: torch.Tensor, target: torch.Tensor,
                 batches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept one segment ((P,), (P,), (N, b)) or B segments ((B, P), (B, P), (N, B, b))."""
    if start.dim() == 1:
        return start[None], target[None], batches[:, None]
    return start, target, batches


def _normalised_distance(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over segments of ||theta_N - theta*_{s+M}||^2 / ||theta*_s - theta*_{s+M}||^2."""
    return ((theta - target).pow(2).sum(1) / (start - target).pow(2).sum(1)).mean()


def unrolled_matching_loss(student: nn.Module, start: torch.Tensor, target: torch.Tensor,
                           images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                           batches: torch.Tensor, autocast: Callable[[], Any] = nullcontext,
                           ) -> torch.Tensor:
    """L_DD with the full autograd graph through the N = len(batches) SGD steps (the reference).

    One segment (``start``/``target`` (P,), ``batches`` (N, b)) or B segments ((B, P), (N, B, b)),
    whose losses are averaged. Differentiable w.r.t. ``images``, ``targets`` and ``lr``; memory
    grows linearly with N.
    """
    start, target, batches = _as_segments(start, target, batches)
    with torch.enable_grad():  # the inner gradients are needed even under no_grad
        theta = start.detach().requires_grad_(True)
        for idx in batches:
            with autocast():
                grad = _segment_grads(student, theta, images[idx], targets[idx], create_graph=True)
            theta = theta - lr * grad
        return _normalised_distance(theta, start, target)


@dataclass
class MatchingGrads:
    """L_DD and its gradients w.r.t. the synthetic images, targets and step size."""

    loss: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor | None
    lr: torch.Tensor


def recompute_matching_grads(student: nn.Module, start: torch.Tensor, target: torch.Tensor,
                             images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                             batches: torch.Tensor, learn_targets: bool = False,
                             autocast: Callable[[], Any] = nullcontext) -> MatchingGrads:
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
            grad = _segment_grads(student, theta, images_d[idx], targets_d[idx], create_graph=False)
        torch.sub(thetas[n], alpha * grad, out=thetas[n + 1])
        del grad
    theta_n = thetas[-1]
    with torch.no_grad():
        loss = _normalised_distance(theta_n, start, target)
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
                grad = _segment_grads(student, theta, x, z, create_graph=True)
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


def matching_grads(backend: str, student: nn.Module, start: torch.Tensor, target: torch.Tensor,
                   images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor, batches: torch.Tensor,
                   learn_targets: bool = False,
                   autocast: Callable[[], Any] = nullcontext) -> MatchingGrads:
    """L_DD and its gradients with the ``unrolled`` or the ``recompute`` backend (same values)."""
    if backend == "recompute":
        return recompute_matching_grads(student, start, target, images, targets, lr, batches,
                                        learn_targets, autocast)
    leaves = (images.detach().requires_grad_(True), targets.detach().requires_grad_(learn_targets),
              lr.detach().requires_grad_(True))
    loss = unrolled_matching_loss(student, start, target, *leaves, batches, autocast)
    wrt = leaves if learn_targets else (leaves[0], leaves[2])
    grads = torch.autograd.grad(loss, wrt)
    return MatchingGrads(loss.detach(), grads[0], grads[1] if learn_targets else None, grads[-1])


class Distiller:
    """The trainable synthetic set and its optimizers; one :meth:`step` is one iteration."""

    def __init__(self, student: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 trajectories: list[experts_stage.Trajectory], recipe: DistillConfig,
                 gen: torch.Generator, backend: str = "recompute",
                 autocast: Callable[[], Any] = nullcontext) -> None:
        self.student, self.recipe, self.gen = student, recipe, gen
        self.backend, self.autocast = backend, autocast
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

    def draw_segments(self) -> list[tuple[int, int]]:
        """``distill.trajectories`` pairs (expert k, start epoch s), each uniform over all K experts
        and {0, ..., T+ - 1}."""
        g, r = self.gen, self.recipe
        ks = torch.randint(len(self.trajectories), (r.trajectories,), generator=g, device=g.device)
        ss = torch.randint(r.max_start_epoch, (r.trajectories,), generator=g, device=g.device)
        return list(zip(ks.tolist(), ss.tolist(), strict=True))

    def step(self) -> float:
        """One iteration: draw B segments, match them, update pixels, alpha_syn (and Z_syn)."""
        r, device = self.recipe, self.images.device
        segments = self.draw_segments()
        start = torch.stack([self.trajectories[k].at(s) for k, s in segments]).to(device)
        target = torch.stack([self.trajectories[k].at(s + r.expert_epochs) for k, s in segments]).to(device)
        batches = torch.stack([sample_batches(len(self.images), r.batch_syn, r.syn_steps, self.gen)
                               for _ in segments], dim=1).to(device)  # (N, B, b)
        result = matching_grads(self.backend, self.student, start, target, self.images, self.targets,
                                self.lr, batches, r.learn_targets, self.autocast)
        self.images.grad, self.lr.grad = result.images, result.lr
        if self.opt_targets is not None:
            self.targets.grad = result.targets
        for opt in self.optimizers().values():
            opt.step()
        return result.loss.item()

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


def unrolled_graph_bytes(recipe: DistillConfig, student: nn.Module, image_shape: torch.Size) -> int:
    """Rough size of the unrolled backend's autograd graph: N x B x batch_syn x the activations of
    one image (every module output, x ``_GRAPH_FACTOR`` for the double-backward graph)."""
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
    batch = min(recipe.batch_syn, recipe.images)
    return _GRAPH_FACTOR * 4 * elements // 2 * batch * recipe.syn_steps * recipe.trajectories


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_backend(recipe: DistillConfig, student: nn.Module, image_shape: torch.Size,
                    device: torch.device) -> str:
    """``distill.backend``; ``auto`` = ``unrolled`` (a little faster) while its graph would take at
    most a quarter of the device's memory, ``recompute`` (memory independent of N) above."""
    if recipe.backend != "auto":
        return recipe.backend
    small = unrolled_graph_bytes(recipe, student, image_shape) <= device_memory_bytes(device) // 4
    return "unrolled" if small else "recompute"


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
    fast = fast_path(config, device)
    images = fast.images(data.normalize(data.train_images[indices]).to(device))
    trajectories = [experts_stage.load_expert(run_dir, config, k)
                    for k in range(config.experts.num_experts)]
    student = experts_stage.build_student(config.experts.student, data, z.shape[1]).to(device)
    backend = resolve_backend(r, student, images.shape[1:], device)
    distiller = Distiller(student, images, z[indices].to(device), trajectories, r,
                          generator(derive_seed(config.seed, "distill"), device), backend, fast.autocast)
    history: list[float] = []
    start_iter = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        run_dir.check_compatible(STAGE, state, spec)
        distiller.load_state(state["distiller"])
        start_iter, history = state["iteration"], list(state["history"])
    start = time.perf_counter()
    bar = progress(range(start_iter, r.iterations), desc=f"distill ({backend})", initial=start_iter,
                   total=r.iterations, unit="it")
    first_iteration = None  # seconds of this process's first iteration (warm-up included)
    for it in bar:
        history.append(distiller.step())
        if first_iteration is None:
            first_iteration = time.perf_counter() - start  # .step() returned a host float: synced
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
    result = {"learned_lr": final.lr, "iterations": r.iterations, "backend": backend,
              "loss_first": sum(history[:window]) / window,
              "loss_last": sum(history[-window:]) / window,
              "seconds_per_iteration": (time.perf_counter() - start) / max(1, r.iterations - start_iter),
              "seconds_first_iteration": first_iteration}
    print(f"distill: loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} "
          f"(mean of {window} its), learned lr {final.lr:.4f}")
    return run_dir.finish(STAGE, spec, time.perf_counter() - start, result)
