import pytest
import torch

from mkdt import experts, init, targets, teacher
from mkdt.artifacts import RunDir
from mkdt.errors import ArtifactError, ConfigError
from mkdt.runtime import load_real
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def run_with_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    config = tiny_config(root / "cache", "teacher.probe=false", "distill.images=30")
    for stage in (teacher, targets, experts):
        stage.run(config, root / "run")
    return config, RunDir(root / "run")


def test_high_loss_subset_is_the_top_of_the_expert_averaged_kd_loss(run_with_experts):
    config, run = run_with_experts
    with pytest.raises(ArtifactError, match="run `mkdt init` first"):
        init.load_indices(run, config)
    init.run(config, run.path)
    idx = init.load_indices(run, config)
    data = load_real(config)
    z = targets.load_targets(run, config, data.num_train)
    student = experts.build_student(config.experts.student, data, z.shape[1])
    epoch1 = [experts.load_expert(run, config, k).at(1) for k in range(2)]
    expected = init.kd_loss_per_image(student.eval(), epoch1, data.normalize(data.train_images), z)
    assert torch.allclose(idx["loss"], expected)
    chosen = torch.zeros(data.num_train, dtype=torch.bool)
    chosen[idx["high_loss"]] = True
    assert len(idx["high_loss"]) == 30 and chosen.sum() == 30
    assert idx["loss"][chosen].min() >= idx["loss"][~chosen].max()
    assert len(set(idx["random"].tolist())) == 30
    init.run(config, run.path, force=True)
    assert torch.equal(init.load_indices(run, config)["random"], idx["random"])  # seeded


def test_more_images_than_real_data_is_a_config_error(run_with_experts):
    config, run = run_with_experts
    too_many = tiny_config(config.data.cache_dir, "teacher.probe=false", "distill.images=5000")
    with pytest.raises(ConfigError, match="distill.images .5000. is larger than D_real"):
        init.run(too_many, run.path)
