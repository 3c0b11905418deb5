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


def decoded_rows(uri: str, split: str) -> list[dict]:
    return read_split(uri, split, columns=("image", "label", "source")).map_batches(
        DecodeImages(16), batch_size=4).take_all()


@pytest.mark.ray
@pytest.mark.s3
def test_ray_data_stream_reads_every_image_locally_and_from_s3(fewshot_folder, ray_cluster, s3_bucket):
    uri, written = fewshot_folder
    # Oracle: the 14 images this test wrote. Train (3 classes) and test (1) together hold each exactly once.
    local_rows = decoded_rows(str(uri), "train")
    heldout_rows = decoded_rows(str(uri), "test")
    local_sources = [row["source"] for row in local_rows]
    assert sorted(local_sources + [row["source"] for row in heldout_rows]) == sorted(written)
    train_classes = {source.split("/")[0] for source in local_sources}
    assert len(train_classes) == 3 and not train_classes & {row["source"].split("/")[0] for row in heldout_rows}
    assert sorted(local_sources) == sorted(path for path in written if path.split("/")[0] in train_classes)
    labels_by_class = {(row["source"].split("/")[0], int(row["label"])) for row in local_rows}
    assert len(labels_by_class) == 3 and {label for _, label in labels_by_class} == {0, 1, 2}
    for row in local_rows:
        assert row["image"].shape == (16, 16, 3)
        # The Ray Data path decodes with the batched fast path (batch_decode.py): the careful path's pixels
        # within one grey level of resize rounding (torch's uint8 kernel vs PIL's).
        difference = np.abs(row["image"].astype(int) - decode_resized(written[row["source"]], 16))
        assert difference.max() <= 1

    ingest("imagefolder", str(uri.parent / "src"), f"s3://{s3_bucket}/ds", IngestOptions(seed=1),
           split_classes=(3, 1))
    remote_rows = decoded_rows(f"s3://{s3_bucket}/ds", "train")
    # Every local row has its S3 twin: same count and sources first, so an empty or partial read fails.
    assert sorted(row["source"] for row in remote_rows) == sorted(local_sources)

    def key(row):
        return row["source"]

    for local_row, remote_row in zip(sorted(local_rows, key=key), sorted(remote_rows, key=key), strict=True):
        assert local_row["source"] == remote_row["source"] and local_row["label"] == remote_row["label"]
        np.testing.assert_array_equal(local_row["image"], remote_row["image"])
