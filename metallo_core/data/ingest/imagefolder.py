"""Ingest a `root/<class>/<image>` tree (the layout of small metallography sets such as MEM-25).

Without a split option every image goes to one row split, `train`. `split_classes=(15, 5, 5)` makes a
seeded class-disjoint train/val/test split (few-shot); `split_rows=(0.8, 0.2)` a seeded per-class
(stratified) row split.
"""

from __future__ import annotations

import posixpath

import numpy as np

from metallo_core.data.ingest.common import (
    IngestOptions,
    SkipLog,
    check_suffix,
    handle_bad_image,
    prepare_image,
    split_names,
)
from metallo_core.data.manifest import Manifest
from metallo_core.data.shards import DatasetWriter
from metallo_core.errors import DataError, StorageError
from metallo_core.storage import Location, locate


def scan_class_folders(root: Location) -> dict[str, list[str]]:
    """Class name -> sorted image paths (relative to root); hidden files are ignored."""
    if not root.exists():
        raise DataError(f"--src {root.uri} does not exist")
    files = [f for f in root.list_files() if not any(part.startswith(".") for part in f.split("/"))]
    by_class: dict[str, list[str]] = {}
    for relative in files:
        if "/" not in relative:
            raise DataError(
                f"{root.join(relative).uri} lies directly under --src; imagefolder expects <src>/<class>/<image>"
            )
        by_class.setdefault(relative.split("/", 1)[0], []).append(relative)
    # A class folder with no file at all is invisible to a file listing; find it among the directories.
    if not root.is_s3:
        import os

        for entry in sorted(os.listdir(root.path)):
            if not entry.startswith(".") and os.path.isdir(os.path.join(root.path, entry)):
                by_class.setdefault(entry, [])
    empty = sorted(name for name, paths in by_class.items() if not paths)
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(repr(posixpath.join(root.uri, e)) for e in empty)} hold no image; "
            "add images or remove the folder"
        )
    if not by_class:
        raise DataError(f"--src {root.uri} holds no class folder; expected <src>/<class>/<image>")
    return {name: sorted(by_class[name]) for name in sorted(by_class)}


def assign_class_splits(class_names: list[str], sizes: tuple[int, ...], seed: int) -> dict[str, list[str]]:
    if sum(sizes) != len(class_names):
        raise DataError(
            f"--split-classes {','.join(map(str, sizes))} adds up to {sum(sizes)} classes but the source has "
            f"{len(class_names)}; make the sizes add up to {len(class_names)}"
        )
    order = np.random.default_rng(seed).permutation(len(class_names))
    splits, start = {}, 0
    for split, size in zip(split_names(len(sizes)), sizes):
        splits[split] = sorted(class_names[i] for i in order[start:start + size])
        start += size
    return splits


def assign_row_splits(
    images_by_class: dict[str, list[str]], fractions: tuple[float, ...], seed: int
) -> dict[str, str]:
    """image path -> split, stratified per class so every class appears in every split."""
    names = split_names(len(fractions))
    bounds = np.cumsum(fractions) / sum(fractions)
    assignment = {}
    for class_index, (class_name, paths) in enumerate(images_by_class.items()):
        count = len(paths)
        edges = [0] + [int(round(b * count)) for b in bounds]
        sizes = np.diff(edges)
        if (sizes == 0).any():
            empty = names[int(np.argmin(sizes))]
            raise DataError(
                f"class {class_name!r} has {count} image(s), too few for --split-rows "
                f"{','.join(map(str, fractions))}: split {empty!r} would get none. Add images or drop a split"
            )
        order = np.random.default_rng([seed, class_index]).permutation(count)
        for split, lo, hi in zip(names, edges[:-1], edges[1:]):
            for i in order[lo:hi]:
                assignment[paths[i]] = split
    return assignment


def ingest_imagefolder(
    src: str,
    out: str,
    options: IngestOptions,
    *,
    split_classes: tuple[int, ...] | None = None,
    split_rows: tuple[float, ...] | None = None,
) -> Manifest:
    if split_classes and split_rows:
        raise DataError("--split-classes and --split-rows exclude each other; pick one")
    root = locate(src)
    images_by_class = scan_class_folders(root)
    class_names = list(images_by_class)
    if split_classes:
        classes_of_split = assign_class_splits(class_names, split_classes, options.seed)
        split_of_class = {c: split for split, members in classes_of_split.items() for c in members}
        split_of_image = {p: split_of_class[c] for c, paths in images_by_class.items() for p in paths}
    elif split_rows:
        classes_of_split = None
        split_of_image = assign_row_splits(images_by_class, split_rows, options.seed)
    else:
        classes_of_split = None
        split_of_image = {p: "train" for paths in images_by_class.values() for p in paths}

    skipped = SkipLog()
    writer = DatasetWriter(
        out,
        options.name or posixpath.basename(root.uri.rstrip("/")),
        class_names,
        split_kind="classes" if split_classes else "rows",
        split_classes=classes_of_split,
        overwrite=options.overwrite,
        source={
            "ingester": "imagefolder",
            "src": root.uri,
            "split_classes": list(split_classes) if split_classes else None,
            "split_rows": list(split_rows) if split_rows else None,
            "size": options.size,
            "seed": options.seed,
        },
    )
    with writer:
        for class_name, paths in images_by_class.items():
            for relative in paths:
                try:
                    check_suffix(relative)
                    data = root.join(relative).read_bytes()
                    image = prepare_image(data, relative, options.size)
                except (DataError, StorageError) as exc:
                    error = exc if isinstance(exc, DataError) else DataError(str(exc))
                    handle_bad_image(error, relative, options, skipped)
                    continue
                writer.write(
                    split_of_image[relative],
                    image=image.data,
                    class_name=class_name,
                    source=relative,
                    height=image.info.height,
                    width=image.info.width,
                    encoding=image.info.encoding,
                )
        writer.skipped = skipped.entries
    return writer.manifest
