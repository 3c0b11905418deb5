"""No MLflow credential is written anywhere: with a tracking URI that holds `user:password@` and a password in
MLFLOW_TRACKING_PASSWORD, `metallo evaluate` (on the session's Ray cluster) and `metallo report --log` against a
loopback `mlflow server` leave neither secret in the server's store (params, tags, model versions), its
artifacts (config.yaml, summary.json, the logged report, ...), the report's files, the commands' output (what
`ray job logs` shows of a job: all this process writes to its stdout and stderr) or the Ray session's log files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from metallo_core.models.backbones import BackboneSpec
from tests.fewshot_fixtures import TINY_SPEC, register_untrained_protonet, write_tiny_fewshot

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
URI_SECRET = "uri-pw-7f3c1e9a"  # in the tracking URI's user:password@ part
ENV_SECRET = "env-pw-b84d2f60"  # in MLFLOW_TRACKING_PASSWORD
SECRETS = (URI_SECRET, ENV_SECRET)


@pytest.fixture
def mlflow_server(tmp_path):
    """A loopback `mlflow server` (sqlite store, artifacts served from a local folder); yields (its address, the
    folder holding everything it stored)."""
    state = tmp_path / "mlflow-server"
    state.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(tmp_path / "mlflow-server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
             "--artifacts-destination", str(state / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield address, state
    finally:
        server.terminate()
        server.wait(timeout=60)


def leaks_in_files(root: Path) -> list[str]:
    """'<file>: <secret>' for every file under `root` that holds a secret (as bytes: databases and binaries too)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            data = path.read_bytes()
        except OSError:  # a socket or a file removed while walking
            continue
        found += [f"{path}: {secret}" for secret in SECRETS if secret.encode() in data]
    return found


def run_cli(arguments: list[str], capfd) -> str:
    """`metallo <arguments>` in this process (a job's entrypoint is the same `main`); what it wrote to stdout and
    stderr, the file descriptors themselves (MLflow and Ray write there too)."""
    from metallo_core.cli import main

    capfd.readouterr()
    code = main(arguments)
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert code == 0, output[-5000:]
    return output


def test_no_credential_reaches_runs_artifacts_reports_or_logs(mlflow_server, ray_cluster, tmp_path, monkeypatch,
                                                              capfd, restore_console):
    address, server_state = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://metallo:{URI_SECRET}@{address}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "metallo")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
    data = write_tiny_fewshot(tmp_path)
    register_untrained_protonet(BackboneSpec(**TINY_SPEC))  # through the server, as a stage would register it

    outputs = {
        "metallo evaluate": run_cli(["evaluate", "--config", str(REPO / "configs/evaluate/tiny_cpu.yaml"),
                                     f"data.uri={data}", "model=models:/metallo-protonet@current", "tasks=4",
                                     "modes=[protonet]", "select_on_val=false", "episodes.query=5", "parallelism=1",
                                     "run_name=credentials"], capfd),
        "metallo report": run_cli(["report", "--experiment", "metallo-evaluate", "--out", str(tmp_path / "report"),
                                   "--log"], capfd),
    }
    # The commands did talk to the server: their runs, artifacts and the report are there to be searched.
    stored = {path.name for path in server_state.rglob("*") if path.is_file()}
    assert {"config.yaml", "summary.json", "report.html", "report.md"} <= stored, sorted(stored)
    assert (tmp_path / "report" / "report.html").is_file()

    leaks = [f"{command} output: {line.strip()}" for command, text in outputs.items()
             for line in text.splitlines() if any(secret in line for secret in SECRETS)]
    leaks += leaks_in_files(server_state)  # params, tags, model versions (the database) and every artifact
    leaks += leaks_in_files(tmp_path / "report")
    leaks += leaks_in_files(tmp_path / "metallo-home")  # anything written to the local home
    import ray

    session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # the session cluster's own logs
    leaks += leaks_in_files(session_logs)
    assert not leaks, "\n".join(leaks)
