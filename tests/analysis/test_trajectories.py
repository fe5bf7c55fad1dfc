"""The trajectory and replay analyses on a tiny finished run (digits, tiny networks)."""

import json
import re
import shutil

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mkdt import cli, downstream
from mkdt.analysis import replay, trajectories
from mkdt.data.real import load_real
from mkdt.errors import ArtifactError
from mkdt.nn.losses import KDLoss
from mkdt.nn.models import build_network
from mkdt.stages import distill, evaluate, experts, init, targets, teacher
from mkdt.store import RunDir
from mkdt.train.matching import inner_steps
from tests.helpers import TINY, load_expert, tiny_config

SMALL = [
    "teacher.probe=false",
    "evaluate.probe_max_iter=30",
    "experts.epochs=3",
    "experts.save_epochs=[0,1,2,3]",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    config = tiny_config(root / "cache", *SMALL)
    out = root / "run"
    for stage in (teacher, targets, experts, init, distill):
        stage.run(config, out)
    return config, RunDir(out)


def test_inner_steps_equal_plain_sgd_on_the_module():
    torch.manual_seed(0)
    student = build_network(tiny_config("unused").experts.student, 1, 8, 5)
    images, z = torch.randn(12, 1, 8, 8), torch.randn(12, 5)
    batches = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    start = parameters_to_vector(student.parameters()).detach().clone()
    got = inner_steps(student, start, images, z, 0.05, batches)
    params = list(student.parameters())
    for idx in batches:
        loss = KDLoss()(student(images[idx]), z[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.05 * g
    assert torch.allclose(got, parameters_to_vector(params), atol=1e-6)
    assert not torch.allclose(got, start)


def test_window_in_steps_and_the_summary_line():
    config = tiny_config(
        "unused",
        "experts.epochs=4",
        "distill.max_start_epoch=2",
        "distill.expert_epochs=3",
        "experts.batch_size=64",
    )
    window = downstream.window_of(config, 1000)
    assert (window.end_epoch, window.steps_per_epoch, window.end_step) == (4, 16, 64)
    line = downstream.window_summary(config, 1000, syn_images=300)
    assert "expert epochs 0-4 (64 expert SGD steps of batch 64)" in line
    assert f"|D_syn| = 300 for {config.evaluate.epochs} epochs = {config.evaluate.epochs * 2} steps" in line


def test_window_share_and_verdict_from_known_accuracies():
    rows = [
        {"expert": k, "epoch": e, "task": "t", "label_fraction": 0.1, "accuracy": acc}
        for k, accs in enumerate(([30, 31, 40], [32, 33, 42]))
        for e, acc in zip((0, 1, 2), accs, strict=True)
    ]
    window = downstream.Window(end_epoch=1, steps_per_epoch=10)
    summary = trajectories.summarise(rows, {("t", 0.1): 51.0}, window)
    curve = summary["curves"][0]
    assert curve["accuracy"] == {"0": 31, "1": 32, "2": 41}
    assert curve["window_gain"] == 1 and curve["full_gain"] == 20 and summary["window_share"] == 0.05
    text = trajectories.verdict(summary, window)
    assert "holds 5% of the full-data gain" in text and "lengthen the window" in text
    assert "lengthen" not in trajectories.verdict({**summary, "window_share": 0.5}, window)


@pytest.mark.parametrize(
    "window_end, full, words, cell",
    [
        (28, 51.0, "holds none of the full-data gain (at its end the experts probe worse", "< 0 (loses)"),
        (71, 51.0, "holds all of the full-data gain (at its end the experts probe better", "> 100%"),
        (41, 31.0, "full-data pre-training does not beat the experts' random inits", "n/a"),
    ],
)
def test_a_window_share_outside_0_1_is_said_in_words(window_end, full, words, cell):
    """A window whose end probes worse than epoch 0 (or better than the full data) gets no "-183%"
    (or "250%"): the verdict, the table and the warning say so in words."""
    rows = [
        {"expert": 0, "epoch": e, "task": "t", "label_fraction": 0.1, "accuracy": acc}
        for e, acc in ((0, 31.0), (1, float(window_end)))
    ]
    window = downstream.Window(end_epoch=1, steps_per_epoch=10)
    summary = trajectories.summarise(rows, {("t", 0.1): full}, window)
    text = trajectories.verdict(summary, window) + trajectories.table(summary, window, "x")
    assert words in text and f"| {cell} |" in text
    assert all(0 <= int(p) <= 100 for p in re.findall(r"(-?\d+)%", text))  # no "-183%", no "250%"


def test_trajectories_probe_the_saved_experts_and_reuse_the_evaluations_full_run(run, tmp_path):
    config, store = run
    record = trajectories.analyse(config, store.path, experts=[1], epochs=[0, 2])
    fractions = config.evaluate.label_fractions
    assert [(r["expert"], r["epoch"], r["label_fraction"]) for r in record["probes"]] == [
        (1, e, f) for e in (0, 2) for f in fractions
    ]
    # an independent probe of expert 1's saved epoch-2 weights, with evaluation seed 1's labels
    real = load_real(config.data, config.seed, torch.device("cpu"))
    net = build_network(config.experts.student, 1, 8, store.load_targets(real.num_train).shape[1])
    vector_to_parameters(load_expert(store, config, 1).at(2), net.parameters())
    tasks = {"digits": downstream.load_task(config, "digits", real.data)}
    expected = [
        p["accuracy"] for p in downstream.probe(config, net, tasks, 1, real.data, torch.device("cpu"))
    ]
    assert [r["accuracy"] for r in record["probes"] if r["epoch"] == 2] == pytest.approx(expected)
    for suffix in ("md", "json", "png"):
        assert (store.path / "analysis" / f"trajectories.{suffix}").stat().st_size > 100
    assert record["full"] == "evaluation seed 0"
    # the full-data reference trained here is the evaluation's full seed 0, bit for bit
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    one = tiny_config(config.data.cache_dir, *SMALL, "evaluate.methods=[full]", "evaluate.seeds=1")
    results = evaluate.run(one, copy)["result"]["results"]
    again = trajectories.analyse(one, copy, experts=[1], epochs=[0, 2])
    assert again["full"].startswith("mean of the evaluate stage")
    assert [c["full"] for c in again["curves"]] == [c["full"] for c in record["curves"]]
    assert [c["full"] for c in again["curves"]] == pytest.approx([r["mean"] for r in results])


def test_replay_scores_start_target_and_the_sets(run):
    config, store = run
    record = replay.replay(config, store.path, experts=[0])
    distance = {r["weights"]: r["distance"] for r in record["rows"]}
    assert distance["start"] == pytest.approx(1.0) and distance["target"] == 0.0
    assert distance["distilled"] != distance["init set"]
    assert record["alpha_syn"] == store.load_synthetic().lr
    text = (store.path / "analysis" / "replay.md").read_text()
    assert "| distilled |" in text and "of the way to the target" in text


def test_cli_analyze_prints_the_table_and_refuses_bad_input(run, capsys):
    config, store = run
    args = ["--out", str(store.path), *TINY, *SMALL, f"data.cache_dir={config.data.cache_dir}"]
    assert cli.main(["analyze", "trajectories", "--experts", "0", "--epochs", "0,1", *args]) == 0
    out = capsys.readouterr().out
    assert "| digits | 10% |" in out and "e0 *" in out and "wrote" in out
    assert json.loads((store.path / "analysis" / "trajectories.json").read_text())["epochs"] == [0, 1]
    assert cli.main(["analyze", "trajectories", "--epochs", "0,7", *args]) == 2
    assert "--epochs: [7] were not saved" in capsys.readouterr().err
    assert cli.main(["analyze", "trajectories", "--experts", "5", *args]) == 2
    assert "outside [0, 2)" in capsys.readouterr().err


def test_analyses_need_their_stages(tmp_path):
    config = tiny_config(tmp_path / "cache", *SMALL)
    with pytest.raises(ArtifactError, match="run `mkdt experts --out "):
        trajectories.analyse(config, tmp_path / "empty")
    with pytest.raises(ArtifactError, match="run `mkdt distill --out "):
        replay.replay(config, tmp_path / "empty")
