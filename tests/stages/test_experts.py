"""The targets and experts stages: teacher features, stored epochs, batched and resumed experts."""

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F

from mkdt.errors import ArtifactError, ConfigError
from mkdt.graph import defining
from mkdt.nn.loading import load_encoder
from mkdt.nn.models import ConvNet, build_network, flatten_params, unflatten_params
from mkdt.runtime import Runtime, derive_seed, seeded
from mkdt.stages import experts, targets, teacher
from mkdt.store import RunDir
from mkdt.train.kd import KDRecipe, train_student, train_students
from tests.helpers import load_expert, real_data, tiny_config


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
    data = real_data(config)
    z = run.load_targets(data.num_train)
    encoder = load_encoder(run.encoder_path, config.teacher.model, data.channels, data.image_size)
    with torch.no_grad():
        expected = encoder.features(data.normalize(data.train_images[:50]))
    assert z.shape == (data.num_train, 32) and z.dtype == torch.float32
    assert torch.allclose(z[:50], expected, atol=1e-5)


def test_experts_store_requested_epochs_and_learn(run_a):
    config, run = run_a
    data = real_data(config)
    z = run.load_targets(data.num_train)
    for k in range(2):
        traj = load_expert(run, config, k)
        assert traj.epochs == (0, 1, 2, 3)
        assert traj.loss[-1] < traj.loss[0]
        with seeded(derive_seed(config.seed, "expert-init", k)):
            init = build_network(config.experts.student, data.channels, data.image_size, 32)
        assert torch.equal(traj.at(0), torch.cat([p.detach().flatten() for p in init.parameters()]))
        x = data.normalize(data.train_images)
        with torch.no_grad():
            loss0 = F.mse_loss(torch.func.functional_call(init, unflatten_params(init, traj.at(0)), x), z)
            loss3 = F.mse_loss(torch.func.functional_call(init, unflatten_params(init, traj.at(3)), x), z)
        assert loss3 < loss0
    a, b = load_expert(run, config, 0), load_expert(run, config, 1)
    assert not torch.equal(a.at(0), b.at(0))  # each expert has its own init


def test_same_seed_gives_identical_targets_and_experts(run_a, tmp_path):
    config, run = run_a
    other = _pipeline(config, tmp_path / "b")
    z1 = run.load_targets(1437)
    z2 = other.load_targets(1437)
    assert torch.equal(z1, z2)
    for k in range(2):
        assert torch.equal(load_expert(run, config, k).params, load_expert(other, config, k).params)


def test_missing_expert_is_retrained_identically(run_a):
    config, run = run_a
    before = load_expert(run, config, 1).params
    run.expert_path(1).unlink()
    run.invalidate(["experts"])
    record = experts.run(config, run.path)
    assert torch.equal(load_expert(run, config, 1).params, before)
    assert record["result"]["mb_per_expert"] > 0


def test_experts_of_another_config_are_refused(run_a):
    config, run = run_a
    other = tiny_config(config.data.cache_dir, "teacher.probe=false", "experts.lr=0.05")
    with pytest.raises(ArtifactError, match="experts.lr: 0.1 -> 0.05"):
        experts.run(other, run.path)
    with pytest.raises(ArtifactError, match="different config"):
        load_expert(run, other, 0)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6)
    )


# ConvNets run as one grouped network; any other student goes through vmap
@pytest.mark.parametrize(
    "make", [lambda: ConvNet(1, 8, width=4, depth=2, out_dim=6), _mlp], ids=["convnet", "vmap"]
)
def test_batched_experts_equal_one_at_a_time(make):
    x = torch.randn(50, 1, 8, 8, dtype=torch.float64)
    z = torch.randn(50, 6, dtype=torch.float64)
    recipe = KDRecipe(epochs=3, batch_size=16)  # 16 does not divide 50: a last batch of 2

    def students():
        return [make().double() for _ in range(3)]

    def gens():
        return [torch.Generator().manual_seed(10 + k) for k in range(3)]

    torch.manual_seed(0)
    one = [train_student(s, x, z, recipe, [0, 1, 3], g) for s, g in zip(students(), gens(), strict=True)]
    torch.manual_seed(0)
    batch = students()
    together = train_students(batch, x, z, recipe, [0, 1, 3], gens())
    for a, b, student in zip(one, together, batch, strict=True):
        assert b.epochs == a.epochs == (0, 1, 3)
        assert torch.equal(b.params[0], a.params[0])  # its own init
        assert torch.allclose(b.params, a.params, rtol=0, atol=1e-10)
        assert torch.allclose(b.loss, a.loss, rtol=1e-6, atol=0)
        assert torch.equal(flatten_params(student), b.params[-1])  # trained in place
    assert not torch.allclose(together[0].params[-1], together[1].params[-1])


def test_parallel_experts_match_and_resume_with_another_parallelism(run_a, tmp_path, monkeypatch):
    config, run = run_a

    def fresh(name, *overrides):
        for stage in ("teacher", "targets"):
            shutil.copytree(run.stage_dir(stage), tmp_path / name / stage)
        return tiny_config(
            config.data.cache_dir, "teacher.probe=false", "experts.num_experts=3", *overrides
        ), RunDir(tmp_path / name)

    serial, ref = fresh("serial", "experts.parallel=1")
    experts.run(serial, ref.path)
    batched, out = fresh("batched", "experts.parallel=2")
    groups = []
    real_train = experts.train_students

    def spy(students, *args):
        groups.append(len(students))
        return real_train(students, *args)

    monkeypatch.setattr(experts, "train_students", spy)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert experts.run(batched, out.path) == {}  # rank 1 trains expert 1 only
    assert [p.name for p in out.stage_dir("experts").glob("*.safetensors")] == ["expert_0001.safetensors"]
    monkeypatch.setenv("RANK", "0")
    experts.run(batched, out.path)  # rank 0: experts 0 and 2 in one group
    assert groups == [1, 2]
    for k in range(3):
        a, b = load_expert(ref, serial, k), load_expert(out, batched, k)
        # float32 and instance norm on 2x2 maps amplify rounding (moving the init by 1e-6 moves
        # epoch 3 by ~1e-3); the float64 test above checks the batched maths tightly
        assert torch.allclose(b.params, a.params, rtol=0, atol=1e-2)
        assert torch.allclose(b.loss, a.loss, rtol=1e-4, atol=0)
    assert torch.equal(
        load_expert(out, batched, 1).params,  # a group of one is train_student
        load_expert(ref, serial, 1).params,
    )
    assert defining(serial, "experts") == defining(batched, "experts")

    kept = out.expert_path(1).read_bytes()
    for k in (0, 2):
        out.expert_path(k).unlink()
    out.invalidate(["experts"])
    experts.run(
        tiny_config(
            config.data.cache_dir, "teacher.probe=false", "experts.num_experts=3", "experts.parallel=3"
        ),
        out.path,
    )
    assert groups == [1, 2, 2]  # the two missing experts only
    assert out.expert_path(1).read_bytes() == kept
    assert experts.run(serial, out.path)["result"]["num_experts"] == 3  # finished: nothing retrained
    assert groups == [1, 2, 2]


def test_parallel_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="experts.parallel"):
        tiny_config(tmp_path, "experts.parallel=-1")


def test_stage_without_its_prerequisite_says_what_to_run(tmp_path):
    config = tiny_config(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="run `mkdt teacher` first"):
        targets.run(config, tmp_path / "empty")


def _fast_path_run(fast, batched):
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(40, 3, 8, 8, generator=gen), torch.randn(40, 6, generator=gen)
    students = []
    for k in range(2):
        torch.manual_seed(k)
        students.append(ConvNet(3, 8, width=8, depth=2, out_dim=6))
    recipe = KDRecipe(epochs=2, batch_size=16, lr=0.05)
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    if batched:
        return train_students(students, x, z, recipe, [0, 1, 2], gens, runtime=fast)
    return [
        train_student(s, x, z, recipe, [0, 1, 2], g, runtime=fast)
        for s, g in zip(students, gens, strict=True)
    ]


@pytest.mark.parametrize("batched", [False, True])
def test_fast_path_agrees_with_fp32(batched):
    cpu = torch.device("cpu")
    ref = _fast_path_run(None, batched)
    layout = _fast_path_run(Runtime(cpu, channels_last=True), batched)
    bf16 = _fast_path_run(Runtime(cpu, precision="bf16", channels_last=True), batched)
    for r, a, b in zip(ref, layout, bf16, strict=True):
        moved = (r.params[-1] - r.params[0]).norm()
        assert (a.params - r.params).norm() < 1e-3 * moved  # same math, another summation order
        assert (b.params[-1] - r.params[-1]).norm() < 0.05 * moved  # bf16 forward, fp32 weights
        assert torch.allclose(b.loss, r.loss, rtol=0.02)


def test_compiled_student_trains_like_eager():
    cpu = torch.device("cpu")
    ref = _fast_path_run(None, False)
    compiled = _fast_path_run(Runtime(cpu, compile=True), False)
    for r, c in zip(ref, compiled, strict=True):
        assert (c.params - r.params).norm() < 1e-3 * (r.params[-1] - r.params[0]).norm()


def test_kd_recipe_is_keyword_only_and_immutable():
    """Positional fields could swap lr and weight_decay unnoticed: refused; a recipe never changes."""
    with pytest.raises(TypeError):
        KDRecipe(20, 0.1, 0.9, 1e-4, 256)
    recipe = KDRecipe(epochs=3, lr=0.05)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lr = 0.1
