"""Typed, validated configuration.

One default config holds every key, grouped by stage. A preset (``src/mkdt/presets/NAME.yaml``)
holds only what differs from the defaults; an optional YAML file and dotted command-line
overrides (``experts.lr=0.05``) come last. Unknown keys and out-of-range values raise
:class:`ConfigError` before any compute starts. The defaults are the paper's CIFAR-10 settings
(METHOD.md §4).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mkdt.errors import ConfigError


def opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's vocabulary
    """A config field with its documentation (shown by ``mkdt <stage> --help``)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)


@dataclass
class DataConfig:
    name: str = opt("digits", "dataset: digits, cifar10, cifar100, tinyimagenet, fashion-mnist, "
                              "imagefolder, or a path to an ImageFolder tree/archive")
    root: str | None = opt(None, "folder or archive holding the raw files (default: the dataset's "
                                 "usual place, or $MKDT_DATA/<name>)")
    download: bool = opt(False, "download the dataset with torchvision if it is missing")
    cache_dir: str | None = opt(None, "where decoded uint8 tensors are cached "
                                      "(default $MKDT_CACHE or ~/.cache/mkdt)")
    resolution: int | None = opt(None, "resize images to this side in pixels (default: native)")
    pool_size: int | None = opt(None, "use a class-balanced subset of this many training images "
                                      "as the real data D_real (default: all)")


@dataclass
class ModelConfig:
    arch: str = opt("convnet", "network: convnet, resnet10, resnet18")
    width: int = opt(128, "channels of the first stage (ConvNet: every block; ResNet: x1,2,4,8)")
    depth: int = opt(3, "ConvNet blocks (3 for 32x32 inputs, 4 for 64x64); ignored by ResNets")


@dataclass
class TeacherConfig:
    checkpoint: str | None = opt(None, "load this encoder (torchvision-style ResNet state dict, "
                                       ".safetensors or .pt) instead of training one")
    method: str = opt("barlow_twins", "SSL method: barlow_twins or simclr")
    model: ModelConfig = opt(ModelConfig(arch="resnet18", width=64), "teacher encoder")
    epochs: int = opt(1000, "training epochs")
    batch_size: int = opt(256, "images per step (two views each)")
    lr: float = opt(0.01, "Adam learning rate per 256 images (scaled by batch_size/256)")
    weight_decay: float = opt(1e-6, "Adam weight decay")
    warmup_epochs: int = opt(10, "linear warm-up epochs before the cosine schedule")
    projector_dim: int = opt(1024, "Barlow Twins projector width (hidden and output); "
                                   "SimCLR projector hidden width")
    simclr_out_dim: int = opt(128, "SimCLR projection output size")
    bt_lambda: float = opt(1 / 128, "Barlow Twins weight of the redundancy-reduction term")
    temperature: float = opt(0.5, "SimCLR temperature")
    checkpoint_every: int = opt(10, "save a resumable training checkpoint every this many epochs")
    probe: bool = opt(True, "linear-probe the teacher's features at the end and report accuracy")


@dataclass
class TargetsConfig:
    batch_size: int = opt(1024, "images per forward pass when encoding D_real")


@dataclass
class ExpertsConfig:
    num_experts: int = opt(100, "K, the number of expert trajectories")
    epochs: int = opt(20, "KD epochs per expert")
    lr: float = opt(0.1, "SGD learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "SGD weight decay")
    batch_size: int = opt(256, "images per step")
    student: ModelConfig = opt(ModelConfig(), "student network (its head regresses the targets)")
    save_epochs: list[int] | None = opt(None, "epochs whose weights are stored (0 = init); default: "
                                              "0..max_start_epoch+expert_epochs, 1 and the last")
    parallel: int = opt(0, "experts trained at once (stacked weights, one grouped network; 1 = one "
                           "at a time), same results within float tolerance; 0 = auto: 10 on CUDA, "
                           "1 on CPU (batching measured 0.86x there, see benchmarks/experts.py)")


@dataclass
class DistillConfig:
    images: int = opt(1000, "|D_syn|, the number of synthetic images")
    init: str = opt("high_loss", "initial images: high_loss (top KD loss under the experts' epoch-1 "
                                 "weights) or random (a random real subset)")
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
    trajectories: int = opt(1, "B: expert segments matched per iteration (batched with vmap); the "
                               "loss is their mean, so B > 1 lowers the gradient's variance")
    backend: str = opt("auto", "how the gradient through the N steps is computed (same values): "
                               "unrolled (full autograd graph, memory ~ N), recompute (memory "
                               "independent of N, about 1.2x the time) or auto (recompute when the "
                               "unrolled graph would be large, see BENCHMARKS.md)")
    checkpoint_every: int = opt(100, "save a resumable checkpoint every this many iterations")


@dataclass
class EvaluateConfig:
    methods: list[str] = opt(["no_pretrain", "random", "high_loss", "full", "mkdt"],
                             "pre-training sets to compare: no_pretrain, random, high_loss, full, "
                             "mkdt")
    tasks: list[str] | None = opt(None, "downstream tasks as dataset names, or name=root for data "
                                        "elsewhere (default: the pre-training dataset)")
    label_fractions: list[float] = opt([0.01, 0.05], "fractions of each task's training labels "
                                                     "the linear probe sees")
    class_balanced: bool = opt(False, "sample the labelled fraction class-balanced")
    seeds: int = opt(3, "seeds per setting (each changes the label subset and the pre-training)")
    model: ModelConfig | None = opt(None, "network pre-trained for evaluation (default: "
                                          "experts.student)")
    epochs: int = opt(20, "KD pre-training epochs on each set")
    batch_size: int = opt(256, "KD pre-training batch size")
    lr: float = opt(0.1, "KD pre-training learning rate for real subsets (mkdt uses its alpha_syn)")
    momentum: float = opt(0.9, "KD pre-training SGD momentum")
    weight_decay: float = opt(1e-4, "KD pre-training weight decay")
    probe_l2: float = opt(1e-3, "L2 penalty of the linear probe's weights")
    probe_max_iter: int = opt(100, "LBFGS iterations of the linear probe")


@dataclass
class Config:
    seed: int = opt(0, "seed from which every random choice is derived")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = opt("fp32", "fp32, or bf16: bfloat16 autocast of the networks' forward passes "
                                 "(teacher training, experts, distillation's inner steps, evaluation "
                                 "pre-training; on GPUs); weights, optimizer states, targets, losses "
                                 "and the matching loss stay float32")
    channels_last: bool = opt(False, "channels_last memory layout for convolutions (CUDA only; "
                                     "ignored on CPU)")
    compile: bool = opt(False, "torch.compile the teacher and the students in module-based training "
                               "(teacher, experts, evaluation); the first epoch pays the compile time")
    data: DataConfig = opt(DataConfig(), "real data")
    teacher: TeacherConfig = opt(TeacherConfig(), "stage 1: SSL teacher")
    targets: TargetsConfig = opt(TargetsConfig(), "stage 2: teacher targets")
    experts: ExpertsConfig = opt(ExpertsConfig(), "stage 3: KD expert trajectories")
    distill: DistillConfig = opt(DistillConfig(), "stages 4-5: initial images and trajectory matching")
    evaluate: EvaluateConfig = opt(EvaluateConfig(), "stage 6: pre-train on each set, linear-probe")

    def validate(self) -> Config:
        """Raise ConfigError on the first out-of-range value; return self."""
        _check(self.seed >= 0, "seed", "must be >= 0")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", "must be auto, cpu, cuda or cuda:N")
        _check(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16")
        d = self.data
        _check(d.resolution is None or d.resolution >= 4, "data.resolution", "must be >= 4")
        _check(d.pool_size is None or d.pool_size >= 2, "data.pool_size", "must be >= 2")
        t = self.teacher
        _check(t.method in ("barlow_twins", "simclr"), "teacher.method",
               "must be barlow_twins or simclr")
        _check(t.model.arch.startswith("resnet") or t.model.arch == "convnet",
               "teacher.model.arch", "must be convnet, resnet10 or resnet18")
        for key in ("epochs", "batch_size", "projector_dim", "simclr_out_dim", "checkpoint_every"):
            _check(getattr(t, key) >= 1, f"teacher.{key}", "must be >= 1")
        _check(t.batch_size >= 2, "teacher.batch_size", "must be >= 2 (batch statistics)")
        _check(0 <= t.warmup_epochs <= t.epochs, "teacher.warmup_epochs", "must be in [0, epochs]")
        _check(t.lr > 0 and t.weight_decay >= 0 and t.bt_lambda >= 0 and t.temperature > 0,
               "teacher", "lr and temperature must be > 0, weight_decay and bt_lambda >= 0")
        if t.checkpoint is not None:
            _check(Path(t.checkpoint).expanduser().is_file(), "teacher.checkpoint",
                   f"file not found: {t.checkpoint}")
        _check(self.targets.batch_size >= 1, "targets.batch_size", "must be >= 1")
        e = self.experts
        for key in ("num_experts", "epochs", "batch_size"):
            _check(getattr(e, key) >= 1, f"experts.{key}", "must be >= 1")
        _check(e.lr > 0 and 0 <= e.momentum < 1 and e.weight_decay >= 0, "experts",
               "need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        _check(e.parallel >= 0, "experts.parallel", "must be >= 0 (0 = auto, 1 = one at a time)")
        for name, model in (("teacher.model", t.model), ("experts.student", e.student)):
            _check(model.arch in ("convnet", "resnet10", "resnet18"), f"{name}.arch",
                   "must be convnet, resnet10 or resnet18")
            _check(model.width >= 1 and model.depth >= 1, name, "width and depth must be >= 1")
        s = self.distill
        for key in ("images", "iterations", "syn_steps", "expert_epochs", "max_start_epoch",
                    "batch_syn", "checkpoint_every"):
            _check(getattr(s, key) >= 1, f"distill.{key}", "must be >= 1")
        _check(s.trajectories >= 1, "distill.trajectories", "must be >= 1")
        _check(s.backend in DISTILL_BACKENDS, "distill.backend",
               f"must be one of {', '.join(DISTILL_BACKENDS)}")
        _check(s.init in INIT_METHODS, "distill.init", f"must be one of {', '.join(INIT_METHODS)}")
        _check(min(s.lr_img, s.lr_lr, s.lr_init, s.lr_targets) > 0 and 0 <= s.momentum < 1,
               "distill", "learning rates must be > 0 and momentum in [0, 1)")
        v = self.evaluate
        bad = sorted(set(v.methods) - set(EVAL_METHODS))
        _check(bool(v.methods) and not bad, "evaluate.methods",
               f"{bad or 'empty'}: choose from {', '.join(EVAL_METHODS)}")
        _check(bool(v.label_fractions) and all(0 < f <= 1 for f in v.label_fractions),
               "evaluate.label_fractions", "must be a non-empty list of numbers in (0, 1]")
        _check(v.tasks is None or len(v.tasks) > 0, "evaluate.tasks", "must be null or non-empty")
        for key in ("seeds", "epochs", "batch_size", "probe_max_iter"):
            _check(getattr(v, key) >= 1, f"evaluate.{key}", "must be >= 1")
        _check(v.lr > 0 and 0 <= v.momentum < 1 and v.weight_decay >= 0 and v.probe_l2 >= 0,
               "evaluate", "need lr > 0, 0 <= momentum < 1, weight_decay >= 0, probe_l2 >= 0")
        if v.model is not None:
            _check(v.model.arch in ("convnet", "resnet10", "resnet18"), "evaluate.model.arch",
                   "must be convnet, resnet10 or resnet18")
        _check(s.max_start_epoch - 1 + s.expert_epochs <= e.epochs, "distill",
               f"max_start_epoch - 1 + expert_epochs ({s.max_start_epoch - 1 + s.expert_epochs}) "
               f"exceeds experts.epochs ({e.epochs})")
        if e.save_epochs is not None:
            bad = [x for x in e.save_epochs if not 0 <= x <= e.epochs]
            _check(not bad, "experts.save_epochs", f"epochs {bad} are outside [0, experts.epochs]")
            missing = sorted(set(self.required_expert_epochs()) - set(e.save_epochs))
            _check(not missing, "experts.save_epochs",
                   f"must include {missing} (needed by init and distillation)")
        return self

    def required_expert_epochs(self) -> list[int]:
        """Epochs that init (epoch 1) and distillation (0 .. T+ - 1 + M) read."""
        return sorted({1, *range(self.distill.max_start_epoch + self.distill.expert_epochs)})

    def expert_save_epochs(self) -> list[int]:
        """The expert epochs written to disk: the configured list or the required ones + final."""
        if self.experts.save_epochs is not None:
            return sorted(set(self.experts.save_epochs))
        return sorted({*self.required_expert_epochs(), self.experts.epochs})


INIT_METHODS = ("high_loss", "random")
DISTILL_BACKENDS = ("auto", "unrolled", "recompute")
EVAL_METHODS = ("no_pretrain", "random", "high_loss", "full", "mkdt")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config {key}: {message}")


# ---------------------------------------------------------------- loading and merging

def preset_names() -> list[str]:
    """Names of the presets shipped with mkdt."""
    folder = resources.files("mkdt") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """First comment line of a preset file."""
    text = _preset_text(name)
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def _preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return (resources.files("mkdt") / "presets" / f"{name}.yaml").read_text()


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset <- YAML file <- ``key=value`` overrides, typed and validated."""
    merged = dataclasses.asdict(Config())
    if preset:
        _merge(merged, _parse_yaml(_preset_text(preset), f"preset {preset}"), "")
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        _merge(merged, _parse_yaml(path.read_text(), str(path)), "")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. experts.lr=0.05)")
        _merge(merged, _nest(key.strip(), yaml.safe_load(value) if value else None), "")
    return config_from_dict(merged).validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a typed Config from a nested dict; unknown keys and wrong types raise ConfigError."""
    return _build(Config, data, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of config keys")
    return data


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(_unknown(prefix + str(key), base.keys(), prefix))
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def _unknown(key: str, known: Any, prefix: str) -> str:
    close = difflib.get_close_matches(key, [prefix + k for k in known], n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(known)}"
    return f"unknown config key {key!r}{hint}"


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
    unknown = set(data) - set(kwargs)
    if unknown:
        raise ConfigError(_unknown(prefix + sorted(unknown)[0], [f.name for f in dataclasses.fields(cls)],
                                   prefix))
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, e.g. [0, 1, 2]")
        return [_coerce(args[0], v, key) for v in value]
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
                return str(value).lower() in ("true", "1", "yes")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if value is None or isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key {key} must be {tp.__name__}, got {value!r}")


def iter_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field of a config dataclass instance."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, f.metadata.get("help", "")
