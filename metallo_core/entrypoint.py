"""The one shape every stage's entrypoint has: `--config FILE [key=value ...] [--json] [--print-config]`.

Every stage of the table in `metallo_core.stage_table` takes these arguments, whether run as `metallo <stage>` or
as a Ray job (`python -m jobs.<module>`). The config is loaded and validated before any cluster resource is
requested.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any, TypeVar

from metallo_core.config import load_config, to_yaml
from metallo_core.output_guard import output_settings, refuse_output_over_inputs
from metallo_core.user_paths import cli_path

ConfigT = TypeVar("ConfigT")


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, type=cli_path, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config settings")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, after --config, overrides and validation) and exit")


def run_stage(args: argparse.Namespace, config_type: type[ConfigT], runner: Callable[[ConfigT], Any],
              describe: Callable[[Any], str] | None = None) -> int:
    """Load and validate the config, run the stage, print its result (or, with --print-config, print the
    config and run nothing)."""
    config = load_config(config_type, args.config, args.overrides)
    refuse_output_over_inputs(output_settings(config), {"--config": args.config})
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

