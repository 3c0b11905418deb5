"""The few-shot task value (fewshot/task.py): an episode's rows and labels, transforms that keep the labels,
the support-only split autolr scores on, and malformed support sets refused with the counts named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metallo_core.errors import ConfigError
from metallo_core.fewshot.episodes import Episode
from metallo_core.fewshot.finetune import split_support_for_autolr
from metallo_core.fewshot.task import FewShotTask, SupportSet, episode_task


def numbered_rows(count: int) -> torch.Tensor:
    """(count, 2) rows whose first column is the row's index: which rows a task took can be read back."""
    return torch.stack([torch.arange(count), torch.arange(count) * 10], dim=1).float()


EPISODE = Episode(classes=np.array([4, 1]), support=np.array([7, 3, 0, 5]), query=np.array([2, 6, 1, 8]))


def test_an_episode_task_takes_its_rows_in_order_with_episode_local_labels():
    task = episode_task(EPISODE, numbered_rows(10))
    assert task.support.examples[:, 0].tolist() == [7, 3, 0, 5]
    assert task.query[:, 0].tolist() == [2, 6, 1, 8]
    assert task.support.labels.tolist() == [0, 0, 1, 1] and task.support.labels.dtype == torch.int64
    assert task.support.way == 2


def test_an_episode_task_from_a_row_function_is_the_one_from_the_tensor():
    rows = numbered_rows(10)
    taken: list[list[int]] = []

    def take(indices: np.ndarray) -> torch.Tensor:
        taken.append(indices.tolist())
        return rows[torch.tensor(indices)]

    by_function, by_tensor = episode_task(EPISODE, take), episode_task(EPISODE, rows)
    assert taken == [[7, 3, 0, 5], [2, 6, 1, 8]]
    assert torch.equal(by_function.support.examples, by_tensor.support.examples)
    assert torch.equal(by_function.query, by_tensor.query)
    assert torch.equal(by_function.support.labels, by_tensor.support.labels)


def test_mapped_transforms_support_and_query_and_keeps_labels_and_way():
    task = episode_task(EPISODE, numbered_rows(10))
    doubled = task.mapped(lambda rows: rows * 2)
    assert torch.equal(doubled.support.examples, task.support.examples * 2)
    assert torch.equal(doubled.query, task.query * 2)
    assert doubled.support.labels is task.support.labels and doubled.support.way == 2


def test_a_support_set_needs_one_label_per_example_and_a_class():
    with pytest.raises(ValueError, match="one label per example: 4 examples, labels shaped \\(3,\\)"):
        SupportSet(torch.zeros(4, 2), torch.tensor([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="one label per example"):
        SupportSet(torch.zeros(2, 2), torch.tensor([[0], [1]]), 2)
    with pytest.raises(ValueError, match="at least one class, got way 0"):
        SupportSet(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), 0)


def test_a_task_is_frozen():
    task = episode_task(EPISODE, numbered_rows(10))
    with pytest.raises(AttributeError):
        task.query = task.query[:1]  # type: ignore[misc]


def test_autolr_splits_the_support_into_first_shots_and_labelled_held_out_shots():
    support = SupportSet(numbered_rows(6), torch.tensor([0, 1, 0, 1, 0, 1]), 2)
    held_out, held_out_labels = split_support_for_autolr(support)
    assert isinstance(held_out, FewShotTask)
    assert held_out.support.examples[:, 0].tolist() == [0, 1] and held_out.support.labels.tolist() == [0, 1]
    assert held_out.query[:, 0].tolist() == [2, 4, 3, 5] and held_out_labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="class 1 of this task has 1"):
        split_support_for_autolr(SupportSet(numbered_rows(3), torch.tensor([0, 0, 1]), 2))
