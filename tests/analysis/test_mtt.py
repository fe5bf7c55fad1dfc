"""``mkdt analyze mtt`` (MTT-SSL vs MTT-SL vs MKDT, the paper's Fig. 1b/c) on a tiny finished run."""

import argparse
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from mkdt.analysis import mtt
from mkdt.errors import ArtifactError, ConfigError
from mkdt.nn.augment import DiffAugment
from mkdt.nn.models import flatten_params, unflatten_params
from mkdt.nn.ssl import BarlowTwinsLoss
from mkdt.stages import experts, init, targets, teacher
from mkdt.store import RunDir
from mkdt.train.matching import inner_steps, sample_batches, unrolled_matching_loss
from tests.helpers import tiny_config

SMALL = ["teacher.probe=false"]
# a few iterations, one expert, short expert trajectories and inner loops: seconds on a CPU
ARGV = [
    "--iterations=3",
    "--experts=1",
    "--ssl-batch=128",
    "--ssl-epochs=1",
    "--ssl-steps=2",
    "--projector-dim=16",
    "--sl-batch=128",
    "--sl-epochs=1",
    "--sl-steps=3",
]


def parse(*extra: str, out=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    mtt.add_arguments(parser)
    args = parser.parse_args([*ARGV, *extra])
    args.out = None if out is None else str(out)
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run whose teacher, targets, experts and init stages are finished (no distill)."""
    root = tmp_path_factory.mktemp("mtt")
    config = tiny_config(root / "cache", *SMALL)
    out = root / "run"
    for stage in (teacher, targets, experts, init):
        stage.run(config, out)
    return config, RunDir(out)


@pytest.fixture(scope="module")
def analysed(run):
    """The analysis run once on the tiny run (main, as the CLI calls it)."""
    config, store = run
    mtt.main(parse(out=store.path), config)
    return json.loads((store.path / "analysis" / "mtt.json").read_text())


def test_ssl_inner_loop_pixel_gradient_equals_finite_differences():
    torch.manual_seed(0)
    config = tiny_config("unused", "experts.student.width=3", "experts.student.depth=1")
    net = mtt.ssl_network(config, 3, 4, 6).double().train()
    augment = DiffAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    batches = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5]])
    make = mtt.ssl_loss_maker(augment, BarlowTwinsLoss())
    inner = make(batches[:, None], torch.Generator().manual_seed(1))
    start = flatten_params(net)
    target = start + 0.05 * torch.randn_like(start)
    unused = torch.zeros(6, 0, dtype=torch.float64)  # the SSL inner loss reads no targets

    def loss(x, lr):
        return unrolled_matching_loss(net, start, target, x, unused, lr, batches, inner_loss=inner)

    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    grad_x, grad_lr = torch.autograd.grad(loss(x, lr), (x, lr))
    assert grad_x.abs().sum() > 0
    eps = 1e-6
    for seed in range(3):  # directional derivatives along random directions of the pixels
        d = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            fd = (loss(images + eps * d, lr) - loss(images - eps * d, lr)) / (2 * eps)
        assert float((grad_x * d).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
    with torch.no_grad():
        fd_lr = (loss(images, lr + eps) - loss(images, lr - eps)) / (2 * eps)
    assert float(grad_lr) == pytest.approx(float(fd_lr), rel=1e-6, abs=1e-9)


def test_sl_inner_loop_lowers_cross_entropy_on_the_synthetic_set():
    torch.manual_seed(0)
    net = mtt.sl_network(tiny_config("unused"), 1, 8, 10).train()
    images, labels = torch.randn(20, 1, 8, 8), torch.randint(10, (20,))
    batches = sample_batches(20, 10, 20, torch.Generator().manual_seed(0))
    start = flatten_params(net)
    theta = inner_steps(net, start, images, labels, 0.1, batches, inner_loss=mtt.ce_inner_loss)

    def ce(t):
        return float(
            F.cross_entropy(torch.func.functional_call(net, unflatten_params(net, t), (images,)), labels)
        )

    assert ce(theta) < 0.8 * ce(start)


def test_short_run_writes_the_files_and_curves(run, analysed):
    config, store = run
    folder = store.path / "analysis"
    for name in ("mtt.json", "mtt.md", "mtt.png", "mtt/mtt_ssl.safetensors"):
        assert (folder / name).stat().st_size > 100
    for method in ("mtt_ssl", "mtt_sl"):
        assert (folder / "mtt" / f"{method}_expert_0000.safetensors").is_file()
    assert set(analysed["methods"]) == set(mtt.METHODS)
    for method, row in analysed["methods"].items():
        assert len(row["loss"]) == len(row["pixel_change"]) == len(row["alpha"]) == 3, method
        assert all(p > 0 for p in row["pixel_change"]), method
    ssl, sl, kd = (analysed["methods"][m] for m in mtt.METHODS)
    assert ssl["alpha_init"] in mtt.ALPHA_GRID and len(ssl["alpha_grid"]) == len(mtt.ALPHA_GRID)
    assert (sl["alpha_init"], sl["alpha_grid"]) == (0.01, {})  # auto: MTT-SL starts at its experts' lr
    assert (kd["alpha_init"], kd["alpha_grid"]) == (config.distill.lr_init, {})  # and MKDT at the run's
    assert kd["lr_lr"] == pytest.approx(config.distill.lr_lr)
    assert sl["lr_lr"] == pytest.approx(config.distill.lr_lr * (0.01 / config.distill.lr_init) ** 2)
    assert (analysed["methods"]["mtt_ssl"]["N"], analysed["methods"]["mtt_ssl"]["M"]) == (2, 1)
    assert (analysed["methods"]["mtt_sl"]["N"], analysed["methods"]["mtt_sl"]["M"]) == (3, 1)
    assert analysed["methods"]["mkdt"]["N"] == config.distill.syn_steps
    table = (folder / "mtt.md").read_text()
    assert all(f"| {m} |" in table for m in mtt.METHODS) and "Scaled down" in table


def test_mtt_ssl_set_loads_in_the_distill_format(run, analysed):
    config, store = run
    syn = store.load_mtt_ssl()
    real_n = json.loads((store.path / "analysis" / "mtt.json").read_text())["settings"]["num_images"]
    idx = store.load_indices(config.init.images)[config.distill.init]
    z = store.load_targets(real_n)
    assert syn.images.shape == (config.init.images, 1, 8, 8)
    assert torch.equal(syn.targets, z[idx]) and syn.lr == pytest.approx(config.evaluate.lr)
    # the same tensors and metadata keys as distill/synthetic.safetensors (RunDir.load_synthetic)
    from mkdt.files import load_tensors

    tensors, meta = load_tensors(store.mtt_ssl_path)
    assert set(tensors) == {"images", "targets", "lr"} and {"mean", "std", "iterations"} <= set(meta)
    pixels = analysed["methods"]["mtt_ssl"]["pixel_change"][-1]
    from mkdt.data.real import load_real

    init_images = load_real(config.data, config.seed, torch.device("cpu")).inputs[idx]
    assert float((syn.images - init_images).abs().mean()) == pytest.approx(pixels, rel=1e-5)


def test_same_seed_same_results_and_a_rerun_reuses_the_experts(run, analysed, tmp_path, monkeypatch):
    config, store = run
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy, ignore=shutil.ignore_patterns("analysis"))
    again = mtt.analyse(config, copy, mtt.parse_options(parse()))
    assert again["methods"]["mtt_ssl"]["experts_reused"] == [False]
    for method in mtt.METHODS:
        for key in ("loss", "pixel_change", "alpha"):
            assert again["methods"][method][key] == analysed["methods"][method][key], (method, key)

    def refuse(*args, **kwargs):
        raise AssertionError("the experts should have been reused")

    monkeypatch.setattr(mtt, "train_expert", refuse)
    third = mtt.analyse(config, copy, mtt.parse_options(parse("--methods=mtt_ssl,mtt_sl")))
    assert third["methods"]["mtt_ssl"]["experts_reused"] == [True]
    assert third["methods"]["mtt_sl"]["loss"] == analysed["methods"]["mtt_sl"]["loss"]


def test_missing_stages_and_missing_set_raise_artifact_errors(run, tmp_path):
    config, store = run
    with pytest.raises(ArtifactError, match="no finished teacher"):
        mtt.main(parse(out=tmp_path / "empty"), config)
    partial = tmp_path / "partial"
    shutil.copytree(store.path, partial, ignore=shutil.ignore_patterns("analysis"))
    (partial / "init" / "stage.json").unlink()
    with pytest.raises(ArtifactError, match="no finished init"):
        mtt.main(parse(out=partial), config)
    with pytest.raises(ArtifactError, match="run `mkdt analyze mtt --out .*` first"):
        RunDir(partial).load_mtt_ssl()


def test_bad_options_are_config_errors_before_any_compute(run, tmp_path):
    config, store = run
    grid = mtt.parse_options(parse("--alpha=grid"))
    assert (grid.alpha_mode, grid.alpha) == ("grid", None)
    assert mtt.parse_options(parse("--alpha=0.02")).alpha == 0.02
    assert mtt.parse_options(parse()).alpha_mode == "auto"
    for argv in (
        ["--iterations=0"],
        ["--alpha=fast"],
        ["--lr-lr=-1"],
        ["--methods=mtt_ssl,foo"],
        ["--alpha=-1"],
        ["--lr-img=0"],
        ["--batch-syn=1"],
    ):
        with pytest.raises(ConfigError):
            mtt.parse_options(parse(*argv))
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy, ignore=shutil.ignore_patterns("analysis"))
    with pytest.raises(ConfigError, match="--experts 3"):
        mtt.main(parse("--experts=3", out=copy), config)
    with pytest.raises(ConfigError, match="--ssl-batch 5000"):
        mtt.main(parse("--ssl-batch=5000", out=copy), config)
    assert not (copy / "analysis").exists()
