"""Self-supervised losses and projection heads for the teacher (docs/method.md §2 stage 1, §3, §4).

- :class:`BarlowTwinsLoss` — Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
  Reduction", ICML 2021.
- :class:`NTXentLoss` — Chen et al., "A Simple Framework for Contrastive Learning of Visual
  Representations" (SimCLR), ICML 2020.

Linear layers that feed a BatchNorm have no bias (the BatchNorm shift makes it redundant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SSL_METHODS = ("barlow_twins", "simclr")


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss on two batches of embeddings z1, z2 of shape (B, D).

    Each embedding dimension is standardised along the batch, exactly like
    ``BatchNorm1d(D, affine=False)`` in training mode in the authors' code:
    ``zn = (z - mean_b z) / sqrt(var_b z + eps)`` (biased variance). The cross-correlation matrix is
    ``C = z1n^T z2n / B`` (D x D) and

        L = sum_i (1 - C_ii)^2  +  lambda * sum_{i != j} C_ij^2
            (invariance term)      (redundancy reduction term)

    ``lambda_offdiag`` = 1/128 is the CIFAR setting of docs/method.md §3 (the paper uses 5e-3 on
    ImageNet).
    """

    def __init__(self, lambda_offdiag: float = 1 / 128, eps: float = 1e-5) -> None:
        super().__init__()
        if lambda_offdiag < 0 or eps <= 0:
            raise ValueError(
                f"BarlowTwinsLoss needs lambda_offdiag >= 0 and eps > 0, got "
                f"lambda_offdiag={lambda_offdiag}, eps={eps}"
            )
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps

    def _standardise(self, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(dim=0, keepdim=True)
        var = z.var(dim=0, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + self.eps)

    def cross_correlation(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """C = z1n^T z2n / B, the (D, D) cross-correlation of the batch-standardised embeddings."""
        _check_pair(z1, z2)
        if z1.shape[0] < 2:
            raise ValueError(
                "BarlowTwinsLoss standardises along the batch and needs a batch of at least 2, "
                f"got {z1.shape[0]}; use a larger batch size"
            )
        return self._standardise(z1).T @ self._standardise(z2) / z1.shape[0]

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        c = self.cross_correlation(z1, z2)
        diag = torch.diagonal(c)
        invariance = (1 - diag).pow(2).sum()
        redundancy = c.pow(2).sum() - diag.pow(2).sum()
        return invariance + self.lambda_offdiag * redundancy


class NTXentLoss(nn.Module):
    """Normalised-temperature cross-entropy (SimCLR) on two batches of embeddings of shape (B, D).

    The 2B embeddings are L2-normalised; with s_ij = cos(z_i, z_j) / T, the loss of anchor i whose
    positive (its other view) is p(i) is

        l_i = -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) )

    and the loss is the mean of l_i over all 2B anchors.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NTXentLoss needs temperature > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        _check_pair(z1, z2)
        b = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
        return F.cross_entropy(logits, targets)


def _check_pair(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"SSL losses take two (B, D) embedding batches of equal shape, got {tuple(z1.shape)} "
            f"and {tuple(z2.shape)}"
        )


def barlow_twins_projector(in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024) -> nn.Sequential:
    """Barlow Twins projector: Linear-BN-ReLU, Linear-BN-ReLU, Linear (3 layers)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def simclr_projector(in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> nn.Sequential:
    """SimCLR projection head: Linear-BN-ReLU-Linear-BN (2 layers, docs/method.md §4)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
    )
