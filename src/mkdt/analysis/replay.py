"""Does the distilled set reach its target? (``mkdt analyze replay``)

For each chosen expert k, its own initialisation theta*_{k,0} is trained on the finished D_syn
exactly as distillation's inner loop does (:func:`mkdt.train.matching.inner_steps`: N =
``distill.syn_steps`` plain SGD steps of ``distill.batch_syn`` images at the learned alpha_syn,
batches drawn from ``derive_seed(seed, "replay", k)``). The same steps are replayed on the set
distillation started from (its init subset, with its teacher targets, at the same alpha_syn), so
the comparison isolates what the distilled pixels add. Each result is scored against the target
theta*_{k,M} with the matching distance ||theta - theta*_{k,M}||^2 / ||theta*_{k,0} -
theta*_{k,M}||^2 (1 = no closer than the start, 0 = on the target) and linear-probed with the
evaluation's protocol (label seed k), next to the expert at epochs 0 and M.

If the distilled replay probes like the target and the target probes above the start, the set
does its job; if the target itself probes no better than the start, the window holds no learning
(see ``mkdt analyze trajectories``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from torch.nn.utils import vector_to_parameters

from mkdt.analysis.common import int_list, open_run
from mkdt.config import Config
from mkdt.downstream import probe, student_model
from mkdt.errors import ConfigError
from mkdt.files import fingerprint, write_json, write_text
from mkdt.graph import defining
from mkdt.nn.losses import matching_distance
from mkdt.nn.models import build_network
from mkdt.runtime import Runtime, derive_seed, generator, progress
from mkdt.store import RunDir
from mkdt.train.matching import inner_steps, sample_batches

SUMMARY = "train the experts' inits on the distilled set as the inner loop does; probe against the target"
NEEDS_RUN = True
COLUMNS = ("start", "init set", "distilled", "target")


def replay(
    config: Config, out: str | Path, experts: list[int] | None = None, *, runtime: Runtime | None = None
) -> dict[str, Any]:
    """Replay ``experts`` (default: the first 3) and write ``OUT/analysis/replay.{md,json}``."""
    experts = list(range(min(3, config.experts.num_experts))) if experts is None else experts
    if bad := [k for k in experts if not 0 <= k < config.experts.num_experts]:
        raise ConfigError(f"--experts: {bad} outside [0, {config.experts.num_experts}) (experts.num_experts)")
    run = open_run(config, out, ["distill"], runtime=runtime)
    store, rt, real, tasks, z = run.store, run.runtime, run.real, run.tasks, run.targets
    d = config.distill
    syn = store.load_synthetic()
    idx = store.load_indices(config.init.images)[d.init].to(rt.device)
    sets = {
        "init set": (real.inputs[idx], z[idx]),
        "distilled": (syn.images.to(rt.device), syn.targets.to(rt.device)),
    }
    student = build_network(student_model(config), real.data.channels, real.data.image_size, z.shape[1]).to(
        rt.device
    )
    fp = fingerprint(defining(config, "experts"))
    rows = []
    for k in progress(experts, desc="replay", unit="expert"):
        trajectory = store.load_expert(k, fp, [0, d.expert_epochs])
        start, target = trajectory.at(0).to(rt.device), trajectory.at(d.expert_epochs).to(rt.device)
        batches = sample_batches(
            len(syn.images),
            d.batch_syn,
            d.syn_steps,
            generator(derive_seed(config.seed, "replay", k), rt.device),
        )
        thetas = {"start": start, "target": target}
        for name, (images, targets) in sets.items():
            thetas[name] = inner_steps(student, start, images, targets, syn.lr, batches, rt.autocast)
        for name in COLUMNS:
            vector_to_parameters(thetas[name], student.parameters())
            distance = float(matching_distance(thetas[name][None], start[None], target[None]))
            for p in probe(config, student, tasks, k, real.data, rt.device):
                rows.append(
                    {
                        "expert": k,
                        "weights": name,
                        "distance": distance,
                        **{key: p[key] for key in ("task", "label_fraction", "accuracy")},
                    }
                )
    record: dict[str, Any] = {
        "experts": experts,
        "alpha_syn": syn.lr,
        "syn_steps": d.syn_steps,
        "expert_epochs": d.expert_epochs,
        "rows": rows,
    }
    text = table(rows, config)
    record["verdict"] = verdict(rows)
    write_json(store.analysis_path("replay", "json"), record)
    write_text(store.analysis_path("replay", "md"), text + "\n" + record["verdict"] + "\n")
    return record


def _mean(rows: list[dict[str, Any]], key: str, **match: Any) -> float:
    return statistics.fmean(r[key] for r in rows if all(r[m] == v for m, v in match.items()))


def table(rows: list[dict[str, Any]], config: Config) -> str:
    """Markdown: matching distance and probe accuracy per weights, mean over the experts."""
    d = config.distill
    keys = sorted({(r["task"], r["label_fraction"]) for r in rows})
    head = " | ".join(f"{task} {100 * f:g}%" for task, f in keys)
    lines = [
        f"Replay of the inner loop ({d.syn_steps} SGD steps of {d.batch_syn} images at the learned "
        f"alpha_syn) from the experts' initialisations, mean over {len({r['expert'] for r in rows})} "
        f"experts; target = the expert at epoch {d.expert_epochs}. Distance: 1 = start, 0 = target.",
        "",
        f"| weights | matching distance | {head} |",
        "|---|---|" + "---|" * len(keys),
    ]
    for name in COLUMNS:
        accs = " | ".join(
            f"{_mean(rows, 'accuracy', weights=name, task=t, label_fraction=f):.2f}" for t, f in keys
        )
        lines.append(f"| {name} | {_mean(rows, 'distance', weights=name):.3f} | {accs} |")
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict[str, Any]]) -> str:
    """One line: how far the distilled set gets and whether its students probe like the target."""

    def acc(name: str) -> float:
        return _mean(rows, "accuracy", weights=name)

    dist = _mean(rows, "distance", weights="distilled")
    base = _mean(rows, "distance", weights="init set")
    reached = acc("distilled") - acc("start")
    wanted = acc("target") - acc("start")
    return (
        f"the distilled set covers {100 * (1 - dist):.0f}% of the way to the target in weight space "
        f"(its init set {100 * (1 - base):.0f}%); its students gain {reached:+.2f} points over the start "
        f"where the target gains {wanted:+.2f} (mean over tasks and label fractions)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=int_list, help="expert indices to replay (default: 0,1,2)")


def main(args: argparse.Namespace, config: Config) -> None:
    replay(config, args.out, args.experts)
    store = RunDir(args.out)
    print(store.analysis_path("replay", "md").read_text(), end="")
    print(f"wrote {store.analysis_dir}/replay.{{md,json}}")
