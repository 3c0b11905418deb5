"""`metallo multilabel train|predict|experiments`: seed 002's n-furcated multi-label model on a frozen backbone.

    metallo multilabel train --data URI [--config FILE] [key=value ...] [--json]
    metallo multilabel predict --model URI --images DIR --out preds.csv
    metallo multilabel experiments --data URI [--config FILE] [key=value ...] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from metallo_core.data.decode import DECODE_HELP
from metallo_core.data.listing import LISTING_HELP
from metallo_core.entrypoint import add_stage_arguments, run_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    multilabel = subparsers.add_parser(
        "multilabel", help="multi-label quantification: frozen backbone, shared fc, one head per property (seed 002)")
    commands = multilabel.add_subparsers(dest="multilabel_command", required=True,
                                         metavar="{train,predict,experiments}")

    train = commands.add_parser("train", help="train and register an n-furcated model on a dataset's label columns")
    train.add_argument("--data", default=None, help="dataset URI (sets data.uri; a directory or s3://bucket/prefix)")
    add_stage_arguments(train)
    train.set_defaults(func=_train)

    predict = commands.add_parser("predict", help="predict every property for a folder of images into a CSV",
                                  description="One CSV row per image of --images (searched recursively). "
                                              + LISTING_HELP + " " + DECODE_HELP)
    predict.add_argument("--model", required=True,
                         help="model URI: models:/metallo-multilabel@current, models:/<name>/<version>, runs:/..., m-...")
    predict.add_argument("--images", required=True, help="folder of images (searched recursively)")
    predict.add_argument("--out", required=True, help="CSV file to write (one row per image)")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    predict.set_defaults(func=_predict)

    experiments = commands.add_parser(
        "experiments", help="seed 002's grid (single-property, bifurcated fc 100/1000, test-fraction sweep, CNN "
                            "baseline) as parallel Ray Tune trials; prints the tables")
    experiments.add_argument("--data", default=None, help="dataset URI (sets data.uri)")
    add_stage_arguments(experiments)
    experiments.set_defaults(func=_experiments)


def _with_data(args: argparse.Namespace) -> argparse.Namespace:
    if args.data:
        args.overrides = [*args.overrides, f"data.uri={args.data}"]
    return args


def _train(args: argparse.Namespace) -> int:
    from metallo_core.multilabel.config import MultilabelConfig
    from metallo_core.multilabel.pipeline import describe_result, run_multilabel_training

    return run_stage(_with_data(args), MultilabelConfig, run_multilabel_training, describe_result)


def _experiments(args: argparse.Namespace) -> int:
    from metallo_core.multilabel.config import ExperimentsConfig
    from metallo_core.multilabel.experiments import describe_experiments, run_experiments, summary_for_json

    def runner(config):
        result = run_experiments(config)
        return summary_for_json(result) if args.json else result

    return run_stage(_with_data(args), ExperimentsConfig, runner, describe_experiments)


def _predict(args: argparse.Namespace) -> int:
    from metallo_core.multilabel.predict import predict_folder

    if args.batch_size < 1:
        print("metallo: --batch-size must be at least 1")
        return 2
    summary = predict_folder(args.model, args.images, args.out, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(f"wrote {summary.num_images} prediction(s) to {summary.out} (columns: {', '.join(summary.columns)})")
    return 0
