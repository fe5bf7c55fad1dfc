"""``mkdt`` command line: a thin layer over the stages' ``run(config, out)``.

    mkdt STAGE [--preset NAME] [--config FILE] [--out DIR] [--force] [key=value ...]
        STAGE: teacher, targets, experts, init, distill, evaluate, run (all stages in order)
    mkdt config  [--preset NAME] [--config FILE] [key=value ...]   print the resolved config
    mkdt presets                                                   list the presets
    mkdt datasets                                                  list the registered datasets
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mkdt import __version__
from mkdt.config import (
    Config,
    dump_config,
    iter_fields,
    load_config,
    preset_description,
    preset_names,
)
from mkdt.errors import MkdtError

STAGE_HELP = {
    "teacher": ("train the SSL teacher (or load teacher.checkpoint) and linear-probe it",
                ("seed", "device", "data.", "teacher.")),
    "targets": ("encode D_real with the teacher: the KD regression targets", ("targets.",)),
    "experts": ("train K KD students and save their weights each epoch (expert trajectories)",
                ("experts.", "distill.max_start_epoch", "distill.expert_epochs")),
    "init": ("choose the initial synthetic images: high-KD-loss and random real subsets",
             ("distill.images",)),
    "distill": ("optimise the synthetic images (and alpha_syn) by matching expert trajectories",
                ("distill.",)),
    "evaluate": ("pre-train a student on each set (baselines and MKDT), linear-probe it, write results",
                 ("evaluate.",)),
    "run": ("run every stage in order, skipping finished ones (resumes an interrupted run)", ("",)),
}
DEFAULT_PRESET = "demo"


def _options_epilog(prefixes: tuple[str, ...]) -> str:
    lines = ["config keys (set as key=value; defaults before presets):"]
    for key, default, text in iter_fields(Config()):
        if any(key.startswith(p) for p in prefixes):
            lines.append(f"  {key} = {default!r}\n      {text}")
    lines.append(f"presets: {', '.join(preset_names())} (see `mkdt presets`)")
    return "\n".join(lines)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"settings to start from (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys, after the preset")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, applied last (e.g. experts.num_experts=4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkdt", description="Dataset distillation for self-supervised pre-training (MKDT).",
        epilog="Run `mkdt COMMAND --help` for every option of a command.")
    parser.add_argument("--version", action="version", version=f"mkdt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, prefixes) in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text, epilog=_options_epilog(prefixes),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        p.add_argument("--out", metavar="DIR",
                       help="run directory holding every artifact (default: runs/<preset>)")
        p.add_argument("--force", action="store_true",
                       help="recompute this stage (and drop the records of later stages)")
    p = sub.add_parser("config", help="print the resolved config as YAML",
                       description="print the resolved config (defaults <- preset <- file <- overrides)")
    _add_config_args(p)
    sub.add_parser("presets", help="list the presets", description="list the presets")
    sub.add_parser("datasets", help="list the registered datasets and their on-disk formats",
                   description="list the registered datasets and their on-disk formats")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before and after options (argparse only collects one run)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "presets":
            for name in preset_names():
                print(f"{name:20s} {preset_description(name)}")
            return 0
        if args.command == "datasets":
            from mkdt.data import DATASETS

            for name, spec in sorted(DATASETS.items()):
                print(f"{name:14s} {spec.description}")
            return 0
        config = load_config(args.preset, args.config, args.overrides)
        if args.command == "config":
            print(dump_config(config), end="")
            return 0
        from mkdt.pipeline import STAGES, run_stages

        stages = list(STAGES) if args.command == "run" else [args.command]
        out = args.out or f"runs/{args.preset}"
        run_stages(config, out, stages, force=args.force)
        print(f"done: {', '.join(stages)} in {out}")
        return 0
    except MkdtError as exc:
        print(f"mkdt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mkdt: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
