"""The one shape every stage's entrypoint has: `--config FILE [key=value ...] [--json] [--print-config]`.

Used by `python -m jobs.<stage>` (what `ray job submit` runs) and by the matching `metallo` subcommand.
The config is loaded and validated before any cluster resource is requested.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from metallo_core.config import load_config, to_yaml
from metallo_core.errors import MetalloError

ConfigT = TypeVar("ConfigT")


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config settings")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, after --config, overrides and validation) and exit")


def run_stage(args: argparse.Namespace, config_type: type[ConfigT], runner: Callable[[ConfigT], Any],
              describe: Callable[[Any], str] | None = None) -> int:
    """Load and validate the config, run the stage, print its result (or, with --print-config, print the
    config and run nothing)."""
    config = load_config(config_type, args.config, args.overrides)
    if getattr(args, "print_config", False):
        print(to_yaml(config), end="")
        return 0
    result = runner(config)
    plain = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    if args.json:
        print(json.dumps(plain, default=str))
    elif describe is not None:
        print(describe(result))
    else:
        print(json.dumps(plain, indent=2, default=str))
    return 0


def job_main(name: str, config_type: type[ConfigT], runner: Callable[[ConfigT], Any],
             describe: Callable[[Any], str] | None = None, argv: list[str] | None = None) -> int:
    """`python -m jobs.<name>`: same arguments as the CLI; user errors end with exit code 2 and one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}")
    add_stage_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_stage(args, config_type, runner, describe)
    except MetalloError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
