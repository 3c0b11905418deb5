"""`metallo data synth|ingest|info|verify`: write, inspect and check shard datasets."""

from __future__ import annotations

import argparse
import json
import sys

from metallo_core.data.crop import EdgeCrop
from metallo_core.data.decode import DECODE_HELP
from metallo_core.data.ingest import FORMATS, IngestOptions, ingest
from metallo_core.data.ingest.common import parse_split_sizes
from metallo_core.data.listing import LISTING_HELP
from metallo_core.data.manifest import Manifest, read_manifest
from metallo_core.data.shards import verify_dataset
from metallo_core.output_guard import refuse_output_over_inputs
from metallo_core.user_paths import cli_path


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="write, inspect and verify image-shard datasets")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{synth,ingest,info,verify}")

    synth = commands.add_parser("synth", help="generate a built-in synthetic microstructure dataset")
    synth.add_argument("--kind", choices=("nfurcated", "fewshot"), required=True,
                       help="nfurcated: 7 morphologies x 10 volume fractions (seed 002); "
                            "fewshot: class-disjoint benchmark")
    synth.add_argument("--out", required=True, type=cli_path, help="dataset URI: a local directory or s3://bucket/prefix")
    synth.add_argument("--images-per-class", type=int, default=None,
                       help="per class (fewshot, default 60) or per morphology x fraction (nfurcated, default 50)")
    synth.add_argument("--classes", type=int, default=100, help="fewshot only: number of classes (default 100)")
    synth.add_argument("--size", type=int, default=None,
                       help="image side in pixels (default 84 fewshot, 128 nfurcated)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    synth.add_argument("--json", action="store_true", help="print the dataset summary as one JSON object")
    synth.set_defaults(func=_synth)

    ingest_parser = commands.add_parser(
        "ingest", help="turn an existing dataset layout into shards",
        description="imagefolder reads <src>/<class>/<image> (sub-folders included), or a flat folder of "
                    "images only as one class 'unlabelled' (for DINO on your own images). "
                    + LISTING_HELP + " " + DECODE_HELP)
    ingest_parser.add_argument("--format", required=True, choices=FORMATS)
    ingest_parser.add_argument("--src", required=True, type=cli_path, help="the source dataset (directory)")
    ingest_parser.add_argument("--out", required=True, type=cli_path, help="dataset URI: a local directory or s3://bucket/prefix")
    ingest_parser.add_argument("--size", type=int, default=None,
                               help="re-encode so the shorter side is PX pixels (default: keep the bytes as ingested)")
    ingest_parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                               help="on a corrupt or unsupported image: stop (default) or skip it and report it")
    ingest_parser.add_argument("--unlabelled", action="store_true", default=None,
                               help="imagefolder: every image under --src is one class 'unlabelled', whatever "
                                    "the folders (a flat folder of images is read so without this flag)")
    ingest_parser.add_argument("--crop", default=None, metavar="SPEC",
                               help="imagefolder: cut edges before storing, e.g. a data bar: bottom=64 (px), "
                                    "bottom=0.1 (fraction), bottom=0.08,left=12, or auto (find a bar at the "
                                    "bottom of each image; refuses when unsure). Recorded in the manifest; "
                                    "training reads the cropped images")
    ingest_parser.add_argument("--pixel-size-nm", type=float, default=None, metavar="NM",
                               help="imagefolder: resample every image to NM nanometres per pixel from its "
                                    "microscope metadata (SEM/TEM TIFF: FEI/Thermo, Zeiss, ...; Gatan DM3/DM4), so "
                                    "one texture has one scale whatever the magnification; an image without a "
                                    "pixel size, or one it would enlarge over 2x, is a bad input (--on-error). "
                                    "Not with --size. "
                                    "Without it images keep their pixels; either way a data bar the metadata "
                                    "measures is cut exactly and the pixel sizes found are in the manifest")
    ingest_parser.add_argument("--split-classes", default=None,
                               help="imagefolder: seeded class-disjoint split, e.g. 15,5,5 (train,val,test)")
    ingest_parser.add_argument("--split-rows", default=None,
                               help="imagefolder: seeded per-class row split, e.g. 0.8,0.1,0.1")
    ingest_parser.add_argument("--splits-dir", default=None, type=cli_path,
                               help="cifar-fs: folder with train.txt, val.txt, test.txt (one class per line); default "
                                    "<src>/splits/bertinetto/ if present, else the built-in Bertinetto et al. split")
    ingest_parser.add_argument("--workers", type=int, default=None,
                               help="imagenet: at most N Ray ingest tasks at once (default: the cluster's CPUs)")
    ingest_parser.add_argument("--chunk-size", type=int, default=None,
                               help="imagenet: images per Ray task (default 1000)")
    ingest_parser.add_argument("--synset-names", default=None, type=cli_path,
                               help="imagenet, miniimagenet: 'WNID name' lines kept in the manifest source "
                                    "(default: <src>/LOC_synset_mapping.txt if present)")
    ingest_parser.add_argument("--name", default=None,
                               help="dataset name (default: the source folder's name for imagefolder, else the format)")
    ingest_parser.add_argument("--seed", type=int, default=0)
    ingest_parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    ingest_parser.add_argument("--json", action="store_true", help="print the dataset summary as one JSON object")
    ingest_parser.set_defaults(func=_ingest)

    info = commands.add_parser("info", help="summarise a dataset's manifest")
    info.add_argument("uri", type=cli_path)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    verify = commands.add_parser("verify", help="check every shard against the manifest's sizes and checksums")
    verify.add_argument("uri", type=cli_path)
    verify.set_defaults(func=_verify)


def _synth(args: argparse.Namespace) -> int:
    from metallo_core.data.synth_dataset import write_fewshot, write_nfurcated

    if args.kind == "nfurcated":
        manifest = write_nfurcated(
            args.out,
            images_per_combination=args.images_per_class or 50,
            size=args.size or 128,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    else:
        manifest = write_fewshot(
            args.out,
            num_classes=args.classes,
            images_per_class=args.images_per_class or 60,
            size=args.size or 84,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    _print_summary(manifest, args.out, args.json)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    refuse_output_over_inputs({"--out": args.out}, {"--src": args.src, "--splits-dir": args.splits_dir,
                                                    "--synset-names": args.synset_names})
    options = IngestOptions(
        size=args.size, on_error=args.on_error, overwrite=args.overwrite, seed=args.seed, name=args.name,
        crop=EdgeCrop.parse(args.crop), pixel_size_nm=args.pixel_size_nm,
    )
    # Options only some formats take: flag -> (value given, those formats).
    format_only = {
        "--split-classes": (args.split_classes, ("imagefolder",)),
        "--split-rows": (args.split_rows, ("imagefolder",)),
        "--unlabelled": (args.unlabelled, ("imagefolder",)),
        "--crop": (args.crop, ("imagefolder",)),
        "--pixel-size-nm": (args.pixel_size_nm, ("imagefolder",)),
        "--splits-dir": (args.splits_dir, ("cifar-fs",)),
        "--workers": (args.workers, ("imagenet",)),
        "--chunk-size": (args.chunk_size, ("imagenet",)),
        "--synset-names": (args.synset_names, ("imagenet", "miniimagenet")),
    }
    misplaced = [
        flag for flag, (value, formats) in format_only.items() if value is not None and args.format not in formats
    ]
    if misplaced:
        owners = "; ".join(f"{flag} applies to {', '.join(format_only[flag][1])} only" for flag in misplaced)
        print(f"metallo: {owners}, not to {args.format}", file=sys.stderr)
        return 2
    format_args = {}
    if args.format == "imagefolder":
        format_args["split_classes"] = parse_split_sizes(args.split_classes, int, "--split-classes")
        format_args["split_rows"] = parse_split_sizes(args.split_rows, float, "--split-rows")
        format_args["unlabelled"] = args.unlabelled
    elif args.format == "miniimagenet":
        format_args["synset_names"] = args.synset_names
    elif args.format == "imagenet":
        format_args["workers"] = args.workers
        format_args["synset_names"] = args.synset_names
        if args.chunk_size is not None:
            format_args["chunk_size"] = args.chunk_size
    elif args.format == "cifar-fs":
        format_args["splits_dir"] = args.splits_dir
    if args.format == "imagenet":  # its chunks are Ray tasks: join $RAY_ADDRESS or start a local cluster
        from metallo_core.train import ray_setup

        ray_setup.connect()
    manifest = ingest(args.format, args.src, args.out, options, **format_args)
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} bad image(s):", file=sys.stderr)
        for entry in manifest.skipped:
            print(f"  {entry['source']}: {entry['reason']}", file=sys.stderr)
    _print_summary(manifest, args.out, args.json)
    return 0


def _info(args: argparse.Namespace) -> int:
    _print_summary(read_manifest(args.uri), args.uri, args.json)
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest = verify_dataset(args.uri, checksums=True)
    print(f"{args.uri}: {len(manifest.shards)} shard(s), {manifest.num_images} images: sizes and checksums match")
    return 0


def _print_summary(manifest: Manifest, uri: str, as_json: bool) -> None:
    summary = manifest.summary()
    if as_json:
        print(json.dumps(summary))
        return
    print(f"dataset   {summary['name']}  ({uri})")
    print(f"images    {summary['num_images']} in {summary['num_shards']} shard(s), "
          f"{summary['num_bytes'] / 1e6:.1f} MB, encoding {summary['image_encoding']}")
    print(f"classes   {len(summary['classes'])}")
    kind = "class-disjoint" if manifest.split_kind == "classes" else "row"
    print(f"splits    ({kind})")
    for name, split in manifest.splits.items():
        counts = list(split.counts.values())
        print(f"  {name:<8} {split.num_images:>8} images  {len(split.counts):>5} classes  "
              f"{min(counts)}-{max(counts)} images/class")
    if manifest.extra_columns:
        print("labels    " + ", ".join(f"{n} ({c.kind})" for n, c in manifest.extra_columns.items()))
    if manifest.skipped:
        print(f"skipped   {len(manifest.skipped)} bad image(s) at ingest (listed in the manifest)")
    ignored = manifest.source.get("ignored") or {}
    if ignored:
        print("ignored   " + ", ".join(f"{count} {what}" for what, count in ignored.items()))
    if manifest.source.get("crop", "none") != "none":
        print(f"crop      {manifest.source['crop']}" + _bars(manifest.source.get("crop_auto_bars")))
    scale = manifest.source.get("pixel_sizes") or {}
    if scale.get("with_pixel_size") or manifest.source.get("pixel_size_nm"):
        print(f"scale     {_scale(scale, manifest.source.get('pixel_size_nm'))}")
    if manifest.source.get("decode_notes_count"):
        print(f"decoding  {manifest.source['decode_notes_count']} image(s) changed by the decoder (16-bit/float "
              "range, orientation, alpha, frames): listed in the manifest's source.decode_notes")


def _scale(found: dict, target_nm: float | None) -> str:
    """The manifest's pixel sizes in words: `12 of 12 images with a pixel size (10-40 nm), resampled to 20 nm`."""
    text = f"{found.get('with_pixel_size', 0)} of {found.get('images', 0)} images with a pixel size"
    if found.get("with_pixel_size"):
        text += f" ({found['min_nm']:.4g}-{found['max_nm']:.4g} nm in the files)"
    if target_nm:
        text += f", resampled to {target_nm:g} nm per pixel"
    if found.get("data_bars_from_metadata"):
        text += f"; {found['data_bars_from_metadata']} data bar(s) measured by the metadata cut"
    return text


def _bars(found: dict | None) -> str:
    if not found:
        return ""
    return (f" (data bar found in {found['with_bar']} of {found['images']} images, "
            f"{found['rows_min']}-{found['rows_max']} rows)")
