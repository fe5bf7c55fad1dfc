"""``mkdt analyze theorem``: the closed-form gradients against autograd of the losses written out
with loops, the vectorised variance estimator against a brute-force loop on the same draws, exact
values (Var(grad SL) in closed form, the zero-noise limit of Var(grad SSL)), the inequality of
Theorem 4.1, determinism, option errors and the three files written."""

import argparse
import json
import math

import pytest
import torch

from mkdt.analysis import theorem
from mkdt.cli import main as cli_main
from mkdt.errors import ConfigError
from mkdt.runtime import derive_seed, generator

F64 = torch.float64


# ---------------------------------------------------------------- the losses written out, one batch


def _onehot(y: int, dim: int) -> torch.Tensor:
    e = torch.zeros(dim, dtype=F64)
    e[y] = 1.0
    return e


def sl_loop(w, x, y):
    """(1/b) sum_i ||W x_i - e_{y_i}||^2."""
    b, d = x.shape
    return sum(((w @ x[i] - _onehot(int(y[i]), d)) ** 2).sum() for i in range(b)) / b


def ssl_loop(w, x):
    """-2 (1/b) sum_i E_aug[f(x1)^T f(x2)] + (1/b^2) sum_{i,j} (f(x_i)^T f(x_j))^2, with
    E_aug[f(x1)^T f(x2)] = f(x_i)^T f(x_i) for independent zero-mean augmentations."""
    b = x.shape[0]
    f = [w @ x[i] for i in range(b)]
    positive = sum(f[i] @ f[i] for i in range(b)) / b
    negative = sum((f[i] @ f[j]) ** 2 for i in range(b) for j in range(b)) / b**2
    return -2 * positive + negative


def ssl_sampled_loop(w, v1, v2):
    """-2 (1/b) sum_i f(a_i)^T f(a'_i) + (1/(2b)^2) sum over ordered pairs of the 2b views."""
    b = v1.shape[0]
    positive = sum((w @ v1[i]) @ (w @ v2[i]) for i in range(b)) / b
    views = [w @ v for v in [*v1, *v2]]
    negative = sum((u @ v) ** 2 for u in views for v in views) / (2 * b) ** 2
    return -2 * positive + negative


def _loop_gradient(loss, batches, s, w):
    """grad_W of the loop-written ``loss`` on batch s, by autograd."""
    w = w.clone().requires_grad_(True)
    if loss == "sl":
        value = sl_loop(w, batches.x[s], batches.y[s])
    elif loss == "ssl":
        value = ssl_loop(w, batches.x[s])
    else:
        value = ssl_sampled_loop(w, batches.view1[s], batches.view2[s])
    (grad,) = torch.autograd.grad(value, w)
    return grad


def _batches(samples, batch_size, dim, noise, seed=0, aug_noise=1.0):
    return theorem.draw_batches(
        samples, batch_size, dim, noise, generator(seed, torch.device("cpu")), aug_noise
    )


# ---------------------------------------------------------------- gradients and losses


@pytest.mark.parametrize("loss", theorem.LOSSES)
@pytest.mark.parametrize("batch_size", [2, 3])
def test_closed_form_gradients_match_autograd(loss, batch_size):
    batches = _batches(6, batch_size, 3, 0.5, seed=1)
    w_random = torch.eye(3, dtype=F64) + 0.3 * torch.randn(
        3, 3, generator=generator(2, torch.device("cpu")), dtype=F64
    )
    for w in (None, w_random):
        closed = theorem.gradients(batches, loss, w)
        assert closed.shape == (6, 3, 3) and closed.dtype == F64
        at = torch.eye(3, dtype=F64) if w is None else w
        for s in range(6):
            torch.testing.assert_close(
                closed[s], _loop_gradient(loss, batches, s, at), rtol=1e-10, atol=1e-10
            )


def test_sampled_form_without_augmentation_noise_is_the_theorem_form():
    batches = _batches(5, 3, 4, 0.5, seed=6, aug_noise=0.0)
    torch.testing.assert_close(theorem.gradients(batches, "ssl_sampled"), theorem.gradients(batches, "ssl"))


def test_module_losses_equal_the_written_out_losses():
    batches = _batches(4, 3, 4, 0.5, seed=3)
    w = torch.randn(4, 4, generator=generator(4, torch.device("cpu")), dtype=F64)
    for s in range(4):
        x, y, v1, v2 = batches.x[s], batches.y[s], batches.view1[s], batches.view2[s]
        torch.testing.assert_close(theorem.sl_loss(w, x, y), sl_loop(w, x, y))
        torch.testing.assert_close(theorem.ssl_loss(w, x), ssl_loop(w, x))
        torch.testing.assert_close(theorem.ssl_loss_sampled(w, v1, v2), ssl_sampled_loop(w, v1, v2))


def test_augmentation_expectation_of_the_positive_term_is_exact():
    """The theorem form replaces E_{x1,x2 ~ A(x)}[f(x1)^T f(x2)] by ||W x||^2: check it by Monte
    Carlo over 200k pairs of N(0, I) augmentations (tolerance 5 standard errors)."""
    gen = generator(5, torch.device("cpu"))
    x = torch.tensor([1.0, 0.2, -0.4], dtype=F64)
    w = torch.eye(3, dtype=F64) + 0.5 * torch.randn(3, 3, generator=gen, dtype=F64)
    x1 = x + torch.randn(200_000, 3, generator=gen, dtype=F64)
    x2 = x + torch.randn(200_000, 3, generator=gen, dtype=F64)
    products = ((x1 @ w.T) * (x2 @ w.T)).sum(-1)
    se = float(products.std()) / math.sqrt(products.numel())
    assert abs(float(products.mean()) - float((w @ x) @ (w @ x))) < 5 * se


# ---------------------------------------------------------------- the estimator


@pytest.mark.parametrize("loss", theorem.LOSSES)
def test_estimator_equals_brute_force_loop_on_the_same_draws(loss):
    """d = 2, b = 2, S = 300 batches: per-batch autograd gradients in a Python loop and their sample
    variance (1/(S-1)) sum ||g_s - g_bar||^2 equal the vectorised estimator (chunks of 7 batches)."""
    samples, batch_size, dim, noise = 300, 2, 2, 0.5
    batches = _batches(samples, batch_size, dim, noise, seed=7)
    eye = torch.eye(dim, dtype=F64)
    grads = torch.stack([_loop_gradient(loss, batches, s, eye) for s in range(samples)])
    z = (grads - grads.mean(0)).pow(2).sum((1, 2))
    brute = float(z.sum()) / (samples - 1)
    brute_se = float(z.std()) / math.sqrt(samples) * samples / (samples - 1)
    value, se = theorem.variance(theorem.deviations(batches, loss, chunk=7))
    assert value == pytest.approx(brute, rel=1e-10) and se == pytest.approx(brute_se, rel=1e-8)
    # estimate_point draws its batches from derive_seed(seed, "theorem", b, d, sigma_N)
    point = theorem.estimate_point(dim, noise, batch_size, samples, seed=11)
    again = _batches(samples, batch_size, dim, noise, seed=derive_seed(11, "theorem", batch_size, dim, noise))
    grads = torch.stack([_loop_gradient(loss, again, s, eye) for s in range(samples)])
    expected = float((grads - grads.mean(0)).pow(2).sum()) / (samples - 1)
    assert point[f"var_{loss}"] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("dim", "noise", "batch_size"), [(4, 0.5, 2), (8, 0.1, 3)])
def test_supervised_variance_matches_its_closed_form(dim, noise, batch_size):
    point = theorem.estimate_point(dim, noise, batch_size, samples=20_000, seed=0)
    exact = theorem.exact_sl_variance(dim, noise, batch_size)
    assert exact == point["var_sl_exact"]
    assert abs(point["var_sl"] - exact) < 4 * point["var_sl_se"]


@pytest.mark.parametrize("batch_size", [2, 4])
def test_ssl_variance_without_noise_comes_from_the_class_mix(batch_size):
    """sigma_N -> 0: grad_SSL = -4 p q (e_0 e_0^T + e_1 e_1^T) with p = k/b, k ~ Binomial(b, 1/2), so
    Var = 32 Var(p q) (1/2 for b = 2), while Var(grad SL) -> 0."""
    pq = [(k / batch_size) * (1 - k / batch_size) for k in range(batch_size + 1)]
    prob = [math.comb(batch_size, k) / 2**batch_size for k in range(batch_size + 1)]
    mean = sum(p * v for p, v in zip(prob, pq, strict=True))
    exact = 32 * sum(p * (v - mean) ** 2 for p, v in zip(prob, pq, strict=True))
    point = theorem.estimate_point(4, 1e-10, batch_size, samples=4000, seed=0)
    assert abs(point["var_ssl"] - exact) < 4 * point["var_ssl_se"] + 1e-6
    assert point["var_sl"] < 1e-8


@pytest.mark.parametrize(("dim", "noise"), [(2, 0.1), (2, 1.0), (8, 0.5), (16, 0.1)])
def test_theorem_inequality_holds_beyond_the_monte_carlo_error(dim, noise):
    point = theorem.estimate_point(dim, noise, batch_size=2, samples=4000, seed=0)
    for loss in ("ssl", "ssl_sampled"):
        gap = point[f"var_{loss}"] - point["var_sl"]
        assert gap > 5 * (point[f"var_{loss}_se"] + point["var_sl_se"])
        assert point[f"ratio_{loss}"] - 1 > 5 * point[f"ratio_{loss}_se"]
        assert point[f"holds_{loss}"] == "yes"


def test_estimates_are_deterministic_per_seed():
    a = theorem.estimate_point(4, 0.5, 2, samples=500, seed=3)
    b = theorem.estimate_point(4, 0.5, 2, samples=500, seed=3)
    c = theorem.estimate_point(4, 0.5, 2, samples=500, seed=4)
    assert a == b
    assert a["var_ssl"] != c["var_ssl"] and a["var_sl"] != c["var_sl"]
    # a grid point does not depend on the rest of the grid
    grid = theorem.run_grid([2, 4], [0.1, 0.5], [2], samples=500, seed=3, show_progress=False)
    assert grid[3] == a


# ---------------------------------------------------------------- options and files


def _args(*argv):
    parser = argparse.ArgumentParser()
    theorem.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_follow_the_theorem():
    args = _args()
    assert args.batch_sizes == [2] and args.aug_noise == 1.0 and args.out == "runs/analysis"
    assert args.dims == [2, 4, 8, 16, 32] and args.noise == [0.1, 0.5, 1.0]
    assert theorem.NEEDS_RUN is False and "\n" not in theorem.SUMMARY


@pytest.mark.parametrize(
    "argv",
    [
        ["--dims", "1"],
        ["--dims", "4", "0"],
        ["--noise", "0"],
        ["--noise", "-0.5"],
        ["--noise", "nan"],
        ["--batch-size", "0"],
        ["--samples", "5"],
        ["--seed", "-1"],
        ["--aug-noise", "-1"],
        ["--samples", "100000000"],
    ],
)
def test_bad_options_raise_config_error(argv, tmp_path):
    with pytest.raises(ConfigError) as info:
        theorem.main(_args(*argv, "--out", str(tmp_path)), None)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def _check_outputs(out, stdout, points):
    data = json.loads((out / "theorem.json").read_text())
    assert data["analysis"] == "theorem" and len(data["points"]) == points
    assert {"var_sl", "var_ssl", "ratio_ssl", "ratio_ssl_se", "var_ssl_sampled"} <= set(data["points"][0])
    assert "Var(SSL)/Var(SL)" in (out / "theorem.md").read_text()
    assert (out / "theorem.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Var(SSL)/Var(SL)" in stdout and "holds at" in stdout


def test_main_writes_table_json_and_plot(tmp_path, capsys):
    args = _args("--dims", "2", "4", "--noise", "0.1", "1", "--batch-size", "2", "4", "--samples", "200")
    args.out = str(tmp_path / "analysis")
    theorem.main(args, None)
    _check_outputs(tmp_path / "analysis", capsys.readouterr().out, points=8)


def test_cli_writes_the_three_files(tmp_path, capsys):
    """Needs "theorem" in mkdt.cli.ANALYSES."""
    argv = [
        "analyze",
        "theorem",
        "--out",
        str(tmp_path),
        "--dims",
        "2",
        "3",
        "--noise",
        "0.5",
        "--samples",
        "100",
    ]
    assert cli_main(argv) == 0
    _check_outputs(tmp_path, capsys.readouterr().out, points=2)
    assert cli_main(["analyze", "theorem", "--out", str(tmp_path / "x"), "--noise", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mkdt: error: --noise") and err.count("\n") == 1


def test_unknown_loss_is_rejected():
    batches = _batches(2, 2, 2, 0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        theorem.gradients(batches, "barlow")
    assert theorem.LOSSES == ("sl", "ssl", "ssl_sampled")
