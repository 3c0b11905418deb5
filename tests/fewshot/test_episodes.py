"""Episode sampler and fixed episode lists: shapes, disjointness, seeding per (seed, rank, epoch),
too-small classes, capped queries, and JSON round trips checked against the dataset they came from."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from metallo_core.errors import ConfigError, DataError
from metallo_core.fewshot.episodes import (
    Episode,
    EpisodeSampler,
    episode_meta,
    episodes_from_json,
    episodes_to_json,
    fixed_episodes,
)


def split_of(class_sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """indices_by_class of a shuffled split whose classes have the given sizes."""
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    np.random.default_rng(seed).shuffle(labels)
    return [np.flatnonzero(labels == c) for c in range(len(class_sizes))]


def class_of_rows(indices_by_class: list[np.ndarray]) -> dict[int, int]:
    return {int(row): c for c, rows in enumerate(indices_by_class) for row in rows}


def test_episode_counts_disjointness_and_classes():
    split = split_of([20] * 8)
    owner = class_of_rows(split)
    for episode in EpisodeSampler(split, way=5, shot=3, query=4, seed=1).episodes(20):
        assert episode.classes.shape == (5,) and len(set(episode.classes.tolist())) == 5
        assert episode.support.shape == (15,) and episode.query.shape == (20,)
        assert not set(episode.support.tolist()) & set(episode.query.tolist())
        assert len(set(episode.support.tolist())) == 15 and len(set(episode.query.tolist())) == 20
        # Class-major: the k-th block of rows belongs to classes[k], matching the episode-local labels.
        assert [owner[r] for r in episode.support] == episode.classes[episode.support_labels].tolist()
        assert [owner[r] for r in episode.query] == episode.classes[episode.query_labels].tolist()
        assert episode.support_labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
        assert (episode.way, episode.shot, episode.query_n) == (5, 3, 4)


def test_seeded_per_seed_rank_and_epoch():
    split = split_of([12] * 10)

    def draw(**kw):
        return EpisodeSampler(split, 5, 1, 5, **kw).episodes(3)

    assert draw(seed=3, rank=1, epoch=2) == draw(seed=3, rank=1, epoch=2)
    assert draw(seed=3, rank=1, epoch=2) != draw(seed=3, rank=0, epoch=2)
    assert draw(seed=3, rank=1, epoch=2) != draw(seed=3, rank=1, epoch=3)
    assert draw(seed=3, rank=1, epoch=2) != draw(seed=4, rank=1, epoch=2)


def test_too_small_classes_are_named_with_their_sizes():
    split = split_of([20, 7, 20, 9, 20])
    with pytest.raises(DataError) as caught:
        EpisodeSampler(split, 5, 5, 5, seed=0)
    message = str(caught.value)
    assert "class 1 has 7" in message and "class 3 has 9" in message and "need 10" in message
    assert "cap_query: true" in message and "class 0" not in message


def test_too_small_classes_are_named_by_name_when_given():
    with pytest.raises(DataError, match="class 1 \\('bainite'\\) has 7"):
        EpisodeSampler(split_of([20, 7, 20]), 3, 5, 5, seed=0, class_names=["ferrite", "bainite", "pearlite"])


def test_too_few_classes_for_the_way():
    with pytest.raises(DataError, match="5-way episodes need at least 5 classes, but the split has 3"):
        EpisodeSampler(split_of([10, 10, 10]), 5, 1, 1, seed=0)


def test_bad_episode_shape_is_a_config_error():
    with pytest.raises(ConfigError, match="shot >= 1"):
        EpisodeSampler(split_of([10] * 5), 5, 0, 3, seed=0)


def test_cap_query_caps_at_the_smallest_drawn_class():
    # MEM-25-like: 5 test classes, one with only 8 images; 1 shot + 15 queries cannot be met.
    sizes = [13, 8, 14, 13, 20]
    split = split_of(sizes)
    episodes = EpisodeSampler(split, 5, 1, 15, seed=0, cap_query=True).episodes(4)
    for episode in episodes:  # every class is drawn in every 5-way task, so the cap is 8 - 1
        assert episode.query_n == 7 and len(episode.query) == 35
    # With more classes than the way, the cap depends on which classes were drawn.
    wide = split_of([13, 8, 14, 13, 20, 30, 30])
    episodes = EpisodeSampler(wide, 3, 1, 15, seed=0, cap_query=True).episodes(40)
    for episode in episodes:
        assert episode.query_n == min(15, min(len(wide[c]) for c in episode.classes) - 1)
    assert {7, 15} <= {e.query_n for e in episodes}


def test_cap_query_still_needs_one_query_per_class():
    with pytest.raises(DataError, match="class 2 has 2.*shot \\+ 1 = 3"):
        EpisodeSampler(split_of([10, 10, 2, 10, 10]), 5, 2, 15, seed=0, cap_query=True)


def test_fixed_episodes_json_round_trip():
    split = split_of([15] * 7)
    episodes = fixed_episodes(split, 5, 2, 3, count=6, seed=11)
    assert episodes == fixed_episodes(split, 5, 2, 3, count=6, seed=11)
    text = episodes_to_json(episodes, episode_meta(split, seed=11, split="val"))
    loaded, meta = episodes_from_json(text, split)
    assert loaded == episodes
    assert loaded[0].support.dtype == np.int64 and not loaded[0].support.flags.writeable
    assert {k: meta[k] for k in ("way", "shot", "query", "count", "seed", "split")} == {
        "way": 5, "shot": 2, "query": 3, "count": 6, "seed": 11, "split": "val"}
    assert meta["class_sizes"] == [15] * 7


def test_loading_against_other_class_sizes_fails_clearly():
    split = split_of([15] * 7)
    text = episodes_to_json(fixed_episodes(split, 5, 2, 3, count=4, seed=0), episode_meta(split, seed=0))
    with pytest.raises(DataError, match="class sizes .* but this split has"):
        episodes_from_json(text, split_of([15] * 6 + [14]), source="val.json")


def test_loading_against_same_sizes_other_rows_fails_clearly():
    split = split_of([15] * 7, seed=0)
    text = episodes_to_json(fixed_episodes(split, 5, 2, 3, count=4, seed=0), episode_meta(split, seed=0))
    with pytest.raises(DataError, match="same class sizes but other rows"):
        episodes_from_json(text, split_of([15] * 7, seed=1))


def test_without_meta_rows_are_still_checked_against_their_classes():
    split = split_of([15] * 7, seed=0)
    text = episodes_to_json(fixed_episodes(split, 5, 2, 3, count=4, seed=0), {})
    assert episodes_from_json(text, split)[0]
    with pytest.raises(DataError, match="rows outside their class"):
        episodes_from_json(text, split_of([15] * 7, seed=1))


def test_damaged_or_foreign_json_is_a_data_error():
    with pytest.raises(DataError, match="not valid JSON"):
        episodes_from_json("{", source="val.json")
    with pytest.raises(DataError, match="not a metallo-episodes/1 file"):
        episodes_from_json('{"episodes": []}')


def test_episode_is_frozen_and_checks_its_shape():
    episode = Episode(classes=[3, 1], support=[0, 1], query=[2, 3, 4, 5])
    with pytest.raises(FrozenInstanceError):
        episode.classes = np.array([0, 1])
    with pytest.raises(ValueError):
        episode.support[0] = 9
    with pytest.raises(ValueError, match="same number"):
        Episode(classes=[0, 1], support=[0, 1, 2], query=[3, 4])
