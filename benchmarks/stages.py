"""How long would a preset take here? Each stage runs scaled down; its time is measured and scaled up.

Usage::

    python benchmarks/stages.py --preset cifar10-2pct device=cuda data.root=/data/cifar10 \\
        precision=bf16 channels_last=true --json stages-h100.json
    python benchmarks/stages.py --preset cifar10-cpu                  # 7.6 minutes on 2 CPU cores
    python benchmarks/stages.py                                       # the demo preset: ~15 s

Made for a time-limited GPU: the paper-size cifar10-2pct (1000 teacher epochs, 100 experts, 5000
iterations) takes hours, its scaled-down version minutes. The stages run in order into a scratch
run directory (``--out``) with the product code (each stage's ``run``, D_real loaded once); every
stage's seconds are those it records in its ``stage.json``. Scaling, linear in each stage's unit of work:

- data: loading D_real (decode, cache, pool), measured as is;
- teacher: with ``teacher.checkpoint``, measured as is; otherwise trained for 3 epochs: the median
  of epochs 2-3 (its ``epoch_seconds``) x ``teacher.epochs`` + the rest of the stage's time (epoch
  1's warm-up, saving, the probe);
- targets: measured as is (one pass over D_real);
- experts: G experts (G = one ``experts.parallel`` group: 10 on CUDA, 1 on CPU by default) with the
  full recipe, times K / G;
- init: with those G experts, times K / G (its work is one KD-loss pass per expert);
- distill: ``--iterations`` iterations; the mean time of iterations 2.. (the first also warms up)
  x ``distill.iterations`` + the rest of the stage's time;
- evaluate: one seed of every method, times ``evaluate.seeds``.

Prints a table (measured seconds, the scaled-down and the full amounts, the estimate and how it was
made) and the total; ``--json PATH`` writes the rows. An estimate is a prediction, not a
measurement: report it as such, next to the measured seconds it came from.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, report  # noqa: E402

from mkdt.config import Config, load_config  # noqa: E402
from mkdt.data.real import load_real  # noqa: E402
from mkdt.pipeline import RUNNERS  # noqa: E402
from mkdt.runtime import Runtime, resolve_device  # noqa: E402
from mkdt.stages.experts import AUTO_PARALLEL  # noqa: E402
from mkdt.store import RunDir  # noqa: E402

TEACHER_EPOCHS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="demo", help="preset to estimate (default demo)")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys, after the preset")
    parser.add_argument(
        "--out", type=Path, help="scratch run directory (default runs/stage-times/PRESET); emptied first"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=20,
        help="distillation iterations run (default 20; with 5 the demo's per-iteration time "
        "came out 1.6x too high: the warm-up spans several iterations)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    args.out = args.out or Path("runs/stage-times") / args.preset
    return args


def _record(out: Path, stage: str) -> dict[str, Any]:
    record = RunDir(out).record(stage)
    if record is None:
        raise RuntimeError(f"{stage} did not finish in {out}")
    return record


def estimate(full: Config, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the scaled-down stages into ``args.out`` and return one row per stage."""
    device = resolve_device(full.device)
    e, d, v, t = full.experts, full.distill, full.evaluate, full.teacher
    group = min(e.num_experts, e.parallel or AUTO_PARALLEL.get(device.type, 1))
    iterations = min(args.iterations, d.iterations)
    shrink = [f"experts.num_experts={group}", f"distill.iterations={iterations}", "evaluate.seeds=1"]
    if t.checkpoint is None:
        shrink += [f"teacher.epochs={TEACHER_EPOCHS}", "teacher.warmup_epochs=0"]
    small = load_config(args.preset, args.config, [*args.overrides, *shrink])
    rows: list[dict[str, Any]] = []

    def row(stage: str, measured: float, ran: str, full_amount: str, estimate_s: float, how: str) -> None:
        rows.append(
            {
                "stage": stage,
                "measured_seconds": measured,
                "ran": ran,
                "full": full_amount,
                "estimated_seconds": estimate_s,
                "how": how,
            }
        )

    def run(stage: str) -> dict[str, Any]:
        RUNNERS[stage](small, args.out, real=real, runtime=runtime)
        return _record(args.out, stage)

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    runtime = Runtime.create(small.device, small.precision, small.channels_last, small.compile)
    real = load_real(small.data, small.seed, runtime.device)
    loading = time.perf_counter() - t0
    row("data", loading, "load D_real", "load D_real", loading, "measured")

    record = run("teacher")
    if t.checkpoint is not None:
        row("teacher", record["seconds"], "load checkpoint", "load checkpoint", record["seconds"], "measured")
    else:
        epochs = record["result"]["epoch_seconds"]
        per_epoch = statistics.median(epochs[1:])  # steady state; epoch 1 also warms up
        rest = record["seconds"] - per_epoch * len(epochs)  # warm-up, encoder save, probe
        row(
            "teacher",
            record["seconds"],
            f"{len(epochs)} epochs",
            f"{t.epochs} epochs",
            rest + per_epoch * t.epochs,
            f"{rest:.3g} s + {per_epoch:.3g} s/epoch",
        )

    s = run("targets")["seconds"]
    row("targets", s, "all images", "all images", s, "measured")

    for stage in ("experts", "init"):
        s = run(stage)["seconds"]
        row(
            stage,
            s,
            f"{group} experts",
            f"{e.num_experts} experts",
            s * e.num_experts / group,
            f"x {e.num_experts}/{group}",
        )

    record = run("distill")
    s, result = record["seconds"], record["result"]
    loop = result["seconds_per_iteration"] * iterations
    first = result["seconds_first_iteration"]
    per_it = (loop - first) / (iterations - 1) if iterations > 1 else loop  # steady state
    rest = s - per_it * iterations  # set-up and the first iteration's warm-up
    row(
        "distill",
        s,
        f"{iterations} iterations",
        f"{d.iterations} iterations",
        rest + per_it * d.iterations,
        f"{rest:.3g} s + {per_it:.3g} s/it ({result['backend']})",
    )

    s = run("evaluate")["seconds"]
    row(
        "evaluate",
        s,
        f"{len(v.methods)} methods x 1 seed",
        f"{len(v.methods)} methods x {v.seeds} seeds",
        s * v.seeds,
        f"x {v.seeds}",
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    full = load_config(args.preset, args.config, args.overrides)
    start = time.perf_counter()
    rows = estimate(full, args)
    device = hardware(resolve_device(full.device))
    for r in rows:
        r["device"] = device
    rows.append(
        {
            "stage": "total",
            "measured_seconds": sum(r["measured_seconds"] for r in rows),
            "ran": "",
            "full": "",
            "estimated_seconds": sum(r["estimated_seconds"] for r in rows),
            "how": "sum",
            "device": device,
        }
    )
    report(
        rows,
        ["stage", "measured_seconds", "ran", "full", "estimated_seconds", "how"],
        f"preset {args.preset} {' '.join(args.overrides)}; device: {device}; this estimate took "
        f"{time.perf_counter() - start:.0f} s; estimated full run "
        f"{rows[-1]['estimated_seconds'] / 60:.1f} min",
        args.json,
    )


if __name__ == "__main__":
    main()
