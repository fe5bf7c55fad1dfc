"""A Monte Carlo check of the paper's Theorem 4.1: Var(grad_W L_SSL(B)) > Var(grad_W L_SL(B)).

Setting (paper §4.1 and Appendix C). Two-class sparse-coding data in R^d (d >= 2): a label
y in {0, 1} and x = e_y + eps, eps ~ N(0, sigma_N I), where e_0, e_1 are the first two standard
basis vectors and sigma_N I is the noise *covariance* as the paper writes it (per-coordinate
variance sigma_N, standard deviation sqrt(sigma_N)). The model is f(x) = W x with W (d, d)
evaluated at W = I. For a mini-batch B = {(x_i, y_i)}, i = 1..b (the theorem takes b = 2):

    L_SL(W; B)  = (1/b) sum_i ||W x_i - e_{y_i}||^2
    grad_SL     = (2/b) sum_i (W x_i - e_{y_i}) x_i^T                  (= (2/b) sum_i eps_i x_i^T at I)

    L_SSL(W; B) = -2 (1/b) sum_i E_{x1, x2 ~ A(x_i)}[f(x1)^T f(x2)] + (1/b^2) sum_{i, j} (f(x_i)^T f(x_j))^2
                = -2 Tr(A M) + Tr(M A M A),      A = W^T W,  M = (1/b) sum_i x_i x_i^T
    grad_SSL    = -4 W M + 4 W M A M                                   (= -4 M + 4 M^2 at I)

with the augmentation A(x) = x + xi, xi ~ N(0, sigma_aug I) (sigma_aug = 1 in the theorem). The two
views x1, x2 of x_i are independent, so E[x1^T A x2] = x_i^T A x_i exactly, and the second term
runs over all b^2 ordered pairs of clean examples of B, i = j included, as Theorem 4.1 writes it.
This is exactly the loss whose gradient Appendix C uses (``-4M + 4M^2`` after its m -> inf limit);
the augmentation noise drops out of it, so its gradient varies only with the batch.

Because Appendix D (eq. 56) puts the second term on augmented views instead, and SGD in practice
sees one draw of the augmentations rather than their expectation, a second SSL loss is computed
on the same batches ("sampled augmentations"): two views a_i = x_i + xi_i, a'_i = x_i + xi'_i per
example, and with V = {a_1..a_b, a'_1..a'_b} (2b views)

    L_SSL~(W; B, xi) = -2 (1/b) sum_i f(a_i)^T f(a'_i) + (1/(2b)^2) sum_{u, v in V} (f(u)^T f(v))^2
                     = -2 Tr(A C) + Tr(M_V A M_V A),
                       C = (1/(2b)) sum_i (a_i a'_i^T + a'_i a_i^T),  M_V = (1/(2b)) sum_{v in V} v v^T
    grad_SSL~        = -4 W C + 4 W M_V A M_V                          (= -4 C + 4 M_V^2 at I)

E[C] = M, but E[M_V] = M + sigma_aug I: the proof's step "M = M~ as m -> inf" drops this I, so
this variant is not an unbiased draw of the theorem's loss; it is reported beside it, not in its
place. The pairs u = v are kept, so that the second term is the trace form the proof uses.

Mini-batches. The proof takes n -> inf ("n/2 / n ~ (n/2 - 1) / n"), so the b examples of a batch
are independent: y_i ~ Bernoulli(1/2) (n/2 examples per class), fresh noise eps_i. The variance
is the total one over the batch (labels and noise) and, for the sampled variant, the augmentations:

    Var(g) = E ||g - E g||_F^2,   estimated from S batches g_1..g_S by
    V^ = (1/(S-1)) sum_s ||g_s - g_bar||_F^2,  SE(V^) = std_s(||g_s - g_bar||^2) / sqrt(S)

(the delta method, ignoring g_bar's own O(1/S) error). All losses share the same batches, so the
ratio R = V^_SSL / V^_SL gets the paired delta-method error SE(R) = std_s(z_SSL,s - R z_SL,s) /
(sqrt(S) mean_s z_SL,s) with z_s = ||g_s - g_bar||^2. For the supervised loss the exact value is

    Var(grad_SL) = (4/b) (d sigma_N + d (d + 1) sigma_N^2)

(per example h = eps x^T: E||h||^2 = d s + (d^2 + 2d) s^2 and ||E h||^2 = ||s I||^2 = d s^2), which
the table prints beside the estimate as a check. As sigma_N -> 0, Var(grad_SSL) -> 32 Var(p q)
with p = k/b, q = 1 - p, k ~ Binomial(b, 1/2) (1/2 for b = 2): the SSL gradient depends on the
batch's class mix even without noise, while Var(grad_SL) -> 0.

Gradients are in closed form (float64, batched over the S draws; the tests compare them with
autograd of the losses written out), S batches per grid point drawn from a torch.Generator seeded
with ``derive_seed(seed, "theorem", b, d, sigma_N)``, so every grid point is reproducible alone.

``mkdt analyze theorem`` runs a grid over d, sigma_N and b and writes ``OUT/theorem.md`` (the
table), ``OUT/theorem.json`` (the numbers) and ``OUT/theorem.png`` (ratio against d, one line per
sigma_N, log y).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mkdt.errors import ConfigError, MkdtError
from mkdt.files import atomic_path, write_json, write_text
from mkdt.runtime import derive_seed, generator, progress

SUMMARY = "Monte Carlo check of Theorem 4.1: Var(grad SSL) > Var(grad SL) for a linear model (no run needed)"
NEEDS_RUN = False

DTYPE = torch.float64
LOSSES = ("sl", "ssl", "ssl_sampled")
DEFAULT_DIMS = (2, 4, 8, 16, 32)
DEFAULT_NOISE = (0.1, 0.5, 1.0)
DEFAULT_BATCH_SIZES = (2,)
DEFAULT_SAMPLES = 40_000
# per chunk of the gradient computation: about this many float64 entries per (S, d, d) tensor
_CHUNK_ENTRIES = 1 << 20
# the stored draws (x and two views: 3 * S * b * d entries) may not exceed this
_MAX_DRAW_ENTRIES = 1 << 27
# |ratio - 1| / SE beyond which the inequality counts as decided
_DECISIVE_SE = 3.0


@dataclass(frozen=True)
class Batches:
    """S mini-batches of b examples in R^d: ``x`` (S, b, d), ``y`` (S, b) labels in {0, 1}, and
    two augmented views ``view1``, ``view2`` (S, b, d) of every example."""

    x: torch.Tensor
    y: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])


def draw_batches(
    samples: int,
    batch_size: int,
    dim: int,
    noise: float,
    gen: torch.Generator,
    aug_noise: float = 1.0,
) -> Batches:
    """S = ``samples`` independent batches: y ~ Bernoulli(1/2), x = e_y + eps with eps ~ N(0, noise I),
    views x + xi with xi ~ N(0, aug_noise I) (``noise`` and ``aug_noise`` are variances)."""
    y = torch.randint(0, 2, (samples, batch_size), generator=gen)
    eps = torch.randn(samples, batch_size, dim, generator=gen, dtype=DTYPE) * math.sqrt(noise)
    x = torch.nn.functional.one_hot(y, dim).to(DTYPE) + eps
    xi = torch.randn(2, samples, batch_size, dim, generator=gen, dtype=DTYPE) * math.sqrt(aug_noise)
    return Batches(x=x, y=y, view1=x + xi[0], view2=x + xi[1])


# ------------------------------------------------------------------ losses (one batch, any W)


def sl_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_SL(W; B) = (1/b) sum_i ||W x_i - e_{y_i}||^2 for one batch x (b, d), y (b,)."""
    target = torch.nn.functional.one_hot(y, x.shape[-1]).to(x.dtype)
    return (x @ w.T - target).pow(2).sum(-1).mean()


def ssl_loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Theorem 4.1's L_SSL(W; B) = -(2/b) sum_i ||W x_i||^2 + (1/b^2) sum_{i,j} ((W x_i)^T (W x_j))^2,
    the expectation over the two augmentations taken exactly."""
    z = x @ w.T
    return -2 * z.pow(2).sum(-1).mean() + (z @ z.T).pow(2).mean()


def ssl_loss_sampled(w: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
    """L_SSL~(W; B, xi) = -(2/b) sum_i f(a_i)^T f(a'_i) + mean over all (2b)^2 ordered pairs of views
    (u, v) of (f(u)^T f(v))^2, for one batch of views (b, d) each."""
    z1, z2 = view1 @ w.T, view2 @ w.T
    z = torch.cat([z1, z2])
    return -2 * (z1 * z2).sum(-1).mean() + (z @ z.T).pow(2).mean()


# ------------------------------------------------------------------ gradients (batched, closed form)


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    """(1/b) sum_i x_i x_i^T for x (S, b, d) -> (S, d, d)."""
    return x.transpose(1, 2) @ x / x.shape[1]


def _ssl_form(c: torch.Tensor, m: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """-4 W C + 4 W M W^T W M for batched symmetric C, M (S, d, d); W = I when ``w`` is None."""
    if w is None:
        return -4 * c + 4 * m @ m
    a = w.T @ w
    return -4 * w @ c + 4 * w @ m @ a @ m


def sl_gradient(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """grad_W L_SL = (2/b) sum_i (W x_i - e_{y_i}) x_i^T for x (S, b, d), y (S, b) -> (S, d, d)."""
    target = torch.nn.functional.one_hot(y, x.shape[-1]).to(x.dtype)
    residual = (x if w is None else x @ w.T) - target
    return 2 * residual.transpose(1, 2) @ x / x.shape[1]


def ssl_gradient(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """grad_W L_SSL = -4 W M + 4 W M W^T W M, M = (1/b) sum_i x_i x_i^T, for x (S, b, d)."""
    m = _second_moment(x)
    return _ssl_form(m, m, w)


def ssl_gradient_sampled(
    view1: torch.Tensor, view2: torch.Tensor, w: torch.Tensor | None = None
) -> torch.Tensor:
    """grad_W L_SSL~ = -4 W C + 4 W M_V W^T W M_V for views (S, b, d) each (see the module doc)."""
    cross = view1.transpose(1, 2) @ view2 / view1.shape[1]
    c = (cross + cross.transpose(1, 2)) / 2
    m_v = _second_moment(torch.cat([view1, view2], dim=1))
    return _ssl_form(c, m_v, w)


def gradients(batches: Batches, loss: str, w: torch.Tensor | None = None) -> torch.Tensor:
    """The gradients (S, d, d) of ``loss`` (one of :data:`LOSSES`) on every batch."""
    if loss == "sl":
        return sl_gradient(batches.x, batches.y, w)
    if loss == "ssl":
        return ssl_gradient(batches.x, w)
    if loss == "ssl_sampled":
        return ssl_gradient_sampled(batches.view1, batches.view2, w)
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")


# ------------------------------------------------------------------ variance estimates


def deviations(batches: Batches, loss: str, chunk: int | None = None) -> torch.Tensor:
    """z_s = ||g_s - g_bar||_F^2 (S,) for the gradients g_s of ``loss`` at W = I, computed in chunks
    of ``chunk`` batches (two passes: the mean, then the deviations), so memory stays O(chunk d^2)."""
    samples, dim = batches.samples, int(batches.x.shape[-1])
    chunk = chunk or max(1, _CHUNK_ENTRIES // (dim * dim))

    def chunk_gradients(start: int) -> torch.Tensor:
        part = Batches(
            *(t[start : start + chunk] for t in (batches.x, batches.y, batches.view1, batches.view2))
        )
        return gradients(part, loss)

    total = torch.zeros(dim, dim, dtype=DTYPE)
    for start in range(0, samples, chunk):
        total += chunk_gradients(start).sum(0)
    mean = total / samples
    z = torch.empty(samples, dtype=DTYPE)
    for start in range(0, samples, chunk):
        z[start : start + chunk] = (chunk_gradients(start) - mean).pow(2).sum((1, 2))
    return z


def variance(z: torch.Tensor) -> tuple[float, float]:
    """(V^, SE(V^)) from the deviations z_s = ||g_s - g_bar||^2: V^ = sum z / (S - 1)."""
    samples = z.numel()
    scale = samples / (samples - 1)
    return float(z.mean()) * scale, float(z.std()) / math.sqrt(samples) * scale


def ratio(z_num: torch.Tensor, z_den: torch.Tensor) -> tuple[float, float]:
    """(R, SE(R)) for R = V^_num / V^_den from paired deviations (same batches), delta method."""
    r = float(z_num.mean() / z_den.mean())
    influence = (z_num - r * z_den) / z_den.mean()
    return r, float(influence.std()) / math.sqrt(z_num.numel())


def exact_sl_variance(dim: int, noise: float, batch_size: int) -> float:
    """Var(grad_W L_SL) at W = I in closed form: (4/b) (d s + d (d + 1) s^2), s = sigma_N."""
    return 4 / batch_size * (dim * noise + dim * (dim + 1) * noise**2)


def _verdict(r: float, se: float) -> str:
    """'yes' if Var(SSL) > Var(SL) by more than 3 SE of the ratio, 'NO' if below by as much."""
    if se == 0 or not math.isfinite(se):
        return "yes" if r > 1 else "NO"
    score = (r - 1) / se
    return "yes" if score > _DECISIVE_SE else "NO" if score < -_DECISIVE_SE else "unclear"


def estimate_point(
    dim: int,
    noise: float,
    batch_size: int = 2,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    aug_noise: float = 1.0,
) -> dict[str, Any]:
    """Var(grad SL), Var(grad SSL) (theorem form), Var(grad SSL~) (sampled augmentations) at W = I
    with their standard errors, the ratios SSL/SL and the exact Var(grad SL), for one grid point.

    The batches come from ``derive_seed(seed, "theorem", batch_size, dim, noise)``, so the result
    depends on the seed and this point only."""
    gen = generator(derive_seed(seed, "theorem", batch_size, dim, noise), torch.device("cpu"))
    batches = draw_batches(samples, batch_size, dim, noise, gen, aug_noise)
    z = {loss: deviations(batches, loss) for loss in LOSSES}
    point: dict[str, Any] = {
        "batch_size": batch_size,
        "dim": dim,
        "noise": noise,
        "samples": samples,
        "var_sl_exact": exact_sl_variance(dim, noise, batch_size),
    }
    for loss in LOSSES:
        point[f"var_{loss}"], point[f"var_{loss}_se"] = variance(z[loss])
    for loss in ("ssl", "ssl_sampled"):
        r, se = ratio(z[loss], z["sl"])
        point[f"ratio_{loss}"], point[f"ratio_{loss}_se"] = r, se
        point[f"holds_{loss}"] = _verdict(r, se)
    return point


def run_grid(
    dims: Sequence[int],
    noises: Sequence[float],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    aug_noise: float = 1.0,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """:func:`estimate_point` for every (batch size, d, sigma_N), in that order."""
    grid = [(b, d, s) for b in batch_sizes for d in dims for s in noises]
    bar = progress(grid, disable=not show_progress, desc="theorem", unit="point")
    points = []
    for b, d, s in bar:
        bar.set_postfix(b=b, d=d, sigma_N=s)
        points.append(estimate_point(d, s, b, samples, seed, aug_noise))
    return points


# ------------------------------------------------------------------ table and plot


def _pm(value: float, se: float) -> str:
    return f"{value:.4g} ± {se:.2g}"


def format_table(points: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per grid point."""
    head = (
        "| b | d | sigma_N | Var(SL) exact | Var(SL) | Var(SSL) | Var(SSL)/Var(SL) | holds "
        "| Var(SSL~) | Var(SSL~)/Var(SL) | holds~ |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        lines.append(
            f"| {p['batch_size']} | {p['dim']} | {p['noise']:g} | {p['var_sl_exact']:.4g} "
            f"| {_pm(p['var_sl'], p['var_sl_se'])} | {_pm(p['var_ssl'], p['var_ssl_se'])} "
            f"| {_pm(p['ratio_ssl'], p['ratio_ssl_se'])} | {p['holds_ssl']} "
            f"| {_pm(p['var_ssl_sampled'], p['var_ssl_sampled_se'])} "
            f"| {_pm(p['ratio_ssl_sampled'], p['ratio_ssl_sampled_se'])} | {p['holds_ssl_sampled']} |"
        )
    return "\n".join(lines)


def _count(points: Sequence[dict[str, Any]], loss: str) -> str:
    held = sum(p[f"holds_{loss}"] == "yes" for p in points)
    failed = sum(p[f"holds_{loss}"] == "NO" for p in points)
    return f"holds at {held}/{len(points)} points, fails at {failed} (by > {_DECISIVE_SE:g} SE)"


def plot(points: Sequence[dict[str, Any]], path: Path) -> None:
    """``path``: Var(SSL)/Var(SL) against d (log-log), one line per sigma_N (line style per batch
    size), error bars of 2 SE; left the theorem's loss, right the sampled augmentations."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MkdtError("theorem.png needs matplotlib (pip install matplotlib)") from None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    noises = sorted({p["noise"] for p in points})
    batch_sizes = sorted({p["batch_size"] for p in points})
    styles = ["-", "--", ":", "-."]
    colors = [f"C{i % 10}" for i in range(len(noises))]
    titles = {"ssl": "Theorem 4.1's SSL loss", "ssl_sampled": "SSL loss, sampled augmentations"}
    for ax, loss in zip(axes, ("ssl", "ssl_sampled"), strict=True):
        for b_index, b in enumerate(batch_sizes):
            for color, s in zip(colors, noises, strict=True):
                rows = sorted(
                    (p for p in points if p["noise"] == s and p["batch_size"] == b), key=lambda p: p["dim"]
                )
                label = f"sigma_N={s:g}" + (f", b={b}" if len(batch_sizes) > 1 else "")
                ax.errorbar(
                    [p["dim"] for p in rows],
                    [p[f"ratio_{loss}"] for p in rows],
                    yerr=[2 * p[f"ratio_{loss}_se"] for p in rows],
                    color=color,
                    linestyle=styles[b_index % len(styles)],
                    marker="o",
                    markersize=4,
                    capsize=2,
                    label=label,
                )
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        dims = sorted({p["dim"] for p in points})
        ax.set_xticks(dims, labels=[str(d) for d in dims])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("dimension d")
        ax.set_title(titles[loss])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("Var(grad SSL) / Var(grad SL) at W = I")
    axes[0].legend(fontsize=8)
    fig.suptitle("Theorem 4.1: ratio > 1 (dotted line) means SSL gradients vary more (error bars: 2 SE)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _markdown(points: Sequence[dict[str, Any]], settings: dict[str, Any], table: str) -> str:
    return "\n".join(
        [
            "# Theorem 4.1: Var(grad SSL) vs Var(grad SL) at W = I",
            "",
            "Data x = e_y + eps, eps ~ N(0, sigma_N I) (sigma_N is the per-coordinate variance), "
            "y ~ Bernoulli(1/2); f(x) = W x at W = I; b examples per batch drawn independently "
            f"(n -> inf). {settings['samples']} batches per grid point, seed {settings['seed']}, "
            f"augmentation noise N(0, sigma_aug I) with sigma_aug = {settings['aug_noise']:g}.",
            "",
            "- SL: (1/b) sum_i ||W x_i - e_{y_i}||^2; exact Var = (4/b)(d s + d(d+1) s^2).",
            "- SSL (the theorem's loss): -2 mean_i E_aug[f(x1)^T f(x2)] "
            "+ mean_{i,j in B} (f(x_i)^T f(x_j))^2, the augmentation expectation exact; "
            "grad at I = -4M + 4M^2, M = mean_i x_i x_i^T.",
            "- SSL~ (sampled augmentations): one pair of views per example, the second term over all "
            "(2b)^2 pairs of views; grad at I = -4C + 4M_V^2.",
            "- Var(g) = E||g - E g||_F^2 over batches (and augmentations); ± is one Monte Carlo standard "
            f"error; holds = ratio - 1 beyond {_DECISIVE_SE:g} SE (yes / NO / unclear).",
            "",
            table,
            "",
            f"SSL (theorem's loss): {_count(points, 'ssl')}.  ",
            f"SSL~ (sampled augmentations): {_count(points, 'ssl_sampled')}.",
            "",
        ]
    )


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mkdt analyze theorem``."""
    grid = (
        ("--dims", "dims", int, DEFAULT_DIMS, "D", "dimensions d >= 2"),
        (
            "--noise",
            "noise",
            float,
            DEFAULT_NOISE,
            "SIGMA_N",
            "noise levels sigma_N > 0, the variance of each coordinate of eps ~ N(0, sigma_N I)",
        ),
        (
            "--batch-size",
            "batch_sizes",
            int,
            DEFAULT_BATCH_SIZES,
            "B",
            "mini-batch sizes b >= 1 (2 in the theorem)",
        ),
    )
    for flag, dest, kind, default, metavar, text in grid:
        shown = " ".join(map(str, default))
        parser.add_argument(
            flag,
            dest=dest,
            type=kind,
            nargs="+",
            default=list(default),
            metavar=metavar,
            help=f"{text} (default: {shown})",
        )
    parser.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"Monte Carlo batches per grid point, >= 10 (default: {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--aug-noise",
        type=float,
        default=1.0,
        metavar="SIGMA_AUG",
        help="variance of the augmentation noise N(0, sigma_aug I) (default: 1, as in the theorem)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: 0)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default="runs/analysis",
        help="folder for theorem.md, theorem.json, theorem.png (default: runs/analysis)",
    )


def _check(args: argparse.Namespace) -> None:
    """ConfigError (one line) for an option out of range."""
    if any(d < 2 for d in args.dims):
        raise ConfigError(f"--dims must all be >= 2 (e_0 and e_1 need two dimensions), got {args.dims}")
    if any(not (math.isfinite(s) and s > 0) for s in args.noise):
        raise ConfigError(f"--noise values must be finite and > 0, got {args.noise}")
    if any(b < 1 for b in args.batch_sizes):
        raise ConfigError(f"--batch-size values must be >= 1, got {args.batch_sizes}")
    if args.samples < 10:
        raise ConfigError(f"--samples must be >= 10, got {args.samples}")
    if not (math.isfinite(args.aug_noise) and args.aug_noise >= 0):
        raise ConfigError(f"--aug-noise must be finite and >= 0, got {args.aug_noise}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    entries = 3 * args.samples * max(args.batch_sizes) * max(args.dims)
    if entries > _MAX_DRAW_ENTRIES:
        raise ConfigError(
            f"--samples {args.samples} with b = {max(args.batch_sizes)} and d = {max(args.dims)} needs "
            f"{entries * 8 / 2**30:.1f} GiB of draws; lower --samples"
        )


def main(args: argparse.Namespace, config: None) -> None:
    """Validate the options, run the grid, print the table and write OUT/theorem.{md,json,png}."""
    _check(args)
    dims = sorted(set(args.dims))
    noises = sorted(set(args.noise))
    batch_sizes = sorted(set(args.batch_sizes))
    out = Path(args.out)
    start = time.perf_counter()
    points = run_grid(dims, noises, batch_sizes, args.samples, args.seed, args.aug_noise)
    seconds = time.perf_counter() - start
    settings = {
        "dims": dims,
        "noise": noises,
        "batch_sizes": batch_sizes,
        "samples": args.samples,
        "seed": args.seed,
        "aug_noise": args.aug_noise,
    }
    table = format_table(points)
    write_text(out / "theorem.md", _markdown(points, settings, table))
    write_json(
        out / "theorem.json",
        {
            "analysis": "theorem",
            "settings": settings,
            "seconds": round(seconds, 2),
            "summary": {loss: _count(points, loss) for loss in ("ssl", "ssl_sampled")},
            "points": points,
        },
    )
    plot(points, out / "theorem.png")
    print(table)
    print(f"SSL (theorem's loss): {_count(points, 'ssl')}")
    print(f"SSL~ (sampled augmentations): {_count(points, 'ssl_sampled')}")
    print(f"wrote {out / 'theorem.md'}, {out / 'theorem.json'}, {out / 'theorem.png'} ({seconds:.1f} s)")
