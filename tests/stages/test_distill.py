"""Trajectory matching and the distill stage: gradients against finite differences, backends, resume."""

import pytest
import torch

from mkdt.config import DistillConfig
from mkdt.data import load_dataset
from mkdt.errors import ArtifactError
from mkdt.files import load_tensors
from mkdt.nn.models import ConvNet, flatten_params, resnet10
from mkdt.runtime import Runtime
from mkdt.stages import distill, experts, init, targets, teacher
from mkdt.stages.distill import matching_recipe
from mkdt.store import RunDir
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.kd import KDRecipe, train_student
from mkdt.train.matching import (
    Distiller,
    MatchingRecipe,
    matching_grads,
    recompute_matching_grads,
    resolve_backend,
    sample_batches,
    unrolled_graph_bytes,
    unrolled_matching_loss,
)
from mkdt.train.matching import distill as distill_loop
from tests.helpers import interrupted_after_first_checkpoint, tiny_config


def recipe(**keys) -> MatchingRecipe:
    """The recipe of a distill section with these keys (the others at their defaults)."""
    return matching_recipe(DistillConfig(**keys))


def _tiny_problem(dtype=torch.float64, batch_norm=False):
    gen = torch.Generator().manual_seed(0)
    if batch_norm:  # a training-mode ResNet: batch statistics, running statistics updated in place
        torch.manual_seed(0)
        student = resnet10(width=2, in_channels=1, out_dim=3).to(dtype)
    else:
        student = ConvNet(in_channels=1, image_size=4, width=2, depth=1, out_dim=3).to(dtype)
    start = flatten_params(student)
    target = start + 0.05 * torch.randn(start.shape, generator=gen, dtype=dtype)
    images = torch.randn(6, 1, 4, 4, generator=gen, dtype=dtype)
    z = torch.randn(6, 3, generator=gen, dtype=dtype)
    batches = sample_batches(6, 4, 3, gen)
    return student, start, target, images, z, batches


def test_pixel_target_and_lr_gradients_match_finite_differences():
    student, start, target, images, z, batches = _tiny_problem()
    lr = torch.tensor(0.3, dtype=torch.float64)

    def loss(x, t, a):
        return unrolled_matching_loss(student, start, target, x, t, a, batches)

    x, t, a = (v.clone().requires_grad_(True) for v in (images, z, lr))
    loss(x, t, a).backward()
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    for grad, point, which in ((x.grad, images, 0), (t.grad, z, 1), (a.grad, lr, 2)):
        direction = torch.randn(point.shape, generator=gen, dtype=torch.float64)
        args_plus = [images, z, lr]
        args_minus = [images, z, lr]
        args_plus[which] = point + eps * direction
        args_minus[which] = point - eps * direction
        with torch.no_grad():
            numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * eps)
        analytic = (grad * direction).sum()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (which, numeric, analytic)
        assert analytic.abs() > 1e-8  # a real, non-zero gradient


def _segments(student, start, images, z, num, steps, gen):
    """``num`` segments with their own starts, targets and batch orders."""
    starts = torch.stack(
        [start + 0.02 * torch.randn(start.shape, generator=gen, dtype=start.dtype) for _ in range(num)]
    )
    ends = starts + 0.05 * torch.randn(starts.shape, generator=gen, dtype=start.dtype)
    batches = torch.stack([sample_batches(len(images), 4, steps, gen) for _ in range(num)], dim=1)
    return starts, ends, batches


@pytest.mark.parametrize("num_segments", [1, 3])
@pytest.mark.parametrize("learn_targets", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["convnet", "resnet"])
def test_recompute_backend_equals_unrolled(num_segments, learn_targets, batch_norm):
    student, start, _, images, z, _ = _tiny_problem(batch_norm=batch_norm)
    starts, ends, batches = _segments(
        student, start, images, z, num_segments, 5, torch.Generator().manual_seed(2)
    )
    lr = torch.tensor(0.3, dtype=torch.float64)
    ref = matching_grads("unrolled", student, starts, ends, images, z, lr, batches, learn_targets)
    fast = recompute_matching_grads(student, starts, ends, images, z, lr, batches, learn_targets)
    pairs = [(fast.loss, ref.loss), (fast.images, ref.images), (fast.lr, ref.lr)]
    if learn_targets:
        pairs.append((fast.targets, ref.targets))
    else:
        assert fast.targets is None and ref.targets is None
    for got, want in pairs:
        assert want.abs().max() > 1e-8
        assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_several_segments_average_the_single_segment_losses():
    student, start, _, images, z, _ = _tiny_problem()
    starts, ends, batches = _segments(student, start, images, z, 3, 4, torch.Generator().manual_seed(3))
    lr = torch.tensor(0.2, dtype=torch.float64)
    together = unrolled_matching_loss(student, starts, ends, images, z, lr, batches)
    alone = [
        unrolled_matching_loss(student, starts[b], ends[b], images, z, lr, batches[:, b]) for b in range(3)
    ]
    assert torch.allclose(together, torch.stack(alone).mean(), rtol=1e-12)
    assert len({round(x.item(), 6) for x in alone}) == 3  # three different segments


def test_sample_batches_walk_through_permutations():
    gen = torch.Generator().manual_seed(0)
    b = sample_batches(10, 4, 5, gen)
    assert b.shape == (5, 4)
    assert sorted(b[:2].flatten().tolist()) == sorted(set(b[:2].flatten().tolist()))  # one permutation
    assert sample_batches(3, 8, 2, gen).shape == (2, 3)  # batch larger than the set: the whole set


@pytest.fixture(scope="module")
def digits_experts(tmp_path_factory):
    data = load_dataset("digits", cache_dir=tmp_path_factory.mktemp("cache"))
    x = data.normalize(data.train_images)
    torch.manual_seed(123)
    with torch.no_grad():
        z = ConvNet(1, 8, width=8, depth=2, out_dim=16)(x)
    trajs = []
    for k in range(3):
        torch.manual_seed(k)
        student = ConvNet(1, 8, width=8, depth=2, out_dim=16)
        trajs.append(
            train_student(
                student,
                x,
                z,
                KDRecipe(epochs=4, batch_size=64),
                [0, 1, 2, 3, 4],
                torch.Generator().manual_seed(k),
            )
        )
    return student, x, z, trajs


def test_distillation_loss_falls_on_a_small_problem(digits_experts):
    student, x, z, trajs = digits_experts
    small = recipe(syn_steps=10, batch_syn=50, lr_img=100.0, lr_lr=1e-3, max_start_epoch=2, expert_epochs=2)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:100]
    distiller = Distiller(
        student=student,
        images=x[idx],
        targets=z[idx],
        trajectories=trajs,
        recipe=small,
        gen=torch.Generator().manual_seed(0),
    )
    losses = [distiller.step() for _ in range(40)]
    assert sum(losses[-10:]) / 10 < 0.95 * sum(losses[:10]) / 10
    assert not torch.equal(distiller.images.detach(), x[idx])  # pixels moved
    assert distiller.lr.item() != small.lr_init  # the step size is learned
    assert torch.equal(distiller.targets, z[idx])  # targets fixed by default


def test_every_iteration_can_draw_any_expert_and_start_epoch(digits_experts):
    student, x, z, trajs = digits_experts
    distiller = Distiller(
        student=student,
        images=x[:10],
        targets=z[:10],
        trajectories=trajs,
        recipe=recipe(max_start_epoch=2, trajectories=2),
        gen=torch.Generator().manual_seed(0),
    )
    draws = {seg for _ in range(100) for seg in distiller.draw_segments()}
    assert draws == {(k, s) for k in range(3) for s in range(2)}


def test_learnable_targets_move(digits_experts):
    student, x, z, trajs = digits_experts
    learned = recipe(syn_steps=3, batch_syn=20, learn_targets=True, lr_targets=10.0)
    distiller = Distiller(
        student=student,
        images=x[:40],
        targets=z[:40],
        trajectories=trajs,
        recipe=learned,
        gen=torch.Generator().manual_seed(0),
    )
    distiller.step()
    assert not torch.equal(distiller.targets.detach(), z[:40])


DISTILL = ["teacher.probe=false"]


def _prerequisites(config, out):
    for stage in (teacher, targets, experts, init):
        stage.run(config, out)


def test_interrupted_distillation_resumes_to_the_same_set(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "cache", *DISTILL)
    _prerequisites(config, tmp_path / "run")
    record = distill.run(config, tmp_path / "run")
    full, meta = load_tensors(tmp_path / "run/distill/synthetic.safetensors")
    assert (tmp_path / "run/distill/grid.png").stat().st_size > 100
    assert full["images"].shape == (40, 1, 8, 8) and meta["iterations"] == 4
    assert record["result"]["learned_lr"] == pytest.approx(full["lr"].item())

    run = RunDir(tmp_path / "run")
    run.invalidate(["distill"])
    (tmp_path / "run/distill/checkpoint.pt").unlink()
    with interrupted_after_first_checkpoint(monkeypatch):
        distill.run(config, tmp_path / "run")
    distill.run(config, tmp_path / "run")
    resumed, _ = load_tensors(tmp_path / "run/distill/synthetic.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    other = tiny_config(tmp_path / "cache", *DISTILL, "distill.lr_img=20")
    with pytest.raises(ArtifactError, match="distill.lr_img: 10.0 -> 20.0"):
        distill.run(other, tmp_path / "run")


def test_matching_loss_is_one_when_the_step_size_is_zero():
    student, start, target, images, z, batches = _tiny_problem()
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert unrolled_matching_loss(student, start, target, images, z, zero, batches).item() == pytest.approx(1)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
@pytest.mark.parametrize("backend", ["unrolled", "recompute"])
def test_bf16_autocast_and_channels_last_agree_with_fp32(backend, device):
    torch.manual_seed(0)
    student = ConvNet(in_channels=3, image_size=8, width=8, depth=2, out_dim=16).to(device)
    start = flatten_params(student)
    target = start + 0.01 * torch.randn(start.shape, device=device)
    images, z = torch.randn(24, 3, 8, 8, device=device), torch.randn(24, 16, device=device)
    lr = torch.tensor(0.1, device=device)
    batches = sample_batches(24, 12, 4, torch.Generator().manual_seed(0)).to(device)
    ref = matching_grads(backend, student, start, target, images, z, lr, batches)
    fast = Runtime(torch.device(device), precision="bf16", channels_last=True)
    got = matching_grads(
        backend, student, start, target, fast.images(images), z, lr, batches, autocast=fast.autocast
    )
    assert abs(got.loss - ref.loss) / ref.loss < 1e-2  # bf16 keeps ~3 significant digits
    assert torch.nn.functional.cosine_similarity(got.images.flatten(), ref.images.flatten(), dim=0) > 0.99
    assert abs(got.lr - ref.lr) / ref.lr.abs() < 0.05
    exact = Runtime(torch.device(device), channels_last=True)
    layout = matching_grads(backend, student, start, target, exact.images(images), z, lr, batches)
    tol = 1e-4 if device == "cpu" else 1e-2  # cuDNN convolutions may use TF32
    assert torch.allclose(layout.images, ref.images, rtol=tol, atol=tol * 1e-3)


def test_auto_backend_picks_recompute_for_large_graphs():
    student, shape, cpu = ConvNet(3, 32, 128, 3, 512), torch.Size((3, 32, 32)), torch.device("cpu")
    small = recipe(syn_steps=2, batch_syn=10)
    paper = recipe()  # N = 40, batch 256, width 128: ~ 30 GB unrolled
    assert resolve_backend("auto", small, student, shape, cpu, num_images=100) == "unrolled"
    assert resolve_backend("auto", paper, student, shape, cpu, num_images=1000) == "recompute"
    assert unrolled_graph_bytes(paper, student, shape, num_images=1000) > 20 * 2**30
    assert resolve_backend("unrolled", paper, student, shape, cpu, num_images=1000) == "unrolled"


def test_graph_estimate_of_a_batch_norm_student_leaves_it_untouched():
    student = resnet10(width=4, out_dim=8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert unrolled_graph_bytes(recipe(), student, torch.Size((3, 32, 32)), num_images=1000) > 0
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_the_loop_reads_losses_back_only_when_it_logs_and_keeps_every_one(digits_experts, monkeypatch):
    student, x, z, trajs = digits_experts
    seven = recipe(syn_steps=2, batch_syn=20, iterations=7)

    def build() -> Distiller:
        return Distiller(
            student=student,
            images=x[:40],
            targets=z[:40],
            trajectories=trajs,
            recipe=seven,
            gen=torch.Generator().manual_seed(0),
        )

    stepped = build()
    expected = [stepped.step().item() for _ in range(7)]
    looped = build()
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real: reads.append(1) or real(self))
    run = distill_loop(looped, PeriodicCheckpoint(None, {}, 100, "distill"), log_every=3)
    assert run.history.loss == expected  # every iteration's loss, read back in batches
    assert len(reads) == 4  # one read of the history after iterations 1, 3, 6 and 7 only
    assert run.history.lr[-1] == looped.lr.item() and len(run.history.experts) == 7


def test_divergence_stops_with_a_message_naming_the_options(digits_experts):
    student, x, z, trajs = digits_experts
    diverging = recipe(syn_steps=2, batch_syn=20, iterations=20, lr_lr=1e12)
    distiller = Distiller(
        student=student,
        images=x[:40],
        targets=z[:40],
        trajectories=trajs,
        recipe=diverging,
        gen=torch.Generator().manual_seed(0),
    )
    with pytest.raises(ArtifactError, match="lower distill.lr_img or distill.lr_lr"):
        distill_loop(distiller, PeriodicCheckpoint(None, {}, 100, "distill"), log_every=2)
