"""Running stages into one run directory: in pipeline order, skipping finished ones, with D_real
loaded and placed on the device once for all of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdt.config import Config, config_to_dict, dump_config
from mkdt.data.real import load_real
from mkdt.files import write_text
from mkdt.graph import STAGES, later_stages
from mkdt.runtime import Runtime
from mkdt.stages import distill, evaluate, experts, init, targets, teacher
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
    config: Config, out: str | Path, stages: list[str], *, force: bool = False
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in pipeline order) into ``out``; finished compatible stages are skipped.

    With ``force`` the named stages are recomputed and every later stage's record is dropped, so
    nothing downstream keeps using results of the old artifacts.
    """
    store = RunDir(out)
    store.path.mkdir(parents=True, exist_ok=True)
    write_text(store.path / "config.yaml", dump_config(config))
    names = list(STAGES)
    if force:
        store.invalidate(later_stages(min(stages, key=names.index)))
    runtime = Runtime.create(config.device, config.precision, config.channels_last, config.compile)
    real = load_real(config.data, config.seed, runtime.device)
    records = {}
    for name in names:
        if name in stages:
            records[name] = RUNNERS[name](config, out, force=force, real=real, runtime=runtime)
            store.write_manifest(config_to_dict(config), names)
    return records
