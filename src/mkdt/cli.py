"""``mkdt`` command line: a thin layer over the stages' ``run(config, out)``.

mkdt STAGE [--preset NAME] [--config FILE] [--out DIR] [--force] [key=value ...]
    STAGE: teacher, targets, experts, init, distill, krr_st, evaluate, run (all stages in order;
    krr_st only when evaluate.methods lists krr_st)
mkdt analyze NAME [--preset NAME] [--out RUN] [options] [key=value ...]
    NAME: trajectories, replay, variance, mtt, theorem (see `mkdt analyze --help`)
mkdt report RUN [RUN ...] --out DIR                            tables and figures of runs (HTML, markdown)
mkdt import NAME SOURCE [--kind K] [--scale S] [--out RUN] [key=value ...]   a set evaluated as ext:NAME
mkdt export RUN --to DIR [--set mkdt|mtt_ssl|krr_st|ext:NAME]  a set as PNG files plus its targets
mkdt config  [--preset NAME] [--config FILE] [key=value ...]   print the resolved config
mkdt presets                                                   list the presets and what each reproduces
mkdt datasets                                                  list the registered datasets

Exit status: 0 done; 2 a user mistake (one line ``mkdt: error: ...`` on stderr, nothing changed);
130 interrupted (Ctrl-C); 141 stdout closed before the command finished (e.g. ``mkdt run | head``:
the command stops quietly, as a program killed by SIGPIPE would, and the same command resumes it).
A ``~`` at the start of a path option is expanded also where the shell does not (``--out=~/run``).
A command given an existing run directory (``--out``) and neither ``--preset`` nor ``--config``
starts from that run's ``config.yaml``. The commands that write into a run directory (the stages,
``run``, ``import``, ``analyze``) hold its lock (``OUT/.lock``) while they run; ``report``,
``export`` and ``config`` only read.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import functools
import io
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mkdt import __version__
from mkdt.analysis import mtt, replay, theorem, trajectories, variance
from mkdt.config import (
    Config,
    dump_config,
    iter_fields,
    load_config,
    preset_description,
    preset_names,
)
from mkdt.data import DATASETS
from mkdt.errors import ConfigError, MkdtError
from mkdt.external import exporter, importer
from mkdt.files import check_writable_folder
from mkdt.graph import STAGES, stage_keys
from mkdt.pipeline import run_stages
from mkdt.runtime import rank_and_world
from mkdt.store import RunDir

DEFAULT_PRESET = "demo"
EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_CLOSED_OUTPUT = 2, 130, 141
PATH_OPTIONS = {
    "out": "--out",
    "to": "--to",
    "config": "--config",
    "run": "RUN",
    "runs": "RUN",
    "source": "SOURCE",
}
"""The arguments that name files or folders (attribute: how the user wrote it)."""
WRITTEN_OPTIONS = ("out", "to")
"""The path arguments that commands write into."""
RUN_HELP = (
    "run every stage in order (krr_st when evaluate.methods lists krr_st), skipping finished ones "
    "(resumes an interrupted run)"
)
ANALYSES: dict[str, ModuleType] = {
    "trajectories": trajectories,
    "replay": replay,
    "variance": variance,
    "mtt": mtt,
    "theorem": theorem,
}  # `mkdt analyze NAME`: the protocol of these modules is in mkdt.analysis's docstring

Handler = Callable[[argparse.Namespace], None]


@dataclass(frozen=True, kw_only=True)
class Command:
    """One ``mkdt`` subcommand: its line in ``mkdt --help``, its description (None: that line),
    its epilog (printed as written), what adds its options (None: it has none; ``analyze``: its
    subcommands) and the handler that runs it (None where its subcommands set theirs); a handler
    raises MkdtError on a user mistake."""

    help: str
    description: str | None = None
    epilog: str | None = None
    options: Callable[[argparse.ArgumentParser], None] | None = None
    handler: Handler | None


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


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """--preset, --config FILE and the key=value overrides (resolved by :func:`_resolve`)."""
    parser.add_argument(
        "--preset",
        help=f"settings to start from (default: {DEFAULT_PRESET}; for an existing run directory "
        "given neither --preset nor --config, the config it was made with: its config.yaml)",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys, after the preset")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, applied last (e.g. experts.num_experts=4)",
    )


def _add_run_out(parser: argparse.ArgumentParser) -> None:
    """--out RUN of the commands that read or add to a run directory."""
    parser.add_argument(
        "--out",
        metavar="RUN",
        help="the run directory (default: runs/<preset>); its config is used (see --preset)",
    )


def _add_stage_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``mkdt STAGE`` and ``mkdt run``."""
    _add_config_args(parser)
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="run directory holding every artifact (default: runs/<preset>); an existing one's config is "
        "used (see --preset)",
    )
    parser.add_argument(
        "--force", action="store_true", help="recompute this stage (and drop the records of later stages)"
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="redo a finished stage whose artifacts are missing or damaged (experts: only those); later "
        "stages stay valid if the repaired artifacts equal the recorded ones",
    )


def _resolve(args: argparse.Namespace) -> tuple[Config, str]:
    """The config and run directory of a command with ``--out``: ``--out`` defaults to
    ``runs/<preset>``, ``--preset`` to ``demo``. A run directory that exists (it has a
    ``config.yaml``, written by every command before its first stage) remembers how it was made:
    given neither ``--preset`` nor ``--config``, the command starts from its ``config.yaml``
    (validated as any config file), the overrides on top, so that the commands mkdt prints for
    it (``--repair``, ``--force``, resuming) work as printed. A new run directory, or one given
    ``--preset`` or ``--config``, starts from the preset (a config made otherwise than the run's
    is refused by the definition checks, naming the keys that differ)."""
    given = args.preset is not None or args.config is not None
    preset = args.preset or DEFAULT_PRESET
    out: str = args.out or f"runs/{preset}"
    recorded = RunDir(out).config_path
    if not given and recorded.is_file():
        try:
            return load_config(None, str(recorded), args.overrides), out
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (with {recorded}, the config the run was made with; give --preset or "
                "--config to start from another)"
            ) from None
    return load_config(preset, args.config, args.overrides), out


@contextlib.contextmanager
def _writing(args: argparse.Namespace, out: str) -> Iterator[None]:
    """Hold run directory ``out``'s lock (:meth:`RunDir.locked`) for the block, for a command
    that writes into it. Under torchrun rank 0 alone takes it: it alone writes, and the other
    ranks must not refuse each other; when rank 0 is refused, torchrun stops the others."""
    if rank_and_world()[0] != 0:
        yield
        return
    with RunDir(out).locked(args.command_line):
        yield


def _run_stages(args: argparse.Namespace) -> None:
    """``mkdt STAGE`` and ``mkdt run``: the stages into ``--out`` (:func:`_resolve`), holding its
    lock; rank 0 says which are done."""
    config, out = _resolve(args)
    stages = list(STAGES) if args.command == "run" else [args.command]
    with _writing(args, out):
        records = run_stages(config, out, stages, force=args.force, repair=args.repair)
    if rank_and_world()[0] == 0:
        print(f"done: {', '.join(records)} in {out}")


def _add_analyses(parser: argparse.ArgumentParser) -> None:
    """``mkdt analyze NAME``: one subcommand per module of :data:`ANALYSES`, with the run's config
    and ``--out RUN`` when the analysis reads a run (``NEEDS_RUN``)."""
    names = parser.add_subparsers(dest="analysis", required=True, metavar="NAME")
    for name, module in ANALYSES.items():
        p = names.add_parser(name, help=module.SUMMARY, description=module.SUMMARY)
        if module.NEEDS_RUN:
            _add_config_args(p)
            _add_run_out(p)
        module.add_arguments(p)
        p.set_defaults(handler=functools.partial(_analyze, module))


def _analyze(module: ModuleType, args: argparse.Namespace) -> None:
    """``mkdt analyze NAME``: the analysis ``module`` on the run's config and ``--out``
    (:func:`_resolve`), holding its lock, or on its own options when it reads no run."""
    if not module.NEEDS_RUN:
        module.main(args, None)
        return
    config, args.out = _resolve(args)
    with _writing(args, args.out):
        module.main(args, config)


def _add_import_options(parser: argparse.ArgumentParser) -> None:
    """``mkdt import``'s own options, then the run's config and ``--out RUN``."""
    importer.add_arguments(parser)
    _add_config_args(parser)
    _add_run_out(parser)


def _import(args: argparse.Namespace) -> None:
    """``mkdt import``: into ``--out`` (:func:`_resolve`) with the run's config, holding its lock."""
    config, args.out = _resolve(args)
    with _writing(args, args.out):
        importer.main(args, config)


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    """``mkdt report RUN [RUN ...] --out DIR``."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --out of mkdt commands)")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder to write the report into")


def _report(args: argparse.Namespace) -> None:
    """``mkdt report``: the report of the runs, written to ``--out``; prints where it is."""
    from mkdt.reporting import build_report  # matplotlib: imported by this command alone

    folder = build_report(args.runs, args.out)
    print(f"report: {folder / 'index.html'} and {folder / 'report.md'}")


def _print_config(args: argparse.Namespace) -> None:
    """``mkdt config``: the resolved config as YAML."""
    print(dump_config(load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)), end="")


def _print_presets(args: argparse.Namespace) -> None:
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


def _print_datasets(args: argparse.Namespace) -> None:
    """``mkdt datasets``: each registered dataset and its description."""
    for name, spec in sorted(DATASETS.items()):
        print(f"{name:14s} {spec.description}")


def commands() -> dict[str, Command]:
    """Every subcommand, in ``mkdt --help`` order: one per stage (help from :mod:`mkdt.graph`),
    run, analyze, import, export, report, config, presets, datasets."""
    stage = functools.partial(Command, options=_add_stage_options, handler=_run_stages)
    report = "gather run directories into one report: DIR/index.html (self-contained) and DIR/report.md"
    analyze = f"analyses of a run: {', '.join(ANALYSES)} (writes RUN/analysis/)"
    datasets = "list the registered datasets and their on-disk formats"
    return {
        **{name: stage(help=spec.summary, epilog=_options_epilog(name)) for name, spec in STAGES.items()},
        "run": stage(help=RUN_HELP, epilog=_options_epilog(None)),
        "analyze": Command(help=analyze, options=_add_analyses, handler=None),
        "import": Command(help=importer.SUMMARY, options=_add_import_options, handler=_import),
        "export": Command(help=exporter.SUMMARY, options=exporter.add_arguments, handler=exporter.main),
        "report": Command(help=report, options=_add_report_options, handler=_report),
        "config": Command(
            help="print the resolved config as YAML",
            description="print the resolved config (defaults <- preset <- file <- overrides)",
            options=_add_config_args,
            handler=_print_config,
        ),
        "presets": Command(
            help="list the presets and what each reproduces (the paper's tables: table1-cifar10, ...)",
            handler=_print_presets,
        ),
        "datasets": Command(help=datasets, handler=_print_datasets),
    }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per entry of :func:`commands`, each with its handler
    as the ``handler`` default."""
    parser = argparse.ArgumentParser(
        prog="mkdt",
        description="Dataset distillation for self-supervised pre-training (MKDT).",
        epilog="Run `mkdt COMMAND --help` for every option of a command. Exit status: 0 done; 2 a "
        "mistake (one line `mkdt: error: ...`, nothing changed); 130 interrupted; 141 stdout closed "
        "by its reader (e.g. `mkdt run | head`: stopped quietly, the same command resumes).",
    )
    parser.add_argument("--version", action="version", version=f"mkdt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands().items():
        raw = command.epilog is not None
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
        )
        if command.options is not None:
            command.options(p)
        if command.handler is not None:
            p.set_defaults(handler=command.handler)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed arguments; key=value overrides may come before and after options (argparse
    only collects one run of them), anything else unknown exits with argparse's usage error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def checked_paths(args: argparse.Namespace) -> None:
    """Expand ``~`` in every path argument of ``args`` (:data:`PATH_OPTIONS`; the shell leaves it in
    ``--out=~/run``), refuse an empty one or an empty ``--preset`` (ConfigError: they would
    silently mean the default), and check that the folders a command writes into
    (:data:`WRITTEN_OPTIONS`) can be written (ArtifactError), before the command starts."""
    if getattr(args, "preset", None) == "":
        raise ConfigError("--preset is empty; name a preset (see `mkdt presets`) or leave the option out")
    for attr, option in PATH_OPTIONS.items():
        value = getattr(args, attr, None)
        given = value if isinstance(value, list) else [value]
        paths = [path for path in given if isinstance(path, str)]
        if not paths or len(paths) < len(given):
            continue  # not given, or not a path here (e.g. analyze variance's --runs count)
        if "" in paths:
            raise ConfigError(f"{option} is empty; give a path or leave the option out")
        expanded = [os.path.expanduser(path) for path in paths]
        setattr(args, attr, expanded if isinstance(value, list) else expanded[0])
        if attr in WRITTEN_OPTIONS:
            check_writable_folder(Path(expanded[0]), option)


def _escape_unprintable(exc: UnicodeError) -> tuple[str | bytes, int]:
    """The codec error handler of mkdt's output (``mkdt-output``): the lone surrogates that stand for
    the bytes of a path that is not in the locale's encoding (PEP 383) are written as those bytes
    again, any other character the encoding lacks as a backslash escape."""
    if isinstance(exc, UnicodeEncodeError) and all(
        "\udc80" <= c <= "\udcff" for c in exc.object[exc.start : exc.end]
    ):
        return codecs.lookup_error("surrogateescape")(exc)
    return codecs.backslashreplace_errors(exc)


def _tolerant_output() -> None:
    """Let stdout and stderr print any text (:func:`_escape_unprintable`): a path that is not UTF-8,
    non-ASCII text under the C locale."""
    codecs.register_error("mkdt-output", _escape_unprintable)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="mkdt-output")


def _silence_closed_output() -> None:
    """After stdout was closed by its reader (a pipe): point stdout at /dev/null, so that the
    interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # ValueError: stdout is not a file (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status (module docstring): user mistakes print one line
    ``mkdt: error: ...`` and return 2."""
    _tolerant_output()
    args = parse(build_parser(), argv)
    args.command_line = shlex.join(["mkdt", *(sys.argv[1:] if argv is None else argv)])
    try:
        checked_paths(args)
        args.handler(args)
        sys.stdout.flush()  # here, where a closed stdout is caught, not at the interpreter's exit
    except MkdtError as exc:
        print(f"mkdt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mkdt: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_closed_output()
        return EXIT_CLOSED_OUTPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
