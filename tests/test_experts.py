import pytest
import torch
import torch.nn.functional as F

from mkdt import experts, targets, teacher
from mkdt.artifacts import RunDir, derive_seed
from mkdt.errors import ArtifactError
from mkdt.models import unflatten_params
from mkdt.runtime import load_real, seeded
from tests.helpers import tiny_config


def _pipeline(config, out):
    for stage in (teacher, targets, experts):
        stage.run(config, out)
    return RunDir(out)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    config = tiny_config(root / "cache", "teacher.probe=false")
    return config, _pipeline(config, root / "a")


def test_targets_are_teacher_features_of_every_real_image(run_a):
    config, run = run_a
    data = load_real(config)
    z = targets.load_targets(run, config, data.num_train)
    encoder = teacher.load_encoder(run, config.teacher.model, data)
    with torch.no_grad():
        expected = encoder.features(data.normalize(data.train_images[:50]))
    assert z.shape == (data.num_train, 32) and z.dtype == torch.float32
    assert torch.allclose(z[:50], expected, atol=1e-5)


def test_experts_store_requested_epochs_and_learn(run_a):
    config, run = run_a
    data = load_real(config)
    z = targets.load_targets(run, config, data.num_train)
    for k in range(2):
        traj = experts.load_expert(run, config, k)
        assert traj.epochs == (0, 1, 2, 3)
        assert traj.loss[-1] < traj.loss[0]
        with seeded(derive_seed(config.seed, "expert-init", k)):
            init = experts.build_student(config.experts.student, data, 32)
        assert torch.equal(traj.at(0), torch.cat([p.detach().flatten() for p in init.parameters()]))
        x = data.normalize(data.train_images)
        with torch.no_grad():
            loss0 = F.mse_loss(torch.func.functional_call(init, unflatten_params(init, traj.at(0)), x), z)
            loss3 = F.mse_loss(torch.func.functional_call(init, unflatten_params(init, traj.at(3)), x), z)
        assert loss3 < loss0
    a, b = experts.load_expert(run, config, 0), experts.load_expert(run, config, 1)
    assert not torch.equal(a.at(0), b.at(0))   # each expert has its own init


def test_same_seed_gives_identical_targets_and_experts(run_a, tmp_path):
    config, run = run_a
    other = _pipeline(config, tmp_path / "b")
    z1 = targets.load_targets(run, config, 1437)
    z2 = targets.load_targets(other, config, 1437)
    assert torch.equal(z1, z2)
    for k in range(2):
        assert torch.equal(experts.load_expert(run, config, k).params,
                           experts.load_expert(other, config, k).params)


def test_missing_expert_is_retrained_identically(run_a):
    config, run = run_a
    before = experts.load_expert(run, config, 1).params
    experts.expert_path(run, 1).unlink()
    run.invalidate(["experts"])
    record = experts.run(config, run.path)
    assert torch.equal(experts.load_expert(run, config, 1).params, before)
    assert record["result"]["mb_per_expert"] > 0


def test_experts_of_another_config_are_refused(run_a):
    config, run = run_a
    other = tiny_config(config.data.cache_dir, "teacher.probe=false", "experts.lr=0.05")
    with pytest.raises(ArtifactError, match="experts.lr: 0.1 -> 0.05"):
        experts.run(other, run.path)
    with pytest.raises(ArtifactError, match="different config"):
        experts.load_expert(run, other, 0)


def test_stage_without_its_prerequisite_says_what_to_run(tmp_path):
    config = tiny_config(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="run `mkdt teacher` first"):
        targets.run(config, tmp_path / "empty")
