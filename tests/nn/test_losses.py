"""The method's two losses against explicit computations written out here."""

import pytest
import torch

from mkdt.nn.losses import KDLoss, matching_distance


def _explicit_kd(out: torch.Tensor, z: torch.Tensor) -> float:
    """(1 / (B D)) sum_b sum_d (out_bd - z_bd)^2 with Python loops."""
    b, d = out.shape
    return sum((out[i, j].item() - z[i, j].item()) ** 2 for i in range(b) for j in range(d)) / (b * d)


def test_kd_loss_reductions_equal_the_explicit_formula():
    gen = torch.Generator().manual_seed(0)
    out, z = (
        torch.randn(3, 4, 5, generator=gen, dtype=torch.float64),
        torch.randn(3, 4, 5, generator=gen, dtype=torch.float64),
    )
    for e in range(3):
        assert KDLoss()(out[e], z[e]).item() == pytest.approx(_explicit_kd(out[e], z[e]), rel=1e-12)
        per_sample = KDLoss("per_sample")(out[e], z[e])
        for i in range(4):
            assert per_sample[i].item() == pytest.approx(
                _explicit_kd(out[e, i : i + 1], z[e, i : i + 1]), rel=1e-12
            )
    per_member = KDLoss("per_member")(out, z)
    assert per_member.tolist() == pytest.approx([_explicit_kd(out[e], z[e]) for e in range(3)], rel=1e-12)


def test_kd_loss_scores_a_bf16_forward_in_the_targets_dtype():
    out, z = torch.randn(2, 3).bfloat16(), torch.randn(2, 3)
    loss = KDLoss()(out, z)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_explicit_kd(out.float(), z), rel=1e-6)


def test_per_member_gradients_are_each_members_own():
    out = torch.randn(2, 4, 3, requires_grad=True)
    z = torch.randn(2, 4, 3)
    KDLoss("per_member")(out, z).sum().backward()
    for e in range(2):
        alone = out[e].detach().clone().requires_grad_(True)
        KDLoss()(alone, z[e]).backward()
        assert torch.allclose(out.grad[e], alone.grad)


def test_kd_loss_rejects_bad_options_and_shapes():
    with pytest.raises(ValueError, match="reduction"):
        KDLoss("sum")
    with pytest.raises(ValueError, match="one shape"):
        KDLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="3 dims"):
        KDLoss("per_member")(torch.zeros(2, 3), torch.zeros(2, 3))


def test_matching_distance_equals_the_explicit_ratio_averaged_over_segments():
    gen = torch.Generator().manual_seed(1)
    theta, start, target = (torch.randn(3, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = (
        sum(
            sum((theta[b, p] - target[b, p]).item() ** 2 for p in range(7))
            / sum((start[b, p] - target[b, p]).item() ** 2 for p in range(7))
            for b in range(3)
        )
        / 3
    )
    assert matching_distance(theta, start, target).item() == pytest.approx(expected, rel=1e-12)
    assert matching_distance(start, start, target).item() == pytest.approx(1.0)
    assert matching_distance(target, start, target).item() == 0.0
