"""Per-worker streaming from Parquet row groups: every row once per epoch, equal steps on every rank."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from metallo_core.data.images import encode_png
from metallo_core.data.local_stream import (
    LocalBatchStream,
    RowGroupRef,
    epoch_order,
    rank_slices,
)
from metallo_core.data.shards import DatasetWriter


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[256, 256, 7, 100, 1, 256, 33], [5], [3, 1, 4, 1, 5, 9, 2, 6]])
def test_rank_slices_cover_every_row_once_in_balanced_shares(world_size, sizes):
    groups = [RowGroupRef(f"s{index % 3}.parquet", index, rows) for index, rows in enumerate(sizes)]
    for epoch in range(3):
        ordered = epoch_order(groups, seed=11, epoch=epoch, shuffle=True)
        seen: list[tuple[int, int]] = []
        shares = []
        for rank in range(world_size):
            slices = rank_slices(ordered, rank, world_size)
            shares.append(sum(piece.stop - piece.start for piece in slices))
            seen += [(piece.group.index, row) for piece in slices for row in range(piece.start, piece.stop)]
        every_row = [(group.index, row) for group in groups for row in range(group.num_rows)]
        assert sorted(seen) == sorted(every_row)  # each row exactly once
        assert max(shares) - min(shares) <= 1 and min(shares) == sum(sizes) // world_size


def test_epoch_order_is_shared_by_ranks_and_changes_between_epochs():
    groups = [RowGroupRef("s.parquet", index, 10) for index in range(20)]
    assert epoch_order(groups, 3, 1, True) == epoch_order(groups, 3, 1, True)
    assert epoch_order(groups, 3, 1, True) != epoch_order(groups, 3, 2, True)
    assert epoch_order(groups, 3, 1, False) == groups
    with pytest.raises(ValueError, match="rank 3"):
        rank_slices(groups, 3, 3)


@pytest.fixture(scope="module")
def numbered_dataset(tmp_path_factory):
    """1,000 8x8 PNGs whose pixels spell their row number, in shards of uneven row counts and row groups."""
    uri = str(tmp_path_factory.mktemp("rowgroups") / "ds")
    classes = [f"c{index}" for index in range(7)]
    rng = np.random.default_rng(0)
    with DatasetWriter(uri, "numbered", classes, split_kind="rows", target_shard_bytes=90_000) as writer:
        for number in range(1000):
            pixels = np.zeros((8, 8, 3), np.uint8)
            pixels[..., 0], pixels[..., 1] = number % 256, number // 256
            pixels[..., 2] = rng.integers(0, 255, (8, 8)) if number % 3 else 0  # uneven byte sizes
            writer.write("train", image=encode_png(pixels), class_name=classes[number % 7], source=str(number),
                         height=8, width=8, encoding="png")
    row_groups = [pq.ParquetFile(f"{uri}/{shard.path}").metadata.num_row_groups for shard in writer.manifest.shards]
    assert len(row_groups) > 1 and max(row_groups) > 1  # several shards, some with several row groups
    return uri


def numbers_of(batch) -> list[int]:
    image = batch["image"].numpy()
    return (image[:, 0, 0, 0].astype(int) + 256 * image[:, 0, 0, 1].astype(int)).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_streams_of_all_ranks_read_every_row_once(numbered_dataset, world_size):
    streams = [LocalBatchStream(numbered_dataset, "train", batch_size=32, image_size=8, rank=rank,
                                world_size=world_size, drop_last=False, seed=5, decode_threads=1)
               for rank in range(world_size)]
    for _ in range(2):  # two epochs: a new order, still every row once
        numbers, labels_ok = [], True
        for stream in streams:
            for batch in stream:
                numbers += numbers_of(batch)
                labels_ok &= bool((batch["label"].numpy() == np.array(numbers_of(batch)) % 7).all())
        assert sorted(numbers) == list(range(1000))
        assert labels_ok


def test_ranks_take_equal_steps_and_shuffle(numbered_dataset):
    streams = [LocalBatchStream(numbered_dataset, "train", batch_size=64, image_size=8, rank=rank, world_size=3)
               for rank in range(3)]
    counts = [sum(1 for _ in stream) for stream in streams]
    assert counts == [len(streams[0])] * 3 == [(1000 // 3) // 64] * 3
    first_epoch = [numbers_of(batch) for batch in streams[0]]
    assert all(len(batch) == 64 for batch in first_epoch)
    flat = [number for batch in first_epoch for number in batch]
    assert flat != sorted(flat)  # shuffled within windows, not in storage order


def test_a_resumed_stream_reads_the_epoch_it_is_set_to(numbered_dataset):
    """A restarted worker builds a new stream and sets the epoch it resumes at: it must read exactly what
    the uninterrupted stream read in that epoch (same row-group order, same shuffle), not epoch 0 again."""
    def stream():
        return LocalBatchStream(numbered_dataset, "train", batch_size=32, image_size=8, rank=1, world_size=2,
                                seed=9, decode_threads=1, label_column=None)

    uninterrupted = stream()
    epochs = [[numbers_of(batch) for batch in uninterrupted] for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    resumed = stream()
    resumed.set_epoch(1)
    assert [numbers_of(batch) for batch in resumed] == epochs[1]
    assert [numbers_of(batch) for batch in resumed] == epochs[2]  # and then moves on by itself
    fresh = stream()
    batch = next(iter(fresh))
    assert (batch["label"] == -1).all()  # no label column asked for (DINO's unlabelled input)
