"""Datasets on an S3-compatible store (moto on 127.0.0.1): identical round trips and clear failures."""

import os

import pytest

from metallo_core.data import shards
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.manifest import MANIFEST_NAME, read_manifest
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


def s3_keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    listing = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(
        Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_interrupted_s3_write_never_looks_complete(tmp_path, s3_bucket, monkeypatch):
    """Shards reach S3 and the write stops before the manifest (as a kill between the two would): the
    remains must read as an unfinished dataset, not as "nothing there" and not as a dataset."""
    make_image_folder(tmp_path / "src", {"a": 3, "b": 3})

    def killed_before_the_manifest(root, manifest):
        raise KeyboardInterrupt("killed between the last shard and the manifest")

    monkeypatch.setattr(shards, "commit_manifest", killed_before_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        ingest("imagefolder", str(tmp_path / "src"), f"s3://{s3_bucket}/ds", IngestOptions(), split_classes=(1, 1))
    keys = s3_keys(s3_bucket, "ds/")
    assert [key for key in keys if key.endswith(".parquet")], keys  # data did reach S3
    assert f"ds/{MANIFEST_NAME}" not in keys
    with pytest.raises(DataError, match="has no manifest.json: the dataset was never finished"):
        read_manifest(f"s3://{s3_bucket}/ds")
    with pytest.raises(DataError, match="never finished"):
        verify_dataset(f"s3://{s3_bucket}/ds")

    # A write that fails on a corrupt image: its in-progress marker is in S3, so it too reads as unfinished.
    monkeypatch.undo()
    (tmp_path / "src" / "a" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="bad.png"):
        ingest("imagefolder", str(tmp_path / "src"), f"s3://{s3_bucket}/failed", IngestOptions())
    assert s3_keys(s3_bucket, "failed/") and f"failed/{MANIFEST_NAME}" not in s3_keys(s3_bucket, "failed/")
    with pytest.raises(DataError, match="never finished"):
        read_manifest(f"s3://{s3_bucket}/failed")
    # Guard: where nothing reached S3 the message is a different one, so the checks above can tell.
    with pytest.raises(DataError, match="no dataset at .*does not exist or is empty"):
        read_manifest(f"s3://{s3_bucket}/never-written")


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at endpoint http://127.0.0.1"):
        read_manifest("s3://no-such-bucket/ds")


def test_unreachable_endpoint_names_endpoint_and_variable(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9.*AWS_ENDPOINT_URL"):
        read_manifest("s3://some-bucket/ds")


def test_credentials_never_reach_messages(monkeypatch, authenticating_s3_server):
    """The secret is used on the watched path: the request is signed with it, reaches a server that checks
    credentials, and is refused. The message says so, names the variables, and never shows the secret."""
    secret = "s3-test-secret-that-must-not-leak"
    monkeypatch.setenv("AWS_ENDPOINT_URL", authenticating_s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTISSUEDBYMOTO2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StorageError) as error:
        read_manifest("s3://some-bucket/ds")
    message = str(error.value)
    assert "the credentials were refused" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert secret not in message and "AKIDNOTISSUEDBYMOTO2" not in message
