"""Session-wide fixtures: one loopback S3-compatible server and one local Ray cluster per test session."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# The repository root: tests open shipped files (configs, manifests) from here, never by a path relative
# to the working directory, so `pytest /path/to/repo/tests/...` works from any directory.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Workers must run the same interpreter as the tests, not a `uv run` re-launch with a copied working dir.
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray gives its dashboard 60 s to come up; on a loaded 2-core machine it can need more, and the session's
# Ray (and every Ray test) then fails to start. Wait longer rather than fail for a slow start.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
# Never reach a real MLflow server or store from tests.
os.environ.pop("MLFLOW_TRACKING_URI", None)


# The fixtures that start the session's shared components, and the marker of each: `-m "not ray and not s3"`
# (the fast tier) leaves out every test that uses one, also where its module does not say so.
COMPONENT_MARKERS = {"ray_cluster": "ray", "s3_server": "s3", "s3_bucket": "s3", "authenticating_s3_server": "s3"}


def pytest_collection_modifyitems(items):
    for item in items:
        for marker in sorted({COMPONENT_MARKERS[name] for name in getattr(item, "fixturenames", ())
                              if name in COMPONENT_MARKERS}):
            item.add_marker(marker)
    # Tests that start a Ray cluster of their own run first, before the session's cluster exists: two clusters
    # on two cores slow each other's every step (the e2e pipeline took 583 s beside the session's, 328 s alone).
    items.sort(key=lambda item: item.get_closest_marker("own_ray_cluster") is None)  # stable: order kept otherwise


@pytest.fixture
def restore_console(monkeypatch):
    """`main` configures this process's console (metallo_core.console); undo it for the next tests."""
    for name in ("METALLO_VERBOSE", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                 "RAY_DATA_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")  # recorded, so the test's value is undone afterwards
        monkeypatch.delenv(name)
    root, package = logging.getLogger(), logging.getLogger("metallo_core")
    saved = (root.level, list(root.handlers), package.level)
    yield
    root.setLevel(saved[0])
    root.handlers = saved[1]
    package.setLevel(saved[2])


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions run fastest on one thread; on shared, busy cores extra threads mostly wait."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (absolute)."""
    return REPO_ROOT


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


@pytest.fixture
def authenticating_s3_server(tmp_path):
    """A moto server process that checks credentials (it accepts none but the ones it issued); yields its
    endpoint. A request signed with any other key pair reaches it and is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    with open(tmp_path / "moto.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError as exc:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"moto did not start: {(tmp_path / 'moto.log').read_text()[-2000:]}") from exc
                time.sleep(0.3)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=20)


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
