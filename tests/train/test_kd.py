"""The KD loop's per-student step sizes (``train_students(lrs=...)``) and its divergence policies."""

import dataclasses

import pytest
import torch

from mkdt.errors import TrainingDiverged
from mkdt.nn.models import ConvNet, flatten_params
from mkdt.train.kd import KDRecipe, train_student, train_students

# momentum and weight decay both large enough to matter in float64
RECIPE = KDRecipe(epochs=3, batch_size=16, momentum=0.9, weight_decay=0.05)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6)
    )


def _convnet() -> torch.nn.Module:
    return ConvNet(1, 8, width=4, depth=2, out_dim=6)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, 8, 8, dtype=torch.float64, generator=gen)
    return x, torch.randn(50, 6, dtype=torch.float64, generator=gen)  # 16 does not divide 50


def _students(make, count):
    torch.manual_seed(0)
    return [make().double() for _ in range(count)]


def _gens(count):
    return [torch.Generator().manual_seed(10 + k) for k in range(count)]


def _one_by_one(make, lrs):
    x, z = _data()
    return [
        train_student(s, x, z, dataclasses.replace(RECIPE, lr=lr), [0, 1, 3], g)
        for s, g, lr in zip(_students(make, len(lrs)), _gens(len(lrs)), lrs, strict=True)
    ]


# ConvNets run as one grouped network; any other student goes through vmap
@pytest.mark.parametrize("make", [_convnet, _mlp], ids=["convnet", "vmap"])
def test_students_at_their_own_step_sizes_equal_one_by_one(make):
    lrs = [0.01, 0.05, 0.2]
    one = _one_by_one(make, lrs)
    x, z = _data()
    batch = _students(make, len(lrs))
    together = train_students(batch, x, z, RECIPE, [0, 1, 3], _gens(len(lrs)), lrs=lrs)
    for a, b, student in zip(one, together, batch, strict=True):
        assert torch.equal(b.params[0], a.params[0])
        assert torch.allclose(b.params, a.params, rtol=0, atol=1e-10)
        assert torch.allclose(b.loss, a.loss, rtol=1e-6, atol=0)
        assert torch.equal(flatten_params(student), b.params[-1])  # trained in place
        assert not b.diverged
    moved = [(t.params[-1] - t.params[0]).norm() for t in together]
    assert moved[0] < moved[1] < moved[2]  # the step sizes did differ


def test_one_student_at_its_own_step_size_is_train_student():
    x, z = _data()
    (alone,) = train_students(_students(_convnet, 1), x, z, RECIPE, [0, 3], _gens(1), lrs=[0.05])
    (ref,) = _one_by_one(_convnet, [0.05])
    assert torch.equal(alone.params, ref.params[[0, 2]])
    assert torch.equal(alone.loss, ref.loss)


@pytest.mark.parametrize("make", [_convnet, _mlp], ids=["convnet", "vmap"])
def test_kept_divergence_leaves_the_other_students_unchanged(make):
    lrs = [0.01, 1e6]
    x, z = _data()
    together = train_students(
        _students(make, 2), x, z, RECIPE, [0, 1, 3], _gens(2), lrs=lrs, on_divergence="keep"
    )
    (ref,) = _one_by_one(make, lrs[:1])
    assert torch.allclose(together[0].params, ref.params, rtol=0, atol=1e-10)
    assert torch.allclose(together[0].loss, ref.loss, rtol=1e-6, atol=0)
    assert not together[0].diverged
    assert together[1].diverged and not torch.isfinite(together[1].loss).all()
    assert together[1].loss.shape == ref.loss.shape  # every epoch was trained


def test_divergence_raises_for_the_whole_batch_by_default():
    x, z = _data()
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_students(_students(_convnet, 2), x, z, RECIPE, [3], _gens(2), lrs=[0.01, 1e6])
    with pytest.raises(TrainingDiverged):  # one student: train_student's check
        train_students(_students(_convnet, 1), x, z, RECIPE, [3], _gens(1), lrs=[1e6])
    (kept,) = train_students(
        _students(_convnet, 1), x, z, RECIPE, [3], _gens(1), lrs=[1e6], on_divergence="keep"
    )
    assert kept.diverged


def test_mismatched_step_sizes_and_unknown_policies_are_refused():
    x, z = _data()
    with pytest.raises(ValueError, match="2 students but 3 step sizes"):
        train_students(_students(_convnet, 2), x, z, RECIPE, [3], _gens(2), lrs=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="on_divergence"):
        train_students(_students(_convnet, 2), x, z, RECIPE, [3], _gens(2), on_divergence="skip")
