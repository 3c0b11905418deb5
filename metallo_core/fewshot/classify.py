"""Few-shot classification of new micrographs with a registered ProtoNet: `metallo classify`.

The support folder holds one sub-folder per class with a few labelled images each (the class name is
the folder's name); the query is one image or a folder of them. Prototypes come from the support
images; with `finetune`, the backbone is first adapted to the support set as in meta-testing.

Image policy. Micrographs arrive at any size, bit depth and colour mode (8/16/32-bit or float, grey or
RGB, TIFF, PNG, JPEG, BMP); they are decoded to 8-bit RGB by the one decode policy of
`metallo_core/data/decode.py` (deeper data mapped from its own 0.1-99.9 percentile range, non-finite
pixels left out, every change warned per file). Folders are listed by `metallo_core/data/listing.py`
(OS/NAS metadata such as `._*` and `@eaDir/` and hidden files skipped and counted). `crop` then cuts
edges, such as a burned-in data bar (`bottom=64`, `bottom=0.1`, or `auto`; see `data/crop.py`), from
support and query images alike. Then:
- `tile = 0` (the default): the whole image, shorter side resized to the model's input size and
  centre-cropped, as ingestion (`--size`) prepares training images.
- `tile = PX`: the image is cut into non-overlapping PX x PX tiles (a remainder narrower than half a
  tile is dropped), each resized to the input size. A large micrograph then keeps its texture at the
  scale the model was trained on instead of being shrunk to a thumbnail. Support tiles all become
  samples of their class; a query's class probabilities are the mean over its tiles, and the CSV
  reports how many tiles voted for each class.
Magnification: support and query images are assumed to be taken at the same magnification (the
support defines what each class looks like). When the queries were imaged at another pixel size,
`query_scale` resamples them first (e.g. 0.5 for queries at twice the support's magnification).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metallo_core.config import to_dict
from metallo_core.data.crop import EdgeCrop
from metallo_core.data.image_files import is_image_file, list_image_files, list_image_listing, read_file_bytes
from metallo_core.data.images import decode_rgb, square_resized
from metallo_core.errors import ConfigError, DataError
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings, task_generator
from metallo_core.fewshot.inference import TRANSDUCTIVE, InferenceSettings, query_logits
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.precision import PRECISIONS, autocast
from metallo_core.progress import Progress


@dataclass
class ClassifySettings:
    tile: int = 0  # 0: whole image resized; PX: cut into PX x PX tiles (see the module's docstring)
    query_scale: float = 1.0  # resample queries by this factor first (pixel-size mismatch with the support)
    finetune: bool = False
    # Fine-tuning settings: those an evaluation or search chose for the model (recorded on its version), or
    # those of `finetune_from` (a run id, models:/ URI or YAML file); steps/lr/update/bn_mode given here
    # override single fields (None: as chosen). See metallo_core/models/finetune_choice.py.
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

    def validate(self) -> None:
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


@dataclass
class LabelledTiles:
    """Tiles of several images: tile i belongs to image owner[i]."""

    tiles: np.ndarray  # (T, S, S, 3) uint8
    owner: np.ndarray  # (T,) image index
    bottom_cropped: list[int] = field(default_factory=list)  # rows cut from each image's bottom (crop)


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


def image_tiles(pixels: np.ndarray, size: int, tile: int, scale: float = 1.0) -> np.ndarray:
    """(T, size, size, 3) uint8 tiles of an (H, W, 3) image under the module's tiling policy."""
    image = Image.fromarray(pixels)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR, reducing_gap=3.0)
    if tile == 0 or min(image.width, image.height) < tile:
        return square_resized(np.asarray(image), size)[None]
    columns = _tile_starts(image.width, tile)
    rows = _tile_starts(image.height, tile)
    return np.stack([square_resized(np.asarray(image.crop((x, y, x + tile, y + tile))), size)
                     for y in rows for x in columns])


def _tile_starts(length: int, tile: int) -> list[int]:
    count = length // tile + (1 if length % tile >= tile / 2 else 0)
    if count <= 1:
        return [(length - tile) // 2]
    # Spread the tiles evenly over the whole length (overlapping a little when a half-tile remains).
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def load_tiles(files: list[Path], size: int, tile: int, scale: float = 1.0,
               crop: EdgeCrop | None = None) -> LabelledTiles:
    tiles, owner, bottom_cropped = [], [], []
    for index, path in enumerate(files):
        pixels, cut = (crop or EdgeCrop()).apply(decode_rgb(read_file_bytes(path), str(path)), str(path))
        pieces = image_tiles(pixels, size, tile, scale)
        tiles.append(pieces)
        owner.append(np.full(len(pieces), index))
        bottom_cropped.append(cut)
    return LabelledTiles(np.concatenate(tiles), np.concatenate(owner), bottom_cropped)


def classify(
    model_uri: str,
    support_dir: str | os.PathLike,
    query: str | os.PathLike,
    out: str | os.PathLike | None = None,
    settings: ClassifySettings | None = None,
) -> ClassifyResult:
    """Classify the query image(s) against the support classes; with `out`, write the CSV (only when
    everything succeeded: it is written to a temporary file and moved into place at the end)."""
    from metallo_core.models.protonet_store import load_protonet

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
        from metallo_core.models.finetune_choice import choose

        chosen = choose(model_uri, settings.finetune_from, {"steps": settings.steps, "lr": settings.lr,
                                                             "update": settings.update, "bn_mode": settings.bn_mode})
        print(f"[classify] fine-tuning with {chosen.describe()}; from {chosen.source}", file=sys.stderr, flush=True)
    device = torch.device(settings.device)
    model.to(device).eval()
    normalizer = ImageNormalizer.for_backbone(spec, device)
    size = spec.image_size

    classes = list(support_files)
    flat_support = [path for name in classes for path in support_files[name]]
    support = load_tiles(flat_support, size, settings.tile, crop=settings.crop)
    bottom_cropped = list(support.bottom_cropped)
    image_labels = np.concatenate([np.full(len(support_files[name]), i) for i, name in enumerate(classes)])
    support_labels = torch.as_tensor(image_labels[support.owner], device=device)
    # One feature path with and without fine-tuning, the evaluation's (fewshot.evaluation.PreparedImages and
    # engine_predictions): the engine's cache and features under autocast at the resolved precision, so
    # classify's features of an image are the ones `metallo evaluate` scored.
    if chosen is not None:
        engine = _finetune(model, normalizer, support.tiles, support_labels, len(classes), chosen.settings,
                           settings.precision)
    else:
        engine = feature_engine(model, normalizer)

    def embed(tiles: np.ndarray) -> torch.Tensor:
        """(N, D) float32 features with the model as it is now (adapted, with --finetune)."""
        with autocast(device, settings.precision):
            return torch.cat([
                engine.embed(engine.prepare(normalizer.to_unit(tiles[start:start + settings.batch_size])))
                for start in range(0, len(tiles), settings.batch_size)]).float()

    support_features = embed(support.tiles)
    support_image_features = _mean_by_owner(support_features, support.owner, len(flat_support))

    progress = Progress("classify", len(query_files))
    started = time.perf_counter()
    chunks = [query_files[start:start + settings.batch_size]
              for start in range(0, len(query_files), settings.batch_size)]
    features, owners = [], []
    for chunk, queries in zip(chunks, _prefetched_tiles(chunks, size, settings)):
        features.append(embed(queries.tiles))
        owners.append(queries.owner + sum(len(done) for done in chunks[:len(owners)]))
        bottom_cropped += queries.bottom_cropped
        progress.advance(len(chunk))
    query_features = torch.cat(features) if features else support_features[:0]
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    # Every query tile is scored at once: transductive inference uses all of them (plain inference gives
    # each tile the same logits whether scored alone or with the others).
    logits = query_logits(model.classifier, support_features, support_labels, query_features, len(classes), inference)
    probabilities = logits.float().softmax(dim=1)
    nearest = _nearest(model, _mean_by_owner(query_features, owner, len(query_files)), support_image_features)
    predictions: list[Prediction] = []
    for index, path in enumerate(query_files):
        rows = torch.as_tensor(owner == index, device=probabilities.device)
        mean = probabilities[rows].mean(dim=0)
        votes = Counter(classes[i] for i in probabilities[rows].argmax(dim=1).tolist())
        predictions.append(Prediction(
            file=path.relative_to(query_root).as_posix(),
            predicted=classes[int(mean.argmax())],
            probabilities={name: float(p) for name, p in zip(classes, mean.tolist())},
            nearest_support=flat_support[int(nearest[index])].relative_to(Path(support_dir).expanduser()).as_posix(),
            tiles=int(rows.sum()),
            tile_votes=dict(votes.most_common()),
        ))
    rate = len(query_files) / max(time.perf_counter() - started, 1e-9)
    progress.finish(f"({rate:.1f} query images/s)")
    result = ClassifyResult(model_uri, classes, {name: len(files) for name, files in support_files.items()},
                            predictions, None, rate, settings.finetune,
                            crop=describe_crop(settings.crop, bottom_cropped),
                            finetune_settings=to_dict(chosen.settings) if chosen else None,
                            finetune_source=chosen.source if chosen else "",
                            inference=to_dict(inference), inference_source=inference_source)
    if out is not None:
        result.out = write_predictions(predictions, classes, out)
    return result


def classify_inference(model_uri: str, settings: ClassifySettings) -> tuple[InferenceSettings, str]:
    """(the inference settings classify scores with, where they came from in words); see ClassifySettings."""
    import dataclasses

    if settings.inference == "plain":
        inference, source = InferenceSettings(), "--inference plain"
    else:
        from metallo_core.models.finetune_choice import recorded_inference

        inference, source = recorded_inference(model_uri)
    if settings.transductive is not None:
        inference = dataclasses.replace(inference, transductive=settings.transductive)  # type: ignore[arg-type]
        source += f"; overridden: transductive {settings.transductive}"
    inference.validate()
    return inference, source


def _prefetched_tiles(chunks: list[list[Path]], size: int, settings: ClassifySettings) -> Iterator[LabelledTiles]:
    """The chunks' tiles, decoding the next chunk in a thread while the caller embeds the current one
    (PIL releases the GIL), so the embedding pass, not decoding, bounds the throughput."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = (pool.submit(load_tiles, chunks[0], size, settings.tile, settings.query_scale, settings.crop)
                   if chunks else None)
        for index in range(len(chunks)):
            current = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(load_tiles, chunks[index + 1], size, settings.tile, settings.query_scale,
                                      settings.crop)
            yield current


def describe_crop(crop: EdgeCrop, bottom_cropped: list[int]) -> str:
    """Which crop classify used, for its summary: `none`, `bottom=64`, or \
`auto (bar of 40-42 rows in 6 of 9 images)`."""
    if not crop.auto_bottom:
        return crop.describe()
    found = [rows for rows in bottom_cropped if rows]
    bars = (f"bar of {min(found)}-{max(found)} rows cut from {len(found)} of {len(bottom_cropped)} images"
            if found else f"no bar found in {len(bottom_cropped)} images")
    return f"{crop.describe()} ({bars})"


def feature_engine(model: ProtoNet, normalizer: ImageNormalizer) -> FinetuneEngine:
    """The engine classify embeds with when it does not fine-tune: the evaluation's default form (cached trunk
    maps) where the network splits into stages, else whole images through the network's own forward pass
    (`pseudo_queries: pixels`, e.g. a ViT), which any network has."""
    try:
        return FinetuneEngine(model, FinetuneSettings(), normalizer)
    except ConfigError:
        return FinetuneEngine(model, FinetuneSettings(pseudo_queries="pixels", update="all"), normalizer)


def _finetune(model: ProtoNet, normalizer: ImageNormalizer, tiles: np.ndarray, labels: torch.Tensor, way: int,
              settings: FinetuneSettings, precision: str) -> FinetuneEngine:
    """Adapt `model` in place to the support tiles (task 0 of seed 0 of `finetune.task_generator`), under
    autocast at `precision` as the evaluation adapts each task; the engine then embeds support and queries
    with the adapted weights."""
    engine = FinetuneEngine(model, settings, normalizer)
    progress = Progress("fine-tune on the support set", settings.steps, every_s=2.0)
    started = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if step == 0:  # the first step (trunk pass included) times the rest: say it before they run
            first = time.perf_counter() - started
            print(f"[classify] fine-tuning {settings.steps} steps on {len(tiles)} support tiles: first step "
                  f"{first:.1f} s, expect about {first * settings.steps:.0f} s in all", file=sys.stderr, flush=True)
        progress.advance(1, f"loss {loss:.4f}")

    with autocast(normalizer.device, precision):
        engine.adapt(engine.prepare(normalizer.to_unit(tiles)), labels, way,
                     task_generator(0, 0, device=normalizer.device), on_step=on_step)
    progress.finish()
    model.eval()
    return engine


def _mean_by_owner(features: torch.Tensor, owner: np.ndarray, count: int) -> torch.Tensor:
    index = torch.as_tensor(owner, device=features.device)
    sums = torch.zeros(count, features.shape[1], device=features.device).index_add_(0, index, features)
    return sums / torch.bincount(index, minlength=count).clamp(min=1)[:, None]


def _nearest(model: ProtoNet, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Index of the support image nearest to each query, in the model's own distance."""
    if model.distance == "cosine":
        similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(support, dim=1).T
        return similarity.argmax(dim=1)
    return torch.cdist(queries, support).argmin(dim=1)


def prediction_columns(classes: list[str]) -> list[str]:
    return ["file", "predicted", *(f"p_{name}" for name in classes), "nearest_support", "tiles", "tile_votes"]


def write_predictions(predictions: list[Prediction], classes: list[str], out: str | os.PathLike) -> str:
    """The CSV, written next to `out` and moved into place only when complete (a failure of any kind
    removes the temporary file). Names that are not valid UTF-8 are written with `\\xNN` escapes, each
    reported once on stderr (see metallo_core/csv_output.py)."""
    from metallo_core.csv_output import escaped_names, write_csv_atomically

    names = [p.file for p in predictions] + [p.nearest_support for p in predictions] + list(classes)
    for _name, escaped in escaped_names(names):
        print(f"[classify] warning: the name {escaped!r} is not valid UTF-8; written to the CSV with \\xNN escapes",
              file=sys.stderr, flush=True)
    rows = ([p.file, p.predicted, *(f"{p.probabilities[name]:.6f}" for name in classes), p.nearest_support, p.tiles,
             ";".join(f"{name}:{count}" for name, count in p.tile_votes.items())] for p in predictions)
    return write_csv_atomically(out, prediction_columns(classes), rows, "predictions")
