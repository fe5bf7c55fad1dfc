"""Where along the expert trajectories the learning happens, and whether the distillation window
holds it (``mkdt analyze trajectories``).

Trajectory matching can only teach D_syn what the matched segments of the experts contain:
segments start at an epoch t < T+ (``distill.max_start_epoch``) and end M
(``distill.expert_epochs``) epochs later, so the window is epochs [0, T+ - 1 + M]. If the
experts' encoders there probe no better than at their initialisation, a perfectly matched set
cannot help either, whatever the distillation does.

For each chosen expert k and saved epoch e, the expert's weights are probed with the evaluation's
protocol (:func:`mkdt.downstream.probe`, label seed k: its labelled images are those of evaluation
seed k). The references are the experts' initialisations (epoch 0: random inits, what
``no_pretrain`` measures) and the full-data endpoint: the evaluation's ``full`` method (KD on all
of D_real for ``evaluate.epochs`` epochs at ``evaluate.lr``), read from ``results.json`` when the
evaluate stage has run, else pre-trained here for evaluation seed 0 exactly as evaluate would.

The verdict: window share = (acc(window end) - acc(0)) / (acc(full) - acc(0)), each a mean over
the chosen experts and then over tasks and label fractions; a share outside [0, 1] (the window's
end probes worse than epoch 0, or better than the full data) is said in words, not as a
percentage (:func:`share_words`). Below :data:`LOW_SHARE` the window
holds too little of the gain for distillation to show an effect; docs/method.md ("Choosing the
window") says which keys to change. ``mkdt run`` checks this before distilling
(:func:`check_window`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from torch.nn.utils import vector_to_parameters

from mkdt.analysis.common import RunSetting, int_list, open_run
from mkdt.config import Config
from mkdt.data.real import RealData
from mkdt.downstream import Window, pretrain, probe, student_model, window_of
from mkdt.errors import ConfigError
from mkdt.files import atomic_path, fingerprint, read_json, write_json, write_text
from mkdt.graph import defining
from mkdt.nn.models import build_network
from mkdt.results import protocol_of
from mkdt.runtime import Runtime, progress
from mkdt.store import RunDir, SyntheticSet

SUMMARY = "probe the experts along their trajectories; how much of the full-data gain the window holds"
NEEDS_RUN = True
LOW_SHARE = 0.25  # below this share of the full-data gain in the window, mkdt run warns


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def full_reference(run: RunSetting) -> tuple[dict[tuple[str, float], float], str]:
    """acc(full) per (task, fraction): the evaluate stage's linear-probe mean when it has the
    ``full`` method, else a pre-training of evaluation seed 0 here; returns it with a note saying
    which."""
    config, store, real = run.config, run.store, run.real
    if store.results_path.is_file() and store.record("evaluate") is not None:
        acc = {
            (r["task"], r["label_fraction"]): r["mean"]
            for r in store.load_results()
            if r["method"] == "full" and r.get("mean") is not None and protocol_of(r) == "probe"
        }
        if acc:
            return acc, f"mean of the evaluate stage's {config.evaluate.seeds} full seed(s)"
    pset = SyntheticSet(real.inputs, run.targets, config.evaluate.lr)
    student, _ = pretrain(config, "full", 0, pset, real.data, run.targets.shape[1], run.runtime)
    probes = probe(config, student, run.tasks, 0, real.data, run.runtime.device)
    return {(p["task"], p["label_fraction"]): p["accuracy"] for p in probes}, "evaluation seed 0"


def probe_experts(run: RunSetting, experts: list[int], epochs: list[int]) -> list[dict[str, Any]]:
    """[{"expert", "epoch", "task", "label_fraction", "accuracy"}] for every chosen expert and
    epoch, each expert probed with label seed k."""
    config, real, device = run.config, run.real, run.runtime.device
    fp = fingerprint(defining(config, "experts"))
    out_dim = run.targets.shape[1]
    student = build_network(student_model(config), real.data.channels, real.data.image_size, out_dim)
    student = student.to(device)
    rows = []
    pairs = [(k, e) for k in experts for e in epochs]
    trajectories = {k: run.store.load_expert(k, fp, epochs) for k in experts}
    for k, e in progress(pairs, desc="probe experts", unit="probe"):
        vector_to_parameters(trajectories[k].at(e).to(device), student.parameters())
        for p in probe(config, student, run.tasks, k, real.data, device):
            rows.append(
                {"expert": k, "epoch": e, **{key: p[key] for key in ("task", "label_fraction", "accuracy")}}
            )
    return rows


def summarise(
    rows: list[dict[str, Any]], full: dict[tuple[str, float], float], window: Window
) -> dict[str, Any]:
    """Per (task, fraction): mean accuracy per epoch over experts, the gains of the window's end
    and of the full data over epoch 0, and the window share (mean over tasks and fractions)."""
    keys = sorted({(r["task"], r["label_fraction"]) for r in rows})
    epochs = sorted({r["epoch"] for r in rows})
    curves, shares = [], []
    for task, fraction in keys:
        mean = {
            e: _mean(
                [
                    r["accuracy"]
                    for r in rows
                    if (r["task"], r["label_fraction"], r["epoch"]) == (task, fraction, e)
                ]
            )
            for e in epochs
        }
        init, full_acc = mean.get(0, float("nan")), full.get((task, fraction), float("nan"))
        end = mean.get(window.end_epoch, float("nan"))
        full_gain, window_gain = full_acc - init, end - init
        share = window_gain / full_gain if full_gain > 0 else float("nan")
        shares.append(share)
        curves.append(
            {
                "task": task,
                "label_fraction": fraction,
                "accuracy": {str(e): a for e, a in mean.items()},
                "full": full_acc,
                "window_gain": window_gain,
                "full_gain": full_gain,
                "window_share": share,
            }
        )
    finite = [s for s in shares if s == s]
    return {"curves": curves, "window_share": _mean(finite) if finite else float("nan")}


def share_words(share: float) -> str:
    """How much of the full-data gain a window share is, in words where a percentage would mislead:
    "no" without a full-data gain to share (nan), "none" when the window's end probes worse than
    epoch 0 (a share below 0), "all" when it gains more than the full data (above 1), else the
    percentage ("40% of the")."""
    if share != share:
        return "no"
    if share < 0:
        return "none of the"
    if share > 1:
        return "all of the"
    return f"{100 * share:.0f}% of the"


def _share_cell(share: float) -> str:
    """A table cell of a window share: "n/a" (no full-data gain), "< 0" (the window loses
    accuracy), "> 100%" (it gains more than the full data) or the percentage."""
    if share != share:
        return "n/a"
    if share < 0:
        return "< 0 (loses)"
    return "> 100%" if share > 1 else f"{100 * share:.0f}%"


def _share_reason(share: float) -> str:
    """Why a share outside [0, 1] is reported in words ("" inside)."""
    if share < 0:
        return " (at its end the experts probe worse than at their random inits)"
    if share > 1:
        return " (at its end the experts probe better than full-data pre-training)"
    return ""


def verdict(summary: dict[str, Any], window: Window) -> str:
    """One line: how much of the full-data gain the window holds, and whether that is enough."""
    share = summary["window_share"]
    gains = ", ".join(
        f"{c['window_gain']:+.1f} of {c['full_gain']:+.1f} points ({100 * c['label_fraction']:g}% labels)"
        for c in summary["curves"]
    )
    where = f"the window (expert epochs 0-{window.end_epoch}, {window.end_step} SGD steps)"
    if share != share:
        full = ", ".join(
            f"{c['full_gain']:+.1f} points ({100 * c['label_fraction']:g}% labels)" for c in summary["curves"]
        )
        return (
            f"full-data pre-training does not beat the experts' random inits here ({full}), so no "
            f"pre-training set can, and distillation cannot show an effect; {where} gains "
            + ", ".join(f"{c['window_gain']:+.1f}" for c in summary["curves"])
        )
    text = f"{where} holds {share_words(share)} full-data gain{_share_reason(share)}: {gains}"
    if share < LOW_SHARE:
        text += (
            f"; below {100 * LOW_SHARE:.0f}% a matched set cannot beat no pre-training by much: lengthen the "
            "window in SGD steps (smaller experts.batch_size, larger distill.expert_epochs or pool)"
        )
    return text


def table(summary: dict[str, Any], window: Window, full_note: str) -> str:
    """Markdown: one row per (task, fraction), one column per epoch, the window's columns marked."""
    epochs = list(summary["curves"][0]["accuracy"]) if summary["curves"] else []
    head = [f"e{e}" + (" *" if int(e) <= window.end_epoch else "") for e in epochs]
    lines = [
        f"Linear-probe accuracy (%) of the expert students by epoch, mean over experts; * = inside "
        f"the matched window (epochs 0-{window.end_epoch}, {window.steps_per_epoch} SGD steps per "
        f"epoch); full = {full_note}.",
        "",
        "| task | labels | " + " | ".join(head) + " | full | window share |",
        "|---|---|" + "---|" * (len(head) + 2),
    ]
    for c in summary["curves"]:
        cells = [f"{c['accuracy'][e]:.2f}" for e in epochs]
        share = _share_cell(c["window_share"])
        lines.append(
            f"| {c['task']} | {100 * c['label_fraction']:g}% | "
            + " | ".join(cells)
            + f" | {c['full']:.2f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], window: Window, path: Path) -> None:
    """Accuracy against expert epoch (top axis: SGD steps), one colour per (task, fraction): thin
    lines per expert, a thick mean, the full-data endpoint dashed, the window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvspan(0, window.end_epoch, color="0.9", label=f"matched window (0-{window.end_epoch})")
    for i, c in enumerate(summary["curves"]):
        colour = f"C{i}"
        key = (c["task"], c["label_fraction"])
        for k in sorted({r["expert"] for r in rows}):
            mine = sorted(
                (r["epoch"], r["accuracy"])
                for r in rows
                if (r["task"], r["label_fraction"]) == key and r["expert"] == k
            )
            ax.plot(*zip(*mine, strict=True), color=colour, alpha=0.3, linewidth=0.8)
        epochs = [int(e) for e in c["accuracy"]]
        label = f"{c['task']}, {100 * c['label_fraction']:g}% labels"
        ax.plot(epochs, list(c["accuracy"].values()), color=colour, linewidth=2, marker="o", label=label)
        ax.axhline(c["full"], color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("expert epoch")
    ax.set_ylabel("linear-probe accuracy (%)")
    per_epoch = window.steps_per_epoch

    def to_steps(epoch: Any) -> Any:
        return epoch * per_epoch

    def to_epochs(steps: Any) -> Any:
        return steps / per_epoch

    top = ax.secondary_xaxis("top", functions=(to_steps, to_epochs))
    top.set_xlabel("expert SGD steps")
    ax.set_title("expert trajectories (dashed: full-data pre-training)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def analyse(
    config: Config,
    out: str | Path,
    experts: list[int] | None = None,
    epochs: list[int] | None = None,
    *,
    real: RealData | None = None,
    runtime: Runtime | None = None,
    name: str = "trajectories",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Probe ``experts`` (default: the first 3) at ``epochs`` (default: every saved epoch), compare
    with the full-data endpoint, write ``OUT/analysis/NAME.{md,json,png}`` (``extra`` added to
    the JSON record); returns the record, with the summary's ``verdict``."""
    saved = config.expert_save_epochs()
    experts = list(range(min(3, config.experts.num_experts))) if experts is None else experts
    epochs = saved if epochs is None else sorted(set(epochs) | {0})
    if bad := [k for k in experts if not 0 <= k < config.experts.num_experts]:
        raise ConfigError(f"--experts: {bad} outside [0, {config.experts.num_experts}) (experts.num_experts)")
    if bad := [e for e in epochs if e not in saved]:
        raise ConfigError(f"--epochs: {bad} were not saved (saved: {saved}; experts.save_epochs)")
    run = open_run(config, out, ["experts"], real=real, runtime=runtime)
    window = window_of(config, run.real.num_train)
    rows = probe_experts(run, experts, epochs)
    full, full_note = full_reference(run)
    summary = summarise(rows, full, window)
    summary["verdict"] = verdict(summary, window)
    text = table(summary, window, full_note) + "\n" + summary["verdict"] + "\n"
    record = {
        "experts": experts,
        "epochs": epochs,
        "window_end_epoch": window.end_epoch,
        "steps_per_epoch": window.steps_per_epoch,
        "full": full_note,
        "probes": rows,
        **summary,
        **(extra or {}),
    }
    write_json(run.store.analysis_path(name, "json"), record)
    write_text(run.store.analysis_path(name, "md"), text)
    plot(rows, summary, window, run.store.analysis_path(name, "png"))
    return record


def check_window(config: Config, store: RunDir, real: RealData, runtime: Runtime) -> str | None:
    """The window check of ``mkdt run`` before distilling (``distill.check_window``): this
    analysis at its cheapest (experts 0 and 1 at epoch 0 and the window's end, the full-data
    reference from one seed), written as analysis ``window`` (:meth:`RunDir.analysis_path`) and
    reused while the distill and evaluate definitions are unchanged. Prints the verdict; when the
    window holds less than :data:`LOW_SHARE` of the full-data gain, prints a warning to stderr and
    returns it (else None). Needs the finished experts stage; call it on rank 0 alone."""
    definition = fingerprint(
        {"distill": defining(config, "distill"), "evaluate": defining(config, "evaluate")}
    )
    path = store.analysis_path("window", "json")
    record = read_json(path) if path.is_file() else {}
    if record.get("definition") != definition:
        window = window_of(config, real.num_train)
        experts = list(range(min(2, config.experts.num_experts)))
        print(
            f"window check: probing experts {experts} at epochs 0 and {window.end_epoch} "
            "(distill.check_window)"
        )
        record = analyse(
            config,
            store.path,
            experts,
            [0, window.end_epoch],
            real=real,
            runtime=runtime,
            name="window",
            extra={"definition": definition},
        )
    print(f"window check: {record['verdict']}")
    share = record["window_share"]
    if share >= LOW_SHARE:
        return None
    warning = (
        f"mkdt: warning: the matched window holds {share_words(share)} full-data gain, so MKDT cannot "
        f"beat no pre-training by much here; see {store.analysis_path('window', 'md')} and docs/method.md §8"
    )
    print(warning, file=sys.stderr)
    return warning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=int_list, help="expert indices to probe (default: 0,1,2)")
    parser.add_argument(
        "--epochs", type=int_list, help="saved epochs to probe (default: all saved; 0 always)"
    )


def main(args: argparse.Namespace, config: Config) -> None:
    analyse(config, args.out, args.experts, args.epochs)
    store = RunDir(args.out)
    print(store.analysis_path("trajectories", "md").read_text(), end="")
    print(f"wrote {store.analysis_dir}/trajectories.{{md,json,png}}")
