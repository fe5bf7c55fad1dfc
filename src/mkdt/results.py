"""Evaluation results: records (one per protocol x method x task x label fraction) and the
paper-style table.

A record is a JSON-able dict::

    {"method": "mkdt", "task": "cifar10", "label_fraction": 0.01, "seeds": [0, 1, 2],
     "accuracies": [44.1, 45.9, 43.0], "mean": 44.33, "std": 1.47, "protocol": "probe"}

with test accuracies in percent, one per seed, and the sample standard deviation (ddof=1; 0 for a
single seed). ``protocol`` is one of :data:`~mkdt.methods.PROTOCOLS`; a record without it (results.json
written before fine-tuning existed) is a linear-probe record (:func:`protocol_of`).
:func:`results_table` renders records as a markdown table shaped like the paper's Table 1
(docs/method.md), one table per protocol when there are fine-tuning records.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from mkdt.methods import PROTOCOL_TITLES, PROTOCOLS, method_label, method_order

MISSING = "–"


def summarise(accuracies: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of one setting's accuracies; std is 0 for a single value."""
    if not accuracies:
        raise ValueError("summarise needs at least one accuracy")
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return statistics.fmean(accuracies), std


def protocol_of(result: dict[str, Any]) -> str:
    """The protocol of a record or of a result: its ``protocol``, ``probe`` when it has none."""
    protocol: str = result.get("protocol", "probe")
    return protocol


def make_record(
    method: str,
    task: str,
    label_fraction: float,
    seeds: Sequence[int],
    accuracies: Sequence[float],
    protocol: str = "probe",
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
        "protocol": protocol,
    }


def build_records(
    probes: Iterable[dict[str, Any]],
    methods: Sequence[str],
    tasks: Sequence[str],
    fractions: Sequence[float],
    diverged: dict[str, list[int]] | None = None,
    protocols: Sequence[str] = ("probe",),
) -> list[dict[str, Any]]:
    """Records for every protocol x method x task x fraction, in that nesting order, from results.

    A result is ``{"method", "seed", "task", "label_fraction", "accuracy"}`` (percent) with an
    optional ``protocol`` (:func:`protocol_of`); each record gathers its setting's results sorted
    by seed. ``diverged`` lists, per method, the seeds whose pre-training diverged (they have no
    results): their records carry ``diverged_seeds``, and when no seed is left ``mean`` and ``std``
    are None. Any other setting without results raises ValueError.
    """
    diverged = diverged or {}
    found: dict[tuple[str, str, str, float], dict[int, float]] = {}
    for p in probes:
        key = (protocol_of(p), p["method"], p["task"], p["label_fraction"])
        found.setdefault(key, {})[p["seed"]] = p["accuracy"]
    records = []
    for protocol in protocols:
        for method in methods:
            for task in tasks:
                for fraction in fractions:
                    by_seed = found.get((protocol, method, task, fraction), {})
                    failed = sorted(diverged.get(method, []))
                    if not by_seed and not failed:
                        raise ValueError(f"no {protocol} results for {method} on {task} at {fraction}")
                    records.append(_record(protocol, method, task, fraction, by_seed, failed))
    return records


def _record(
    protocol: str, method: str, task: str, fraction: float, by_seed: dict[int, float], failed: list[int]
) -> dict[str, Any]:
    """The record of one setting from its accuracies by seed and its diverged seeds."""
    seeds = sorted(by_seed)
    if seeds:
        record = make_record(method, task, fraction, seeds, [by_seed[s] for s in seeds], protocol)
    else:
        record = {
            "method": method,
            "task": task,
            "label_fraction": fraction,
            "seeds": [],
            "accuracies": [],
            "mean": None,
            "std": None,
            "protocol": protocol,
        }
    if failed:
        record["diverged_seeds"] = failed
    return record


def mkdt_margins(records: Sequence[dict[str, Any]]) -> str:
    """Lines saying, per protocol, task and label fraction, MKDT's mean minus each same-size
    baseline's mean (``full`` is an upper reference, not a baseline) and which baselines MKDT does
    not beat; the lines of fine-tuning records say "(fine-tuning)". "" without MKDT records.

    The :data:`~mkdt.methods.VARIANTS` (MKDT from another init subset) are compared like baselines:
    MKDT's lead over "MKDT (random init)" is what starting from ``distill.init`` rather than the
    random subset adds."""
    return "".join(
        _margins([r for r in records if protocol_of(r) == p], "" if p == "probe" else " (fine-tuning)")
        for p in PROTOCOLS
    )


def _margins(records: Sequence[dict[str, Any]], tag: str) -> str:
    """:func:`mkdt_margins` of one protocol's records, ``tag`` after "baseline" and "beat"."""
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
                f"MKDT minus each baseline{tag}, {task} {fraction_label(fraction)} labels: "
                + ", ".join(parts)
            )
    if not lines:
        return ""
    verdict = (
        f"MKDT does not beat{tag}: {', '.join(sorted(behind))}"
        if behind
        else f"MKDT beats every baseline{tag}"
    )
    return "\n".join([*lines, verdict + " (means over seeds; compare with the std in the table)"]) + "\n"


def fraction_label(fraction: float) -> str:
    """0.01 -> "1%", 0.5 -> "50%", 0.001 -> "0.1%"."""
    return f"{100 * fraction:.6g}%"


def cell(record: dict[str, Any]) -> str:
    """ "mean ± std" with 2 decimals; "diverged" when every seed's pre-training diverged, and
    "(k diverged)" after the numbers when some did."""
    failed = len(record.get("diverged_seeds", []))
    if record["mean"] is None:
        return "diverged"
    text = f"{record['mean']:.2f} ± {record['std']:.2f}"
    return f"{text} ({failed} diverged)" if failed else text


def best_means(records: Sequence[dict[str, Any]]) -> dict[tuple[float, str], float]:
    """The highest mean of each (label fraction, task) among the same-size methods: every method
    but ``full``, an upper reference (as in the paper's Table 1); settings without a mean skipped."""
    best: dict[tuple[float, str], float] = {}
    for r in records:
        key = (r["label_fraction"], r["task"])
        if r["method"] != "full" and r["mean"] is not None and r["mean"] > best.get(key, -math.inf):
            best[key] = r["mean"]
    return best


def results_table(
    records: Sequence[dict[str, Any]], header: str | None = None, bold_best: bool = False
) -> str:
    """A markdown table: one row per label fraction (ascending) x method (in the order of
    :data:`~mkdt.methods.METHOD_NAMES`, unknown methods last by name), one column per task (in order
    of first appearance); cells "mean ± std", "–" where a setting has no record. ``header`` (if given) is
    a line printed above the table; with ``bold_best`` the cells of :func:`best_means` are bold.

    Linear-probe records alone make one table; with records of other protocols, each protocol
    (in the order of :data:`~mkdt.methods.PROTOCOLS`, unknown ones last) gets its own table under its
    title."""
    found = {protocol_of(r) for r in records}
    if found <= {"probe"}:
        return _table(records, header, bold_best)
    protocols = [p for p in PROTOCOLS if p in found] + sorted(found - set(PROTOCOLS))
    parts = [f"{header}\n"] if header else []
    for protocol in protocols:
        chosen = [r for r in records if protocol_of(r) == protocol]
        parts.append(_table(chosen, f"{PROTOCOL_TITLES.get(protocol, protocol)}:", bold_best))
    return "\n".join(parts)


def _table(records: Sequence[dict[str, Any]], header: str | None, bold_best: bool) -> str:
    """The table of :func:`results_table` for the records of one protocol."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fractions = sorted({r["label_fraction"] for r in records})
    methods = sorted({r["method"] for r in records}, key=method_order)
    best = best_means(records) if bold_best else {}
    cells = {}
    for r in records:
        top = best.get((r["label_fraction"], r["task"]))
        bold = r["method"] != "full" and top is not None and top == r["mean"]
        cells[(r["label_fraction"], r["method"], r["task"])] = f"**{cell(r)}**" if bold else cell(r)
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
