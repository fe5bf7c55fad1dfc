"""The fine-tuning protocol: the loop, its determinism, and its records beside the probe's."""

import dataclasses
import json
import shutil

import pytest
import torch

from mkdt.config import load_config
from mkdt.data import load_dataset
from mkdt.errors import ConfigError
from mkdt.files import read_json
from mkdt.graph import defining
from mkdt.methods import PROTOCOL_TITLES
from mkdt.nn.models import ConvNet
from mkdt.results import build_records, make_record, mkdt_margins, results_table
from mkdt.runtime import generator, seeded
from mkdt.stages import evaluate, targets, teacher
from mkdt.store import RunDir
from mkdt.train.finetune import (
    FinetuneRecipe,
    batch_indices,
    crop_padding,
    fine_tune,
    pad_crop_flip,
    top1_accuracy,
)
from mkdt.train.kd import encode
from mkdt.train.probe import linear_probe
from tests.helpers import tiny_config

CPU = torch.device("cpu")
STAGE = [
    "teacher.probe=false",
    "teacher.epochs=2",
    "evaluate.methods=[no_pretrain, full]",
    "evaluate.protocols=[probe, finetune]",
    "evaluate.finetune.steps=20",
    "evaluate.finetune.batch_size=64",
    "evaluate.probe_max_iter=30",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset("digits", cache_dir=tmp_path_factory.mktemp("cache"))


def _blind_encoder(seed=0):
    """A ConvNet on 8x8 digits whose features are constant: its last norm layer has weight 0 and
    bias 1, so every image gives the same features (ReLU(1) = 1) until that weight is trained."""
    with seeded(seed):
        encoder = ConvNet(1, 8, width=8, depth=2, out_dim=16)
    norm = encoder.features_net[-3]
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(1.0)
    return encoder


def _labelled(digits, n=400):
    idx = torch.randperm(digits.num_train, generator=torch.Generator().manual_seed(0))[:n]
    return digits.train_images[idx], digits.train_labels[idx]


def _fine_tune(encoder, digits, recipe, head_seed=1, batch_seed=2):
    images, labels = _labelled(digits)
    gen = generator(batch_seed, CPU)
    return fine_tune(encoder, images, labels, 10, digits.normalize, recipe, head_seed, gen)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_trains_the_encoder_where_its_frozen_features_are_useless(digits):
    """The probe sees constant features (chance); fine-tuning must update the encoder to beat it:
    a head trained on the frozen features could not do better than the probe."""
    encoder = _blind_encoder()
    images, labels = _labelled(digits)
    train_x = encode(encoder, images, 256, normalize=digits.normalize)
    test_x = encode(encoder, digits.test_images, 256, normalize=digits.normalize)
    probe = linear_probe(train_x, labels, test_x, digits.test_labels, num_classes=10)
    before = _state(encoder)
    recipe = FinetuneRecipe(steps=300, lr=0.1, batch_size=64, augment=False)
    model = _fine_tune(encoder, digits, recipe)
    tuned = top1_accuracy(model, digits.test_images, digits.test_labels, 256, digits.normalize)
    assert probe < 0.2  # 10 classes: constant features give the majority class
    assert tuned > max(0.6, probe + 0.4)  # measured: 0.94-0.95 over three seeds
    assert _same_state(_state(encoder), before)  # the copy was trained, not the encoder given
    assert not torch.equal(model.encoder.features_net[-3].weight, before["features_net.5.weight"])


def test_fine_tuning_is_deterministic_per_seed(digits):
    recipe = FinetuneRecipe(steps=15, lr=0.05, batch_size=64)  # with crop + flip augmentation
    encoder = _blind_encoder()
    first, again = (_state(_fine_tune(encoder, digits, recipe)) for _ in range(2))
    assert _same_state(first, again)
    other_head = _state(_fine_tune(encoder, digits, recipe, head_seed=9))
    other_batches = _state(_fine_tune(encoder, digits, recipe, batch_seed=9))
    assert not torch.equal(first["head.weight"], other_head["head.weight"])
    assert not torch.equal(
        first["encoder.features_net.0.weight"], other_batches["encoder.features_net.0.weight"]
    )


def test_pad_crop_flip_takes_windows_of_the_padded_images():
    images = torch.randint(
        0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = pad_crop_flip(images, 1, generator(5, CPU))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, pad_crop_flip(images, 1, generator(5, CPU)))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    flipped = 0
    for i in range(len(images)):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(3) for c in range(3)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 16 < flipped < 48  # flipped with probability 1/2
    assert [crop_padding(s) for s in (4, 8, 16, 32, 64, 224)] == [0, 1, 2, 4, 4, 4]


def test_batches_pass_over_fresh_permutations():
    batches = list(batch_indices(10, 4, 7, generator(0, CPU)))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    first, second = torch.cat(batches[:3]), torch.cat(batches[3:6])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("evaluate.protocols=[]", "evaluate.protocols"),
        ("evaluate.protocols=[probe, finetuning]", "evaluate.protocols"),
        ("evaluate.protocols=[finetune, finetune]", "evaluate.protocols"),
        ("evaluate.finetune.steps=0", "evaluate.finetune.steps"),
        ("evaluate.finetune.lr=0", "evaluate.finetune.lr"),
        ("evaluate.finetune.momentum=1", "evaluate.finetune.momentum"),
        ("evaluate.finetune.weight_decay=-1e-4", "evaluate.finetune.weight_decay"),
        ("evaluate.finetune.batch_size=0", "evaluate.finetune.batch_size"),
    ],
)
def test_bad_protocol_settings_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("demo", None, [override])
    assert str(err.value).startswith(f"invalid config {key}: ") and "\n" not in str(err.value)


def test_the_recipe_defines_the_evaluation_only_when_it_fine_tunes():
    spec = defining(load_config("demo"), "evaluate")["evaluate"]
    assert "protocols" not in spec and "finetune" not in spec  # earlier runs stay valid
    assert defining(load_config("demo", None, ["evaluate.finetune.lr=0.5"]), "evaluate")["evaluate"] == spec
    both = defining(load_config("demo", None, ["evaluate.protocols=[finetune, probe]"]), "evaluate")
    assert both["evaluate"]["protocols"] == ["probe", "finetune"]
    other = load_config("demo", None, ["evaluate.protocols=[probe, finetune]", "evaluate.finetune.lr=0.5"])
    assert (
        defining(other, "evaluate")["evaluate"]["finetune"]["lr"] == 0.5 != both["evaluate"]["finetune"]["lr"]
    )


def test_records_and_tables_keep_probe_results_apart():
    probe = [make_record(m, "c10", 0.01, [0, 1], [a, a + 2]) for m, a in (("random", 30), ("mkdt", 33))]
    legacy = [{k: v for k, v in r.items() if k != "protocol"} for r in probe]  # results.json of before
    tuned = [
        make_record(m, "c10", 0.01, [0, 1], [a, a], "finetune") for m, a in (("random", 50), ("mkdt", 49))
    ]
    probe_table = results_table(legacy, "Header.")
    assert probe_table == results_table(probe, "Header.")
    assert probe_table.startswith("Header.\n\n| labels |") and "Linear probe" not in probe_table
    rows = probe_table.removeprefix("Header.\n\n")
    both = results_table(legacy + tuned, "Header.")
    title = PROTOCOL_TITLES["finetune"]
    assert both.startswith(f"Header.\n\nLinear probe:\n\n{rows}\n{title}:\n\n| labels |")
    assert "| 1% | MKDT | 49.00 ± 0.00 |" in both.split(title)[1]
    margins = mkdt_margins(legacy + tuned).splitlines()
    assert margins[0] == "MKDT minus each baseline, c10 1% labels: random subset +3.00"
    assert margins[2] == "MKDT minus each baseline (fine-tuning), c10 1% labels: random subset -1.00"
    assert margins[3].startswith("MKDT does not beat (fine-tuning): random subset")
    results = [{"method": "mkdt", "seed": 0, "task": "c10", "label_fraction": 0.01, "accuracy": 40.0}]
    assert [r["protocol"] for r in build_records(results, ["mkdt"], ["c10"], [0.01])] == ["probe"]
    with pytest.raises(ValueError, match="no finetune results for mkdt"):
        build_records(results, ["mkdt"], ["c10"], [0.01], protocols=["probe", "finetune"])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A run directory evaluated with both protocols (no_pretrain and full, which need the
    teacher and its targets only); the student's weights around each fine-tuning call."""
    root = tmp_path_factory.mktemp("finetune")
    config = tiny_config(root / "cache", *STAGE)
    out = root / "run"
    teacher.run(config, out)
    targets.run(config, out)
    calls = []
    real = evaluate.finetune

    def spy(config, student_for, tasks, *args):
        student = student_for(next(iter(tasks)), config.evaluate.label_fractions[0])  # fixed: one for all
        before = _state(student)
        results = real(config, student_for, tasks, *args)
        calls.append((before, _state(student)))
        return results

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "finetune", spy)
        record = evaluate.run(config, out)
    return config, RunDir(out), record, calls


def test_the_stage_reports_fine_tuning_in_its_own_records_and_table(finetuned):
    config, run, record, calls = finetuned
    results = run.load_results()
    assert results == record["result"]["results"]
    settings = [(m, "digits", f) for m in ("no_pretrain", "full") for f in (0.1, 0.5)]
    assert [(r["protocol"], r["method"], r["task"], r["label_fraction"]) for r in results] == [
        (p, *s) for p in ("probe", "finetune") for s in settings
    ]
    assert all(r["seeds"] == [0, 1] and all(0 <= a <= 100 for a in r["accuracies"]) for r in results)
    table = (run.path / "results.md").read_text()
    assert table.startswith(
        "Test accuracy (%) of the linear probe and of fine-tuning (fine-tuning: 20 SGD steps"
    )
    assert "\n\nLinear probe:\n\n| labels |" in table and "\n\nFine-tuning (the whole encoder" in table
    assert len(calls) == 4 and all(_same_state(before, after) for before, after in calls)


def test_fine_tuning_leaves_the_probe_results_as_a_probe_only_run_has_them(finetuned, tmp_path):
    config, run, record, _ = finetuned
    out = tmp_path / "copy"
    shutil.copytree(run.path, out)
    RunDir(out).invalidate(["evaluate"])
    probe_only = tiny_config(config.data.cache_dir, *STAGE, "evaluate.protocols=[probe]")
    alone = evaluate.run(probe_only, out)["result"]["results"]
    assert alone == record["result"]["results"][: len(alone)]
    assert "Linear probe:" not in (out / "results.md").read_text()


def test_a_resumed_evaluation_recomputes_only_the_missing_runs(finetuned, monkeypatch):
    config, run, record, _ = finetuned
    partial_path = run.partial_path
    partial = read_json(partial_path)
    assert {p["protocol"] for r in partial["runs"].values() for p in r["probes"]} == {"probe", "finetune"}
    del partial["runs"]["full/1"]
    partial_path.write_text(json.dumps(partial))
    run.invalidate(["evaluate"])
    seen = []
    real = evaluate.pretrain

    def spy(config, method, seed, *args):
        seen.append((method, seed))
        return real(config, method, seed, *args)

    monkeypatch.setattr(evaluate, "pretrain", spy)
    again = evaluate.run(config, run.path)
    assert seen == [("full", 1)]
    assert again["result"]["results"] == record["result"]["results"]


def test_finetune_recipe_is_keyword_only_and_immutable():
    """Positional fields could swap lr and weight_decay unnoticed: refused; a recipe never changes."""
    with pytest.raises(TypeError):
        FinetuneRecipe(100, 0.01, 0.9, 5e-4, 64, True)
    recipe = FinetuneRecipe(steps=100, batch_size=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.steps = 200
