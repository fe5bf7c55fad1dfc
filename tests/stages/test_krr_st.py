"""The krr_st stage: run by `mkdt run` when the evaluation lists krr_st, evaluated beside MKDT with
its paired differences and cost, resumed to the same bits, and its config refused in one line."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from mkdt.cli import main
from mkdt.config import load_config
from mkdt.downstream import candidate_lrs
from mkdt.files import load_tensors
from mkdt.graph import STAGES, later_stages, pipeline
from mkdt.pipeline import run_stages
from mkdt.stages import krr_st
from mkdt.store import RunDir, SyntheticSet
from tests.helpers import TINY, interrupted_after_first_checkpoint, real_data, tiny_config

KRR = [
    "teacher.probe=false",
    "distill.check_window=false",
    "krr_st.iterations=4",
    "krr_st.num_models=2",
    "krr_st.online_iterations=3",
    "krr_st.outer_batch_size=64",
    "krr_st.checkpoint_every=2",
    "krr_st.log_every=1",
    "evaluate.methods=[no_pretrain,random,krr_st,mkdt]",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run with every stage finished, KRR-ST among the evaluated methods (augmented real
    batches encoded by the teacher: the default)."""
    root = tmp_path_factory.mktemp("krr_st")
    config = tiny_config(root / "cache", *KRR)
    records = run_stages(config, root / "run", list(STAGES))
    return root, config, records


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


def test_the_run_makes_the_set_and_evaluates_it_beside_mkdt(finished):
    root, config, records = finished
    run = RunDir(root / "run")
    assert list(records) == ["teacher", "targets", "experts", "init", "distill", "krr_st", "evaluate"]
    tensors, meta = load_tensors(run.krr_st_set_path)
    dim = _tensors(run.targets_path)["targets"].shape[1]
    assert tensors["images"].shape == (40, 1, 8, 8) and tensors["targets"].shape == (40, dim)
    assert tensors["lr"].item() == pytest.approx(config.krr_st.online_lr) and meta["iterations"] == 4
    data = real_data(config)
    initial = data.normalize(data.train_images[run.load_indices(40)["random"]])  # the release's start
    assert not torch.equal(tensors["images"], initial) and torch.allclose(
        tensors["images"], initial, atol=0.5
    )
    result = records["krr_st"]["result"]
    assert result["init"] == "random" and result["augment"] and result["iterations"] == 4
    methods = {r["method"] for r in run.load_results()}
    assert methods == {"no_pretrain", "random", "krr_st", "mkdt"}
    assert "KRR-ST" in run.results_table_path.read_text()


def test_paired_differences_headlines_and_cost_include_krr_st(finished):
    root, _, _ = finished
    content = json.loads(RunDir(root / "run").results_path.read_text())
    pairs = {(c["method"], c["other"]) for c in content["comparisons"]}
    assert {("mkdt", "krr_st"), ("krr_st", "random"), ("krr_st", "no_pretrain")} <= pairs
    assert ("krr_st", "mkdt") not in pairs  # listed once, from MKDT's side
    krr = [h for h in content["headlines"] if h["method"] == "krr_st"]
    assert krr and all(h["best_same_size"] == "random" and h["over_random"] for h in krr)
    assert {h["best_same_size"] for h in content["headlines"] if h["method"] == "mkdt"} <= {
        "random",
        "krr_st",
    }
    cost = content["costs"]["krr_st"]
    assert cost["stages"] == ["teacher", "targets", "krr_st"] and cost["seconds"] > 0
    assert "random subset" in cost["note"]


def test_an_interrupted_stage_resumes_to_the_same_set(finished, tmp_path, monkeypatch):
    root, config, _ = finished
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    RunDir(out).invalidate(["krr_st"])
    RunDir(out).krr_st_checkpoint_path.unlink()
    with interrupted_after_first_checkpoint(monkeypatch):
        krr_st.run(config, out)
    krr_st.run(config, out)
    assert RunDir(out).krr_st_set_path.read_bytes() == RunDir(root / "run").krr_st_set_path.read_bytes()


def test_without_augmentation_the_targets_stage_rows_are_regressed(finished, tmp_path):
    root, _, _ = finished
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    plain = tiny_config(root / "cache", *KRR, "krr_st.augment=false", "krr_st.init=high_loss")
    record = krr_st.run(plain, out, force=True)
    assert not record["result"]["augment"] and record["result"]["init"] == "high_loss"
    other = _tensors(RunDir(out).krr_st_set_path)["images"]
    assert not torch.equal(other, _tensors(RunDir(root / "run").krr_st_set_path)["images"])


def test_mkdt_run_leaves_krr_st_out_unless_evaluated():
    base = load_config("demo")
    assert "krr_st" not in pipeline(base, list(STAGES))
    assert pipeline(base, ["krr_st"]) == ["krr_st"]  # asked for alone, it runs
    listed = load_config("demo", None, ["evaluate.methods=[random,krr_st]"])
    assert pipeline(listed, list(STAGES))[-2:] == ["krr_st", "evaluate"]
    assert "krr_st" not in later_stages("distill") and "distill" not in later_stages("krr_st")
    assert later_stages("init") == ["init", "distill", "krr_st", "evaluate"]


def test_the_tuned_protocol_tries_the_grid_alone():
    tuned = load_config("demo", None, ["evaluate.selection=tuned", "evaluate.lr_grid=[0.03,0.3]"])
    pset = SyntheticSet(torch.zeros(2, 1, 8, 8), torch.zeros(2, 4), 0.123)
    assert candidate_lrs(tuned, "krr_st", pset) == [0.03, 0.3]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_evaluating_krr_st_without_its_stage_is_refused_in_one_line(finished, tmp_path, capsys):
    root, _, _ = finished
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    RunDir(out).invalidate(["krr_st"])
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["evaluate", "--force", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("mkdt: error:") == 1 and f"mkdt krr_st --out {out}" in err and "Traceback" not in err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("krr_st.online_iterations=1", "krr_st.online_iterations: must be >= 2"),
        ("krr_st.init=full", "krr_st.init: must be"),
        ("krr_st.ridge=0", "krr_st.ridge: must be a finite number > 0"),
        ("krr_st.outer_lr=-1", "krr_st.outer_lr: must be a finite number > 0"),
        ("krr_st.outer_lr=nan", "krr_st.outer_lr must be a finite number"),
        ("krr_st.online_momentum=1", "krr_st.online_momentum: must be in [0, 1)"),
        ("krr_st.online_weight_decay=-1", "krr_st.online_weight_decay"),
        ("krr_st.num_models=0", "krr_st.num_models: must be >= 1"),
        ("krr_st.augment=maybe", "krr_st.augment"),
    ],
)
def test_a_bad_krr_st_option_is_one_line_and_exit_2(override, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["krr_st", "--out", str(out), *TINY, f"data.cache_dir={tmp_path / 'cache'}", override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("mkdt: error:") == 1 and fragment in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "name, images",
    [
        ("table1-cifar10", 1000),
        ("table2-cifar100", 1000),
        ("table3-tinyimagenet", 2000),
        ("table7-cifar10", 1000),  # Table 7 probes Tables 1-3's sets: KRR-ST's too
    ],
)
def test_the_table_presets_distill_krr_st_with_the_released_settings(name, images):
    config = load_config(name)
    assert "krr_st" in config.evaluate.methods and "krr_st" in pipeline(config, list(STAGES))
    k = config.krr_st
    assert config.init.images == images and (k.init, k.iterations, k.augment) == ("random", 160000, True)
    assert (k.num_models, k.online_iterations, k.outer_batch_size, k.ridge) == (10, 1000, 1024, 1e-6)
