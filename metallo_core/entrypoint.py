"""The one shape every stage's entrypoint has: `--config FILE [key=value ...] [--json]`.

Every stage of the table in `metallo_core.stages` takes these arguments, whether run as `metallo <stage>` or
as a Ray job (`python -m jobs.<module>`). The config is loaded and validated before any cluster resource is
requested.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable, TypeVar

from metallo_core.config import load_config

ConfigT = TypeVar("ConfigT")


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config settings")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object, last")


def run_stage(args: argparse.Namespace, config_type: type[ConfigT], runner: Callable[[ConfigT], Any],
              describe: Callable[[Any], str] | None = None) -> int:
    """Load and validate the config, run the stage, print its result."""
    config = load_config(config_type, args.config, args.overrides)
    result = runner(config)
    plain = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    if args.json:
        print(json.dumps(plain, default=str))
    elif describe is not None:
        print(describe(result))
    else:
        print(json.dumps(plain, indent=2, default=str))
    return 0

