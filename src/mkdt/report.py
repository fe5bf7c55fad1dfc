"""Evaluation results: records (one per method x task x label fraction) and the paper-style table.

A record is a JSON-able dict::

    {"method": "mkdt", "task": "cifar10", "label_fraction": 0.01, "seeds": [0, 1, 2],
     "accuracies": [44.1, 45.9, 43.0], "mean": 44.33, "std": 1.47}

with test accuracies in percent, one per seed, and the sample standard deviation (ddof=1; 0 for a
single seed). :func:`results_table` renders records as a markdown table shaped like the paper's
Table 1 (docs/method.md).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

METHOD_NAMES = {
    "no_pretrain": "no pre-training",
    "random": "random subset",
    "high_loss": "high-loss subset",
    "random@alpha": "random subset @ MKDT's lr",
    "high_loss@alpha": "high-loss subset @ MKDT's lr",
    "mkdt": "MKDT",
    "mtt_ssl": "MTT-SSL",
    "full": "full data",
}
EVAL_METHODS = ("no_pretrain", "random", "high_loss", "full", "random@alpha", "high_loss@alpha", "mkdt")
"""What the evaluate stage runs; ``X@alpha`` is subset X pre-trained at MKDT's learned alpha_syn."""
OPTIONAL_METHODS = ("mtt_ssl",)  # accepted by evaluate.methods, not run by default
AT_ALPHA = "@alpha"
LR_MATCHED = ("random@alpha", "high_loss@alpha")  # the lr-matched controls
MISSING = "–"


def summarise(accuracies: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of one setting's accuracies; std is 0 for a single value."""
    if not accuracies:
        raise ValueError("summarise needs at least one accuracy")
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return statistics.fmean(accuracies), std


def make_record(
    method: str, task: str, label_fraction: float, seeds: Sequence[int], accuracies: Sequence[float]
) -> dict[str, Any]:
    """One result record (accuracies in percent, in the order of ``seeds``)."""
    if len(seeds) != len(accuracies):
        raise ValueError(f"{len(seeds)} seeds but {len(accuracies)} accuracies")
    mean, std = summarise(accuracies)
    return {
        "method": method,
        "task": task,
        "label_fraction": label_fraction,
        "seeds": list(seeds),
        "accuracies": list(accuracies),
        "mean": mean,
        "std": std,
    }


def build_records(
    probes: Iterable[dict[str, Any]],
    methods: Sequence[str],
    tasks: Sequence[str],
    fractions: Sequence[float],
    diverged: dict[str, list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Records for every method x task x fraction, in that nesting order, from probe results.

    A probe result is ``{"method", "seed", "task", "label_fraction", "accuracy"}`` (percent); each
    record gathers its setting's results sorted by seed. ``diverged`` lists, per method, the seeds
    whose pre-training diverged (they have no probe results): their records carry
    ``diverged_seeds``, and when no seed is left ``mean`` and ``std`` are None. Any other setting
    without results raises ValueError.
    """
    diverged = diverged or {}
    found: dict[tuple[str, str, float], dict[int, float]] = {}
    for p in probes:
        found.setdefault((p["method"], p["task"], p["label_fraction"]), {})[p["seed"]] = p["accuracy"]
    records = []
    for method in methods:
        for task in tasks:
            for fraction in fractions:
                by_seed = found.get((method, task, fraction), {})
                failed = sorted(diverged.get(method, []))
                if not by_seed and not failed:
                    raise ValueError(f"no probe results for {method} on {task} at {fraction}")
                seeds = sorted(by_seed)
                if by_seed:
                    record = make_record(method, task, fraction, seeds, [by_seed[s] for s in seeds])
                else:
                    record = {
                        "method": method,
                        "task": task,
                        "label_fraction": fraction,
                        "seeds": [],
                        "accuracies": [],
                        "mean": None,
                        "std": None,
                    }
                if failed:
                    record["diverged_seeds"] = failed
                records.append(record)
    return records


def mkdt_margins(records: Sequence[dict[str, Any]]) -> str:
    """Lines saying, per task and label fraction, MKDT's mean minus each same-size baseline's
    mean (``full`` is an upper reference, not a baseline) and which baselines MKDT does not beat;
    "" without MKDT records."""
    means = {(r["method"], r["task"], r["label_fraction"]): r["mean"] for r in records}
    lines, behind = [], set()
    for (method, task, fraction), mean in means.items():
        if method != "mkdt" or mean is None:
            continue
        parts = []
        for (other, t, f), value in means.items():
            if (t, f) == (task, fraction) and other not in ("mkdt", "full") and value is not None:
                parts.append(f"{method_label(other)} {mean - value:+.2f}")
                if mean <= value:
                    behind.add(method_label(other))
        if parts:
            lines.append(
                f"MKDT minus each baseline, {task} {fraction_label(fraction)} labels: " + ", ".join(parts)
            )
    if not lines:
        return ""
    verdict = f"MKDT does not beat: {', '.join(sorted(behind))}" if behind else "MKDT beats every baseline"
    return "\n".join([*lines, verdict + " (means over seeds; compare with the std in the table)"]) + "\n"


def fraction_label(fraction: float) -> str:
    """0.01 -> "1%", 0.5 -> "50%", 0.001 -> "0.1%"."""
    return f"{100 * fraction:.6g}%"


def method_label(method: str) -> str:
    """The human name of a method ("mkdt" -> "MKDT"); unknown names are returned as they are."""
    return METHOD_NAMES.get(method, method)


def cell(record: dict[str, Any]) -> str:
    """ "mean ± std" with 2 decimals; "diverged" when every seed's pre-training diverged, and
    "(k diverged)" after the numbers when some did."""
    failed = len(record.get("diverged_seeds", []))
    if record["mean"] is None:
        return "diverged"
    text = f"{record['mean']:.2f} ± {record['std']:.2f}"
    return f"{text} ({failed} diverged)" if failed else text


def _method_order(method: str) -> tuple[int, str]:
    order = list(METHOD_NAMES)
    return (order.index(method), "") if method in order else (len(order), method)


def results_table(records: Sequence[dict[str, Any]], header: str | None = None) -> str:
    """A markdown table: one row per label fraction (ascending) x method (in the order of
    :data:`METHOD_NAMES`, unknown methods last by name), one column per task (in order of first
    appearance); cells "mean ± std", "–" where a setting has no record. ``header`` (if given) is
    a line printed above the table."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fractions = sorted({r["label_fraction"] for r in records})
    methods = sorted({r["method"] for r in records}, key=_method_order)
    cells = {(r["label_fraction"], r["method"], r["task"]): cell(r) for r in records}
    lines = [f"{header}\n"] if header else []
    lines.append("| labels | method | " + " | ".join(tasks) + " |")
    lines.append("|---|---|" + "---|" * len(tasks))
    for fraction in fractions:
        for method in methods:
            if not any((fraction, method, t) in cells for t in tasks):
                continue
            row = [cells.get((fraction, method, t), MISSING) for t in tasks]
            lines.append(f"| {fraction_label(fraction)} | {method_label(method)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
