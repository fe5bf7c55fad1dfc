"""Why naive trajectory matching fails for SSL (``mkdt analyze mtt``; the paper's Fig. 1b/c and
appendix A.2).

Three distillations start from the same images (the run's init subset ``distill.init``, normalised
pixels) and run for ``--iterations`` (default 100, A.2) with the same image learning rate
(``--lr-img``, default 1000, A.2), the same SGD momentum (``distill.momentum``), the same synthetic
batch (``--batch-syn``, default ``distill.batch_syn``) and a learnable step size alpha_syn (see
below for its initial value and learning rate), each segment starting at expert epoch 0 (A.2: max
start epoch 0). Every iteration draws one expert k uniformly from the first ``--experts`` (default 2), starts
the student at theta*_{k,0}, takes N SGD steps on synthetic mini-batches and scores theta_N with
:func:`mkdt.nn.losses.matching_distance` against theta*_{k,M}; the gradient with respect to the
pixels and alpha_syn comes from the full autograd graph through the N steps (unrolled,
``torch.func.functional_call`` on a flat parameter vector; N is small here).

- ``mtt_ssl`` (MTT-SSL, N = ``--ssl-steps`` 10, M = ``--ssl-epochs`` 2): experts trained with
  Barlow Twins on D_real (Adam, lr ``--ssl-lr`` 1e-3, weight decay 1e-6, batch ``--ssl-batch``,
  constant lr; A.2) as encoder (the student network ``experts.student`` without its KD head) + a
  small Barlow Twins projector (:func:`mkdt.nn.ssl.barlow_twins_projector`, width
  ``--projector-dim``, loss :class:`mkdt.nn.ssl.BarlowTwinsLoss` with ``teacher.bt_lambda``). The
  inner loop minimises the same Barlow Twins loss of two views of each synthetic mini-batch.
- ``mtt_sl`` (MTT-SL, N = ``--sl-steps`` 20, M = ``--sl-epochs`` 4): experts trained with
  cross-entropy on D_real's labels through a linear head on the student's features (SGD, lr
  ``--sl-lr`` 0.01, batch ``--sl-batch`` 256, no momentum or weight decay; A.2), no augmentation.
  The inner loop minimises the cross-entropy of the synthetic images with their fixed labels (the
  labels of the init subset's real images).
- ``mkdt``: the library's :class:`mkdt.train.matching.Distiller` (unrolled backend) on the first
  ``--experts`` of the run's KD experts, with the run's distill config (N = ``distill.syn_steps``,
  M = ``distill.expert_epochs``, KD loss to the fixed teacher targets) except: ``--iterations``,
  ``--lr-img`` (A.2's 1000 for all three, so the pixel changes compare), start epoch 0
  (``max_start_epoch`` 1), one segment per iteration, ``--batch-syn`` and the initial alpha below.

The matched parameters are every parameter of the network the experts train: encoder + projector
(``mtt_ssl``), encoder + linear classifier (``mtt_sl``), encoder + KD head (``mkdt``).

Differentiable augmentation (:class:`DiffAugment`, used by the MTT-SSL experts AND its inner loop,
so the two see the same view distribution): :class:`mkdt.nn.augment.SSLAugment` takes uint8 images
only (its pipeline converts, clamps and normalises), so it cannot be applied to learned float
pixels. ``DiffAugment`` maps normalised float images to normalised float views with per-image
parameters drawn from a generator: random resized crop (area 0.2-1, aspect 3/4-4/3) + horizontal
flip (p 0.5) as one ``affine_grid`` / ``grid_sample`` (bilinear, border padding), colour jitter
with p 0.8 (brightness, contrast, saturation 0.4 each, as SSLAugment, in [0, 1] pixel units),
grayscale with p 0.2; no hue, blur, solarisation or clamping. Given its drawn parameters a view is
an affine (and exactly differentiable) function of the pixels.

Initial alpha_syn (``--alpha``). ``auto`` (default): ``mkdt`` starts at ``distill.lr_init`` (the
run's config); ``mtt_sl`` at its experts' SGD lr ``--sl-lr`` (MTT's convention: the synthetic lr
starts at the expert's); ``mtt_ssl``, whose Adam experts have no SGD lr to start from, at the
value of :data:`ALPHA_GRID` whose N plain inner steps from theta*_{0,0} on the init images (one
draw of batches and views) end closest to theta*_{0,M} -- the best start MTT-SSL can get, so its
failure to learn is not a bad-alpha artefact. ``grid`` picks every method's start that way; a
number sets all three. The experts' learning rates are not comparable across methods (Adam vs
SGD, different losses), so one shared number would start some methods far off.

Learning rate of alpha_syn (``--lr-lr``): by default ``distill.lr_lr * (alpha_0 /
distill.lr_init)^2`` for a method whose initial alpha is alpha_0. Scaling an inner loss by c
scales its best step size by 1/c and dL/dalpha by c, so alpha's relative change per iteration is
lr_lr * c^2 * const: with the rule every method's alpha moves, relative to its size, as the run's
config moves MKDT's (whose alpha_0 = ``distill.lr_init`` keeps ``distill.lr_lr``). A shared number
made MTT-SSL's alpha (Barlow Twins gradients are large, its alpha_0 small) jump negative in one
iteration. The pixel gradients need no such rule: they do not change when the inner loss is
rescaled together with its step size. A number given to ``--lr-lr`` applies to all three.

Recorded per iteration: the matching loss (before that iteration's update, as the distill stage
logs it), the mean absolute change of the pixels from the init images after the update (in the
normalised space, (x / 255 - mean) / std; the table also gives the final value in 0-255 pixel
units) and alpha_syn. Writes ``RUN/analysis/mtt.json`` (curves and settings), ``mtt.md`` (table),
``mtt.png`` (loss and pixel change vs iteration, one line per method: Fig. 1b/c) and
``RUN/analysis/mtt/`` (the MTT-SSL / MTT-SL expert trajectories, reused by a rerun with the same
settings, and ``mtt_ssl.safetensors``: the MTT-SSL distilled set in the distill stage's format,
with the run's teacher targets of the init images as its targets, so it can be KD pre-trained and
evaluated like ``mkdt``; :func:`load_mtt_ssl` reads it). That set's ``lr`` is ``evaluate.lr``, the
KD pre-training lr of the real subsets: MTT-SSL's learned alpha_syn is a step size for SGD on the
Barlow Twins loss of encoder + projector, not a KD learning rate (it is kept in the metadata as
``alpha_ssl``).

Cost: an iteration is N x batch (x 2 views for MTT-SSL) forward passes with a double backward; on
2 CPU cores (ConvNetD3 width 32, 32x32 images, batch 100) about 4-5 s per iteration and method,
plus one MTT-SSL expert epoch about 16 s (batch 1024) and one MTT-SL epoch about 8 s. On such a
machine lower ``--iterations`` and ``--experts`` (the table says what was scaled down).

Every random choice derives from ``seed``: expert k of method m is initialised from
``derive_seed(seed, "mtt", m, "expert", k, "init")`` and draws its batches / views from
``... "order"`` / ``... "augment"``; the distillations draw from ``derive_seed(seed, "mtt", m,
"distill")`` and the alpha search from ``derive_seed(seed, "mtt", m, "alpha")``. The MTT-SSL and
MTT-SL inner loops run in float32 (the config's precision applies to ``mkdt``'s Distiller only).
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
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mkdt.analysis.common import comma_list, open_run
from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.errors import ArtifactError, ConfigError, TrainingDiverged
from mkdt.files import (
    atomic_path,
    fingerprint,
    load_tensors,
    read_metadata,
    save_tensors,
    write_json,
    write_text,
)
from mkdt.graph import defining
from mkdt.nn.losses import KDLoss, matching_distance
from mkdt.nn.models import build_network, feature_dim, features_of, flatten_params, unflatten_params
from mkdt.nn.ssl import BarlowTwinsLoss, barlow_twins_projector
from mkdt.runtime import Runtime, derive_seed, generator, progress, seeded
from mkdt.store import RunDir, SyntheticSet
from mkdt.train.kd import Trajectory
from mkdt.train.matching import Distiller, sample_batches

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
SET_FILE = "mtt_ssl.safetensors"
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

    text, methods = comma_list(get("methods"))
    bad = sorted(set(methods) - set(METHODS))
    if not methods or bad or len(set(methods)) != len(methods):
        raise ConfigError(
            f"--methods {text!r}: give distinct methods from {', '.join(METHODS)}, comma-separated"
        )
    alpha_text = str(getattr(args, "alpha", None) or "auto")
    alpha: float | None = None
    alpha_mode = alpha_text if alpha_text in ("auto", "grid") else "value"
    if alpha_mode == "value":
        try:
            alpha = float(alpha_text)
        except ValueError:
            raise ConfigError(f"--alpha must be auto, grid or a number > 0, got {alpha_text!r}") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"--alpha must be auto, grid or a finite number > 0, got {alpha_text!r}")
    lr_lr = getattr(args, "lr_lr", None)
    if lr_lr is not None and not (math.isfinite(float(lr_lr)) and float(lr_lr) > 0):
        raise ConfigError(f"--lr-lr must be a finite number > 0, got {lr_lr}")
    ints = ("iterations", "experts", "ssl_steps", "ssl_epochs", "projector_dim", "sl_steps", "sl_epochs")
    values = {name: int(get(name)) for name in ints}
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    batch_syn = getattr(args, "batch_syn", None)
    if batch_syn is not None and int(batch_syn) < 2:
        raise ConfigError(
            f"--batch-syn must be >= 2 (Barlow Twins standardises along the batch), got {batch_syn}"
        )
    if int(get("ssl_batch")) < 2:
        raise ConfigError(
            f"--ssl-batch must be >= 2 (Barlow Twins standardises along the batch), got {get('ssl_batch')}"
        )
    if int(get("sl_batch")) < 1:
        raise ConfigError(f"--sl-batch must be >= 1, got {get('sl_batch')}")
    rates = {"lr_img": float(get("lr_img")), "ssl_lr": float(get("ssl_lr")), "sl_lr": float(get("sl_lr"))}
    for name, lr in rates.items():
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0, got {lr}")
    return Options(
        methods=tuple(m for m in METHODS if m in methods),
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


# ---------------------------------------------------------------- differentiable augmentation


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view of b images."""

    affine: torch.Tensor  # (b, 2, 3): crop + flip, output -> input coordinates
    colour: torch.Tensor  # (b, 3): brightness, contrast, saturation factors (1 = unchanged)
    gray: torch.Tensor  # (b,) bool: grayscale


class DiffAugment:
    """Random SSL views of NORMALISED FLOAT images, differentiable w.r.t. the pixels (see the
    module docstring): ``sample`` draws per-image parameters from a generator, ``apply`` maps
    (b, C, H, W) normalised images to normalised views of the same size."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float] = (0.4, 0.4, 0.4),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
    ) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_scale, self.crop_ratio, self.flip_p = crop_scale, crop_ratio, flip_p
        self.jitter, self.jitter_p, self.grayscale_p = jitter, jitter_p, grayscale_p

    def describe(self) -> dict[str, Any]:
        """The augmentation's settings (JSON-able; part of the SSL experts' definition)."""
        return {
            "crop_scale": list(self.crop_scale),
            "crop_ratio": list(self.crop_ratio),
            "flip_p": self.flip_p,
            "jitter": list(self.jitter),
            "jitter_p": self.jitter_p,
            "grayscale_p": self.grayscale_p,
        }

    def sample(self, b: int, gen: torch.Generator, device: torch.device) -> ViewParams:
        """Parameters of one view of b images, drawn from ``gen`` (on its device), moved to ``device``."""

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=gen, device=gen.device)

        area = uniform(*self.crop_scale)
        log_r = uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1)
        cx, cy = (1 - w) * uniform(-1, 1), (1 - h) * uniform(-1, 1)
        sign = 1 - 2 * (uniform(0, 1) < self.flip_p).float()
        affine = torch.zeros(b, 2, 3, device=gen.device)
        affine[:, 0, 0], affine[:, 0, 2], affine[:, 1, 1], affine[:, 1, 2] = sign * w, cx, h, cy
        apply = uniform(0, 1) < self.jitter_p
        factors = torch.stack([uniform(max(0.0, 1 - s), 1 + s) for s in self.jitter], dim=1)
        colour = torch.where(apply[:, None], factors, torch.ones_like(factors))
        gray = uniform(0, 1) < self.grayscale_p
        return ViewParams(affine.to(device), colour.to(device), gray.to(device))

    @staticmethod
    def _luma(u: torch.Tensor) -> torch.Tensor:
        if u.shape[1] != 3:
            return u.mean(dim=1, keepdim=True)
        w = torch.tensor((0.299, 0.587, 0.114), dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
        return (u * w).sum(dim=1, keepdim=True)

    def apply(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """The view of normalised images ``x`` (b, C, H, W) with parameters ``p``: crop + flip,
        brightness, contrast, saturation, grayscale in [0, 1] units, normalised again."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        u = x * std + mean
        grid = F.affine_grid(p.affine.to(x.dtype), list(u.shape), align_corners=False)
        u = F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=False)
        f = p.colour.to(x.dtype)
        u = u * f[:, 0].view(-1, 1, 1, 1)
        c = f[:, 1].view(-1, 1, 1, 1)
        u = c * u + (1 - c) * self._luma(u).mean(dim=(1, 2, 3), keepdim=True)
        if u.shape[1] == 3:
            s = f[:, 2].view(-1, 1, 1, 1)
            u = s * u + (1 - s) * self._luma(u)
            u = torch.where(p.gray.view(-1, 1, 1, 1), self._luma(u).expand_as(u), u)
        return (u - mean) / std

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random view of ``x`` (parameters drawn from ``gen``)."""
        return self.apply(x, self.sample(len(x), gen, x.device))


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


# ---------------------------------------------------------------- inner loops

StepLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, int, torch.Tensor], torch.Tensor]
"""(parameters by name, the batch's images, step n, the batch's indices) -> the inner loss."""
LossMaker = Callable[[torch.Tensor, torch.Generator], StepLoss]
"""(the (N, b) batches of one iteration, generator) -> the step loss of that iteration (draws its
randomness, e.g. the views, from the generator once, so the loss is a fixed function of the pixels)."""


def _float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (a bfloat16 forward is scored in float32; float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ssl_loss_maker(net: nn.Module, augment: DiffAugment, loss_fn: nn.Module) -> LossMaker:
    """MTT-SSL's inner loss: Barlow Twins of two views of the batch (each step's views drawn once
    per iteration, view 1 then view 2, step by step)."""

    def make(batches: torch.Tensor, gen: torch.Generator) -> StepLoss:
        device = batches.device
        views = [(augment.sample(len(i), gen, device), augment.sample(len(i), gen, device)) for i in batches]

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, n: int, idx: torch.Tensor) -> torch.Tensor:
            z1 = torch.func.functional_call(net, params, (augment.apply(x, views[n][0]),))
            z2 = torch.func.functional_call(net, params, (augment.apply(x, views[n][1]),))
            return loss_fn(_float(z1), _float(z2))

        return loss

    return make


def ce_loss_maker(net: nn.Module, labels: torch.Tensor) -> LossMaker:
    """MTT-SL's inner loss: cross-entropy of the batch with its fixed labels."""

    def make(batches: torch.Tensor, gen: torch.Generator) -> StepLoss:
        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, n: int, idx: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(_float(torch.func.functional_call(net, params, (x,))), labels[idx])

        return loss

    return make


def kd_loss_maker(net: nn.Module, targets: torch.Tensor) -> LossMaker:
    """MKDT's inner loss (the Distiller's): KD regression onto the fixed teacher targets."""
    kd = KDLoss()

    def make(batches: torch.Tensor, gen: torch.Generator) -> StepLoss:
        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, n: int, idx: torch.Tensor) -> torch.Tensor:
            return kd(torch.func.functional_call(net, params, (x,)), targets[idx])

        return loss

    return make


def unrolled_matching(
    net: nn.Module,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    lr: torch.Tensor,
    batches: torch.Tensor,
    step_loss: StepLoss,
) -> torch.Tensor:
    """L_DD of one segment with the full autograd graph through N = len(batches) SGD steps
    theta_{n+1} = theta_n - lr * grad step_loss(theta_n, images[b_n]); differentiable w.r.t.
    ``images`` and ``lr`` (as :func:`mkdt.train.matching.unrolled_matching_loss`, any inner loss)."""
    with torch.enable_grad():
        theta = start.detach().requires_grad_(True)
        for n, idx in enumerate(batches):
            loss = step_loss(unflatten_params(net, theta), images[idx], n, idx)
            grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
            theta = theta - lr * grad
        return matching_distance(theta[None], start[None], target[None])


def inner_descent(
    net: nn.Module,
    start: torch.Tensor,
    images: torch.Tensor,
    lr: float,
    batches: torch.Tensor,
    step_loss: StepLoss,
) -> torch.Tensor:
    """theta_N of the same N steps without a graph (the alpha search; the tests)."""
    theta = start.detach()
    images = images.detach()
    for n, idx in enumerate(batches):
        with torch.enable_grad():
            theta = theta.requires_grad_(True)
            grad = torch.autograd.grad(step_loss(unflatten_params(net, theta), images[idx], n, idx), theta)[0]
        theta = (theta - lr * grad).detach()
    return theta


def choose_alpha(
    net: nn.Module,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    steps: int,
    batch: int,
    make_loss: LossMaker,
    gen: torch.Generator,
) -> tuple[float, dict[str, float]]:
    """The value of :data:`ALPHA_GRID` whose N inner steps from ``start`` end closest to
    ``target`` (one draw of batches and views, the same for every value), with every distance."""
    batches = sample_batches(len(images), batch, steps, gen).to(images.device)
    step_loss = make_loss(batches, gen)
    scores: dict[str, float] = {}
    for alpha in ALPHA_GRID:
        theta = inner_descent(net, start, images, alpha, batches, step_loss)
        scores[f"{alpha:g}"] = float(matching_distance(theta[None], start[None], target[None]))
    finite = {a: s for a, s in scores.items() if math.isfinite(s)}
    if not finite:
        raise TrainingDiverged("mtt analysis: every initial alpha of the grid diverged; set --alpha")
    best = min(finite, key=lambda a: finite[a])
    return float(best), scores


class Matching(Protocol):
    """What the loop reads of a matcher (:class:`Matcher` or the library's Distiller)."""

    images: torch.Tensor
    lr: torch.Tensor

    def step(self) -> torch.Tensor: ...


class Matcher:
    """MTT with any inner loss (unrolled): the learnable images and alpha_syn, their SGD optimizers
    (as :class:`mkdt.train.matching.Distiller`); one :meth:`step` is one iteration."""

    def __init__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        bank: torch.Tensor,
        steps: int,
        batch: int,
        make_loss: LossMaker,
        alpha: float,
        lr_img: float,
        lr_lr: float,
        momentum: float,
        gen: torch.Generator,
    ) -> None:
        self.net, self.bank, self.steps, self.batch, self.make_loss, self.gen = (
            net,
            bank,
            steps,
            batch,
            make_loss,
            gen,
        )
        self.images = images.detach().clone().requires_grad_(True)
        self.lr = torch.tensor(alpha, device=images.device, requires_grad=True)
        self.opt_images = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=lr_lr, momentum=momentum)

    def step(self) -> torch.Tensor:
        """Draw an expert (start epoch 0), batches and views; match; update the pixels and alpha."""
        g = self.gen
        k = int(torch.randint(len(self.bank), (1,), generator=g, device=g.device).item())
        start, target = self.bank[k, 0], self.bank[k, -1]
        batches = sample_batches(len(self.images), self.batch, self.steps, g).to(self.images.device)
        step_loss = self.make_loss(batches, g)
        loss = unrolled_matching(self.net, start, target, self.images, self.lr, batches, step_loss)
        self.images.grad, self.lr.grad = torch.autograd.grad(loss, (self.images, self.lr))
        self.opt_images.step()
        self.opt_lr.step()
        return loss.detach()


def run_matching(name: str, matcher: Matching, iterations: int) -> dict[str, list[float]]:
    """``iterations`` steps of ``matcher``: the loss, the mean |pixel change| from the start
    (normalised space) and alpha_syn after each; a non-finite loss or alpha raises TrainingDiverged."""
    init = matcher.images.detach().clone()
    curves: dict[str, list[float]] = {"loss": [], "pixel_change": [], "alpha": []}
    bar = progress(range(iterations), desc=f"mtt {name}", unit="it")
    for it in bar:
        loss = float(matcher.step())
        alpha = float(matcher.lr.detach())
        if not (math.isfinite(loss) and math.isfinite(alpha)):
            raise TrainingDiverged(
                f"mtt analysis: {name} diverged at iteration {it + 1} (non-finite loss or alpha_syn); "
                "lower --lr-img or --lr-lr, or set --alpha"
            )
        curves["loss"].append(loss)
        curves["pixel_change"].append(float((matcher.images.detach() - init).abs().mean()))
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


def expert_path(store: RunDir, method: str, k: int) -> Path:
    """``RUN/analysis/mtt/<method>_expert_KKKK.safetensors``."""
    return store.path / "analysis" / "mtt" / f"{method}_expert_{k:04d}.safetensors"


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
        path = expert_path(store, method, k)
        fp = fingerprint(definition | {"index": k})
        try:
            found = path.is_file() and read_metadata(path).get("fingerprint") == fp
        except ArtifactError:
            found = False
        if found:
            tensors = load_tensors(path)[0]
            out.append(Trajectory(tensors["params"], tuple(tensors["epochs"].tolist()), tensors["loss"]))
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
        tensors = {
            "params": trajectory.params,
            "epochs": torch.tensor(trajectory.epochs),
            "loss": trajectory.loss,
        }
        save_tensors(path, tensors, {"fingerprint": fp, "defining": definition, "index": k})
        out.append(trajectory)
        reused.append(False)
    return out, reused


# ---------------------------------------------------------------- the MTT-SSL set


def mtt_ssl_path(store: RunDir) -> Path:
    """``RUN/analysis/mtt/mtt_ssl.safetensors`` (:attr:`RunDir.mtt_ssl_path`)."""
    return store.mtt_ssl_path


def save_mtt_ssl(
    store: RunDir, synthetic: SyntheticSet, mean: Sequence[float], std: Sequence[float], meta: dict[str, Any]
) -> None:
    """The MTT-SSL set in the distill stage's format (``images``, ``targets``, ``lr``; metadata
    ``mean``, ``std``, ``iterations``) plus ``meta``."""
    if synthetic.lr <= 0 or not math.isfinite(synthetic.lr) or not torch.isfinite(synthetic.images).all():
        raise ArtifactError(
            "the MTT-SSL set has non-finite images; lower --lr-img and rerun `mkdt analyze mtt`"
        )
    save_tensors(
        mtt_ssl_path(store),
        {"images": synthetic.images, "targets": synthetic.targets, "lr": torch.tensor(synthetic.lr)},
        {"mean": list(mean), "std": list(std), **meta},
    )


def load_mtt_ssl(store: RunDir) -> SyntheticSet:
    """The MTT-SSL distilled set of a run (:meth:`RunDir.load_mtt_ssl`)."""
    return store.load_mtt_ssl()


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
    store, rt, real, z = run.store, run.runtime, run.real, run.targets
    check_against_run(options, config, real.num_train)
    data, dev, d = real.data, rt.device, config.distill
    indices = store.load_indices(config.init.images)[d.init].to(dev)
    init_images, init_targets = real.inputs[indices], z[indices]
    init_labels = data.train_labels.to(dev)[indices]
    augment = DiffAugment(data.mean, data.std)
    batch = batch_syn(options, config)
    t_all = time.perf_counter()
    methods: dict[str, Any] = {}
    matchers: dict[str, Matching] = {}
    for method in options.methods:
        t0 = time.perf_counter()
        steps, epochs = steps_and_epochs(options, config, method)
        net: nn.Module
        if method == "mkdt":
            fp = fingerprint(defining(config, "experts"))
            trajectories = [store.load_expert(k, fp, list(range(epochs + 1))) for k in range(options.experts)]
            reused = [True] * options.experts
            net = build_network(config.experts.student, data.channels, data.image_size, z.shape[1]).to(dev)
            make_loss = kd_loss_maker(net, init_targets)
            inner = "KD (MSE to teacher targets)"
        else:
            trajectories, reused = expert_trajectories(config, options, method, store, real, augment)
            if method == "mtt_ssl":
                net = ssl_network(config, data.channels, data.image_size, options.projector_dim).to(dev)
                make_loss = ssl_loss_maker(net, augment, BarlowTwinsLoss(config.teacher.bt_lambda))
                inner = "Barlow Twins of 2 views"
            else:
                net = sl_network(config, data.channels, data.image_size, data.num_classes).to(dev)
                make_loss = ce_loss_maker(net, init_labels)
                inner = "cross-entropy, fixed labels"
        net.train()
        bank = torch.stack([torch.stack([t.at(0), t.at(epochs)]) for t in trajectories]).to(dev)
        grid: dict[str, float] = {}
        if options.alpha is not None:
            alpha = options.alpha
        elif options.alpha_mode == "auto" and method == "mkdt":
            alpha = d.lr_init
        elif options.alpha_mode == "auto" and method == "mtt_sl":
            alpha = options.sl_lr
        else:
            alpha_gen = generator(derive_seed(config.seed, "mtt", method, "alpha"), dev)
            alpha, grid = choose_alpha(
                net, bank[0, 0], bank[0, 1], init_images, steps, batch, make_loss, alpha_gen
            )
        lr_lr = alpha_lr(options, config, alpha)
        gen = generator(derive_seed(config.seed, "mtt", method, "distill"), dev)
        matcher: Matching
        if method == "mkdt":
            recipe = dataclasses.replace(
                d,
                iterations=options.iterations,
                lr_img=options.lr_img,
                max_start_epoch=1,
                lr_init=alpha,
                lr_lr=lr_lr,
                trajectories=1,
                batch_syn=batch,
                backend="unrolled",
            )
            matcher = Distiller(
                net, rt.images(init_images), init_targets, trajectories, recipe, gen, "unrolled", rt
            )
        else:
            matcher = Matcher(
                net,
                init_images,
                bank,
                steps,
                batch,
                make_loss,
                alpha,
                options.lr_img,
                lr_lr,
                d.momentum,
                gen,
            )
        curves = run_matching(method, matcher, options.iterations)
        matchers[method] = matcher
        methods[method] = {
            "N": steps,
            "M": epochs,
            "inner_loss": inner,
            "alpha_init": alpha,
            "alpha_grid": grid,
            "lr_lr": lr_lr,
            "experts_reused": reused,
            "expert_loss": [t.loss.tolist() for t in trajectories],
            **curves,
            "summary": summarise(curves, data.std),
            "seconds": time.perf_counter() - t0,
        }
    spec = config.experts.student
    student = f"{spec.arch} width {spec.width}" + (f" depth {spec.depth}" if spec.arch == "convnet" else "")
    scaled = [
        f"{options.iterations} iterations"
        + (" (the paper: 100)" if options.iterations != 100 else " (as the paper)"),
        f"{options.experts} expert(s) per method (the paper's Fig. 1b: a single expert)",
        f"D_real = the run's {real.num_train} images and student {student} "
        "(the paper: CIFAR100, 3-layer ConvNet)",
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
    record: dict[str, Any] = {
        "settings": {
            "run": str(store.path),
            "data": config.data.name,
            "num_images": real.num_train,
            "seed": config.seed,
            "student": student,
            "init": d.init,
            "syn_images": len(init_images),
            "iterations": options.iterations,
            "experts": options.experts,
            "lr_img": options.lr_img,
            "lr_lr_rule": alpha_lr_rule(options, config),
            "momentum": d.momentum,
            "batch_syn": batch,
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
            "std": list(data.std),
            "scaled_down": scaled,
            "paper": PAPER,
            "alpha_grid": list(ALPHA_GRID),
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t_all,
        },
        "methods": methods,
    }
    record["verdict"] = verdict(methods)
    if not rt.is_main:
        return record
    if "mtt_ssl" in matchers:
        ssl = matchers["mtt_ssl"]
        synthetic = SyntheticSet(ssl.images.detach().cpu(), init_targets.cpu(), config.evaluate.lr)
        meta = {
            "iterations": options.iterations,
            "alpha_ssl": float(ssl.lr.detach()),
            "lr_note": "lr = evaluate.lr (KD pre-training lr of real subsets); alpha_ssl is "
            "MTT-SSL's learned "
            "step size for SGD on the Barlow Twins loss, not a KD learning rate",
            "targets_note": "the run's teacher targets of the init images",
        }
        save_mtt_ssl(store, synthetic, data.mean, data.std, meta)
    folder = store.path / "analysis"
    write_json(folder / "mtt.json", record)
    write_text(folder / "mtt.md", render_table(record))
    plot(record, folder / "mtt.png")
    return record


def main(args: argparse.Namespace, config: Config) -> None:
    """Check the options, run the analysis on ``args.out``, print the table."""
    options = parse_options(args)
    analyse(config, args.out, options, preset=getattr(args, "preset", None))
    folder = Path(args.out) / "analysis"
    print((folder / "mtt.md").read_text(), end="")
    print(f"wrote {folder}/mtt.{{md,json,png}} and {folder}/mtt/")
