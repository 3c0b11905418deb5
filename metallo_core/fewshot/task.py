"""One few-shot task as the maths passes it around: the labelled support set and the queries, in whichever
form a step works on (unit images, cached trunk maps or features), so the group travels as one value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metallo_core.fewshot.episodes import Episode


@dataclass(frozen=True)
class SupportSet:
    """A task's labelled examples: (S, ...) rows (float (S, 3, H, W) images, (S, C, h, w) trunk maps or
    (S, D) features) and their (S,) int64 labels in 0..way-1. Adapting to a task needs only this.

    ValueError when the labels do not give one per example or way is below 1 (shapes only: the labels'
    values are not read, which would wait for the device)."""

    examples: Tensor
    labels: Tensor
    way: int

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.examples),):
            raise ValueError(f"a support set needs one label per example: {len(self.examples)} examples, "
                             f"labels shaped {tuple(self.labels.shape)}")
        if self.way < 1:
            raise ValueError(f"a support set needs at least one class, got way {self.way}")

    def mapped(self, transform: Callable[[Tensor], Tensor]) -> SupportSet:
        """The same labels with the examples transformed (images -> features, a power transform, ...)."""
        return SupportSet(transform(self.examples), self.labels, self.way)

    def subset(self, rows: Tensor) -> SupportSet:
        """The examples and labels at `rows` (an index tensor), in that order."""
        return SupportSet(self.examples[rows], self.labels[rows], self.way)


@dataclass(frozen=True)
class FewShotTask:
    """A support set and the (Q, ...) queries to classify against it, in the support's form."""

    support: SupportSet
    query: Tensor

    def mapped(self, transform: Callable[[Tensor], Tensor]) -> FewShotTask:
        """The same task with support examples and queries transformed alike, each on its own."""
        return FewShotTask(self.support.mapped(transform), transform(self.query))


def episode_task(episode: Episode, source: Tensor | Callable[[np.ndarray], Tensor]) -> FewShotTask:
    """The task an episode indexes: its support and query rows of `source`, a tensor over every image the
    episodes index (indexed on its own device) or a function from row indices to such rows (e.g.
    `evaluation.PreparedImages.rows`); the episode-local labels on the support's device."""
    def rows(indices: np.ndarray) -> Tensor:
        if isinstance(source, Tensor):
            return source[torch.tensor(indices, device=source.device)]
        return source(indices)

    support = rows(episode.support)
    labels = torch.tensor(episode.support_labels, device=support.device)
    return FewShotTask(SupportSet(support, labels, episode.way), rows(episode.query))
