"""The evaluate stage: records, tables, shared labels, lr-matched controls and reuse of finished runs."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mkdt import downstream
from mkdt.config.schema import parse_task
from mkdt.data import load_dataset
from mkdt.data.real import load_real
from mkdt.errors import ArtifactError, ConfigError, DataError
from mkdt.files import read_json
from mkdt.graph import STAGES
from mkdt.pipeline import run_stages
from mkdt.runtime import Runtime
from mkdt.stages import distill, evaluate, experts, init, targets, teacher
from mkdt.store import RunDir
from tests.helpers import real_data, tiny_config

METHODS = ["no_pretrain", "random", "sas", "high_loss", "full", "random@alpha", "high_loss@alpha", "mkdt"]
SMALL = [
    "teacher.probe=false",
    "teacher.epochs=2",
    "init.images=50",
    "distill.iterations=2",
    "distill.syn_steps=2",
    "distill.batch_syn=25",
    "evaluate.epochs=2",
    "evaluate.seeds=2",
    "evaluate.label_fractions=[0.1,0.5]",
    "evaluate.probe_max_iter=30",
    f"evaluate.methods=[{','.join(METHODS)}]",
]


def _image_folder(root, mode, per_class=(8, 4)):
    """An ImageFolder tree of 8x8 digits (train/ and test/), as 1-channel or coloured RGB PNGs."""
    digits = load_dataset("digits", cache_dir=root / "cache")
    for split, count in zip(("train", "test"), per_class, strict=True):
        for label in range(10):
            members = (digits.train_labels == label).nonzero().flatten()[:count]
            for i, index in enumerate(members.tolist()):
                pixels = digits.train_images[index, 0].numpy()
                if mode == "RGB":
                    pixels = np.stack([pixels, 255 - pixels, pixels // 2], axis=-1)
                path = root / "folder" / split / str(label) / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode).save(path)
    return root / "folder"


def _config(cache, *overrides):
    return tiny_config(cache, *SMALL, *overrides)


def _copy_run(run, out):
    """A copy of a run directory without its finished evaluation."""
    shutil.copytree(run.path, out)
    RunDir(out).invalidate(["evaluate"])
    return out


def _without_seconds(partial):
    return {key: {k: v for k, v in r.items() if k != "seconds"} for key, r in partial["runs"].items()}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run directory with every stage finished (tasks: the default, digits alone), and the
    labelled subsets drawn while evaluating, in call order."""
    root = tmp_path_factory.mktemp("evaluate")
    config = _config(root / "cache")
    out = root / "run"
    for stage in (teacher, targets, experts, init, distill):
        stage.run(config, out)
    with pytest.MonkeyPatch.context() as mp:
        drawn = _spy_on_label_subsets(mp)
        record = evaluate.run(config, out)
    return config, RunDir(out), record, drawn


def _spy_on_label_subsets(mp):
    drawn = []
    real = downstream.labelled_subset

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    mp.setattr(downstream, "labelled_subset", spy)
    return drawn


def _spy_on_pretrain(mp):
    """{(method, seed): the pre-training set} for every pre-training the evaluate stage runs."""
    seen = {}
    real = evaluate.pretrain

    def spy(config, method, seed, pset, *args):
        seen[method, seed] = pset
        return real(config, method, seed, pset, *args)

    mp.setattr(evaluate, "pretrain", spy)
    return seen


def test_results_schema_files_and_table(evaluated):
    config, run, record, _ = evaluated
    results = run.load_results()
    assert results == record["result"]["results"]
    assert [(r["method"], r["task"], r["label_fraction"]) for r in results] == [
        (m, "digits", f) for m in METHODS for f in (0.1, 0.5)
    ]
    for r in results:
        assert r["seeds"] == [0, 1] and len(r["accuracies"]) == 2
        assert all(0 <= a <= 100 for a in r["accuracies"])
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"]))
        assert r["std"] == pytest.approx(np.std(r["accuracies"], ddof=1))
    assert set(record["result"]["seconds_per_pretraining"]) == set(METHODS) - {"no_pretrain"}
    table = (run.path / "results.md").read_text()
    assert "| 10% | MKDT |" in table and "| 50% | full data |" in table and "|D_syn| = 50" in table


def test_more_labels_give_higher_accuracy_after_full_pretraining(evaluated):
    _, _, record, _ = evaluated
    mean = {r["label_fraction"]: r["mean"] for r in record["result"]["results"] if r["method"] == "full"}
    assert mean[0.5] > mean[0.1] > 30  # 10 classes: chance is 10%


def test_every_method_sees_the_same_labels_for_a_seed(evaluated):
    _, _, _, drawn = evaluated
    per_method = len(drawn) // len(METHODS)  # seeds x fractions, in loop order
    assert per_method == 2 * 2
    first = drawn[:per_method]
    for m in range(1, len(METHODS)):
        for (x, y), (x0, y0) in zip(drawn[m * per_method : (m + 1) * per_method], first, strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    seed0, seed1 = first[0], first[2]  # 10% of digits for seeds 0 and 1
    assert len(seed0[1]) == round(0.1 * 1437) and not torch.equal(seed0[0], seed1[0])


def test_rerun_reuses_finished_pretraining_and_recomputes_identically(evaluated, monkeypatch):
    config, run, record, _ = evaluated
    assert evaluate.run(config, run.path)["finished"] == record["finished"]  # done: skipped
    partial_path = run.stage_dir("evaluate") / "partial.json"
    partial = read_json(partial_path)
    kept = _without_seconds(partial)
    del partial["runs"]["full/1"], partial["runs"]["mkdt/0"]
    partial_path.write_text(json.dumps(partial))
    run.invalidate(["evaluate"])
    calls = _spy_on_pretrain(monkeypatch)
    again = evaluate.run(config, run.path)
    assert sorted(calls) == [("full", 1), ("mkdt", 0)]
    assert again["result"]["results"] == record["result"]["results"]
    assert _without_seconds(read_json(partial_path)) == kept


def test_runs_are_reused_across_method_lists_and_force_until_their_set_changes(evaluated, tmp_path):
    config, run, record, _ = evaluated
    out = _copy_run(run, tmp_path / "copy")
    store = RunDir(out)
    subsets = _config(config.data.cache_dir, "evaluate.methods=[random, high_loss]")  # reads no distill
    for cfg, force in ((subsets, False), (config, True)):  # fewer methods, then all of them, forced
        with pytest.MonkeyPatch.context() as mp:
            calls = _spy_on_pretrain(mp)
            results = evaluate.run(cfg, out, force=force)["result"]["results"]
        assert calls == {}
        methods = cfg.evaluate.methods
        assert results == [r for r in record["result"]["results"] if r["method"] in methods]
    # the distill stage redone into other pixels (same step size): MKDT alone is pre-trained again
    done = read_json(out / "distill" / "stage.json")
    with safe_open(store.synthetic_path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(store.synthetic_path)
    save_file({**tensors, "images": tensors["images"] + 0.01}, store.synthetic_path, metadata)
    artifacts = tuple(map(store.artifact_path, done["artifacts"]))
    store.finish("distill", done["defining"], done["seconds"], done["result"], artifacts)
    with pytest.MonkeyPatch.context() as mp:
        calls = _spy_on_pretrain(mp)
        evaluate.run(config, out, force=True)
    assert sorted(calls) == [("mkdt", 0), ("mkdt", 1)]


def test_lr_matched_controls_pretrain_the_same_images_at_mkdts_learned_step_size(evaluated, tmp_path):
    config, run, _, _ = evaluated
    out = _copy_run(run, tmp_path / "copy")
    other = _config(
        config.data.cache_dir, "evaluate.methods=[random, random@alpha, high_loss@alpha]", "evaluate.seeds=1"
    )
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_on_pretrain(mp)
        results = evaluate.run(other, out)["result"]["results"]
    alpha = run.load_synthetic().lr
    assert alpha != pytest.approx(config.evaluate.lr)
    assert (
        seen["random", 0].lr == config.evaluate.lr
        and seen["random@alpha", 0].lr == alpha == seen["high_loss@alpha", 0].lr
    )
    assert torch.equal(seen["random", 0].images, seen["random@alpha", 0].images)
    assert torch.equal(seen["random", 0].targets, seen["random@alpha", 0].targets)
    assert not torch.equal(seen["random@alpha", 0].images, seen["high_loss@alpha", 0].images)
    assert {r["method"] for r in results} == {"random", "random@alpha", "high_loss@alpha"}
    assert "random subset @ MKDT's lr" in (out / "results.md").read_text()


def test_mtt_ssl_is_evaluated_from_the_analysis_set_and_refused_without_it(evaluated, tmp_path):
    config, run, _, _ = evaluated
    out = _copy_run(run, tmp_path / "copy")
    other = _config(config.data.cache_dir, "evaluate.methods=[mtt_ssl]", "evaluate.seeds=1")
    with pytest.raises(ArtifactError, match="run `mkdt analyze mtt --out"):
        evaluate.run(other, out)
    copy = RunDir(out)
    copy.mtt_ssl_path.parent.mkdir(parents=True)
    shutil.copy(copy.synthetic_path, copy.mtt_ssl_path)  # any set in the distill format
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_on_pretrain(mp)
        results = evaluate.run(other, out)["result"]["results"]
    assert torch.equal(seen["mtt_ssl", 0].images, run.load_synthetic().images)
    assert [r["method"] for r in results] == ["mtt_ssl", "mtt_ssl"]
    assert "| 10% | MTT-SSL |" in (out / "results.md").read_text()


def test_partial_of_another_config_is_ignored_and_name_root_tasks_load(evaluated, tmp_path):
    config, run, record, _ = evaluated
    out = _copy_run(run, tmp_path / "copy")
    folder = _image_folder(tmp_path, "L")
    other = _config(
        config.data.cache_dir,
        f"evaluate.tasks=[digits, imagefolder={folder}]",
        "evaluate.methods=[no_pretrain]",
        "evaluate.seeds=1",
    )
    with pytest.MonkeyPatch.context() as mp:
        drawn = _spy_on_label_subsets(mp)
        results = evaluate.run(other, out)["result"]["results"]
    assert [(r["task"], r["label_fraction"]) for r in results] == [
        ("digits", 0.1),
        ("digits", 0.5),
        (f"imagefolder={folder}", 0.1),
        (f"imagefolder={folder}", 0.5),
    ]
    assert (
        [r["accuracies"] for r in results[:2]]
        == [  # recomputed, identical to the first run
            r["accuracies"][:1] for r in record["result"]["results"] if r["method"] == "no_pretrain"
        ]
    )
    assert list(read_json(out / "evaluate/partial.json")["runs"]) == ["no_pretrain/0"]
    images, labels = drawn[2]  # the ImageFolder task (80 training images) at 10%
    assert images.shape[1:] == (1, 8, 8) and len(labels) == 10  # at least one label per class


def test_pretraining_on_full_data_lowers_the_kd_loss(evaluated):
    config, run, _, _ = evaluated
    real = load_real(config.data, config.seed, torch.device("cpu"))
    data = real.data
    z = run.load_targets(data.num_train)
    full = evaluate.pretraining_sets(run, config, real, z)["full"]
    cpu = Runtime(torch.device("cpu"))
    start, _ = evaluate.pretrain(config, "full", 0, None, data, z.shape[1], cpu)
    trained, losses = evaluate.pretrain(config, "full", 0, full, data, z.shape[1], cpu)
    with torch.no_grad():
        before = F.mse_loss(start.eval()(full.images), z).item()
        after = F.mse_loss(trained.eval()(full.images), z).item()
    assert len(losses) == config.evaluate.epochs
    assert after < 0.9 * before
    assert full.lr == config.evaluate.lr and len(full.images) == data.num_train


def test_missing_prerequisites_name_the_command(evaluated, tmp_path):
    config, run, _, _ = evaluated
    with pytest.raises(ArtifactError, match="run `mkdt targets` first"):
        evaluate.run(config, tmp_path / "empty")
    for stage in ("teacher", "targets"):
        shutil.copytree(run.stage_dir(stage), tmp_path / "partial" / stage)
    with pytest.raises(ArtifactError, match="run `mkdt init` first"):
        evaluate.run(config, tmp_path / "partial")
    only_mkdt = _config(config.data.cache_dir, "evaluate.methods=[full, mkdt]")
    with pytest.raises(ArtifactError, match="run `mkdt distill` first"):
        evaluate.run(only_mkdt, tmp_path / "partial")


def test_rgb_task_for_a_grayscale_encoder_is_a_config_error(evaluated, tmp_path, monkeypatch):
    config, run, _, _ = evaluated
    folder = _image_folder(tmp_path, "RGB")
    rgb = _config(config.data.cache_dir, f"evaluate.tasks=[imagefolder={folder}]")
    monkeypatch.setattr(evaluate, "pretrain", lambda *a: pytest.fail("pre-trained before the check"))
    with pytest.raises(ConfigError, match="3-channel images but the encoder was pre-trained on 1"):
        evaluate.run(rgb, _copy_run(run, tmp_path / "copy"))


def test_grayscale_task_is_repeated_to_rgb(evaluated):
    config, _, _, _ = evaluated
    digits = real_data(config)
    rgb = downstream.match_channels(digits, 3, "digits")
    assert rgb.channels == 3 and torch.equal(rgb.test_images[:, 2], digits.test_images[:, 0])
    assert rgb.mean == digits.mean * 3


def test_task_entries_are_parsed():
    assert parse_task("cifar100") == ("cifar100", None)
    assert parse_task("cifar100=/data/c100") == ("cifar100", "/data/c100")
    for bad in ("=/data", "cifar100="):
        with pytest.raises(ConfigError, match="name=root"):
            parse_task(bad)


def test_label_subsets(evaluated):
    config, _, _, _ = evaluated
    digits = real_data(config)
    images, labels = downstream.labelled_subset(digits, 0.001, False, seed=3)
    assert len(labels) == 10  # at least num_classes
    again, _ = downstream.labelled_subset(digits, 0.001, False, seed=3)
    assert torch.equal(images, again)
    _, balanced = downstream.labelled_subset(digits, 0.05, True, seed=3)
    counts = torch.bincount(balanced, minlength=10)
    assert counts.sum() == round(0.05 * 1437) and counts.max() - counts.min() <= 1
    _, all_labels = downstream.labelled_subset(digits, 1.0, False, seed=3)
    assert torch.equal(all_labels.sort().values, digits.train_labels.sort().values)


def test_a_missing_task_is_refused_before_any_compute_or_skipped(evaluated, tmp_path, monkeypatch, capsys):
    config, run, _, _ = evaluated
    monkeypatch.setenv("MKDT_DATA", str(tmp_path / "data"))  # where cub200 without a root is looked for
    folder = _image_folder(tmp_path, "L")
    tasks = f"evaluate.tasks=[digits, cub200, imagefolder={folder}]"
    refuse = _config(config.data.cache_dir, tasks)
    with pytest.raises(DataError, match=r"evaluate task 'cub200': CUB-200-2011 not found at .*data/cub200"):
        run_stages(refuse, tmp_path / "new", list(STAGES))
    assert not (tmp_path / "new").exists()  # refused before the teacher, nothing written
    with pytest.raises(DataError, match=r"cub200=ROOT in evaluate.tasks \(evaluate.missing_tasks=skip"):
        evaluate.run(refuse, _copy_run(run, tmp_path / "refused"))
    skip = _config(
        config.data.cache_dir,
        tasks,
        "evaluate.missing_tasks=skip",
        "evaluate.methods=[no_pretrain]",
        "evaluate.seeds=1",
    )
    out = _copy_run(run, tmp_path / "copy")
    result = run_stages(skip, out, ["evaluate"])["evaluate"]["result"]
    printed = capsys.readouterr().out
    assert "evaluate: skipping task 'cub200': CUB-200-2011 not found at " in printed
    assert "; put it there or give it as cub200=ROOT in evaluate.tasks" in printed
    assert result["skipped_tasks"] == ["cub200"]
    assert {r["task"] for r in result["results"]} == {"digits", f"imagefolder={folder}"}
    note = "Not evaluated (files not found, evaluate.missing_tasks=skip): cub200."
    assert note in (out / "results.md").read_text()
