"""Evaluation results: records (one per protocol x method x task x label fraction) and the
paper-style table.

A record is a JSON-able dict::

    {"method": "mkdt", "task": "cifar10", "label_fraction": 0.01, "seeds": [0, 1, 2],
     "accuracies": [44.1, 45.9, 43.0], "mean": 44.33, "std": 1.47, "protocol": "probe"}

with test accuracies in percent, one per seed, and the sample standard deviation (ddof=1; 0 for a
single seed). ``protocol`` is one of :data:`~mkdt.methods.PROTOCOLS`; a record without it (results.json
written before fine-tuning existed) is a linear-probe record (:func:`protocol_of`). Other fields
(``diverged_seeds``, and what later versions add) are kept and ignored here, but for ``kind``: the
records of imported ``ext:NAME`` sets say what was imported (:func:`set_kind`).
:func:`results_table` renders records as a markdown table shaped like the paper's Table 1
(docs/method.md), one table per protocol when there are fine-tuning records.

Seeds pair the methods: seed s draws the same label subset for every method, so the distilled set's
accuracy minus another set's on the same seed removes the label draw's share of the variance.
:func:`paired_comparisons` gives those differences with a 95% t-interval over seeds,
:func:`headlines` the two that answer "does MKDT help" (over the random subset, over the best
same-size set), :func:`comparisons_text` both as lines of results.md. :func:`set_costs` says what
producing each set cost (the stages that make it, from their records), :func:`costs_text` as a table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mkdt.methods import (
    PROTOCOL_TITLES,
    PROTOCOLS,
    SAME_SIZE_KINDS,
    is_method,
    method_label,
    method_order,
    parse_method,
)

MISSING = "–"
CONFIDENCE = 0.95
"""The coverage of the paired intervals (:func:`t_interval`)."""
COMPARED_KINDS = ("distilled", "krr_st")
"""The kinds whose paired differences with the other sets are listed (:func:`paired_comparisons`)
and summed up in :func:`headlines`: MKDT's sets, and KRR-ST, the paper's other distillation."""


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


# ------------------------------------------------------------ paired comparisons


def t_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the mean of ``values`` and its :data:`CONFIDENCE` t-interval,
    mean ± t(0.975, n - 1) * sd / sqrt(n) with the sample sd (ddof=1); None bounds for a single
    value (no spread to measure). ValueError for no values."""
    from scipy import stats  # loaded on first use: the tables do not need it

    if not values:
        raise ValueError("t_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half


def _accuracy_by_seed(record: dict[str, Any]) -> dict[int, float]:
    """A record's accuracies by seed (diverged seeds have none)."""
    return dict(zip(record["seeds"], record["accuracies"], strict=True))


def paired_difference(record: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """``record`` minus ``other`` (two records of one protocol, task and label fraction) seed by seed,
    over the seeds both have; None when they share no seed. The comparison is::

        {"protocol", "task", "label_fraction", "method", "other", "seeds", "differences",
         "mean", "low", "high", "n"}

    with ``differences`` in accuracy points in the order of ``seeds`` and (mean, low, high) their
    :func:`t_interval` (low and high None for n = 1)."""
    mine, theirs = _accuracy_by_seed(record), _accuracy_by_seed(other)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    differences = [mine[s] - theirs[s] for s in seeds]
    mean, low, high = t_interval(differences)
    return {
        "protocol": protocol_of(record),
        "task": record["task"],
        "label_fraction": record["label_fraction"],
        "method": record["method"],
        "other": other["method"],
        "seeds": seeds,
        "differences": differences,
        "mean": mean,
        "low": low,
        "high": high,
        "n": len(seeds),
    }


def set_kind(record: dict[str, Any]) -> str | None:
    """The kind (:data:`~mkdt.methods.Kind`) of a record's set: its ``kind`` field where it has one
    (the records of ``ext:NAME`` sets carry it, ``distilled`` for a set imported from another mkdt
    run's distill stage), else its method's; None for a name that is no method."""
    kind: str | None = record.get("kind")
    if kind is None and is_method(record["method"]):
        kind = parse_method(record["method"]).kind
    return kind


def is_distilled(record: dict[str, Any]) -> bool:
    """Whether a record's set is a distilled MKDT set (``mkdt``, its variants ``mkdt_<subset>`` and
    sets imported from another mkdt run)."""
    return set_kind(record) == "distilled"


def is_compared(record: dict[str, Any]) -> bool:
    """Whether a record's paired differences are listed (:data:`COMPARED_KINDS`)."""
    return set_kind(record) in COMPARED_KINDS


def is_same_size(record: dict[str, Any]) -> bool:
    """Whether a record's set is one of the same-size sets (:data:`SAME_SIZE_KINDS`): not
    ``no_pretrain``, ``full`` or a distilled set (an MKDT variant is not the bar MKDT must clear)."""
    return set_kind(record) in SAME_SIZE_KINDS


Setting = tuple[str, str, float]
"""(protocol, task, label fraction)."""


def _settings(records: Sequence[dict[str, Any]]) -> dict[Setting, list[dict[str, Any]]]:
    """The records of each setting, settings in the order of protocol (:data:`PROTOCOLS`, others
    last), task (first appearance), label fraction (ascending); records in method order."""
    tasks = list(dict.fromkeys(r["task"] for r in records))

    def order(setting: Setting) -> tuple[int, str, int, float]:
        protocol, task, fraction = setting
        rank = PROTOCOLS.index(protocol) if protocol in PROTOCOLS else len(PROTOCOLS)
        return rank, protocol, tasks.index(task), fraction

    groups: dict[Setting, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: method_order(r["method"])):
        groups.setdefault((protocol_of(r), r["task"], r["label_fraction"]), []).append(r)
    return {setting: groups[setting] for setting in sorted(groups, key=order)}


def paired_comparisons(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every setting (protocol, task, label fraction) and every distilled set in it
    (:func:`is_distilled`), its :func:`paired_difference` with every other method of the setting
    that shares a seed with it (``full``, ``no_pretrain``, the subsets, KRR-ST, the other distilled
    sets, ...); for KRR-ST (:func:`is_compared`) the same with every method but the distilled sets
    (their difference with KRR-ST is listed from their side). Settings in the order of
    :func:`_settings`, methods and others in table order."""
    comparisons = []
    for group in _settings(records).values():
        for record in group:
            if not is_compared(record):
                continue
            others = [o for o in group if is_distilled(record) or not is_distilled(o)]
            for other in others:
                if other is not record and (pair := paired_difference(record, other)) is not None:
                    comparisons.append(pair)
    return comparisons


def best_same_size(group: Sequence[dict[str, Any]], besides: str | None = None) -> str | None:
    """The same-size method (:func:`is_same_size`) other than ``besides`` with the highest mean
    among the records of one setting (the first in table order on ties); None when none has a
    mean."""
    best: tuple[float, str] | None = None
    candidates = [r for r in group if is_same_size(r) and r["method"] != besides]
    for r in sorted(candidates, key=lambda r: method_order(r["method"])):
        if r["mean"] is not None and (best is None or r["mean"] > best[0]):
            best = (r["mean"], r["method"])
    return None if best is None else best[1]


def headlines(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and distilled or KRR-ST set with results (:func:`is_compared`), the two numbers
    that say whether distilling helps::

        {"protocol", "task", "label_fraction", "method",
         "over_random": comparison or None, "best_same_size": method or None,
         "over_best": comparison or None}

    ``over_random`` is its :func:`paired_difference` with the random subset, ``over_best`` with
    the :func:`best_same_size` set of the setting other than itself (chosen by mean accuracy);
    None where that set has no record or shares no seed with it."""
    found = []
    for (protocol, task, fraction), group in _settings(records).items():
        by_method = {r["method"]: r for r in group}
        for record in group:
            if not is_compared(record) or not record["seeds"]:
                continue
            best = best_same_size(group, besides=record["method"])
            random, top = by_method.get("random"), by_method.get(best) if best else None
            found.append(
                {
                    "protocol": protocol,
                    "task": task,
                    "label_fraction": fraction,
                    "method": record["method"],
                    "over_random": paired_difference(record, random) if random else None,
                    "best_same_size": best,
                    "over_best": paired_difference(record, top) if top else None,
                }
            )
    return found


def difference_text(comparison: dict[str, Any] | None) -> str:
    """ "+1.20 [-0.30, +2.70], n = 3"; "+1.20, n = 1 (no interval)"; "no common seed" for None."""
    if comparison is None:
        return "no common seed"
    mean, low, high, n = (comparison[k] for k in ("mean", "low", "high", "n"))
    if low is None:
        return f"{mean:+.2f}, n = {n} (no interval)"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}], n = {n}"


def headline_lines(headline: dict[str, Any]) -> list[str]:
    """The two sentences of one :func:`headlines` entry."""
    label, best = method_label(headline["method"]), headline["best_same_size"]
    over_best = (
        f"({method_label(best)}): {difference_text(headline['over_best'])}"
        if best
        else "none: no same-size set has results"
    )
    return [
        f"{label} over the random subset: {difference_text(headline['over_random'])}",
        f"{label} over the best same-size set {over_best}",
    ]


def setting_title(setting: Setting) -> str:
    """ "Linear probe, cifar10, 1% labels" for (protocol, task, label fraction)."""
    protocol, task, fraction = setting
    return f"{PROTOCOL_TITLES.get(protocol, protocol)}, {task}, {fraction_label(fraction)} labels"


def comparisons_text(records: Sequence[dict[str, Any]]) -> str:
    """The section "Paired differences (95% t-interval over seeds)" of results.md: per setting, each
    distilled set minus each other set (:func:`paired_comparisons`), then its :func:`headlines`;
    "" without a distilled set that shares a seed with another set."""
    comparisons = paired_comparisons(records)
    if not comparisons:
        return ""
    by_setting: dict[Setting, list[str]] = {}
    for c in comparisons:
        line = f"- {method_label(c['method'])} minus {method_label(c['other'])}: {difference_text(c)}"
        by_setting.setdefault((c["protocol"], c["task"], c["label_fraction"]), []).append(line)
    for h in headlines(records):
        lines = by_setting.setdefault((h["protocol"], h["task"], h["label_fraction"]), [])
        lines += [f"- **{line}**" for line in headline_lines(h)]
    krr = any(is_compared(r) and not is_distilled(r) for r in records)
    lines = [
        "Paired differences (95% t-interval over seeds)",
        "",
        f"Accuracy points of each distilled{' (and KRR-ST)' if krr else ''} set minus each other set on "
        "the same seed (the same labels and pre-training seed), averaged over the seeds both have; the "
        "interval is mean ± t(0.975, n - 1) * sd / sqrt(n). In bold: the gain over the random subset "
        f"and over the best same-size set (the subset, {'KRR-ST, ' if krr else ''}MTT-SSL or imported "
        "set with the highest mean accuracy; a set imported from another mkdt run is a distilled set, "
        "not a candidate).",
    ]
    for setting, found in by_setting.items():
        lines += ["", f"{setting_title(setting)}:", *found]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ cost of each set

MADE_BY = {
    "none": (),
    "full": ("teacher", "targets"),
    "subset": ("teacher", "targets", "experts", "init"),
    "distilled": ("teacher", "targets", "experts", "init", "distill"),
    "krr_st": ("teacher", "targets", "experts", "init", "krr_st"),
}
"""The stages whose work produces a set, by :class:`~mkdt.methods.Method` kind: ``full`` needs the
teacher's targets for all of D_real, the scored subsets the experts' losses and the init stage, a
distilled set all of them and distillation, KRR-ST the same with its own stage (less the experts
and init when it starts from the random subset, :func:`producing_stages`)."""


def krr_st_start(records: Mapping[str, dict[str, Any] | None]) -> str | None:
    """The init subset the finished krr_st stage started from (its record's ``init``); None when
    it has not finished."""
    record = records.get("krr_st")
    return None if record is None else record["result"].get("init")


def producing_stages(
    method: str, records: Mapping[str, dict[str, Any] | None] | None = None
) -> tuple[str, ...] | None:
    """The stages whose work a set needs (:data:`MADE_BY`); () for no pre-training and the random
    subset (drawing indices); teacher, targets and krr_st for a KRR-ST set that started from the
    random subset (:func:`krr_st_start` of the stage ``records``); None for sets made outside the
    stages (MTT-SSL, imported sets)."""
    m = parse_method(method)
    if m.kind == "subset" and m.subset == "random":
        return ()
    if m.kind == "krr_st" and krr_st_start(records or {}) == "random":
        return ("teacher", "targets", "krr_st")
    return MADE_BY.get(m.kind)


def _krr_st_notes(records: Mapping[str, dict[str, Any] | None]) -> list[str]:
    """What the cost of the KRR-ST set counts of its start."""
    start = krr_st_start(records)
    if start == "random":
        return [
            "starts from the random subset (drawn indices): the experts' and init stage's work not counted"
        ]
    if start is not None:
        return [f"starts from the {start} subset: the init stage's time covers all its subsets together"]
    return []


def _cost_notes(method: str, records: Mapping[str, dict[str, Any] | None]) -> list[str]:
    """What a reader of the cost of ``method``'s set must know: what is shared or not counted."""
    m, stages = parse_method(method), producing_stages(method, records) or ()
    notes = _krr_st_notes(records) if m.kind == "krr_st" else []
    if m.kind == "none":
        notes.append("no set")
    elif m.kind == "subset" and m.subset == "random":
        notes.append("random indices: no stage's work (the init stage's time is for the scored subsets)")
    elif m.kind == "subset":
        notes.append("the init stage's time covers all its subsets together")
    if m.step_size == "alpha" and m.kind == "subset":
        notes.append("pre-trained at MKDT's learned alpha_syn (the distill stage's, not counted)")
    distill = records.get("distill")
    if m.kind == "distilled" and distill is not None and distill["result"].get("variants"):
        notes.append("the distill stage's time covers the main set and its variants together")
    teacher = records.get("teacher")
    if "teacher" in stages and teacher is not None and "loaded_from" in teacher["result"]:
        notes.append("teacher loaded from a checkpoint: its training is not counted")
    return notes


def _total(values: Sequence[Any]) -> float | None:
    """The sum of stage times, None when one is unknown (a record written before it was kept)."""
    return None if any(v is None for v in values) else float(sum(values))


def set_cost(method: str, records: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The cost of producing ``method``'s set from the stage records ``records`` (stage -> its
    ``stage.json`` dict, or None / absent when the stage has not finished)::

        {"stages": [...], "seconds": float | None, "cpu_seconds": float | None, "note": str}

    the wall-clock and CPU seconds summed over :func:`producing_stages` (each stage in full, even
    when other sets share it); None where a stage has not finished, where a record predates
    ``cpu_seconds``, and for sets made outside the stages."""
    stages = producing_stages(method, records)
    if stages is None:
        outside = parse_method(method).source == "mtt"
        note = "made outside the pipeline's stages (`mkdt analyze mtt`)" if outside else "imported"
        return {"stages": [], "seconds": None, "cpu_seconds": None, "note": note}
    notes = _cost_notes(method, records)
    found = {stage: records.get(stage) for stage in stages}
    done = [r for r in found.values() if r is not None]
    seconds = _total([r["seconds"] for r in done]) if len(done) == len(found) else None
    cpu = _total([r.get("cpu_seconds") for r in done]) if len(done) == len(found) else None
    if missing := [stage for stage, r in found.items() if r is None]:
        notes.append(f"not finished: {', '.join(missing)}")
    return {"stages": list(stages), "seconds": seconds, "cpu_seconds": cpu, "note": "; ".join(notes)}


def set_costs(
    methods: Iterable[str], records: Mapping[str, dict[str, Any] | None]
) -> dict[str, dict[str, Any]]:
    """:func:`set_cost` of each method (in table order) from the stage records ``records``."""
    return {m: set_cost(m, records) for m in sorted(set(methods), key=method_order)}


def _seconds_cell(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def costs_table(costs: Mapping[str, dict[str, Any]], pretraining: Mapping[str, float] | None = None) -> str:
    """:func:`set_costs` as a markdown table (method, stages, wall and CPU seconds, note) under a
    paragraph that says what is counted, with a column of the evaluation's own seconds per
    pre-training (``pretraining``: method -> mean seconds, the evaluate stage's
    ``seconds_per_pretraining``) when given."""
    extra = pretraining is not None
    lines = [
        "Seconds of the stages whose work produces each set, from their records (stage.json): wall "
        "clock and CPU time of the main process (GPU time is not CPU time); a stage several sets "
        "need is counted in full for each; – where unknown (a stage not finished, a record written "
        "before CPU time was kept, a set made outside the stages)."
        + (" The evaluation's own pre-training on each set (mean per seed) is apart." if extra else ""),
        "",
        "| method | stages | wall s | CPU s |"
        + (" evaluation's pre-training s |" if extra else "")
        + " note |",
        "|---|---|---|---|" + ("---|" if extra else "") + "---|",
    ]
    for method, cost in costs.items():
        row = [
            method_label(method),
            ", ".join(cost["stages"]) or "none",
            _seconds_cell(cost["seconds"]),
            _seconds_cell(cost["cpu_seconds"]),
        ]
        if pretraining is not None:
            row.append(_seconds_cell(pretraining.get(method)))
        lines.append("| " + " | ".join([*row, cost["note"]]) + " |")
    return "\n".join(lines) + "\n"


def costs_text(costs: Mapping[str, dict[str, Any]], pretraining: Mapping[str, float] | None = None) -> str:
    """The section "Cost of each set" of results.md: its title over :func:`costs_table`."""
    return "Cost of each set\n\n" + costs_table(costs, pretraining)
