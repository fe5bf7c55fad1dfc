"""The tuned evaluation: step sizes chosen on held-out labels, common random numbers, no test label
in any choice."""

import dataclasses
import shutil

import pytest
import torch

from mkdt import downstream
from mkdt.errors import DataError
from mkdt.graph import defining
from mkdt.nn.models import flatten_params
from mkdt.pipeline import run_stages
from mkdt.stages import distill, evaluate, experts, init, targets, teacher
from mkdt.store import RunDir, SyntheticSet
from tests.helpers import tiny_config

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
    "evaluate.selection=tuned",
    "evaluate.lr_grid=[0.01,0.1]",
    "evaluate.methods=[no_pretrain,random,high_loss,mkdt]",
]


def _config(cache, *overrides):
    return tiny_config(cache, *SMALL, *overrides)


def _spy_on_pretrain(mp):
    """[(method, seed, lr, the student's initial flat parameters)] of every pre-training."""
    seen = []
    real = downstream.pretrain

    def spy(config, method, seed, pset, data, out_dim, runtime, lr=None):
        student, losses = real(config, method, seed, None, data, out_dim, runtime)
        seen.append((method, seed, lr, flatten_params(student).clone()))
        return real(config, method, seed, pset, data, out_dim, runtime, lr)

    mp.setattr(downstream, "pretrain", spy)  # pretrain_grid's, one step size at a time
    mp.setattr(evaluate, "pretrain", spy)  # no_pretrain's
    return seen


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A run with every stage finished under the tuned protocol, and its pre-trainings."""
    root = tmp_path_factory.mktemp("tuned")
    config = _config(root / "cache")
    out = root / "run"
    for stage in (teacher, targets, experts, init, distill):
        stage.run(config, out)
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_on_pretrain(mp)
        record = evaluate.run(config, out)
    return config, RunDir(out), record, seen


def test_validation_split_holds_out_a_share_of_each_class_reproducibly():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    fit, held = downstream.validation_split(labels, 0.2, 4, seed=7)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))
    counts = torch.bincount(labels[held], minlength=4).tolist()
    assert counts == [2, 1, 0, 1]  # round(0.2 n), at least 1, at most n - 1; a lone image stays in fit
    again, other = (
        downstream.validation_split(labels, 0.2, 4, seed=7),
        downstream.validation_split(labels, 0.2, 4, 8),
    )
    assert torch.equal(again[1], held) and not torch.equal(other[1], held)


def test_candidates_are_the_grid_plus_a_learned_step_size(tuned):
    config, run, _, _ = tuned
    pset = SyntheticSet(torch.zeros(1, 1, 8, 8), torch.zeros(1, 4), 0.37)
    assert downstream.candidate_lrs(config, "random", dataclasses.replace(pset, lr=0.1)) == [0.01, 0.1]
    assert downstream.candidate_lrs(config, "mkdt", pset) == [0.01, 0.1, 0.37]
    assert downstream.candidate_lrs(config, "random@alpha", pset) == [0.01, 0.1, 0.37]
    assert downstream.candidate_lrs(config, "ext:x", pset) == [0.01, 0.1, 0.37]
    assert downstream.candidate_lrs(config, "no_pretrain", None) == []
    fixed = _config(config.data.cache_dir, "evaluate.selection=fixed")
    assert downstream.candidate_lrs(fixed, "mkdt", pset) == [0.37]


def test_every_method_and_step_size_starts_from_the_seeds_initialisation(tuned):
    config, _, _, seen = tuned
    lrs = {(m, s): [] for m, s, _, _ in seen}
    for method, seed, lr, start in seen:
        lrs[method, seed].append(lr)
        first = next(p for m, s, _, p in seen if s == seed)
        assert torch.equal(start, first), (method, seed, lr)
    assert not torch.equal(next(p for _, s, _, p in seen if s == 0), next(p for _, s, _, p in seen if s == 1))
    alpha = RunDir(tuned[1].path).load_synthetic().lr
    assert lrs["random", 0] == [0.01, 0.1] and lrs["mkdt", 1] == sorted([0.01, 0.1, alpha])
    assert ("no_pretrain", 0) in lrs  # initialised from the same stream, not trained


def test_records_carry_the_choice_made_on_held_out_labels(tuned):
    config, run, record, _ = tuned
    results = record["result"]["results"]
    for r in results:
        assert r["selection"] == "tuned" and r["lr_grid"] == [0.01, 0.1]
        if r["method"] == "no_pretrain":
            assert r["lrs"] == [None, None]
            continue
        for lr, candidates, val in zip(r["lrs"], r["lr_candidates"], r["val_accuracies"], strict=True):
            assert lr in candidates and len(val) == len(candidates)
            assert val[candidates.index(lr)] == max(val)
    table = (run.path / "results.md").read_text()
    assert "step size of every set tuned" in table and "Step size chosen on held-out labels" in table


def test_the_reported_accuracy_is_the_chosen_students_probe_on_all_labels(tuned):
    config, run, record, _ = tuned
    r = next(
        r for r in record["result"]["results"] if r["method"] == "high_loss" and r["label_fraction"] == 0.5
    )
    evaluated = evaluate.run(config, run.path)  # finished: the same record
    assert evaluated["result"]["results"] == record["result"]["results"]
    from mkdt.data.real import load_real

    real = load_real(config.data, config.seed, torch.device("cpu"))
    z = run.load_targets(real.num_train)
    pset = evaluate.pretraining_sets(run, config, real, z)["high_loss"]
    task = downstream.load_task(config, "digits", real.data)
    rt = evaluate.Runtime(torch.device("cpu"))
    student, _ = downstream.pretrain(config, "high_loss", 1, pset, real.data, z.shape[1], rt, r["lrs"][1])
    images, labels = downstream.task_labels(config, "digits", task, 0.5, 1)
    train_x = downstream.encode(student, images, 256, normalize=real.data.normalize)
    test_x = downstream.encode(student, task.test_images, 256, normalize=real.data.normalize)
    accuracy = downstream.probe_accuracy(config, (train_x, labels), (test_x, task.test_labels), 10, rt.device)
    assert accuracy == pytest.approx(r["accuracies"][1], abs=1e-9)


def test_no_test_label_influences_the_choice(tuned, monkeypatch):
    config, run, record, _ = tuned
    real_load = downstream.load_task

    def scrambled(*args, **kwargs):
        task = real_load(*args, **kwargs)
        perm = torch.randperm(len(task.test_labels), generator=torch.Generator().manual_seed(0))
        return dataclasses.replace(task, test_labels=task.test_labels[perm])

    monkeypatch.setattr(evaluate, "load_task", scrambled)
    run.invalidate(["evaluate"])
    (run.stage_dir("evaluate") / "partial.json").unlink()
    again = evaluate.run(config, run.path)["result"]["results"]
    before = record["result"]["results"]
    assert [r["lrs"] for r in again] == [r["lrs"] for r in before]
    assert [r["val_accuracies"] for r in again] == [r["val_accuracies"] for r in before]
    assert [r["accuracies"] for r in again] != [r["accuracies"] for r in before]


def test_too_few_labels_to_hold_out_are_refused_before_any_compute(tuned, tmp_path):
    config, run, _, _ = tuned
    few = _config(config.data.cache_dir, "evaluate.label_fractions=[0.001]", "evaluate.class_balanced=true")
    with pytest.raises(DataError, match="none can be held out.*evaluate.selection=fixed"):
        run_stages(few, tmp_path / "fresh", ["teacher", "targets", "experts", "init", "distill", "evaluate"])
    assert not (tmp_path / "fresh").exists()


def test_the_fixed_protocol_keeps_its_old_definition(tuned):
    config, _, _, _ = tuned
    fixed = _config(config.data.cache_dir, "evaluate.selection=fixed", "evaluate.lr_grid=[0.5]")
    own = defining(fixed, "evaluate")["evaluate"]
    assert not {"selection", "lr_grid", "validation_fraction"} & set(own)
    assert {"selection", "lr_grid", "validation_fraction"} <= set(defining(config, "evaluate")["evaluate"])


def test_adding_a_method_reuses_the_finished_runs_of_the_others(tuned, tmp_path):
    config, run, _, _ = tuned
    out = tmp_path / "copy"
    shutil.copytree(run.path, out)
    RunDir(out).invalidate(["evaluate"])
    (out / "evaluate" / "partial.json").unlink()
    first = evaluate.run(config, out)["result"]["results"]
    RunDir(out).invalidate(["evaluate"])
    more = _config(config.data.cache_dir, "evaluate.methods=[no_pretrain,random,high_loss,random@alpha,mkdt]")
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_on_pretrain(mp)
        results = evaluate.run(more, out)["result"]["results"]
    assert {(m, s) for m, s, _, _ in seen} == {("random@alpha", 0), ("random@alpha", 1)}
    before = {(r["method"], r["label_fraction"]): r["accuracies"] for r in first}
    for r in results:
        if r["method"] != "random@alpha":
            assert r["accuracies"] == before[r["method"], r["label_fraction"]]


def test_step_sizes_trained_at_once_give_the_same_choices(tuned, tmp_path):
    config, run, record, _ = tuned
    out = tmp_path / "copy"
    shutil.copytree(run.path, out)
    RunDir(out).invalidate(["evaluate"])
    (out / "evaluate" / "partial.json").unlink()
    one = evaluate.run(config, out)["result"]["results"]
    RunDir(out).invalidate(["evaluate"])
    (out / "evaluate" / "partial.json").unlink()
    batched = evaluate.run(_config(config.data.cache_dir, "evaluate.parallel=3"), out)["result"]["results"]
    for a, b in zip(one, batched, strict=True):
        assert a["lrs"] == b["lrs"] and a["accuracies"] == pytest.approx(b["accuracies"], abs=1.0)


def test_a_choice_at_the_end_of_the_grid_is_warned_about():
    record = {"method": "mkdt", "task": "cifar10", "label_fraction": 0.01, "lr_grid": [0.1, 1.0]}
    (line,) = evaluate.grid_edge_warnings([{**record, "lrs": [1.0, 1.0, 0.37]}])
    assert "MKDT (cifar10, 1% labels) chose the largest step size of evaluate.lr_grid (1) in 2 of 3" in line
    assert "above the grid" in line
    assert evaluate.grid_edge_warnings([{**record, "lrs": [0.37, 0.37, 1.0]}]) == []
    (low,) = evaluate.grid_edge_warnings([{**record, "lrs": [0.1, 0.37]}])
    assert "smallest" in low and "below the grid" in low
