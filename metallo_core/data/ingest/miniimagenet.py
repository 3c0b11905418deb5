"""Ingest mini-ImageNet in the Ravi & Larochelle layout: `<src>/images/*.jpg` plus `train.csv`, `val.csv`, `test.csv`.

Each CSV lists `filename,label` rows (label: a WordNet id such as n01532829); the three files give the
class-disjoint train/val/test split (64/16/20 classes of 600 images in the standard release).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from metallo_core.data.ingest.common import (
    IngestOptions,
    SkipLog,
    check_suffix,
    class_split_writer,
    handle_bad_image,
    prepare_image,
)
from metallo_core.data.ingest.imagenet import find_synset_names
from metallo_core.data.manifest import Manifest
from metallo_core.errors import DataError, StorageError
from metallo_core.progress import Progress
from metallo_core.storage import Location, locate

SPLITS = ("train", "val", "test")
CSV_HEADER = ["filename", "label"]
IMAGES_DIR = "images"


@dataclass(frozen=True)
class CsvRow:
    filename: str
    wnid: str
    where: str  # "<csv uri>:<line>", for messages


def read_split_csv(location: Location) -> list[CsvRow]:
    """The rows of one split CSV, checked for the `filename,label` header and two non-empty fields per row."""
    if not location.is_file():
        raise DataError(
            f"{location.uri} is missing; mini-ImageNet needs train.csv, val.csv and test.csv "
            "(header filename,label) next to images/"
        )
    try:
        text = location.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{location.uri} is not UTF-8 text ({exc}); expected a CSV with header filename,label") from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [field.strip() for field in header] != CSV_HEADER:
        found = ",".join(header) if header else "nothing"
        raise DataError(f"{location.uri}:1: the header is {found!r}; mini-ImageNet CSVs start with 'filename,label'")
    rows = []
    for fields in reader:
        where = f"{location.uri}:{reader.line_num}"
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(f"{where}: expected two fields 'filename,label', got {','.join(fields)!r}")
        filename, wnid = fields[0].strip(), fields[1].strip()
        if "/" in filename or "\\" in filename or filename in (".", ".."):
            raise DataError(f"{where}: {filename!r} is not a plain file name; rows name files directly inside images/")
        rows.append(CsvRow(filename, wnid, where))
    if not rows:
        raise DataError(f"{location.uri} lists no image; each split needs at least one 'filename,label' row")
    return rows


def group_split_rows(rows_by_split: dict[str, list[CsvRow]]) -> dict[str, dict[str, list[CsvRow]]]:
    """split -> class -> rows, refusing a class in two splits or an image listed twice."""
    split_of_class: dict[str, tuple[str, CsvRow]] = {}
    row_of_file: dict[str, CsvRow] = {}
    grouped: dict[str, dict[str, list[CsvRow]]] = {}
    for split, rows in rows_by_split.items():
        classes = grouped.setdefault(split, {})
        for row in rows:
            first = split_of_class.setdefault(row.wnid, (split, row))
            if first[0] != split:
                raise DataError(
                    f"class {row.wnid!r} appears in split {first[0]!r} ({first[1].where}) and in split {split!r} "
                    f"({row.where}); mini-ImageNet splits must not share classes: fix the CSVs"
                )
            earlier = row_of_file.setdefault(row.filename, row)
            if earlier is not row:
                raise DataError(f"{row.where}: image {row.filename!r} is already listed at {earlier.where}")
            classes.setdefault(row.wnid, []).append(row)
    return {split: {wnid: classes[wnid] for wnid in sorted(classes)} for split, classes in grouped.items()}


def check_images_exist(images: Location, rows: list[CsvRow]) -> None:
    if not images.exists():
        raise DataError(f"{images.uri} does not exist; mini-ImageNet keeps its images in <src>/{IMAGES_DIR}/")
    available = set(images.list_files())
    missing = [row for row in rows if row.filename not in available]
    if missing:
        more = f" (and {len(missing) - 1} more row(s) name missing images)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0].where}: image {images.join(missing[0].filename).uri} does not exist{more}; "
            "restore the images or fix the CSV"
        )


def ingest_miniimagenet(src: str, out: str, options: IngestOptions, *, synset_names: str | None = None) -> Manifest:
    root = locate(src)
    if not root.exists():
        raise DataError(f"--src {root.uri} does not exist")
    rows_by_split = {split: read_split_csv(root.join(f"{split}.csv")) for split in SPLITS}
    classes_by_split = group_split_rows(rows_by_split)
    images = root.join(IMAGES_DIR)
    check_images_exist(images, [row for rows in rows_by_split.values() for row in rows])
    names, names_uri = find_synset_names(root, synset_names)

    split_classes = {split: list(classes) for split, classes in classes_by_split.items()}
    class_names = [wnid for split in SPLITS for wnid in split_classes[split]]
    skipped = SkipLog()
    progress = Progress("ingest miniimagenet", sum(len(rows) for rows in rows_by_split.values()))
    writer = class_split_writer(out, options, "miniimagenet", {split: split_classes[split] for split in SPLITS},
                                src=root.uri, size=options.size, synset_names=names_uri,
                                class_descriptions={wnid: names[wnid] for wnid in class_names if wnid in names})
    with writer:
        for split, classes in classes_by_split.items():
            for wnid, rows in classes.items():
                for row in rows:
                    relative = f"{IMAGES_DIR}/{row.filename}"
                    progress.advance()
                    try:
                        check_suffix(relative)
                        image = prepare_image(images.join(row.filename).read_bytes(), relative, options.size)
                    except (DataError, StorageError) as exc:
                        error = exc if isinstance(exc, DataError) else DataError(str(exc))
                        handle_bad_image(error, relative, options, skipped)
                        continue
                    writer.write_encoded(split, image.data, image.info, class_name=wnid, source=relative)
        writer.skipped = skipped.entries
    progress.finish()
    return writer.manifest
