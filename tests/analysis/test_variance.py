"""``mkdt analyze variance``: trajectory variance across batch orders (the paper's Fig. 1a), on a tiny
digits run whose teacher is loaded from a random checkpoint (no SSL training: seconds)."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mkdt.analysis import variance
from mkdt.data.real import load_real
from mkdt.errors import ArtifactError, ConfigError
from mkdt.files import read_json
from mkdt.nn.models import ConvNet, build_network, resnet10
from mkdt.runtime import Runtime, derive_seed, generator, seeded
from mkdt.stages import targets, teacher
from mkdt.store import RunDir
from tests.helpers import tiny_config

SMALL = {"runs": 2, "steps": 4, "record_every": 2, "ssl_batch": 16, "sgd_batch": 32}


def _args(out, **options):
    return argparse.Namespace(out=str(out), **{**SMALL, **options})


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MKDT_PROGRESS", "0")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, run directory) with finished teacher (a seeded random encoder loaded as the
    checkpoint) and targets stages on digits."""
    root = tmp_path_factory.mktemp("variance")
    spec = tiny_config(root / "cache").teacher.model
    with seeded(0):
        encoder = build_network(spec, 1, 8, None)
    path = root / "teacher.safetensors"
    save_file(encoder.state_dict(), str(path))
    config = tiny_config(root / "cache", "teacher.probe=false", f"teacher.checkpoint={path}")
    out = root / "run"
    teacher.run(config, out)
    targets.run(config, out)
    return config, out


@pytest.fixture(scope="module")
def problem(run):
    config, out = run
    runtime = Runtime(torch.device("cpu"))
    real = load_real(config.data, config.seed, runtime.device)
    z = RunDir(out).load_targets(real.num_train)
    return config, variance.build_problem(config, real, z, runtime)


@pytest.fixture(scope="module")
def analysed(run, tmp_path_factory):
    """The analysis run through main() on a copy of the run."""
    config, out = run
    copy = tmp_path_factory.mktemp("analysed") / "run"
    shutil.copytree(out, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MKDT_PROGRESS", "0")
        variance.main(_args(copy), config)
    return config, copy


def test_variance_equals_a_hand_computation():
    init = torch.tensor([0.0, 1.0])
    weights = torch.tensor(
        [
            [[1.0, 1.0], [0.0, 1.0]],  # run 0 at the two recorded steps
            [[2.0, 1.0], [0.0, 1.0]],
            [[3.0, 1.0], [0.0, 1.0]],
        ]
    )
    stats = variance.trajectory_variance(weights, init)
    # step 1: parameter 0 takes 1, 2, 3 (population variance 2/3), parameter 1 is constant
    assert stats["variance"][0].item() == pytest.approx((2 / 3 + 0) / 2)
    # squared distances / P per run: 1/2, 4/2, 9/2
    assert stats["distance"][0].item() == pytest.approx((0.5 + 2 + 4.5) / 3)
    assert stats["normalised"][0].item() == pytest.approx(1 / 7)
    # step 2: every run back at the init
    assert stats["variance"][1].item() == 0 and stats["distance"][1].item() == 0
    assert torch.isnan(stats["normalised"][1])


def test_distance_splits_into_drift_and_variance():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(50, generator=g)
    weights = init + 0.3 + torch.randn(5, 3, 50, generator=g)
    stats = variance.trajectory_variance(weights, init)
    w = weights.double()
    drift = (w.mean(0) - init.double()).pow(2).mean(-1)
    torch.testing.assert_close(stats["distance"], drift + stats["variance"])
    torch.testing.assert_close(stats["variance"], w.var(0, correction=0).mean(-1))
    assert ((stats["normalised"] > 0) & (stats["normalised"] < 1)).all()


def test_batch_order_is_epochs_of_full_batches_from_the_generator():
    order = variance.batch_order(10, 3, 7, generator(5, torch.device("cpu")))
    assert order.shape == (7, 3)
    for epoch in (order[0:3], order[3:6]):  # 3 full batches per epoch, the 10th image dropped
        assert len(set(epoch.flatten().tolist())) == 9
    again = variance.batch_order(10, 3, 7, generator(5, torch.device("cpu")))
    other = variance.batch_order(10, 3, 7, generator(6, torch.device("cpu")))
    assert torch.equal(order, again) and not torch.equal(order, other)
    with pytest.raises(ConfigError, match="larger than D_real"):
        variance.batch_order(10, 11, 1, generator(5, torch.device("cpu")))


def test_encoder_is_every_parameter_but_the_head():
    conv = ConvNet(1, 8, width=4, depth=2, out_dim=6)
    names = [n for n, _ in variance.encoder_parameters(conv)]
    assert names and all(n.startswith("features_net.") for n in names)
    assert variance.flat_encoder(conv).numel() == sum(p.numel() for p in conv.features_net.parameters())
    res = resnet10(width=2, in_channels=1, out_dim=6)
    names = [n for n, _ in variance.encoder_parameters(res)]
    assert not any(n.startswith("fc.") for n in names)
    assert len(names) == len(list(res.named_parameters())) - 2


@pytest.mark.parametrize("method", variance.METHODS)
def test_same_batch_order_gives_zero_variance_and_other_orders_do_not(problem, method):
    config, prob = problem
    recipe = {r.method: r for r in variance.Options(ssl_batch=16, sgd_batch=32).recipes()}[method]
    record = [1, 3]
    init = variance.flat_encoder(prob.student)
    order = variance.batch_order(prob.num_images, recipe.batch_size, 3, generator(1, prob.images.device))
    same, _ = variance.train_runs(prob, recipe, [order, order.clone(), order], [7, 7, 7], record, show=False)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    stats = variance.trajectory_variance(same, init)
    assert (stats["variance"] == 0).all() and (stats["distance"] > 0).all()
    assert torch.equal(variance.flat_encoder(prob.student), init)  # the init is copied, never trained
    orders = variance.run_orders(config, recipe, prob.num_images, 3, 3, prob.images.device)
    differ, _ = variance.train_runs(prob, recipe, orders, [7, 7, 7], record, show=False)
    assert (variance.trajectory_variance(differ, init)["variance"] > 0).all()
    if method.startswith("ssl"):  # SSL runs also differ by their augmentation draws
        augmented, _ = variance.train_runs(prob, recipe, [order, order], [7, 8], record, show=False)
        assert (variance.trajectory_variance(augmented, init)["variance"] > 0).all()


def test_the_initialisation_comes_from_the_config_seed(problem, run):
    config, prob = problem
    real = load_real(config.data, config.seed, torch.device("cpu"))
    z = prob.targets
    again = variance.build_problem(config, real, z, prob.runtime)
    assert torch.equal(variance.flat_encoder(again.student), variance.flat_encoder(prob.student))
    other_config = tiny_config(config.data.cache_dir, "seed=1")
    other = variance.build_problem(other_config, real, z, prob.runtime)
    assert not torch.equal(variance.flat_encoder(other.student), variance.flat_encoder(prob.student))
    assert variance.augment_seeds(config, 3) != variance.augment_seeds(other_config, 3)
    assert variance.augment_seeds(config, 3) == variance.augment_seeds(config, 3)
    assert derive_seed(config.seed, "variance", "augment", 0) == variance.augment_seeds(config, 1)[0]


def test_main_writes_table_numbers_and_plot(analysed):
    config, out = analysed
    folder = out / "analysis"
    summary = read_json(folder / "variance.json")
    s = summary["settings"]
    assert set(summary["methods"]) == set(variance.METHODS) and s["methods"] == list(variance.METHODS)
    assert s["runs"] == 2 and s["steps"] == 4 and s["ssl_batch"] == 16 and not s["paper_batches"]
    student = build_network(config.experts.student, 1, 8, 4)
    assert s["encoder_parameters"] == sum(p.numel() for p in student.features_net.parameters())
    for method, row in summary["methods"].items():
        assert row["steps"] == [2, 4]
        assert len(row["variance"]) == len(row["normalised"]) == len(row["loss"]) == 2
        assert all(v > 0 for v in row["variance"]), method
        assert all(0 < v <= 1 for v in row["normalised"]), method
    assert summary["methods"]["ssl_4x"]["batch_size"] == 64
    assert summary["methods"]["kd"]["optimizer"] == "sgd" and summary["methods"]["ssl"]["optimizer"] == "adam"
    # the paper's ordering already shows on this tiny run: SSL spreads far more than KD
    final = {m: row["variance"][-1] for m, row in summary["methods"].items()}
    assert final["ssl"] > 10 * final["kd"]
    table = (folder / "variance.md").read_text()
    assert "Scaled down for a CPU" in table and "| method | step |" in table
    assert table.count("| kd |") == 2
    assert (folder / "variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_the_same_bits(analysed, tmp_path):
    config, out = analysed
    first = read_json(out / "analysis" / "variance.json")["methods"]
    variance.main(_args(out, methods="kd,ssl"), config)  # a subset, same settings
    summary = read_json(out / "analysis" / "variance.json")
    second = summary["methods"]
    assert summary["settings"]["methods"] == ["ssl", "kd"]  # in METHODS order
    for method in second:
        for key in ("variance", "distance", "normalised", "loss"):
            assert json.dumps(second[method][key]) == json.dumps(first[method][key])


def test_missing_targets_stage_names_the_command(run, tmp_path):
    config, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    RunDir(copy).invalidate(["targets"])
    with pytest.raises(ArtifactError, match="mkdt targets"):
        variance.main(_args(copy), config)
    with pytest.raises(ArtifactError, match="mkdt targets"):
        variance.main(_args(tmp_path / "empty"), config)
    assert not (copy / "analysis").exists() and not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"runs": 1}, "--runs"),
        ({"steps": 0}, "--steps"),
        ({"record_every": 5}, "--record-every"),
        ({"ssl_batch": 1}, "--ssl-batch"),
        ({"sgd_lr": -1.0}, "--sgd-lr"),
        ({"methods": "ssl,mtt"}, "--methods"),
        ({"methods": "kd,kd"}, "--methods"),
        ({"ssl_batch": 400}, "ssl_4x: batch 4 x --ssl-batch = 1600 is larger than D_real"),
        ({"sgd_batch": 5000}, "sl: batch --sgd-batch 5000"),
    ],
)
def test_bad_options_are_refused_before_compute(run, tmp_path, options, message):
    config, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        variance.main(_args(copy, **options), config)
    assert not (copy / "analysis").exists()


def test_cli_options_parse_to_the_documented_defaults():
    parser = argparse.ArgumentParser()
    variance.add_arguments(parser)
    options = variance.parse_options(parser.parse_args([]))
    assert options == variance.Options()
    assert (options.runs, options.steps, options.ssl_batch, options.sgd_batch) == (5, 40, 64, 256)
    assert options.ssl_lr == 1e-3 and options.sgd_lr == 0.01
    assert options.record_at() == list(range(4, 41, 4))
    args = parser.parse_args(
        ["--methods", "kd, sl", "--ssl-batch", "1024", "--steps", "10", "--record-every", "4"]
    )
    options = variance.parse_options(args)
    assert [r.method for r in options.recipes()] == ["sl", "kd"]
    assert options.record_at() == [4, 8, 10]
    assert variance.record_steps(6, 6) == [6]
