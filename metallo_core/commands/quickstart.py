"""`metallo quickstart`: seed 000's chain on real images from the offline ImageNet weights, every stage gated
(metallo_core/quickstart.py); `--from-scratch`: the same stages from random weights on synthetic data
(metallo_core/quickstart_scratch.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from metallo_core.user_paths import cli_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="build a few-shot classifier from the offline ImageNet weights on real images (DINO, meta-training, "
             "fine-tuning, each kept only where it helps), on the local Ray and a sqlite MLflow store",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override an embedded default, e.g. pretrain.epochs=5 evaluate.tasks=600")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last")
    parser.add_argument("--images", metavar="DIR", type=cli_path,
                        help="a labelled folder of your own (<DIR>/<class>/<image>) instead of the built-in X-SDD")
    parser.add_argument("--from-scratch", action="store_true",
                        help="the pipeline from random weights on synthetic micrographs instead (shows the stages; "
                             "its model does not work on real images)")
    parser.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    if args.from_scratch:
        if args.images:
            raise SystemExit("--images applies to the real-image quickstart, not --from-scratch")
        from metallo_core import quickstart_scratch

        scratch = quickstart_scratch.run_quickstart(args.overrides)
        print(json.dumps(dataclasses.asdict(scratch)) if args.json else quickstart_scratch.describe(scratch))
        return 0
    from metallo_core import quickstart

    result = quickstart.run_quickstart(args.overrides, images=args.images)
    print(json.dumps(quickstart.as_json(result)) if args.json else quickstart.describe(result))
    return 0
