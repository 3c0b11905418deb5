"""infra/bootstrap_storage.py against moto on 127.0.0.1: idempotent creation, a real access probe, and
failures that name the endpoint and the variable to fix without ever showing a credential."""

from __future__ import annotations

import os

import boto3
import pytest

from infra import bootstrap_storage
from metallo_core.errors import StorageError
from metallo_core.storage import locate

pytestmark = pytest.mark.s3


def _locations(prefix: str) -> dict[str, str]:
    return {
        "data": f"s3://{prefix}-data",
        "runs": f"s3://{prefix}-runs/ray",
        "mlflow": f"s3://{prefix}-mlflow/artifacts",
    }


def test_creates_buckets_and_prefixes_then_finds_them_on_a_second_run(s3_server):
    locations = _locations("boot-idem")
    first = bootstrap_storage.bootstrap(locations)
    second = bootstrap_storage.bootstrap(locations)

    assert [report.bucket_state for report in first.locations] == ["created"] * 3
    assert [report.bucket_state for report in second.locations] == ["existed"] * 3
    for report in second.locations:
        assert report.checks == ["write:ok", "read:ok", "list:ok", "delete:ok"]
    client = boto3.client("s3", endpoint_url=s3_server)
    for uri in locations.values():
        bucket = uri.removeprefix("s3://").split("/")[0]
        keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not [key for key in keys if ".metallo-probe-" in key], "the probe object was left behind"
    # The prefix marker makes a run-storage location "exist" for the project's own storage layer.
    assert locate(locations["runs"]).exists()
    assert "storage ready" in second.text()


def test_check_mode_creates_nothing_and_names_the_missing_bucket(s3_server):
    with pytest.raises(StorageError,
                       match=r"s3://boot-absent-data.*does not exist at endpoint http://127\.0\.0\.1.*without --check"):
        bootstrap_storage.bootstrap(_locations("boot-absent"), create=False)
    names = [bucket["Name"] for bucket in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]]
    assert "boot-absent-data" not in names


def test_cli_prints_a_report_without_credentials(s3_server, capsys):
    locations = _locations("boot-cli")
    argv = [f"--{role}={uri}" for role, uri in locations.items()]
    assert bootstrap_storage.main(argv) == 0
    printed = capsys.readouterr().out
    assert "endpoint http://127.0.0.1" in printed and "credentials from: env" in printed
    assert "s3://boot-cli-runs/ray" in printed
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in printed
    assert os.environ["AWS_ACCESS_KEY_ID"] not in printed


def test_unreachable_endpoint_names_endpoint_and_variable(s3_server, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    assert bootstrap_storage.main([]) == 2
    error = capsys.readouterr().err
    assert "nothing answers at endpoint http://127.0.0.1:9 (from AWS_ENDPOINT_URL)" in error
    assert "check AWS_ENDPOINT_URL" in error
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in error


def test_the_client_gives_up_in_seconds_not_minutes(s3_server):
    config = bootstrap_storage.s3_client().meta.config
    assert config.connect_timeout <= 5 and config.retries["total_max_attempts"] <= 3


def test_service_specific_endpoint_variable_is_the_one_named(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9 \(from AWS_ENDPOINT_URL_S3\).*check AWS_ENDPOINT_URL_S3"):
        bootstrap_storage.bootstrap(_locations("boot-s3var"))


def test_missing_credentials_say_which_variables_to_set(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        bootstrap_storage.bootstrap(_locations("boot-nocreds"))


# authenticating_s3_server: tests/conftest.py


def test_refused_credentials_name_the_variables_and_never_the_secret(authenticating_s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", authenticating_s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTISSUEDBYMOTO1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-for-this-test")
    with pytest.raises(StorageError) as error:
        bootstrap_storage.bootstrap(_locations("boot-denied"))
    message = str(error.value)
    assert "the credentials were refused" in message
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    assert authenticating_s3_server in message
    assert "wrong-secret-value-for-this-test" not in message
