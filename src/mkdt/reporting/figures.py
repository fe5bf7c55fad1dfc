"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display, no global
pyplot state) and written as PNG files.

Images are given as (n, C, H, W) float tensors of pixels in [0, 1]; each is enlarged by an integer
factor with nearest-neighbour sampling to at least :data:`MIN_IMAGE_PX` pixels a side, and shown at
one figure pixel per image pixel, so 8x8 or 32x32 images stay legible and unblurred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mkdt.methods import method_label, method_order
from mkdt.results import fraction_label, protocol_of
from mkdt.train.matching import History

PROTOCOL_NAMES = {"probe": "linear probe", "finetune": "fine-tuning"}  # short, for panel titles
MIN_IMAGE_PX = 64
MAX_IMAGES = 36  # images shown per panel (a 6 x 6 grid)
DPI = 100
_PAD = 2  # pixels between images of a grid


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)


def shown(n: int) -> torch.Tensor:
    """The indices of the (at most :data:`MAX_IMAGES`) images a panel shows, evenly spread over n."""
    return torch.linspace(0, n - 1, min(n, MAX_IMAGES)).round().long().unique()


def enlarged(images: torch.Tensor) -> torch.Tensor:
    """``images`` (n, C, H, W) repeated by the smallest integer factor that makes H >= 64."""
    factor = max(1, math.ceil(MIN_IMAGE_PX / images.shape[-1]))
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_grid(images: torch.Tensor, pad_value: float = 1.0) -> torch.Tensor:
    """(H', W', 3) grid of :func:`enlarged` images, about square, ``_PAD`` pixels apart."""
    from torchvision.utils import make_grid

    per_row = math.ceil(math.sqrt(len(images)))
    grid = make_grid(enlarged(images), nrow=per_row, padding=_PAD, pad_value=pad_value)
    return grid.permute(1, 2, 0).clamp(0, 1)


def image_comparison(
    initial: torch.Tensor, distilled: torch.Tensor, path: Path, titles: Sequence[str]
) -> None:
    """Three panels at one figure pixel per grid pixel: the ``initial`` images, the ``distilled``
    ones at the same positions, and |distilled - initial| (mean over channels) scaled to its
    maximum. ``titles`` name the first two panels."""
    diff = (distilled - initial).abs().mean(1, keepdim=True)
    top = float(diff.max())
    panels = [image_grid(initial), image_grid(distilled), image_grid(diff / max(top, 1e-12), 0.0)[..., 0]]
    labels = [*titles, f"|distilled - initial| (max {top:.3f} = white)"]
    gh, gw = panels[0].shape[:2]
    margin, title_px = 10, 30
    width, height = 3 * gw + 4 * margin, gh + title_px + margin
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        ax = fig.add_axes(((margin + i * (gw + margin)) / width, margin / height, gw / width, gh / height))
        ax.imshow(panel.numpy(), interpolation="nearest", cmap="gray", vmin=0, vmax=1, aspect="auto")
        ax.set_axis_off()
        ax.set_title(label, fontsize=9)
    _save(fig, path)


def history_curves(history: History, path: Path) -> None:
    """The matching loss (with its running mean), alpha_syn and the mean pixel change from the
    initial set, per iteration, side by side."""
    its = list(range(1, len(history) + 1))
    fig = Figure(figsize=(12, 3.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    window = min(50, max(2, len(its) // 10))
    running = [
        sum(history.loss[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(its))
    ]
    axes[0].plot(its, history.loss, color="0.75", linewidth=0.8, label="per iteration")
    axes[0].plot(its, running, color="C0", label=f"running mean of {window}")
    axes[0].legend(fontsize=8)
    axes[1].plot(its, history.lr, color="C1")
    axes[2].plot(its, history.pixel_change, color="C2")
    titles = ("matching loss", "alpha_syn (learned step size)", "mean |pixel change| from the init (0-1)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    _save(fig, path)


def class_histogram(counts: dict[str, list[int]], classes: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars: for every class, how many images each subset in ``counts`` (name -> count
    per class) holds."""
    fig = Figure(figsize=(max(6.0, 0.35 * len(classes) * len(counts)), 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(counts)
    for i, (name, values) in enumerate(counts.items()):
        ax.bar(
            [c + (i - (len(counts) - 1) / 2) * width for c in range(len(classes))], values, width, label=name
        )
    rotation = 0 if len(classes) <= 5 else 45 if len(classes) <= 20 else 90
    ax.set_xticks(range(len(classes)), list(classes), rotation=rotation, ha="right" if rotation else "center")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def accuracy_bars(records: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per task: bars of each method's mean linear-probe accuracy with its std as error
    bar, grouped by label fraction, methods in the table's order; methods whose every seed diverged
    have no bar. Fine-tuning records are left out (the tables give them)."""
    records = [r for r in records if protocol_of(r) == "probe"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fractions = sorted({r["label_fraction"] for r in records})
    methods = sorted({r["method"] for r in records}, key=method_order)
    found = {(r["task"], r["label_fraction"], r["method"]): r for r in records}
    fig = Figure(
        figsize=(1.2 + 0.5 * len(methods) * len(fractions) * len(tasks), 4), dpi=DPI, layout="constrained"
    )
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    width = 0.8 / len(methods)
    low = min((r["mean"] - r["std"] for r in records if r["mean"] is not None), default=0.0)
    for ax, task in zip(axes, tasks, strict=True):
        for i, method in enumerate(methods):
            rs = [found.get((task, f, method)) for f in fractions]
            xs = [
                g + (i - (len(methods) - 1) / 2) * width
                for g, r in enumerate(rs)
                if r and r["mean"] is not None
            ]
            ok = [r for r in rs if r and r["mean"] is not None]
            means, stds = [r["mean"] for r in ok], [r["std"] for r in ok]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=method_label(method), color=f"C{i % 10}")
        ax.set_xticks(range(len(fractions)), [f"{fraction_label(f)} labels" for f in fractions])
        ax.set_ylabel("linear-probe accuracy (%)")
        ax.set_ylim(bottom=max(0.0, 5 * math.floor(low / 5) - 5))  # differences of a point stay visible
        ax.set_title(task, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def forest_plot(comparisons: Sequence[dict[str, Any]], path: Path) -> None:
    """The paired comparisons (:func:`mkdt.results.paired_comparisons`) as a forest plot: one panel
    per protocol and task (rows) and label fraction (columns), one line per distilled set minus
    another set: the mean paired difference as a dot, its 95% t-interval as a bar (a hollow dot
    without bar for a single seed), a dashed line at 0. ValueError for no comparisons."""
    if not comparisons:
        raise ValueError("forest_plot needs at least one comparison")
    panels: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = {}
    for c in comparisons:
        panels.setdefault((c["protocol"], c["task"]), {}).setdefault(c["label_fraction"], []).append(c)
    fractions = sorted({c["label_fraction"] for c in comparisons})
    most = max(len(found) for row in panels.values() for found in row.values())
    fig = Figure(
        figsize=(2.5 + 4.5 * len(fractions), (1.2 + 0.22 * most) * len(panels)), dpi=DPI, layout="constrained"
    )
    axes = fig.subplots(len(panels), len(fractions), squeeze=False)
    distilled = list(dict.fromkeys(c["method"] for c in comparisons))
    for row, ((protocol, task), by_fraction) in zip(axes, panels.items(), strict=True):
        for ax, fraction in zip(row, fractions, strict=True):
            if fraction not in by_fraction:  # no comparison in this setting
                ax.set_axis_off()
                continue
            _forest_panel(ax, by_fraction[fraction], distilled)
            where = f"{task}, {fraction_label(fraction)} labels"
            ax.set_title(f"{where} ({PROTOCOL_NAMES.get(protocol, protocol)})", fontsize=10)
    _save(fig, path)


def _forest_panel(ax: Axes, comparisons: Sequence[dict[str, Any]], distilled: list[str]) -> None:
    """One panel of :func:`forest_plot`: ``comparisons`` top to bottom, coloured by distilled set."""
    ys = list(range(len(comparisons)))[::-1]
    for y, c in zip(ys, comparisons, strict=True):
        color = f"C{distilled.index(c['method']) % 10}"
        if c["low"] is None:
            ax.plot([c["mean"]], [y], "o", color=color, markerfacecolor="none")
        else:
            ax.hlines(y, c["low"], c["high"], color=color, linewidth=2)
            ax.plot([c["mean"]], [y], "o", color=color)
    ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
    labels = [f"{method_label(c['method'])} − {method_label(c['other'])}" for c in comparisons]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_ylim(-0.7, len(comparisons) - 0.3)
    ax.set_xlabel("accuracy points: mean paired difference, 95% interval", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
