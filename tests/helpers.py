"""Small configs shared by the stage tests (digits, tiny networks: seconds on a CPU)."""

from contextlib import contextmanager

import pytest

from mkdt.config import Config, load_config

TINY = [
    "device=cpu",
    "teacher.model.width=4", "teacher.epochs=3", "teacher.batch_size=128",
    "teacher.warmup_epochs=1", "teacher.projector_dim=32", "teacher.checkpoint_every=1",
    "experts.num_experts=2", "experts.epochs=3", "experts.batch_size=128",
    "experts.student.width=8", "experts.student.depth=2",
    "distill.images=40", "distill.iterations=4", "distill.syn_steps=3", "distill.batch_syn=20",
    "distill.checkpoint_every=2", "distill.lr_img=10",
    "evaluate.epochs=2", "evaluate.seeds=2", "evaluate.label_fractions=[0.1,0.5]",
]


def tiny_config(cache_dir, *overrides: str) -> Config:
    return load_config("demo", None, [*TINY, f"data.cache_dir={cache_dir}", *overrides])


@contextmanager
def interrupted_after_first_checkpoint(monkeypatch, module):
    """Inside the block, ``module.save_checkpoint`` writes its file and then raises
    KeyboardInterrupt, like a user stopping a run right after a checkpoint; the block expects it."""
    real_save = module.save_checkpoint

    def save_then_interrupt(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(module, "save_checkpoint", real_save)
