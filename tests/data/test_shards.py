"""The shard format: round trips, rollover, manifest-last, and every way a dataset can be broken."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from metallo_core.data.images import encode_png
from metallo_core.data.manifest import MANIFEST_NAME, read_manifest
from metallo_core.data.shards import WRITING_MARKER, DatasetWriter, read_split_table, verify_dataset
from metallo_core.errors import DataError


def write_rows(writer, split, class_name, count, start=0):
    written = []
    for i in range(start, start + count):
        data = encode_png(np.full((8, 8), i % 256, dtype=np.uint8))
        writer.write(split, image=data, class_name=class_name, source=f"{class_name}/{i}", height=8, width=8,
                     encoding="png")
        written.append(data)
    return written


def small_dataset(path, **kwargs):
    writer = DatasetWriter(str(path), "tiny", ["a", "b", "c"], split_kind="classes",
                           split_classes={"train": ["a", "b"], "test": ["c"]}, **kwargs)
    with writer:
        images = write_rows(writer, "train", "a", 5) + write_rows(writer, "train", "b", 4, 100)
        write_rows(writer, "test", "c", 3, 200)
    return writer.manifest, images


def test_round_trip_and_manifest(tmp_path):
    manifest, train_images = small_dataset(tmp_path / "ds")
    assert manifest.split_kind == "classes"
    assert manifest.splits["train"].counts == {"a": 5, "b": 4}
    assert manifest.splits["test"].classes == ["c"]
    assert manifest.num_images == 12 and manifest.image_encoding == "png"
    table = read_split_table(str(tmp_path / "ds"), "train")
    assert table.column("image").to_pylist() == train_images
    assert table.column("label").to_pylist() == [0] * 5 + [1] * 4
    assert table.column("class_name").to_pylist() == ["a"] * 5 + ["b"] * 4
    assert not (tmp_path / "ds" / WRITING_MARKER).exists()
    assert read_manifest(str(tmp_path / "ds")).to_json() == manifest.to_json()


def test_shards_roll_over_and_row_groups_stay_small(tmp_path):
    writer = DatasetWriter(str(tmp_path / "ds"), "big", ["a"], split_kind="rows", target_shard_bytes=20_000)
    with writer:
        for i in range(3000):
            data = np.random.default_rng(i).integers(0, 255, 64, dtype=np.uint8).tobytes()
            writer.write("train", image=data, class_name="a", source=str(i), height=8, width=8, encoding="png")
    shards = writer.manifest.shards
    assert len(shards) > 3
    assert sum(s.num_rows for s in shards) == 3000
    metadata = pq.ParquetFile(tmp_path / "ds" / shards[0].path).metadata
    assert max(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) <= 256
    assert len(read_split_table(str(tmp_path / "ds"), "train")) == 3000


def test_failed_write_leaves_no_manifest_and_is_reported(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(str(tmp_path / "ds"), "x", ["a"], split_kind="rows") as writer:
            write_rows(writer, "train", "a", 300)
            raise RuntimeError("interrupted")
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()
    with pytest.raises(DataError, match="never finished"):
        read_manifest(str(tmp_path / "ds"))
    # The remains of an interrupted write are cleared by the next write.
    manifest, _ = small_dataset(tmp_path / "ds")
    assert manifest.num_images == 12


def test_refuses_to_overwrite_a_finished_dataset(tmp_path):
    small_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="already holds a dataset.*--overwrite"):
        small_dataset(tmp_path / "ds")
    manifest, _ = small_dataset(tmp_path / "ds", overwrite=True)
    assert manifest.num_images == 12


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a metallo dataset.*notes.txt"):
        small_dataset(tmp_path / "ds")


def test_checksum_mismatch_names_the_shard(tmp_path):
    manifest, _ = small_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / manifest.shards_of("train")[0].path
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name}.*does not match its checksum"):
        verify_dataset(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="does not match its checksum"):
        read_split_table(str(tmp_path / "ds"), "train")
    assert len(read_split_table(str(tmp_path / "ds"), "test")) == 3  # other shards still read


def test_truncated_and_missing_shards(tmp_path):
    manifest, _ = small_dataset(tmp_path / "ds")
    train_shard = tmp_path / "ds" / manifest.shards_of("train")[0].path
    train_shard.write_bytes(train_shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        verify_dataset(str(tmp_path / "ds"), checksums=False)
    (tmp_path / "ds" / manifest.shards_of("test")[0].path).unlink()
    with pytest.raises(DataError, match="missing"):
        read_split_table(str(tmp_path / "ds"), "test")


def test_missing_split_lists_the_existing_ones(tmp_path):
    small_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="no split 'val'.*train, test"):
        read_split_table(str(tmp_path / "ds"), "val")


def test_empty_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="'c' have no readable image"):
        with DatasetWriter(str(tmp_path / "ds"), "x", ["a", "c"], split_kind="rows") as writer:
            write_rows(writer, "train", "a", 2)
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


def test_class_disjoint_splits_must_not_share_classes(tmp_path):
    with pytest.raises(DataError, match="'a' appears in splits"):
        with DatasetWriter(str(tmp_path / "ds"), "x", ["a"], split_kind="classes") as writer:
            write_rows(writer, "train", "a", 2)
            write_rows(writer, "test", "a", 2)


def test_manifest_from_another_tool_or_version(tmp_path):
    small_dataset(tmp_path / "ds")
    path = tmp_path / "ds" / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="schema version 99"):
        read_manifest(str(tmp_path / "ds"))
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(str(tmp_path / "ds"))


def test_no_dataset_at_path(tmp_path):
    with pytest.raises(DataError, match="no dataset at"):
        read_manifest(str(tmp_path / "nothing"))
