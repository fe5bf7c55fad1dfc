"""The pipeline's stages, declared once: what each stage reads, and which config keys define it.

Everything that needs to know the shape of the pipeline reads :data:`STAGES`: the stages' order,
the fingerprints that decide whether an artifact may be reused (:func:`defining`), the CLI's
per-stage help, and the prerequisites a stage checks before it starts.

A stage's *definition* is the part of the config its result depends on: the values of its own
``keys``, with those of every stage it reads, nested as in the config (so a difference is reported
as ``experts.lr: 0.1 -> 0.05``). ``settings`` are keys a stage uses that do not change its result
(speed, layout, logging). A few values are resolved rather than copied (:func:`_resolved`): a teacher
loaded from a checkpoint is defined by the file's sha256 and its architecture; the evaluation's
network by ``evaluate.model`` or, when that is null, ``experts.student``; its protocols by
``evaluate.protocols`` in the order of :data:`mkdt.methods.PROTOCOLS`, with the fine-tuning recipe
``evaluate.finetune`` only when they list ``finetune``, and neither when they are ``[probe]`` alone
(so runs made before fine-tuning existed stay valid); a dataset given by a path by that path and
its files' names and sizes (:func:`mkdt.data.registry.source_identity`).
Which epochs the experts store is not part of their definition: stages that read an epoch check
that it was stored. Nor are the variants the distill stage makes (``distill.variants``): a variant
is the stage's definition with ``distill.init`` replaced by its subset (its checkpoint is checked
against that), the stage's record lists the variants made, and adding one to a finished stage makes
it alone, leaving the main set and the records after the stage valid.

A stage ``wanted`` by some configs only (``krr_st``: when ``evaluate.methods`` lists ``krr_st``) is
left out of a command of several stages (``mkdt run``) under the others (:func:`pipeline`); asked
for alone (``mkdt krr_st``) it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkdt.config import Config
from mkdt.data.registry import source_identity
from mkdt.files import file_sha256
from mkdt.methods import INIT_METHODS, LR_MATCHED, PROTOCOLS, VARIANTS

RUNTIME_KEYS = ("device", "precision", "channels_last", "compile")
DATA_SOURCE_KEYS = ("data.root", "data.download", "data.cache_dir")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str
    summary: str
    reads: tuple[str, ...]  # stages whose artifacts it always reads
    keys: tuple[str, ...]  # config keys (leaves or whole sections) that define its result
    settings: tuple[str, ...] = ()  # keys it uses that do not change its result
    reads_if: tuple[tuple[str, Callable[[Config], bool]], ...] = ()  # stages read under a condition
    wanted: Callable[[Config], bool] | None = None  # when `mkdt run` runs it (None: always)

    def inputs(self, config: Config) -> tuple[str, ...]:
        """The stages this stage reads with ``config``."""
        return (*self.reads, *(stage for stage, needed in self.reads_if if needed(config)))

    @property
    def optional(self) -> bool:
        """Whether the stage runs under some configs only (:attr:`wanted`)."""
        return self.wanted is not None

    def wants(self, config: Config) -> bool:
        """Whether ``mkdt run`` runs the stage under ``config``."""
        return self.wanted is None or self.wanted(config)

    @property
    def command(self) -> str:
        """The CLI command that runs the stage."""
        return f"mkdt {self.name}"


def _evaluates(*methods: str) -> Callable[[Config], bool]:
    return lambda config: bool(set(config.evaluate.methods) & set(methods))


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "teacher",
            "train the SSL teacher (or load teacher.checkpoint) and linear-probe it",
            reads=(),
            keys=("seed", "data.name", "data.resolution", "data.pool_size", "teacher"),
            settings=(
                *RUNTIME_KEYS,
                *DATA_SOURCE_KEYS,
                "teacher.checkpoint_every",
                "teacher.probe",
                "targets.batch_size",
            ),
        ),
        Stage(
            "targets",
            "encode D_real with the teacher: the KD regression targets",
            reads=("teacher",),
            keys=(),
            settings=(*RUNTIME_KEYS, "targets.batch_size"),
        ),
        Stage(
            "experts",
            "train K KD students and save their weights each epoch (expert trajectories)",
            reads=("targets",),
            keys=("experts",),
            settings=(*RUNTIME_KEYS, "experts.parallel", "experts.save_epochs"),
        ),
        Stage(
            "init",
            "choose the initial synthetic images: high-KD-loss, random and SAS real subsets",
            reads=("experts",),
            keys=("init",),
            settings=("device",),
            reads_if=(("teacher", lambda config: config.init.sas_proxy == "teacher"),),
        ),
        Stage(
            "distill",
            "optimise the synthetic images (and alpha_syn) by matching expert trajectories",
            reads=("init",),
            keys=("distill",),
            settings=(
                *RUNTIME_KEYS,
                "distill.backend",
                "distill.checkpoint_every",
                "distill.log_every",
                "distill.check_window",
                "distill.snapshots",
                "distill.variants",  # each variant is defined by the stage's definition and its subset
            ),
        ),
        Stage(
            "krr_st",
            "distill a KRR-ST set from the same targets and init subsets (for evaluate.methods' krr_st)",
            reads=("init",),
            keys=("krr_st",),
            settings=(*RUNTIME_KEYS, "krr_st.checkpoint_every", "krr_st.log_every"),
            wanted=_evaluates("krr_st"),
        ),
        Stage(
            "evaluate",
            "pre-train a student on each set (baselines, MKDT), linear-probe or fine-tune it, write results",
            reads=("targets",),
            keys=("evaluate",),
            settings=(
                *RUNTIME_KEYS,
                "evaluate.missing_tasks",
                "evaluate.parallel",
            ),  # skipped tasks: in the record
            reads_if=(
                ("init", _evaluates(*INIT_METHODS, *LR_MATCHED)),
                ("distill", _evaluates("mkdt", *LR_MATCHED, *VARIANTS)),
                ("krr_st", _evaluates("krr_st")),
            ),
        ),
    )
}

_NOT_DEFINING = frozenset(key for stage in STAGES.values() for key in stage.settings)
_ADDED_LATER = {"init.sas_clusters": None, "init.sas_views": 2, "init.sas_proxy": "expert"}
"""Keys added after run directories existed, with their defaults: a definition leaves them out at
that value, so earlier runs stay valid (the init stage adds the SAS subset to an earlier init)."""


def _value(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return (
        dataclasses.asdict(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type)
        else value
    )


def _drop_settings(value: Any, dotted: str) -> Any:
    """A section's dict without the keys that are settings of some stage, and without the
    :data:`_ADDED_LATER` keys that are at their default."""
    if not isinstance(value, dict):
        return value
    return {
        k: _drop_settings(v, f"{dotted}.{k}")
        for k, v in value.items()
        if f"{dotted}.{k}" not in _NOT_DEFINING and (f"{dotted}.{k}", v) not in _ADDED_LATER.items()
    }


def _resolved(config: Config, stage: str, own: dict[str, Any]) -> dict[str, Any]:
    """``own`` with the values that are resolved rather than copied (see the module docstring)."""
    if stage == "teacher" and (source := source_identity(config.data.name, config.data.root)) is not None:
        own["data"]["source"] = source
    if stage == "teacher" and config.teacher.checkpoint is not None:
        own["teacher"] = {
            "checkpoint_sha256": file_sha256(Path(config.teacher.checkpoint).expanduser()),
            "model": dataclasses.asdict(config.teacher.model),
        }
    if stage == "evaluate":
        model = config.evaluate.model or config.experts.student
        own["evaluate"]["model"] = dataclasses.asdict(model)
        _put_protocols(config, own["evaluate"])
    return own


def _put_protocols(config: Config, evaluate: dict[str, Any]) -> None:
    """Replace ``protocols`` and ``finetune`` in the evaluation's definition ``evaluate`` by what
    defines its results (see the module docstring)."""
    if config.evaluate.selection == "fixed":  # the definition of runs made before tuning existed
        for key in ("selection", "lr_grid", "validation_fraction"):
            evaluate.pop(key, None)
    evaluate.pop("protocols", None)
    evaluate.pop("finetune", None)
    protocols = [p for p in PROTOCOLS if p in config.evaluate.protocols]
    if protocols != ["probe"]:
        evaluate["protocols"] = protocols
    if "finetune" in protocols:
        evaluate["finetune"] = dataclasses.asdict(config.evaluate.finetune)


def _nest(into: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        into = into.setdefault(part, {})
    into[leaf] = value


_MODEL_KEYS_ADDED_LATER = {"stem": "cifar"}
"""Model-section keys added after run directories existed, with the value every earlier run
computed: a definition leaves them out at that value, so earlier runs stay valid."""


def _without_later_defaults(value: Any) -> Any:
    """``value`` with every model section's later-added keys removed where at their default."""
    if not isinstance(value, dict):
        return value
    is_model = "arch" in value
    return {
        k: _without_later_defaults(v)
        for k, v in value.items()
        if not (is_model and k in _MODEL_KEYS_ADDED_LATER and v == _MODEL_KEYS_ADDED_LATER[k])
    }


def defining(config: Config, stage: str, *, conditional: bool = True) -> dict[str, Any]:
    """The definition of ``stage`` under ``config``: its own keys and those of every stage it
    reads, nested as in the config; with ``conditional=False`` only of the stages it always reads
    (``reads``, not ``reads_if``): the part every config of the stage has whatever else it reads
    (e.g. the evaluation's protocol, whichever sets it evaluates)."""
    spec = STAGES[stage]
    own: dict[str, Any] = {}
    for key in spec.keys:
        _nest(own, key, _drop_settings(_value(config, key), key))
    own = _without_later_defaults(_resolved(config, stage, own))
    for upstream in spec.inputs(config) if conditional else spec.reads:
        _merge(own, defining(config, upstream))
    return own


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def pipeline(config: Config, asked: list[str]) -> list[str]:
    """The stages of ``asked`` that a command runs under ``config``, in pipeline order: one stage
    asked for alone, else those of them the config wants (:meth:`Stage.wants`)."""
    names = [name for name in STAGES if name in asked]
    return names if len(names) == 1 else [name for name in names if STAGES[name].wants(config)]


def later_stages(stage: str) -> list[str]:
    """``stage`` and every later stage that may read it, directly or through another one (under
    any config), in pipeline order: what redoing ``stage`` can invalidate. Siblings that do not
    read each other (distill and krr_st) are left out."""
    found = [stage]
    for name, spec in STAGES.items():
        may_read = {*spec.reads, *(upstream for upstream, _ in spec.reads_if)}
        if name not in found and may_read & set(found):
            found.append(name)
    return found


def stage_keys(stage: str) -> tuple[str, ...]:
    """The config keys (or key prefixes) a stage uses, defining ones first: for its --help."""
    spec = STAGES[stage]
    return (*spec.keys, *spec.settings)
