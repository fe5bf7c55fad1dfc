"""Variance of training trajectories across batch orders: SSL, SSL at 4x the batch, SL and KD
(the paper's Fig. 1a and appendix A.2).

From ONE initialisation of the run's student (``experts.student``, built with
:func:`mkdt.nn.models.build_network` with its KD head, seeded by
``derive_seed(seed, "variance", "student")``), R runs (``--runs``, default 5) are trained for each
method; the runs of a method differ only in their batch order (and, for SSL, their augmentation
draws). Run r draws its permutations of D_real from ``derive_seed(seed, "variance", "order", r)`` in
every method (so SL and KD see the same batches), its augmentations from
``derive_seed(seed, "variance", "augment", r)``. Each epoch is one permutation of D_real cut into
full batches (the last partial batch is dropped, as in :func:`mkdt.train.ssl.epoch_views`).

- ``ssl``: Barlow Twins with the library's pieces: :class:`~mkdt.nn.augment.SSLAugment` views
  (:meth:`~mkdt.nn.augment.SSLAugment.two_views`), the teacher's projector convention
  (:func:`~mkdt.nn.ssl.barlow_twins_projector` of width ``teacher.projector_dim``, seeded once),
  :class:`~mkdt.nn.ssl.BarlowTwinsLoss` with ``teacher.bt_lambda``, one
  :func:`mkdt.train.ssl.ssl_step` per batch; Adam, lr 1e-3, weight decay 1e-6, constant lr;
  batch ``--ssl-batch``;
- ``ssl_4x``: the same at 4 x ``--ssl-batch`` (same lr);
- ``sl``: cross-entropy on D_real's labels through a linear head on the student's features
  (``Linear(feature_dim, classes)``, seeded once); SGD, lr 0.01, no momentum, no weight decay,
  batch ``--sgd-batch`` (A.2's MTT-SL setting);
- ``kd``: MKDT's regression of the student's output onto the run's teacher targets
  (:class:`mkdt.nn.losses.KDLoss`, the student's own head); the same SGD as ``sl``, so that SL and
  KD differ only in their loss (the experts' recipe, lr 0.1 and momentum 0.9, is not used here).

What is compared: the student's *encoder* — every parameter ``features(x)`` uses (a ConvNet's
``features_net``, a ResNet's all but ``fc``), the part shared by all four methods; the projector,
the classifier and the KD head are trained but not compared. The encoder's flat parameter vector
w_r(t) of run r is recorded after t = record-every, 2 x record-every, ..., steps optimiser steps.
Columns of the table (per method and recorded step t; P encoder parameters, R runs):

- ``variance``: (1/P) sum_p (1/R) sum_r (w_rp(t) - mean_r w_rp(t))^2, the mean over parameters of
  the per-parameter (population) variance across the runs. This is the quantity of the paper's
  Fig. 1a (the paper plots the variance of the weights against trajectory length; whether it sums
  or averages over parameters is not said, which only scales the curve by P);
- ``distance``: (1/R) sum_r (1/P) ||w_r(t) - w(0)||^2, the mean squared distance moved from the
  common initialisation;
- ``normalised``: variance / distance, in [0, 1] (distance = ||mean_r w_r - w(0)||^2 / P +
  variance): the fraction of the runs' movement that is run-to-run spread rather than common
  drift. Adam moves every weight by about lr per step whatever its gradient, SGD by lr x gradient,
  so the raw variances of the Adam (SSL) and SGD (SL, KD) rows are on different scales; this
  column compares them without that scale. Not in the paper.
- ``epochs``: t x batch / |D_real|; ``loss``: the runs' mean training loss over the steps since the
  previous record (each method's own loss; not comparable across methods).

Scaled down by default for a 2-core CPU, and said so in the table's header: 40 steps per run,
recorded every 4, and SSL batch 64 (so ``ssl_4x`` uses 256) instead of the paper's 1024 (4096).
Measured on the ``cifar10-cpu`` run (student ConvNet width 32, depth 3; 2 threads), the default
4 methods x 5 runs x 40 steps took 277 s: ssl 27 s, ssl_4x 164 s, sl 42 s, kd 44 s; at the paper's
SSL batches (1024 / 4096) each SSL step would cost about 16x more. The paper's settings are
options (``--ssl-batch 1024 --steps N``); ``--sgd-batch`` (256) and the learning rates
``--ssl-lr`` (1e-3) / ``--sgd-lr`` (0.01) default to the paper's. A smaller SSL batch makes the
Barlow Twins loss itself noisier (its batch statistics), which raises the SSL variance; the
``ssl_4x`` row shows how much a 4x batch lowers it.

Writes ``RUN/analysis/variance.md`` (the table), ``variance.json`` (the numbers and settings) and
``variance.png`` (variance and normalised variance against steps, one line per method, log y).
Needs a finished ``targets`` stage (the KD targets; the student's head regresses them). Memory:
R x recorded steps x P float32 weights per method.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.analysis.common import comma_list, open_run
from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.errors import ConfigError, TrainingDiverged
from mkdt.files import atomic_path, write_json, write_text
from mkdt.nn.augment import SSLAugment
from mkdt.nn.losses import KDLoss
from mkdt.nn.models import build_network, feature_dim, features_of
from mkdt.nn.ssl import BarlowTwinsLoss, barlow_twins_projector
from mkdt.runtime import Runtime, derive_seed, generator, progress, seeded
from mkdt.train.ssl import ssl_step

SUMMARY = (
    "variance of the student's weights across runs that differ only in batch order, for SSL "
    "(two batch sizes), supervised learning and KD (the paper's Fig. 1a)"
)
NEEDS_RUN = True

METHODS = ("ssl", "ssl_4x", "sl", "kd")
LABELS = {
    "ssl": "SSL (Barlow Twins)",
    "ssl_4x": "SSL, 4x batch",
    "sl": "SL (cross-entropy)",
    "kd": "KD (MKDT)",
}
DEFAULT_STEPS = 40
DEFAULT_RECORD_EVERY = 4
DEFAULT_SSL_BATCH = 64  # the paper: 1024
PAPER_SSL_BATCH, PAPER_SGD_BATCH, PAPER_SSL_LR, PAPER_SGD_LR = 1024, 256, 1e-3, 0.01  # A.2
PAPER: dict[str, Any] = {
    "runs": 5,
    "ssl_batch": PAPER_SSL_BATCH,
    "ssl_4x_batch": 4 * PAPER_SSL_BATCH,
    "sgd_batch": PAPER_SGD_BATCH,
    "ssl_lr": PAPER_SSL_LR,
    "sgd_lr": PAPER_SGD_LR,
}
SSL_WEIGHT_DECAY = 1e-6  # A.2


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How one method's runs are trained."""

    method: str
    optimizer: str  # "adam" or "sgd"
    lr: float
    batch_size: int
    weight_decay: float = 0.0


@dataclass
class Problem:
    """What every run starts from and trains on: the one initialisation (copied for each run) and
    D_real as images (uint8, for SSL views), network inputs, labels and KD targets."""

    student: nn.Module  # the initialisation, with its KD head
    projector: nn.Module  # SSL projector (its initialisation)
    classifier: nn.Module  # SL linear head (its initialisation)
    ssl_loss: nn.Module
    augment: SSLAugment
    images: torch.Tensor  # (N, C, H, W) uint8 on the device
    inputs: torch.Tensor  # (N, C, H, W) float32 normalised on the device
    labels: torch.Tensor  # (N,) int64 on the device
    targets: torch.Tensor  # (N, D) float32 on the device
    runtime: Runtime

    @property
    def num_images(self) -> int:
        """|D_real|."""
        return len(self.images)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The analysis's own options (the defaults are scaled down for a CPU; see the module docstring)."""
    parser.add_argument("--runs", type=int, default=5, help="R, runs per method from one init (default 5)")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"optimiser steps per run (default {DEFAULT_STEPS}, CPU scale)",
    )
    parser.add_argument(
        "--record-every",
        type=int,
        default=DEFAULT_RECORD_EVERY,
        help=f"record the weights every this many steps (and at the last; default {DEFAULT_RECORD_EVERY})",
    )
    parser.add_argument(
        "--ssl-batch",
        type=int,
        default=DEFAULT_SSL_BATCH,
        help=f"SSL batch size; ssl_4x uses 4x (default {DEFAULT_SSL_BATCH}; the paper: 1024)",
    )
    parser.add_argument(
        "--sgd-batch",
        type=int,
        default=PAPER_SGD_BATCH,
        help="SL and KD batch size (default 256, the paper's)",
    )
    parser.add_argument(
        "--ssl-lr",
        type=float,
        default=PAPER_SSL_LR,
        help="SSL Adam learning rate (default 1e-3, the paper's)",
    )
    parser.add_argument(
        "--sgd-lr",
        type=float,
        default=PAPER_SGD_LR,
        help="SL and KD SGD learning rate (default 0.01, the paper's)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods to run (default {','.join(METHODS)})",
    )


@dataclass(frozen=True)
class Options:
    """The analysis's options, checked (:func:`parse_options`)."""

    methods: tuple[str, ...] = METHODS
    runs: int = 5
    steps: int = DEFAULT_STEPS
    record_every: int = DEFAULT_RECORD_EVERY
    ssl_batch: int = DEFAULT_SSL_BATCH
    sgd_batch: int = PAPER_SGD_BATCH
    ssl_lr: float = PAPER_SSL_LR
    sgd_lr: float = PAPER_SGD_LR

    def recipes(self) -> list[Recipe]:
        """The recipes of the chosen methods, in :data:`METHODS` order."""
        every = {
            "ssl": Recipe(
                method="ssl",
                optimizer="adam",
                lr=self.ssl_lr,
                batch_size=self.ssl_batch,
                weight_decay=SSL_WEIGHT_DECAY,
            ),
            "ssl_4x": Recipe(
                method="ssl_4x",
                optimizer="adam",
                lr=self.ssl_lr,
                batch_size=4 * self.ssl_batch,
                weight_decay=SSL_WEIGHT_DECAY,
            ),
            "sl": Recipe(method="sl", optimizer="sgd", lr=self.sgd_lr, batch_size=self.sgd_batch),
            "kd": Recipe(method="kd", optimizer="sgd", lr=self.sgd_lr, batch_size=self.sgd_batch),
        }
        return [every[m] for m in METHODS if m in self.methods]

    def record_at(self) -> list[int]:
        """The recorded steps (:func:`record_steps`)."""
        return record_steps(self.steps, self.record_every)


def parse_options(args: argparse.Namespace) -> Options:
    """The checked :class:`Options` of ``args`` (absent attributes take the defaults); ConfigError
    (one line) on a bad option. Batches against D_real are checked by :func:`check_sizes`."""
    d = Options()

    def get(name: str) -> Any:
        value = getattr(args, name, None)
        return getattr(d, name) if value is None else value

    text, methods = comma_list(get("methods"))
    o = Options(
        methods=tuple(m for m in METHODS if m in methods),  # in METHODS order (variance.json sorts its keys)
        runs=int(get("runs")),
        steps=int(get("steps")),
        record_every=int(get("record_every")),
        ssl_batch=int(get("ssl_batch")),
        sgd_batch=int(get("sgd_batch")),
        ssl_lr=float(get("ssl_lr")),
        sgd_lr=float(get("sgd_lr")),
    )
    if o.runs < 2:
        raise ConfigError(f"--runs must be >= 2 (a variance across runs), got {o.runs}")
    if o.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {o.steps}")
    if not 1 <= o.record_every <= o.steps:
        raise ConfigError(f"--record-every must be in [1, --steps ({o.steps})], got {o.record_every}")
    if o.ssl_batch < 2:
        raise ConfigError(
            f"--ssl-batch must be >= 2 (Barlow Twins standardises along the batch), got {o.ssl_batch}"
        )
    if o.sgd_batch < 1:
        raise ConfigError(f"--sgd-batch must be >= 1, got {o.sgd_batch}")
    for name, lr in (("--ssl-lr", o.ssl_lr), ("--sgd-lr", o.sgd_lr)):
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {lr}")
    bad = sorted(set(methods) - set(METHODS))
    if not methods or bad or len(set(methods)) != len(methods):
        raise ConfigError(
            f"--methods {text!r}: give distinct methods from {', '.join(METHODS)}, comma-separated"
        )
    return o


def check_sizes(recipes: Sequence[Recipe], num_images: int) -> None:
    """ConfigError when a method's batch is larger than D_real."""
    for r in recipes:
        if r.batch_size > num_images:
            option = "--sgd-batch" if r.optimizer == "sgd" else "--ssl-batch"
            size = f"4 x --ssl-batch = {r.batch_size}" if r.method == "ssl_4x" else f"{option} {r.batch_size}"
            raise ConfigError(f"{r.method}: batch {size} is larger than D_real ({num_images} images)")


def record_steps(steps: int, every: int) -> list[int]:
    """The steps after which the weights are recorded: every ``every`` steps and the last."""
    return sorted({*range(every, steps + 1, every), steps})


def batch_order(num_images: int, batch_size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, batch_size) indices into D_real: epochs of ``torch.randperm(num_images, generator=gen)``
    cut into full batches (the last partial batch of each epoch dropped), concatenated."""
    per_epoch = num_images // batch_size
    if per_epoch < 1:
        raise ConfigError(f"batch {batch_size} is larger than D_real ({num_images} images)")
    batches = []
    for _ in range(-(-steps // per_epoch)):
        perm = torch.randperm(num_images, generator=gen, device=gen.device)
        batches.append(perm[: per_epoch * batch_size].view(per_epoch, batch_size))
    return torch.cat(batches)[:steps]


def run_orders(
    config: Config, recipe: Recipe, num_images: int, runs: int, steps: int, device: torch.device
) -> list[torch.Tensor]:
    """The batch orders of a method's R runs (run r's permutations from its own seeded stream)."""
    return [
        batch_order(
            num_images,
            recipe.batch_size,
            steps,
            generator(derive_seed(config.seed, "variance", "order", r), device),
        )
        for r in range(runs)
    ]


def augment_seeds(config: Config, runs: int) -> list[int]:
    """The SSL augmentation seeds of the R runs."""
    return [derive_seed(config.seed, "variance", "augment", r) for r in range(runs)]


def head_of(model: nn.Module) -> nn.Module:
    """The output head of an mkdt network (``head`` of a ConvNet, ``fc`` of a ResNet)."""
    for name in ("head", "fc"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no head (head or fc)")


def encoder_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs ``features(x)`` uses: every parameter but the head's."""
    head = {id(p) for p in head_of(model).parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in head]


def flat_encoder(model: nn.Module) -> torch.Tensor:
    """The encoder's parameters as one detached float32 vector on the CPU."""
    return torch.cat([p.detach().reshape(-1) for _, p in encoder_parameters(model)]).float().cpu()


def build_problem(config: Config, real: RealData, targets: torch.Tensor, runtime: Runtime) -> Problem:
    """The one initialisation (student, projector, classifier; each seeded from the config's seed)
    and D_real on the runtime's device."""
    data, dev = real.data, runtime.device
    with seeded(derive_seed(config.seed, "variance", "student")):
        student = build_network(config.experts.student, data.channels, data.image_size, int(targets.shape[1]))
    dim = feature_dim(student)
    width = config.teacher.projector_dim
    with seeded(derive_seed(config.seed, "variance", "projector")):
        projector = barlow_twins_projector(dim, width, width)
    with seeded(derive_seed(config.seed, "variance", "classifier")):
        classifier = nn.Linear(dim, data.num_classes)
    return Problem(
        student=student.to(dev),
        projector=projector.to(dev),
        classifier=classifier.to(dev),
        ssl_loss=BarlowTwinsLoss(lambda_offdiag=config.teacher.bt_lambda),
        augment=SSLAugment(data.image_size, data.mean, data.std),
        images=real.images,
        inputs=real.inputs,
        labels=data.train_labels.to(dev).long(),
        targets=targets.to(dev).float(),
        runtime=runtime,
    )


def train_run(
    problem: Problem,
    recipe: Recipe,
    order: torch.Tensor,
    augment_seed: int,
    record_at: Sequence[int],
    desc: str | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train a copy of the problem's initialisation with ``recipe`` on the batches ``order``
    (steps, batch) of D_real indices; SSL views draw from ``augment_seed``. Returns the encoder's
    flat weights after each step in ``record_at`` (S, P) and the mean loss since the previous one."""
    student = problem.runtime.prepare(copy.deepcopy(problem.student))
    student.train()
    step = _make_step(problem, recipe, student, augment_seed)
    wanted = set(record_at)
    snapshots, losses = [], []
    total, since = torch.zeros((), device=problem.images.device), 0
    for t in progress(range(1, len(order) + 1), desc=desc, leave=False, unit="step", disable=desc is None):
        total += step(order[t - 1])
        since += 1
        if t in wanted:
            mean = total.item() / since
            if not math.isfinite(mean):
                raise TrainingDiverged(
                    f"variance analysis: {recipe.method} diverged by step {t} (non-finite loss); lower "
                    f"--{'ssl' if recipe.optimizer == 'adam' else 'sgd'}-lr"
                )
            snapshots.append(flat_encoder(student))
            losses.append(mean)
            total.zero_()
            since = 0
    if len(snapshots) != len(wanted):
        raise ValueError(f"record steps {sorted(wanted)} must lie in [1, {len(order)}]")
    return torch.stack(snapshots), losses


Step = Callable[[torch.Tensor], torch.Tensor]


def _make_step(problem: Problem, recipe: Recipe, student: nn.Module, augment_seed: int) -> Step:
    """The optimiser step of ``recipe``'s method on ``student`` (a prepared copy of the
    initialisation): a batch of D_real indices in, its detached loss out. Only the student's encoder
    and the method's head are updated: a copy of the problem's projector (SSL, views drawn from
    ``augment_seed``), a copy of its classifier (SL), the student's own head (KD)."""
    if recipe.method in ("ssl", "ssl_4x"):
        return _ssl_step(problem, recipe, student, generator(augment_seed, problem.images.device))
    if recipe.method == "sl":
        return _sl_step(problem, recipe, student)
    if recipe.method == "kd":
        return _kd_step(problem, recipe, student)
    raise ValueError(f"unknown method {recipe.method!r}")


def _optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam or plain SGD (no momentum) over ``params`` at the recipe's lr and weight decay."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.0, weight_decay=recipe.weight_decay)


def _ssl_step(problem: Problem, recipe: Recipe, student: nn.Module, aug_gen: torch.Generator) -> Step:
    """Barlow Twins on two augmented views of the batch, through a copy of the projector."""
    features = features_of(student)
    projector = copy.deepcopy(problem.projector).train()
    params = [*(p for _, p in encoder_parameters(student)), *projector.parameters()]
    optimizer = _optimizer(recipe, params)

    def step(idx: torch.Tensor) -> torch.Tensor:
        view1, view2 = problem.augment.two_views(problem.images[idx], aug_gen)
        return ssl_step(
            lambda x: projector(features(x)),
            problem.ssl_loss,
            view1,
            view2,
            params,
            optimizer,
            problem.runtime,
        )

    return step


def _sl_step(problem: Problem, recipe: Recipe, student: nn.Module) -> Step:
    """Cross-entropy on D_real's labels through a copy of the linear classifier."""
    rt, features = problem.runtime, features_of(student)
    classifier = copy.deepcopy(problem.classifier).train()
    optimizer = _optimizer(recipe, [*(p for _, p in encoder_parameters(student)), *classifier.parameters()])

    def step(idx: torch.Tensor) -> torch.Tensor:
        x = rt.images(problem.inputs[idx])
        with rt.autocast():
            out = classifier(features(x))
        return _update(optimizer, F.cross_entropy(out.float(), problem.labels[idx]))

    return step


def _kd_step(problem: Problem, recipe: Recipe, student: nn.Module) -> Step:
    """KD: the student's output regressed onto the teacher targets (:class:`KDLoss`)."""
    rt, kd_loss = problem.runtime, KDLoss()
    optimizer = _optimizer(recipe, list(student.parameters()))

    def step(idx: torch.Tensor) -> torch.Tensor:
        x = rt.images(problem.inputs[idx])
        with rt.autocast():
            out = student(x)
        return _update(optimizer, kd_loss(out, problem.targets[idx]))

    return step


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One optimiser step on ``loss``; returns it detached."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_runs(
    problem: Problem,
    recipe: Recipe,
    orders: Sequence[torch.Tensor],
    seeds: Sequence[int],
    record_at: Sequence[int],
    show: bool = True,
) -> tuple[torch.Tensor, list[list[float]]]:
    """R runs of ``recipe`` from the problem's initialisation, run r on batches ``orders[r]`` with
    augmentation seed ``seeds[r]``: their encoder weights (R, S, P) and losses (R, S)."""
    if len(orders) != len(seeds):
        raise ValueError(f"got {len(orders)} orders but {len(seeds)} augmentation seeds")
    weights, losses = [], []
    for r, (order, seed) in enumerate(zip(orders, seeds, strict=True)):
        desc = f"variance {recipe.method} run {r + 1}/{len(orders)}" if show else None
        w, loss = train_run(problem, recipe, order, seed, record_at, desc)
        weights.append(w)
        losses.append(loss)
    return torch.stack(weights), losses


def trajectory_variance(weights: torch.Tensor, init: torch.Tensor) -> dict[str, torch.Tensor]:
    """Across-run statistics of weights (R, S, P) recorded at S steps from the common ``init`` (P,),
    in float64, each of shape (S,):

    - ``variance``: the mean over the P parameters of the population variance over the R runs;
    - ``distance``: the mean over runs of ||w_r - init||^2 / P;
    - ``normalised``: variance / distance (NaN where distance is 0).

    The variance is computed from the differences to run 0 (shift invariance), so runs that are
    bitwise equal give exactly 0."""
    if weights.dim() != 3 or init.shape != weights.shape[2:]:
        raise ValueError(
            f"weights must be (R, S, P) and init (P,), got {tuple(weights.shape)} and {tuple(init.shape)}"
        )
    w = weights.double()
    d = w - w[:1]
    variance = (d - d.mean(dim=0, keepdim=True)).pow(2).mean(dim=0).mean(dim=-1)
    distance = (w - init.double()).pow(2).mean(dim=-1).mean(dim=0)
    normalised = torch.where(distance > 0, variance / distance, torch.full_like(distance, math.nan))
    return {"variance": variance, "distance": distance, "normalised": normalised}


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3e}"


def render_table(summary: dict[str, Any]) -> str:
    """The markdown table of ``variance.json``'s contents, with the settings in its header."""
    s = summary["settings"]
    lines = [
        "# Variance of training trajectories across batch orders (paper Fig. 1a)",
        "",
        f"Run `{s['run']}`: D_real = {s['data']} ({s['num_images']} images), seed {s['seed']}. "
        f"{s['runs']} runs per method from one initialisation of the student ({s['student']}), "
        "differing only in batch order (and augmentation draws for SSL).",
        f"Compared: the student's encoder ({s['encoder']}, {s['encoder_parameters']:,} parameters); "
        "projector, classifier and KD head are trained but not compared.",
        "",
        f"**Scaled down for a CPU**: {s['steps']} steps per run (recorded every {s['record_every']}), "
        f"SSL batch {s['ssl_batch']} / {4 * s['ssl_batch']} (the paper: {PAPER['ssl_batch']} / "
        f"{PAPER['ssl_4x_batch']}); SL/KD batch {s['sgd_batch']}; the paper's settings are "
        "`--ssl-batch 1024 --steps N`.",
        "",
        "Optimisers: " + "; ".join(f"{m}: {r}" for m, r in s["recipes"].items()) + ".",
        "",
        "Columns: `variance` = mean over encoder parameters of the variance across runs (what the "
        "paper plots); `distance` = mean over runs and parameters of the squared distance from the "
        "initialisation; `normalised` = variance / distance, in [0, 1] (Adam and SGD move the weights "
        "by very different amounts; this compares them without that scale); `epochs` = steps x "
        "batch / |D_real|; `loss` = the runs' mean loss since the previous row (each method's own).",
        "",
        "| method | step | epochs | variance | distance | normalised | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in summary["methods"].items():
        for i, t in enumerate(row["steps"]):
            lines.append(
                f"| {method} | {t} | {row['epochs'][i]:.2f} | {_fmt(row['variance'][i])} | "
                f"{_fmt(row['distance'][i])} | {_fmt(row['normalised'][i])} | {row['loss'][i]:.4g} |"
            )
    final = {m: row["variance"][-1] for m, row in summary["methods"].items()}
    norm = {m: row["normalised"][-1] for m, row in summary["methods"].items()}
    lines += [
        "",
        f"At step {s['steps']}: variance "
        + ", ".join(f"{m} {_fmt(v)}" for m, v in final.items())
        + "; normalised "
        + ", ".join(f"{m} {_fmt(v)}" for m, v in norm.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """``variance.png``: variance (left) and normalised variance (right) against steps, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, row in summary["methods"].items():
        for ax, key in zip(axes, ("variance", "normalised"), strict=True):
            values = [v if math.isfinite(v) and v > 0 else math.nan for v in row[key]]
            ax.plot(
                row["steps"],
                values,
                marker="o",
                markersize=3,
                label=f"{LABELS[method]}, batch {row['batch_size']}",
            )
    axes[0].set_title("variance across runs (paper Fig. 1a)")
    axes[0].set_ylabel("mean per-parameter variance")
    axes[1].set_title("variance / mean squared distance from init")
    axes[1].set_ylabel("normalised variance")
    for ax in axes:
        ax.set_xlabel("trajectory length (steps)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"{s['data']}, {s['runs']} runs per method, student {s['student']}; CPU scale: "
        f"{s['steps']} steps, SSL batch {s['ssl_batch']} (paper 1024)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def analyse(
    config: Config,
    problem: Problem,
    recipes: Sequence[Recipe],
    runs: int,
    record_at: Sequence[int],
    show: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every method's R runs and their statistics, keyed by method (lists, JSON-ready)."""
    init = flat_encoder(problem.student)
    steps = record_at[-1]
    out: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        t0 = time.perf_counter()
        orders = run_orders(config, recipe, problem.num_images, runs, steps, problem.images.device)
        weights, losses = train_runs(problem, recipe, orders, augment_seeds(config, runs), record_at, show)
        stats = trajectory_variance(weights, init)
        mean_loss = torch.tensor(losses, dtype=torch.float64).mean(dim=0)
        out[recipe.method] = {
            "optimizer": recipe.optimizer,
            "lr": recipe.lr,
            "batch_size": recipe.batch_size,
            "weight_decay": recipe.weight_decay,
            "steps": list(record_at),
            "epochs": [t * recipe.batch_size / problem.num_images for t in record_at],
            **{key: value.tolist() for key, value in stats.items()},
            "loss": mean_loss.tolist(),
            "seconds": time.perf_counter() - t0,
        }
        del weights
    return out


def main(args: argparse.Namespace, config: Config) -> None:
    """Check the options and the run's targets stage, train the runs, write the table, the numbers
    and the plot to ``RUN/analysis/variance.{md,json,png}``."""
    options = parse_options(args)
    recipes, record_at = options.recipes(), options.record_at()
    run = open_run(config, args.out, ["targets"], preset=getattr(args, "preset", None))
    store, real, runtime = run.store, run.real, run.runtime
    check_sizes(recipes, real.num_train)
    problem = build_problem(config, real, run.targets, run.runtime)
    t0 = time.perf_counter()
    methods = analyse(config, problem, recipes, options.runs, record_at)
    encoder = [name for name, _ in encoder_parameters(problem.student)]
    spec = config.experts.student
    student = f"{spec.arch} width {spec.width}" + (f" depth {spec.depth}" if spec.arch == "convnet" else "")
    summary = {
        "settings": {
            "run": str(store.path),
            "data": config.data.name,
            "num_images": real.num_train,
            "seed": config.seed,
            **dataclasses.asdict(options),
            "student": student,
            "student_config": dataclasses.asdict(spec),
            "encoder": f"{encoder[0]} ... {encoder[-1]}: every parameter but the head",
            "encoder_parameter_names": encoder,
            "encoder_parameters": int(flat_encoder(problem.student).numel()),
            "recipes": {
                r.method: f"{r.optimizer} lr {r.lr:g} batch {r.batch_size}"
                + (f" weight decay {r.weight_decay:g}" if r.weight_decay else "")
                for r in recipes
            },
            "paper": PAPER,
            "paper_batches": options.ssl_batch == PAPER_SSL_BATCH and options.sgd_batch == PAPER_SGD_BATCH,
            "variance": "population variance over runs, averaged over encoder parameters",
            "seconds": time.perf_counter() - t0,
            "device": str(runtime.device),
            "torch_threads": torch.get_num_threads(),
        },
        "methods": methods,
    }
    if not runtime.is_main:
        return
    write_json(store.analysis_path("variance", "json"), summary)
    table = render_table(summary)
    write_text(store.analysis_path("variance", "md"), table)
    plot(summary, store.analysis_path("variance", "png"))
    print(table)
    print(f"wrote {store.analysis_path('variance', 'md')}, variance.json, variance.png")
