"""distill/history.csv and distill.snapshots: the per-iteration record of a distillation and the
copies of D_syn at chosen iterations, equal after an interrupted and resumed run."""

import csv
import shutil

import pytest
import torch

from mkdt.errors import ConfigError
from mkdt.files import load_tensors
from mkdt.graph import defining
from mkdt.stages import distill, experts, init, targets, teacher
from mkdt.store import HISTORY_COLUMNS, RunDir
from mkdt.train import checkpoint
from tests.helpers import interrupted_after_first_checkpoint, real_data, tiny_config

SETTINGS = ["teacher.probe=false", "distill.snapshots=[1,4]"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory with every stage before distill, and the config (4 iterations,
    checkpoints after 2 and 4)."""
    root = tmp_path_factory.mktemp("history")
    config = tiny_config(root / "cache", *SETTINGS)
    for stage in (teacher, targets, experts, init):
        stage.run(config, root / "run")
    return config, root / "run"


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted distillation of ``prepared``: (run directory, its record)."""
    config, base = prepared
    out = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(base, out)
    return out, distill.run(config, out)


def _copy(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def _rows(run):
    with open(run / "distill" / "history.csv", newline="") as fh:
        return list(csv.reader(fh))


def test_history_has_one_row_per_iteration(reference):
    run, record = reference
    rows = _rows(run)
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4]
    history = RunDir(run).load_history()
    synthetic, meta = load_tensors(run / "distill" / "synthetic.safetensors")
    assert history.lr[-1] == synthetic["lr"].item()  # alpha_syn after the last update, exactly
    assert history.lr[0] != history.lr[1]  # alpha_syn is learned
    assert 0 < history.pixel_change[0] < history.pixel_change[-1]  # pixels move away from the init
    segments = list(zip(history.experts, history.start_epochs, strict=True))
    assert all(len(e) == len(s) == 1 and 0 <= e[0] < 2 and 0 <= s[0] < 2 for e, s in segments)
    assert record["result"]["loss_first"] == pytest.approx(history.loss[0])
    assert "distill/history.csv" in record["artifacts"]


def test_pixel_change_is_the_mean_absolute_change_from_the_init_in_pixel_units(reference, prepared):
    run, _ = reference
    config, _ = prepared
    store, data = RunDir(run), real_data(config)
    initial = data.normalize(data.train_images[store.load_indices(config.init.images)["high_loss"]])
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    for it, change in ((1, store.load_history().pixel_change[0]), (4, store.load_history().pixel_change[-1])):
        images = store.load_synthetic(store.snapshot_path(it)).images
        assert change == pytest.approx(((images - initial).abs() * std).mean().item(), rel=1e-5)


def test_snapshots_are_the_set_at_their_iteration(reference):
    run, record = reference
    store = RunDir(run)
    last, meta = load_tensors(store.snapshot_path(4))
    final, final_meta = load_tensors(store.synthetic_path)
    assert meta == final_meta and all(torch.equal(last[k], final[k]) for k in final)
    first, first_meta = load_tensors(store.snapshot_path(1))
    assert first_meta["iterations"] == 1 and set(first) == set(final)
    assert not torch.equal(first["images"], final["images"])
    assert first["lr"].item() == RunDir(run).load_history().lr[0]
    assert {"distill/snapshot_1.safetensors", "distill/snapshot_4.safetensors"} <= set(record["artifacts"])


def test_interrupted_run_writes_the_same_history_and_snapshots(prepared, reference, tmp_path, monkeypatch):
    config, base = prepared
    out = _copy(base, tmp_path)
    with interrupted_after_first_checkpoint(monkeypatch):
        distill.run(config, out)
    assert len(_rows(out)) == 1 + 2  # the rows of the first checkpoint
    distill.run(config, out)
    for name in ("history.csv", "snapshot_1.safetensors", "snapshot_4.safetensors", "synthetic.safetensors"):
        assert (out / "distill" / name).read_bytes() == (reference[0] / "distill" / name).read_bytes(), name


def test_rows_written_after_the_last_checkpoint_are_not_repeated(prepared, reference, tmp_path, monkeypatch):
    """Killed between a checkpoint's rows and the checkpoint itself: the file holds rows the
    checkpoint does not; the resumed run drops them and writes each iteration once."""
    config, base = prepared
    out = _copy(base, tmp_path)
    real_save, saves = checkpoint.save_checkpoint, []

    def stop_before_second(path, state):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", stop_before_second)
    with pytest.raises(KeyboardInterrupt):
        distill.run(config, out)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert [r[0] for r in _rows(out)[1:]] == ["1", "2", "3", "4"]  # 3 and 4 ahead of the checkpoint
    distill.run(config, out)
    assert (out / "distill" / "history.csv").read_bytes() == (
        reference[0] / "distill" / "history.csv"
    ).read_bytes()


def test_snapshots_are_validated_and_not_part_of_the_definition(prepared):
    config, _ = prepared
    cache = config.data.cache_dir
    for bad in ("[0]", "[5]", "[2,-1]"):
        with pytest.raises(ConfigError, match=r"distill.snapshots: iterations \[.*\] are outside"):
            tiny_config(cache, f"distill.snapshots={bad}")
    plain = tiny_config(cache, "teacher.probe=false")
    assert defining(plain, "distill") == defining(config, "distill")
