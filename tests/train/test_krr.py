"""KRR-ST: the kernel ridge loss against an explicit float64 reference and finite differences, the
student pool's schedule, a tiny distillation, and a resume that ends with the same bits."""

import numpy as np
import pytest
import torch

from mkdt.errors import ArtifactError
from mkdt.nn.models import ConvNet
from mkdt.runtime import Runtime, derive_seed, seeded
from mkdt.train.checkpoint import PeriodicCheckpoint
from mkdt.train.krr import KRRDistiller, KRRRecipe, StudentPool, krr_distill, krr_loss
from tests.helpers import interrupted_after_first_checkpoint

RIDGE = 1e-3


def _recipe(**keys) -> KRRRecipe:
    values = {
        "iterations": 6,
        "num_models": 3,
        "online_iterations": 4,
        "online_lr": 0.05,
        "online_momentum": 0.9,
        "online_weight_decay": 1e-3,
        "outer_lr": 0.01,
        "outer_batch_size": 16,
        "ridge": RIDGE,
    }
    return KRRRecipe(**(values | keys))


def _student(i: int, k: int, dtype=torch.float32) -> torch.nn.Module:
    with seeded(derive_seed(0, "test-krr", i, k)):
        return ConvNet(in_channels=1, image_size=8, width=4, depth=2, out_dim=5).to(dtype)


def _reference(f_s, y_s, f_r, lam):
    """The loss of the docstring, written out: bias columns, explicit inverse, mean squared error."""
    f_s = torch.cat([f_s, torch.ones(len(f_s), 1, dtype=f_s.dtype)], 1)
    f_r = torch.cat([f_r, torch.ones(len(f_r), 1, dtype=f_r.dtype)], 1)
    k_ss = f_s @ f_s.T
    return torch.linalg.inv(k_ss + lam * torch.eye(len(k_ss), dtype=k_ss.dtype)), f_r @ f_s.T


def test_the_loss_is_kernel_ridge_regression_on_the_synthetic_set():
    gen = torch.Generator().manual_seed(0)
    f_s, y_s = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen)
    f_r, y_r = torch.randn(11, 4, generator=gen, dtype=torch.float64), torch.randn(11, 3, generator=gen)
    y_s, y_r = y_s.double(), y_r.double()
    loss = krr_loss(f_s, y_s, f_r, y_r, RIDGE)
    # numpy: lambda from the trace, the ridge weights from numpy's solver
    fs1, fr1 = (np.hstack([f.numpy(), np.ones((len(f), 1))]) for f in (f_s, f_r))
    k_ss = fs1 @ fs1.T
    lam = RIDGE * np.trace(k_ss)
    weights = np.linalg.solve(k_ss + lam * np.eye(7), y_s.numpy())
    expected = np.mean((fr1 @ fs1.T @ weights - y_r.numpy()) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    inverse, k_rs = _reference(f_s, y_s, f_r, lam)
    assert loss.item() == pytest.approx(((k_rs @ inverse @ y_s - y_r) ** 2).mean().item(), rel=1e-10)
    # with a vanishing ridge on an invertible kernel (more features than images) it interpolates
    wide = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    assert krr_loss(wide, y_s[:5], wide, y_s[:5], 1e-12).item() < 1e-12


def test_gradients_wrt_images_and_targets_match_finite_differences():
    student = _student(0, 0, torch.float64).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    real = torch.randn(9, 1, 8, 8, generator=gen, dtype=torch.float64)
    y_real = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f_r = student.features(real)
        f_s0 = torch.cat([student.features(x), torch.ones(6, 1, dtype=torch.float64)], 1)
        lam = RIDGE * torch.trace(f_s0 @ f_s0.T)  # krr_loss holds lambda constant: so does the reference

    def reference(images, targets):
        inverse, k_rs = _reference(student.features(images), targets, f_r, lam)
        return ((k_rs @ inverse @ targets - y_real) ** 2).mean()

    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    loss = krr_loss(student.features(xs), ys, f_r, y_real, RIDGE)
    assert loss.item() == pytest.approx(reference(x, y).item(), rel=1e-10)
    grads = torch.autograd.grad(loss, [xs, ys])
    eps = 1e-6
    for which, (point, grad) in enumerate(((x, grads[0]), (y, grads[1]))):
        direction = torch.randn(point.shape, generator=gen, dtype=torch.float64)
        moved = [[x, y], [x, y]]
        moved[0][which], moved[1][which] = point + eps * direction, point - eps * direction
        with torch.no_grad():
            numeric = (reference(*moved[0]) - reference(*moved[1])) / (2 * eps)
        analytic = (grad * direction).sum()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (which, numeric, analytic)
        assert analytic.abs() > 1e-8


def test_members_train_then_restart_with_a_fresh_initialisation():
    images, targets = torch.randn(10, 1, 8, 8), torch.randn(10, 5)
    pool = StudentPool(_student, _recipe(num_models=2, online_iterations=2), torch.Generator().manual_seed(0))
    runtime = Runtime()
    pool.warm_up(images, targets, runtime)
    assert pool.steps == [1, 1]  # a count in [1, online_iterations)
    pool.update(0, images, targets, runtime)
    assert pool.steps[0] == 2 and pool.generations[0] == 0
    pool.update(0, images, targets, runtime)  # at online_iterations: its next initialisation
    assert pool.steps[0] == 0 and pool.generations[0] == 1
    fresh = _student(0, 1)
    assert all(
        torch.equal(a, b) for a, b in zip(pool.models[0].parameters(), fresh.parameters(), strict=True)
    )
    pool.update(0, images, targets, runtime)  # and trains again (the release kept re-initialising)
    assert pool.steps[0] == 1 and pool.generations == [1, 0]


def _problem(iterations=6):
    """A KRRDistiller on random 8x8 images whose targets are a fixed random network's features."""
    gen = torch.Generator().manual_seed(3)
    real = torch.randn(64, 1, 8, 8, generator=gen)
    with seeded(7):
        teacher = ConvNet(in_channels=1, image_size=8, width=4, depth=2, out_dim=None).eval()
        head = torch.nn.Linear(teacher.feature_dim, 5)
    with torch.no_grad():
        z = head(teacher.features(real))
    recipe = _recipe(iterations=iterations)
    pool = StudentPool(_student, recipe, torch.Generator().manual_seed(4))
    return KRRDistiller(
        pool=pool,
        images=real[:12],
        targets=z[:12],
        mean=(0.5,),
        std=(0.25,),
        num_real=64,
        real_batch=lambda idx, g: (real[idx], z[idx]),
        gen=torch.Generator().manual_seed(5),
    ), (real, z)


def test_a_tiny_distillation_lowers_the_kernel_regression_loss():
    distiller, (real, z) = _problem(iterations=40)
    start_images, start_targets = distiller.images().detach().clone(), distiller.targets.detach().clone()
    krr_distill(distiller, PeriodicCheckpoint(None, {}, 100, "krr_st"), log_every=10)

    def mean_loss(images, targets):  # over every pool member, on all the real images
        with torch.no_grad():
            losses = [
                krr_loss(m.eval().features(images), targets, m.features(real), z, RIDGE)
                for m in distiller.pool.models
            ]
        return torch.stack(losses).mean().item()

    before, after = mean_loss(start_images, start_targets), mean_loss(distiller.images(), distiller.targets)
    assert after < 0.9 * before, (before, after)
    assert not torch.equal(distiller.images(), start_images)


def test_an_interrupted_distillation_resumes_to_the_same_bits(tmp_path, monkeypatch):
    def checkpoint():
        return PeriodicCheckpoint(tmp_path / "checkpoint.pt", {"test": 1}, 2, "krr_st")

    whole, _ = _problem()
    uninterrupted = krr_distill(whole, PeriodicCheckpoint(None, {}, 2, "krr_st"), log_every=1)
    with interrupted_after_first_checkpoint(monkeypatch):
        krr_distill(_problem()[0], checkpoint(), log_every=1)
    resumed, _ = _problem()
    run = krr_distill(resumed, checkpoint(), log_every=1)
    assert run.iterations_run == 4 and run.losses == uninterrupted.losses
    assert torch.equal(resumed.pixels, whole.pixels) and torch.equal(resumed.targets, whole.targets)
    for a, b in zip(resumed.pool.models, whole.pool.models, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert resumed.pool.steps == whole.pool.steps


def test_a_non_finite_loss_names_the_options():
    distiller, _ = _problem()
    with torch.no_grad():
        distiller.targets[0, 0] = float("nan")
    with pytest.raises(ArtifactError, match="lower krr_st.outer_lr"):
        krr_distill(distiller, PeriodicCheckpoint(None, {}, 100, "krr_st"), log_every=1)
