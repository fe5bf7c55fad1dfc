"""The teacher stage: SSL training, resume, and loading an existing checkpoint."""

import dataclasses

import pytest
import torch

from mkdt.errors import ArtifactError
from mkdt.files import load_tensors
from mkdt.nn.loading import load_encoder
from mkdt.nn.models import resnet18
from mkdt.stages import teacher
from mkdt.store import RunDir
from mkdt.train.ssl import SSLRecipe, cosine_with_warmup
from tests.helpers import interrupted_after_first_checkpoint, real_data, tiny_config


def test_teacher_trains_saves_encoder_and_reports_probe(tmp_path):
    config = tiny_config(tmp_path / "cache")
    record = teacher.run(config, tmp_path / "run")
    result = record["result"]
    assert len(result["loss_history"]) == len(result["epoch_seconds"]) == 3
    assert 0 < sum(result["epoch_seconds"]) <= result["train_seconds"]
    assert result["loss_history"][-1] < result["loss_history"][0]
    assert 0.1 < result["probe_accuracy"] <= 1.0  # better than chance on 10 classes
    tensors, meta = load_tensors(tmp_path / "run/teacher/encoder.safetensors")
    assert meta["feature_dim"] == 32 and meta["model"]["arch"] == "resnet18"
    assert "layer4.1.bn2.running_var" in tensors


def test_finished_teacher_is_skipped_and_incompatible_one_refused(tmp_path):
    config = tiny_config(tmp_path / "cache", "teacher.epochs=1", "teacher.probe=false")
    first = teacher.run(config, tmp_path / "run")
    assert teacher.run(config, tmp_path / "run")["finished"] == first["finished"]
    other = tiny_config(tmp_path / "cache", "teacher.epochs=1", "teacher.probe=false", "teacher.lr=0.02")
    with pytest.raises(ArtifactError, match="teacher.lr: 0.01 -> 0.02"):
        teacher.run(other, tmp_path / "run")
    assert teacher.run(other, tmp_path / "run", force=True)["defining"]["teacher"]["lr"] == 0.02


def test_interrupted_training_resumes_to_the_same_encoder(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "cache", "teacher.probe=false")
    teacher.run(config, tmp_path / "full")
    full, _ = load_tensors(tmp_path / "full/teacher/encoder.safetensors")

    with interrupted_after_first_checkpoint(monkeypatch):
        teacher.run(config, tmp_path / "resumed")
    assert RunDir(tmp_path / "resumed").record("teacher") is None
    teacher.run(config, tmp_path / "resumed")
    resumed, _ = load_tensors(tmp_path / "resumed/teacher/encoder.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_simclr_teacher_trains(tmp_path):
    config = tiny_config(
        tmp_path / "cache", "teacher.method=simclr", "teacher.epochs=2", "teacher.probe=false"
    )
    losses = teacher.run(config, tmp_path / "run")["result"]["loss_history"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_existing_checkpoint_with_prefixes_loads_and_gives_the_same_features(tmp_path):
    config = tiny_config(tmp_path / "cache")
    data = real_data(config)
    source = resnet18(width=4, in_channels=1, out_dim=10).eval()
    wrapped = {"state_dict": {f"module.backbone.{k}": v for k, v in source.state_dict().items()}}
    wrapped["state_dict"]["module.projector.0.weight"] = torch.zeros(3)
    torch.save(wrapped, tmp_path / "ssl.ckpt")
    config = tiny_config(tmp_path / "cache", f"teacher.checkpoint={tmp_path / 'ssl.ckpt'}")
    record = teacher.run(config, tmp_path / "run")
    assert record["result"]["loaded_from"].endswith("ssl.ckpt")
    loaded = load_encoder(
        RunDir(tmp_path / "run").encoder_path, config.teacher.model, data.channels, data.image_size
    )
    x = data.normalize(data.train_images[:16])
    with torch.no_grad():
        assert torch.allclose(loaded.features(x), source.features(x))


def test_checkpoint_of_another_architecture_is_refused_clearly(tmp_path):
    torch.save(resnet18(width=8, in_channels=1).state_dict(), tmp_path / "w8.pt")
    config = tiny_config(tmp_path / "cache", f"teacher.checkpoint={tmp_path / 'w8.pt'}")
    with pytest.raises(ArtifactError, match="does not fit teacher.model=resnet18 width 4.*wrong shape"):
        teacher.run(config, tmp_path / "run")


def test_warmup_cosine_schedule():
    factors = [cosine_with_warmup(s, 10, 2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[-1] < 0.05


def test_convnet_teacher_trains_and_encodes(tmp_path):
    config = tiny_config(
        tmp_path / "cache",
        "teacher.model.arch=convnet",
        "teacher.model.width=8",
        "teacher.model.depth=2",
        "teacher.epochs=1",
    )
    record = teacher.run(config, tmp_path / "run")
    assert record["result"]["probe_accuracy"] > 0.1
    _, meta = load_tensors(tmp_path / "run/teacher/encoder.safetensors")
    assert meta["feature_dim"] == 8 * 2 * 2


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_fast_path_teacher_agrees_with_fp32(tmp_path, device):
    """bf16 autocast (and channels_last on CUDA) give a close loss curve; weights stay fp32."""
    base = [f"device={device}", "teacher.probe=false", "teacher.epochs=1", "teacher.warmup_epochs=0"]
    runs = {}
    for name, extra in (("fp32", []), ("fast", ["channels_last=true", "precision=bf16"])):
        config = tiny_config(tmp_path / "cache", *base, *extra)
        runs[name] = teacher.run(config, tmp_path / name)["result"]["loss_history"]
    assert runs["fast"] == pytest.approx(runs["fp32"], rel=0.05)
    assert runs["fast"] != runs["fp32"]  # autocast really ran in bfloat16
    encoder, _ = load_tensors(tmp_path / "fast/teacher/encoder.safetensors")
    assert all(t.dtype == torch.float32 for t in encoder.values() if t.is_floating_point())


def test_ssl_recipe_is_keyword_only_and_immutable():
    """Positional fields could swap lr and weight_decay unnoticed: refused; a recipe never changes."""
    fields = {"method": "simclr", "epochs": 2, "batch_size": 32, "lr": 0.01, "weight_decay": 1e-6}
    with pytest.raises(TypeError):
        SSLRecipe(*fields.values(), 0)
    recipe = SSLRecipe(**fields, warmup_epochs=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 3
