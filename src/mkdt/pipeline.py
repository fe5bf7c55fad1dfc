"""Running stages into one run directory: in pipeline order, skipping finished ones, with D_real
loaded and placed on the device once for all of them, and every check that can run before compute
done first (so that a refused command changes nothing on disk)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdt.analysis.trajectories import LOW_SHARE, analyse
from mkdt.config import Config, config_to_dict, dump_config
from mkdt.data.real import RealData, load_real
from mkdt.downstream import available_tasks, window_of, window_summary
from mkdt.errors import ArtifactError
from mkdt.files import fingerprint, logged_to, read_json, write_text
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


def check_window(config: Config, store: RunDir, real: RealData, runtime: Runtime) -> str | None:
    """Before distilling (``distill.check_window``): the cheap trajectories analysis (experts 0
    and 1 at the window's ends, the full-data reference from one seed), written to
    ``analysis/window.*``, reused while the distill and evaluate definitions are unchanged; prints
    the verdict and warns when the window holds less than LOW_SHARE of the full-data gain; returns
    the warning (None without one)."""
    definition = fingerprint(
        {"distill": defining(config, "distill"), "evaluate": defining(config, "evaluate")}
    )
    path = store.path / "analysis" / "window.json"
    record = read_json(path) if path.is_file() else {}
    if record.get("definition") != definition:
        window = window_of(config, real.num_train)
        experts = list(range(min(2, config.experts.num_experts)))
        print(
            f"window check: probing experts {experts} at epochs 0 and {window.end_epoch} "
            "(distill.check_window)"
        )
        record = analyse(
            config,
            store.path,
            experts,
            [0, window.end_epoch],
            real=real,
            runtime=runtime,
            name="window",
            extra={"definition": definition},
        )
    print(f"window check: {record['verdict']}")
    share = record["window_share"]
    if share >= LOW_SHARE:
        return None
    held = "no" if share != share else f"{100 * share:.0f}% of the"  # nan: no gain to share
    warning = (
        f"mkdt: warning: the matched window holds {held} full-data gain, so MKDT cannot beat no "
        f"pre-training by much here; see {store.path / 'analysis' / 'window.md'} and docs/method.md §8"
    )
    print(warning, file=sys.stderr)
    return warning


def run_stages(
    config: Config, out: str | Path, stages: list[str], *, force: bool = False, repair: bool = False
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in pipeline order) into ``out``; finished compatible stages are skipped.

    Before anything is written: the device, D_real, the sizes it must satisfy, the files of the
    evaluation's tasks (a missing one is refused or, ``evaluate.missing_tasks=skip``, named in one
    line when the run starts), and whether every requested stage that already finished was made
    with this config (else ArtifactError) are checked, then the folder is made writable and checked
    for room. With ``force`` the named stages are recomputed and every later stage's record is
    dropped. With ``repair`` a finished stage whose artifacts are missing or damaged is redone
    (experts: only the damaged ones); the later stages' records are dropped only if the repaired
    artifacts differ from the recorded ones.
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
    skipped = available_tasks(config)[1] if "evaluate" in todo else {}  # missing_tasks=error raises
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
    log = logged_to(store.path / "log.txt") if runtime.is_main else contextlib.nullcontext()
    with log:
        if runtime.is_main and todo:
            window = {"distill", "evaluate"} & set(todo)
            print(
                f"mkdt: {', '.join(todo)} into {store.path}"
                + (f"; {window_summary(config, real.num_train)}" if window else "")
            )
            for line in skipped.values():
                print(line)
        records, warning = {}, None
        for name in names:
            old = store.record(name) if repair else None
            damaged = store.damaged(name) if old is not None else []
            if damaged and runtime.is_main:
                for rel in damaged:
                    (store.path / rel).unlink(missing_ok=True)
                store.invalidate([name])
            runtime.barrier()
            if force or store.record(name) is None:
                if runtime.is_main:
                    print(f"stage {list(STAGES).index(name) + 1}/{len(STAGES)}: {name}", flush=True)
                if name == "distill" and config.distill.check_window:
                    if runtime.is_main:
                        warning = check_window(config, store, real, runtime)
                    runtime.barrier()
            records[name] = RUNNERS[name](config, out, force=force, real=real, runtime=runtime)
            if runtime.is_main:
                if damaged and old is not None and old.get("artifacts") != records[name].get("artifacts"):
                    store.invalidate(later_stages(name)[1:])
                store.write_manifest(config_to_dict(config), list(STAGES))
            runtime.barrier()
        if warning and "evaluate" in records:  # repeated under the results it explains
            print(warning, file=sys.stderr)
        return records
