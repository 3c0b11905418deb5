"""N-way K-shot episodes as row indices into a class-indexed reader: a seeded, rank-aware sampler and
fixed episode lists serialised to JSON, so every run is scored on the same tasks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metallo_core.errors import ConfigError, DataError

EPISODES_FORMAT = "metallo-episodes/1"


@dataclass(frozen=True, eq=False)
class Episode:
    """One task. `support` and `query` are class-major: all rows of classes[0] first, then classes[1], ..."""

    classes: np.ndarray  # (way,) dataset-local class ids
    support: np.ndarray  # (way * shot,) row indices
    query: np.ndarray  # (way * query_n,) row indices

    def __post_init__(self) -> None:
        for name in ("classes", "support", "query"):
            values = np.array(getattr(self, name), dtype=np.int64)  # a private, read-only copy: truly frozen
            values.setflags(write=False)
            object.__setattr__(self, name, values)
        way = len(self.classes)
        if way == 0 or len(self.support) % way or len(self.query) % way:
            raise ValueError(
                f"an episode needs the same number of support and of query rows per class: {way} classes, "
                f"{len(self.support)} support rows, {len(self.query)} query rows"
            )

    @property
    def way(self) -> int:
        return len(self.classes)

    @property
    def shot(self) -> int:
        return len(self.support) // self.way

    @property
    def query_n(self) -> int:
        return len(self.query) // self.way

    @property
    def support_labels(self) -> np.ndarray:
        """(way * shot,) episode-local labels 0..way-1."""
        return np.repeat(np.arange(self.way, dtype=np.int64), self.shot)

    @property
    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.way, dtype=np.int64), self.query_n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        fields = ("classes", "support", "query")
        return all(np.array_equal(getattr(self, name), getattr(other, name)) for name in fields)

    __hash__ = None  # type: ignore[assignment]  # arrays inside: equal episodes need not hash alike


class EpisodeSampler:
    """Draws episodes from `indices_by_class` (position = class id), seeded per (seed, rank, epoch) so each
    Ray worker draws its own reproducible stream and resuming an epoch redraws the same tasks."""

    def __init__(
        self,
        indices_by_class: Sequence[np.ndarray],
        way: int,
        shot: int,
        query: int,
        *,
        seed: int,
        rank: int = 0,
        epoch: int = 0,
        cap_query: bool = False,
        class_names: Sequence[str] | None = None,  # only to name classes in errors
    ) -> None:
        check_episode_shape(way, shot, query)
        self.indices_by_class = [np.asarray(indices, dtype=np.int64) for indices in indices_by_class]
        self.way, self.shot, self.query, self.cap_query = way, shot, query, cap_query
        self.class_sizes = np.array([len(indices) for indices in self.indices_by_class], dtype=np.int64)
        check_classes_fit(self.class_sizes, way, shot, query, cap_query, class_names)
        self.rng = np.random.default_rng([seed, rank, epoch])

    def sample(self) -> Episode:
        classes = self.rng.choice(len(self.indices_by_class), size=self.way, replace=False)
        query_n = self.query_count(classes)
        support, query = [], []
        for class_id in classes:
            rows = self.rng.choice(self.indices_by_class[class_id], size=self.shot + query_n, replace=False)
            support.append(rows[:self.shot])
            query.append(rows[self.shot:])
        return Episode(classes=classes, support=np.concatenate(support), query=np.concatenate(query))

    def episodes(self, count: int) -> list[Episode]:
        return [self.sample() for _ in range(count)]

    def query_count(self, classes: np.ndarray) -> int:
        """`query`, or with cap_query the most the smallest drawn class can give after its shots."""
        if not self.cap_query:
            return self.query
        return min(self.query, int(self.class_sizes[classes].min()) - self.shot)


def check_episode_shape(way: int, shot: int, query: int) -> None:
    if way < 2:
        raise ConfigError(f"episodes need way >= 2 classes, got way={way}")
    if shot < 1 or query < 1:
        raise ConfigError(f"episodes need shot >= 1 and query >= 1, got shot={shot}, query={query}")


def check_classes_fit(
    class_sizes: np.ndarray, way: int, shot: int, query: int, cap_query: bool,
    class_names: Sequence[str] | None = None,
) -> None:
    """DataError naming every class too small to supply an episode (any class may be drawn)."""
    if len(class_sizes) < way:
        raise DataError(f"{way}-way episodes need at least {way} classes, but the split has {len(class_sizes)}; "
                        "lower way")
    needed = shot + 1 if cap_query else shot + query
    small = np.flatnonzero(class_sizes < needed)
    if not len(small):
        return
    named = (lambda c: f"class {c} ({class_names[c]!r})") if class_names is not None else (lambda c: f"class {c}")
    listing = ", ".join(f"{named(c)} has {class_sizes[c]}" for c in small)
    if cap_query:
        raise DataError(
            f"{listing}; even with cap_query every class needs shot + 1 = {needed} images "
            f"(at least one query after {shot} shots): lower shot or drop these classes"
        )
    raise DataError(
        f"{shot}-shot {query}-query episodes need {needed} images per class, but {listing}; lower query or shot, "
        f"or set `cap_query: true` to cap the query count at the smallest drawn class size minus shot"
    )


# ------------------------------------------------------------------------------------------- fixed lists


def fixed_episodes(
    indices_by_class: Sequence[np.ndarray],
    way: int,
    shot: int,
    query: int,
    count: int,
    seed: int,
    cap_query: bool = False,
    class_names: Sequence[str] | None = None,
) -> list[Episode]:
    """`count` episodes drawn once from `seed`: the meta-validation or meta-test task list."""
    if count < 1:
        raise ConfigError(f"a fixed episode list needs count >= 1, got {count}")
    sampler = EpisodeSampler(indices_by_class, way, shot, query, seed=seed, cap_query=cap_query,
                             class_names=class_names)
    return sampler.episodes(count)


def episode_meta(
    indices_by_class: Sequence[np.ndarray], *, seed: int, cap_query: bool = False, **extra: Any
) -> dict[str, Any]:
    """Meta for `episodes_to_json` that ties a list to its dataset: how it was drawn, the class sizes and
    a membership fingerprint, which `episodes_from_json(..., indices_by_class)` then checks."""
    return {
        "seed": seed,
        "cap_query": cap_query,
        "class_sizes": [len(indices) for indices in indices_by_class],
        "membership_fingerprint": membership_fingerprint(indices_by_class),
        **extra,
    }


def membership_fingerprint(indices_by_class: Sequence[np.ndarray]) -> str:
    """Hash of which rows belong to which class. Stronger than the class sizes alone: a re-ingested
    dataset with the same sizes but rows in another order would silently turn stored indices into
    other images, possibly of other classes."""
    digest = hashlib.sha256()
    for indices in indices_by_class:
        digest.update(np.sort(np.asarray(indices, dtype=np.int64)).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def episodes_to_json(episodes: Sequence[Episode], meta: dict[str, Any]) -> str:
    """JSON text of the episodes and `meta` (e.g. `episode_meta(...)` plus split and dataset names).
    way, shot, query (the largest query count) and count are read off the episodes unless `meta` gives them."""
    derived = {
        "way": max((e.way for e in episodes), default=0),
        "shot": max((e.shot for e in episodes), default=0),
        "query": max((e.query_n for e in episodes), default=0),
        "count": len(episodes),
    }
    payload = {
        "format": EPISODES_FORMAT,
        "meta": derived | dict(meta),
        "episodes": [
            {"classes": e.classes.tolist(), "support": e.support.tolist(), "query": e.query.tolist()} for e in episodes
        ],
    }
    return json.dumps(payload, separators=(",", ":"))


def episodes_from_json(
    text: str, indices_by_class: Sequence[np.ndarray] | None = None, source: str = "episode list"
) -> tuple[list[Episode], dict[str, Any]]:
    """Episodes and their meta. With `indices_by_class`, first check they were drawn from this split:
    class sizes and fingerprint when the meta has them, and in any case that every row is in range and
    belongs to the class its episode files it under."""
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != EPISODES_FORMAT:
        raise DataError(f"{source} is not a {EPISODES_FORMAT} file")
    try:
        meta = payload["meta"]
        episodes = [Episode(item["classes"], item["support"], item["query"]) for item in payload["episodes"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{source} is a damaged {EPISODES_FORMAT} file: {exc!r}") from exc
    if indices_by_class is not None:
        check_drawn_from(meta, episodes, indices_by_class, source)
    return episodes, meta


def check_drawn_from(
    meta: dict[str, Any], episodes: Sequence[Episode], indices_by_class: Sequence[np.ndarray], source: str
) -> None:
    regenerate = "it belongs to another dataset or split; regenerate it with fixed_episodes for this one"
    sizes = [len(indices) for indices in indices_by_class]
    if "class_sizes" in meta and list(meta["class_sizes"]) != sizes:
        raise DataError(f"{source} was drawn from a split with class sizes {meta['class_sizes']}, "
                        f"but this split has {sizes}: {regenerate}")
    if "membership_fingerprint" in meta and meta["membership_fingerprint"] != membership_fingerprint(indices_by_class):
        raise DataError(f"{source} was drawn from a split with the same class sizes but other rows in each class "
                        f"(re-ingested or reordered?): {regenerate}")
    class_of_row = np.append(row_classes(indices_by_class), -1)  # the last slot answers rows out of range
    out_of_range = len(class_of_row) - 1
    for number, episode in enumerate(episodes):
        if episode.classes.max() >= len(indices_by_class):
            raise DataError(f"{source}: episode {number} names class {episode.classes.max()}, "
                            f"but this split has {len(indices_by_class)} classes: {regenerate}")
        for rows, per_class in ((episode.support, episode.shot), (episode.query, episode.query_n)):
            expected = np.repeat(episode.classes, per_class)
            found = class_of_row[np.where((rows >= 0) & (rows < out_of_range), rows, out_of_range)]
            if not np.array_equal(found, expected):
                raise DataError(f"{source}: episode {number} has rows outside their class in this split: {regenerate}")


def row_classes(indices_by_class: Sequence[np.ndarray]) -> np.ndarray:
    """(rows,) class id of every row named in `indices_by_class`, -1 for rows in none."""
    size = max((int(np.max(indices)) + 1 for indices in indices_by_class if len(indices)), default=0)
    class_of_row = np.full(size, -1, dtype=np.int64)
    for class_id, indices in enumerate(indices_by_class):
        class_of_row[np.asarray(indices, dtype=np.int64)] = class_id
    return class_of_row
