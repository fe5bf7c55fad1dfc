"""The typed configuration: one dataclass per concern, each validating its own fields.

One default :class:`Config` holds every key, grouped by stage; its defaults are the paper's
CIFAR-10 settings (docs/method.md). Every section has a ``validate()`` that raises
:class:`ConfigError` naming the first bad key; :meth:`Config.validate` runs them all, then the
checks that span sections. Vocabularies come from the modules that own them (model names, SSL
methods), or from :mod:`mkdt.methods` (evaluation methods and protocols, init subsets, backends, SAS
proxies), so the config does not import the training library or the run directory's store.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mkdt.data.registry import dataset_names
from mkdt.errors import ConfigError
from mkdt.methods import (
    BACKENDS,
    EVAL_METHODS,
    INIT_METHODS,
    METHOD_CHOICES,
    OPTIONAL_METHODS,
    PROTOCOLS,
    SAS_PROXIES,
    is_method,
    parse_method,
)
from mkdt.nn.models import DEFAULT_WIDTHS, MODEL_NAMES, STEMS
from mkdt.nn.ssl import SSL_METHODS
from mkdt.runtime import PRECISIONS


def opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's vocabulary
    """A config field with its documentation (shown by ``mkdt <stage> --help``)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value)
    return type(value)(value)


def check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError ``invalid config KEY: MESSAGE`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid config {key}: {message}")


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and a CUDA device only where one exists."""
    check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None,
        "device",
        "must be auto, cpu, cuda or cuda:N",
    )
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        check(
            index < count,
            "device",
            f"{device} is not available here ({count} CUDA device(s)); use device=cpu or device=auto",
        )


MISSING_TASKS = ("error", "skip")  # evaluate.missing_tasks
SELECTIONS = ("tuned", "fixed")  # evaluate.selection


def parse_task(entry: str) -> tuple[str, str | None]:
    """An ``evaluate.tasks`` entry: ``"name"`` -> (name, None); ``"name=root"`` -> (name, root)."""
    name, sep, root = (part.strip() for part in entry.partition("="))
    if not name or (sep and not root):
        raise ConfigError(
            f"invalid evaluate.tasks entry {entry!r}: expected a dataset name or "
            "name=root (e.g. cifar100=/data/cifar100)"
        )
    return name, root or None


def check_task(entry: str) -> None:
    """An ``evaluate.tasks`` entry: a registered dataset, an existing path, or ``name=root``."""
    name, root = parse_task(entry)
    known = name in dataset_names() or (root is None and Path(name).expanduser().exists())
    check(
        known,
        "evaluate.tasks",
        f"unknown task {name!r}: choose from {', '.join(dataset_names())}, "
        "an existing ImageFolder path, or name=root",
    )


def check_distinct(values: list[Any], key: str) -> None:
    """Raise ConfigError naming the first value that the list ``key`` gives more than once (each
    entry is work done and records written, so a repeat would do it twice)."""
    seen: set[Any] = set()
    for value in values:
        check(value not in seen, key, f"{value!r} is listed twice; list each once")
        seen.add(value)


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    check(value in allowed, key, f"must be {' or '.join([', '.join(allowed[:-1]), allowed[-1]])}")


def _at_least(section: Any, prefix: str, keys: tuple[str, ...], low: int = 1) -> None:
    for key in keys:
        check(getattr(section, key) >= low, f"{prefix}.{key}", f"must be >= {low}")


def _rate(value: float, key: str) -> None:
    check(math.isfinite(value) and value > 0, key, "must be a finite number > 0")


def _momentum(value: float, key: str) -> None:
    check(0 <= value < 1, key, "must be in [0, 1)")


@dataclass
class DataConfig:
    """The real data D_real: which dataset, where its files are, its resolution and pool."""

    name: str = opt(
        "digits",
        "dataset: digits, cifar10, cifar100, tinyimagenet, fashion-mnist, "
        "imagefolder, or a path to an ImageFolder tree/archive",
    )
    root: str | None = opt(
        None,
        "folder or archive holding the raw files (default: the dataset's usual place, or $MKDT_DATA/<name>)",
    )
    download: bool = opt(False, "download the dataset with torchvision if it is missing")
    cache_dir: str | None = opt(
        None, "where decoded uint8 tensors are cached (default $MKDT_CACHE or ~/.cache/mkdt)"
    )
    resolution: int | None = opt(None, "resize images to this side in pixels (default: native)")
    pool_size: int | None = opt(
        None,
        "use a class-balanced subset of this many training images as the real data D_real (default: all)",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        check(self.resolution is None or self.resolution >= 4, "data.resolution", "must be >= 4")
        check(self.pool_size is None or self.pool_size >= 2, "data.pool_size", "must be >= 2")


@dataclass
class ModelConfig:
    """A network: its name, size and (ResNets) first layers.

    A width of 0 (the default) becomes the architecture's width when the section is built: 128 for
    the ConvNet, 64 for ResNets (the paper's), so a section that names a ResNet without a width,
    such as ``evaluate.model.arch=resnet10``, gets 64; an explicit width wins.
    """

    arch: str = opt("convnet", "network: " + ", ".join(MODEL_NAMES))
    width: int = opt(
        0,
        "channels of the first stage (ConvNet: every block; ResNet: x1,2,4,8); "
        "0 = the arch's default: ConvNet 128, ResNets 64",
    )
    depth: int = opt(3, "ConvNet blocks (3 for 32x32 inputs, 4 for 64x64); ignored by ResNets")
    stem: str = opt(
        "cifar",
        "ResNet first layers: cifar (3x3 conv, stride 1, padding 1, no max-pool), cifar-pad2 (the "
        "same with padding 2: solo-learn's and KRR-ST's CIFAR checkpoints), imagenet (7x7 conv, "
        "stride 2, padding 3, then 3x3 max-pool, stride 2); the ConvNet takes only cifar",
    )

    def __post_init__(self) -> None:
        """Width 0 -> the architecture's default width (an unknown arch keeps 0 for validate())."""
        if self.width == 0:
            self.width = DEFAULT_WIDTHS.get(self.arch, 0)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the first bad key (under ``prefix``)."""
        _one_of(self.arch, MODEL_NAMES, f"{prefix}.arch")
        check(self.width >= 1 and self.depth >= 1, prefix, "width and depth must be >= 1")
        _one_of(self.stem, tuple(STEMS), f"{prefix}.stem")
        check(
            self.arch != "convnet" or self.stem == "cifar",
            f"{prefix}.stem",
            f"{self.stem} applies to ResNets only; the ConvNet has no stem option (leave it at cifar)",
        )


@dataclass
class TeacherConfig:
    """Stage 1: the SSL teacher's recipe, or the checkpoint to load instead."""

    checkpoint: str | None = opt(
        None,
        "load this ResNet encoder (.safetensors or torch file; torchvision, solo-learn, lightly or "
        "f.N keys, see README) instead of training one; teacher.model.stem must name its first layers",
    )
    method: str = opt("barlow_twins", "SSL method: " + " or ".join(SSL_METHODS))
    model: ModelConfig = opt(ModelConfig(arch="resnet18", width=64), "teacher encoder")
    epochs: int = opt(1000, "training epochs")
    batch_size: int = opt(256, "images per step (two views each)")
    lr: float = opt(0.01, "Adam learning rate per 256 images (scaled by batch_size/256)")
    weight_decay: float = opt(1e-6, "Adam weight decay")
    warmup_epochs: int = opt(10, "linear warm-up epochs before the cosine schedule")
    projector_dim: int = opt(
        1024, "Barlow Twins projector width (hidden and output); SimCLR projector hidden width"
    )
    simclr_out_dim: int = opt(128, "SimCLR projection output size")
    bt_lambda: float = opt(1 / 128, "Barlow Twins weight of the redundancy-reduction term")
    temperature: float = opt(0.5, "SimCLR temperature")
    checkpoint_every: int = opt(10, "save a resumable training checkpoint every this many epochs")
    probe: bool = opt(True, "linear-probe the teacher's features at the end and report accuracy")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _one_of(self.method, SSL_METHODS, "teacher.method")
        self.model.validate("teacher.model")
        _at_least(
            self, "teacher", ("epochs", "batch_size", "projector_dim", "simclr_out_dim", "checkpoint_every")
        )
        check(self.batch_size >= 2, "teacher.batch_size", "must be >= 2 (batch statistics)")
        check(0 <= self.warmup_epochs <= self.epochs, "teacher.warmup_epochs", "must be in [0, epochs]")
        check(
            self.lr > 0 and self.weight_decay >= 0 and self.bt_lambda >= 0 and self.temperature > 0,
            "teacher",
            "lr and temperature must be > 0, weight_decay and bt_lambda >= 0",
        )
        if self.checkpoint is not None:
            check(
                Path(self.checkpoint).expanduser().is_file(),
                "teacher.checkpoint",
                f"file not found: {self.checkpoint}",
            )


@dataclass
class TargetsConfig:
    """Stage 2: encoding D_real with the teacher."""

    batch_size: int = opt(1024, "images per forward pass when encoding D_real")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _at_least(self, "targets", ("batch_size",))


@dataclass
class ExpertsConfig:
    """Stage 3: the KD students whose trajectories are the experts."""

    num_experts: int = opt(100, "K, the number of expert trajectories")
    epochs: int = opt(20, "KD epochs per expert")
    lr: float = opt(0.1, "SGD learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "SGD weight decay")
    batch_size: int = opt(256, "images per step")
    student: ModelConfig = opt(ModelConfig(), "student network (its head regresses the targets)")
    save_epochs: list[int] | None = opt(
        None,
        "epochs whose weights are stored (0 = init); default: "
        "0..max_start_epoch-1+expert_epochs, 1 and the last. Not "
        "part of the experts' definition: stages that read an "
        "epoch check that it was stored",
    )
    parallel: int = opt(
        0,
        "experts trained at once (stacked weights, one grouped network; 1 = one "
        "at a time), same results within float tolerance; 0 = auto: 10 on CUDA, "
        "1 on CPU (batching measured 0.86x there, see benchmarks/experts.py)",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _at_least(self, "experts", ("num_experts", "epochs", "batch_size"))
        check(
            self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0,
            "experts",
            "need lr > 0, 0 <= momentum < 1, weight_decay >= 0",
        )
        check(self.parallel >= 0, "experts.parallel", "must be >= 0 (0 = auto, 1 = one at a time)")
        self.student.validate("experts.student")
        if self.save_epochs is not None:
            bad = [x for x in self.save_epochs if not 0 <= x <= self.epochs]
            check(not bad, "experts.save_epochs", f"epochs {bad} are outside [0, experts.epochs]")


@dataclass
class InitConfig:
    """Stage 4: the initial subsets (and so the size of the distilled set)."""

    images: int = opt(
        1000,
        "|D_syn|: the size of the initial subsets (high-loss, random and SAS), and so "
        "of the distilled set and of the subset baselines",
    )
    sas_clusters: int | None = opt(
        None,
        "SAS subset: k, the latent classes found by k-means on the teacher's targets; null = the "
        "dataset's number of classes (an assumption: MKDT uses no labels, so set k when the number "
        "of classes is unknown or a different granularity is wanted)",
    )
    sas_views: int = opt(
        2, "SAS subset: augmented views per image that estimate the expected augmentation similarity"
    )
    sas_proxy: str = opt(
        "expert",
        "SAS subset: the proxy encoder of the augmentation similarity: expert (expert 0 at its last "
        "saved epoch, a KD student of the teacher; sas_views student passes over D_real) or teacher "
        "(the teacher's features; sas_views teacher passes, slow on a CPU)",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _at_least(self, "init", ("images", "sas_views"))
        check(
            self.sas_clusters is None or self.sas_clusters >= 1, "init.sas_clusters", "must be null or >= 1"
        )
        _one_of(self.sas_proxy, SAS_PROXIES, "init.sas_proxy")


@dataclass
class DistillConfig:
    """Stage 5: trajectory matching."""

    init: str = opt(
        "high_loss",
        "initial images: high_loss (top KD loss under the experts' epoch-1 "
        "weights), random (a random real subset) or sas (the SAS subset)",
    )
    iterations: int = opt(5000, "trajectory-matching iterations")
    syn_steps: int = opt(40, "N: SGD steps on synthetic mini-batches per iteration")
    expert_epochs: int = opt(2, "M: expert epochs the synthetic steps must match")
    max_start_epoch: int = opt(2, "T+: a trajectory segment starts at an epoch in [0, T+)")
    batch_syn: int = opt(256, "synthetic images per step")
    lr_img: float = opt(1000.0, "SGD learning rate of the pixels")
    lr_lr: float = opt(1e-4, "SGD learning rate of the learnable step size alpha_syn")
    lr_init: float = opt(0.1, "initial alpha_syn")
    momentum: float = opt(0.5, "momentum of every distillation optimizer")
    learn_targets: bool = opt(False, "also learn the synthetic targets Z_syn (the authors' release)")
    lr_targets: float = opt(1.0, "SGD learning rate of Z_syn when learn_targets is true")
    trajectories: int = opt(
        1,
        "B: expert segments matched per iteration (batched with vmap); the "
        "loss is their mean, so B > 1 lowers the gradient's variance",
    )
    backend: str = opt(
        "auto",
        "how the gradient through the N steps is computed (same values): "
        "unrolled (full autograd graph, memory ~ N), recompute (memory "
        "independent of N, about 1.2x the time) or auto (recompute when the "
        "unrolled graph would be large, see BENCHMARKS.md)",
    )
    checkpoint_every: int = opt(100, "save a resumable checkpoint every this many iterations")
    check_window: bool = opt(
        True,
        "before distilling, probe 2 experts at the window's ends and the full-data reference, print "
        "how much of the gain the window holds and warn below 25% (writes analysis/window.*)",
    )
    log_every: int = opt(
        10,
        "read the loss and alpha_syn back from the device (progress bar, "
        "divergence check) every this many iterations",
    )
    snapshots: list[int] = opt(
        [],
        "iterations after which a copy of D_syn is written to distill/snapshot_<it>.safetensors "
        "(the format of synthetic.safetensors), e.g. [1000] for the set of the paper's Table 5. "
        "Not part of the definition: give it before distilling (a finished or resumed run does not "
        "go back; `mkdt distill --force` does)",
    )
    variants: list[str] = opt(
        [],
        'other init subsets to distill from as well, e.g. [random] for the paper\'s "MKDT (Rnd Sub)": '
        "each the same matching (settings and seed) from that subset, into "
        "distill/variants/<subset>/, evaluated as mkdt_<subset>. Not part of the definition: adding "
        "one to a finished run distills it alone; the main set and the later stages stay valid",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _at_least(
            self,
            "distill",
            (
                "iterations",
                "syn_steps",
                "expert_epochs",
                "max_start_epoch",
                "batch_syn",
                "checkpoint_every",
                "trajectories",
                "log_every",
            ),
        )
        _one_of(self.backend, BACKENDS, "distill.backend")
        _one_of(self.init, INIT_METHODS, "distill.init")
        for key in ("lr_img", "lr_lr", "lr_init", "lr_targets"):
            _rate(getattr(self, key), f"distill.{key}")
        _momentum(self.momentum, "distill.momentum")
        bad = [it for it in self.snapshots if not 1 <= it <= self.iterations]
        check(not bad, "distill.snapshots", f"iterations {bad} are outside [1, distill.iterations]")
        check_distinct(self.snapshots, "distill.snapshots")
        check_distinct(self.variants, "distill.variants")
        check(
            set(self.variants) <= set(INIT_METHODS) - {self.init},
            "distill.variants",
            f"{self.variants}: each must be an init subset ({', '.join(INIT_METHODS)}) other than "
            f"distill.init ({self.init})",
        )


@dataclass
class KRRSTConfig:
    """The krr_st stage: KRR-ST (Lee et al., ICLR 2024), the paper's other self-supervised
    distillation, from the same teacher, targets and init subsets (docs/method.md §2.7). The
    defaults are the authors' release (github.com/db-Lee/selfsup_dd, train.py)."""

    init: str = opt(
        "random",
        "initial images (and targets): the init subset random (the release's: a random real subset), "
        "high_loss or sas; of size init.images",
    )
    iterations: int = opt(
        160000,
        "outer steps (the release's 160000 take a GPU; the outer learning rate decays linearly to "
        "1/1000 of krr_st.outer_lr over them)",
    )
    num_models: int = opt(10, "students in the pool whose features the kernel uses")
    online_iterations: int = opt(
        1000,
        "SGD steps a pool student takes on the synthetic set (one per outer step that draws it) "
        "before it is replaced by a fresh one; each starts with a random number of steps in "
        "[1, online_iterations)",
    )
    online_lr: float = opt(
        0.1, "SGD learning rate of the pool students (full-batch MSE on the synthetic set)"
    )
    online_momentum: float = opt(0.9, "SGD momentum of the pool students")
    online_weight_decay: float = opt(1e-3, "SGD weight decay of the pool students")
    outer_lr: float = opt(
        1e-3, "AdamW learning rate of the synthetic images (0-1 pixel units) and targets; no weight decay"
    )
    outer_batch_size: int = opt(1024, "real images per outer step (all of D_real when it has fewer)")
    ridge: float = opt(1e-6, "kernel ridge lambda relative to the trace of the synthetic kernel")
    augment: bool = opt(
        True,
        "true (the release): each real batch is randomly cropped (zero padding of 4 px, side / 8 "
        "below 32 px) and flipped, and its targets are the teacher's features of those images, "
        "computed every step; false: the targets stage's features of the unaugmented images (no "
        "teacher pass: much faster on a CPU)",
    )
    checkpoint_every: int = opt(500, "save a resumable checkpoint every this many outer steps")
    log_every: int = opt(
        10, "read the loss back from the device (progress bar, divergence check) every this many steps"
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _at_least(
            self, "krr_st", ("iterations", "num_models", "outer_batch_size", "checkpoint_every", "log_every")
        )
        _at_least(self, "krr_st", ("online_iterations",), low=2)
        _one_of(self.init, INIT_METHODS, "krr_st.init")
        for key in ("online_lr", "outer_lr", "ridge"):
            _rate(getattr(self, key), f"krr_st.{key}")
        _momentum(self.online_momentum, "krr_st.online_momentum")
        check(
            math.isfinite(self.online_weight_decay) and self.online_weight_decay >= 0,
            "krr_st.online_weight_decay",
            "must be a finite number >= 0",
        )


@dataclass
class FinetuneConfig:
    """The fine-tuning protocol's recipe (KRR-ST's, docs/method.md §5): used when
    ``evaluate.protocols`` lists ``finetune``."""

    steps: int = opt(
        10000,
        "SGD steps of each fine-tuning (KRR-ST: 10000 for CIFAR-10/100 and TinyImageNet, 5000 for "
        "the fine-grained tasks)",
    )
    lr: float = opt(0.01, "SGD learning rate, annealed to 0 by a cosine schedule over the steps")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay (every parameter)")
    batch_size: int = opt(256, "labelled images per step (the last batch of a pass over them may be smaller)")
    augment: bool = opt(
        True,
        "augment each batch: random crop of the zero-padded images (4 px, image side / 8 below 32 px) "
        "and horizontal flip",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        _at_least(self, "evaluate.finetune", ("steps", "batch_size"))
        _rate(self.lr, "evaluate.finetune.lr")
        _momentum(self.momentum, "evaluate.finetune.momentum")
        check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "evaluate.finetune.weight_decay",
            "must be a finite number >= 0",
        )


@dataclass
class EvaluateConfig:
    """Stage 6: pre-training on each set, then linear probes (and fine-tuning)."""

    methods: list[str] = opt(
        list(EVAL_METHODS),
        "pre-training sets to compare: "
        + ", ".join(EVAL_METHODS + OPTIONAL_METHODS)
        + " (not run by default: <subset>@alpha, the lr-matched controls of the fixed protocol; "
        "mtt_ssl, the set of `mkdt analyze mtt`; krr_st, the set of the krr_st stage; mkdt_<subset>, "
        "MKDT "
        "distilled from that init subset, listed in distill.variants), and ext:NAME for each set "
        "imported with `mkdt import NAME SOURCE`",
    )
    tasks: list[str] | None = opt(
        None,
        "downstream tasks as dataset names, or name=root for data "
        "elsewhere (default: the pre-training dataset)",
    )
    missing_tasks: str = opt(
        "error",
        "a task whose files are not found (at its root, or at its default place for a name alone): "
        "error (refuse before any compute) or skip (evaluate the others; one line per skipped task "
        "says how to provide it, the results name it; `mkdt evaluate --force` adds it later)",
    )
    label_fractions: list[float] = opt(
        [0.01, 0.05], "fractions of each task's training labels the linear probe (and fine-tuning) sees"
    )
    class_balanced: bool = opt(False, "sample the labelled fraction class-balanced")
    seeds: int = opt(3, "seeds per setting (each changes the label subset and the pre-training)")
    model: ModelConfig | None = opt(None, "network pre-trained for evaluation (default: experts.student)")
    epochs: int = opt(20, "KD pre-training epochs on each set")
    batch_size: int = opt(256, "KD pre-training batch size")
    lr: float = opt(
        0.1,
        "KD pre-training learning rate of the real sets under evaluate.selection=fixed (distilled sets "
        "use their learned alpha_syn)",
    )
    selection: str = opt(
        "tuned",
        "how each set's pre-training step size is chosen: tuned (every set is pre-trained at each "
        "step size of evaluate.lr_grid, a distilled or imported set also at its own learned one; "
        "the one with the best linear-probe accuracy on a held-out part of the labelled training "
        "images is kept, and every set uses the same student initialisation and batch order per "
        "seed) or fixed (the paper's protocol: real sets at evaluate.lr, distilled sets at their "
        "learned alpha_syn)",
    )
    lr_grid: list[float] = opt(
        [0.03, 0.1, 0.3, 1.0, 3.0],
        "the step sizes tried under evaluate.selection=tuned (x3 to x3.3 apart around the "
        "experts' 0.1; MKDT's learned alpha_syn has been 0.1-0.4; on cifar10-cpu a grid ending "
        "at 1 saw 1 chosen in 22 of 50 choices, hence 3); results.md warns when a set's choice "
        "sits at an end of the grid in most seeds",
    )
    parallel: int = opt(
        0,
        "under evaluate.selection=tuned, how many of one set's step sizes are pre-trained at once "
        "(stacked weights, one grouped network; 1 = one at a time), same results within float "
        "tolerance; 0 = auto: all of them on CUDA, 1 on CPU (batching measured 1.02x there, see "
        "benchmarks/evaluate.py)",
    )
    validation_fraction: float = opt(
        0.2,
        "under evaluate.selection=tuned, the share of each (task, label fraction, seed)'s labelled "
        "images held out to choose the step size (at least one per class that has two or more); "
        "the probe of the choice is then refitted on all of them and tested once",
    )
    momentum: float = opt(0.9, "KD pre-training SGD momentum")
    weight_decay: float = opt(1e-4, "KD pre-training weight decay")
    probe_l2: float = opt(1e-3, "L2 penalty of the linear probe's weights")
    probe_max_iter: int = opt(100, "LBFGS iterations of the linear probe")
    protocols: list[str] = opt(
        ["probe"],
        "downstream protocols, each reported in its own records and table: probe (linear probe on "
        "the frozen features), finetune (a copy of the encoder and a new linear head trained on the "
        "same labelled images, recipe evaluate.finetune)",
    )
    finetune: FinetuneConfig = opt(FinetuneConfig(), "fine-tuning recipe (when protocols lists finetune)")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""
        bad = sorted(m for m in set(self.methods) if not is_method(m))
        check(
            bool(self.methods) and not bad,
            "evaluate.methods",
            f"{bad or 'empty'}: choose from {METHOD_CHOICES}",
        )
        check_distinct(self.methods, "evaluate.methods")
        check(
            bool(self.label_fractions) and all(0 < f <= 1 for f in self.label_fractions),
            "evaluate.label_fractions",
            "must be a non-empty list of numbers in (0, 1]",
        )
        check_distinct(self.label_fractions, "evaluate.label_fractions")
        check(self.tasks is None or len(self.tasks) > 0, "evaluate.tasks", "must be null or non-empty")
        for entry in self.tasks or ():
            check_task(entry)
        check_distinct([parse_task(entry)[0] for entry in self.tasks or ()], "evaluate.tasks")
        _one_of(self.missing_tasks, MISSING_TASKS, "evaluate.missing_tasks")
        _one_of(self.selection, SELECTIONS, "evaluate.selection")
        check(self.parallel >= 0, "evaluate.parallel", "must be >= 0 (0 = auto, 1 = one at a time)")
        check(
            bool(self.lr_grid) and all(math.isfinite(lr) and lr > 0 for lr in self.lr_grid),
            "evaluate.lr_grid",
            "must be a non-empty list of finite numbers > 0",
        )
        check_distinct(self.lr_grid, "evaluate.lr_grid")
        check(
            0 < self.validation_fraction < 1,
            "evaluate.validation_fraction",
            "must be in (0, 1)",
        )
        _at_least(self, "evaluate", ("seeds", "epochs", "batch_size", "probe_max_iter"))
        check(
            self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0 and self.probe_l2 >= 0,
            "evaluate",
            "need lr > 0, 0 <= momentum < 1, weight_decay >= 0, probe_l2 >= 0",
        )
        if self.model is not None:
            self.model.validate("evaluate.model")
        bad_protocols = sorted(set(self.protocols) - set(PROTOCOLS))
        check_distinct(self.protocols, "evaluate.protocols")
        check(
            bool(self.protocols) and not bad_protocols,
            "evaluate.protocols",
            f"{bad_protocols or self.protocols or 'empty'}: must be a non-empty list of distinct protocols "
            f"from {', '.join(PROTOCOLS)}",
        )
        self.finetune.validate()


@dataclass
class Config:
    """Every key of mkdt, grouped by stage; the defaults are the paper's CIFAR-10 settings."""

    seed: int = opt(0, "seed from which every random choice is derived")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = opt(
        "fp32",
        "fp32, or bf16: bfloat16 autocast of the networks' forward passes "
        "(teacher training, experts, distillation's inner steps, evaluation "
        "pre-training; on GPUs); weights, optimizer states, targets, losses "
        "and the matching loss stay float32",
    )
    channels_last: bool = opt(
        False, "channels_last memory layout for convolutions (CUDA only; ignored on CPU)"
    )
    compile: bool = opt(
        False,
        "torch.compile the teacher and the students in module-based training "
        "(teacher, experts, evaluation); the first epoch pays the compile time",
    )
    data: DataConfig = opt(DataConfig(), "real data")
    teacher: TeacherConfig = opt(TeacherConfig(), "stage 1: SSL teacher")
    targets: TargetsConfig = opt(TargetsConfig(), "stage 2: teacher targets")
    experts: ExpertsConfig = opt(ExpertsConfig(), "stage 3: KD expert trajectories")
    init: InitConfig = opt(InitConfig(), "stage 4: initial synthetic images")
    distill: DistillConfig = opt(DistillConfig(), "stage 5: trajectory matching")
    krr_st: KRRSTConfig = opt(
        KRRSTConfig(), "KRR-ST: the paper's other distillation, run when evaluate.methods lists krr_st"
    )
    evaluate: EvaluateConfig = opt(EvaluateConfig(), "stage 6: pre-train on each set, linear-probe")

    def validate(self) -> Config:
        """Raise ConfigError on the first out-of-range value; return self."""
        check(self.seed >= 0, "seed", "must be >= 0")
        check_device(self.device)
        _one_of(self.precision, PRECISIONS, "precision")
        for section in (
            self.data,
            self.teacher,
            self.targets,
            self.experts,
            self.init,
            self.distill,
            self.krr_st,
            self.evaluate,
        ):
            section.validate()
        s, e = self.distill, self.experts
        check(
            s.max_start_epoch - 1 + s.expert_epochs <= e.epochs,
            "distill",
            f"max_start_epoch - 1 + expert_epochs ({s.max_start_epoch - 1 + s.expert_epochs}) "
            f"exceeds experts.epochs ({e.epochs})",
        )
        missing = sorted(set(self.required_expert_epochs()) - set(self.expert_save_epochs()))
        check(not missing, "experts.save_epochs", f"must include {missing} (needed by init and distillation)")
        for method in map(parse_method, self.evaluate.methods):
            check(
                method.source != "variant" or method.subset in s.variants,
                "evaluate.methods",
                f"{method.name} needs distill.variants to list {method.subset} (the distill stage makes "
                f"that set); add it there or leave {method.name} out",
            )
        return self

    def required_expert_epochs(self) -> list[int]:
        """Epochs that init (epoch 1) and distillation (0 .. T+ - 1 + M) read."""
        return sorted({1, *range(self.distill.max_start_epoch + self.distill.expert_epochs)})

    def expert_save_epochs(self) -> list[int]:
        """The expert epochs written to disk: the configured list or the required ones + final."""
        if self.experts.save_epochs is not None:
            return sorted(set(self.experts.save_epochs))
        return sorted({*self.required_expert_epochs(), self.experts.epochs})
