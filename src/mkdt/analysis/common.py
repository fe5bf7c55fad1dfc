"""What every analysis of a run directory starts from: the finished stages it needs checked, the
runtime, D_real on the device, the teacher targets and (when probed) the downstream tasks."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mkdt.config import Config
from mkdt.data.real import RealData, load_real
from mkdt.downstream import available_tasks, load_task
from mkdt.graph import STAGES, defining
from mkdt.runtime import Runtime
from mkdt.store import RunDir


@dataclass
class RunSetting:
    """One run directory opened for an analysis; ``targets`` is the teacher's (N, D) targets of
    D_real on the device, ``tasks`` the evaluation's downstream tasks, loaded on first use."""

    config: Config
    store: RunDir
    runtime: Runtime
    real: RealData
    targets: torch.Tensor

    @functools.cached_property
    def tasks(self) -> dict[str, Any]:
        entries, skipped = available_tasks(self.config)  # as the evaluation: evaluate.missing_tasks
        for line in skipped.values():
            print(line)
        return {entry: load_task(self.config, entry, self.real.data) for entry in entries}


def open_run(
    config: Config,
    out: str | Path,
    needs: Sequence[str],
    *,
    preset: str | None = None,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> RunSetting:
    """Check that the stages in ``needs`` finished with this config (else ArtifactError naming the
    command to run, with ``--preset`` when given), then load what the analysis reads; ``real`` and
    ``runtime`` are reused when the caller has them."""
    store = RunDir(out)
    for stage in needs:
        command = f"{STAGES[stage].command}{f' --preset {preset}' if preset else ''} --out {store.path}"
        store.require(stage, defining(config, stage), command)
    runtime = runtime or Runtime.create(config.device, config.precision, config.channels_last, config.compile)
    real = real or load_real(config.data, config.seed, runtime.device)
    targets = store.load_targets(real.num_train).to(runtime.device)
    return RunSetting(config, store, runtime, real, targets)


def int_list(text: str) -> list[int]:
    """``"0,2,4"`` -> [0, 2, 4] (an argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def comma_list(value: Any) -> tuple[str, list[str]]:
    """An option given as ``"a,b"`` or a list: (its text, the stripped non-empty items)."""
    text = ",".join(value) if isinstance(value, (tuple, list)) else str(value)
    return text, [m.strip() for m in text.split(",") if m.strip()]
