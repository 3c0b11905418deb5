"""Scoring fixed few-shot tasks with a ProtoNet: plain (embed every image once) or with per-task fine-tuning
through the one `finetune.FinetuneEngine`, on images prepared once for all tasks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metallo_core.fewshot.episodes import Episode
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings, concat, task_generator
from metallo_core.fewshot.inference import InferenceSettings, query_logits
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.fewshot.task import episode_task
from metallo_core.precision import autocast


@torch.no_grad()
def embed_images(model: ProtoNet, images: np.ndarray, normalizer: ImageNormalizer, device: torch.device,
                 precision: str = "auto", batch_size: int = 128) -> torch.Tensor:
    """Backbone features of (N, S, S, 3) uint8 images, in eval mode."""
    model.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = normalizer(images[start:start + batch_size])
        with autocast(device, precision):
            features.append(model.backbone(batch).float())
    return torch.cat(features)


def task_accuracy(predicted: np.ndarray, episode: Episode) -> float:
    """Fraction of a task's queries whose predicted episode-local label is right."""
    return float(np.mean(np.asarray(predicted) == episode.query_labels))


@torch.no_grad()
def protonet_predictions(model: ProtoNet, features: torch.Tensor, episodes: Sequence[Episode],
                         inference: InferenceSettings | None = None) -> list[np.ndarray]:
    """ProtoNet over many tasks, reusing one embedding per image across all of them: per task, the
    episode-local label predicted for each query (in `episode.query` order), under `inference` (plain
    prototypes by default)."""
    return [logits.argmax(1).cpu().numpy()
            for logits in task_logits_from_features(model, features, episodes, inference or InferenceSettings())]


def task_logits_from_features(model: ProtoNet, features: torch.Tensor, episodes: Sequence[Episode],
                              inference: InferenceSettings) -> list[torch.Tensor]:
    """Per task, (Q, way) query logits from the (N, D) features of every image the tasks index."""
    return [query_logits(model.classifier, episode_task(episode, features), inference) for episode in episodes]


def protonet_accuracies(model: ProtoNet, features: torch.Tensor, episodes: Sequence[Episode]) -> list[float]:
    """Per-task accuracies of vanilla ProtoNet (see `protonet_predictions`)."""
    predictions = protonet_predictions(model, features, episodes)
    return [task_accuracy(predicted, episode) for predicted, episode in zip(predictions, episodes)]


class PreparedImages:
    """A whole image set as a FinetuneEngine's cache, prepared once and then indexed by every task: the
    (N, C, h, w) float16 trunk maps of every image (trunk_maps), or, for pixels, where preparing is the
    identity, the uint8 images themselves, turned into [0, 1] floats a task at a time (a quarter of the
    memory of holding them all as floats)."""

    def __init__(self, engine: FinetuneEngine, images: np.ndarray, precision: str = "auto", batch_size: int = 128):
        self.images, self.normalizer = images, engine.normalizer
        self.key = cache_key(engine.settings)
        self.maps: torch.Tensor | None = None
        if engine.staged is not None:
            with autocast(self.normalizer.device, precision):
                parts = [engine.prepare(self.normalizer.to_unit(images[start:start + batch_size]))
                         for start in range(0, len(images), batch_size)]
            self.maps = concat(parts)

    def rows(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The cache of the images at `rows`, in that order."""
        if self.maps is not None:
            return self.maps[torch.tensor(np.asarray(rows), device=self.maps.device)]
        return self.normalizer.to_unit(self.images[np.asarray(rows)])

    def features(self, engine: FinetuneEngine, precision: str = "auto", batch_size: int = 128) -> torch.Tensor:
        """(N, D) features of every image with the engine's current weights."""
        with autocast(self.normalizer.device, precision):
            return torch.cat([engine.embed(self.rows(np.arange(start, min(start + batch_size, len(self.images)))))
                              for start in range(0, len(self.images), batch_size)])


def cache_key(settings: FinetuneSettings) -> tuple[str, int | None]:
    """What a PreparedImages depends on: the pseudo-query form and, for trunk maps, the cache stage."""
    return settings.pseudo_queries, settings.cache_stage if settings.pseudo_queries == "trunk_maps" else None


def engine_predictions(engine: FinetuneEngine, prepared: PreparedImages, episodes: Sequence[Episode], mode: str,
                       *, seed: int, lr: float | None = None, precision: str = "auto",
                       first_task: int = 0) -> list[np.ndarray]:
    """Per task, the episode-local label predicted for each query under a meta-test mode and the engine's
    inference settings (see `engine_predictions_by_inference`)."""
    return engine_predictions_by_inference(engine, prepared, episodes, mode, [engine.inference], seed=seed, lr=lr,
                                           precision=precision, first_task=first_task)[0]


def engine_predictions_by_inference(engine: FinetuneEngine, prepared: PreparedImages, episodes: Sequence[Episode],
                                    mode: str, inferences: Sequence[InferenceSettings], *, seed: int,
                                    lr: float | None = None, precision: str = "auto",
                                    first_task: int = 0) -> list[list[np.ndarray]]:
    """Per inference settings, per task, the episode-local label predicted for each query under a meta-test
    mode. Each task is adapted once (fine-tuning modes restore the weights after every task) and its features
    scored under every inference settings; "protonet" embeds every image once and reuses the features.

    `episodes` may be a slice of a longer task list starting at task `first_task`: each task's random
    stream is `task_generator(seed, its index in the whole list)`, so any split into chunks gives the same
    predictions."""
    if prepared.key != cache_key(engine.settings):
        raise ValueError(f"images prepared for {prepared.key}, engine settings need {cache_key(engine.settings)}")
    if mode == "protonet":
        features = prepared.features(engine, precision)
        return [protonet_predictions(engine.model, features, episodes, inference) for inference in inferences]
    device = prepared.normalizer.device
    predictions: list[list[np.ndarray]] = [[] for _ in inferences]
    for index, episode in enumerate(episodes, start=first_task):
        with autocast(device, precision):
            features = engine.mode_features(mode, episode_task(episode, prepared.rows), task_generator(seed, index),
                                            lr=lr)
        for row, inference in zip(predictions, inferences):
            row.append(query_logits(engine.model.classifier, features, inference).argmax(1).cpu().numpy())
    return predictions


def engine_accuracies(engine: FinetuneEngine, prepared: PreparedImages, episodes: Sequence[Episode], mode: str,
                      *, seed: int, lr: float | None = None, precision: str = "auto",
                      first_task: int = 0) -> list[float]:
    """Per-task accuracies under a meta-test mode (see `engine_predictions`)."""
    predictions = engine_predictions(engine, prepared, episodes, mode, seed=seed, lr=lr, precision=precision,
                                     first_task=first_task)
    return [task_accuracy(predicted, episode) for predicted, episode in zip(predictions, episodes)]
