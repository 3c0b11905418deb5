"""Datasets on an S3-compatible store (moto on 127.0.0.1): identical round trips and clear failures."""

import os

import pytest

from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.manifest import read_manifest
from metallo_core.data.shards import read_split_table, verify_dataset
from metallo_core.errors import DataError, StorageError
from tests.image_fixtures import make_image_folder

pytestmark = pytest.mark.s3


def test_imagefolder_on_s3_reads_back_identical_to_local(tmp_path, s3_bucket):
    written = make_image_folder(tmp_path / "src", {"a": 3, "b": 2, "c": 2})
    options = IngestOptions()
    local = ingest("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds"), options, split_classes=(2, 1))
    remote = ingest("imagefolder", str(tmp_path / "src"), f"s3://{s3_bucket}/ds", options, split_classes=(2, 1))
    assert remote.splits == local.splits
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards]
    verify_dataset(f"s3://{s3_bucket}/ds")
    for split in local.splits:
        remote_table = read_split_table(f"s3://{s3_bucket}/ds", split)
        assert remote_table.equals(read_split_table(str(tmp_path / "ds"), split))
        assert set(remote_table.column("image").to_pylist()) <= set(written.values())
    assert read_manifest(f"s3://{s3_bucket}/ds").summary() == local.summary()


def test_interrupted_s3_write_never_looks_complete(tmp_path, s3_bucket):
    make_image_folder(tmp_path / "src", {"a": 2})
    (tmp_path / "src" / "a" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError):
        ingest("imagefolder", str(tmp_path / "src"), f"s3://{s3_bucket}/ds", IngestOptions())
    with pytest.raises(DataError, match="never finished|no dataset"):
        read_manifest(f"s3://{s3_bucket}/ds")


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at endpoint http://127.0.0.1"):
        read_manifest("s3://no-such-bucket/ds")


def test_unreachable_endpoint_names_endpoint_and_variable(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9.*AWS_ENDPOINT_URL"):
        read_manifest("s3://some-bucket/ds")


def test_credentials_never_reach_messages(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError) as error:
        read_manifest("s3://some-bucket/ds")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(error.value)
