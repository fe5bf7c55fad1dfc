"""Running stages into one run directory: in pipeline order, skipping finished ones, with D_real
loaded and placed on the device once for all of them, and every check that can run before compute
done first (so that a refused command changes nothing on disk)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdt.config import Config, config_to_dict, dump_config
from mkdt.data.real import load_real
from mkdt.errors import ArtifactError
from mkdt.files import write_text
from mkdt.graph import STAGES, defining, later_stages
from mkdt.runtime import Runtime
from mkdt.stages import distill, evaluate, experts, init, targets, teacher
from mkdt.stages.context import check_budgets, check_disk, estimated_bytes
from mkdt.store import RunDir

StageRun = Callable[..., dict[str, Any]]
RUNNERS: dict[str, StageRun] = {
    "teacher": teacher.run,
    "targets": targets.run,
    "experts": experts.run,
    "init": init.run,
    "distill": distill.run,
    "evaluate": evaluate.run,
}


def run_stages(
    config: Config, out: str | Path, stages: list[str], *, force: bool = False, repair: bool = False
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in pipeline order) into ``out``; finished compatible stages are skipped.

    Before anything is written: the device, D_real, the sizes it must satisfy, and whether every
    requested stage that already finished was made with this config (else ArtifactError) are
    checked, then the folder is made writable and checked for room. With ``force`` the named
    stages are recomputed and every later stage's record is dropped. With ``repair`` a finished
    stage whose artifacts are missing or damaged is redone (experts: only the damaged ones); the
    later stages' records are dropped only if the repaired artifacts differ from the recorded ones.
    """
    store = RunDir(out)
    names = [name for name in STAGES if name in stages]
    runtime = Runtime.create(config.device, config.precision, config.channels_last, config.compile)
    real = load_real(config.data, config.seed, runtime.device)
    check_budgets(config, real.data, names)
    if not force:
        for name in names:
            if not (repair and store.damaged(name)) and store.is_done(name, defining(config, name)):
                store.verified(name)
    todo = [name for name in names if force or store.record(name) is None]
    if runtime.is_main:
        created = store.prepare()
        try:
            needed = sum(estimated_bytes(config, real.data, name) for name in todo)
            check_disk(store, needed, ", ".join(todo) or "the run")
        except ArtifactError:
            if created:
                store.path.rmdir()  # a refused command leaves nothing behind
            raise
        write_text(store.path / "config.yaml", dump_config(config))
        if force:
            store.invalidate(later_stages(names[0]))
    runtime.barrier()
    records = {}
    for name in names:
        old = store.record(name) if repair else None
        damaged = store.damaged(name) if old is not None else []
        if damaged and runtime.is_main:
            for rel in damaged:
                (store.path / rel).unlink(missing_ok=True)
            store.invalidate([name])
        runtime.barrier()
        records[name] = RUNNERS[name](config, out, force=force, real=real, runtime=runtime)
        if runtime.is_main:
            if damaged and old is not None and old.get("artifacts") != records[name].get("artifacts"):
                store.invalidate(later_stages(name)[1:])
            store.write_manifest(config_to_dict(config), list(STAGES))
        runtime.barrier()
    return records
