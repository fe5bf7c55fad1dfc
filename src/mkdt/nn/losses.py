"""The method's two losses: the KD regression loss and the trajectory-matching distance.

Every place that trains or scores a KD student (experts, batched experts, the init stage's
per-image ranking, distillation's inner steps, evaluation pre-training) uses :class:`KDLoss`; the
distillation objective is :func:`matching_distance`. docs/method.md gives the equations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KD_REDUCTIONS = ("mean", "per_sample", "per_member")


class KDLoss(nn.Module):
    """Knowledge-distillation regression loss of student outputs against teacher targets.

    For student outputs f(x) and targets z of dimension D over a batch of B images,

        L_KD = 1/(B D) * sum_b sum_d (f(x)_bd - z_bd)^2

    (the mean squared error over the batch and the target dimensions). ``reduction`` says what is
    returned:

    - ``"mean"``: L_KD, a scalar, for (B, D) inputs;
    - ``"per_sample"``: the (B,) losses 1/D sum_d (f(x)_bd - z_bd)^2 of each image;
    - ``"per_member"``: for E stacked students, (E, B, D) inputs -> the (E,) losses L_KD of each
      member on its own batch (their sum gives every member exactly its own gradient).

    Outputs are compared in the targets' dtype (a bfloat16 forward pass is scored in float32).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in KD_REDUCTIONS:
            raise ValueError(f"KDLoss reduction must be one of {', '.join(KD_REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dims = 3 if self.reduction == "per_member" else 2
        if outputs.dim() != dims or outputs.shape != targets.shape:
            raise ValueError(
                f"KDLoss({self.reduction!r}) takes outputs and targets of one shape with "
                f"{dims} dims, got {tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        outputs = outputs.to(targets.dtype)
        if self.reduction == "mean":
            return F.mse_loss(outputs, targets)
        if self.reduction == "per_sample":
            return (outputs - targets).pow(2).mean(dim=1)
        return (outputs - targets).pow(2).mean(dim=(1, 2))


def matching_distance(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The trajectory-matching loss L_DD of B segments, averaged over them.

    For parameter vectors of B segments (all (B, P)): where the synthetic steps ended, theta_N;
    the expert's start, theta*_s; and its target, theta*_{s+M},

        L_DD = 1/B sum_b ||theta_N,b - theta*_{s+M},b||^2 / ||theta*_s,b - theta*_{s+M},b||^2

    (squared Euclidean norms over every parameter, the head included). 1 when theta_N = theta*_s.
    """
    return ((theta - target).pow(2).sum(1) / (start - target).pow(2).sum(1)).mean()
