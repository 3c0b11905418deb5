"""Few-shot prediction of new images with a ProtoNet: support tiles with labels in, per-query-image class
probabilities, tile votes and nearest support image out (what `metallo classify` reports).

Pure: no files, no registry, no printing. The caller loads the model, chooses the fine-tuning and inference
settings and cuts the images into tiles (`fewshot.tiles`); progress is reported through `PredictListener`.
The feature path is the evaluation's (`fewshot.evaluation.PreparedImages` and `engine_predictions`): the
fine-tuning engine's cache and features under autocast at the resolved precision, so the features of an
image here are the ones `metallo evaluate` scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from metallo_core.errors import ConfigError
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings, task_generator
from metallo_core.fewshot.inference import InferenceSettings, query_logits
from metallo_core.fewshot.open_set import OpenSetSettings, open_set_flags
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.fewshot.task import FewShotTask, SupportSet
from metallo_core.fewshot.tiles import TiledImages
from metallo_core.precision import autocast


@dataclass(frozen=True)
class PredictSettings:
    """How to predict, every choice already made by the caller."""

    inference: InferenceSettings  # how features become logits (fewshot.inference)
    finetune: FinetuneSettings | None = None  # adapt the model to the support first; None: as it is
    batch_size: int = 64  # tiles embedded at once
    precision: str = "auto"  # features and fine-tuning computed in this precision (metallo_core.precision)
    open_set: OpenSetSettings | None = None  # flag images that resemble no class (fewshot.open_set); None: off


@dataclass
class QueryPredictions:
    """One entry per query image, in the order the query chunks gave them; classes are label indices."""

    probabilities: torch.Tensor  # (Q, way) float32: the mean over the image's tiles of each tile's softmax
    predicted: list[int]  # argmax of the image's probabilities
    tiles: list[int]  # how many tiles the image has
    tile_votes: list[dict[int, int]]  # class -> tiles whose argmax it is; most votes first (ties: first voted)
    nearest_support: list[int]  # index of the support image nearest to the image's mean feature
    # With `PredictSettings.open_set` (else empty): whether the image resembles no class, its open-set score
    # (fewshot.open_set, on the image's mean feature) and each class's separation, the score's calibration.
    unknown: list[bool] = field(default_factory=list)
    open_set_scores: list[float] = field(default_factory=list)
    separation: list[float] = field(default_factory=list)


class PredictListener:
    """Progress callbacks of `predict`, called as the work happens; every one does nothing by default."""

    def finetune_started(self, steps: int, tiles: int) -> None:
        """Before the engine is built and adapted with `steps` steps on `tiles` support tiles."""

    def finetune_step(self, step: int, loss: float) -> None:
        """After fine-tuning step `step` (from 0), with its loss."""

    def finetune_finished(self) -> None:
        """After the last fine-tuning step (also when the settings make no step)."""

    def queries_started(self) -> None:
        """Once the support is embedded, before the first query chunk is read."""

    def queries_embedded(self, images: int) -> None:
        """After each query chunk is embedded, with its number of images."""


def predict(model: ProtoNet, normalizer: ImageNormalizer, support: TiledImages, labels: np.ndarray,
            queries: Iterable[TiledImages], settings: PredictSettings,
            listener: PredictListener | None = None) -> QueryPredictions:
    """Predict the query images against the labelled support images.

    `model` is on `normalizer.device` in eval mode; with `settings.finetune` it is adapted in place to the
    support tiles (task 0 of seed 0 of `finetune.task_generator`, as the evaluation draws a task) and stays
    adapted. `labels` is the (support.images,) class index of each support image, classes 0..way-1 each with
    at least one image; every tile of an image is a sample of the image's class. `queries` are chunks of
    query images, consumed one at a time (a caller may decode the next chunk while this one is embedded);
    their owners count from 0 within each chunk. Every query tile is scored at once, so transductive
    inference sees all of them. With `settings.open_set`, each image is also flagged unknown or not from its
    mean feature against the support's own prototypes (`fewshot.open_set`: not refined by the queries, so the
    flag does not depend on the other images even when the prediction does).

    ValueError when the labels do not match the support images or leave a class without an image; ConfigError
    from the fine-tuning engine for settings the model cannot run."""
    listener = listener or PredictListener()
    labels = np.asarray(labels)
    if labels.shape != (support.images,):
        raise ValueError(f"expected one label per support image, {support.images}, got shape {labels.shape}")
    way = int(labels.max()) + 1 if len(labels) else 0
    if way == 0 or labels.min() < 0 or np.bincount(labels, minlength=way).min() == 0:
        raise ValueError(f"support labels must give each class 0..{way - 1} an image, "
                         f"got {sorted(set(labels.tolist()))}")
    device = normalizer.device
    if settings.finetune is not None:
        support_labels = torch.as_tensor(labels[support.owner], device=device)
        unit_tiles = SupportSet(normalizer.to_unit(support.tiles), support_labels, way)
        engine = _finetune(model, normalizer, unit_tiles, settings, listener)
    else:
        engine = feature_engine(model, normalizer)

    support_features = embed_tiles(engine, support.tiles, settings)

    listener.queries_started()
    features, owners, count = [], [], 0
    for chunk in queries:
        features.append(embed_tiles(engine, chunk.tiles, settings))
        owners.append(chunk.owner + count)
        count += chunk.images
        listener.queries_embedded(chunk.images)
    query_features = torch.cat(features) if features else support_features[:0]
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    return predict_from_features(model, TiledFeatures(support_features, support.owner, support.images), labels,
                                 TiledFeatures(query_features, owner, count), settings)


def embed_tiles(engine: FinetuneEngine, tiles: np.ndarray, settings: PredictSettings) -> torch.Tensor:
    """(N, D) float32 features of (N, S, S, 3) uint8 tiles with the engine's model as it is now (adapted, with
    fine-tuning), in batches of `settings.batch_size`, at the settings' precision."""
    normalizer = engine.normalizer
    with autocast(normalizer.device, settings.precision):
        return torch.cat([engine.embed(engine.prepare(normalizer.to_unit(tiles[start:start + settings.batch_size])))
                          for start in range(0, len(tiles), settings.batch_size)]).float()


@dataclass
class TiledFeatures:
    """(T, D) features of the tiles of `images` images: tile i belongs to image owner[i] (see `tiles.TiledImages`)."""

    features: torch.Tensor
    owner: np.ndarray
    images: int


def predict_from_features(model: ProtoNet, support: TiledFeatures, labels: np.ndarray, queries: TiledFeatures,
                          settings: PredictSettings) -> QueryPredictions:
    """`predict` after embedding: the support's and queries' tile features (embedded with the model as `predict`
    leaves it) to per-image probabilities, classes, tile votes, nearest support images and open-set flags.
    Every query tile is scored at once, so transductive inference sees all of them. `labels` as in `predict`
    (checked there)."""
    labels = np.asarray(labels)
    way = int(labels.max()) + 1
    support_labels = torch.as_tensor(labels[support.owner], device=support.features.device)
    query_features, owner, count = queries.features, queries.owner, queries.images
    support_image_features = _mean_by_owner(support.features, support.owner, support.images)
    # Plain inference gives each tile the same logits whether scored alone or with the others.
    task = FewShotTask(SupportSet(support.features, support_labels, way), query_features)
    logits = query_logits(model.classifier, task, settings.inference)
    probabilities = logits.float().softmax(dim=1)
    query_image_features = _mean_by_owner(query_features, owner, count)
    nearest = _nearest(model, query_image_features, support_image_features)
    means = _mean_by_owner(probabilities, owner, count)
    # One pass over the tiles, not one per image: each image's tile classes in tile order (ties: first voted).
    order = np.argsort(owner, kind="stable")
    tiles = np.bincount(owner, minlength=count)
    per_image = np.split(probabilities.argmax(dim=1).cpu().numpy()[order], np.cumsum(tiles)[:-1]) if count else []
    votes = [dict(Counter(classes.tolist()).most_common()) for classes in per_image]
    found = QueryPredictions(means, means.argmax(dim=1).tolist(), tiles.tolist(), votes, nearest.tolist())
    if settings.open_set is not None:
        flags = open_set_flags(support.features, support_labels, query_image_features, way, settings.inference.power,
                               settings.open_set)
        found.unknown, found.open_set_scores = flags.unknown.tolist(), flags.scores.tolist()
        found.separation = flags.separation.tolist()
    return found


def feature_engine(model: ProtoNet, normalizer: ImageNormalizer) -> FinetuneEngine:
    """The engine `predict` embeds with when it does not fine-tune: the evaluation's default form (cached trunk
    maps) where the network splits into stages, else whole images through the network's own forward pass
    (`pseudo_queries: pixels`, e.g. a ViT), which any network has."""
    try:
        return FinetuneEngine(model, FinetuneSettings(), normalizer)
    except ConfigError:
        return FinetuneEngine(model, FinetuneSettings(pseudo_queries="pixels", update="all"), normalizer)


def _finetune(model: ProtoNet, normalizer: ImageNormalizer, support: SupportSet, settings: PredictSettings,
              listener: PredictListener) -> FinetuneEngine:
    """Adapt `model` in place to the support tiles, as [0, 1] float images (task 0 of seed 0 of
    `finetune.task_generator`), under autocast at the settings' precision as the evaluation adapts each task;
    the engine then embeds support and queries with the adapted weights."""
    assert settings.finetune is not None
    listener.finetune_started(settings.finetune.steps, len(support.examples))
    engine = FinetuneEngine(model, settings.finetune, normalizer)
    with autocast(normalizer.device, settings.precision):
        engine.adapt(support.mapped(engine.prepare), task_generator(0, 0, device=normalizer.device),
                     on_step=listener.finetune_step)
    listener.finetune_finished()
    model.eval()
    return engine


def _mean_by_owner(features: torch.Tensor, owner: np.ndarray, count: int) -> torch.Tensor:
    """(count, D) mean feature of each image from its tiles' (T, D) features (zeros for an image without one)."""
    index = torch.as_tensor(owner, device=features.device)
    sums = torch.zeros(count, features.shape[1], device=features.device).index_add_(0, index, features)
    return sums / torch.bincount(index, minlength=count).clamp(min=1)[:, None]


def _nearest(model: ProtoNet, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """(Q,) index of the support image nearest to each of the (Q, D) query features, in the model's own
    distance, among the (S, D) support features."""
    if model.distance == "cosine":
        similarity = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(support, dim=1).T
        return similarity.argmax(dim=1)
    return torch.cdist(queries, support).argmin(dim=1)
