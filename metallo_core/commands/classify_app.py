"""Few-shot classification of new micrographs with a registered ProtoNet: what `metallo classify` runs.

The support folder holds one sub-folder per class with a few labelled images each (the class name is
the folder's name); the query is one image or a folder of them. Prototypes come from the support
images; with `finetune`, the backbone is first adapted to the support set as in meta-testing. This module
reads the folders, loads the model and the settings chosen for it from the registry, reports progress on
stderr and writes the CSV; the prediction itself is `metallo_core.fewshot.predict`.

Image policy. Micrographs arrive at any size, bit depth and colour mode (8/16/32-bit or float, grey or
RGB, TIFF, PNG, JPEG, BMP, Gatan DM3/DM4); they are decoded to 8-bit RGB by the one decode policy of
`metallo_core/data/decode.py` (deeper data mapped from its own 0.1-99.9 percentile range, non-finite
pixels left out, every change warned per file). Folders are listed by `metallo_core/data/listing.py`
(OS/NAS metadata such as `._*` and `@eaDir/` and hidden files skipped and counted). `crop` then cuts
edges, such as a burned-in data bar (`bottom=64`, `bottom=0.1`, or `auto`; see `data/crop.py`), from
support and query images alike. Then each image is resized whole (`tile = 0`) or cut into tiles
(`tile = PX`) as `metallo_core/fewshot/tiles.py` describes. Support tiles all become samples of their
class; a query's class probabilities are the mean over its tiles, and the CSV reports how many tiles
voted for each class.
Magnification: when every support and query file carries its pixel size (SEM/TEM TIFF metadata or a DM3/DM4
calibration, read by `metallo_core/data/microscope.py`), all are resampled to one common pixel size first
(`metallo_core/fewshot/physical_scale.py`), and a data bar the metadata measures is cut exactly. Otherwise
support and query images are assumed to be taken at the same magnification (the support defines what each
class looks like); when the queries were imaged at another pixel size, `query_scale` resamples them first
(e.g. 0.5 for queries at twice the support's magnification).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metallo_core.config import to_dict
from metallo_core.csv_output import escaped_names, write_csv_atomically
from metallo_core.data.crop import EdgeCrop
from metallo_core.data.image_files import is_image_file, list_image_files, list_image_listing, read_file_bytes
from metallo_core.data.images import decode_rgb
from metallo_core.data.microscope import (
    MicroscopeMetadata,
    crop_with_data_bar,
    read_microscope_metadata,
    read_microscope_metadata_of,
)
from metallo_core.errors import ConfigError, DataError
from metallo_core.fewshot.inference import TRANSDUCTIVE, InferenceSettings
from metallo_core.fewshot.open_set import OpenSetSettings
from metallo_core.fewshot.physical_scale import ScalePlan, plan_physical_scale
from metallo_core.fewshot.predict import PredictListener, PredictSettings, predict
from metallo_core.fewshot.protonet import ImageNormalizer
from metallo_core.fewshot.tiles import TiledImages, image_tiles
from metallo_core.precision import PRECISIONS
from metallo_core.progress import Progress
from metallo_core.tracking.finetune_choice import choose, recorded_inference
from metallo_core.tracking.protonet_store import load_protonet


@dataclass
class ClassifySettings:
    tile: int = 0  # 0: whole image resized; PX: cut into PX x PX tiles (see metallo_core/fewshot/tiles.py)
    query_scale: float = 1.0  # resample queries by this factor first (pixel-size mismatch with the support)
    finetune: bool = False
    # Fine-tuning settings: those an evaluation or search chose for the model (recorded on its version), or
    # those of `finetune_from` (a run id, models:/ URI or YAML file); steps/lr/update/bn_mode given here
    # override single fields (None: as chosen). See metallo_core/tracking/finetune_choice.py.
    steps: int | None = None
    lr: float | None = None
    update: str | None = None
    bn_mode: str | None = None
    finetune_from: str = ""
    batch_size: int = 64
    device: str = "cpu"
    crop: EdgeCrop = field(default_factory=EdgeCrop)  # edges cut from every image (a data bar), before tiling
    # How features become predictions (fewshot.inference): "recorded" takes the settings an evaluation chose
    # for the model version on meta-validation tasks (plain where none are recorded), "plain" is ProtoNet
    # alone (each prediction depends on its own image only); `transductive` overrides that one field.
    inference: str = "recorded"
    transductive: str | None = None
    # Computation precision of the features (and of fine-tuning), resolved per device as `metallo evaluate`
    # resolves it (metallo_core.precision): the same value gives the same features as the evaluation's.
    precision: str = "auto"
    # Flag query images that resemble no support class (fewshot.open_set); the margin defaults to the one
    # fitted on X-SDD selection tasks (README "Open set": off by default, it costs known-class accuracy).
    unknown: bool = False
    unknown_margin: float | None = None

    def open_set(self) -> OpenSetSettings | None:
        if not self.unknown:
            return None
        return OpenSetSettings() if self.unknown_margin is None else OpenSetSettings(self.unknown_margin)

    def validate(self) -> None:
        if self.unknown_margin is not None:
            if not self.unknown:
                raise ConfigError("--unknown-margin needs --unknown")
            OpenSetSettings(self.unknown_margin).validate()
        if self.inference not in ("recorded", "plain"):
            raise ConfigError(f"--inference must be recorded or plain, got {self.inference!r}")
        if self.transductive is not None and self.transductive not in TRANSDUCTIVE:
            raise ConfigError(f"--transductive must be one of {', '.join(TRANSDUCTIVE)}, got {self.transductive!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tile < 0:
            raise ConfigError(f"--tile must be 0 (whole image) or a tile side in pixels, got {self.tile}")
        if not 0.05 <= self.query_scale <= 20:
            raise ConfigError(f"--query-scale must be between 0.05 and 20, got {self.query_scale}")
        if self.finetune and ((self.steps is not None and self.steps < 1) or (self.lr is not None and self.lr <= 0)):
            raise ConfigError(f"--finetune needs --steps >= 1 and --lr > 0, got {self.steps} and {self.lr}")


@dataclass
class Prediction:
    file: str
    predicted: str
    probabilities: dict[str, float]
    nearest_support: str
    tiles: int
    tile_votes: dict[str, int] = field(default_factory=dict)
    unknown: bool | None = None  # resembles no support class (`predicted` is then only the nearest); None: not checked
    pixel_size_nm: float | None = None  # nm per pixel of the image after the scale step (None: unknown)


@dataclass
class ClassifyResult:
    model: str
    classes: list[str]
    shots: dict[str, int]
    predictions: list[Prediction]
    out: str | None
    query_images_per_s: float
    finetuned: bool
    crop: str = "none"  # the crop used, as `describe_crop` words it
    finetune_settings: dict | None = None  # the fine-tuning settings used (None: no fine-tuning)
    finetune_source: str = ""  # where they came from, in words
    inference: dict | None = None  # the inference settings used (fewshot.inference)
    inference_source: str = ""  # where they came from, in words
    open_set: dict | None = None  # with --unknown: the margin and each class's separation (fewshot.open_set)
    physical_scale: str = ""  # the physical-scale step's outcome, in words (fewshot.physical_scale)


@dataclass
class CroppedTiles(TiledImages):
    """Tiles of decoded, cropped files, with how many rows the crop cut from each image's bottom."""

    bottom_cropped: list[int] = field(default_factory=list)


def read_support(support_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """{class name: image files}, classes in sorted folder order; every error names the folder."""
    root = Path(support_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--support {root} is not a directory (expected one sub-folder of images per class)")
    groups, loose = list_image_listing(root, "--support", require_images=False).by_top_folder()
    if loose:
        raise DataError(f"--support {root / loose[0]} lies beside the class folders; put every support image "
                        "in its class's sub-folder")
    if len(groups) < 2:
        raise DataError(f"--support {root} has {len(groups)} class folder(s); few-shot classification needs at "
                        "least 2 (one sub-folder of images per class)")
    support = {}
    for name, files in groups.items():
        if not files:
            raise DataError(f"class {name!r} ({root / name}) has no images; put 1-5 labelled images in it")
        support[name] = [root / relative for relative in files]
    return support


def list_queries(query: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root the CSV's file names are relative to, query image files)."""
    path = Path(query).expanduser()
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"--query {path} is not an image file of a supported type")
        return path.parent, [path]
    if not path.exists():
        raise DataError(f"--query {path} does not exist")
    return path, list_image_files(path, "--query")


def load_tiles(files: list[Path], size: int, tile: int, scale: float = 1.0, crop: EdgeCrop | None = None,
               metadata: list[MicroscopeMetadata] | None = None, factors: list[float] | None = None) -> CroppedTiles:
    """The files decoded, cropped and tiled (`fewshot.tiles.image_tiles`) into (T, size, size, 3) uint8 tiles;
    DataError naming the file for one that cannot be decoded or cropped. A data bar the file's metadata
    measures is cut exactly (`data.microscope.crop_with_data_bar`; `metadata` per file, read here when not
    given); `factors`, when given, are per-file resampling factors used instead of `scale`."""
    tiles, owner, bottom_cropped = [], [], []
    for index, path in enumerate(files):
        data = read_file_bytes(path)
        found = metadata[index] if metadata is not None else read_microscope_metadata(data, str(path))
        pixels, cut = crop_with_data_bar(crop or EdgeCrop(), found).apply(decode_rgb(data, str(path)), str(path))
        pieces = image_tiles(pixels, size, tile, factors[index] if factors is not None else scale)
        tiles.append(pieces)
        owner.append(np.full(len(pieces), index))
        bottom_cropped.append(cut)
    return CroppedTiles(np.concatenate(tiles), np.concatenate(owner), len(files), bottom_cropped)


def classify(
    model_uri: str,
    support_dir: str | os.PathLike,
    query: str | os.PathLike,
    out: str | os.PathLike | None = None,
    settings: ClassifySettings | None = None,
    listener: PredictListener | None = None,
) -> ClassifyResult:
    """Classify the query image(s) against the support classes; with `out`, write the CSV (only when
    everything succeeded: it is written to a temporary file and moved into place at the end).

    `listener` hears `predict`'s progress after the stderr lines are printed (the web page's progress bar);
    it may raise `errors.Cancelled` from any callback to stop the work between steps, and then nothing is
    written."""
    settings = settings or ClassifySettings()
    settings.validate()
    support_files = read_support(support_dir)  # input errors before the (slower) model download
    query_root, query_files = list_queries(query)
    model, spec, _ = load_protonet(model_uri)
    inference, inference_source = classify_inference(model_uri, settings)
    print(f"[classify] inference: {inference.describe()}; from {inference_source}", file=sys.stderr, flush=True)
    if inference.is_transductive:
        print(f"[classify] transductive: the {len(query_files)} query image(s) shape the class prototypes "
              "together, so a prediction depends on which other images are in --query (--inference plain: "
              "each image on its own)", file=sys.stderr, flush=True)
    chosen = None
    if settings.finetune:
        chosen = choose(model_uri, settings.finetune_from, {"steps": settings.steps, "lr": settings.lr,
                                                             "update": settings.update, "bn_mode": settings.bn_mode})
        print(f"[classify] fine-tuning with {chosen.describe()}; from {chosen.source}", file=sys.stderr, flush=True)
    device = torch.device(settings.device)
    model.to(device).eval()
    normalizer = ImageNormalizer.for_backbone(spec, device)
    size = spec.image_size

    classes = list(support_files)
    flat_support = [path for name in classes for path in support_files[name]]
    support_metadata = [read_microscope_metadata_of(path) for path in flat_support]
    query_metadata = [read_microscope_metadata_of(path) for path in query_files]
    plan = _physical_scale(flat_support, support_metadata, query_files, query_metadata, settings)
    support = load_tiles(flat_support, size, settings.tile, crop=settings.crop, metadata=support_metadata,
                         factors=plan.support_factors)
    image_labels = np.concatenate([np.full(len(support_files[name]), i) for i, name in enumerate(classes)])
    chunks = [range(start, min(start + settings.batch_size, len(query_files)))
              for start in range(0, len(query_files), settings.batch_size)]
    query_factors = plan.query_factors if plan.target_m else [settings.query_scale] * len(query_files)
    query_cropped: list[int] = []
    reporter = _Reporter(len(query_files), listener)
    found = predict(model, normalizer, support, image_labels,
                    _prefetched_tiles([([query_files[i] for i in chunk], [query_metadata[i] for i in chunk],
                                        [query_factors[i] for i in chunk]) for chunk in chunks],
                                      size, settings, query_cropped),
                    PredictSettings(inference, chosen.settings if chosen else None, settings.batch_size,
                                    settings.precision, settings.open_set()), reporter)
    support_root = Path(support_dir).expanduser()
    predictions = [Prediction(
        file=path.relative_to(query_root).as_posix(),
        predicted=classes[found.predicted[index]],
        probabilities={name: float(p) for name, p in zip(classes, found.probabilities[index].tolist())},
        nearest_support=flat_support[found.nearest_support[index]].relative_to(support_root).as_posix(),
        tiles=found.tiles[index],
        tile_votes={classes[label]: count for label, count in found.tile_votes[index].items()},
        unknown=found.unknown[index] if found.unknown else None,
        pixel_size_nm=_used_pixel_size_nm(query_metadata[index], query_factors[index]),
    ) for index, path in enumerate(query_files)]
    rate = reporter.finish_queries()
    result = ClassifyResult(model_uri, classes, {name: len(files) for name, files in support_files.items()},
                            predictions, None, rate, settings.finetune,
                            crop=describe_crop(settings.crop, support.bottom_cropped + query_cropped),
                            finetune_settings=to_dict(chosen.settings) if chosen else None,
                            finetune_source=chosen.source if chosen else "",
                            inference=to_dict(inference), inference_source=inference_source,
                            open_set=_open_set_record(settings.open_set(), classes, found.separation),
                            physical_scale=plan.description)
    if out is not None:
        result.out = write_predictions(predictions, classes, out)
    return result


def classify_inference(model_uri: str, settings: ClassifySettings) -> tuple[InferenceSettings, str]:
    """(the inference settings classify scores with, where they came from in words); see ClassifySettings."""
    if settings.inference == "plain":
        inference, source = InferenceSettings(), "--inference plain"
    else:
        inference, source = recorded_inference(model_uri)
    if settings.transductive is not None:
        inference = dataclasses.replace(inference, transductive=settings.transductive)  # type: ignore[arg-type]
        source += f"; overridden: transductive {settings.transductive}"
    inference.validate()
    return inference, source


def _open_set_record(settings: OpenSetSettings | None, classes: list[str], separation: list[float]) -> dict | None:
    """What the unknown flag was held to, recorded with the result: the margin and each class's separation."""
    if settings is None:
        return None
    return {"margin": settings.margin, "separation": dict(zip(classes, separation))}


def _physical_scale(support_files: list[Path], support_metadata: list[MicroscopeMetadata], query_files: list[Path],
                    query_metadata: list[MicroscopeMetadata], settings: ClassifySettings) -> ScalePlan:
    """The physical-scale plan of this support+query set, said on stderr; ConfigError for a --query-scale
    that would fight it."""
    def sizes(metadata: list[MicroscopeMetadata]) -> list[float | None]:
        return [found.pixel_size.metres if found.pixel_size else None for found in metadata]

    plan = plan_physical_scale(sizes(support_metadata), sizes(query_metadata), [str(p) for p in query_files],
                               [str(p) for p in support_files])
    if plan.target_m is not None and settings.query_scale != 1.0:
        raise ConfigError(f"--query-scale {settings.query_scale:g}: every image has its pixel size, so classify "
                          "already brings them to one scale; drop --query-scale")
    fallback = ("; --query-scale applies" if settings.query_scale != 1.0 else "") if plan.target_m is None else ""
    print(f"[classify] physical scale: {plan.description}{fallback}", file=sys.stderr, flush=True)
    return plan


def _used_pixel_size_nm(metadata: MicroscopeMetadata, factor: float) -> float | None:
    """nm per pixel of the image after resampling by `factor` (None when its pixel size is unknown)."""
    return metadata.pixel_size.nanometres / factor if metadata.pixel_size else None


def _prefetched_tiles(chunks: list[tuple[list[Path], list[MicroscopeMetadata], list[float]]], size: int,
                      settings: ClassifySettings, bottom_cropped: list[int]) -> Iterator[CroppedTiles]:
    """The chunks' tiles, decoding the next chunk in a thread while the caller embeds the current one
    (PIL releases the GIL), so the embedding pass, not decoding, bounds the throughput. Each chunk's
    rows cut by the crop are appended to `bottom_cropped`."""
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        def decode(chunk: tuple[list[Path], list[MicroscopeMetadata], list[float]]) -> Future[CroppedTiles]:
            files, metadata, factors = chunk
            return pool.submit(load_tiles, files, size, settings.tile, settings.query_scale, settings.crop,
                               metadata, factors)

        pending = decode(chunks[0])
        for index in range(len(chunks)):
            current = pending.result()
            if index + 1 < len(chunks):
                pending = decode(chunks[index + 1])
            bottom_cropped += current.bottom_cropped
            yield current


class _Reporter(PredictListener):
    """`predict`'s progress as classify's lines on stderr, and the query images' rate; every callback is
    then passed on to `listener` (which may raise to cancel)."""

    def __init__(self, queries: int, listener: PredictListener | None = None) -> None:
        self.queries = queries
        self.listener = listener or PredictListener()

    def finetune_started(self, steps: int, tiles: int) -> None:
        self.steps, self.tiles = steps, tiles
        self.finetune_progress = Progress("fine-tune on the support set", steps, every_s=2.0)
        self.finetune_start = time.perf_counter()
        self.listener.finetune_started(steps, tiles)

    def finetune_step(self, step: int, loss: float) -> None:
        if step == 0:  # the first step (trunk pass included) times the rest: say it before they run
            first = time.perf_counter() - self.finetune_start
            print(f"[classify] fine-tuning {self.steps} steps on {self.tiles} support tiles: first step "
                  f"{first:.1f} s, expect about {first * self.steps:.0f} s in all", file=sys.stderr, flush=True)
        self.finetune_progress.advance(1, f"loss {loss:.4f}")
        self.listener.finetune_step(step, loss)

    def finetune_finished(self) -> None:
        self.finetune_progress.finish()
        self.listener.finetune_finished()

    def queries_started(self) -> None:
        self.progress = Progress("classify", self.queries)
        self.started = time.perf_counter()
        self.listener.queries_started()

    def queries_embedded(self, images: int) -> None:
        self.progress.advance(images)
        self.listener.queries_embedded(images)

    def finish_queries(self) -> float:
        """Query images per second since the support was embedded; prints the closing progress line."""
        rate = self.queries / max(time.perf_counter() - self.started, 1e-9)
        self.progress.finish(f"({rate:.1f} query images/s)")
        return rate


def describe_crop(crop: EdgeCrop, bottom_cropped: list[int]) -> str:
    """Which crop classify used, for its summary: `none`, `bottom=64`, or \
`auto (bar of 40-42 rows in 6 of 9 images)`."""
    found = [rows for rows in bottom_cropped if rows]
    if not crop.auto_bottom:
        if crop.bottom or not found:
            return crop.describe()
        return (f"{crop.describe()} (data bar of {min(found)}-{max(found)} rows, measured by the files' metadata, "
                f"cut from {len(found)} of {len(bottom_cropped)} images)")
    bars = (f"bar of {min(found)}-{max(found)} rows cut from {len(found)} of {len(bottom_cropped)} images"
            if found else f"no bar found in {len(bottom_cropped)} images")
    return f"{crop.describe()} ({bars})"


def prediction_columns(classes: list[str]) -> list[str]:
    return ["file", "predicted", *(f"p_{name}" for name in classes), "nearest_support", "tiles", "tile_votes",
            "unknown", "pixel_size_nm"]


def write_predictions(predictions: list[Prediction], classes: list[str], out: str | os.PathLike) -> str:
    """The CSV, written next to `out` and moved into place only when complete (a failure of any kind
    removes the temporary file). Names that are not valid UTF-8 are written with `\\xNN` escapes, each
    reported once on stderr (see metallo_core/csv_output.py)."""
    names = [p.file for p in predictions] + [p.nearest_support for p in predictions] + list(classes)
    for _name, escaped in escaped_names(names):
        print(f"[classify] warning: the name {escaped!r} is not valid UTF-8; written to the CSV with \\xNN escapes",
              file=sys.stderr, flush=True)
    rows = ([p.file, p.predicted, *(f"{p.probabilities[name]:.6f}" for name in classes), p.nearest_support, p.tiles,
             ";".join(f"{name}:{count}" for name, count in p.tile_votes.items()), _flag(p.unknown),
             "" if p.pixel_size_nm is None else f"{p.pixel_size_nm:.6g}"] for p in predictions)
    return write_csv_atomically(out, prediction_columns(classes), rows, "predictions")


def _flag(unknown: bool | None) -> str:
    """The `unknown` column: true/false, empty where the check was off (not checked is not "known")."""
    return "" if unknown is None else str(unknown).lower()
