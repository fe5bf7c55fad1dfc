"""The linear probe against scikit-learn, its scaling and its label checks."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mkdt.train.probe import fit_logistic, linear_probe, logistic_objective, standardiser


def blobs(n: int, d: int, k: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(99)) * spread
    y = torch.randint(0, k, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


@pytest.fixture(scope="module")
def problem():
    train_x, train_y = blobs(800, 64, 10, 0.35, seed=0)
    test_x, test_y = blobs(1000, 64, 10, 0.35, seed=1)
    return train_x, train_y, test_x, test_y


def test_matches_sklearn(problem):
    train_x, train_y, test_x, test_y = problem
    l2, n = 1e-3, len(train_y)
    acc = linear_probe(train_x, train_y, test_x, test_y, l2=l2)
    w, b, mean, std = fit_logistic(train_x, train_y, num_classes=10, l2=l2)

    z_train = ((train_x.double() - mean) / std).numpy()
    z_test = ((test_x.double() - mean) / std).numpy()
    ref = LogisticRegression(C=1 / (2 * l2 * n), max_iter=1000, tol=1e-10)
    ref.fit(z_train, train_y.numpy())
    ref_acc = ref.score(z_test, test_y.numpy())
    assert 0.3 < acc < 0.98  # not trivially separable: the comparison is informative
    assert abs(acc - ref_acc) <= 0.005

    ours = logistic_objective(torch.from_numpy(z_train), train_y, w, b, l2).item()
    ref_w, ref_b = torch.from_numpy(ref.coef_.T.copy()), torch.from_numpy(ref.intercept_.copy())
    theirs = logistic_objective(torch.from_numpy(z_train), train_y, ref_w, ref_b, l2).item()
    assert ours == pytest.approx(theirs, rel=1e-4)
    # softmax weights are defined up to a per-feature shift across classes; sklearn's are centred
    w_c = w - w.mean(dim=1, keepdim=True)
    assert torch.allclose(w_c, ref_w, atol=5e-3 * ref_w.abs().max().item())
    probs = torch.softmax(torch.from_numpy(z_test) @ w + b, dim=1).numpy()
    assert np.abs(probs - ref.predict_proba(z_test)).max() < 1e-2


def test_badly_scaled_features_do_not_collapse():
    train_x, train_y = blobs(500, 32, 10, 1.0, seed=2)
    test_x, test_y = blobs(500, 32, 10, 1.0, seed=3)
    clean = linear_probe(train_x, train_y, test_x, test_y)
    scale = torch.logspace(-2, 3, 32)
    bad = linear_probe(train_x * scale * 1e3 + 1e4, train_y, test_x * scale * 1e3 + 1e4, test_y)
    assert clean > 0.9 and bad == pytest.approx(clean, abs=1e-9)


def test_deterministic(problem):
    train_x, train_y, test_x, test_y = problem
    runs = [linear_probe(train_x, train_y, test_x, test_y, max_iter=30) for _ in range(2)]
    assert runs[0] == runs[1]
    w1 = fit_logistic(train_x, train_y, num_classes=10, max_iter=30)[0]
    w2 = fit_logistic(train_x, train_y, num_classes=10, max_iter=30)[0]
    assert torch.equal(w1, w2)


def test_label_validation(problem):
    train_x, train_y, test_x, test_y = problem
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(train_x, train_y, test_x, test_y, num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(train_x, train_y, test_x, test_y.clone().fill_(10), num_classes=10)
    with pytest.raises(ValueError, match="integer"):
        linear_probe(train_x, train_y.float(), test_x, test_y)
    with pytest.raises(ValueError, match="dimension"):
        linear_probe(train_x, train_y, test_x[:, :5], test_y)


def test_works_under_no_grad_and_with_constant_features():
    train_x, train_y = blobs(200, 8, 3, 2.0, seed=4)
    test_x, test_y = blobs(200, 8, 3, 2.0, seed=5)
    const = lambda x: torch.cat([x, torch.full((len(x), 1), 7.0)], dim=1)  # noqa: E731
    with torch.no_grad():
        acc = linear_probe(const(train_x), train_y, const(test_x), test_y)
    assert acc > 0.9
    mean, std = standardiser(const(train_x))
    assert std[-1] == 1 and mean[-1] == 7
