"""What every stage's ``run`` starts from: its definition, the run directory, the runtime, D_real,
and the checks that run before any compute (sizes against D_real, free disk, a writable folder)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mkdt.config import Config
from mkdt.data import ImageData
from mkdt.data.real import RealData, load_real
from mkdt.errors import ArtifactError, ConfigError
from mkdt.graph import STAGES, defining
from mkdt.nn.models import build_network, feature_dim, num_params
from mkdt.runtime import Runtime
from mkdt.store import RunDir


def check_budgets(config: Config, data: ImageData, stages: Iterable[str]) -> None:
    """Refuse, before any compute, sizes that D_real cannot satisfy in the given stages."""
    stages = set(stages)
    n = data.num_train
    trains_teacher = "teacher" in stages and config.teacher.checkpoint is None
    if trains_teacher and config.teacher.batch_size > n:
        raise ConfigError(
            f"teacher.batch_size ({config.teacher.batch_size}) is larger than D_real ({n} images)"
        )
    if stages & {"init", "distill", "krr_st", "evaluate"} and config.init.images > n:
        raise ConfigError(f"init.images ({config.init.images}) is larger than D_real ({n} images)")
    if "init" in stages and (k := config.init.sas_clusters or 0) > n:
        raise ConfigError(f"init.sas_clusters ({k}) is larger than D_real ({n} images)")
    probes = "evaluate" in stages or ("teacher" in stages and config.teacher.probe)
    if probes and data.num_classes < 2:
        raise ConfigError(
            f"{config.data.name} has {data.num_classes} class; the linear probes of the teacher "
            "and of the evaluation need at least 2 (set teacher.probe=false and leave out the "
            "evaluate stage to distill unlabelled data)"
        )


def estimated_bytes(config: Config, data: ImageData, stage: str) -> int:
    """Disk space a stage's artifacts need while they are written (temporary copies included)."""
    c, size = data.channels, data.image_size
    teacher = build_network(config.teacher.model, c, size, None).to("meta")
    dim = feature_dim(teacher)
    student = build_network(config.experts.student, c, size, dim).to("meta")
    n, images = data.num_train, config.init.images
    if (
        stage == "teacher"
    ):  # encoder, plus a checkpoint (weights, projector, Adam's two moments) and its temp copy
        return 4 * num_params(teacher) * (1 + 2 * 4) + 4 * 3 * 3 * config.teacher.projector_dim**2
    if stage == "targets":
        return 4 * n * dim
    if stage == "experts":
        return 4 * config.experts.num_experts * len(config.expert_save_epochs()) * num_params(student)
    if stage == "init":  # the loss (N,) float32 and the INIT_METHODS subsets (n,) int64
        return 4 * n + 24 * images
    if stage == "distill":  # the set and each of distill.variants
        return distilled_set_bytes(config, data) * (1 + len(config.distill.variants))
    if stage == "krr_st":  # the set, its checkpoint (the set, Adam's moments, the pool) and temp copies
        pool = config.krr_st.num_models * num_params(student) * 4 * 2 * 2
        return 4 * images * (c * size**2 + dim) * 8 + pool
    return 1 << 20  # evaluate: JSON and markdown


def distilled_set_bytes(config: Config, data: ImageData) -> int:
    """Disk space one set of the distill stage needs: the set, its snapshots, its checkpoint
    (images, momentum) and its temporary copy."""
    teacher = build_network(config.teacher.model, data.channels, data.image_size, None).to("meta")
    pixels = data.channels * data.image_size**2
    return 4 * config.init.images * (pixels + feature_dim(teacher)) * (6 + len(config.distill.snapshots))


def check_disk(store: RunDir, needed: int, what: str) -> None:
    """ArtifactError naming the folder and the bytes needed when the run directory has less free."""
    free = store.free_bytes()
    if free is not None and needed > free:
        raise ArtifactError(
            f"not enough free disk in {store.path} for {what}: about {needed / 2**20:.0f} MB "
            f"needed, {free / 2**20:.0f} MB free; free some space or choose another --out"
        )


def prerequisites(config: Config, stage: str) -> list[str]:
    """The stages whose artifacts ``stage`` depends on under ``config``: those it reads (in its
    declaration's order), then those they read, recursively, in pipeline order (distill reads the
    experts and the targets through init)."""
    direct = list(STAGES[stage].inputs(config))
    found, pending = set(direct), list(direct)
    while pending:
        for upstream in STAGES[pending.pop()].inputs(config):
            if upstream not in found:
                found.add(upstream)
                pending.append(upstream)
    return direct + [name for name in STAGES if name in found and name not in direct]


def require_prerequisites(
    config: Config,
    store: RunDir,
    stage: str,
    made: Iterable[str] = (),
    command: Callable[[str], str] = lambda stage: STAGES[stage].command,
) -> None:
    """ArtifactError, naming ``command(prerequisite)`` when one has not finished, unless every
    prerequisite of ``stage`` (:func:`prerequisites`) other than those in ``made`` (stages that
    run before it in the same command) has finished with this config's definition and still has
    the artifacts it recorded, at their sizes and sha256 (:meth:`RunDir.require`)."""
    made = set(made)
    for upstream in prerequisites(config, stage):
        if upstream not in made:
            store.require(upstream, defining(config, upstream), command(upstream))


class StageContext:
    """One stage's run: ``config``, the run directory ``store``, the stage's definition ``spec``,
    and the ``runtime`` and D_real (``real``), taken from the caller or built on first use."""

    def __init__(
        self,
        stage: str,
        config: Config,
        out: str | Path,
        real: RealData | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.stage, self.config, self.store = stage, config, RunDir(out)
        self.spec = defining(config, stage)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.cpu_known = True  # False once an earlier record without CPU time is counted in
        if runtime is not None:
            self.__dict__["runtime"] = runtime
        if real is not None:
            self.__dict__["real"] = real

    @functools.cached_property
    def runtime(self) -> Runtime:
        """The caller's runtime, or one built from the config's device and speed keys."""
        c = self.config
        return Runtime.create(c.device, c.precision, c.channels_last, c.compile)

    @functools.cached_property
    def real(self) -> RealData:
        """The caller's D_real, or the config's loaded on the runtime's device."""
        return load_real(self.config.data, self.config.seed, self.runtime.device)

    def finished(self, force: bool, scratch: tuple[Path, ...] = ()) -> dict[str, Any] | None:
        """The record when the stage already finished with this definition and its artifacts are
        intact (skip it); else None, after checking the sizes against D_real, its prerequisites
        (:func:`require_prerequisites`), that the run directory is writable and that it has room
        for this stage's artifacts."""
        check_budgets(self.config, self.real.data, [self.stage])
        rt = self.runtime
        if force:  # rank 0 alone removes the old record and scratch files
            if rt.is_main:
                self.store.finished_or_reset(self.stage, self.spec, True, scratch)
            rt.barrier()
        elif (done := self.store.finished_or_reset(self.stage, self.spec, False)) is not None:
            return done
        require_prerequisites(self.config, self.store, self.stage)
        if rt.is_main:
            self.store.prepare()
        rt.barrier()
        check_disk(
            self.store, estimated_bytes(self.config, self.real.data, self.stage), f"the {self.stage} stage"
        )
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return None

    def seconds(self) -> float:
        """Seconds since the stage started its work."""
        return time.perf_counter() - self.start

    def cpu_seconds(self) -> float | None:
        """CPU seconds of this process (all its threads) since the stage started its work; None
        when it counts an earlier record that lacks them (:meth:`continue_from`)."""
        return time.process_time() - self.cpu_start if self.cpu_known else None

    def continue_from(self, record: dict[str, Any]) -> None:
        """Count the work of the stage's earlier ``record`` in this run's times: a stage that adds to
        its finished result (distill's new ``distill.variants``) records the time of both. A
        record without ``cpu_seconds`` (written before it was kept) makes this run's unknown."""
        self.start -= record["seconds"]
        if "cpu_seconds" in record:
            self.cpu_start -= record["cpu_seconds"]
        else:
            self.cpu_known = False

    def finish(self, result: dict[str, Any], artifacts: tuple[Path, ...] = ()) -> dict[str, Any]:
        """Write the stage's record (with the wall-clock and CPU seconds since :meth:`finished` and
        the size and hash of each file in ``artifacts``) on rank 0 and return it, on every rank once
        it exists."""
        rt = self.runtime
        record = (
            self.store.finish(
                self.stage, self.spec, self.seconds(), result, artifacts, cpu_seconds=self.cpu_seconds()
            )
            if rt.is_main
            else {}
        )
        rt.barrier()
        return record if rt.is_main else self.store.record(self.stage) or {}
