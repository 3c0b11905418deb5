"""`metallo multilabel train|predict|experiments`: seed 002's n-furcated multi-label model on a frozen backbone
(train and experiments are stages in metallo_core.stage_table; predict's parser is here, its work in
commands/multilabel_predict.py).

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
from metallo_core.stage_table import add_stage_parsers
from metallo_core.user_paths import cli_path


def register(subparsers: argparse._SubParsersAction) -> None:
    multilabel = subparsers.add_parser(
        "multilabel", help="multi-label quantification: frozen backbone, shared fc, one head per property (seed 002)")
    commands = multilabel.add_subparsers(dest="multilabel_command", required=True,
                                         metavar="{train,predict,experiments}")

    add_stage_parsers(commands, group="multilabel")  # train, experiments

    predict = commands.add_parser("predict", help="predict every property for a folder of images into a CSV",
                                  description="One CSV row per image of --images (searched recursively). "
                                              + LISTING_HELP + " " + DECODE_HELP)
    predict.add_argument("--model", required=True,
                         help="model URI: models:/metallo-multilabel@current, models:/<name>/<version>, "
                              "runs:/..., m-...")
    predict.add_argument("--images", required=True, type=cli_path, help="folder of images (searched recursively)")
    predict.add_argument("--out", required=True, type=cli_path, help="CSV file to write (one row per image)")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    predict.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from metallo_core.commands.multilabel_predict import predict_folder
    from metallo_core.output_guard import refuse_output_over_inputs

    refuse_output_over_inputs({"--out": args.out}, {"--images": args.images})
    if args.batch_size < 1:
        print("metallo: --batch-size must be at least 1")
        return 2
    summary = predict_folder(args.model, args.images, args.out, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(f"wrote {summary.num_images} prediction(s) to {summary.out} (columns: {', '.join(summary.columns)})")
    return 0
