"""`metallo classify`: classify new micrographs against a few labelled ones with a registered ProtoNet.

    metallo classify --model models:/metallo-protonet@current --support support/ --query new/ --out predictions.csv
"""

from __future__ import annotations

import argparse
import json

from metallo_core.data.decode import DECODE_HELP
from metallo_core.data.listing import LISTING_HELP
from metallo_core.user_paths import cli_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify micrographs against 1-5 labelled images per class (one support sub-folder per class)",
        description="Prototypes from the support images (optionally fine-tuning the backbone on them first), "
                    "then one CSV row per query image: predicted class, a probability per class, nearest "
                    "support image. See metallo_core/fewshot/tiles.py for the tiling and scale policy. "
                    + LISTING_HELP + " " + DECODE_HELP,
    )
    parser.add_argument("--model", required=True,
                        help="any MLflow model URI: models:/metallo-protonet@alias, models:/name/3, "
                             "runs:/<id>/protonet")
    parser.add_argument("--support", required=True, type=cli_path,
                        help="folder with one sub-folder of 1-5 images per class")
    parser.add_argument("--query", required=True, type=cli_path,
                        help="an image, or a folder of images (searched recursively)")
    parser.add_argument("--out", required=True, type=cli_path,
                        help="CSV to write; written only when the whole run succeeds (a failed write leaves no "
                             "temporary file); bytes of file names that are not valid UTF-8 are written as \\xNN")
    parser.add_argument("--finetune", action="store_true",
                        help="adapt the backbone to the support set first, with the fine-tuning settings (lr, "
                             "steps, update, bn_mode, augmentations) an evaluation or search chose for this model "
                             "version (recorded on it; the defaults when none is); which ones, and where from, is "
                             "printed")
    parser.add_argument("--finetune-from", default="", metavar="SOURCE", type=cli_path,
                        help="take the fine-tuning settings from here instead (implies --finetune): a run id "
                             "(an evaluation or a search's parent run), a models:/ URI, or a YAML file with a "
                             "finetune: section (an evaluate config, a search's best_config.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (overrides the chosen settings)")
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning lr (overrides the chosen settings)")
    parser.add_argument("--update", choices=["all", "last_stage", "last_block", "batchnorm"], default=None,
                        help="layers fine-tuned (overrides the chosen settings): all, last_stage (a ResNet's layer4), "
                             "last_block (its last residual block; an EfficientNet's last block and head conv) or "
                             "batchnorm (only every BatchNorm layer's scale and shift)")
    parser.add_argument("--bn-mode", choices=["train", "eval"], default=None,
                        help="BatchNorm while fine-tuning (overrides the chosen settings)")
    parser.add_argument("--inference", choices=["recorded", "plain"], default="recorded",
                        help="how features become predictions: the settings an evaluation chose for this model "
                             "version on meta-validation tasks (recorded; plain where none are), or plain ProtoNet "
                             "(each image predicted on its own). Which ones, and where from, is printed")
    parser.add_argument("--transductive", choices=["none", "soft_kmeans", "bd_cspn"], default=None,
                        help="override the transductive method: with one, the query images shape the class "
                             "prototypes together, so a prediction depends on the other images in --query")
    parser.add_argument("--unknown", action="store_true",
                        help="flag query images that resemble none of the support classes (CSV column unknown: "
                             "true/false; predicted then names only the nearest class): an image no closer to its "
                             "nearest class than that class is to its nearest other class, give or take a margin "
                             "fitted on X-SDD selection tasks; off by default: it flags some known images too")
    parser.add_argument("--unknown-margin", type=float, default=None, metavar="COSINE",
                        help="with --unknown: flag more (higher) or fewer (lower) images than the fitted margin")
    parser.add_argument("--crop", default=None, metavar="SPEC",
                        help="cut edges of every support and query image first, e.g. an SEM data bar: bottom=64 "
                             "(px), bottom=0.1 (fraction of the height), bottom=0.08,left=12, or auto (find a bar "
                             "at the bottom of each image; an error when unsure). Default: none")
    parser.add_argument("--tile", type=int, default=0, metavar="PX",
                        help="cut large images into PX x PX tiles at the training scale (0: whole image resized)")
    parser.add_argument("--query-scale", type=float, default=1.0,
                        help="resample queries by this factor first, when imaged at another pixel size "
                             "than the support. Not needed when every file carries its pixel size (SEM/TEM TIFF "
                             "metadata, Gatan DM3/DM4 calibration): then all images are brought to one physical "
                             "scale, and a data bar the metadata measures is cut exactly")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="features and fine-tuning in this precision; auto resolves per device as metallo "
                             "evaluate does (bf16 on CPUs with native bf16 and on GPUs, fp32 on other CPUs)")
    parser.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    parser.set_defaults(func=_classify)


def describe_inference(settings: dict | None) -> str:
    from metallo_core.fewshot.inference import describe_recorded

    return describe_recorded(settings, " (each prediction depends on the other images in --query)")


def _classify(args: argparse.Namespace) -> int:
    from metallo_core.commands.classify_app import ClassifySettings, classify
    from metallo_core.csv_output import escape_name
    from metallo_core.data.crop import EdgeCrop
    from metallo_core.output_guard import refuse_output_over_inputs

    refuse_output_over_inputs({"--out": args.out}, {"--support": args.support, "--query": args.query,
                                                    "--finetune-from": args.finetune_from})
    settings = ClassifySettings(tile=args.tile, query_scale=args.query_scale,
                                finetune=args.finetune or bool(args.finetune_from), steps=args.steps, lr=args.lr,
                                update=args.update, bn_mode=args.bn_mode, finetune_from=args.finetune_from,
                                batch_size=args.batch_size, device=args.device, inference=args.inference,
                                transductive=args.transductive, precision=args.precision, unknown=args.unknown,
                                unknown_margin=args.unknown_margin)
    settings.crop = EdgeCrop.parse(args.crop)
    result = classify(args.model, args.support, args.query, args.out, settings)
    counts = {name: sum(p.predicted == name and not p.unknown for p in result.predictions) for name in result.classes}
    unknown = sum(bool(p.unknown) for p in result.predictions)
    if args.json:
        print(json.dumps({"model": result.model, "classes": result.classes, "shots": result.shots,
                          "queries": len(result.predictions), "predicted": counts, "out": result.out,
                          "finetuned": result.finetuned, "finetune": {"settings": result.finetune_settings,
                                                                       "source": result.finetune_source},
                          "inference": {"settings": result.inference, "source": result.inference_source},
                          "crop": result.crop, "physical_scale": result.physical_scale,
                          "query_images_per_s": result.query_images_per_s,
                          "unknown": unknown if result.open_set else None, "open_set": result.open_set}))
    else:
        print(f"{len(result.predictions)} image(s) classified into {len(result.classes)} classes "
              f"({', '.join(f'{escape_name(name)}: {count}' for name, count in counts.items())}"
              f"{f'; unknown: {unknown}' if result.open_set else ''}); {result.query_images_per_s:.1f} images/s")
        print(f"crop: {result.crop}")
        print(f"physical scale: {result.physical_scale}")
        print(f"inference: {describe_inference(result.inference)}, from {result.inference_source}")
        if result.finetuned:
            print(f"fine-tuned with {result.finetune_settings}, from {result.finetune_source}")
        if result.open_set:
            print(f"unknown: {unknown} image(s) resemble no support class (margin {result.open_set['margin']:+.3f}; "
                  "column unknown)")
        print(f"predictions: {result.out}")
    return 0
