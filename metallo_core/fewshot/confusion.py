"""Which classes a few-shot model mistakes for which, pooled over the many tasks of one evaluated split.

Every task offers only its own N classes, so a cell (true A, predicted B) can fill only in tasks that drew
both A and B. Next to the counts we keep those opportunities (queries of A scored in a task that offered
B): counts / opportunities is then a fair confusion rate even for pairs that met in few tasks, and a zero
rate (never confused) differs from a pair that never met.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metallo_core.errors import DataError
from metallo_core.fewshot.episodes import Episode

CONFUSION_FORMAT = "metallo-confusion/1"
CONFUSION_ARTIFACT_DIR = "confusion"  # an evaluation run logs confusion/<mode>.json per meta-test mode


@dataclass
class Confusion:
    classes: list[str]  # the split's classes that appeared in at least one task, in split order
    counts: np.ndarray  # (C, C) int: queries of true class row predicted as class column
    opportunities: np.ndarray  # (C, C) int: queries of class row scored in a task that offered class column
    tasks: int

    @property
    def queries(self) -> int:
        return int(self.counts.sum())

    def rates(self) -> np.ndarray:
        """counts / opportunities per cell; NaN where the two classes never shared a task."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.opportunities > 0, self.counts / np.maximum(self.opportunities, 1), np.nan)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CONFUSION_FORMAT,
            "classes": list(self.classes),
            "counts": self.counts.tolist(),
            "opportunities": self.opportunities.tolist(),
            "tasks": self.tasks,
            "queries": self.queries,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any] | str, source: str = "confusion matrix") -> Confusion:
        data = json.loads(payload) if isinstance(payload, str) else payload
        if not isinstance(data, dict) or data.get("format") != CONFUSION_FORMAT:
            raise DataError(f"{source} is not a {CONFUSION_FORMAT} file")
        classes = [str(name) for name in data["classes"]]
        counts = np.asarray(data["counts"], dtype=np.int64).reshape(len(classes), len(classes))
        opportunities = np.asarray(data["opportunities"], dtype=np.int64).reshape(len(classes), len(classes))
        return cls(classes, counts, opportunities, int(data["tasks"]))


def confusion_over_tasks(episodes: Sequence[Episode], predictions: Sequence[np.ndarray],
                         class_names: Sequence[str]) -> Confusion:
    """Pool per-task predictions (episode-local labels, in `episode.query` order) into one true x predicted
    matrix over the split's class names. A prediction can only name one of its own task's classes."""
    if len(episodes) != len(predictions):
        raise ValueError(f"{len(episodes)} tasks but predictions for {len(predictions)}")
    size = len(class_names)
    counts = np.zeros((size, size), dtype=np.int64)
    opportunities = np.zeros((size, size), dtype=np.int64)
    for number, (episode, predicted) in enumerate(zip(episodes, predictions)):
        predicted = np.asarray(predicted, dtype=np.int64)
        if predicted.shape != episode.query_labels.shape:
            raise ValueError(f"task {number} has {len(episode.query)} queries but {predicted.size} predictions")
        if predicted.size and (predicted.min() < 0 or predicted.max() >= episode.way):
            raise ValueError(f"task {number} is {episode.way}-way but a prediction is {predicted.max()}")
        if episode.classes.max() >= size:
            raise ValueError(f"task {number} names class {episode.classes.max()} of a split with {size} classes")
        true_classes = episode.classes[episode.query_labels]
        np.add.at(counts, (true_classes, episode.classes[predicted]), 1)
        offered = np.zeros(size, dtype=np.int64)
        offered[episode.classes] = 1
        queries_per_class = np.bincount(true_classes, minlength=size)
        opportunities += np.outer(queries_per_class, offered)
    seen = np.flatnonzero(opportunities.diagonal() > 0)
    return Confusion(
        classes=[str(class_names[index]) for index in seen],
        counts=counts[np.ix_(seen, seen)],
        opportunities=opportunities[np.ix_(seen, seen)],
        tasks=len(episodes),
    )
