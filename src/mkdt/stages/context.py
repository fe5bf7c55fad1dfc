"""What every stage's ``run`` starts from: its definition, the run directory, the runtime, D_real."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from mkdt.config import Config
from mkdt.data.real import RealData, load_real
from mkdt.graph import STAGES, defining
from mkdt.runtime import Runtime
from mkdt.store import RunDir


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
        self.start = time.perf_counter()
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
        """The record when the stage already finished with this definition (skip it); else None,
        after checking that every stage it reads has finished with a matching definition."""
        if (done := self.store.finished_or_reset(self.stage, self.spec, force, scratch)) is not None:
            return done
        for upstream in STAGES[self.stage].inputs(self.config):
            self.store.require(upstream, defining(self.config, upstream), STAGES[upstream].command)
        self.start = time.perf_counter()
        return None

    def seconds(self) -> float:
        """Seconds since the stage started its work."""
        return time.perf_counter() - self.start

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Write the stage's record (with the seconds since :meth:`finished`) and return it."""
        return self.store.finish(self.stage, self.spec, self.seconds(), result)
