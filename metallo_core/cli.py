"""The `metallo` console script (also `python -m metallo_core`) and the Ray job entrypoints' `run_job`.

Stages come from the one table in `metallo_core.stage_table`; the other subcommands (data, classify, quickstart,
serve, report, and the non-stage parts of multilabel and tune) from `metallo_core.commands`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from metallo_core import __version__, console, stage_table
from metallo_core.errors import user_error_in

# Each module defines register(subparsers); stages are added from the table, after `data`.
COMMAND_MODULES = (
    "metallo_core.commands.multilabel",
    "metallo_core.commands.classify",
    "metallo_core.commands.serve",
    "metallo_core.commands.quickstart",
    "metallo_core.commands.tune",
    "metallo_core.commands.report",
    "metallo_core.commands.config",
)
VERBOSE_HELP = "show everything: Ray's and Ray Data's progress bars and internal logs, every library's INFO lines"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metallo",
        description="Few-shot microstructure recognition: DINO pretraining, ProtoNet meta-training, fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"metallo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    importlib.import_module("metallo_core.commands.data").register(subparsers)
    stage_table.add_stage_parsers(subparsers)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    _accept_verbose_after_the_command(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args, "metallo")


def run_job(module: str, argv: list[str] | None = None) -> int:
    """`python -m <module>` of a Ray job entrypoint (jobs/, tuning/): the stage the table runs as `module`,
    with the same arguments, console and exit codes as `metallo <stage>`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage, rest = stage_table.job_stage(module, argv)
    parser = argparse.ArgumentParser(prog=" ".join(("python -m", module, *stage.job_args)),
                                     description=stage.description or stage.help)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    stage.add_arguments(parser)
    return _run(parser.parse_args(rest), module.rpartition(".")[2])


def _run(args: argparse.Namespace, name: str) -> int:
    """Configure the console, run the parsed command; a user error ends with one line and exit code 2."""
    console.configure(verbose=args.verbose)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A MetalloError raised in a Ray worker arrives wrapped (TrainingFailedError, RayTaskError): the user
        # gets its message and exit code; the Ray details only with --verbose.
        user_error = user_error_in(exc)
        if user_error is None:
            raise
        if args.verbose and user_error is not exc:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"{name}: error: {user_error}", file=sys.stderr)
        return 2


def _accept_verbose_after_the_command(parser: argparse.ArgumentParser) -> None:
    """`metallo quickstart --verbose` as well as `metallo --verbose quickstart`. SUPPRESS keeps a
    subcommand from resetting a flag given before it (argparse copies a subparser's defaults over)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for subparser in dict(action.choices or {}).values():
            if subparser._subparsers is not None:
                _accept_verbose_after_the_command(subparser)
            else:
                subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                       help=VERBOSE_HELP)


if __name__ == "__main__":
    sys.exit(main())
