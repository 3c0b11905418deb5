"""Session-wide fixtures: one loopback S3-compatible server and one local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest

# Workers must run the same interpreter as the tests, not a `uv run` re-launch with a copied working dir.
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Never reach a real MLflow server or store from tests.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with dummy credentials; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields its name."""
    import boto3

    name = "metallo-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session (started after the S3 server so workers inherit its settings).

    Four logical CPUs on a 2-core machine: Ray Data needs CPUs left over while Train workers hold theirs.
    """
    import ray

    from metallo_core.train.ray_setup import WORKER_SETUP_HOOK

    ray.init(
        num_cpus=4,
        runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK},
        # The dashboard's state API is how Ray Train's PlacementGroupCleaner sees that a controller died:
        # without it, the worker groups of trials that Tune stops early (ASHA) are never released and the
        # next trials wait for CPUs forever.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path, monkeypatch):
    """Every test gets its own local MLflow store and run storage, and no tracking server from the environment."""
    from metallo_core import tracking

    monkeypatch.setenv(tracking.ENV_HOME, str(tmp_path / "metallo-home"))
    monkeypatch.delenv(tracking.ENV_TRACKING_URI, raising=False)
    yield tmp_path / "metallo-home"
    # configure() exports the URI for Ray workers; do not let it leak into the next test.
    monkeypatch.delenv(tracking.ENV_TRACKING_URI, raising=False)
