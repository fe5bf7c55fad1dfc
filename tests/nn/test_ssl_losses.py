"""The SSL losses (Barlow Twins, NT-Xent) against hand computations and their invariances."""

import math

import numpy as np
import pytest
import torch

from mkdt.nn.ssl import BarlowTwinsLoss, NTXentLoss, barlow_twins_projector, simclr_projector


def bt_reference(z1: np.ndarray, z2: np.ndarray, lam: float, eps: float) -> float:
    """Barlow Twins loss with explicit loops."""
    b, d = z1.shape

    def standardise(z):
        out = np.zeros_like(z)
        for j in range(d):
            mean = sum(z[i, j] for i in range(b)) / b
            var = sum((z[i, j] - mean) ** 2 for i in range(b)) / b
            for i in range(b):
                out[i, j] = (z[i, j] - mean) / math.sqrt(var + eps)
        return out

    a, c = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            cij = sum(a[k, i] * c[k, j] for k in range(b)) / b
            loss += (1 - cij) ** 2 if i == j else lam * cij**2
    return loss


def ntxent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """NT-Xent with explicit loops over the 2B anchors."""
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
        total += -math.log(math.exp(z[i] @ z[pos] / t) / denom)
    return total / n


def test_barlow_twins_matches_hand_computation():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    loss = BarlowTwinsLoss(lambda_offdiag=0.3, eps=1e-5)(torch.tensor(z1), torch.tensor(z2))
    assert loss.item() == pytest.approx(bt_reference(z1, z2, 0.3, 1e-5), rel=1e-10)


def test_barlow_twins_matches_batchnorm_formulation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 5), torch.randn(16, 5)
    bn = torch.nn.BatchNorm1d(5, affine=False, eps=1e-5)
    c = bn(z1).T @ bn(z2) / 16
    ref = (torch.diagonal(c) - 1).pow(2).sum() + (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) / 128
    assert torch.allclose(BarlowTwinsLoss()(z1, z2), ref, atol=1e-5)


def test_barlow_twins_invariant_to_positive_affine_rescaling():
    torch.manual_seed(1)
    z1, z2 = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    scale, shift = torch.rand(6, dtype=torch.float64) * 5 + 0.5, torch.randn(6, dtype=torch.float64)
    loss = BarlowTwinsLoss(eps=1e-12)
    assert torch.allclose(loss(z1, z2), loss(z1 * scale + shift, z2 * scale.flip(0) - shift))


def test_barlow_twins_near_zero_for_identical_decorrelated_embeddings():
    # columns orthonormal and orthogonal to the constant vector: zero mean, uncorrelated, C = I
    torch.manual_seed(2)
    ones = torch.ones(64, 1, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.randn(64, 8, dtype=torch.float64)], dim=1))
    z = basis[:, 1:] * 8
    assert BarlowTwinsLoss(eps=1e-12)(z, z).item() < 1e-8
    assert BarlowTwinsLoss()(z, torch.randn_like(z)).item() > 1.0


def test_barlow_twins_rejects_bad_input():
    with pytest.raises(ValueError, match="batch of at least 2"):
        BarlowTwinsLoss()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="equal shape"):
        BarlowTwinsLoss()(torch.randn(4, 3), torch.randn(4, 2))


def test_ntxent_matches_hand_computation():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    for t in (0.5, 0.1):
        loss = NTXentLoss(temperature=t)(torch.tensor(z1), torch.tensor(z2))
        assert loss.item() == pytest.approx(ntxent_reference(z1, z2, t), rel=1e-10)


def test_ntxent_properties():
    torch.manual_seed(3)
    z1, z2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    loss = NTXentLoss(temperature=0.5)
    assert torch.allclose(loss(z1, z2), loss(3.0 * z1, 0.2 * z2))
    # identical views that are mutually orthogonal: the minimum for this batch geometry
    eye = torch.eye(8, 16, dtype=torch.float64)
    best = loss(eye, eye)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 14 * math.exp(0.0)))
    assert best.item() == pytest.approx(expected)
    assert best < loss(eye, eye.roll(1, dims=0)) and best < loss(z1, z2)


def test_losses_propagate_gradients():
    torch.manual_seed(4)
    for loss in (BarlowTwinsLoss(), NTXentLoss()):
        z1 = torch.randn(8, 4, requires_grad=True)
        z2 = torch.randn(8, 4, requires_grad=True)
        loss(z1, z2).backward()
        assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_projectors():
    bt = barlow_twins_projector(32, hidden_dim=16, out_dim=8)
    assert sum(isinstance(m, torch.nn.Linear) for m in bt) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bt) == 2
    assert bt(torch.randn(4, 32)).shape == (4, 8)
    sc = simclr_projector(32)
    assert sum(isinstance(m, torch.nn.Linear) for m in sc) == 2
    assert isinstance(sc[-1], torch.nn.BatchNorm1d)
    assert sc(torch.randn(4, 32)).shape == (4, 128)
    assert barlow_twins_projector(512)(torch.randn(2, 512)).shape == (2, 1024)
