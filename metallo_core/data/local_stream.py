"""Decoded batches from a split's shards inside one process, decoding ahead in threads.

For single-process work (benchmarks, probes, small jobs) where a Ray Data pipeline would cost more
than it saves. Shards are read one at a time (bounded memory), rows shuffled within a shard and the
shard order shuffled per epoch; decoding runs in a thread pool (Pillow releases the GIL), a few
batches ahead of the consumer.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metallo_core.data.class_index import decode_all
from metallo_core.data.manifest import read_manifest
from metallo_core.storage import locate


class LocalBatchStream:
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
    ):
        self.root = locate(uri)
        self.manifest = read_manifest(self.root)
        self.shards = self.manifest.shards_of(split)
        self.batch_size = batch_size
        self.image_size = image_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.prefetch_batches = prefetch_batches
        self.decode_threads = decode_threads
        self.rng = np.random.default_rng(seed)
        self.epoch = 0

    def __len__(self) -> int:
        rows = sum(shard.num_rows for shard in self.shards)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _encoded_batches(self) -> Iterator[tuple[list[bytes], list[str], np.ndarray]]:
        order = self.rng.permutation(len(self.shards)) if self.shuffle else range(len(self.shards))
        pending_images: list[bytes] = []
        pending_sources: list[str] = []
        pending_labels: list[int] = []
        for shard_index in order:
            data = self.root.join(self.shards[shard_index].path).read_bytes()
            table = pq.read_table(pa.BufferReader(data), columns=["image", "label", "source"])
            rows = self.rng.permutation(table.num_rows) if self.shuffle else np.arange(table.num_rows)
            images = table.column("image").to_pylist()
            sources = table.column("source").to_pylist()
            labels = table.column("label").to_numpy()
            for row in rows:
                pending_images.append(images[row])
                pending_sources.append(sources[row])
                pending_labels.append(int(labels[row]))
                if len(pending_images) == self.batch_size:
                    yield pending_images, pending_sources, np.array(pending_labels)
                    pending_images, pending_sources, pending_labels = [], [], []
        if pending_images and not self.drop_last:
            yield pending_images, pending_sources, np.array(pending_labels)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of {"image": (B, S, S, 3) uint8, "label": (B,) int64}."""
        self.epoch += 1
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            in_flight: deque = deque()
            for images, sources, labels in self._encoded_batches():
                in_flight.append((pool.submit(decode_all, images, sources, self.image_size, 1), labels))
                if len(in_flight) > self.prefetch_batches:
                    decoded, batch_labels = in_flight.popleft()
                    yield {"image": decoded.result(), "label": batch_labels}
            while in_flight:
                decoded, batch_labels = in_flight.popleft()
                yield {"image": decoded.result(), "label": batch_labels}
