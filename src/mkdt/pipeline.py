"""Running stages into one run directory: in pipeline order, skipping finished ones, with D_real
loaded and placed on the device once for all of them.

A command runs in three phases, so that a refused command changes nothing on disk:

1. :func:`check`: every check that can run before compute, nothing written: the config against
   D_real, every finished stage's definition and artifacts (sizes and sha256), the prerequisites
   of the stages that run or that a finished stage extends, a ``teacher.checkpoint``, the
   evaluation's tasks, the sets the evaluation imports, and what ``--repair`` will delete;
2. :func:`prepare` (rank 0): the folder made writable and checked for room, ``config.yaml``
   written, the records that ``--force`` invalidates dropped;
3. :func:`run_planned`: the stages run in order, with ``--repair``'s deletions (decided by
   :func:`check`) before a stage and the manifest written after each.

Under torchrun rank 0 alone writes (the folder, config.yaml, records, the manifest, the log) and
every rank waits at a barrier after each write, so that all ranks see the same run directory.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkdt.analysis.trajectories import check_window
from mkdt.config import Config, config_to_dict, dump_config
from mkdt.config.schema import parse_task
from mkdt.data.real import RealData, load_real
from mkdt.downstream import available_tasks, check_validation_splits, load_task, window_summary
from mkdt.errors import ArtifactError
from mkdt.files import logged_to, read_tensor_names, write_text
from mkdt.graph import STAGES, defining, later_stages, pipeline
from mkdt.methods import parse_method
from mkdt.nn.loading import load_encoder
from mkdt.runtime import Runtime
from mkdt.stages import distill, evaluate, experts, init, krr_st, targets, teacher
from mkdt.stages.context import check_budgets, check_disk, estimated_bytes, require_prerequisites
from mkdt.store import RunDir

StageRun = Callable[..., dict[str, Any]]
RUNNERS: dict[str, StageRun] = {
    "teacher": teacher.run,
    "targets": targets.run,
    "experts": experts.run,
    "init": init.run,
    "distill": distill.run,
    "krr_st": krr_st.run,
    "evaluate": evaluate.run,
}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A checked command (:func:`check`): what it runs, into where, with what."""

    config: Config
    out: str | Path  # the run directory as given (passed on to the stages)
    store: RunDir
    runtime: Runtime
    real: RealData
    names: list[str]  # the stages asked for that the config wants (graph.pipeline), in pipeline order
    todo: list[str]  # those that run: every one with force, else the unfinished ones
    needed: int  # about the bytes the artifacts of ``todo`` take
    skipped: dict[str, str]  # tasks the evaluation leaves out (evaluate.missing_tasks=skip): a line each
    force: bool
    repairs: dict[str, list[str]]  # with --repair: the finished stages' missing or damaged artifacts


def run_stages(
    config: Config, out: str | Path, stages: list[str], *, force: bool = False, repair: bool = False
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in pipeline order) into ``out``; finished compatible stages are skipped, and
    so is a stage the config does not want when several are asked for (:func:`mkdt.graph.pipeline`:
    krr_st unless ``evaluate.methods`` lists it).

    Before anything is written (:func:`check`): the device, D_real, the sizes it must satisfy,
    the files of the evaluation's tasks (a missing one is refused or, ``evaluate.missing_tasks=skip``,
    named in one line when the run starts), the sets it imports, whether every requested stage
    that already finished was made with this config and is intact, and whether the prerequisites
    of the stages that run are (else ArtifactError); then the folder is made writable and checked
    for room. With ``force`` the named stages are recomputed and every later stage's record is
    dropped. With ``repair`` a finished stage whose artifacts are missing or damaged is redone
    (experts: only the damaged ones); the later stages' records are dropped only if the repaired
    artifacts differ from the recorded ones. Returns each stage's record.

    The caller makes sure no other process writes into ``out`` meanwhile: the CLI holds
    :meth:`RunDir.locked` for the whole command.
    """
    plan = check(config, out, stages, force=force, repair=repair)
    plan.runtime.barrier()  # every rank has read the run directory before rank 0 writes
    if plan.runtime.is_main:
        prepare(plan)
    plan.runtime.barrier()
    return run_planned(plan)


def check(config: Config, out: str | Path, stages: list[str], *, force: bool, repair: bool) -> Plan:
    """Phase 1, nothing written: create the runtime (the device; under torchrun the process group)
    and load D_real, check the sizes it must satisfy, that every requested stage that already
    finished was made with this config and still has its artifacts (:func:`_check_finished`;
    ``force`` checks none), which stages run (with ``repair`` the damaged ones too), that the
    prerequisites of each, and of each finished stage the command extends, were made with this
    config and are intact unless an earlier stage of the command makes them
    (:func:`_check_prerequisites`), that ``teacher.checkpoint`` loads into the configured network
    when the teacher stage runs, the evaluation's tasks when it runs
    (``evaluate.missing_tasks=error``: ConfigError for a missing one; each found one loaded,
    :func:`_check_tasks`) and the sets it reads that no stage of the command makes
    (:func:`_check_sets`), and the bytes the running stages will write. Raises the first failed
    check's MkdtError."""
    store = RunDir(out)
    names = pipeline(config, stages)
    runtime = Runtime.create(config.device, config.precision, config.channels_last, config.compile)
    real = load_real(config.data, config.seed, runtime.device)
    check_budgets(config, real.data, names)
    repairs = {} if force else _check_finished(config, store, names, repair)
    todo = [name for name in names if force or name in repairs or store.record(name) is None]
    _check_prerequisites(config, store, names, todo)
    if "teacher" in todo and config.teacher.checkpoint is not None:
        load_encoder(Path(config.teacher.checkpoint).expanduser(), config.teacher.model, *_shape(real))
    skipped: dict[str, str] = {}
    if "evaluate" in todo:
        present, skipped = available_tasks(config)
        _check_tasks(config, present, real)
        _check_sets(config, store, names, todo)
    needed = sum(estimated_bytes(config, real.data, name) for name in todo)
    return Plan(
        config=config,
        out=out,
        store=store,
        runtime=runtime,
        real=real,
        names=names,
        todo=todo,
        needed=needed,
        skipped=skipped,
        force=force,
        repairs=repairs,
    )


def _check_finished(config: Config, store: RunDir, names: list[str], repair: bool) -> dict[str, list[str]]:
    """Check that each finished stage of ``names`` was made with this config (else
    ArtifactError, also with ``repair``: a stage is repaired into the same definition only) and
    still has the artifacts it recorded (:meth:`RunDir.verified`), except, with ``repair``, those
    that do not. Returns what ``--repair`` deletes: the missing or damaged artifacts of those
    stages, by stage."""
    repairs = {}
    for name in names:
        if not store.is_done(name, defining(config, name)):
            continue
        damaged = store.damaged(name)
        if repair and damaged:
            repairs[name] = damaged
        else:
            store.verified(name)
    return repairs


def _check_prerequisites(config: Config, store: RunDir, names: list[str], todo: list[str]) -> None:
    """Check the prerequisites of each stage that runs or extends a finished stage
    (:func:`_extends`), except those an earlier stage of the command makes
    (:func:`mkdt.stages.context.require_prerequisites`), and, when the init stage is not part of
    the command, that its finished subsets include those the distill stage starts from
    (``distill.init`` and ``distill.variants``) when it runs or extends, and ``krr_st.init`` when
    the krr_st stage runs."""
    order = list(STAGES)
    reading = [name for name in names if name in todo or _extends(config, store, name)]
    for name in reading:
        made = [stage for stage in todo if order.index(stage) < order.index(name)]
        require_prerequisites(
            config, store, name, made, lambda stage: f"{STAGES[stage].command} --out {store.path}"
        )
    if "init" not in names:
        starts = {config.distill.init, *config.distill.variants} if "distill" in reading else set()
        starts |= {config.krr_st.init} if "krr_st" in reading else set()
        if starts:
            store.load_indices(config.init.images, starts)


def _shape(real: RealData) -> tuple[int, int]:
    """D_real's channels and image size, which a loaded teacher checkpoint must fit."""
    return real.data.channels, real.data.image_size


def _extends(config: Config, store: RunDir, name: str) -> bool:
    """Whether the finished stage ``name`` adds to its artifacts when it is run again with this
    config, and so reads its prerequisites: an init made before the SAS subset existed (the SAS
    subset is added), a distill stage whose record lacks a variant of ``distill.variants``."""
    if not store.is_done(name, defining(config, name)):
        return False
    if name == "init":
        return "sas" not in read_tensor_names(store.indices_path)
    if name == "distill":
        made = (store.record(name) or {}).get("result", {}).get("variants", {})
        return any(init not in made for init in config.distill.variants)
    return False


def _check_tasks(config: Config, present: list[str], real: RealData) -> None:
    """Load each evaluation task other than D_real's own dataset (already loaded) as the
    evaluation will, so that a damaged one is refused before anything is written: DataError or
    ConfigError. The decoded tensors go to the dataset cache (``data.cache_dir``), so the
    evaluation reads them from there. Under ``evaluate.selection=tuned`` every task (D_real's own
    dataset too) must leave a held-out part of its labelled images at every fraction and seed
    (:func:`~mkdt.downstream.check_validation_splits`)."""
    tuned = config.evaluate.selection == "tuned"
    for entry in present:
        if parse_task(entry) != (config.data.name, None) or tuned:
            task = load_task(config, entry, real.data)
            if tuned:
                check_validation_splits(config, entry, task)


def _check_sets(config: Config, store: RunDir, names: list[str], todo: list[str]) -> None:
    """Check that the evaluation's pre-training sets that no stage of this command makes are
    there: imported sets (``ext:NAME``; imported against the finished targets unless the command
    redoes them), the MTT-SSL set of ``mkdt analyze mtt``, and, when the distill stage is not
    part of the command, the variants it made, and, when the init stage is not part of the
    command, the init subsets it reads (an init made before the SAS subset existed lacks it).
    Raises ArtifactError naming the command that makes a missing one."""
    methods = list(map(parse_method, config.evaluate.methods))
    subsets = {m.subset for m in methods if m.source == "init" and m.subset is not None}
    if "init" not in names and subsets:
        store.load_indices(config.init.images, subsets)
    for method in methods:
        if method.external is not None:
            store.require_imported(method.external, same_targets="targets" not in todo)
        elif method.source == "mtt":
            store.require_mtt_ssl()
        elif method.source == "variant" and method.subset is not None and "distill" not in names:
            store.require_variant(method.subset)


def prepare(plan: Plan) -> None:
    """Phase 2, on rank 0 alone: make the run directory writable (removing orphaned temporary files,
    :meth:`RunDir.prepare`) and check that it has room for ``plan.needed`` bytes (ArtifactError; a
    folder made here is removed again, so a refused command leaves nothing behind), then write
    ``config.yaml`` and, with ``force``, drop the records of the first named stage and every later
    one."""
    store = plan.store
    created = store.prepare()
    try:
        check_disk(store, plan.needed, ", ".join(plan.todo) or "the run")
    except ArtifactError:
        if created:
            store.path.rmdir()
        raise
    write_text(store.config_path, dump_config(plan.config))
    if plan.force:
        store.invalidate(later_stages(plan.names[0]))


def run_planned(plan: Plan) -> dict[str, dict[str, Any]]:
    """Phase 3, after :func:`prepare`: run the plan's stages in order, rank 0 appending what is
    printed to ``log.txt``; a stage runs when forced or unfinished, otherwise its runner returns
    its record. Before a stage its damaged artifacts are deleted (``repair``,
    :func:`_discard_damaged`), after it rank 0 writes the manifest. The window check's warning is
    repeated at the end when the evaluation ran, under the results it explains. Returns each
    stage's record."""
    log = logged_to(plan.store.log_path) if plan.runtime.is_main else contextlib.nullcontext()
    with log:
        if plan.runtime.is_main and plan.todo:
            _announce(plan)
        records: dict[str, dict[str, Any]] = {}
        warning = None
        for name in plan.names:
            old, damaged = _discard_damaged(plan, name)
            if plan.force or plan.store.record(name) is None:
                warning = _start_stage(plan, name) or warning
            records[name] = RUNNERS[name](
                plan.config, plan.out, force=plan.force, real=plan.real, runtime=plan.runtime
            )
            _finish_stage(plan, name, records[name], old, damaged)
        if warning and "evaluate" in records:
            print(warning, file=sys.stderr)
        return records


def _announce(plan: Plan) -> None:
    """Print what runs where (with the matched window when distill or evaluate runs) and the
    evaluation's skipped tasks."""
    window = {"distill", "evaluate"} & set(plan.todo)
    print(
        f"mkdt: {', '.join(plan.todo)} into {plan.store.path}"
        + (f"; {window_summary(plan.config, plan.real.num_train)}" if window else "")
    )
    for line in plan.skipped.values():
        print(line)


def _discard_damaged(plan: Plan, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """When :func:`check` found ``name``'s artifacts damaged (``--repair``): its record and
    those artifacts (paths relative to the run directory), which rank 0 deletes, with the record,
    so that the stage runs again; else (None, []). Every rank waits at a barrier after."""
    store = plan.store
    damaged = plan.repairs.get(name, [])
    old = store.record(name) if damaged else None
    if damaged and plan.runtime.is_main:
        for rel in damaged:
            store.artifact_path(rel).unlink(missing_ok=True)
        store.invalidate([name])
    plan.runtime.barrier()
    return old, damaged


def _start_stage(plan: Plan, name: str) -> str | None:
    """Before a stage that runs: rank 0 prints ``stage i/N: name`` (its place among the stages
    the config wants); before distill with
    ``distill.check_window``, rank 0 runs :func:`check_window` and every rank waits at a barrier
    after. Returns the check's warning (None without one)."""
    if plan.runtime.is_main:
        order = [stage for stage in STAGES if stage == name or STAGES[stage].wants(plan.config)]
        print(f"stage {order.index(name) + 1}/{len(order)}: {name}", flush=True)
    if name != "distill" or not plan.config.distill.check_window:
        return None
    warning = check_window(plan.config, plan.store, plan.real, plan.runtime) if plan.runtime.is_main else None
    plan.runtime.barrier()
    return warning


def _finish_stage(
    plan: Plan, name: str, record: dict[str, Any], old: dict[str, Any] | None, damaged: list[str]
) -> None:
    """After a stage, on rank 0: when it was repaired (``old`` its record before, ``damaged`` what
    was deleted) into artifacts other than the recorded ones, drop the later stages' records; write
    the manifest. Every rank waits at a barrier after."""
    store = plan.store
    if plan.runtime.is_main:
        if damaged and old is not None and old.get("artifacts") != record.get("artifacts"):
            store.invalidate(later_stages(name)[1:])
        store.write_manifest(config_to_dict(plan.config), list(STAGES))
    plan.runtime.barrier()
