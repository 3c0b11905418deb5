"""Parquet image shards: writing them (bounded memory, hashed as written) and reading them back verified.

Layout of a dataset at a URI (local directory or s3://bucket/prefix):

    <root>/<split>/<prefix>-00000.parquet   one row per image, row groups sized for streaming
    <root>/manifest.json                     written last (see manifest.py)
    <root>/_WRITING                          present only while a write is in progress
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from metallo_core.csv_output import escape_name
from metallo_core.data.images import ImageInfo
from metallo_core.data.manifest import (
    MANIFEST_NAME,
    ColumnInfo,
    Manifest,
    ShardInfo,
    SplitKind,
    build_manifest,
    read_manifest,
)
from metallo_core.errors import DataError, StorageError
from metallo_core.storage import Location, locate

WRITING_MARKER = "_WRITING"
TARGET_SHARD_BYTES = 192 * 1024 * 1024
ROW_GROUP_MAX_ROWS = 256
ROW_GROUP_MAX_BYTES = 32 * 1024 * 1024

BASE_FIELDS = [
    pa.field("image", pa.binary()),
    pa.field("label", pa.int32()),
    pa.field("class_name", pa.string()),
    pa.field("source", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("split", pa.string()),
]
BASE_COLUMNS = [f.name for f in BASE_FIELDS]


def extra_field(name: str, column: ColumnInfo) -> pa.Field:
    return pa.field(name, pa.int32() if column.kind == "class" else pa.float32())


def shard_schema(extra_columns: dict[str, ColumnInfo] | None = None) -> pa.Schema:
    extras = [extra_field(name, column) for name, column in (extra_columns or {}).items()]
    return pa.schema(BASE_FIELDS + extras)


class _HashingSink:
    """A file-like object that hashes and counts every byte on its way to the real output stream."""

    def __init__(self, stream):
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self._stream.write(view)
        self.num_bytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.num_bytes

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self.closed = True


@dataclass
class ImageRow:
    image: bytes
    label: int
    class_name: str
    source: str
    height: int
    width: int
    encoding: str
    extras: dict[str, Any]


class ShardWriter:
    """Streams the rows of one split into shards under `<root>/<split>/`, rolling over at a target size."""

    def __init__(
        self,
        root: Location,
        split: str,
        *,
        extra_columns: dict[str, ColumnInfo] | None = None,
        file_prefix: str = "part",
        target_shard_bytes: int = TARGET_SHARD_BYTES,
        row_group_max_rows: int = ROW_GROUP_MAX_ROWS,
        row_group_max_bytes: int = ROW_GROUP_MAX_BYTES,
    ):
        self.root = root
        self.split = split
        self.extra_columns = dict(extra_columns or {})
        self.schema = shard_schema(self.extra_columns)
        self.file_prefix = file_prefix
        self.target_shard_bytes = target_shard_bytes
        self.row_group_max_rows = row_group_max_rows
        self.row_group_max_bytes = row_group_max_bytes
        self.shards: list[ShardInfo] = []
        self._buffer: dict[str, list] = {name: [] for name in self.schema.names}
        self._buffer_bytes = 0
        self._sink: _HashingSink | None = None
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = 0
        self._shard_counts: dict[str, int] = {}
        self._shard_encodings: dict[str, int] = {}

    def write(self, row: ImageRow) -> None:
        missing = set(self.extra_columns) - set(row.extras)
        if missing:
            raise DataError(f"{row.source}: missing value(s) for label column(s) {sorted(missing)}")
        buffer = self._buffer
        # A file or folder name that is not valid UTF-8 is stored with its bytes as \xNN (csv_output.escape_name):
        # Parquet strings are UTF-8, and the manifest escapes the same names the same way.
        class_name = escape_name(row.class_name)
        buffer["image"].append(row.image)
        buffer["label"].append(row.label)
        buffer["class_name"].append(class_name)
        buffer["source"].append(escape_name(row.source))
        buffer["height"].append(row.height)
        buffer["width"].append(row.width)
        buffer["split"].append(self.split)
        for name in self.extra_columns:
            buffer[name].append(row.extras[name])
        self._buffer_bytes += len(row.image)
        self._shard_counts[class_name] = self._shard_counts.get(class_name, 0) + 1
        self._shard_encodings[row.encoding] = self._shard_encodings.get(row.encoding, 0) + 1
        if len(buffer["image"]) >= self.row_group_max_rows or self._buffer_bytes >= self.row_group_max_bytes:
            self._flush_row_group()

    def close(self) -> list[ShardInfo]:
        self._flush_row_group()
        self._close_shard()
        return self.shards

    def _flush_row_group(self) -> None:
        rows = len(self._buffer["image"])
        if rows == 0:
            return
        table = pa.Table.from_pydict(self._buffer, schema=self.schema)
        if self._writer is None:
            self._open_shard()
        self._writer.write_table(table, row_group_size=rows)
        self._shard_rows += rows
        self._buffer = {name: [] for name in self.schema.names}
        self._buffer_bytes = 0
        if self._sink.num_bytes >= self.target_shard_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        index = len(self.shards)
        self._relative_path = f"{self.split}/{self.file_prefix}-{index:05d}.parquet"
        self._sink = _HashingSink(self.root.join(self._relative_path).open_output())
        self._writer = pq.ParquetWriter(
            self._sink,
            self.schema,
            compression={name: ("NONE" if name == "image" else "ZSTD") for name in self.schema.names},
            use_dictionary=["class_name", "split"],
            write_statistics=[name for name in self.schema.names if name not in ("image", "source")],
        )

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self.shards.append(
            ShardInfo(
                path=self._relative_path,
                split=self.split,
                num_rows=self._shard_rows,
                num_bytes=self._sink.num_bytes,
                sha256=self._sink.sha256.hexdigest(),
                class_counts=self._shard_counts,
                image_encodings=self._shard_encodings,
            )
        )
        self._writer, self._sink = None, None
        self._shard_rows, self._shard_counts, self._shard_encodings = 0, {}, {}


def prepare_destination(uri: str, overwrite: bool) -> Location:
    """Make `uri` ready for a new dataset: refuse to clobber a finished one unless asked to,
    clear the remains of an interrupted write, and mark the write as in progress."""
    root = locate(uri)
    root.check_access()
    files = root.list_files()
    if files:
        finished = MANIFEST_NAME in files
        ours = all(f == MANIFEST_NAME or f == WRITING_MARKER or f.endswith(".parquet") for f in files)
        if finished and not overwrite:
            raise DataError(f"{root.uri} already holds a dataset; pass --overwrite to replace it, or pick a new --out")
        if not ours:
            raise DataError(
                f"{root.uri} is not empty and is not a metallo dataset ({files[0]} and {len(files) - 1} more); "
                "pick an empty --out"
            )
        # Manifest first: from this moment the old dataset no longer looks complete.
        root.join(MANIFEST_NAME).delete_file()
        for relative in files:
            root.join(relative).delete_file()
    root.makedirs()
    root.join(WRITING_MARKER).write_bytes(b"a metallo dataset is being written here\n")
    return root


def commit_manifest(root: Location, manifest: Manifest) -> None:
    """Write the manifest (the moment the dataset becomes complete), then drop the in-progress marker."""
    root.join(MANIFEST_NAME).write_bytes(manifest.to_json().encode())
    root.join(WRITING_MARKER).delete_file()


class DatasetWriter:
    """Writes a complete dataset: one ShardWriter per split, then the manifest, last.

    Use as a context manager; if the body raises, no manifest is written and the destination keeps
    its `_WRITING` marker, so nothing mistakes the remains for a dataset.
    """

    def __init__(
        self,
        uri: str,
        name: str,
        class_names: list[str],
        *,
        split_kind: SplitKind,
        split_classes: dict[str, list[str]] | None = None,
        extra_columns: dict[str, ColumnInfo] | None = None,
        overwrite: bool = False,
        source: dict[str, Any] | None = None,
        target_shard_bytes: int = TARGET_SHARD_BYTES,
    ):
        self.name = name
        self.class_names = list(class_names)
        self.class_ids = {class_name: index for index, class_name in enumerate(self.class_names)}
        self.split_kind = split_kind
        self.split_classes = split_classes
        self.extra_columns = dict(extra_columns or {})
        self.source = source or {}
        self.target_shard_bytes = target_shard_bytes
        self.skipped: list[dict[str, str]] = []
        self.root = prepare_destination(uri, overwrite)
        self._writers: dict[str, ShardWriter] = {}
        self.manifest: Manifest | None = None

    def write(
        self,
        split: str,
        *,
        image: bytes,
        class_name: str,
        source: str,
        height: int,
        width: int,
        encoding: str,
        **extras: Any,
    ) -> None:
        if class_name not in self.class_ids:
            raise DataError(f"{source}: class {class_name!r} is not one of the dataset's classes")
        writer = self._writers.get(split)
        if writer is None:
            writer = self._writers[split] = ShardWriter(
                self.root, split, extra_columns=self.extra_columns, target_shard_bytes=self.target_shard_bytes
            )
        writer.write(
            ImageRow(image, self.class_ids[class_name], class_name, source, height, width, encoding, extras)
        )

    def write_encoded(self, split: str, data: bytes, info: ImageInfo, *, class_name: str, source: str) -> None:
        """`write` for encoded bytes with their shape and encoding (as `prepare_image` returns them)."""
        self.write(split, image=data, class_name=class_name, source=source, height=info.height, width=info.width,
                   encoding=info.encoding)

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append({"source": source, "reason": reason})

    def finish(self) -> Manifest:
        shards = [shard for writer in self._writers.values() for shard in writer.close()]
        manifest = build_manifest(
            self.name,
            self.class_names,
            self.split_kind,
            shards,
            split_classes=self.split_classes,
            extra_columns=self.extra_columns,
            source=self.source,
            skipped=self.skipped,
        )
        commit_manifest(self.root, manifest)
        self.manifest = manifest
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None and self.manifest is None:
            self.finish()


def verify_dataset(uri: str | Location, *, checksums: bool = True) -> Manifest:
    """Check every shard exists with the manifest's size (and SHA-256); raise DataError naming the first bad one."""
    root = uri if isinstance(uri, Location) else locate(uri)
    manifest = read_manifest(root)
    for shard in manifest.shards:
        shard_location = root.join(shard.path)
        if not shard_location.exists():
            raise DataError(f"shard {shard_location.uri} listed in the manifest is missing; write the dataset again")
        size = shard_location.size()
        if size != shard.num_bytes:
            raise DataError(
                f"shard {shard_location.uri} has {size} bytes but the manifest says {shard.num_bytes}: "
                "it was changed or truncated after the dataset was written; write the dataset again"
            )
        if checksums:
            _check_sha256(shard_location, shard, shard_location.read_bytes())
    return manifest


def _check_sha256(location: Location, shard: ShardInfo, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise DataError(
            f"shard {location.uri} does not match its checksum in the manifest (sha256 {digest[:12]}… "
            f"!= {shard.sha256[:12]}…): it was changed or corrupted after writing; write the dataset again"
        )


def read_split_table(
    uri: str | Location,
    split: str,
    columns: Iterable[str] | None = None,
    *,
    manifest: Manifest | None = None,
    verify: bool = True,
) -> pa.Table:
    """All rows of one split as an Arrow table, each shard checked against its manifest checksum."""
    root = uri if isinstance(uri, Location) else locate(uri)
    manifest = manifest or read_manifest(root)
    wanted = list(columns) if columns is not None else None
    tables = []
    for shard in manifest.shards_of(split):
        location = root.join(shard.path)
        try:
            data = location.read_bytes()
        except StorageError as exc:
            raise DataError(f"shard {location.uri} of split {split!r} cannot be read: {exc}") from exc
        if verify:
            if len(data) != shard.num_bytes:
                raise DataError(
                    f"shard {location.uri} has {len(data)} bytes but the manifest says {shard.num_bytes}; "
                    "write the dataset again"
                )
            _check_sha256(location, shard, data)
        tables.append(pq.read_table(pa.BufferReader(data), columns=wanted))
    if not tables:
        return shard_schema(manifest.extra_columns).empty_table().select(wanted or BASE_COLUMNS)
    return pa.concat_tables(tables)
