"""Resumable periodic checkpoints, written once for every loop that checkpoints.

A loop names its stateful objects (modules, optimizers, schedulers, generators, or anything with
``state_dict``/``load_state_dict``) and its progress values (epoch, histories); a
:class:`PeriodicCheckpoint` restores them from the last checkpoint when one exists (after checking
that it was made with the same definition) and saves them every ``every`` steps and at the end. A
checkpoint is a plain dict saved with ``torch.save`` and loaded with ``weights_only=True``::

    {<object name>: its state, ..., <progress name>: value, ..., "fingerprint", "defining"}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mkdt.errors import ArtifactError
from mkdt.files import check_same_definition, fingerprint, load_checkpoint, save_checkpoint


class PeriodicCheckpoint:
    """Checkpoints of one loop at ``path``: made with ``defining``, saved every ``every`` steps.

    ``path=None`` disables checkpointing (the loop runs from scratch and saves nothing).
    """

    def __init__(
        self, path: Path | None, defining: dict[str, Any], every: int, what: str, writer: bool = True
    ) -> None:
        self.path, self.defining, self.every, self.what = path, defining, every, what
        self.writer = writer  # False on ranks other than 0: they resume from the file but never write it

    def resume(self, objects: dict[str, Any]) -> dict[str, Any]:
        """Restore ``objects`` in place from the checkpoint and return its progress values; {}
        when there is no checkpoint. A checkpoint of another definition raises ArtifactError."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            state = load_checkpoint(self.path)
        except ArtifactError as exc:
            raise ArtifactError(
                f"{exc}: the {self.what} stage cannot resume from it; rerun the stage with "
                "--force to start it again"
            ) from None
        check_same_definition(self.what, self.path.parent, state, self.defining)
        for name, obj in objects.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(state[name])
            else:
                obj.load_state_dict(state[name])
        return {k: v for k, v in state.items() if k not in objects and k not in ("fingerprint", "defining")}

    def due(self, done: int, total: int) -> bool:
        """Whether a checkpoint is written after ``done`` of ``total`` steps."""
        return self.path is not None and (done % self.every == 0 or done == total)

    def save(self, objects: dict[str, Any], **values: Any) -> None:
        """Write the state of ``objects`` and the progress ``values`` (atomically)."""
        if self.path is None or not self.writer:
            return
        state = {
            name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
            for name, obj in objects.items()
        }
        save_checkpoint(
            self.path,
            {**state, **values, "fingerprint": fingerprint(self.defining), "defining": self.defining},
        )
