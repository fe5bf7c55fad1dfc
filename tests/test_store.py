"""The run directory's artifact IO: round trips, atomic writes, damaged files, stage records, the lock."""

import errno
import json
import os
import shutil

import pytest
import torch

from mkdt import files
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


def test_a_same_size_change_of_a_recorded_artifact_is_damage_named_with_its_repair(tmp_path):
    made = RunDir(tmp_path / "made")
    path = made.targets_path
    save_tensors(path, {"targets": torch.zeros(10, 4)}, {})
    made.finish("targets", {}, 1.0, {}, (path,))
    shutil.copytree(made.path, tmp_path / "run")  # another path: hashed afresh, as by a later process
    run = RunDir(tmp_path / "run")
    assert run.damaged("targets") == [] and run.verified("targets")["artifacts"]
    data = bytearray(run.targets_path.read_bytes())
    data[-1] ^= 0x40  # one float changed, the size kept
    run.targets_path.write_bytes(bytes(data))
    assert run.damaged("targets") == ["targets/targets.safetensors"]
    with pytest.raises(ArtifactError, match=r"targets.safetensors of the finished targets stage is damaged"):
        run.verified("targets")
    with pytest.raises(ArtifactError, match=rf"sha256.*`mkdt targets --repair --out {run.path}`"):
        run.verified("targets")


def test_a_run_directory_has_one_writer_at_a_time_and_a_killed_writers_lock_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "new" / "run")
    with run.locked("mkdt run --out new/run"):
        holder = json.loads(run.lock_path.read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "mkdt run --out new/run"
        # flock conflicts between two opens of the file, even in one process
        refusal = rf"run is in use by another mkdt process \(pid {os.getpid()} on .*: mkdt run --out"
        with pytest.raises(ArtifactError, match=refusal), RunDir(run.path).locked("mkdt teacher"):
            pass
    assert not (tmp_path / "new").exists()  # made for the lock and left empty: removed again
    run.path.mkdir(parents=True)
    run.lock_path.write_text('{"pid": 1, "host": "gone"}')  # left by a killed process: nobody holds it
    with run.locked("mkdt run"):
        assert json.loads(run.lock_path.read_text())["command"] == "mkdt run"
    assert list(run.path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a folder"), RunDir(tmp_path / "file").locked("x"):
        pass


def test_a_file_system_without_locks_gets_a_warning_and_no_lock(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with RunDir(tmp_path / "run").locked("mkdt run"):
        assert not (tmp_path / "run" / ".lock").exists()
    assert "mkdt: warning: cannot lock" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_results_json_holds_records_comparisons_headlines_and_costs_and_old_lists_still_load(tmp_path):
    from mkdt.results import make_record

    run = RunDir(tmp_path)
    records = [
        make_record("random", "c10", 0.01, [0, 1], [40.0, 41.0]),
        {**make_record("mkdt", "c10", 0.01, [0, 1], [42.0, 44.0]), "selection": "tuned"},  # kept as is
    ]
    costs = {"mkdt": {"stages": ["distill"], "seconds": 1.0, "cpu_seconds": None, "note": ""}}
    run.save_results(records, "table\n", costs)
    content = json.loads(run.results_path.read_text())
    assert set(content) == {"records", "comparisons", "headlines", "costs"}
    assert content["comparisons"][0]["differences"] == [2.0, 3.0] and content["costs"] == costs
    assert content["headlines"][0]["best_same_size"] == "random"
    assert run.load_results() == records and run.results_table_path.read_text() == "table\n"
    run.save_results(records, "table\n")
    assert "costs" not in json.loads(run.results_path.read_text())
    run.results_path.write_text(json.dumps(records))  # results.json of older versions: the bare list
    assert run.load_results() == records
    for content in ({"a": 1}, 3):
        run.results_path.write_text(json.dumps(content))
        with pytest.raises(ArtifactError, match="does not hold result records; redo it with `mkdt evaluate"):
            run.load_results()


def test_a_stage_record_keeps_its_cpu_seconds_beside_its_seconds(tmp_path):
    run = RunDir(tmp_path)
    record = run.finish("targets", {"seed": 0}, 2.5, {}, cpu_seconds=3.5)
    assert (
        (record["seconds"], record["cpu_seconds"])
        == (2.5, 3.5)
        == (
            run.record("targets")["seconds"],
            run.record("targets")["cpu_seconds"],
        )
    )
    assert record["fingerprint"] == fingerprint({"seed": 0})  # times stay out of the fingerprint
    assert "cpu_seconds" not in run.finish("experts", {}, 1.0, {})  # callers that measure none
