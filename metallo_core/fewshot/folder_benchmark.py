"""Few-shot accuracy of a pretrained backbone on a labelled image folder (`<root>/<class>/<image>`), with
and without per-task fine-tuning: the logic of `benchmarks/real_fewshot.py` and `metallo quickstart
--pretrained`.

Honest protocol. Each class's images are shuffled once (seeded) and cut into a *selection* pool and a
*test* pool. Settings (fine-tuning lr, steps, stages, BN mode, input size) are chosen on tasks drawn from
the selection pool only; the reported tasks are drawn from the test pool only, so no reported query or
support image ever took part in a choice. (The classes are shared: a set of 7 classes cannot also give
class-disjoint 5-way tasks.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from metallo_core.data.image_files import read_file_bytes
from metallo_core.data.images import decode_rgb, square_resized
from metallo_core.data.listing import list_folder
from metallo_core.errors import DataError
from metallo_core.fewshot.episodes import Episode, fixed_episodes
from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain
from metallo_core.fewshot.protonet import ImageNormalizer
from metallo_core.fewshot.tail_finetune import (
    StagedBackbone,
    TailFinetuner,
    TailFinetuneSettings,
    trunk_features,
)


@dataclass
class LabelledFolder:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) class index
    classes: list[str]
    root: str


def read_labelled_folder(root: str | Path, size: int) -> LabelledFolder:
    """Every image of every class folder, decoded to RGB, shorter side resized to `size` and centre-cropped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a directory of class folders (<root>/<class>/<image>)")
    # The project's one listing policy: OS/NAS metadata (@eaDir, ._*, ...) and hidden files never become
    # classes or images.
    groups, _loose = list_folder(root).by_top_folder()
    classes = [name for name, files in groups.items() if files]
    images, labels = [], []
    for index, name in enumerate(classes):
        for relative in groups[name]:
            path = root / relative
            images.append(square_resized(decode_rgb(read_file_bytes(path), str(path)), size))
            labels.append(index)
    if len(classes) < 2 or not images:
        raise DataError(f"{root} needs at least 2 class folders with images, found {len(classes)}")
    return LabelledFolder(np.stack(images), np.asarray(labels), classes, str(root))


def split_pools(labels: np.ndarray, selection_fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(selection rows per class, test rows per class): a seeded per-class shuffle, the first
    `selection_fraction` of each class to selection, the rest to test. Disjoint by construction."""
    rng = np.random.default_rng(seed)
    selection, test = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut = round(selection_fraction * len(rows))
        selection.append(np.sort(rows[:cut]))
        test.append(np.sort(rows[cut:]))
    return selection, test


def draw_tasks(pools: Sequence[np.ndarray], way: int, shot: int, query: int, count: int, seed: int,
               classes: Sequence[str] | None = None) -> list[Episode]:
    """Fixed tasks over rows of the folder (an Episode's rows index the whole folder, not the pool)."""
    return fixed_episodes(pools, way, shot, query, count, seed, class_names=classes)


@dataclass
class MethodScores:
    method: str
    accuracies: list[float]
    seconds: float

    def summary(self) -> dict[str, float]:
        mean, ci95 = mean_and_ci95(self.accuracies)
        return {"mean": mean, "ci95": ci95, "tasks": len(self.accuracies), "seconds": self.seconds}


@dataclass
class TaskSetResult:
    way: int
    shot: int
    query: int
    tasks: int
    seed: int
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    gains: dict[str, dict[str, float]] = field(default_factory=dict)  # "<method> - pn", paired per task


def cosine_accuracies(features: torch.Tensor, episodes: Sequence[Episode]) -> list[float]:
    """Plain ProtoNet (cosine nearest prototype) per task, on precomputed (N, D) features."""
    from metallo_core.fewshot.protonet import prototypes

    accuracies = []
    for episode in episodes:
        support = features[torch.tensor(episode.support)]
        query = features[torch.tensor(episode.query)]
        class_prototypes = prototypes(support, torch.tensor(episode.support_labels), episode.way)
        similarity = (torch.nn.functional.normalize(query, dim=1)
                      @ torch.nn.functional.normalize(class_prototypes, dim=1).T)
        accuracies.append(float((similarity.argmax(1).numpy() == episode.query_labels).mean()))
    return accuracies


def finetuned_accuracies(finetuner: TailFinetuner, trunk: torch.Tensor, episodes: Sequence[Episode], seed: int,
                         on_task: Callable[[int], None] | None = None) -> list[float]:
    """Per-task accuracy after fine-tuning the tail on the task's support set (restored after each task).
    Task i draws its pseudo-queries from generator seed (seed, i): reruns and subsets give the same draws."""
    accuracies = []
    for index, episode in enumerate(episodes):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        logits = finetuner.task_logits(trunk[torch.tensor(episode.support)],
                                       torch.tensor(episode.support_labels),
                                       trunk[torch.tensor(episode.query)], episode.way, generator)
        accuracies.append(float((logits.argmax(1).numpy() == episode.query_labels).mean()))
        if on_task is not None:
            on_task(index)
    return accuracies


def score_task_set(staged: StagedBackbone, trunk: torch.Tensor, episodes: Sequence[Episode], methods: Sequence[str],
                   settings: TailFinetuneSettings, seed: int,
                   on_task: Callable[[int], None] | None = None) -> tuple[TaskSetResult, dict[str, MethodScores]]:
    """PN (frozen features) and/or FT (tail fine-tuning) on the same tasks, with FT - PN paired per task."""
    finetuner = TailFinetuner(staged, settings)
    scores: dict[str, MethodScores] = {}
    if "pn" in methods:
        started = time.perf_counter()
        features = finetuner.embed(trunk)
        scores["pn"] = MethodScores("pn", cosine_accuracies(features, episodes), time.perf_counter() - started)
    if "ft" in methods:
        started = time.perf_counter()
        scores["ft"] = MethodScores("ft", finetuned_accuracies(finetuner, trunk, episodes, seed, on_task),
                                    time.perf_counter() - started)
    first = episodes[0]
    result = TaskSetResult(first.way, first.shot, first.query_n, len(episodes), seed,
                           {name: score.summary() for name, score in scores.items()})
    if "pn" in scores:
        for name, score in scores.items():
            if name != "pn":
                mean, ci95 = paired_gain(scores["pn"].accuracies, score.accuracies)
                result.gains[f"{name} - pn"] = {"mean": mean, "ci95": ci95}
    return result, scores


def folder_trunk(folder: LabelledFolder, staged: StagedBackbone, normalizer: ImageNormalizer, cache_stage: int,
                 batch_size: int = 64) -> torch.Tensor:
    """(N, C, h, w) float16 trunk features of every image of the folder (converted in batches)."""
    parts = []
    for start in range(0, len(folder.images), batch_size):
        parts.append(trunk_features(staged, normalizer(folder.images[start:start + batch_size]), cache_stage))
    return torch.cat(parts)


def as_dict(result: TaskSetResult) -> dict:
    return asdict(result)
