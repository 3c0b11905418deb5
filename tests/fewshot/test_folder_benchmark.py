"""The real-image benchmark's Ray-free logic (metallo_core/fewshot/folder_benchmark.py): its pools are the
quickstart's (the ingester's seeded per-class cut of the same files), and PN and PN+FT are paired over the
same tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from metallo_core.data.ingest.imagefolder import assign_row_splits
from metallo_core.errors import DataError
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
from metallo_core.fewshot.folder_benchmark import (
    LabelledFolder,
    draw_tasks,
    folder_cache,
    pretrained_protonet,
    score_task_set,
    split_pools,
)
from metallo_core.fewshot.metrics import paired_gain
from metallo_core.fewshot.protonet import ImageNormalizer


def toy_folder(counts: list[int]) -> LabelledFolder:
    classes = ["b_class", "a_class", "c_class"][:len(counts)]  # not in sorted order: the cut must not care
    labels = np.repeat(np.arange(len(counts)), counts)
    paths = [f"{classes[label]}/{index:03d}.png" for index, label in enumerate(labels)]
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    return LabelledFolder(images, labels, classes, "toy", paths)


def test_pools_are_the_ingesters_cut_disjoint_seeded_and_cover_every_image():
    folder = toy_folder([10, 20, 7])
    pools = split_pools(folder, (0.2, 0.2, 0.6), seed=0)
    assert list(pools) == ["train", "val", "test"]
    rows = np.concatenate([rows for pool in pools.values() for rows in pool])
    assert sorted(rows) == list(range(len(folder.labels)))  # every image once: disjoint and complete
    by_class = {name: sorted(p for p, label in zip(folder.paths, folder.labels) if folder.classes[label] == name)
                for name in sorted(folder.classes)}
    assignment = assign_row_splits(by_class, (0.2, 0.2, 0.6), 0)  # what `data ingest --split-rows` writes
    for pool, per_class in pools.items():
        for label, class_rows in enumerate(per_class):
            assert all(folder.labels[row] == label and assignment[folder.paths[row]] == pool for row in class_rows)
    again = split_pools(folder, (0.2, 0.2, 0.6), seed=0)
    assert all(np.array_equal(a, b) for pool in pools for a, b in zip(pools[pool], again[pool]))
    other = split_pools(folder, (0.2, 0.2, 0.6), seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(pools["test"], other["test"]))
    with pytest.raises(DataError, match="pools are assigned by file"):
        split_pools(LabelledFolder(folder.images, folder.labels, folder.classes, "toy"), (0.5, 0.5), 0)


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None)
    network.fc = nn.Identity()
    return network.eval()


def test_score_task_set_pairs_ft_with_pn_over_the_same_tasks():
    model = pretrained_protonet(small_resnet())
    images = np.random.default_rng(0).integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
    folder = LabelledFolder(images, np.repeat(np.arange(3), 10), ["a", "b", "c"], "toy")
    pools = [np.flatnonzero(folder.labels == c) for c in range(3)]
    episodes = draw_tasks(pools, 3, 1, 2, 4, seed=0)
    normalizer = ImageNormalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    noop = FinetuneEngine(model, FinetuneSettings(steps=0), normalizer)
    cache = folder_cache(folder, noop)
    result, scores = score_task_set(noop, cache, episodes, ["pn", "ft"], seed=0)
    assert scores["ft"].accuracies == scores["pn"].accuracies  # no step: fine-tuning is plain ProtoNet
    assert result.gains["ft - pn"] == {"mean": 0.0, "ci95": 0.0}
    assert result.tasks == 4 and result.shot == 1 and result.way == 3
    adapted = noop.with_settings(steps=2, lr=1e-2)
    result, scores = score_task_set(adapted, cache, episodes, ["pn", "ft"], seed=0)
    expected = paired_gain(scores["pn"].accuracies, scores["ft"].accuracies)
    assert (result.gains["ft - pn"]["mean"], result.gains["ft - pn"]["ci95"]) == pytest.approx(expected)
