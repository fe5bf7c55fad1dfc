"""The init stage: the high-loss subset is the top of the expert-averaged KD loss."""

import pytest
import torch

from mkdt.errors import ArtifactError, ConfigError
from mkdt.nn.models import build_network
from mkdt.stages import experts, init, targets, teacher
from mkdt.store import RunDir
from tests.helpers import load_expert, load_indices, real_data, tiny_config


@pytest.fixture(scope="module")
def run_with_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    config = tiny_config(root / "cache", "teacher.probe=false", "init.images=30")
    for stage in (teacher, targets, experts):
        stage.run(config, root / "run")
    return config, RunDir(root / "run")


def test_high_loss_subset_is_the_top_of_the_expert_averaged_kd_loss(run_with_experts):
    config, run = run_with_experts
    with pytest.raises(ArtifactError, match="run `mkdt init` first"):
        load_indices(run, config)
    init.run(config, run.path)
    idx = load_indices(run, config)
    data = real_data(config)
    z = run.load_targets(data.num_train)
    # independent of the stage's functional evaluation: each expert's epoch-1 weights copied into a
    # module with vector_to_parameters, a plain forward pass, the squared error written out
    x = data.normalize(data.train_images)
    per_expert = []
    for k in range(2):
        student = build_network(config.experts.student, data.channels, data.image_size, z.shape[1])
        torch.nn.utils.vector_to_parameters(load_expert(run, config, k).at(1), student.parameters())
        with torch.no_grad():
            per_expert.append(((student.eval()(x) - z) ** 2).sum(dim=1) / z.shape[1])
    expected = torch.stack(per_expert).mean(dim=0)
    assert torch.allclose(idx["loss"], expected, rtol=1e-5, atol=1e-6)
    chosen = torch.zeros(data.num_train, dtype=torch.bool)
    chosen[idx["high_loss"]] = True
    assert len(idx["high_loss"]) == 30 and chosen.sum() == 30
    assert idx["loss"][chosen].min() >= idx["loss"][~chosen].max()
    assert len(set(idx["random"].tolist())) == 30
    init.run(config, run.path, force=True)
    assert torch.equal(load_indices(run, config)["random"], idx["random"])  # seeded


def test_more_images_than_real_data_is_a_config_error(run_with_experts):
    config, run = run_with_experts
    too_many = tiny_config(config.data.cache_dir, "teacher.probe=false", "init.images=5000")
    with pytest.raises(ConfigError, match="init.images .5000. is larger than D_real"):
        init.run(too_many, run.path)
