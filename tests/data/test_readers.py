"""Readers: the in-memory class-indexed reader, and the Ray Data stream (local and S3)."""

import numpy as np
import pytest

from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.data.images import decode_resized
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.stream import DecodeImages, read_split
from metallo_core.errors import DataError
from tests.image_fixtures import make_image_folder


@pytest.fixture
def fewshot_folder(tmp_path):
    written = make_image_folder(tmp_path / "src", {"a": 3, "b": 4, "c": 5, "d": 2})
    ingest("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds"), IngestOptions(seed=1), split_classes=(3, 1))
    return tmp_path / "ds", written


def test_class_indexed_reader(fewshot_folder):
    uri, written = fewshot_folder
    reader = ClassIndexedImages.load(str(uri), "train", image_size=16)
    assert reader.images.shape == (len(reader), 16, 16, 3) and reader.images.dtype == np.uint8
    assert reader.num_classes == 3
    for class_id, name in enumerate(reader.class_names):
        indices = reader.indices_of(class_id)
        assert {reader.sources[i].split("/")[0] for i in indices} == {name}
        assert len(indices) == sum(1 for path in written if path.startswith(name + "/"))
    first = 0
    np.testing.assert_array_equal(reader.images[first], decode_resized(written[reader.sources[first]], 16))


def test_class_indexed_reader_rejects_unknown_label_column(fewshot_folder):
    uri, _ = fewshot_folder
    with pytest.raises(DataError, match="no label column"):
        ClassIndexedImages.load(str(uri), "train", image_size=16, extra_columns=("morphology",))


@pytest.mark.ray
@pytest.mark.s3
def test_ray_data_stream_reads_every_image_locally_and_from_s3(fewshot_folder, ray_cluster, s3_bucket):
    uri, written = fewshot_folder
    local_rows = read_split(str(uri), "train", columns=("image", "label", "source")).map_batches(
        DecodeImages(16), batch_size=4).take_all()
    assert len(local_rows) == sum(1 for r in read_split(str(uri), "train").iter_rows())
    assert all(row["image"].shape == (16, 16, 3) for row in local_rows)
    for row in local_rows:
        np.testing.assert_array_equal(row["image"], decode_resized(written[row["source"]], 16))

    ingest("imagefolder", str(uri.parent / "src"), f"s3://{s3_bucket}/ds", IngestOptions(seed=1),
           split_classes=(3, 1))
    remote_rows = read_split(f"s3://{s3_bucket}/ds", "train", columns=("image", "label", "source")).map_batches(
        DecodeImages(16), batch_size=4).take_all()
    key = lambda row: row["source"]  # noqa: E731
    for local_row, remote_row in zip(sorted(local_rows, key=key), sorted(remote_rows, key=key)):
        assert local_row["source"] == remote_row["source"] and local_row["label"] == remote_row["label"]
        np.testing.assert_array_equal(local_row["image"], remote_row["image"])
