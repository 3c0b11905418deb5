"""`metallo quickstart`: synthetic data -> DINO -> ProtoNet -> evaluation with and without fine-tuning;
`--pretrained`: the offline ImageNet backbone scored on real images (metallo_core/quickstart_pretrained.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from metallo_core.user_paths import cli_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline at small scale on embedded defaults (local Ray, sqlite MLflow, synthetic data)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override an embedded default, e.g. pretrain.epochs=5 evaluate.tasks=600")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last")
    parser.add_argument("--pretrained", action="store_true",
                        help="a real start instead: the offline ImageNet EfficientNet-Lite0, registered as "
                             "models:/metallo-protonet@pretrained, scored with and without fine-tuning on real images")
    parser.add_argument("--eval-images", metavar="DIR", type=cli_path,
                        help="with --pretrained: a labelled folder (<DIR>/<class>/<image>) to score on; default "
                             "../shared/data/x-sdd next to the repository if present, else synthetic test classes")
    parser.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    if args.eval_images and not args.pretrained:
        raise SystemExit("--eval-images applies to `metallo quickstart --pretrained` only")
    if args.pretrained:
        from metallo_core import quickstart_pretrained

        pretrained = quickstart_pretrained.run_pretrained_quickstart(args.overrides, args.eval_images)
        print(json.dumps(dataclasses.asdict(pretrained)) if args.json else quickstart_pretrained.describe(pretrained))
        return 0
    from metallo_core.quickstart import describe, run_quickstart

    result = run_quickstart(args.overrides)
    print(json.dumps(dataclasses.asdict(result)) if args.json else describe(result))
    return 0
