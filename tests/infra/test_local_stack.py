"""The local stack, started once for this module with the guide's own command: S3 through boto3 and
through metallo_core.storage, MLflow artifacts landing in the S3 store through the server, a real
`ray job submit` with readable logs and no credential in `ray job list`, and a `down` that leaves no
process behind."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from infra.local_stack import (
    LOOPBACK_TEST_ACCESS_KEY_ID,
    LOOPBACK_TEST_SECRET_ACCESS_KEY,
    LocalStack,
    _session_members,
)
from metallo_core import tracking
from metallo_core.storage import locate
from tests.infra import JOB_FOLLOW, JOB_LIST, JOB_SUBMIT, LOCAL_STACK, REPO

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.own_ray_cluster]

BIN = Path(sys.executable).parent


def _command(text: str) -> list[str]:
    """A guide command run with this interpreter's environment instead of `uv run --frozen`."""
    words = shlex.split(text)
    if words[:3] == ["uv", "run", "--frozen"]:
        words = words[3:]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    return [str(BIN / words[0]), *words[1:]]


def _run(words: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`python -m infra.local_stack up` in a state dir of its own; yields (stack, the env it printed)."""
    state_dir = tmp_path_factory.mktemp("local-stack")
    up = _run(_command(f"{LOCAL_STACK} up --state-dir {state_dir} --num-cpus 2"), timeout=400)
    if up.returncode != 0:
        logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in (state_dir / "logs").glob("*.log"))
        pytest.fail(f"local stack did not start (rc {up.returncode}):\n{up.stdout}\n{up.stderr}\n{logs}")
    printed = {}
    for line in up.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            printed[key] = shlex.split(value)[0] if value else ""
    running = LocalStack.attach(state_dir)
    yield running, printed, up.stdout
    running.stop()  # a no-op when test_down_stops_everything ran


@pytest.fixture
def client_env(stack, monkeypatch):
    """This process as a client of the stack (what `eval "$(... env)"` does in a shell)."""
    running, printed, _ = stack
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in running.env().items():
        monkeypatch.setenv(key, value)
    return {**os.environ}


def test_up_prints_loopback_endpoints_and_the_env_clients_need(stack):
    running, printed, stdout = stack
    assert printed == running.env()
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert printed.get(key), f"`up` did not print {key}"
    for key in ("RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        assert printed[key].startswith("http://127.0.0.1:"), printed[key]
    assert printed["RAY_ADDRESS"].startswith("127.0.0.1:")  # the GCS address a driver joins
    assert printed["RAY_AUTH_MODE"] == "token"
    assert Path(printed["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0, "the Ray token file must be private"
    token = Path(printed["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert token not in stdout
    # `env` and `status` read the same state.
    env_output = _run(_command(f"{LOCAL_STACK} env --state-dir {running.state_dir}"))
    assert env_output.returncode == 0 and env_output.stdout == running.env_script()
    status = _run(_command(f"{LOCAL_STACK} status --state-dir {running.state_dir}"))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" up ") == 3


def test_a_second_up_on_the_same_state_refuses(stack):
    running, _, _ = stack
    again = _run(_command(f"{LOCAL_STACK} up --state-dir {running.state_dir}"))
    assert again.returncode == 2
    assert "already running" in again.stderr


def test_s3_round_trip_through_boto3_and_metallo_storage(client_env):
    client = boto3.client("s3")  # endpoint and keys from the environment, as any tool would get them
    payload = uuid.uuid4().bytes * 1000
    client.put_object(Bucket="metallo-data", Key="stack-test/from-boto3.bin", Body=payload)
    assert locate("s3://metallo-data/stack-test/from-boto3.bin").read_bytes() == payload

    locate("s3://metallo-runs/ray/stack-test/from-metallo.bin").write_bytes(payload[::-1])
    body = client.get_object(Bucket="metallo-runs", Key="ray/stack-test/from-metallo.bin")["Body"].read()
    assert body == payload[::-1]
    assert "from-metallo.bin" in locate("s3://metallo-runs/ray/stack-test").list_files()


def test_mlflow_artifacts_go_through_the_server_into_the_s3_store(client_env, monkeypatch):
    # The client holds no S3 settings at all: with --serve-artifacts the server writes to the store.
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    marker = uuid.uuid4().hex
    with tracking.start_run("local-stack-test", "artifact-check") as run:
        run.log_metrics({"answer": 42.0})
        run.log_text(f"served artifact {marker}", "notes/hello.txt")
    artifact_uri = tracking.client().get_run(run.run_id).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri

    s3 = boto3.client("s3", endpoint_url=client_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=LOOPBACK_TEST_ACCESS_KEY_ID,
                      aws_secret_access_key=LOOPBACK_TEST_SECRET_ACCESS_KEY)
    keys = [item["Key"]
            for item in s3.list_objects_v2(Bucket="metallo-mlflow", Prefix="artifacts/").get("Contents", [])]
    landed = [key for key in keys if key.endswith(f"{run.run_id}/artifacts/notes/hello.txt")]
    assert landed, f"artifact not in s3://metallo-mlflow/artifacts: {keys}"
    assert s3.get_object(Bucket="metallo-mlflow", Key=landed[0])["Body"].read() == f"served artifact {marker}".encode()


JOB_SCRIPT = (
    "import json, os, metallo_core; "
    "from metallo_core.storage import locate; "
    "locate('s3://metallo-runs/ray').check_access(); "
    "print('JOB-RESULT', json.dumps({'module': metallo_core.__file__, "
    "'tracking': os.environ.get('MLFLOW_TRACKING_URI'), "
    "'has_s3_keys': bool(os.environ.get('AWS_SECRET_ACCESS_KEY'))}))"
)


def test_ray_job_submit_runs_the_uploaded_code_with_the_nodes_settings(stack, client_env):
    running, _, _ = stack
    submission_id = f"stack-test-{uuid.uuid4().hex[:8]}"
    submit = _run([*_command(" ".join(JOB_SUBMIT)), "--submission-id", submission_id, "--",
                   "python", "-c", JOB_SCRIPT], env=client_env)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    logs = _run(_command(" ".join(JOB_FOLLOW)) + [submission_id], env=client_env)
    assert logs.returncode == 0, logs.stderr[-2000:]
    result_line = next(line for line in logs.stdout.splitlines() if line.startswith("JOB-RESULT "))
    result = json.loads(result_line.removeprefix("JOB-RESULT "))
    # The job imported the uploaded working dir, not the installed package...
    assert "/runtime_resources/working_dir_files/_ray_pkg_" in result["module"]
    # ...and reached MLflow and S3 with settings that live on the node, not in the submission.
    assert result["tracking"] == running.env()["MLFLOW_TRACKING_URI"]
    assert result["has_s3_keys"] is True

    listing = _run(_command(" ".join(JOB_LIST)), env=client_env)
    assert listing.returncode == 0 and submission_id in listing.stdout
    token = Path(running.env()["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    for secret in (LOOPBACK_TEST_SECRET_ACCESS_KEY, LOOPBACK_TEST_ACCESS_KEY_ID, token):
        assert secret not in listing.stdout + listing.stderr
        assert secret not in submit.stdout + submit.stderr


def test_job_submission_without_the_token_is_refused(stack, client_env):
    """The dashboard refuses a client without the token (401) and one with a wrong token (403), with Ray's
    own messages (ray/dashboard/http_server_head.py), and serves the same command given the right one."""
    without_token = {**client_env, "RAY_AUTH_MODE": "disabled"}
    without_token.pop("RAY_AUTH_TOKEN_PATH")
    listing = _run(_command(" ".join(JOB_LIST)), env=without_token, timeout=120)
    assert listing.returncode != 0
    assert "Missing authentication token" in listing.stdout + listing.stderr, listing.stderr[-2000:]

    wrong = "0123456789abcdef" * 2
    wrong_token = {**without_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": wrong}
    listing = _run(_command(" ".join(JOB_LIST)), env=wrong_token, timeout=120)
    assert listing.returncode != 0
    assert "Invalid authentication token" in listing.stdout + listing.stderr, listing.stderr[-2000:]
    assert wrong not in listing.stdout + listing.stderr

    listing = _run(_command(" ".join(JOB_LIST)), env=client_env, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_down_stops_everything_it_started(stack):
    running, _, _ = stack
    members = {pid for leader in running.pids.values() for pid in _session_members(leader)}
    assert len(members) >= 5, "expected moto, mlflow and Ray's processes"
    ports = [running.ports.s3, running.ports.mlflow, running.ports.ray_dashboard, running.ports.ray_gcs]
    ray_temp_dir = Path(running.ray_temp_dir)

    down = _run(_command(f"{LOCAL_STACK} down --state-dir {running.state_dir}"), timeout=120)
    assert down.returncode == 0, down.stderr

    survivors = [pid for pid in members if Path(f"/proc/{pid}").exists() and _alive(pid)]
    assert not survivors, f"processes left behind: {survivors}"
    assert not any(_listening(port) for port in ports)
    assert not ray_temp_dir.exists()
    assert not (running.state_dir / "state.json").exists()
    assert _run(_command(f"{LOCAL_STACK} down --state-dir {running.state_dir}")).returncode == 0  # idempotent


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, waiting for a parent that is not us to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
