"""Stage 6: pre-train a fresh student on each set, then linear-probe its frozen features
(docs/method.md, "Evaluation").

Pre-training sets (``evaluate.methods``):

- ``no_pretrain``: none, the student stays at its seeded initialisation;
- ``random`` / ``sas`` / ``high_loss``: the real images chosen by the init stage with their teacher
  targets;
- ``full``: all of D_real with all targets;
- ``mkdt``: the distilled set (its images are already normalised) with its learned alpha_syn as
  learning rate (real sets use ``evaluate.lr``);
- ``mkdt_<subset>`` (only when listed, and listed in ``distill.variants``): the distill stage's
  variant that starts from that init subset (``distill/variants/<subset>/``), at its own learned
  alpha_syn, e.g. ``mkdt_random``, the paper's "MKDT (Rnd Sub)";
- ``krr_st`` (only when listed): the KRR-ST set of the krr_st stage (``krr_st/``), at
  ``evaluate.lr`` (KRR-ST learns no step size);
- ``mtt_ssl`` (only when listed): the MTT-SSL set written by ``mkdt analyze mtt``, at its own lr
  (``evaluate.lr``); rerun this stage with ``--force`` after rerunning that analysis;
- ``ext:NAME`` (only when listed): the set ``mkdt import NAME SOURCE`` wrote to
  ``imported/NAME.safetensors`` (:mod:`mkdt.external`), at ``evaluate.lr``, or at its learned
  step size when it was imported from another mkdt run; the same recipe and label subsets as the
  other methods;
- ``random@alpha`` / ``high_loss@alpha``: the lr-matched controls, the same real subsets
  pre-trained at MKDT's learned alpha_syn. MKDT's lead over them is what the distilled pixels
  carry; its lead over ``random`` and ``high_loss`` mixes that with the larger step size.

For every method and seed s < ``evaluate.seeds`` a student (``evaluate.model``, default
``experts.student``) is initialised from ``derive_seed(seed, "evaluate", method, s, "init")`` and
trained ONCE with the KD loop (:func:`mkdt.train.kd.train_student`, batch order from
``derive_seed(seed, "evaluate", method, s, "batches")``). Its penultimate features are then probed
on every task and label fraction as :mod:`mkdt.downstream` describes (labelled images drawn from
``derive_seed(seed, "labels", task, fraction, s)``, the same for every method). With
``evaluate.protocols`` listing ``finetune``, a copy of the same student (the probe sees the
unchanged one) is also fine-tuned with a new linear head on the same labelled images
(:mod:`mkdt.train.finetune`); its records carry ``protocol: finetune`` and get their own table. A
task whose files are not found is refused before any compute, or with
``evaluate.missing_tasks=skip`` left out and named under the table and in the record's
``skipped_tasks``.

Artifacts: ``evaluate/partial.json`` (every finished (method, seed) with its results under
``probes``, one per protocol, task and fraction, and its set's digest: an interrupted stage
resumes, and another method list or ``--force`` reuses the runs, :func:`partial_fingerprint`),
``OUT/results.json`` and ``OUT/results.md`` (:mod:`mkdt.results`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from mkdt.config import Config
from mkdt.data import ImageData
from mkdt.data.real import RealData
from mkdt.downstream import (
    available_tasks,
    candidate_lrs,
    finetune,
    load_task,
    pretrain,
    pretrain_grid,
    probe,
    student_model,
    tuned_probe,
    window_summary,
)
from mkdt.errors import TrainingDiverged
from mkdt.files import fingerprint, read_metadata
from mkdt.graph import defining
from mkdt.methods import INIT_METHODS, PROTOCOLS, method_label, method_order, parse_method
from mkdt.results import (
    build_records,
    comparisons_text,
    costs_text,
    fraction_label,
    mkdt_margins,
    results_table,
    set_costs,
)
from mkdt.runtime import Runtime, progress
from mkdt.stages.context import StageContext
from mkdt.store import RunDir, SyntheticSet

STAGE = "evaluate"
# the stages whose cost a set may carry
UPSTREAM = ("teacher", "targets", "experts", "init", "distill", "krr_st")


# ---------------------------------------------------------------- pre-training


def pretraining_sets(
    store: RunDir, config: Config, real: RealData, z: torch.Tensor
) -> dict[str, SyntheticSet | None]:
    """Each method's pre-training set (None for no_pretrain)."""
    lr = config.evaluate.lr
    methods = [parse_method(name) for name in config.evaluate.methods]
    subsets = {m.subset for m in methods if m.source == "init" and m.subset is not None}
    indices = store.load_indices(config.init.images, subsets) if subsets else {}
    synthetic = store.load_synthetic() if any(m.step_size == "alpha" for m in methods) else None
    sets: dict[str, SyntheticSet | None] = {}
    for m in methods:
        if m.source == "distill":
            sets[m.name] = synthetic
        elif m.source == "mtt":
            sets[m.name] = store.load_mtt_ssl()
        elif m.source == "krr_st":
            sets[m.name] = store.load_krr_st(lr)
        elif m.source == "data":
            sets[m.name] = SyntheticSet(real.inputs, z, lr)
        elif m.external is not None:
            sets[m.name] = store.load_imported(m.external, lr)
        elif m.source == "variant" and m.subset is not None:
            sets[m.name] = store.load_variant(m.subset)
        elif m.source == "init" and m.subset is not None:
            idx = indices[m.subset].to(real.device)
            step = synthetic.lr if m.step_size == "alpha" and synthetic is not None else lr
            sets[m.name] = SyntheticSet(real.inputs[idx], z[idx], step)
        else:  # no_pretrain
            sets[m.name] = None
    return sets


# ---------------------------------------------------------------- stage


def accuracy_phrase(config: Config) -> str:
    """What the table's accuracies are: "Linear-probe test accuracy (%)" for the probe alone, with
    fine-tuning its recipe too."""
    protocols, f = config.evaluate.protocols, config.evaluate.finetune
    if "finetune" not in protocols:
        return "Linear-probe test accuracy (%)"
    recipe = (
        f"fine-tuning: {f.steps} SGD steps of batch {f.batch_size}, lr {f.lr:g} with cosine decay, "
        f"momentum {f.momentum:g}, weight decay {f.weight_decay:g}, "
        f"{'crop + flip augmentation' if f.augment else 'no augmentation'}"
    )
    both = "probe" in protocols
    return f"Test accuracy (%) of the {'linear probe and of ' if both else ''}fine-tuning ({recipe})"


def selection_phrase(config: Config) -> str:
    """How the table's pre-training step sizes were chosen (``evaluate.selection``)."""
    v = config.evaluate
    if v.selection == "fixed":
        return (
            f"step sizes fixed as in the paper (real sets at evaluate.lr {v.lr:g}, distilled sets at "
            "their learned alpha_syn)"
        )
    grid = ", ".join(f"{lr:g}" for lr in sorted(v.lr_grid))
    return (
        f"step size of every set tuned: pre-trained at each of {grid} (a distilled or imported set "
        f"also at its learned one), the one with the best linear-probe accuracy on a held-out "
        f"{100 * v.validation_fraction:g}% of the labelled images kept, then tested once; every set "
        "uses the same student initialisations and batch orders (paired by seed)"
    )


def table_header(config: Config, data: ImageData, sets: dict[str, SyntheticSet | None]) -> str:
    """The line above the results table: the protocols, pre-training data, |D_syn|, seeds, learned
    lr."""
    parts = [
        f"{accuracy_phrase(config)}, mean ± std over {config.evaluate.seeds} seed(s); "
        f"{student_model(config).arch} students pre-trained on {config.data.name} "
        f"({data.num_train} images); {selection_phrase(config)}"
    ]
    if any(m.kind in ("distilled", "krr_st") or m.name in INIT_METHODS for m in map(parse_method, sets)):
        parts.append(f"|D_syn| = {config.init.images}")
    if (mkdt := sets.get("mkdt")) is not None:
        parts.append(f"MKDT learned lr {mkdt.lr:.4g}")
        parts.append(window_summary(config, data.num_train))
    for name, pset in sets.items():
        method = parse_method(name)
        if method.source == "variant" and pset is not None:
            parts.append(f"{method.label} learned lr {pset.lr:.4g}")
        if method.kind == "external" and pset is not None:
            parts.append(f"{method.label}: {len(pset.images)} images at lr {pset.lr:.4g}")
    return "; ".join(parts) + "."


def pretraining_seconds(runs: dict[str, Any]) -> dict[str, float]:
    """Mean seconds of one pre-training per method (no_pretrain, which trains nothing, left out)."""
    seconds: dict[str, list[float]] = {}
    for r in runs.values():
        if r["method"] != "no_pretrain":
            seconds.setdefault(r["method"], []).append(r["seconds"])
    return {method: statistics.fmean(values) for method, values in seconds.items()}


def evaluate_one(
    ctx: StageContext,
    method: str,
    seed: int,
    pset: SyntheticSet | None,
    tasks: dict[str, ImageData],
    out_dim: int,
    lrs: list[float],
) -> dict[str, Any]:
    """Pre-train the (method, seed) student and probe it on every task: the run's entry in
    partial.json; a diverged pre-training is recorded as such, without probes. Under the tuned
    protocol the students of every step size of ``lrs`` (:func:`evaluate_tuned`)."""
    if ctx.config.evaluate.selection == "tuned" and pset is not None:
        return evaluate_tuned(ctx, method, seed, pset, tasks, out_dim, lrs)
    t0, rt = ctx.seconds(), ctx.runtime
    try:
        student, kd_loss = pretrain(ctx.config, method, seed, pset, ctx.real.data, out_dim, rt)
        seconds = ctx.seconds() - t0
        probes = probe(ctx.config, student, tasks, seed, ctx.real.data, rt.device)
        if "finetune" in ctx.config.evaluate.protocols:  # after the probe, on a copy of the student
            probes += finetune(ctx.config, lambda *_: student, tasks, seed, ctx.real.data, rt)
        diverged = False
    except TrainingDiverged as exc:  # no accuracy is computed from a diverged encoder
        print(f"evaluate: {exc}; {method} seed {seed} is marked diverged in the results", file=sys.stderr)
        seconds, kd_loss, probes, diverged = ctx.seconds() - t0, [], [], True
    return {
        "method": method,
        "seed": seed,
        "seconds": seconds,
        "kd_loss": kd_loss,
        "probes": probes,
        "diverged": diverged,
    }


def evaluate_tuned(
    ctx: StageContext,
    method: str,
    seed: int,
    pset: SyntheticSet,
    tasks: dict[str, ImageData],
    out_dim: int,
    lrs: list[float],
) -> dict[str, Any]:
    """:func:`evaluate_one` under ``evaluate.selection=tuned``: pre-train a student at every
    step size of ``lrs`` (:func:`~mkdt.downstream.candidate_lrs`; a diverged one is left out of
    the choice and listed under ``diverged_lrs``), then choose per task and fraction on held-out
    labels (:func:`~mkdt.downstream.tuned_probe`). ``kd_loss`` maps each step size (as text) to its
    losses per epoch; ``seconds`` is the pre-training time of all of them."""
    t0, rt, config = ctx.seconds(), ctx.runtime, ctx.config
    parallel = config.evaluate.parallel or (len(lrs) if rt.device.type == "cuda" else 1)
    trained = pretrain_grid(config, method, seed, pset, ctx.real.data, out_dim, rt, lrs, parallel)
    students = {lr: student for lr, (student, _) in trained.items() if student is not None}
    kd_loss = {f"{lr:g}": losses for lr, (student, losses) in trained.items() if student is not None}
    failed = [lr for lr, (student, _) in trained.items() if student is None]
    seconds = ctx.seconds() - t0
    if failed:
        print(
            f"evaluate: {method} seed {seed} diverged at step size(s) "
            f"{', '.join(f'{lr:g}' for lr in failed)}; left out of the choice",
            file=sys.stderr,
        )
    probes = tuned_probe(config, students, tasks, seed, ctx.real.data, rt.device) if students else []
    if probes and "finetune" in config.evaluate.protocols:  # the probe's choice, on a copy
        chosen = {(p["task"], p["label_fraction"]): p["lr"] for p in probes}
        tuned = finetune(config, lambda t, f: students[chosen[t, f]], tasks, seed, ctx.real.data, rt)
        probes += [{**p, "lr": chosen[p["task"], p["label_fraction"]]} for p in tuned]
    return {
        "method": method,
        "seed": seed,
        "seconds": seconds,
        "kd_loss": kd_loss,
        "diverged_lrs": failed,
        "probes": probes,
        "diverged": not students,
    }


def partial_fingerprint(config: Config, skipped: dict[str, str]) -> str:
    """The fingerprint of the runs partial.json may hold for this evaluation: the evaluation's
    definition without ``evaluate.methods`` and without the stages only some methods read
    (:func:`~mkdt.graph.defining` with ``conditional=False``: the protocol, D_real and the teacher),
    and with the ``skipped`` tasks (a resume that finds a task skipped before starts over: its runs
    lack that task's probes). What a run of one method depends on beyond it is its pre-training set,
    checked by the set's digest (:meth:`~mkdt.store.SyntheticSet.digest`), so adding or removing a
    method (MKDT and KRR-ST too) reuses the finished runs of the others, and a set that changed (a
    redone distill stage, ``mkdt import --force``) is run again."""
    own = defining(config, STAGE, conditional=False)
    own["evaluate"] = {k: v for k, v in own["evaluate"].items() if k != "methods"}
    return fingerprint({**own, "skipped_tasks": sorted(skipped)} if skipped else own)


def evaluate_all(
    ctx: StageContext,
    sets: dict[str, SyntheticSet | None],
    tasks: dict[str, ImageData],
    out_dim: int,
    skipped: dict[str, str],
) -> dict[str, Any]:
    """Every (method, seed) run by its key "method/seed": those ``evaluate/partial.json`` holds
    for this protocol and ``skipped`` tasks (:func:`partial_fingerprint`) whose set has the same
    digest, and the others, run now (under torch.distributed split between the ranks) with
    partial.json rewritten after each round (keeping the runs of methods not evaluated now)."""
    store, rt, v = ctx.store, ctx.runtime, ctx.config.evaluate
    lrs = {m: candidate_lrs(ctx.config, m, pset) for m, pset in sets.items()}
    fp = partial_fingerprint(ctx.config, skipped)
    identity = {m: pset.digest() for m, pset in sets.items() if pset is not None}
    # every rank starts from rank 0's reading: rank 0 rewrites the file after each round, so a
    # rank reading it later would see fewer runs to do and fall out of step
    runs: dict[str, Any] = rt.gather_objects(store.load_partial(fp) if rt.is_main else None)[0] or {}
    # a run whose set changed is run again; the runs of methods not evaluated now are kept
    runs = {
        key: r
        for key, r in runs.items()
        if r["method"] not in sets or r.get("set_sha256") == identity.get(r["method"])
    }
    todo = [(m, s) for m in v.methods for s in range(v.seeds) if f"{m}/{s}" not in runs]
    # under torch.distributed the ranks take turns: rank r runs todo[i + r] of each round
    rank, world = (rt.rank, rt.world) if rt.distributed else (0, 1)
    for i in progress(range(0, len(todo), world), desc="evaluate", unit="run" if world == 1 else "round"):
        mine = todo[i + rank] if i + rank < len(todo) else None
        done = (
            evaluate_one(ctx, mine[0], mine[1], sets[mine[0]], tasks, out_dim, lrs[mine[0]]) if mine else None
        )
        if done is not None and done["method"] in identity:
            done["set_sha256"] = identity[done["method"]]
        for run in rt.gather_objects(done):
            if run is not None:
                runs[f"{run['method']}/{run['seed']}"] = run
        if rt.is_main:
            store.save_partial(fp, runs)
    return {key: r for key, r in runs.items() if r["method"] in v.methods}


def diverged_seeds(runs: dict[str, Any]) -> dict[str, list[int]]:
    """The seeds whose pre-training diverged, by method (methods without any left out)."""
    diverged: dict[str, list[int]] = {}
    for r in runs.values():
        if r.get("diverged"):
            diverged.setdefault(r["method"], []).append(r["seed"])
    return diverged


def result_records(config: Config, runs: dict[str, Any], tasks: list[str]) -> list[dict[str, Any]]:
    """The records (:mod:`mkdt.results`) of the runs' probes and fine-tunings, each with its
    ``selection`` (``evaluate.selection``) and, under ``tuned``, ``lr_grid`` and per seed (in the
    order of ``seeds``) the chosen step size ``lrs``, the ``lr_candidates`` and their
    ``val_accuracies`` (null for no_pretrain, which has none)."""
    v = config.evaluate
    probes = [{"method": r["method"], "seed": r["seed"], **p} for r in runs.values() for p in r["probes"]]
    protocols = [p for p in PROTOCOLS if p in v.protocols]
    records = build_records(probes, v.methods, tasks, v.label_fractions, diverged_seeds(runs), protocols)
    if v.selection == "fixed":
        return [{**r, "selection": "fixed"} for r in records]
    found = {
        (p.get("protocol", "probe"), p["method"], p["task"], p["label_fraction"], p["seed"]): p
        for p in probes
    }
    tuned = []
    for r in records:
        chosen = [found[r["protocol"], r["method"], r["task"], r["label_fraction"], s] for s in r["seeds"]]
        tuned.append(
            {
                **r,
                "selection": "tuned",
                "lr_grid": list(v.lr_grid),
                "lrs": [p.get("lr") for p in chosen],
                "lr_candidates": [p.get("lr_candidates") for p in chosen],
                "val_accuracies": [p.get("val_accuracies") for p in chosen],
            }
        )
    return tuned


def with_imported_kinds(store: RunDir, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, those of each imported set ``ext:NAME`` with its ``kind``
    (:func:`mkdt.results.set_kind`): ``distilled`` when it was imported from another mkdt run's
    distill stage (an MKDT variant: compared like MKDT, never "the best same-size set"), else
    ``external``. Reads each set's header alone: :func:`pretraining_sets` has checked the files."""
    kinds = {}
    for name in dict.fromkeys(r["method"] for r in records):
        if (imported := parse_method(name).external) is not None:
            from_run = read_metadata(store.imported_path(imported)).get("kind") == "run"
            kinds[name] = "distilled" if from_run else "external"
    return [{**r, "kind": kinds[r["method"]]} if r["method"] in kinds else r for r in records]


def chosen_lrs_text(records: list[dict[str, Any]]) -> str:
    """Under the tuned protocol, a markdown table of the step size each set chose per seed (label
    fraction x method rows, one column per task, probe records); "" otherwise."""
    rows = [r for r in records if r.get("selection") == "tuned" and r["protocol"] == "probe"]
    rows = [r for r in rows if any(lr is not None for lr in r["lrs"])]
    if not rows:
        return ""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = {
        (r["label_fraction"], r["method"], r["task"]): ", ".join(f"{lr:.3g}" for lr in r["lrs"]) for r in rows
    }
    lines = [
        "Step size chosen on held-out labels, per seed:\n",
        "| labels | method | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for fraction in sorted({r["label_fraction"] for r in rows}):
        for method in sorted({r["method"] for r in rows}, key=method_order):
            if any((fraction, method, t) in cells for t in tasks):
                row = [cells.get((fraction, method, t), "–") for t in tasks]
                lines.append(
                    f"| {fraction_label(fraction)} | {method_label(method)} | " + " | ".join(row) + " |"
                )
    return "\n".join(lines + grid_edge_warnings(rows)) + "\n"


def grid_edge_warnings(records: list[dict[str, Any]]) -> list[str]:
    """One line per tuned record whose chosen step size is the largest (or the smallest) of
    ``lr_grid`` in at least half of its seeds: the best step size may lie beyond the grid."""
    warnings = []
    for r in records:
        chosen = [lr for lr in r["lrs"] if lr is not None]
        for edge, word, beyond in (
            (max(r["lr_grid"]), "largest", "above"),
            (min(r["lr_grid"]), "smallest", "below"),
        ):
            hits = sum(lr == edge for lr in chosen)
            if chosen and 2 * hits >= len(chosen):
                where = f"{r['task']}, {fraction_label(r['label_fraction'])} labels"
                warnings.append(
                    f"\nWarning: {method_label(r['method'])} ({where}) chose the {word} step size of "
                    f"evaluate.lr_grid ({edge:g}) in {hits} of "
                    f"{len(chosen)} seeds; its best may lie {beyond} the grid: add a step size there."
                )
    return warnings


def results_text(
    config: Config,
    data: ImageData,
    sets: dict[str, SyntheticSet | None],
    records: list[dict[str, Any]],
    skipped: dict[str, str],
    costs: str = "",
) -> str:
    """``results.md``: the table under its header line, MKDT's margins, the chosen step sizes, the
    paired differences, the skipped tasks, and last the ``costs`` section (wall and CPU seconds:
    the one part that differs between two runs of one config)."""
    text = results_table(records, table_header(config, data, sets))
    for part in (mkdt_margins(records), chosen_lrs_text(records), comparisons_text(records)):
        if part:
            text += "\n" + part
    if skipped:
        text += f"\nNot evaluated (files not found, evaluate.missing_tasks=skip): {', '.join(skipped)}.\n"
    if costs:
        text += "\n" + costs
    return text


def run(
    config: Config,
    out: str | Path,
    *,
    force: bool = False,
    real: RealData | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Pre-train and probe every (method, seed), reusing the runs partial.json holds for this
    protocol and the same sets (:func:`partial_fingerprint`; ``force`` keeps them too: delete the
    file to run everything again); write ``out/results.json`` and ``out/results.md``."""
    ctx = StageContext(STAGE, config, out, real, runtime)
    store = ctx.store
    if (done := ctx.finished(force)) is not None:  # forced: partial.json's runs are still reused
        return done
    entries, skipped = available_tasks(config)  # before any compute: missing_tasks=error raises
    data = ctx.real.data
    z = store.load_targets(ctx.real.num_train).to(ctx.runtime.device)
    sets = pretraining_sets(store, config, ctx.real, z)
    tasks = {entry: load_task(config, entry, data) for entry in entries}
    runs = evaluate_all(ctx, sets, tasks, z.shape[1], skipped)
    records = with_imported_kinds(store, result_records(config, runs, list(tasks)))
    costs = set_costs(config.evaluate.methods, {stage: store.record(stage) for stage in UPSTREAM})
    seconds = pretraining_seconds(runs)
    table = results_text(config, data, sets, records, skipped, costs_text(costs, seconds))
    if ctx.runtime.is_main:
        store.save_results(records, table, costs)
        print(table, end="")
    return ctx.finish(
        {
            "results": records,
            "seconds_per_pretraining": seconds,
            "costs": costs,
            "skipped_tasks": list(skipped),
        },
        (store.results_path, store.results_table_path),
    )
