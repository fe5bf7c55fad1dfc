"""Batch statistics over every rank of a torch.distributed job, differentiably.

So that N ranks with b images each train the same objective as one process with N * b images,
the teacher's batch normalisation and its SSL loss must see the global batch:
:func:`gather_batch` concatenates every rank's rows with an autograd-aware all-gather, and
:class:`GlobalBatchNorm` normalises with the mean and (biased) variance of the global batch,
computed from all-reduced sums. Outside a process group both are the plain operations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's rows; the gradient of each rank's rows is the sum over the
    ranks of the gradient that reached them there."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduce(torch.autograd.Function):
    """The sum over ranks; its gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated along dim 0 in rank order; the
    gradient flows back to each rank's own rows (summed over the ranks' copies of the loss)."""
    if not _active():
        return x
    gathered: torch.Tensor = _AllGather.apply(x)
    return gathered


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation with statistics of the global batch (training mode).

    With S = sum over ranks and positions of x and Q = the same of x^2 per channel and n the
    global count: mean = S / n, var = Q / n - mean^2, y = (x - mean) / sqrt(var + eps) * weight +
    bias; the running statistics are updated like BatchNorm's (unbiased variance). Same parameter
    and buffer names as the BatchNorm it replaces (:func:`globalise_batch_norms`), so state dicts
    are unchanged. In eval mode, or with one process, it is the BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) inputs, got {x.dim()} dims")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = _AllReduce.apply(stats)
        channels = x.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels : 2 * channels] / n - mean * mean
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        return y


def globalise_batch_norms(module: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm1d/2d of ``module`` by a :class:`GlobalBatchNorm` that
    shares its parameters and buffers; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, new)
        else:
            globalise_batch_norms(child)
    return module
