"""Why naive trajectory matching fails for SSL (``mkdt analyze mtt``; the paper's Fig. 1b/c and
appendix A.2).

Three distillations start from the same images (the run's init subset ``distill.init``, normalised
pixels) and run for ``--iterations`` (default 100, A.2) with the same image learning rate
(``--lr-img``, default 1000, A.2), the same SGD momentum (``distill.momentum``), the same synthetic
batch (``--batch-syn``, default ``distill.batch_syn``) and a learnable step size alpha_syn (see
below for its initial value and learning rate), each segment starting at expert epoch 0 (A.2: max
start epoch 0). Every iteration draws one expert k uniformly from the first ``--experts`` (default
2), starts the student at theta*_{k,0}, takes N SGD steps on synthetic mini-batches and scores
theta_N with :func:`mkdt.nn.losses.matching_distance` against theta*_{k,M}. All three are the
library's :class:`mkdt.train.matching.Distiller` (``unrolled`` backend, one segment per iteration);
they differ in their experts, N, M and inner loss (:data:`mkdt.train.matching.InnerLoss`):

- ``mtt_ssl`` (MTT-SSL, N = ``--ssl-steps`` 10, M = ``--ssl-epochs`` 2): experts trained with
  Barlow Twins on D_real (Adam, lr ``--ssl-lr`` 1e-3, weight decay 1e-6, batch ``--ssl-batch``,
  constant lr; A.2) as encoder (the student network ``experts.student`` without its KD head) + a
  small Barlow Twins projector (:func:`mkdt.nn.ssl.barlow_twins_projector`, width
  ``--projector-dim``, loss :class:`mkdt.nn.ssl.BarlowTwinsLoss` with ``teacher.bt_lambda``). The
  inner loss is the same Barlow Twins loss of two views of each synthetic mini-batch
  (:func:`ssl_loss_maker`). The experts and the inner loop draw their views from the same
  distribution, :class:`mkdt.nn.augment.DiffAugment` (crop, flip, colour jitter, grayscale of the
  float pixels, differentiable).
- ``mtt_sl`` (MTT-SL, N = ``--sl-steps`` 20, M = ``--sl-epochs`` 4): experts trained with
  cross-entropy on D_real's labels through a linear head on the student's features (SGD, lr
  ``--sl-lr`` 0.01, batch ``--sl-batch`` 256, no momentum or weight decay; A.2), no augmentation.
  The inner loss is the cross-entropy of the synthetic images with their fixed labels (the labels
  of the init subset's real images; :func:`ce_inner_loss`).
- ``mkdt``: the first ``--experts`` of the run's KD experts, with the run's distill config (N =
  ``distill.syn_steps``, M = ``distill.expert_epochs``, KD loss to the fixed teacher targets,
  :func:`mkdt.train.matching.kd_inner_loss`) except: ``--iterations``, ``--lr-img`` (A.2's 1000 for
  all three, so the pixel changes compare), start epoch 0 (``max_start_epoch`` 1), one segment per
  iteration, ``--batch-syn`` and the initial alpha below.

The matched parameters are every parameter of the network the experts train: encoder + projector
(``mtt_ssl``), encoder + linear classifier (``mtt_sl``), encoder + KD head (``mkdt``).

Initial alpha_syn (``--alpha``). ``auto`` (default): ``mkdt`` starts at ``distill.lr_init``;
``mtt_sl`` at its experts' SGD lr ``--sl-lr``; ``mtt_ssl``, whose Adam experts have no SGD lr, at
the value of :data:`ALPHA_GRID` whose N plain inner steps from theta*_{0,0} on the init images (one
draw of batches and views) end closest to theta*_{0,M} (:func:`choose_alpha`). ``grid`` picks every
method's start that way; a number sets all three. Learning rate of alpha_syn (``--lr-lr``):
``distill.lr_lr * (alpha_0 / distill.lr_init)^2`` for a method whose initial alpha is alpha_0
(:func:`alpha_lr`); a number applies to all three. docs/method.md §9 gives the reasons for both
rules and the cost of a run.

Recorded per iteration: the matching loss (before that iteration's update, as the distill stage
logs it), the mean absolute change of the pixels from the init images after the update (in the
normalised space, (x / 255 - mean) / std; the table also gives the final value in 0-255 pixel
units) and alpha_syn. Writes ``RUN/analysis/mtt.json`` (curves and settings), ``mtt.md`` (table),
``mtt.png`` (loss and pixel change vs iteration, one line per method: Fig. 1b/c) and, through
:class:`mkdt.store.RunDir`, ``RUN/analysis/mtt/``: the MTT-SSL / MTT-SL expert trajectories
(:meth:`~mkdt.store.RunDir.save_mtt_expert`, reused by a rerun with the same settings) and the
MTT-SSL distilled set (:meth:`~mkdt.store.RunDir.save_mtt_ssl`, read by
:meth:`~mkdt.store.RunDir.load_mtt_ssl`) in the distill stage's format, with the run's teacher
targets of the init images as its targets, so it can be KD pre-trained and evaluated like
``mkdt``. That set's ``lr`` is ``evaluate.lr``, the KD pre-training lr of the real subsets:
MTT-SSL's learned alpha_syn is a step size for SGD on the Barlow Twins loss of encoder +
projector, not a KD learning rate (it is kept in the metadata as ``alpha_ssl``).

Every random choice derives from ``seed``: expert k of method m is initialised from
``derive_seed(seed, "mtt", m, "expert", k, "init")`` and draws its batches / views from
``... "order"`` / ``... "augment"``; the distillations draw from ``derive_seed(seed, "mtt", m,
"distill")`` (MTT-SSL and MTT-SL draw the expert alone, :func:`draw_expert`; ``mkdt`` draws as the
distill stage does, its start epoch from {0}) and the alpha search from ``derive_seed(seed, "mtt",
m, "alpha")``. The MTT-SSL and MTT-SL inner loops run in float32 (the config's precision applies
to ``mkdt``'s Distiller only).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.analysis.common import RunSetting, comma_list, open_run
from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.data.types import ImageData
from mkdt.errors import ConfigError, TrainingDiverged
from mkdt.files import atomic_path, fingerprint, write_json, write_text
from mkdt.graph import defining
from mkdt.nn.augment import DiffAugment
from mkdt.nn.losses import matching_distance
from mkdt.nn.models import build_network, feature_dim, features_of, flatten_params, unflatten_params
from mkdt.nn.ssl import BarlowTwinsLoss, barlow_twins_projector
from mkdt.runtime import Runtime, derive_seed, generator, progress, seeded
from mkdt.store import RunDir, SyntheticSet
from mkdt.train.kd import Trajectory
from mkdt.train.matching import (
    Distiller,
    InnerLoss,
    InnerLossMaker,
    MatchingRecipe,
    inner_steps,
    kd_inner_loss,
    sample_batches,
)

SUMMARY = (
    "naive trajectory matching of Barlow Twins trajectories (MTT-SSL) vs supervised MTT and MKDT: "
    "matching loss and pixel change over the iterations (the paper's Fig. 1b/c)"
)
NEEDS_RUN = True

METHODS = ("mtt_ssl", "mtt_sl", "mkdt")
LABELS = {"mtt_ssl": "MTT-SSL (Barlow Twins)", "mtt_sl": "MTT-SL (cross-entropy)", "mkdt": "MKDT (KD)"}
ALPHA_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
SSL_WEIGHT_DECAY = 1e-6  # A.2
PAPER: dict[str, Any] = {
    "iterations": 100,
    "lr_img": 1000.0,
    "start_epoch": 0,
    "mtt_ssl": {"N": 10, "M": 2, "expert": "Adam lr 1e-3, batch 1024, weight decay 1e-6"},
    "mtt_sl": {"N": 20, "M": 4, "expert": "SGD lr 0.01, batch 256, no momentum, no weight decay"},
    "experts": "a single expert trajectory (Fig. 1b)",
    "data": "CIFAR100, 3-layer ConvNet",
}
EXPERT_VERSION = 1  # bump when the expert training changes


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """The analysis's options, checked by :func:`parse_options`."""

    methods: tuple[str, ...] = METHODS
    iterations: int = 100
    experts: int = 2
    lr_img: float = 1000.0
    alpha_mode: str = "auto"  # auto, grid or value
    alpha: float | None = None  # the value of alpha_mode "value"
    lr_lr: float | None = None  # None: distill.lr_lr * (alpha_0 / distill.lr_init)^2 per method
    batch_syn: int | None = None  # None: distill.batch_syn
    ssl_steps: int = 10
    ssl_epochs: int = 2
    ssl_batch: int = 1024
    ssl_lr: float = 1e-3
    projector_dim: int = 128
    sl_steps: int = 20
    sl_epochs: int = 4
    sl_batch: int = 256
    sl_lr: float = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The analysis's own options (defaults: A.2's settings where it gives them)."""
    d = Options()
    add = parser.add_argument
    add("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    add("--iterations", type=int, default=d.iterations, help="distillation iterations (default 100, A.2)")
    add("--experts", type=int, default=d.experts, help="expert trajectories per method (default 2)")
    add("--lr-img", type=float, default=d.lr_img, help="SGD learning rate of the pixels (default 1000, A.2)")
    add(
        "--alpha",
        default="auto",
        help="initial alpha_syn: auto (mkdt: distill.lr_init, mtt_sl: --sl-lr, mtt_ssl: best of a grid), "
        "grid (best of a grid for every method) or a number for all",
    )
    add(
        "--lr-lr",
        type=float,
        help="learning rate of alpha_syn for all methods "
        "(default: distill.lr_lr x (alpha_0 / distill.lr_init)^2 per method)",
    )
    add("--batch-syn", type=int, help="synthetic images per inner step (default: distill.batch_syn)")
    add("--ssl-steps", type=int, default=d.ssl_steps, help="MTT-SSL N (default 10, A.2)")
    add("--ssl-epochs", type=int, default=d.ssl_epochs, help="MTT-SSL M (default 2, A.2)")
    add("--ssl-batch", type=int, default=d.ssl_batch, help="SSL expert batch (default 1024, A.2)")
    add("--ssl-lr", type=float, default=d.ssl_lr, help="SSL expert Adam lr (default 1e-3, A.2)")
    add(
        "--projector-dim",
        type=int,
        default=d.projector_dim,
        help="Barlow Twins projector width (default 128)",
    )
    add("--sl-steps", type=int, default=d.sl_steps, help="MTT-SL N (default 20, A.2)")
    add("--sl-epochs", type=int, default=d.sl_epochs, help="MTT-SL M (default 4, A.2)")
    add("--sl-batch", type=int, default=d.sl_batch, help="SL expert batch (default 256, A.2)")
    add("--sl-lr", type=float, default=d.sl_lr, help="SL expert SGD lr (default 0.01, A.2)")


def parse_options(args: argparse.Namespace) -> Options:
    """The checked :class:`Options` of ``args`` (absent attributes take the defaults); ConfigError
    (one line) on a bad value. Sizes against the run are checked by :func:`check_against_run`."""
    d = Options()

    def get(name: str) -> Any:
        value = getattr(args, name, None)
        return getattr(d, name) if value is None else value

    methods = _parse_methods(get("methods"))
    alpha_mode, alpha = _parse_alpha(str(getattr(args, "alpha", None) or "auto"))
    lr_lr = getattr(args, "lr_lr", None)
    if lr_lr is not None:
        _check_rate("lr_lr", float(lr_lr))
    ints = ("iterations", "experts", "ssl_steps", "ssl_epochs", "projector_dim", "sl_steps", "sl_epochs")
    values = {name: int(get(name)) for name in ints}
    batch_syn = getattr(args, "batch_syn", None)
    _check_sizes(values, batch_syn, int(get("ssl_batch")), int(get("sl_batch")))
    rates = {name: _check_rate(name, float(get(name))) for name in ("lr_img", "ssl_lr", "sl_lr")}
    return Options(
        methods=methods,
        iterations=values["iterations"],
        experts=values["experts"],
        lr_img=rates["lr_img"],
        alpha_mode=alpha_mode,
        alpha=alpha,
        lr_lr=None if lr_lr is None else float(lr_lr),
        batch_syn=None if batch_syn is None else int(batch_syn),
        ssl_steps=values["ssl_steps"],
        ssl_epochs=values["ssl_epochs"],
        ssl_batch=int(get("ssl_batch")),
        ssl_lr=rates["ssl_lr"],
        projector_dim=values["projector_dim"],
        sl_steps=values["sl_steps"],
        sl_epochs=values["sl_epochs"],
        sl_batch=int(get("sl_batch")),
        sl_lr=rates["sl_lr"],
    )


def _parse_methods(value: Any) -> tuple[str, ...]:
    """``--methods``: distinct names of :data:`METHODS`, returned in that order."""
    text, methods = comma_list(value)
    bad = sorted(set(methods) - set(METHODS))
    if not methods or bad or len(set(methods)) != len(methods):
        raise ConfigError(
            f"--methods {text!r}: give distinct methods from {', '.join(METHODS)}, comma-separated"
        )
    return tuple(m for m in METHODS if m in methods)


def _parse_alpha(text: str) -> tuple[str, float | None]:
    """``--alpha``: ("auto", None), ("grid", None) or ("value", a finite number > 0)."""
    if text in ("auto", "grid"):
        return text, None
    try:
        alpha = float(text)
    except ValueError:
        raise ConfigError(f"--alpha must be auto, grid or a number > 0, got {text!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"--alpha must be auto, grid or a finite number > 0, got {text!r}")
    return "value", alpha


def _check_rate(name: str, lr: float) -> float:
    """``lr``; ConfigError naming ``--<name>`` unless it is a finite number > 0."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0, got {lr}")
    return lr


def _check_sizes(counts: dict[str, int], batch_syn: int | None, ssl_batch: int, sl_batch: int) -> None:
    """ConfigError unless every count is >= 1 and the batches fit their losses (Barlow Twins
    standardises along the batch: >= 2 images)."""
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if batch_syn is not None and int(batch_syn) < 2:
        raise ConfigError(
            f"--batch-syn must be >= 2 (Barlow Twins standardises along the batch), got {batch_syn}"
        )
    if ssl_batch < 2:
        raise ConfigError(
            f"--ssl-batch must be >= 2 (Barlow Twins standardises along the batch), got {ssl_batch}"
        )
    if sl_batch < 1:
        raise ConfigError(f"--sl-batch must be >= 1, got {sl_batch}")


def check_against_run(options: Options, config: Config, num_real: int) -> None:
    """ConfigError when an option does not fit the run: more experts than the run has (mkdt), an
    expert batch larger than D_real, or a synthetic batch below 2 images (Barlow Twins)."""
    if "mkdt" in options.methods and options.experts > config.experts.num_experts:
        raise ConfigError(
            f"--experts {options.experts}: the run has {config.experts.num_experts} KD experts "
            "(experts.num_experts)"
        )
    if "mtt_ssl" in options.methods and options.ssl_batch > num_real:
        raise ConfigError(f"--ssl-batch {options.ssl_batch} is larger than D_real ({num_real} images)")
    if "mtt_sl" in options.methods and options.sl_batch > num_real:
        raise ConfigError(f"--sl-batch {options.sl_batch} is larger than D_real ({num_real} images)")
    if min(batch_syn(options, config), config.init.images) < 2:
        raise ConfigError(
            f"the synthetic batch is min(--batch-syn, init.images) = "
            f"{min(batch_syn(options, config), config.init.images)}; Barlow Twins needs >= 2"
        )


def batch_syn(options: Options, config: Config) -> int:
    """Synthetic images per inner step: ``--batch-syn`` or ``distill.batch_syn``."""
    return options.batch_syn if options.batch_syn is not None else config.distill.batch_syn


def alpha_lr(options: Options, config: Config, alpha: float) -> float:
    """The learning rate of alpha_syn for a method starting at ``alpha``: ``--lr-lr``, else
    ``distill.lr_lr * (alpha / distill.lr_init)^2`` (see the module docstring)."""
    if options.lr_lr is not None:
        return options.lr_lr
    return config.distill.lr_lr * (alpha / config.distill.lr_init) ** 2


def alpha_lr_rule(options: Options, config: Config) -> str:
    """How :func:`alpha_lr` sets alpha_syn's learning rate, in words."""
    if options.lr_lr is not None:
        return f"{options.lr_lr:g} for all (--lr-lr)"
    d = config.distill
    return f"distill.lr_lr x (alpha_0 / distill.lr_init)^2 = {d.lr_lr:g} x (alpha_0 / {d.lr_init:g})^2"


def steps_and_epochs(options: Options, config: Config, method: str) -> tuple[int, int]:
    """(N, M) of a method."""
    if method == "mtt_ssl":
        return options.ssl_steps, options.ssl_epochs
    if method == "mtt_sl":
        return options.sl_steps, options.sl_epochs
    return config.distill.syn_steps, config.distill.expert_epochs


# ---------------------------------------------------------------- networks


class HeadedEncoder(nn.Module):
    """The student's encoder (its ``features``) followed by a head: a projector or a classifier."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(features_of(self.encoder)(x))


def ssl_network(config: Config, channels: int, image_size: int, projector_dim: int) -> HeadedEncoder:
    """``experts.student`` without its KD head + a Barlow Twins projector of width ``projector_dim``."""
    encoder = build_network(config.experts.student, channels, image_size, None)
    return HeadedEncoder(encoder, barlow_twins_projector(feature_dim(encoder), projector_dim, projector_dim))


def sl_network(config: Config, channels: int, image_size: int, classes: int) -> HeadedEncoder:
    """``experts.student`` without its KD head + a linear classifier."""
    encoder = build_network(config.experts.student, channels, image_size, None)
    return HeadedEncoder(encoder, nn.Linear(feature_dim(encoder), classes))


# ---------------------------------------------------------------- inner losses


def _float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (a bfloat16 forward is scored in float32; float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ssl_loss_maker(augment: DiffAugment, loss_fn: nn.Module) -> InnerLossMaker:
    """MTT-SSL's inner loss: per segment, ``loss_fn`` (Barlow Twins) of the network's outputs on two
    views of the batch. The views of each step are drawn once per iteration (view 1 then view 2,
    step by step; the same parameters for every segment), so the loss is a fixed function of the
    pixels; the targets are not read."""

    def make(batches: torch.Tensor, gen: torch.Generator) -> InnerLoss:
        device, b = batches.device, batches.shape[-1]
        views = [(augment.sample(b, gen, device), augment.sample(b, gen, device)) for _ in batches]

        def loss(
            student: nn.Module, theta: torch.Tensor, x: torch.Tensor, z: torch.Tensor, n: int
        ) -> torch.Tensor:
            losses = []
            for t, xb in zip(theta, x, strict=True):
                params = unflatten_params(student, t)
                z1 = torch.func.functional_call(student, params, (augment.apply(xb, views[n][0]),))
                z2 = torch.func.functional_call(student, params, (augment.apply(xb, views[n][1]),))
                losses.append(loss_fn(_float(z1), _float(z2)))
            return torch.stack(losses).sum()

        return loss

    return make


def ce_inner_loss(
    student: nn.Module, theta: torch.Tensor, x: torch.Tensor, z: torch.Tensor, n: int
) -> torch.Tensor:
    """MTT-SL's inner loss: per segment, the cross-entropy of the network's logits on the batch
    with its fixed labels ``z`` (class indices)."""
    losses = [
        F.cross_entropy(_float(torch.func.functional_call(student, unflatten_params(student, t), (xb,))), zb)
        for t, xb, zb in zip(theta, x, z, strict=True)
    ]
    return torch.stack(losses).sum()


def drawing_nothing(loss: InnerLoss) -> InnerLossMaker:
    """The :data:`~mkdt.train.matching.InnerLossMaker` of a loss without randomness (KD, CE)."""

    def make(batches: torch.Tensor, gen: torch.Generator) -> InnerLoss:
        return loss

    return make


# ---------------------------------------------------------------- matching


def choose_alpha(
    net: nn.Module,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch: int,
    make_loss: InnerLossMaker,
    gen: torch.Generator,
) -> tuple[float, dict[str, float]]:
    """The value of :data:`ALPHA_GRID` whose N inner steps (:func:`mkdt.train.matching.inner_steps`)
    from ``start`` end closest to ``target`` (one draw of batches and views, the same for every
    value), with every distance."""
    batches = sample_batches(len(images), batch, steps, gen).to(images.device)
    inner = make_loss(batches[:, None], gen)
    scores: dict[str, float] = {}
    for alpha in ALPHA_GRID:
        theta = inner_steps(net, start, images, targets, alpha, batches, inner_loss=inner)
        scores[f"{alpha:g}"] = float(matching_distance(theta[None], start[None], target[None]))
    finite = {a: s for a, s in scores.items() if math.isfinite(s)}
    if not finite:
        raise TrainingDiverged("mtt analysis: every initial alpha of the grid diverged; set --alpha")
    best = min(finite, key=lambda a: finite[a])
    return float(best), scores


Draw = Callable[[Distiller], tuple[torch.Tensor, torch.Tensor]]
"""How an iteration draws its segment: (expert k, start epoch s), each of shape (1,)."""


def draw_expert(distiller: Distiller) -> tuple[torch.Tensor, torch.Tensor]:
    """MTT-SSL's and MTT-SL's draw: an expert k uniformly from the distiller's generator, start
    epoch 0 (no draw)."""
    g = distiller.gen
    ks = torch.randint(len(distiller.bank), (1,), generator=g, device=g.device)
    return ks, torch.zeros_like(ks)


def run_matching(name: str, distiller: Distiller, draw: Draw, iterations: int) -> dict[str, list[float]]:
    """``iterations`` steps of ``distiller``, each on the segment ``draw`` gives: the loss, the mean
    |pixel change| from the start (normalised space) and alpha_syn after each; a non-finite loss or
    alpha raises TrainingDiverged."""
    init = distiller.images.detach().clone()
    curves: dict[str, list[float]] = {"loss": [], "pixel_change": [], "alpha": []}
    bar = progress(range(iterations), desc=f"mtt {name}", unit="it")
    for it in bar:
        loss = float(distiller.step(draw(distiller)))
        alpha = float(distiller.lr.detach())
        if not (math.isfinite(loss) and math.isfinite(alpha)):
            raise TrainingDiverged(
                f"mtt analysis: {name} diverged at iteration {it + 1} (non-finite loss or alpha_syn); "
                "lower --lr-img or --lr-lr, or set --alpha"
            )
        curves["loss"].append(loss)
        curves["pixel_change"].append(float((distiller.images.detach() - init).abs().mean()))
        curves["alpha"].append(alpha)
        bar.set_postfix(loss=f"{loss:.4f}", alpha=f"{alpha:.4g}")
    return curves


# ---------------------------------------------------------------- experts


def train_expert(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    num_images: int,
    batch_size: int,
    epochs: int,
    order: torch.Generator,
    drop_last: bool,
    desc: str,
) -> Trajectory:
    """Train ``net`` in place for ``epochs`` epochs (each a permutation of D_real from ``order``,
    cut into batches; the last partial one dropped when ``drop_last``); returns its weights after
    epochs 0..epochs and the mean loss of each epoch."""
    net.train()
    saved, losses = [flatten_params(net).cpu()], []
    for epoch in progress(range(1, epochs + 1), desc=desc, leave=False, unit="epoch"):
        perm = torch.randperm(num_images, generator=order, device=order.device)
        end = num_images // batch_size * batch_size if drop_last else num_images
        total, count = 0.0, 0
        for i in range(0, end, batch_size):
            idx = perm[i : i + batch_size]
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        losses.append(total / max(1, count))
        if not math.isfinite(losses[-1]):
            raise TrainingDiverged(f"mtt analysis: {desc} diverged in epoch {epoch} (non-finite loss)")
        saved.append(flatten_params(net).cpu())
    return Trajectory(torch.stack(saved), tuple(range(epochs + 1)), torch.tensor(losses))


def expert_definition(config: Config, options: Options, method: str, augment: DiffAugment) -> dict[str, Any]:
    """What an MTT-SSL / MTT-SL expert depends on (its file is reused when this matches)."""
    d = config.data
    out: dict[str, Any] = {
        "version": EXPERT_VERSION,
        "method": method,
        "seed": config.seed,
        "data": {"name": d.name, "resolution": d.resolution, "pool_size": d.pool_size},
        "student": dataclasses.asdict(config.experts.student),
    }
    if method == "mtt_ssl":
        return out | {
            "epochs": options.ssl_epochs,
            "optimizer": {"name": "adam", "lr": options.ssl_lr, "weight_decay": SSL_WEIGHT_DECAY},
            "batch_size": options.ssl_batch,
            "projector_dim": options.projector_dim,
            "bt_lambda": config.teacher.bt_lambda,
            "augment": augment.describe(),
        }
    return out | {
        "epochs": options.sl_epochs,
        "optimizer": {"name": "sgd", "lr": options.sl_lr, "momentum": 0.0, "weight_decay": 0.0},
        "batch_size": options.sl_batch,
    }


def expert_trajectories(
    config: Config,
    options: Options,
    method: str,
    store: RunDir,
    real: RealData,
    augment: DiffAugment,
) -> tuple[list[Trajectory], list[bool]]:
    """The first ``--experts`` MTT-SSL or MTT-SL experts: read from ``RUN/analysis/mtt/`` when a
    file with the same definition is there, else trained and saved. Returns them and, per
    expert, whether it was reused."""
    definition = expert_definition(config, options, method, augment)
    data, dev = real.data, real.device
    out, reused = [], []
    for k in range(options.experts):
        found = store.load_mtt_expert(method, k, definition)
        if found is not None:
            out.append(found)
            reused.append(True)
            continue
        with seeded(derive_seed(config.seed, "mtt", method, "expert", k, "init")):
            if method == "mtt_ssl":
                net = ssl_network(config, data.channels, data.image_size, options.projector_dim)
            else:
                net = sl_network(config, data.channels, data.image_size, data.num_classes)
        net = net.to(dev)
        order = generator(derive_seed(config.seed, "mtt", method, "expert", k, "order"), dev)
        desc = f"{method} expert {k}"
        if method == "mtt_ssl":
            aug_gen = generator(derive_seed(config.seed, "mtt", method, "expert", k, "augment"), dev)
            bt = BarlowTwinsLoss(config.teacher.bt_lambda)

            def ssl_batch_loss(
                idx: torch.Tensor, net: nn.Module = net, g: torch.Generator = aug_gen, bt: nn.Module = bt
            ) -> torch.Tensor:
                x = real.inputs[idx]
                return bt(_float(net(augment(x, g))), _float(net(augment(x, g))))

            adam = torch.optim.Adam(net.parameters(), lr=options.ssl_lr, weight_decay=SSL_WEIGHT_DECAY)
            trajectory = train_expert(
                net,
                adam,
                ssl_batch_loss,
                real.num_train,
                options.ssl_batch,
                options.ssl_epochs,
                order,
                True,
                desc,
            )
        else:
            labels = data.train_labels.to(dev)

            def ce_batch_loss(
                idx: torch.Tensor, net: nn.Module = net, labels: torch.Tensor = labels
            ) -> torch.Tensor:
                return F.cross_entropy(_float(net(real.inputs[idx])), labels[idx])

            sgd = torch.optim.SGD(net.parameters(), lr=options.sl_lr, momentum=0.0, weight_decay=0.0)
            trajectory = train_expert(
                net,
                sgd,
                ce_batch_loss,
                real.num_train,
                options.sl_batch,
                options.sl_epochs,
                order,
                False,
                desc,
            )
        store.save_mtt_expert(method, k, trajectory, definition)
        out.append(trajectory)
        reused.append(False)
    return out, reused


# ---------------------------------------------------------------- report


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(curves: dict[str, list[float]], std: Sequence[float]) -> dict[str, float]:
    """First/last-10-iteration mean loss, the final pixel change (normalised and 0-255 units) and
    the final alpha_syn."""
    window = min(10, len(curves["loss"]))
    return {
        "loss_first10": _mean(curves["loss"][:window]),
        "loss_last10": _mean(curves["loss"][-window:]),
        "pixel_change_final": curves["pixel_change"][-1],
        "pixel_change_final_255": curves["pixel_change"][-1] * 255 * _mean(std),
        "alpha_final": curves["alpha"][-1],
    }


def render_table(record: dict[str, Any]) -> str:
    """mtt.md: the settings, what was scaled down, one row per method."""
    s = record["settings"]
    lines = [
        "# Trajectory matching of SSL vs SL vs KD trajectories (paper Fig. 1b/c, appendix A.2)",
        "",
        f"Run `{s['run']}`: D_real = {s['data']} ({s['num_images']} images), seed {s['seed']}; student "
        f"{s['student']}; D_syn = the init subset `{s['init']}` ({s['syn_images']} images), the same start "
        f"for every method. {s['iterations']} iterations, image lr {s['lr_img']:g}, "
        f"momentum {s['momentum']:g}, "
        f"alpha_syn lr {s['lr_lr_rule']}, synthetic batch {s['batch_syn']}, start epoch 0, "
        f"{s['experts']} expert(s) per method.",
        "",
        "Experts: " + "; ".join(f"{m}: {text}" for m, text in s["experts_recipe"].items()) + ".",
        "",
        "Scaled down / interpreted: " + "; ".join(s["scaled_down"]) + ".",
        "",
        "Loss = the normalised matching distance ||theta_N - theta*_M||^2 / ||theta*_0 - theta*_M||^2 "
        "(1 = no closer than the expert's start); pixel change = mean |x_t - x_0| over the set in the "
        "normalised space (x / 255 - mean) / std (in 0-255 units: x mean std x 255).",
        "",
        "| method | N | M | inner loss | initial alpha | alpha lr | loss, first 10 its | loss, last 10 its | "
        "pixel change (final) | 0-255 units | final alpha |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, row in record["methods"].items():
        t = row["summary"]
        lines.append(
            f"| {m} | {row['N']} | {row['M']} | {row['inner_loss']} | {row['alpha_init']:g} | "
            f"{row['lr_lr']:.3g} | "
            f"{t['loss_first10']:.4f} | {t['loss_last10']:.4f} | {t['pixel_change_final']:.4g} | "
            f"{t['pixel_change_final_255']:.3g} | {t['alpha_final']:.4g} |"
        )
    lines += ["", record["verdict"], ""]
    return "\n".join(lines)


def verdict(methods: dict[str, Any]) -> str:
    """One line: does MTT-SSL's loss fall less and its pixels move less than the others'?"""
    if "mtt_ssl" not in methods or len(methods) < 2:
        return "(the paper's comparison needs mtt_ssl and at least one of mtt_sl, mkdt)"
    drop = {m: r["summary"]["loss_first10"] - r["summary"]["loss_last10"] for m, r in methods.items()}
    pix = {m: r["summary"]["pixel_change_final"] for m, r in methods.items()}
    others = [m for m in methods if m != "mtt_ssl"]
    loss_holds = all(drop["mtt_ssl"] < drop[m] for m in others)
    pixels_hold = all(pix["mtt_ssl"] < pix[m] for m in others)
    text = ", ".join(f"{m} {drop[m]:+.4f} / {pix[m]:.4g}" for m in methods)
    return (
        f"Loss drop (first 10 - last 10 its) / final pixel change: {text}. The paper's ordering: "
        f"MTT-SSL's loss falls least: {'holds' if loss_holds else 'does NOT hold'}; MTT-SSL's pixels "
        f"move least: {'holds' if pixels_hold else 'does NOT hold'} here."
    )


def plot(record: dict[str, Any], path: Path) -> None:
    """mtt.png: matching loss (left) and mean |pixel change| (right) against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = record["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, row in record["methods"].items():
        its = list(range(1, len(row["loss"]) + 1))
        label = f"{LABELS[m]}, N={row['N']}, M={row['M']}"
        axes[0].plot(its, row["loss"], label=label, linewidth=1.2)
        axes[1].plot(its, row["pixel_change"], label=label, linewidth=1.5)
    axes[0].set_title("(b) distillation (matching) loss")
    axes[0].set_ylabel("||theta_N - theta*_M||^2 / ||theta*_0 - theta*_M||^2")
    axes[1].set_title("(c) mean absolute pixel change from the init")
    axes[1].set_ylabel("mean |x_t - x_0| (normalised space)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{s['data']} ({s['num_images']} images), |D_syn| {s['syn_images']}, image lr {s['lr_img']:g}, "
        f"{s['experts']} expert(s) per method, start epoch 0",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


@dataclass(frozen=True)
class InitSet:
    """The common start of the three distillations: the init subset's normalised images (n, C, H, W)
    on the device, the teacher targets (n, D) and the labels (n,) of those images."""

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor


@dataclass
class MethodSetup:
    """What one method's distillation is made of: the network the experts train, the experts, the
    targets its inner loss reads (teacher targets or labels of the init images), the inner loss and
    that loss in words."""

    net: nn.Module
    trajectories: list[Trajectory]
    reused: list[bool]
    targets: torch.Tensor
    make_loss: InnerLossMaker
    inner: str


def prepare_method(
    method: str, config: Config, options: Options, run: RunSetting, init: InitSet, augment: DiffAugment
) -> MethodSetup:
    """The experts (the run's KD experts for ``mkdt``; trained or reused for the others, see
    :func:`expert_trajectories`), the network and the inner loss of ``method``."""
    store, real, data, dev = run.store, run.real, run.real.data, run.runtime.device
    net: nn.Module
    if method == "mkdt":
        epochs = config.distill.expert_epochs
        fp = fingerprint(defining(config, "experts"))
        trajectories = [store.load_expert(k, fp, list(range(epochs + 1))) for k in range(options.experts)]
        net = build_network(config.experts.student, data.channels, data.image_size, run.targets.shape[1])
        kd = drawing_nothing(kd_inner_loss)
        return MethodSetup(
            net.to(dev),
            trajectories,
            [True] * options.experts,
            init.targets,
            kd,
            "KD (MSE to teacher targets)",
        )
    trajectories, reused = expert_trajectories(config, options, method, store, real, augment)
    if method == "mtt_ssl":
        net = ssl_network(config, data.channels, data.image_size, options.projector_dim).to(dev)
        ssl = ssl_loss_maker(augment, BarlowTwinsLoss(config.teacher.bt_lambda))
        return MethodSetup(net, trajectories, reused, init.targets, ssl, "Barlow Twins of 2 views")
    net = sl_network(config, data.channels, data.image_size, data.num_classes).to(dev)
    ce = drawing_nothing(ce_inner_loss)
    return MethodSetup(net, trajectories, reused, init.labels, ce, "cross-entropy, fixed labels")


def initial_alpha(
    method: str, config: Config, options: Options, setup: MethodSetup, init: InitSet
) -> tuple[float, dict[str, float]]:
    """alpha_syn's start (see the module docstring) and, when searched, the grid's distances."""
    if options.alpha is not None:
        return options.alpha, {}
    if options.alpha_mode == "auto" and method == "mkdt":
        return config.distill.lr_init, {}
    if options.alpha_mode == "auto" and method == "mtt_sl":
        return options.sl_lr, {}
    steps, epochs = steps_and_epochs(options, config, method)
    dev = init.images.device
    first = setup.trajectories[0]
    start, target = first.at(0).to(dev), first.at(epochs).to(dev)
    gen = generator(derive_seed(config.seed, "mtt", method, "alpha"), dev)
    batch = batch_syn(options, config)
    return choose_alpha(
        setup.net, start, target, init.images, setup.targets, steps, batch, setup.make_loss, gen
    )


def distill_method(
    method: str, config: Config, options: Options, run: RunSetting, init: InitSet, augment: DiffAugment
) -> tuple[dict[str, Any], Distiller]:
    """Run one method's distillation; returns its part of the record and its Distiller."""
    t0 = time.perf_counter()
    d, rt, dev = config.distill, run.runtime, run.runtime.device
    steps, epochs = steps_and_epochs(options, config, method)
    setup = prepare_method(method, config, options, run, init, augment)
    setup.net.train()
    alpha, grid = initial_alpha(method, config, options, setup, init)
    lr_lr = alpha_lr(options, config, alpha)
    recipe = MatchingRecipe(
        iterations=options.iterations,
        syn_steps=steps,
        expert_epochs=epochs,
        max_start_epoch=1,
        batch_syn=batch_syn(options, config),
        lr_img=options.lr_img,
        lr_lr=lr_lr,
        lr_init=alpha,
        momentum=d.momentum,
        learn_targets=d.learn_targets and method == "mkdt",
        lr_targets=d.lr_targets,
        trajectories=1,
    )
    kd = method == "mkdt"  # the run's runtime (precision, layout) and the distill stage's draw
    distiller = Distiller(
        student=setup.net,
        images=rt.images(init.images) if kd else init.images,
        targets=setup.targets,
        trajectories=setup.trajectories,
        recipe=recipe,
        gen=generator(derive_seed(config.seed, "mtt", method, "distill"), dev),
        backend="unrolled",
        runtime=rt if kd else None,
        make_inner_loss=setup.make_loss,
    )
    curves = run_matching(method, distiller, Distiller.draw if kd else draw_expert, options.iterations)
    row = {
        "N": steps,
        "M": epochs,
        "inner_loss": setup.inner,
        "alpha_init": alpha,
        "alpha_grid": grid,
        "lr_lr": lr_lr,
        "experts_reused": setup.reused,
        "expert_loss": [t.loss.tolist() for t in setup.trajectories],
        **curves,
        "summary": summarise(curves, run.real.data.std),
        "seconds": time.perf_counter() - t0,
    }
    return row, distiller


def scaled_down(options: Options, config: Config, num_real: int, student: str) -> list[str]:
    """What the analysis scaled down from, or interpreted in, the paper's setting (the table's line)."""
    scaled = [
        f"{options.iterations} iterations"
        + (" (the paper: 100)" if options.iterations != 100 else " (as the paper)"),
        f"{options.experts} expert(s) per method (the paper's Fig. 1b: a single expert)",
        f"D_real = the run's {num_real} images and student {student} (the paper: CIFAR100, 3-layer ConvNet)",
        "MTT-SSL / MTT-SL experts trained only to epoch M (all a start epoch of 0 needs)",
        f"Barlow Twins projector width {options.projector_dim}",
        "MTT-SSL views: the differentiable crop/flip/colour-jitter/grayscale DiffAugment (no hue, blur, "
        "solarisation) for its experts and its inner loop",
        f"MKDT: the run's KD experts and distill config (N {config.distill.syn_steps}, M "
        f"{config.distill.expert_epochs}) with A.2's image lr and start epoch 0",
        "initial alpha_syn: "
        + (
            f"{options.alpha:g} for all"
            if options.alpha is not None
            else "the best of a grid for every method (grid)"
            if options.alpha_mode == "grid"
            else "mkdt distill.lr_init, mtt_sl its experts' SGD lr, mtt_ssl the best of a grid (auto)"
        ),
    ]
    if (
        options.ssl_batch != 1024
        or options.sl_batch != 256
        or options.ssl_lr != 1e-3
        or options.sl_lr != 0.01
    ):
        scaled.append(
            f"expert recipes changed from A.2: SSL batch {options.ssl_batch} lr {options.ssl_lr:g}, "
            f"SL batch {options.sl_batch} lr {options.sl_lr:g}"
        )
    return scaled


def settings(
    config: Config, options: Options, run: RunSetting, init: InitSet, seconds: float
) -> dict[str, Any]:
    """The record's ``settings``: the run, the options, the expert recipes and what was scaled down."""
    real, d = run.real, config.distill
    spec = config.experts.student
    student = f"{spec.arch} width {spec.width}" + (f" depth {spec.depth}" if spec.arch == "convnet" else "")
    return {
        "run": str(run.store.path),
        "data": config.data.name,
        "num_images": real.num_train,
        "seed": config.seed,
        "student": student,
        "init": d.init,
        "syn_images": len(init.images),
        "iterations": options.iterations,
        "experts": options.experts,
        "lr_img": options.lr_img,
        "lr_lr_rule": alpha_lr_rule(options, config),
        "momentum": d.momentum,
        "batch_syn": batch_syn(options, config),
        "options": dataclasses.asdict(options),
        "experts_recipe": {
            "mtt_ssl": f"Barlow Twins, Adam lr {options.ssl_lr:g}, weight decay "
            f"{SSL_WEIGHT_DECAY:g}, batch "
            f"{options.ssl_batch}, {real.num_train // options.ssl_batch} steps per epoch",
            "mtt_sl": f"cross-entropy, SGD lr {options.sl_lr:g}, batch {options.sl_batch}, "
            f"{math.ceil(real.num_train / options.sl_batch)} steps per epoch",
            "mkdt": f"the run's {config.experts.num_experts} KD experts (first "
            f"{options.experts} used), SGD lr "
            f"{config.experts.lr:g}, batch {config.experts.batch_size}",
        },
        "pixel_space": "normalised: (x / 255 - mean) / std",
        "std": list(real.data.std),
        "scaled_down": scaled_down(options, config, real.num_train, student),
        "paper": PAPER,
        "alpha_grid": list(ALPHA_GRID),
        "device": str(run.runtime.device),
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
    }


def save_ssl_set(
    store: RunDir, distiller: Distiller, data: ImageData, config: Config, options: Options
) -> None:
    """The MTT-SSL set (:meth:`RunDir.save_mtt_ssl`): the distilled images, the run's teacher targets
    of the init images (the distiller's fixed targets) and ``evaluate.lr``; the learned alpha_syn is
    kept as ``alpha_ssl`` in the metadata."""
    images, targets = distiller.images.detach().cpu(), distiller.targets.detach().cpu()
    synthetic = SyntheticSet(images, targets, config.evaluate.lr)
    meta = {
        "iterations": options.iterations,
        "alpha_ssl": float(distiller.lr.detach()),
        "lr_note": "lr = evaluate.lr (KD pre-training lr of real subsets); alpha_ssl is "
        "MTT-SSL's learned "
        "step size for SGD on the Barlow Twins loss, not a KD learning rate",
        "targets_note": "the run's teacher targets of the init images",
    }
    store.save_mtt_ssl(synthetic, data.mean, data.std, meta)


def analyse(
    config: Config,
    out: str | Path,
    options: Options,
    *,
    preset: str | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Check the run, train (or reuse) the experts, run the distillations, write
    ``RUN/analysis/mtt.{json,md,png}`` and ``RUN/analysis/mtt/``; returns the record."""
    run = open_run(config, out, ["teacher", "targets", "experts", "init"], preset=preset, runtime=runtime)
    store, real, dev = run.store, run.real, run.runtime.device
    check_against_run(options, config, real.num_train)
    indices = store.load_indices(config.init.images)[config.distill.init].to(dev)
    init = InitSet(real.inputs[indices], run.targets[indices], real.data.train_labels.to(dev)[indices])
    augment = DiffAugment(real.data.mean, real.data.std)
    t_all = time.perf_counter()
    methods: dict[str, Any] = {}
    distillers: dict[str, Distiller] = {}
    for method in options.methods:
        methods[method], distillers[method] = distill_method(method, config, options, run, init, augment)
    record: dict[str, Any] = {
        "settings": settings(config, options, run, init, time.perf_counter() - t_all),
        "methods": methods,
    }
    record["verdict"] = verdict(methods)
    if not run.runtime.is_main:
        return record
    if "mtt_ssl" in distillers:
        save_ssl_set(store, distillers["mtt_ssl"], real.data, config, options)
    write_json(store.analysis_path("mtt", "json"), record)
    write_text(store.analysis_path("mtt", "md"), render_table(record))
    plot(record, store.analysis_path("mtt", "png"))
    return record


def main(args: argparse.Namespace, config: Config) -> None:
    """Check the options, run the analysis on ``args.out``, print the table."""
    options = parse_options(args)
    analyse(config, args.out, options, preset=getattr(args, "preset", None))
    store = RunDir(args.out)
    print(store.analysis_path("mtt", "md").read_text(), end="")
    print(f"wrote {store.analysis_dir}/mtt.{{md,json,png}} and {store.mtt_dir}/")
