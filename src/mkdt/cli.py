"""``mkdt`` command line: a thin layer over the stages' ``run(config, out)``.

mkdt STAGE [--preset NAME] [--config FILE] [--out DIR] [--force] [key=value ...]
    STAGE: teacher, targets, experts, init, distill, evaluate, run (all stages in order)
mkdt analyze NAME [--preset NAME] [--out RUN] [options] [key=value ...]
    NAME: trajectories, replay, variance, mtt, theorem (see `mkdt analyze --help`)
mkdt report RUN [RUN ...] --out DIR                            tables and figures of runs (HTML, markdown)
mkdt import NAME SOURCE [--kind K] [--scale S] [--out RUN] [key=value ...]   a set evaluated as ext:NAME
mkdt export RUN --to DIR [--set mkdt|mtt_ssl|ext:NAME]         a set as PNG files plus its targets
mkdt config  [--preset NAME] [--config FILE] [key=value ...]   print the resolved config
mkdt presets                                                   list the presets and what each reproduces
mkdt datasets                                                  list the registered datasets
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from mkdt import __version__
from mkdt.analysis import ANALYSES
from mkdt.config import (
    Config,
    dump_config,
    iter_fields,
    load_config,
    preset_description,
    preset_names,
)
from mkdt.errors import MkdtError
from mkdt.graph import STAGES, stage_keys
from mkdt.runtime import rank_and_world

DEFAULT_PRESET = "demo"


RUN_HELP = "run every stage in order, skipping finished ones (resumes an interrupted run)"


def _options_epilog(stage: str | None) -> str:
    """The config keys a stage uses (all keys for ``run``), from the stage declaration."""
    keys = stage_keys(stage) if stage else ("",)
    lines = []
    if stage:
        reads = STAGES[stage].reads + tuple(s for s, _ in STAGES[stage].reads_if)
        lines.append(f"reads: {', '.join(reads) or 'the dataset only'}; writes: {stage}/")
    lines.append("config keys (set as key=value; defaults before presets):")
    for key, default, text in iter_fields(Config()):
        if any(key == k or key.startswith(k + ".") or k == "" for k in keys):
            lines.append(f"  {key} = {default!r}\n      {text}")
    lines.append(f"presets: {', '.join(preset_names())} (see `mkdt presets`)")
    return "\n".join(lines)


def _print_presets() -> None:
    """``mkdt presets``: each preset's name and first comment line, the paper's tables apart."""
    names = preset_names()
    tables = [name for name in names if name.startswith("table")]
    width = max(map(len, names)) + 2
    for title, group in (
        ("settings:", [name for name in names if name not in tables]),
        ("the paper's tables (docs/method.md §4 gives the commands):", tables),
    ):
        print(title)
        for name in group:
            print(f"  {name:{width}s}{preset_description(name)}")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET, help=f"settings to start from (default: {DEFAULT_PRESET})"
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys, after the preset")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, applied last (e.g. experts.num_experts=4)",
    )


def _analysis(name: str) -> ModuleType:
    return importlib.import_module(f"mkdt.analysis.{name}")


def _add_analyses(sub: Any) -> None:
    """``mkdt analyze NAME``: one sub-subcommand per module of :mod:`mkdt.analysis`."""
    text = "analyses of a run: trajectories, replay, variance, mtt, theorem (writes RUN/analysis/)"
    analyze = sub.add_parser("analyze", help=text, description=text)
    names = analyze.add_subparsers(dest="analysis", required=True, metavar="NAME")
    for name in ANALYSES:
        module = _analysis(name)
        p = names.add_parser(name, help=module.SUMMARY, description=module.SUMMARY)
        if module.NEEDS_RUN:
            _add_config_args(p)
            p.add_argument("--out", metavar="RUN", help="the run directory (default: runs/<preset>)")
        module.add_arguments(p)


TRANSFERS = {"import": "mkdt.external.importer", "export": "mkdt.external.exporter"}


def _add_transfers(sub: Any) -> None:
    """``mkdt import`` (with the run's config and ``--out RUN``) and ``mkdt export``."""
    for command, name in TRANSFERS.items():
        module = importlib.import_module(name)
        p = sub.add_parser(command, help=module.SUMMARY, description=module.SUMMARY)
        module.add_arguments(p)
        if command == "import":
            _add_config_args(p)
            p.add_argument("--out", metavar="RUN", help="the run directory (default: runs/<preset>)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per stage (help from :mod:`mkdt.graph`), plus run,
    config, presets and datasets."""
    parser = argparse.ArgumentParser(
        prog="mkdt",
        description="Dataset distillation for self-supervised pre-training (MKDT).",
        epilog="Run `mkdt COMMAND --help` for every option of a command.",
    )
    parser.add_argument("--version", action="version", version=f"mkdt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [(name, spec.summary, name) for name, spec in STAGES.items()] + [("run", RUN_HELP, None)]
    for name, text, stage in commands:
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=_options_epilog(stage),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config_args(p)
        p.add_argument(
            "--out", metavar="DIR", help="run directory holding every artifact (default: runs/<preset>)"
        )
        p.add_argument(
            "--force", action="store_true", help="recompute this stage (and drop the records of later stages)"
        )
        p.add_argument(
            "--repair",
            action="store_true",
            help="redo a finished stage whose artifacts are missing or damaged (experts: only those); later "
            "stages stay valid if the repaired artifacts equal the recorded ones",
        )
    _add_analyses(sub)
    _add_transfers(sub)
    text = "gather run directories into one report: DIR/index.html (self-contained) and DIR/report.md"
    p = sub.add_parser("report", help=text, description=text)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --out of mkdt commands)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the report into")
    p = sub.add_parser(
        "config",
        help="print the resolved config as YAML",
        description="print the resolved config (defaults <- preset <- file <- overrides)",
    )
    _add_config_args(p)
    text = "list the presets and what each reproduces (the paper's tables: table1-cifar10, ...)"
    sub.add_parser("presets", help=text, description=text)
    sub.add_parser(
        "datasets",
        help="list the registered datasets and their on-disk formats",
        description="list the registered datasets and their on-disk formats",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user mistakes print one line ``mkdt: error: ...`` and return 2."""
    parser = build_parser()
    # key=value overrides may come before and after options (argparse only collects one run)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "presets":
            _print_presets()
            return 0
        if args.command == "datasets":
            from mkdt.data import DATASETS

            for name, spec in sorted(DATASETS.items()):
                print(f"{name:14s} {spec.description}")
            return 0
        if args.command == "report":
            from mkdt.reporting import build_report

            folder = build_report(args.runs, args.out)
            print(f"report: {folder / 'index.html'} and {folder / 'report.md'}")
            return 0
        if args.command == "export":
            importlib.import_module(TRANSFERS["export"]).main(args)
            return 0
        if args.command == "import":
            args.out = args.out or f"runs/{args.preset}"
            config = load_config(args.preset, args.config, args.overrides)
            importlib.import_module(TRANSFERS["import"]).main(args, config)
            return 0
        if args.command == "analyze":
            module = _analysis(args.analysis)
            if module.NEEDS_RUN:
                config = load_config(args.preset, args.config, args.overrides)
                args.out = args.out or f"runs/{args.preset}"
                module.main(args, config)
            else:
                module.main(args, None)
            return 0
        config = load_config(args.preset, args.config, args.overrides)
        if args.command == "config":
            print(dump_config(config), end="")
            return 0
        from mkdt.pipeline import run_stages

        stages = list(STAGES) if args.command == "run" else [args.command]
        out = args.out or f"runs/{args.preset}"
        run_stages(config, out, stages, force=args.force, repair=args.repair)
        if rank_and_world()[0] == 0:
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
