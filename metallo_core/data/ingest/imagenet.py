"""Ingest an ImageNet-1k train folder (`<src>/<wnid>/*.JPEG`) in parallel Ray tasks, streaming with bounded memory.

The driver walks the sorted file list one synset folder at a time and hands out chunks of file names;
each task reads, validates (and optionally resizes) its images and writes its own shards, returning
only shard infos and skipped entries. The driver keeps at most `workers` tasks in flight and writes
the manifest last. Every Ray node must see `--src` at the same path (a shared or mounted file system).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

from metallo_core.data.ingest.common import IngestOptions, SkipLog, check_suffix, handle_bad_image, prepare_image
from metallo_core.data.listing import is_metadata_name
from metallo_core.data.manifest import Manifest, ShardInfo, build_manifest
from metallo_core.data.shards import ImageRow, ShardWriter, commit_manifest, prepare_destination
from metallo_core.errors import DataError, MetalloError, StorageError
from metallo_core.progress import Progress
from metallo_core.storage import Location, locate

SPLIT = "train"
DEFAULT_CHUNK_SIZE = 1000  # about 110 MB of ImageNet JPEGs: one or two shards per task
SYNSET_NAMES_FILE = "LOC_synset_mapping.txt"


def read_synset_names(location: Location) -> dict[str, str]:
    """WordNet id -> human-readable name, from lines like `n01440764 tench, Tinca tinca`."""
    try:
        text = location.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{location.uri} is not UTF-8 text ({exc}); expected lines 'WNID name'") from exc
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(
                f"{location.uri}:{number}: expected 'WNID name' (e.g. 'n01440764 tench, Tinca tinca'), got {line!r}"
            )
        names[parts[0]] = parts[1]
    return names


def find_synset_names(src: Location, explicit: str | None) -> tuple[dict[str, str], str | None]:
    """Names from `--synset-names`, else from `<src>/LOC_synset_mapping.txt` if present; (names, file URI)."""
    if explicit is not None:
        location = locate(explicit)
        if not location.is_file():
            raise DataError(f"--synset-names {location.uri} does not exist; point it at a 'WNID name' text file")
        return read_synset_names(location), location.uri
    default = src.join(SYNSET_NAMES_FILE)
    if default.is_file():
        return read_synset_names(default), default.uri
    return {}, None


def list_synsets(root: Location) -> list[str]:
    """Sorted synset folder names under `root`; an image lying directly under it is an error."""
    if root.is_s3:
        raise DataError(f"--src {root.uri}: imagenet reads a local (or mounted, shared) directory, not S3")
    if not os.path.isdir(root.path):
        raise DataError(f"--src {root.uri} does not exist or is not a directory")
    synsets = []
    for entry in sorted(os.scandir(root.path), key=lambda e: e.name):
        if entry.name.startswith(".") or is_metadata_name(entry.name, entry.is_dir()):
            continue  # the listing policy of `metallo_core.data.listing` (hidden, OS/NAS metadata)
        if entry.is_dir():
            synsets.append(entry.name)
        elif entry.name.lower().endswith((".jpeg", ".jpg", ".png")):
            raise DataError(
                f"{posixpath.join(root.uri, entry.name)} lies directly under --src; "
                "imagenet expects <src>/<wnid>/<image> (point --src at the train folder)"
            )
    if not synsets:
        raise DataError(f"--src {root.uri} holds no synset folder; expected <src>/<wnid>/<image>.JPEG")
    return synsets


def iter_chunks(root: Location, synsets: list[str], chunk_size: int) -> Iterator[list[tuple[str, int]]]:
    """Chunks of (path relative to root, label) over the sorted file list, listing one synset folder at a time."""
    chunk: list[tuple[str, int]] = []
    for label, synset in enumerate(synsets):
        folder = os.path.join(root.path, synset)
        names = []
        for entry in os.scandir(folder):
            if entry.name.startswith(".") or is_metadata_name(entry.name, entry.is_dir()):
                continue
            if not entry.is_file():
                raise DataError(
                    f"{posixpath.join(root.uri, synset, entry.name)} is not a file; "
                    "imagenet expects images directly inside each <src>/<wnid>/ folder"
                )
            names.append(entry.name)
        if not names:
            raise DataError(f"synset folder {posixpath.join(root.uri, synset)} holds no image; add images or remove it")
        for name in sorted(names):
            chunk.append((f"{synset}/{name}", label))
            if len(chunk) == chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


@dataclass
class ChunkResult:
    shards: list[ShardInfo]
    skipped: list[dict[str, str]]
    num_images: int


def ingest_chunk(
    src_uri: str, out_uri: str, task_index: int, entries: list[tuple[str, int]], options: IngestOptions
) -> ChunkResult:
    """One task's work: validate its images and write them to shards `train/part-t<index>-*.parquet`."""
    src, out = locate(src_uri), locate(out_uri)
    writer = ShardWriter(out, SPLIT, file_prefix=f"part-t{task_index:05d}")
    skipped = SkipLog()
    written = 0
    for relative, label in entries:
        try:
            check_suffix(relative)
            image = prepare_image(src.join(relative).read_bytes(), relative, options.size)
        except (DataError, StorageError) as exc:
            error = exc if isinstance(exc, DataError) else DataError(str(exc))
            handle_bad_image(error, relative, options, skipped)
            continue
        class_name = relative.split("/", 1)[0]
        writer.write(
            ImageRow(image.data, label, class_name, relative, image.info.height, image.info.width,
                     image.info.encoding, {})
        )
        written += 1
    return ChunkResult(shards=writer.close(), skipped=skipped.entries, num_images=written)


def ingest_imagenet(
    src: str,
    out: str,
    options: IngestOptions,
    *,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    synset_names: str | None = None,
) -> Manifest:
    """Ingest in Ray tasks on the cluster this process has joined (`metallo data ingest` joins or starts one
    through `train.ray_setup.connect`, which names a bad address and where it came from). Raises DataError
    when no cluster is joined."""
    if chunk_size < 1:
        raise DataError(f"--chunk-size must be at least 1, got {chunk_size}")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    root = locate(src)
    synsets = list_synsets(root)
    names, names_uri = find_synset_names(root, synset_names)

    import ray  # here, not at the top: miniimagenet shares this module's helpers and needs no Ray

    if not ray.is_initialized():
        raise DataError("imagenet ingestion runs as Ray tasks and this process has joined no Ray cluster "
                        "(`metallo data ingest` joins $RAY_ADDRESS or starts a local one)")
    destination = prepare_destination(out, options.overwrite)
    max_in_flight = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    results = run_chunk_tasks(root, destination, iter_chunks(root, synsets, chunk_size), options, max_in_flight)

    manifest = build_manifest(
        options.name or "imagenet",
        synsets,
        "rows",
        [shard for result in results for shard in result.shards],
        source={
            "ingester": "imagenet",
            "src": root.uri,
            "size": options.size,
            "chunk_size": chunk_size,
            "synset_names": names_uri,
            "class_descriptions": {synset: names[synset] for synset in synsets if synset in names},
        },
        skipped=[entry for result in results for entry in result.skipped],
    )
    commit_manifest(destination, manifest)
    return manifest


def run_chunk_tasks(
    src: Location,
    destination: Location,
    chunks: Iterator[list[tuple[str, int]]],
    options: IngestOptions,
    max_in_flight: int,
) -> list[ChunkResult]:
    """Run one Ray task per chunk, at most `max_in_flight` at once; results in chunk order.

    The first failed task fails the whole run with its own error (naming the file) and cancels the rest.
    """
    import ray
    from ray.exceptions import RayTaskError

    ingest_task = ray.remote(num_cpus=1)(ingest_chunk)
    progress = Progress("ingest imagenet")
    pending: dict = {}  # ObjectRef -> chunk index
    results: dict[int, ChunkResult] = {}

    def collect_one() -> None:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as exc:
            # A user error keeps its type and message, so the CLI prints it plainly.
            if isinstance(exc.cause, MetalloError):
                raise exc.cause from exc
            raise
        results[index] = result
        progress.advance(result.num_images, note=f"{len(results)} task(s) done")

    try:
        for index, entries in enumerate(chunks):
            while len(pending) >= max_in_flight:
                collect_one()
            pending[ingest_task.remote(src.uri, destination.uri, index, entries, options)] = index
        while pending:
            collect_one()
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    progress.finish()
    return [results[index] for index in sorted(results)]
