"""Ingest a `root/<class>/<image>` tree (the layout of small metallography sets such as MEM-25).

Without a split option every image goes to one row split, `train`. `split_classes=(15, 5, 5)` makes a
seeded class-disjoint train/val/test split (few-shot); `split_rows=(0.8, 0.2)` a seeded per-class
(stratified) row split.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass

import numpy as np

from metallo_core.data.ingest.common import (
    IngestOptions,
    SkipLog,
    check_suffix,
    handle_bad_image,
    microscope_settings,
    prepare_image,
    split_names,
)
from metallo_core.data.listing import FolderListing, filter_keys, list_folder
from metallo_core.data.manifest import Manifest
from metallo_core.data.shards import DatasetWriter
from metallo_core.errors import DataError, StorageError
from metallo_core.storage import Location, locate

UNLABELLED_CLASS = "unlabelled"
MAX_NOTES_KEPT = 200  # decode notes kept in the manifest (all are counted)


@dataclass
class FolderScan:
    """Class name -> sorted image paths (relative to the root), and the listing they came from."""

    images_by_class: dict[str, list[str]]
    listing: FolderListing
    unlabelled: bool


def list_source(root: Location) -> FolderListing:
    """The listing policy of `metallo_core.data.listing`, on a local folder or an s3:// prefix."""
    if not root.exists():
        raise DataError(f"--src {root.uri} does not exist")
    if root.is_s3:
        return filter_keys(root.uri, root.list_files())
    return list_folder(root.path)


def scan_class_folders(root: Location, unlabelled: bool | None = None) -> FolderScan:
    """Group the source's images by class folder (`<src>/<class>/...`, sub-folders included).

    `unlabelled=True` makes every image one class (`unlabelled`) whatever the folders; `None` does so
    only for a flat folder (images directly under --src and no class folder), as for DINO on a user's own
    images. Images beside class folders are an error: the layout is ambiguous.
    """
    listing = list_source(root)
    groups, loose = listing.by_top_folder()
    non_images = [f for f in listing.other_files if "/" not in f]
    if unlabelled or (unlabelled is None and loose and not any(groups.values())):
        if not listing.images:
            raise DataError(f"--src {root.uri} holds no image" + _ignored_suffix(listing))
        # Non-image files stay bad inputs of the one class (--on-error), as in class folders.
        return FolderScan({UNLABELLED_CLASS: sorted(listing.images + listing.other_files)}, listing, True)
    if loose or non_images:
        first = (loose or non_images)[0]
        raise DataError(
            f"{root.join(first).uri} lies directly under --src beside class folders; imagefolder expects "
            "<src>/<class>/<image> (or a flat folder of images only, ingested as one unlabelled class)"
        )
    for relative in listing.other_files:
        groups[relative.split("/", 1)[0]].append(relative)  # bad inputs of their class (--on-error)
    empty = sorted(name for name, paths in groups.items() if not paths)
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(repr(posixpath.join(root.uri, e)) for e in empty)} hold no image; "
            "add images or remove the folder" + _ignored_suffix(listing)
        )
    if not groups:
        raise DataError(f"--src {root.uri} holds no class folder; expected <src>/<class>/<image>"
                        + _ignored_suffix(listing))
    return FolderScan({name: sorted(groups[name]) for name in sorted(groups)}, listing, False)


def _ignored_suffix(listing: FolderListing) -> str:
    line = listing.describe_ignored(include_other_files=False)
    return f" ({line})" if line else ""


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
    unlabelled: bool | None = None,
) -> Manifest:
    """Ingest `<src>/<class>/<image>` (or a flat folder of unlabelled images, see `scan_class_folders`)."""
    if split_classes and split_rows:
        raise DataError("--split-classes and --split-rows exclude each other; pick one")
    root = locate(src)
    scan = scan_class_folders(root, unlabelled)
    images_by_class = scan.images_by_class
    if scan.unlabelled and split_classes:
        raise DataError("--split-classes needs class folders; unlabelled images form one class (use --split-rows)")
    ignored = scan.listing.describe_ignored(include_other_files=False)
    if scan.unlabelled:
        print(f"metallo: --src {root.uri}: {len(scan.listing.images)} unlabelled image(s), ingested as one class "
              f"{UNLABELLED_CLASS!r}", file=sys.stderr)
    if ignored:
        print(f"metallo: --src {root.uri}: {ignored}", file=sys.stderr)
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
    source = {
        "ingester": "imagefolder",
        "src": root.uri,
        "unlabelled": scan.unlabelled,
        "split_classes": list(split_classes) if split_classes else None,
        "split_rows": list(split_rows) if split_rows else None,
        "size": options.size,
        "crop": options.crop.describe(),
        "pixel_size_nm": options.pixel_size_nm,
        "seed": options.seed,
        "ignored": scan.listing.ignored_counts(),
    }
    writer = DatasetWriter(
        out,
        options.name or posixpath.basename(root.uri.rstrip("/")),
        class_names,
        split_kind="classes" if split_classes else "rows",
        split_classes=classes_of_split,
        overwrite=options.overwrite,
        source=source,
    )
    decode_notes: dict[str, str] = {}
    bar_rows: list[int] = []
    pixel_sizes_nm: list[float | None] = []
    metadata_bars = 0
    with writer:
        for class_name, paths in images_by_class.items():
            for relative in paths:
                try:
                    check_suffix(relative)
                    data = root.join(relative).read_bytes()
                    metadata, crop, scale = microscope_settings(data, relative, options)
                    image = prepare_image(data, relative, options.size, crop, scale)
                except (DataError, StorageError) as exc:
                    error = exc if isinstance(exc, DataError) else DataError(str(exc))
                    handle_bad_image(error, relative, options, skipped)
                    continue
                if image.notes:
                    decode_notes[relative] = "; ".join(image.notes)
                bar_rows.append(image.bottom_cropped)
                pixel_sizes_nm.append(metadata.pixel_size.nanometres if metadata.pixel_size else None)
                metadata_bars += crop != options.crop  # the metadata's data bar replaced the asked bottom crop
                writer.write_encoded(split_of_image[relative], image.data, image.info, class_name=class_name,
                                     source=relative)
        writer.skipped = skipped.entries
        # What the decoder changed or guessed, per file (also warned as it happened), kept with the data.
        source["decode_notes_count"] = len(decode_notes)
        source["decode_notes"] = dict(list(decode_notes.items())[:MAX_NOTES_KEPT])
        source["pixel_sizes"] = _pixel_size_summary(pixel_sizes_nm, metadata_bars)
        if options.crop.auto_bottom:
            found = [rows for rows in bar_rows if rows]
            source["crop_auto_bars"] = {"images": len(bar_rows), "with_bar": len(found),
                                        "rows_min": min(found, default=0), "rows_max": max(found, default=0)}
    return writer.manifest


def _pixel_size_summary(pixel_sizes_nm: list[float | None], metadata_bars: int) -> dict:
    """For the manifest: how many images had a pixel size in their metadata (data/microscope.py), their
    range in nm as stored in the files, and how many data bars the metadata measured and were cut."""
    known = sorted(size for size in pixel_sizes_nm if size is not None)
    summary: dict = {"images": len(pixel_sizes_nm), "with_pixel_size": len(known),
                     "data_bars_from_metadata": metadata_bars}
    if known:
        summary.update(min_nm=known[0], median_nm=float(np.median(known)), max_nm=known[-1])
    return summary
