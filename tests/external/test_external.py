"""``mkdt import`` and ``mkdt export`` on a tiny digits run (teacher and targets only): every kind
of source in its on-disk format, the checks on bad files, evaluation as ``ext:NAME``, and the
export -> import round trip."""

import json
import os
import pickle
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mkdt import downstream
from mkdt.cli import main
from mkdt.config import Config, load_config
from mkdt.data.real import RealData, load_real
from mkdt.errors import ArtifactError, ConfigError, DataError
from mkdt.external.exporter import export_set
from mkdt.external.importer import import_set
from mkdt.files import read_json, read_metadata
from mkdt.results import make_record
from mkdt.stages import evaluate, targets, teacher
from mkdt.stages.targets import teacher_targets
from mkdt.store import RunDir, SyntheticSet
from tests.helpers import TINY

SMALL = [
    "teacher.probe=false",
    "teacher.epochs=1",
    "evaluate.seeds=1",
    "evaluate.epochs=2",
    "evaluate.probe_max_iter=30",
]
INDICES = [5, 0, 17, 3, 1400, 42, 7, 8, 9, 11]


@dataclass
class Setting:
    """The shared run: its config, the overrides that make it (for the CLI), D_real, targets."""

    config: Config
    overrides: list[str]
    run: RunDir
    real: RealData
    z: torch.Tensor


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    overrides = [*TINY, f"data.cache_dir={root / 'cache'}", *SMALL]
    config = load_config("demo", None, overrides)
    out = root / "run"
    teacher.run(config, out)
    targets.run(config, out)
    real = load_real(config.data, config.seed, torch.device("cpu"))
    return Setting(config, overrides, RunDir(out), real, RunDir(out).load_targets(real.num_train))


def _import(s, name, source, **options):
    return import_set(s.config, s.run.path, name, source, **options)


def _loaded(s, name):
    return s.run.load_imported(name, s.config.evaluate.lr)


def _one_line_error(kind, match, call):
    with pytest.raises(kind, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- (a) index lists


def _index_files(folder):
    folder.mkdir()
    array = np.array(INDICES)
    (folder / "list.json").write_text(json.dumps(INDICES))
    (folder / "dict.json").write_text(json.dumps({"indices": INDICES}))
    (folder / "lines.txt").write_text("\n".join(map(str, INDICES)) + "\n")
    (folder / "spaced.txt").write_text(" ".join(map(str, INDICES)))
    np.save(folder / "array.npy", array)
    (folder / "array2.pkl").write_bytes(pickle.dumps(array, protocol=2))
    (folder / "array5.pickle").write_bytes(pickle.dumps(array.astype(np.int32), protocol=5))
    (folder / "dict.pkl").write_bytes(pickle.dumps({"indices": tuple(INDICES)}))
    return sorted(folder.iterdir())


def test_index_lists_in_every_format_import_those_rows_of_d_real(setting, tmp_path, capsys):
    s = setting
    for i, path in enumerate(_index_files(tmp_path / "lists")):
        if i == 0:  # through the command line once
            assert main(["import", f"idx{i}", str(path), "--out", str(s.run.path), *s.overrides]) == 0
            assert "evaluate it with evaluate.methods=[..., ext:idx0]" in capsys.readouterr().out
            meta = read_metadata(s.run.imported_path("idx0"))
        else:
            meta = _import(s, f"idx{i}", path)
        assert meta["kind"] == "indices" and meta["targets"] == "the targets stage", path
        assert meta["lr"] == "evaluate.lr" and meta["source_sha256"]
        got = _loaded(s, f"idx{i}")
        assert torch.equal(got.images, s.real.inputs[INDICES]) and torch.equal(got.targets, s.z[INDICES])
        assert got.lr == s.config.evaluate.lr


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("range.json", "[0, 1437]", "index 1437 is out of range; D_real has 1437 images"),
        ("negative.txt", "3 -1", "index -1 is out of range"),
        ("twice.json", "[4, 2, 4]", "index 4 appears 2 times"),
        ("floats.json", "[1.0, 2.0]", "indices must be integers"),
        ("bools.json", "[true, false]", "indices must be integers"),
        ("empty.txt", "", "holds no indices"),
        ("words.txt", "1 2 three", "'three', not an integer"),
        ("broken.json", "[1, 2", "cannot read .* as JSON"),
        ("nested.json", '{"idx": [1]}', "without the key 'indices'"),
        ("garbage.pkl", b"\x80\x05not a pickle", "refused to unpickle"),
        ("set.pkl", pickle.dumps({1, 2}, protocol=2), "refused to unpickle .*builtin__.set"),
        ("objects.pkl", pickle.dumps(np.array([1, "a"], dtype=object)), "refused to unpickle"),
        ("matrix.npy", np.zeros((2, 2), dtype=np.int64), "2-D int64 array; expected 1-D integers"),
    ],
)
def test_bad_index_lists_are_one_line_errors(setting, tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _one_line_error(DataError, match, lambda: _import(setting, "bad", path, kind="indices"))
    assert not setting.run.imported_path("bad").exists()


class _Evil:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_and_torch_files_are_refused_without_running_them(setting, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([1, 2, _Evil(marker)]))
    assert main(["import", "evil", str(evil), "--out", str(setting.run.path), *setting.overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mkdt: error: refused to unpickle") and "system" in err and err.count("\n") == 1
    evil_pt = tmp_path / "evil.pt"
    torch.save({"images": torch.zeros(2, 1, 8, 8), "payload": _Evil(marker)}, evil_pt)
    _one_line_error(DataError, "weights_only=True", lambda: _import(setting, "evil", evil_pt, scale="unit"))
    assert not marker.exists() and not setting.run.imported_path("evil").exists()


# ---------------------------------------------------------------- (b) image tensors


def test_image_tensors_in_each_file_format_and_layout(setting, tmp_path):
    s, idx = setting, INDICES
    pixels = s.real.images[idx]  # uint8 (n, 1, 8, 8)
    unit = pixels.float() / 255
    y = torch.randn(len(idx), s.z.shape[1])
    torch.save({"x_syn": unit.permute(0, 2, 3, 1), "y_syn": y}, tmp_path / "krr.pt")  # NHWC
    meta = _import(s, "krr", tmp_path / "krr.pt", scale="unit")
    got = _loaded(s, "krr")
    assert meta["kind"] == "tensors" and meta["targets"] == "the source" and torch.equal(got.targets, y)
    assert torch.allclose(got.images, s.real.inputs[idx], atol=1e-5)
    torch.save((pixels, y), tmp_path / "pair.pt")
    _import(s, "pair", tmp_path / "pair.pt", scale="uint8")
    assert torch.equal(_loaded(s, "pair").images, s.real.inputs[idx])
    # without targets the run's teacher encodes them, as the targets stage encodes D_real
    save_file({"images": pixels.contiguous()}, str(tmp_path / "plain.safetensors"))
    assert (
        _import(s, "plain", tmp_path / "plain.safetensors", scale="uint8")["targets"] == "the run's teacher"
    )
    assert torch.allclose(_loaded(s, "plain").targets, s.z[idx], atol=1e-5)
    np.save(tmp_path / "normalized.npy", s.real.inputs[idx].numpy())
    assert _import(s, "npy", tmp_path / "normalized.npy", scale="normalized")["kind"] == "tensors"
    assert torch.equal(_loaded(s, "npy").images, s.real.inputs[idx])
    _import(s, "krr", tmp_path / "krr.pt", scale="unit", teacher_targets=True, force=True)
    assert torch.allclose(_loaded(s, "krr").targets, s.z[idx], atol=1e-5)


def test_teacher_targets_are_the_targets_stage_function(setting):
    s = setting
    again = teacher_targets(s.config, s.run, s.real.data, s.real.inputs[:50])
    assert torch.allclose(again, s.z[:50], atol=1e-6)


@pytest.mark.parametrize(
    ("images", "scale", "match"),
    [
        (torch.rand(4, 1, 8, 8), "uint8", "does not look like uint8 images .*not all integers"),
        (torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), "unit", "does not look like unit"),
        (torch.arange(256.0).view(4, 1, 8, 8), "unit", r"values in \[0, 255\]"),
        (torch.rand(4, 1, 8, 8), "normalized", "does not look like normalized images"),
        (torch.randn(4, 1, 8, 8) + 40, "normalized", "does not look like normalized"),
        (torch.randn(4, 1, 8, 8), "unit", "does not look like unit"),
        (torch.full((4, 1, 8, 8), float("nan")), "unit", "non-finite pixel values"),
        (torch.rand(4, 1, 16, 16), "unit", "fit neither .*does not resize"),
        (torch.rand(4, 3, 8, 8), "unit", r"fit neither \(n, 1, 8, 8\)"),
        (torch.rand(8, 8), "unit", "fit neither"),
    ],
)
def test_image_tensors_that_contradict_the_stated_scale_or_shape_are_refused(
    setting, tmp_path, images, scale, match
):
    torch.save(images, tmp_path / "set.pt")
    _one_line_error(DataError, match, lambda: _import(setting, "bad", tmp_path / "set.pt", scale=scale))


def test_tensor_options_names_and_targets_are_checked(setting, tmp_path):
    s, path = setting, tmp_path / "set.pt"
    torch.save({"x": torch.rand(4, 1, 8, 8), "y": torch.randn(4, 7)}, path)
    _one_line_error(ConfigError, "state the pixel scale", lambda: _import(s, "bad", path))
    _one_line_error(DataError, r"\(4, 7\).*--teacher-targets", lambda: _import(s, "bad", path, scale="unit"))
    torch.save({"pixels": torch.rand(4, 1, 8, 8)}, tmp_path / "keys.pt")
    keys = tmp_path / "keys.pt"
    _one_line_error(DataError, "under one of images", lambda: _import(s, "bad", keys, scale="unit"))
    (tmp_path / "set.bin").write_bytes(b"")
    _one_line_error(ConfigError, "cannot tell the kind", lambda: _import(s, "bad", tmp_path / "set.bin"))
    _one_line_error(ConfigError, "not a valid name", lambda: _import(s, "../up", path, scale="unit"))
    _one_line_error(
        ConfigError, "applies to image tensors only", lambda: _import(s, "bad", tmp_path, scale="unit")
    )
    _import(s, "dup", path, scale="unit", teacher_targets=True)
    _one_line_error(ArtifactError, "exists; pass --force", lambda: _import(s, "dup", path, scale="unit"))


# ---------------------------------------------------------------- (c) folders, (d) runs


def _save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folders_flat_or_in_class_folders(setting, tmp_path):
    s, pixels = setting, setting.real.images[INDICES, 0].numpy()
    for i, image in enumerate(pixels):
        _save_png(tmp_path / "flat" / f"{i:02d}.png", image)
        _save_png(tmp_path / "classes" / f"c{i % 3}" / f"{i:02d}.png", image)
    meta = _import(s, "flat", tmp_path / "flat")
    assert meta["kind"] == "folder" and meta["targets"] == "the run's teacher"
    assert torch.equal(_loaded(s, "flat").images, s.real.inputs[INDICES])
    _import(s, "classes", tmp_path / "classes")
    order = sorted(range(len(INDICES)), key=lambda i: (i % 3, i))  # c0/00, c0/03, ..., c1/01, ...
    assert torch.equal(_loaded(s, "classes").images, s.real.inputs[[INDICES[i] for i in order]])
    _save_png(tmp_path / "flat" / "big.png", np.zeros((9, 9), dtype=np.uint8))
    _one_line_error(
        DataError, "different sizes.*does not resize", lambda: _import(s, "bad", tmp_path / "flat")
    )
    _save_png(tmp_path / "rgb" / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    _one_line_error(
        DataError,
        "colour image but the run's images are grayscale",
        lambda: _import(s, "bad", tmp_path / "rgb"),
    )
    (tmp_path / "empty").mkdir()
    _one_line_error(DataError, "no images", lambda: _import(s, "bad", tmp_path / "empty", kind="folder"))


def test_another_runs_distilled_set_keeps_its_targets_and_learned_lr(setting, tmp_path):
    s, other = setting, RunDir(tmp_path / "other")
    unit = torch.rand(6, 1, 8, 8)
    mean, std = (0.5,), (0.25,)  # another normalisation than D_real's: mapped through the pixels
    y = torch.randn(6, s.z.shape[1])
    other.save_synthetic(SyntheticSet((unit - 0.5) / 0.25, y, 0.37), mean, std, iterations=3)
    meta = _import(s, "other", other.path)
    assert (meta["kind"], meta["scale"], meta["lr"]) == ("run", "normalized", "learned")
    got = _loaded(s, "other")
    d_mean, d_std = s.real.data.mean[0], s.real.data.std[0]
    assert torch.allclose(got.images * d_std + d_mean, unit, atol=1e-5)
    assert torch.equal(got.targets, y) and got.lr == pytest.approx(0.37)
    (tmp_path / "list.json").write_text(json.dumps(INDICES))
    _import(s, "listed", tmp_path / "list.json")
    records = [make_record(m, "digits", 0.1, [0], [50.0]) for m in ("random", "ext:other", "ext:listed")]
    kinds = [r.get("kind") for r in evaluate.with_imported_kinds(s.run, records)]
    assert kinds == [None, "distilled", "external"]  # another run's set is an MKDT variant
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text("{}")
    _one_line_error(
        DataError, "holds no readable distilled set", lambda: _import(s, "bad", tmp_path / "half")
    )


# ---------------------------------------------------------------- evaluation as ext:NAME


def _spy(mp, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, real(*args, **kwargs)))
        return calls[-1][1]

    mp.setattr(module, name, spy)
    return calls


def test_an_imported_set_is_evaluated_as_its_own_method_on_the_same_labels(setting, tmp_path):
    s = setting
    out = tmp_path / "run"
    shutil.copytree(s.run.path, out)
    (tmp_path / "list.json").write_text(json.dumps(INDICES))
    import_set(s.config, out, "idx", tmp_path / "list.json")
    config = load_config("demo", None, [*s.overrides, "evaluate.methods=[no_pretrain, ext:idx]"])
    with pytest.MonkeyPatch.context() as mp:
        drawn = _spy(mp, downstream, "labelled_subset")
        results = evaluate.run(config, out)["result"]["results"]
    assert results == RunDir(out).load_results()
    keys = [(r["method"], r["task"], r["label_fraction"], r["seeds"]) for r in results]
    assert keys == [(m, "digits", f, [0]) for m in ("no_pretrain", "ext:idx") for f in (0.1, 0.5)]
    (_, (x0, y0)), (_, (x1, y1)) = drawn[0], drawn[2]  # the 10% subset of each method
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    table = (out / "results.md").read_text()
    assert "| 10% | idx (imported) |" in table and "idx (imported): 10 images at lr 0.1" in table
    # importing it again forgets its evaluations alone
    import_set(s.config, out, "idx", tmp_path / "list.json", force=True)
    assert RunDir(out).record("evaluate") is None
    assert list(read_json(out / "evaluate/partial.json")["runs"]) == ["no_pretrain/0"]


def test_imported_methods_are_checked_at_config_load_and_before_compute(setting, tmp_path, monkeypatch):
    s = setting
    for bad in ("ext:", "ext:a/b", "ext:.hidden", "ext: x"):
        _one_line_error(
            ConfigError,
            "evaluate.methods.*ext:NAME",
            lambda bad=bad: load_config("demo", None, [*s.overrides, f"evaluate.methods=['{bad}']"]),
        )
    out = tmp_path / "run"
    shutil.copytree(s.run.path, out)
    config = load_config("demo", None, [*s.overrides, "evaluate.methods=[no_pretrain, ext:nope]"])
    monkeypatch.setattr(evaluate, "pretrain", lambda *a: pytest.fail("pre-trained before the check"))
    _one_line_error(ArtifactError, "run `mkdt import nope SOURCE --out", lambda: evaluate.run(config, out))
    (tmp_path / "list.json").write_text(json.dumps(INDICES))
    import_set(s.config, out, "nope", tmp_path / "list.json")
    store, record = RunDir(out), read_json(out / "targets" / "stage.json")
    store.save_targets(s.z + 1)  # as if redone into other targets, recorded as such
    store.finish("targets", record["defining"], record["seconds"], record["result"], (store.targets_path,))
    _one_line_error(ArtifactError, "other teacher targets.*--force", lambda: evaluate.run(config, out))


# ---------------------------------------------------------------- export


def test_export_then_import_round_trips_pixels_and_targets(setting, tmp_path, capsys):
    s = setting
    out = tmp_path / "run"
    shutil.copytree(s.run.path, out)
    unit = torch.rand(12, 1, 8, 8)
    y = torch.randn(12, s.z.shape[1])
    mean, std = s.real.data.mean, s.real.data.std
    RunDir(out).save_synthetic(SyntheticSet((unit - mean[0]) / std[0], y, 0.3), mean, std, iterations=2)
    folder = tmp_path / "exported"
    assert main(["export", str(out), "--to", str(folder)]) == 0
    assert "exported 12 images of mkdt" in capsys.readouterr().out
    names = sorted(p.name for p in (folder / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(12)]
    assert "targets.safetensors" in (folder / "README.md").read_text()
    assert read_metadata(folder / "targets.safetensors")["lr"] == pytest.approx(0.3)
    meta = import_set(s.config, out, "back", folder)
    assert (meta["kind"], meta["targets"]) == ("folder", "the source")
    back = RunDir(out).load_imported("back", s.config.evaluate.lr)
    assert torch.equal(back.targets, y)
    pixels = back.images * std[0] + mean[0]
    assert (pixels - unit).abs().max() * 255 <= 0.5 + 1e-3  # within uint8 rounding
    quantized = s.real.data.normalize((unit * 255).round())
    assert torch.equal(back.images, quantized)  # the normalised tensors equal after quantisation
    _one_line_error(ConfigError, "not an empty folder", lambda: export_set(out, folder))
    _one_line_error(
        ArtifactError, "run `mkdt analyze mtt --out", lambda: export_set(out, tmp_path / "e", "mtt_ssl")
    )
    assert export_set(out, tmp_path / "again", "ext:back") == 12
    assert torch.equal(
        RunDir(out).load_imported("back", 0.1).images,
        _reimported(s, out, tmp_path / "again"),
    )


def _reimported(s, out, folder):
    import_set(s.config, out, "again", folder)
    return RunDir(out).load_imported("again", 0.1).images
