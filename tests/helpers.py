"""Small configs and artifact readers shared by the stage tests (digits, tiny networks: seconds on
a CPU)."""

from contextlib import contextmanager

import pytest
import torch

from mkdt.config import Config, load_config
from mkdt.data import ImageData
from mkdt.data.real import load_real
from mkdt.files import fingerprint
from mkdt.graph import defining
from mkdt.store import RunDir
from mkdt.train import checkpoint
from mkdt.train.kd import Trajectory

TINY = [
    "device=cpu",
    "teacher.model.width=4",
    "teacher.epochs=3",
    "teacher.batch_size=128",
    "teacher.warmup_epochs=1",
    "teacher.projector_dim=32",
    "teacher.checkpoint_every=1",
    "experts.num_experts=2",
    "experts.epochs=3",
    "experts.batch_size=128",
    "experts.student.width=8",
    "experts.student.depth=2",
    "init.images=40",
    "distill.iterations=4",
    "distill.syn_steps=3",
    "distill.batch_syn=20",
    "distill.checkpoint_every=2",
    "distill.lr_img=10",
    "evaluate.epochs=2",
    "evaluate.seeds=2",
    "evaluate.label_fractions=[0.1,0.5]",
    "evaluate.selection=fixed",  # the tuned protocol has its own tests (tests/stages/test_tuned.py)
]


def tiny_config(cache_dir, *overrides: str) -> Config:
    return load_config("demo", None, [*TINY, f"data.cache_dir={cache_dir}", *overrides])


def real_data(config: Config) -> ImageData:
    """D_real of a config (on the CPU)."""
    return load_real(config.data, config.seed, torch.device("cpu")).data


def load_expert(run: RunDir, config: Config, k: int) -> Trajectory:
    """Expert k of a run, checked against the config's experts definition."""
    return run.load_expert(k, fingerprint(defining(config, "experts")))


def load_indices(run: RunDir, config: Config) -> dict[str, torch.Tensor]:
    """The init stage's subsets of a run, after checking that the stage finished with ``config``."""
    run.require("init", defining(config, "init"), "mkdt init")
    return run.load_indices(config.init.images)


@contextmanager
def interrupted_after_first_checkpoint(monkeypatch, saves=1):
    """Inside the block, the first periodic checkpoint (the first ``saves`` ones) is written and
    then KeyboardInterrupt is raised, like a user stopping a run right after a checkpoint; the
    block expects it."""
    real_save = checkpoint.save_checkpoint
    written = []

    def save_then_interrupt(path, state):
        real_save(path, state)
        written.append(path)
        if len(written) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
