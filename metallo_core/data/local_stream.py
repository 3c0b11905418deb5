"""Training batches straight from a split's Parquet row groups, one stream per worker, no Ray Data.

Each worker (rank r of `world_size`) reads its own share of the split: every epoch the row groups of
all shards are put in one order (shuffled with a seed every rank shares), the rows laid end to end, and
rank r takes the contiguous range [r * N / world, (r + 1) * N / world). Contiguous ranges keep each
worker's reads sequential within a shard (what S3 likes) and give every rank floor or ceil(N / world)
rows, so all ranks take the same number of steps (DDP needs that; dealing row groups r::world would
give ranks with fewer rows when row groups are uneven). A row group on a boundary is read by the two
ranks that share it, each keeping its part: at most two extra row-group reads per rank per epoch.

Rows are shuffled within a window of a few row groups, decoded in batches by `batch_decode` in a
thread pool (torchvision releases the GIL) a few batches ahead of the consumer, optionally on the GPU.
For one worker's training input this does without Ray Data's object-store copies and task scheduling
(benchmarks/read_throughput.py times both against ImageFolder + DataLoader; the README gives the
figures); Ray Data stays the path for
ingestion and for anything that needs the cluster's CPUs rather than the worker's own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from metallo_core.data.batch_decode import binary_views, decode_batch_resized
from metallo_core.data.manifest import ShardInfo, read_manifest
from metallo_core.errors import DataError
from metallo_core.storage import Location, locate


@dataclass(frozen=True)
class RowGroupRef:
    """One Parquet row group of a split: the shard (path relative to the dataset root), its index there,
    and its row count."""

    shard: str
    index: int
    num_rows: int


@dataclass(frozen=True)
class RowGroupSlice:
    """The rows [start, stop) of one row group that a rank reads."""

    group: RowGroupRef
    start: int
    stop: int


def list_row_groups(root: Location, shards: Sequence[ShardInfo]) -> list[RowGroupRef]:
    """Every row group of `shards`, in shard order, from the Parquet footers (one small read per shard)."""
    groups = []
    for shard in shards:
        location = root.join(shard.path)
        with root.fs.open_input_file(location.path) as handle:
            metadata = pq.ParquetFile(handle).metadata
        if metadata.num_rows != shard.num_rows:
            raise DataError(f"shard {location.uri} has {metadata.num_rows} rows but the manifest says "
                            f"{shard.num_rows}: it changed after writing; write the dataset again")
        groups.extend(RowGroupRef(shard.path, index, metadata.row_group(index).num_rows)
                      for index in range(metadata.num_row_groups))
    return groups


def epoch_order(groups: Sequence[RowGroupRef], seed: int, epoch: int, shuffle: bool) -> list[RowGroupRef]:
    """The row-group order of one epoch: the same on every rank (same seed and epoch), new each epoch."""
    if not shuffle:
        return list(groups)
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    return [groups[index] for index in order]


def rank_slices(ordered: Sequence[RowGroupRef], rank: int, world_size: int) -> list[RowGroupSlice]:
    """Rank `rank`'s contiguous share of the rows of `ordered`: floor or ceil(N / world_size) rows."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} worker(s)")
    total = sum(group.num_rows for group in ordered)
    first, last = rank * total // world_size, (rank + 1) * total // world_size
    slices, offset = [], 0
    for group in ordered:
        start, stop = max(first - offset, 0), min(last - offset, group.num_rows)
        if start < stop:
            slices.append(RowGroupSlice(group, start, stop))
        offset += group.num_rows
        if offset >= last:
            break
    return slices


class LocalBatchStream:
    """One worker's batches of a split: {"image": (B, S, S, 3) uint8 tensor on `device`, "label": (B,)
    int64 tensor}, `len()` batches per epoch (the same on every rank with `drop_last`).

    `decode_threads` threads decode `prefetch_batches` batches ahead of the consumer; with a CUDA
    `device`, JPEGs are decoded by nvJPEG on that device (the crops are cut there anyway)."""

    def __init__(
        self,
        uri: str,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        prefetch_batches: int = 4,
        decode_threads: int = 2,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        shuffle_window: int = 4,
        label_column: str | None = "label",
    ):
        self.root = locate(uri)
        self.manifest = read_manifest(self.root)
        self.groups = list_row_groups(self.root, self.manifest.shards_of(split))
        self.batch_size = batch_size
        self.image_size = image_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch_batches = prefetch_batches
        self.decode_threads = decode_threads
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.shuffle_window = max(1, shuffle_window)
        self.label_column = label_column
        self.epoch = 0
        rank_slices([], rank, world_size)  # validates rank/world_size now, not at the first epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration read epoch `epoch` (its row-group order and shuffle), as a resumed run
        needs; iterating moves on to the next epoch by itself."""
        self.epoch = epoch

    def __len__(self) -> int:
        rows = sum(group.num_rows for group in self.groups) // self.world_size  # the smallest rank's share
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _windows(self, slices: list[RowGroupSlice]) -> Iterator[list[RowGroupSlice]]:
        for start in range(0, len(slices), self.shuffle_window):
            yield slices[start:start + self.shuffle_window]

    def _read_window(self, window: list[RowGroupSlice], rng: np.random.Generator):
        """Encoded images (uint8 views) and labels of a window's rows, shuffled together."""
        columns = ["image"] + ([self.label_column] if self.label_column else [])
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for piece in window:
            path = self.root.join(piece.group.shard).path
            with self.root.fs.open_input_file(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(piece.group.index, columns=columns)
            table = table.slice(piece.start, piece.stop - piece.start)
            images.extend(binary_views(table.column("image")))
            if self.label_column:
                labels.append(table.column(self.label_column).to_numpy().astype(np.int64))
        label_array = np.concatenate(labels) if labels else np.full(len(images), -1, np.int64)
        order = rng.permutation(len(images)) if self.shuffle else np.arange(len(images))
        return [images[index] for index in order], label_array[order]

    def _encoded_batches(self, epoch: int) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        ordered = epoch_order(self.groups, self.seed, epoch, self.shuffle)
        slices = rank_slices(ordered, self.rank, self.world_size)
        limit = len(self)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        pending_images: list[np.ndarray] = []
        pending_labels: list[np.ndarray] = []
        emitted = 0
        # The next window is read in the background while this one is cut into batches.
        with ThreadPoolExecutor(max_workers=1) as reader:
            windows = self._windows(slices)
            upcoming = [reader.submit(self._read_window, window, rng) for window in [next(windows, None)] if window]
            while upcoming and emitted < limit:
                images, labels = upcoming.pop().result()
                window = next(windows, None)
                if window:
                    upcoming.append(reader.submit(self._read_window, window, rng))
                pending_images.extend(images)
                pending_labels.append(labels)
                while len(pending_images) >= self.batch_size and emitted < limit:
                    all_labels = np.concatenate(pending_labels)
                    yield pending_images[:self.batch_size], all_labels[:self.batch_size]
                    pending_images, pending_labels = pending_images[self.batch_size:], [all_labels[self.batch_size:]]
                    emitted += 1
            if pending_images and emitted < limit:
                yield pending_images, np.concatenate(pending_labels)

    def _decode(self, images: list[np.ndarray]) -> torch.Tensor:
        return decode_batch_resized(images, self.image_size, device=self.device)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of this rank's batches."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            in_flight: deque = deque()
            for images, labels in self._encoded_batches(epoch):
                in_flight.append((pool.submit(self._decode, images), labels))
                if len(in_flight) > self.prefetch_batches:
                    yield self._ready(*in_flight.popleft())
            while in_flight:
                yield self._ready(*in_flight.popleft())

    @staticmethod
    def _ready(decoded, labels: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": decoded.result(), "label": torch.from_numpy(labels)}
