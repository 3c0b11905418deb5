"""Scoring fixed few-shot tasks with a ProtoNet: plain (embed every image once) or with per-task fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.data.tensor_augment import to_float
from metallo_core.fewshot.episodes import Episode
from metallo_core.fewshot.finetune import FinetuneSettings, classify_task
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
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
def protonet_predictions(model: ProtoNet, features: torch.Tensor, episodes: Sequence[Episode]) -> list[np.ndarray]:
    """Vanilla ProtoNet over many tasks, reusing one embedding per image across all of them: per task, the
    episode-local label predicted for each query (in `episode.query` order)."""
    predictions = []
    for episode in episodes:
        support = features[torch.tensor(episode.support, device=features.device)]
        query = features[torch.tensor(episode.query, device=features.device)]
        support_labels = torch.tensor(episode.support_labels, device=features.device)
        logits = model.logits_from_features(support, support_labels, query, len(episode.classes))
        predictions.append(logits.argmax(1).cpu().numpy())
    return predictions


def protonet_accuracies(model: ProtoNet, features: torch.Tensor, episodes: Sequence[Episode]) -> list[float]:
    """Per-task accuracies of vanilla ProtoNet (see `protonet_predictions`)."""
    predictions = protonet_predictions(model, features, episodes)
    return [task_accuracy(predicted, episode) for predicted, episode in zip(predictions, episodes)]


def finetuned_predictions(model: ProtoNet, images: ClassIndexedImages, episodes: Sequence[Episode], mode: str,
                          settings: FinetuneSettings, normalizer: ImageNormalizer, device: torch.device,
                          *, seed: int, lr: float | None = None, precision: str = "auto",
                          first_task: int = 0) -> list[np.ndarray]:
    """Per-task fine-tuning (restoring the backbone before every task), then the episode-local label
    predicted for each query.

    `episodes` may be a slice of a longer task list starting at task `first_task`: each task's random
    stream is seeded by its index in the whole list, so any split into chunks gives the same predictions."""
    predictions = []
    for index, episode in enumerate(episodes, start=first_task):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        support = to_float(torch.from_numpy(images.images[episode.support]).to(device).permute(0, 3, 1, 2))
        query = to_float(torch.from_numpy(images.images[episode.query]).to(device).permute(0, 3, 1, 2))
        support_labels = torch.tensor(episode.support_labels, device=device)
        with autocast(device, precision):
            logits = classify_task(model, mode, support, support_labels, query, len(episode.classes), settings,
                                   normalizer=normalizer, generator=generator, lr=lr)
        predictions.append(logits.argmax(1).cpu().numpy())
    return predictions


def finetuned_accuracies(model: ProtoNet, images: ClassIndexedImages, episodes: Sequence[Episode], mode: str,
                         settings: FinetuneSettings, normalizer: ImageNormalizer, device: torch.device,
                         *, seed: int, lr: float | None = None, precision: str = "auto") -> list[float]:
    """Per-task accuracies under a fine-tuning mode (see `finetuned_predictions`)."""
    predictions = finetuned_predictions(model, images, episodes, mode, settings, normalizer, device, seed=seed,
                                        lr=lr, precision=precision)
    return [task_accuracy(predicted, episode) for predicted, episode in zip(predictions, episodes)]
