"""The `metallo` console script: one subcommand per stage, each defined in `metallo_core.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from metallo_core import __version__
from metallo_core.errors import MetalloError

# Each module defines register(subparsers); a stage appears here once it exists.
COMMAND_MODULES = (
    "metallo_core.commands.data",
    "metallo_core.commands.pretrain",
    "metallo_core.commands.multilabel",
    "metallo_core.commands.fewshot",
    "metallo_core.commands.classify",
    "metallo_core.commands.quickstart",
    "metallo_core.commands.tune",
    "metallo_core.commands.report",
    "metallo_core.commands.config",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metallo",
        description="Few-shot microstructure recognition: DINO pretraining, ProtoNet meta-training, fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"metallo {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except MetalloError as exc:
        print(f"metallo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metallo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
