"""Few-shot accuracy of a pretrained backbone on a labelled image folder (`<root>/<class>/<image>`), with
and without per-task fine-tuning: the logic of `benchmarks/real_fewshot.py`.

Honest protocol. Each class's images are shuffled once (seeded) and cut into pools (`split_pools`, the
same cut `metallo quickstart` makes): DINO's unlabelled `train` pool, a *selection* pool (`val`) and a
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
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings, concat, task_generator
from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.fewshot.task import episode_task
from metallo_core.models.backbones import BackboneSpec

# The cosine scale of a ProtoNet put on a pretrained backbone without meta-training: ranking prototypes
# ignores it, so it only shapes the fine-tuning loss. Chosen on X-SDD selection tasks (5-way 1-shot, 8
# pseudo-queries per class): the middle of the plateau of scales that gained most (README "Few-shot on
# real images"); large scales saturate the softmax on the few pseudo-queries and gain less.
PRETRAINED_COSINE_SCALE = 5.0


@dataclass
class LabelledFolder:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) class index
    classes: list[str]
    root: str
    paths: list[str] = field(default_factory=list)  # each image's file, relative to root (empty: not from files)


def read_labelled_folder(root: str | Path, size: int) -> LabelledFolder:
    """Every image of every class folder, decoded to RGB, shorter side resized to `size` and centre-cropped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a directory of class folders (<root>/<class>/<image>)")
    # The project's one listing policy: OS/NAS metadata (@eaDir, ._*, ...) and hidden files never become
    # classes or images.
    groups, _loose = list_folder(root).by_top_folder()
    classes = [name for name, files in groups.items() if files]
    images, labels, paths = [], [], []
    for index, name in enumerate(classes):
        for relative in groups[name]:
            path = root / relative
            images.append(square_resized(decode_rgb(read_file_bytes(path), str(path)), size))
            labels.append(index)
            paths.append(str(relative))
    if len(classes) < 2 or not images:
        raise DataError(f"{root} needs at least 2 class folders with images, found {len(classes)}")
    return LabelledFolder(np.stack(images), np.asarray(labels), classes, str(root), paths)


def split_pools(folder: LabelledFolder, fractions: Sequence[float], seed: int) -> dict[str, list[np.ndarray]]:
    """{pool: rows per class} for the pools `train`, `val`, `test` (as many as `fractions`): the very
    assignment `metallo data ingest --split-rows` and `metallo quickstart` make of the same folder
    (`data.ingest.imagefolder.assign_row_splits`, seeded per class), so a benchmark's selection (`val`) and
    test pools are the quickstart's. Disjoint by construction."""
    from metallo_core.data.ingest.common import split_names
    from metallo_core.data.ingest.imagefolder import assign_row_splits

    if not folder.paths:
        raise DataError(f"{folder.root}: pools are assigned by file; this folder was not read from files")
    by_class = {name: sorted(path for path, label in zip(folder.paths, folder.labels) if label == index)
                for index, name in sorted(enumerate(folder.classes), key=lambda item: item[1])}
    assignment = assign_row_splits(by_class, tuple(fractions), seed)
    row_of = {path: row for row, path in enumerate(folder.paths)}
    # Rows per class in the folder's class order, as draw_tasks expects.
    return {pool: [np.sort(np.asarray([row_of[path] for path in by_class[name] if assignment[path] == pool],
                                      dtype=np.int64)) for name in folder.classes]
            for pool in split_names(len(fractions))}


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


def pretrained_protonet(backbone: torch.nn.Module) -> ProtoNet:
    """A ProtoNet on a pretrained (not meta-trained) backbone, in eval mode, at PRETRAINED_COSINE_SCALE."""
    return ProtoNet(backbone.eval(), cosine_scale=PRETRAINED_COSINE_SCALE)


def benchmark_engine(backbone: torch.nn.Module, spec: BackboneSpec,
                     settings: FinetuneSettings | None = None) -> FinetuneEngine:
    """The engine a folder benchmark scores with: a pretrained ProtoNet on `backbone`, normalised for `spec`
    (`settings` default: FinetuneSettings(), the features classify embeds with)."""
    return FinetuneEngine(pretrained_protonet(backbone), settings or FinetuneSettings(),
                          ImageNormalizer.for_backbone(spec))


def folder_cache(folder: LabelledFolder, engine: FinetuneEngine, batch_size: int = 64) -> torch.Tensor:
    """The engine's cache of every image of the folder (float16 trunk maps or [0, 1] pixels), in batches."""
    normalizer = engine.normalizer
    return concat([engine.prepare(normalizer.to_unit(folder.images[start:start + batch_size]))
                   for start in range(0, len(folder.images), batch_size)])


def protonet_accuracies(engine: FinetuneEngine, cache: torch.Tensor, episodes: Sequence[Episode]) -> list[float]:
    """Plain ProtoNet per task: every image embedded once (engine.embed), each task scored on those features."""
    return features_accuracies(engine.model, engine.embed(cache), episodes)


def features_accuracies(model: ProtoNet, features: torch.Tensor, episodes: Sequence[Episode]) -> list[float]:
    """Plain ProtoNet per task on precomputed (N, D) features of the folder's images."""
    accuracies = []
    for episode in episodes:
        task = episode_task(episode, features)
        with torch.no_grad():
            logits = model.logits_from_features(task.support.examples, task.support.labels, task.query,
                                               task.support.way)
        accuracies.append(float((logits.argmax(1).numpy() == episode.query_labels).mean()))
    return accuracies


def finetuned_accuracies(engine: FinetuneEngine, cache: torch.Tensor, episodes: Sequence[Episode], seed: int,
                         on_task: Callable[[int], None] | None = None) -> list[float]:
    """Per-task accuracy after fine-tuning on the task's support set (restored after each task). Task i
    draws its pseudo-queries from `task_generator(seed, i)`: reruns and subsets give the same draws."""
    accuracies = []
    for index, episode in enumerate(episodes):
        logits = engine.task_logits(episode_task(episode, cache), task_generator(seed, index))
        accuracies.append(float((logits.argmax(1).numpy() == episode.query_labels).mean()))
        if on_task is not None:
            on_task(index)
    return accuracies


def score_task_set(engine: FinetuneEngine, cache: torch.Tensor, episodes: Sequence[Episode], methods: Sequence[str],
                   seed: int, on_task: Callable[[int], None] | None = None
                   ) -> tuple[TaskSetResult, dict[str, MethodScores]]:
    """PN (plain ProtoNet) and/or FT (fine-tuned per task) on the same tasks and the same cache (`folder_cache`),
    with FT - PN paired per task."""
    scores: dict[str, MethodScores] = {}
    if "pn" in methods:
        started = time.perf_counter()
        scores["pn"] = MethodScores("pn", protonet_accuracies(engine, cache, episodes), time.perf_counter() - started)
    if "ft" in methods:
        started = time.perf_counter()
        scores["ft"] = MethodScores("ft", finetuned_accuracies(engine, cache, episodes, seed, on_task),
                                    time.perf_counter() - started)
    return task_set_result(episodes, seed, scores), scores


def task_set_result(episodes: Sequence[Episode], seed: int, scores: dict[str, MethodScores]) -> TaskSetResult:
    """The summary of each method's scores on the same tasks, and each method minus PN, paired per task."""
    first = episodes[0]
    result = TaskSetResult(first.way, first.shot, first.query_n, len(episodes), seed,
                           {name: score.summary() for name, score in scores.items()})
    if "pn" in scores:
        for name, score in scores.items():
            if name != "pn":
                mean, ci95 = paired_gain(scores["pn"].accuracies, score.accuracies)
                result.gains[f"{name} - pn"] = {"mean": mean, "ci95": ci95}
    return result


def as_dict(result: TaskSetResult) -> dict:
    return asdict(result)
