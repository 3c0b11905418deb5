"""Random-access images of one split, indexed by class: what few-shot episodes and small-set jobs read.

The whole split is read once (each shard checked against its manifest checksum), decoded to a fixed
square size in parallel threads, and kept in memory as one uint8 array.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from metallo_core.data.images import decode_resized
from metallo_core.data.manifest import Manifest, read_manifest
from metallo_core.data.shards import read_split_table
from metallo_core.errors import DataError
from metallo_core.storage import locate


@dataclass
class ClassIndexedImages:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64, 0..C-1 in the order of `class_names`
    class_names: list[str]
    sources: list[str]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    dataset_labels: np.ndarray | None = None  # (N,) the dataset-wide label ids

    def __post_init__(self) -> None:
        order = np.argsort(self.labels, kind="stable")
        boundaries = np.searchsorted(self.labels[order], np.arange(len(self.class_names) + 1))
        self._indices = [order[boundaries[c]:boundaries[c + 1]] for c in range(len(self.class_names))]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices_of(self, class_id: int) -> np.ndarray:
        return self._indices[class_id]

    @property
    def indices_by_class(self) -> list[np.ndarray]:
        return list(self._indices)

    def class_sizes(self) -> np.ndarray:
        return np.array([len(indices) for indices in self._indices])

    @classmethod
    def load(
        cls,
        uri: str,
        split: str,
        *,
        image_size: int,
        verify: bool = True,
        extra_columns: tuple[str, ...] | None = None,
        manifest: Manifest | None = None,
        max_images: int | None = None,
    ) -> ClassIndexedImages:
        root = locate(uri)
        manifest = manifest or read_manifest(root)
        split_info = manifest.split(split)
        extras = list(manifest.extra_columns) if extra_columns is None else list(extra_columns)
        unknown = [name for name in extras if name not in manifest.extra_columns]
        if unknown:
            raise DataError(
                f"dataset {manifest.name!r} has no label column(s) {unknown}; it has: {list(manifest.extra_columns)}"
            )
        table = read_split_table(
            root, split, ["image", "label", "class_name", "source", *extras], manifest=manifest, verify=verify
        )
        if max_images is not None:
            table = table.slice(0, max_images)
        class_names = list(split_info.classes) if manifest.split_kind == "classes" else [
            name for name in manifest.class_names if name in split_info.counts
        ]
        local_id = {name: index for index, name in enumerate(class_names)}
        row_classes = table.column("class_name").to_pylist()
        sources = table.column("source").to_pylist()
        images = decode_all(table.column("image").to_pylist(), sources, image_size)
        return cls(
            images=images,
            labels=np.array([local_id[name] for name in row_classes], dtype=np.int64),
            class_names=class_names,
            sources=sources,
            extras={name: table.column(name).to_numpy() for name in extras},
            dataset_labels=table.column("label").to_numpy().astype(np.int64),
        )


def load_split_labels(uri: str, split: str, manifest: Manifest | None = None) -> tuple[np.ndarray, list[str]]:
    """(per-row class ids, class names) of a split in the row order `ClassIndexedImages.load` uses,
    without reading or decoding images: lets a driver plan episodes before workers load the data."""
    root = locate(uri)
    manifest = manifest or read_manifest(root)
    split_info = manifest.split(split)
    class_names = list(split_info.classes) if manifest.split_kind == "classes" else [
        name for name in manifest.class_names if name in split_info.counts
    ]
    local_id = {name: index for index, name in enumerate(class_names)}
    table = read_split_table(root, split, ["class_name"], manifest=manifest, verify=False)
    return np.array([local_id[name] for name in table.column("class_name").to_pylist()], dtype=np.int64), class_names


def indices_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.flatnonzero(labels == class_id) for class_id in range(num_classes)]


def decode_all(encoded: list[bytes], sources: list[str], size: int, workers: int | None = None) -> np.ndarray:
    """Decode many images in threads (Pillow releases the GIL while decoding) into one array."""
    output = np.empty((len(encoded), size, size, 3), dtype=np.uint8)

    def decode_into(index: int) -> None:
        output[index] = decode_resized(encoded[index], size, sources[index])

    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1:
        for index in range(len(encoded)):
            decode_into(index)
        return output
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(decode_into, range(len(encoded))))
    return output
