"""`metallo quickstart`: synthetic data -> DINO -> ProtoNet -> evaluation with and without fine-tuning."""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline at small scale on embedded defaults (local Ray, sqlite MLflow, synthetic data)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override an embedded default, e.g. pretrain.epochs=5 evaluate.tasks=600")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last")
    parser.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    from metallo_core.quickstart import describe, run_quickstart

    result = run_quickstart(args.overrides)
    print(json.dumps(dataclasses.asdict(result)) if args.json else describe(result))
    return 0
