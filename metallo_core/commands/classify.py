"""`metallo classify`: classify new micrographs against a few labelled ones with a registered ProtoNet.

    metallo classify --model models:/metallo-protonet@current --support support/ --query new/ --out predictions.csv
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify micrographs against 1-5 labelled images per class (one support sub-folder per class)",
        description="Prototypes from the support images (optionally fine-tuning the backbone on them first), "
                    "then one CSV row per query image: predicted class, a probability per class, nearest "
                    "support image. See metallo_core/fewshot/classify.py for the tiling and scale policy.",
    )
    parser.add_argument("--model", required=True,
                        help="any MLflow model URI: models:/metallo-protonet@alias, models:/name/3, runs:/<id>/protonet")
    parser.add_argument("--support", required=True, help="folder with one sub-folder of 1-5 images per class")
    parser.add_argument("--query", required=True, help="an image, or a folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="CSV to write; written only when the whole run succeeds")
    parser.add_argument("--finetune", action="store_true", help="adapt the backbone to the support set first")
    parser.add_argument("--steps", type=int, default=50, help="fine-tuning steps (with --finetune)")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning lr (with --finetune)")
    parser.add_argument("--tile", type=int, default=0, metavar="PX",
                        help="cut large images into PX x PX tiles at the training scale (0: whole image resized)")
    parser.add_argument("--query-scale", type=float, default=1.0,
                        help="resample queries by this factor first, when imaged at another pixel size than the support")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    parser.set_defaults(func=_classify)


def _classify(args: argparse.Namespace) -> int:
    from metallo_core.fewshot.classify import ClassifySettings, classify

    settings = ClassifySettings(tile=args.tile, query_scale=args.query_scale, finetune=args.finetune,
                                steps=args.steps, lr=args.lr, batch_size=args.batch_size, device=args.device)
    result = classify(args.model, args.support, args.query, args.out, settings)
    counts = {name: sum(p.predicted == name for p in result.predictions) for name in result.classes}
    if args.json:
        print(json.dumps({"model": result.model, "classes": result.classes, "shots": result.shots,
                          "queries": len(result.predictions), "predicted": counts, "out": result.out,
                          "finetuned": result.finetuned, "query_images_per_s": result.query_images_per_s}))
    else:
        print(f"{len(result.predictions)} image(s) classified into {len(result.classes)} classes "
              f"({', '.join(f'{name}: {count}' for name, count in counts.items())}); "
              f"{result.query_images_per_s:.1f} images/s")
        print(f"predictions: {result.out}")
    return 0
