"""Linear probe: multinomial logistic regression on frozen features (docs/method.md §5).

Features are standardised with the training mean and standard deviation (a dimension whose std is
negligible relative to its mean is left unscaled), then W (D, C) and b (C,) minimise

    J(W, b) = (1/n) sum_i CE(softmax(W^T z_i + b), y_i) + l2 * ||W||_F^2        (b not penalised)

full batch with L-BFGS and a strong-Wolfe line search, which converges on this smooth, strongly
convex problem (the earlier public code used LBFGS with lr 1, no line search and raw features,
and sometimes collapsed to chance). The optimisation runs in float64 by default (``dtype``);
float32 halves the memory for very large feature matrices. This is the objective of scikit-learn's
``LogisticRegression(C=1 / (2 * l2 * n))`` with the multinomial loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_labels(y: torch.Tensor, num_classes: int, name: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} has labels in [{int(y.min())}, {int(y.max())}] but num_classes={num_classes}; "
            "labels must be integers in [0, num_classes)"
        )


def _check_xy(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{name}: features must be (n, D) and labels (n,) with n >= 1, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got {y.dtype}")


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (biased) of ``x``; std is 1 where the dimension is ~constant.

    A dimension counts as constant when std <= 1e-8 * (1 + |mean|), so it is centred but not
    blown up by a tiny divisor.
    """
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-8 * (1 + mean.abs()), std, torch.ones_like(std))
    return mean, std


def logistic_objective(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float
) -> torch.Tensor:
    """J(W, b) = mean_i CE(W^T z_i + b, y_i) + l2 * ||W||^2."""
    return F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the probe on (x, y); returns (W, b, mean, std), all in ``dtype`` on ``x``'s device.

    Predictions for new features x' are ``((x' - mean) / std) @ W + b``. W and b start at zero, so
    the fit is deterministic.
    """
    _check_xy(x, y, "train")
    if num_classes < 2 or l2 < 0 or max_iter < 1:
        raise ValueError(
            f"fit_logistic needs num_classes >= 2, l2 >= 0, max_iter >= 1, got "
            f"num_classes={num_classes}, l2={l2}, max_iter={max_iter}"
        )
    _check_labels(y, num_classes, "train labels")
    x, y = x.to(dtype), y.long()
    mean, std = standardiser(x)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logistic_objective(z, y, w, b, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    l2: float = 1e-3,
    max_iter: int = 100,
    device: torch.device | str | None = None,
) -> float:
    """Test accuracy in [0, 1] of a logistic-regression probe fitted on (train_x, train_y).

    ``num_classes`` defaults to 1 + the largest label in train or test; ``device`` defaults to
    ``train_x``'s device.
    """
    _check_xy(train_x, train_y, "train")
    _check_xy(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension: {train_x.shape[1]} vs {test_x.shape[1]}"
        )
    if num_classes is None:
        num_classes = max(int(train_y.max()), int(test_y.max())) + 1
    _check_labels(test_y, num_classes, "test labels")
    device = torch.device(device) if device is not None else train_x.device
    w, b, mean, std = fit_logistic(
        train_x.to(device),
        train_y.to(device),
        num_classes=num_classes,
        l2=l2,
        max_iter=max_iter,
    )
    logits = ((test_x.to(device, w.dtype) - mean) / std) @ w + b
    return (logits.argmax(dim=1) == test_y.to(device)).double().mean().item()
