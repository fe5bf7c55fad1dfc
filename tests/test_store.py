"""The run directory's artifact IO: round trips, atomic writes, damaged files and stage records."""

import pytest
import torch

from mkdt.errors import ArtifactError
from mkdt.files import atomic_path, fingerprint, load_checkpoint, load_tensors, save_checkpoint, save_tensors
from mkdt.runtime import derive_seed
from mkdt.store import RunDir


def test_tensors_round_trip_with_metadata(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "x.safetensors", t, {"k": [1, 2], "s": "v"})
    back, meta = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    assert meta == {"k": [1, 2], "s": "v"}


def test_corrupt_or_missing_artifact_gives_artifact_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(100)}, {})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="corrupt artifact"):
        load_tensors(path)
    with pytest.raises(ArtifactError, match="missing artifact"):
        load_tensors(tmp_path / "none.safetensors")
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_crash_while_writing_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_loads_without_executing_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError):
        load_checkpoint(tmp_path / "evil.pt")


def test_incompatible_stage_is_refused_with_the_differing_key(tmp_path):
    run = RunDir(tmp_path)
    spec = {"experts": {"lr": 0.1, "epochs": 3}}
    run.finish("experts", spec, 1.0, {})
    assert run.is_done("experts", spec)
    with pytest.raises(ArtifactError, match=r"experts.lr: 0.1 -> 0.05"):
        run.is_done("experts", {"experts": {"lr": 0.05, "epochs": 3}})
    with pytest.raises(ArtifactError, match="run `mkdt teacher` first"):
        run.require("teacher", {}, "mkdt teacher")


def test_fingerprint_and_derived_seeds_are_stable_and_distinct():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    seeds = {derive_seed(0, "expert", k) for k in range(100)}
    assert len(seeds) == 100 and derive_seed(0, "expert", 3) == derive_seed(0, "expert", 3)
    assert all(0 <= s < 2**63 for s in seeds)
