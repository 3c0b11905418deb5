"""The dataset manifest: what a shard directory holds, written last so a partial write never looks complete.

`manifest.json` names the dataset, its classes, its splits (class-disjoint for few-shot work, or row
splits for supervised work), the image count per class per split, the image encodings, any extra label
columns, and every shard with its row count, size and SHA-256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from metallo_core.csv_output import escape_name, escape_names
from metallo_core.errors import DataError
from metallo_core.storage import Location, locate
from metallo_core.versioned_json import load_versioned_json

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "metallo-shards"
SCHEMA_VERSION = 1
SplitKind = Literal["classes", "rows"]


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    split: str
    num_rows: int
    num_bytes: int
    sha256: str
    class_counts: dict[str, int] = field(default_factory=dict)
    image_encodings: dict[str, int] = field(default_factory=dict)


@dataclass
class SplitInfo:
    classes: list[str]
    num_images: int
    counts: dict[str, int]  # class name -> images


@dataclass
class ColumnInfo:
    """An extra label column: `class` columns hold integer ids into `classes`; `value` columns hold floats."""

    kind: Literal["class", "value"]
    classes: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class Manifest:
    name: str
    classes: dict[int, str]
    split_kind: SplitKind
    splits: dict[str, SplitInfo]
    shards: list[ShardInfo]
    image_encoding: str
    image_encodings: dict[str, int] = field(default_factory=dict)
    extra_columns: dict[str, ColumnInfo] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME

    @property
    def num_images(self) -> int:
        return sum(split.num_images for split in self.splits.values())

    @property
    def class_names(self) -> list[str]:
        return [self.classes[i] for i in sorted(self.classes)]

    @property
    def class_ids(self) -> dict[str, int]:
        return {name: index for index, name in self.classes.items()}

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(
                f"dataset {self.name!r} has no split {name!r}; its splits are: {', '.join(self.splits)}. "
                "Pick one of those in the config, or re-ingest with the split you need"
            )
        return self.splits[name]

    def shards_of(self, split: str) -> list[ShardInfo]:
        self.split(split)
        return [shard for shard in self.shards if shard.split == split]

    def to_json(self) -> str:
        data = asdict(self)
        data["classes"] = {str(key): value for key, value in sorted(self.classes.items())}
        return json.dumps(escape_names(data), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        data = load_versioned_json(text, where, key="schema_version", version=SCHEMA_VERSION, error=DataError,
                                   remedy="re-ingest the dataset with this version",
                                   kind=("format", FORMAT_NAME, "a metallo dataset manifest"))
        try:
            return cls(
                name=data["name"],
                classes={int(key): value for key, value in data["classes"].items()},
                split_kind=data["split_kind"],
                splits={name: SplitInfo(**split) for name, split in data["splits"].items()},
                shards=[ShardInfo(**shard) for shard in data["shards"]],
                image_encoding=data["image_encoding"],
                image_encodings=data.get("image_encodings", {}),
                extra_columns={name: ColumnInfo(**column) for name, column in data.get("extra_columns", {}).items()},
                source=data.get("source", {}),
                skipped=data.get("skipped", []),
                created_at=data.get("created_at", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where} is missing or has malformed fields ({exc}); write the dataset again") from exc

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary printed by `metallo data info --json`."""
        splits: dict[str, Any]
        if self.split_kind == "classes":
            splits = {name: list(split.classes) for name, split in self.splits.items()}
        else:
            splits = {name: split.num_images for name, split in self.splits.items()}
        return {
            "name": self.name,
            "num_images": self.num_images,
            "classes": self.class_names,
            "split_kind": self.split_kind,
            "splits": splits,
            "images_per_split": {name: split.num_images for name, split in self.splits.items()},
            "images_per_class": {
                name: dict(split.counts) for name, split in self.splits.items()
            },
            "image_encoding": self.image_encoding,
            "extra_columns": {name: column.kind for name, column in self.extra_columns.items()},
            "num_shards": len(self.shards),
            "num_bytes": sum(shard.num_bytes for shard in self.shards),
            "skipped": len(self.skipped),
        }


def build_manifest(
    name: str,
    class_names: list[str],
    split_kind: SplitKind,
    shards: list[ShardInfo],
    *,
    split_classes: dict[str, list[str]] | None = None,
    extra_columns: dict[str, ColumnInfo] | None = None,
    source: dict[str, Any] | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> Manifest:
    """Aggregate shard infos into a manifest and check the dataset is usable (no empty class or split)."""
    # Class names as the shard writer stores them (a name that is not valid UTF-8 escaped as \xNN).
    class_names = [escape_name(name) for name in class_names]
    if split_classes:
        split_classes = {split: [escape_name(name) for name in names] for split, names in split_classes.items()}
    counts: dict[str, dict[str, int]] = {}
    encodings: dict[str, int] = {}
    for shard in shards:
        split_counts = counts.setdefault(shard.split, {})
        for class_name, count in shard.class_counts.items():
            split_counts[class_name] = split_counts.get(class_name, 0) + count
        for encoding, count in shard.image_encodings.items():
            encodings[encoding] = encodings.get(encoding, 0) + count
    if split_classes:
        for split in split_classes:
            counts.setdefault(split, {})
    empty_classes = [c for c in class_names if not any(c in split_counts for split_counts in counts.values())]
    if empty_classes:
        raise DataError(
            f"class(es) {', '.join(map(repr, empty_classes))} have no readable image; add images or remove the class"
        )
    splits: dict[str, SplitInfo] = {}
    for split, split_counts in counts.items():
        listed = split_classes[split] if split_classes else sorted(split_counts, key=class_names.index)
        missing = [c for c in listed if not split_counts.get(c)]
        if missing:
            raise DataError(f"split {split!r}: class(es) {', '.join(map(repr, missing))} have no image in it")
        ordered = {c: split_counts[c] for c in sorted(split_counts, key=class_names.index)}
        splits[split] = SplitInfo(classes=list(listed), num_images=sum(ordered.values()), counts=ordered)
    if split_kind == "classes":
        seen: dict[str, str] = {}
        for split, info in splits.items():
            for class_name in info.counts:
                if class_name in seen:
                    raise DataError(
                        f"class {class_name!r} appears in splits {seen[class_name]!r} and {split!r}, "
                        "but class-disjoint splits must not share classes"
                    )
                seen[class_name] = split
    if not splits:
        raise DataError(f"dataset {name!r} holds no image at all")
    return Manifest(
        name=name,
        classes=dict(enumerate(class_names)),
        split_kind=split_kind,
        splits=splits,
        shards=sorted(shards, key=lambda shard: shard.path),
        image_encoding=next(iter(encodings)) if len(encodings) == 1 else "mixed",
        image_encodings=encodings,
        extra_columns=extra_columns or {},
        source=source or {},
        skipped=skipped or [],
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def manifest_sha256(uri: str | Location) -> str:
    """SHA-256 of a dataset's manifest: names the exact dataset version in lineage tags."""
    import hashlib

    location = uri if isinstance(uri, Location) else locate(uri)
    return hashlib.sha256(location.join(MANIFEST_NAME).read_bytes()).hexdigest()


def read_manifest(uri: str | Location) -> Manifest:
    location = uri if isinstance(uri, Location) else locate(uri)
    location.check_access()
    manifest_location = location.join(MANIFEST_NAME)
    if not manifest_location.exists():
        if location.exists() and location.list_files():
            raise DataError(
                f"{location.uri} has no {MANIFEST_NAME}: the dataset was never finished (an interrupted or "
                "failed write); write it again"
            )
        raise DataError(f"no dataset at {location.uri}: the path does not exist or is empty")
    return Manifest.from_json(manifest_location.read_bytes().decode(), manifest_location.uri)
