"""The cluster path on one machine: an S3-compatible store (moto), an MLflow tracking server (sqlite
backend, artifacts served from the store) and a Ray head with its dashboard, all on 127.0.0.1.

    uv run --frozen python -m infra.local_stack up       # start, wait until healthy, create buckets, print the env
    eval "$(uv run --frozen python -m infra.local_stack env)"
    uv run --frozen python -m infra.local_stack status
    uv run --frozen python -m infra.local_stack down     # stop what `up` started, and nothing else

From Python (tests): `with LocalStack(state_dir) as stack: subprocess.run(..., env={**os.environ, **stack.env()})`.

Like a real cluster, the MLflow and S3 settings live in the Ray head's environment, which every job
and worker inherits; `ray job submit` carries none of them. Ports are picked free, so several stacks
(parallel CI jobs) can run side by side; `down` stops only the process sessions this stack started
(never `ray stop`, which would end every Ray cluster of the user on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from infra.bootstrap_storage import DEFAULT_LOCATIONS

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
# Test-only values for a moto server on loopback, which accepts any key pair. They open nothing;
# real credentials never come near this stack (inherited AWS_* variables are dropped).
LOOPBACK_TEST_ACCESS_KEY_ID = "metallo-loopback-test-key-id"
LOOPBACK_TEST_SECRET_ACCESS_KEY = "metallo-loopback-test-secret"

STATE_FILE = "state.json"
ENV_FILE = "env.sh"
SERVICES = ("s3", "mlflow", "ray")  # start order; stopped in reverse
# Inherited settings that would point the stack's processes somewhere else (or at real accounts).
_DROPPED_PREFIXES = ("AWS_", "MLFLOW_", "RAY_")
_DROPPED_NAMES = ("METALLO_HOME",)


class LocalStackError(RuntimeError):
    """A component did not start or stop; the message names it and its log file."""


def default_state_dir() -> Path:
    """`$METALLO_LOCAL_STACK_DIR`, else ~/.local/state/metallo/local-stack (outside the repo, so
    `ray job submit --working-dir .` never uploads its logs and databases)."""
    configured = os.environ.get("METALLO_LOCAL_STACK_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return (base / "metallo" / "local-stack").resolve()


@dataclass
class Ports:
    s3: int
    mlflow: int
    ray_gcs: int
    ray_dashboard: int
    ray_client: int
    ray_node_manager: int
    ray_object_manager: int
    ray_agent_listen: int
    ray_agent_grpc: int
    ray_runtime_env_agent: int
    ray_metrics: int

    @classmethod
    def pick(cls) -> Ports:
        """Distinct ports the kernel reports free on loopback (all held open until all are chosen)."""
        sockets = []
        try:
            for _ in cls.__dataclass_fields__:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((LOOPBACK, 0))
                sockets.append(sock)
            return cls(*(sock.getsockname()[1] for sock in sockets))
        finally:
            for sock in sockets:
                sock.close()


class LocalStack:
    """Start, check and stop the three servers; `env()` is what clients (ray CLI, boto3, mlflow) need."""

    def __init__(self, state_dir: str | os.PathLike | None = None, *, num_cpus: int = 4,
                 auth_mode: str = "token", object_store_mb: int = 512, start_timeout_s: float = 180.0):
        if auth_mode not in ("token", "disabled"):
            raise ValueError(f"auth_mode must be 'token' or 'disabled', not {auth_mode!r}")
        self.state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
        self.num_cpus = num_cpus
        self.auth_mode = auth_mode
        self.object_store_mb = object_store_mb
        self.start_timeout_s = start_timeout_s
        self.ports: Ports | None = None
        self.pids: dict[str, int] = {}
        self.ray_temp_dir: str | None = None
        self._processes: dict[str, subprocess.Popen] = {}  # only for a stack this process started

    # ---------------------------------------------------------------- public API

    def start(self) -> LocalStack:
        """Start all three, wait until each answers, create the buckets, write state and env files."""
        if (self.state_dir / STATE_FILE).exists():
            previous = LocalStack.attach(self.state_dir)
            if any(previous.status().values()):
                raise LocalStackError(
                    f"a local stack is already running from {self.state_dir}; run `python -m infra.local_stack "
                    "down` first, or use another --state-dir"
                )
            previous.stop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.ports = Ports.pick()
        # Ray's socket paths must stay under 108 bytes, so its temp dir is short and outside the state dir.
        self.ray_temp_dir = tempfile.mkdtemp(prefix="mls-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        if self.auth_mode == "token":
            self._write_token()
        try:
            self._launch("s3", self._s3_command(), self._server_env())
            self._launch("mlflow", self._mlflow_command(), self._mlflow_env())
            self._launch("ray", self._ray_command(), self._ray_env())
            self._write_state()
            deadline = time.monotonic() + self.start_timeout_s
            self._wait("s3", f"{self.endpoints()['s3']}/", deadline)
            self._bootstrap_buckets()
            self._wait("mlflow", f"{self.endpoints()['mlflow']}/health", deadline)
            self._wait("ray", f"{self.endpoints()['ray_dashboard']}/api/jobs/", deadline, self._ray_headers())
            self._write_env_file()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[int]:
        """Stop every process this stack started (Ray first: its jobs may still write to MLflow and S3).

        Returns the pids that had to be killed with SIGKILL after the grace period (for diagnostics)."""
        forced: list[int] = []
        for name in reversed(SERVICES):
            pid = self.pids.get(name)
            if pid:
                forced += _end_session(pid, grace_s=20.0 if name == "ray" else 8.0, leader_first=name == "ray")
            process = self._processes.pop(name, None)
            if process is not None:  # already reaped above; this only settles the Popen object
                try:
                    process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
        if self.ray_temp_dir and Path(self.ray_temp_dir).name.startswith("mls-ray-"):
            shutil.rmtree(self.ray_temp_dir, ignore_errors=True)
        for name in (STATE_FILE, ENV_FILE, "ray_auth_token"):
            (self.state_dir / name).unlink(missing_ok=True)
        self.pids = {}
        return forced

    def status(self) -> dict[str, bool]:
        """Whether each component's process session is alive and its endpoint answers."""
        if not self.ports:
            return {name: False for name in SERVICES}
        urls = {
            "s3": f"{self.endpoints()['s3']}/",
            "mlflow": f"{self.endpoints()['mlflow']}/health",
            "ray": f"{self.endpoints()['ray_dashboard']}/api/jobs/",
        }
        headers = {"ray": self._ray_headers()}
        return {
            name: bool(self.pids.get(name)) and bool(_session(self.pids[name]))
            and _answers(urls[name], headers.get(name, {}))
            for name in SERVICES
        }

    def endpoints(self) -> dict[str, str]:
        ports = self._require_ports()
        return {
            "s3": f"http://{LOOPBACK}:{ports.s3}",
            "mlflow": f"http://{LOOPBACK}:{ports.mlflow}",
            "ray_dashboard": f"http://{LOOPBACK}:{ports.ray_dashboard}",
            "ray_gcs": f"{LOOPBACK}:{ports.ray_gcs}",
        }

    def env(self) -> dict[str, str]:
        """The variables a client needs: `ray job` commands (RAY_API_SERVER_ADDRESS, the dashboard), drivers
        started by hand (RAY_ADDRESS, the head's GCS address, which ray.init() accepts), boto3, pyarrow via
        metallo_core.storage, and MLflow (artifacts go through the server, so no S3 settings needed there)."""
        endpoints = self.endpoints()
        env = {
            "RAY_API_SERVER_ADDRESS": endpoints["ray_dashboard"],
            "RAY_ADDRESS": endpoints["ray_gcs"],
            "RAY_AUTH_MODE": self.auth_mode,
            "MLFLOW_TRACKING_URI": endpoints["mlflow"],
            "AWS_ENDPOINT_URL": endpoints["s3"],
            "AWS_ACCESS_KEY_ID": LOOPBACK_TEST_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": LOOPBACK_TEST_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if self.auth_mode == "token":
            env["RAY_AUTH_TOKEN_PATH"] = str(self.state_dir / "ray_auth_token")
        return env

    def buckets(self) -> dict[str, str]:
        return dict(DEFAULT_LOCATIONS)

    @classmethod
    def attach(cls, state_dir: str | os.PathLike | None = None) -> LocalStack:
        """The stack described by a state file (what `status`/`env`/`down` use)."""
        directory = Path(state_dir).resolve() if state_dir else default_state_dir()
        path = directory / STATE_FILE
        if not path.exists():
            raise LocalStackError(f"no local stack state at {path}; start one with `python -m infra.local_stack up`")
        state = json.loads(path.read_text())
        stack = cls(directory, num_cpus=state["num_cpus"], auth_mode=state["auth_mode"],
                    object_store_mb=state["object_store_mb"])
        stack.ports = Ports(**state["ports"])
        stack.pids = {name: int(pid) for name, pid in state["pids"].items()}
        stack.ray_temp_dir = state.get("ray_temp_dir")
        return stack

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---------------------------------------------------------------- commands and environments

    def _s3_command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self._require_ports().s3)]

    def _mlflow_command(self) -> list[str]:
        ports = self._require_ports()
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination", DEFAULT_LOCATIONS["mlflow"],
            "--serve-artifacts",
            "--host", LOOPBACK,
            "--port", str(ports.mlflow),
            "--workers", "1",
        ]

    def _ray_command(self) -> list[str]:
        ports = self._require_ports()
        return [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--node-ip-address", LOOPBACK,
            "--port", str(ports.ray_gcs),
            "--dashboard-host", LOOPBACK,
            "--dashboard-port", str(ports.ray_dashboard),
            "--include-dashboard", "true",
            "--ray-client-server-port", str(ports.ray_client),
            "--node-manager-port", str(ports.ray_node_manager),
            "--object-manager-port", str(ports.ray_object_manager),
            "--dashboard-agent-listen-port", str(ports.ray_agent_listen),
            "--dashboard-agent-grpc-port", str(ports.ray_agent_grpc),
            "--runtime-env-agent-port", str(ports.ray_runtime_env_agent),
            "--metrics-export-port", str(ports.ray_metrics),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--temp-dir", str(self.ray_temp_dir),
            "--disable-usage-stats",
        ]

    def _server_env(self) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items()
            if not key.startswith(_DROPPED_PREFIXES) and key not in _DROPPED_NAMES
        }
        # `python`, `ray` and `mlflow` in jobs resolve to this environment's, as on a cluster node.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update({
            "AWS_ACCESS_KEY_ID": LOOPBACK_TEST_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": LOOPBACK_TEST_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def _mlflow_env(self) -> dict[str, str]:
        env = self._server_env()
        env["MLFLOW_S3_ENDPOINT_URL"] = self.endpoints()["s3"]
        # The server-side job runner (GenAI scorers; metallo uses none) would add seven worker processes.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        return env

    def _ray_env(self) -> dict[str, str]:
        """What the head (and so every job and worker) sees: the node-level settings of a real cluster."""
        env = self._server_env()
        endpoints = self.endpoints()
        env.update({
            "AWS_ENDPOINT_URL": endpoints["s3"],
            "MLFLOW_TRACKING_URI": endpoints["mlflow"],
            "METALLO_HOME": str(self.state_dir / "metallo-home"),  # absolute: jobs run in copied working dirs
            "RAY_AUTH_MODE": self.auth_mode,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray turns --node-ip-address 127.0.0.1 into the host's routable address unless told this is
            # a single-machine cluster (the switch is named for Windows/macOS); then it binds loopback only.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # No Serve replicas to drain: on SIGTERM stop at once instead of waiting 30 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        })
        if self.auth_mode == "token":
            env["RAY_AUTH_TOKEN_PATH"] = str(self.state_dir / "ray_auth_token")
        return env

    # ---------------------------------------------------------------- mechanics

    def _require_ports(self) -> Ports:
        if self.ports is None:
            raise LocalStackError("the local stack is not started")
        return self.ports

    def _write_token(self) -> None:
        path = self.state_dir / "ray_auth_token"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))

    def _ray_headers(self) -> dict[str, str]:
        path = self.state_dir / "ray_auth_token"
        if self.auth_mode != "token" or not path.exists():
            return {}
        return {"Authorization": f"Bearer {path.read_text().strip()}"}

    def _log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def _launch(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with open(self._log_path(name), "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command, env=env, cwd=self.state_dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,  # its own session: stopped as a unit
            )
        self.pids[name] = process.pid
        self._processes[name] = process

    def _wait(self, name: str, url: str, deadline: float, headers: dict[str, str] | None = None) -> None:
        process = self._processes.get(name)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise LocalStackError(
                    f"{name} exited with code {process.returncode} while starting; see {self._log_path(name)}:\n"
                    + _tail(self._log_path(name))
                )
            if _answers(url, headers or {}):
                return
            time.sleep(0.5)
        raise LocalStackError(
            f"{name} did not answer at {url} within {self.start_timeout_s:.0f} s; see {self._log_path(name)}:\n"
            + _tail(self._log_path(name))
        )

    def _bootstrap_buckets(self) -> None:
        from infra import bootstrap_storage

        overrides = {key: value for key, value in self.env().items() if key.startswith("AWS_")}
        cleared = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION")
        saved = {key: os.environ.get(key) for key in (*overrides, *cleared)}
        for key in cleared:
            os.environ.pop(key, None)
        os.environ.update(overrides)
        try:
            report = bootstrap_storage.bootstrap(DEFAULT_LOCATIONS)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        (self.state_dir / "logs" / "bootstrap.log").write_text(report.text() + "\n")

    def _write_state(self) -> None:
        state = {
            "ports": asdict(self._require_ports()),
            "pids": self.pids,
            "ray_temp_dir": self.ray_temp_dir,
            "num_cpus": self.num_cpus,
            "auth_mode": self.auth_mode,
            "object_store_mb": self.object_store_mb,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def _write_env_file(self) -> None:
        (self.state_dir / ENV_FILE).write_text(self.env_script())

    def env_script(self) -> str:
        lines = [f"# metallo local stack ({self.state_dir}); test-only values for loopback servers"]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in self.env().items()]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- processes (psutil)

def _session(leader: int) -> list[psutil.Process]:
    """Live processes of the session `leader` started: it and every descendant that did not call setsid.

    By session rather than by parent links: a process whose parent died first (Ray's workers when the
    raylet stops) is re-parented out of the tree but stays in the session. Zombies are left out: they hold
    nothing, and their parent reaps them."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):  # gone meanwhile, or not ours to inspect
            continue
    return members


def _session_members(leader: int) -> list[int]:
    """The pids of `_session(leader)`."""
    return [process.pid for process in _session(leader)]


def _end_session(leader: int, grace_s: float, leader_first: bool = False) -> list[int]:
    """Stop every process of the session `leader` started; the pids that needed SIGKILL.

    With `leader_first`, the leader alone gets SIGTERM first so it can stop its children in order
    (`ray start --block` stops the raylet before the GCS); the rest of the session gets SIGTERM after."""
    deadline = time.monotonic() + grace_s
    if leader_first:
        head = [process for process in _session(leader) if process.pid == leader]
        _send(head, signal.SIGTERM)
        _wait_gone(head, time.monotonic() + grace_s * 0.75)
    members = _session(leader)
    _send(members, signal.SIGTERM)
    _wait_gone(members, deadline)
    forced = _session(leader)  # also any process started while the others stopped
    _send(forced, signal.SIGKILL)
    _wait_gone(forced, time.monotonic() + 5)
    return [process.pid for process in forced]


def _send(processes: list[psutil.Process], signum: int) -> None:
    """Signal each process; psutil checks first that the pid was not reused by another process."""
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.Error:  # already gone
            pass


def _wait_gone(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until each process has exited (reaping our own children, so none lingers as a zombie) or
    the deadline passes; those still running."""
    alive = list(processes)
    while alive:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, alive = psutil.wait_procs(alive, timeout=min(left, 0.5))
        # A zombie whose parent is not this process is dead already: psutil would wait for its reaping.
        alive = [process for process in alive if _running(process)]
    return alive


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _answers(url: str, headers: dict[str, str]) -> bool:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local_stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "env", "status"))
    parser.add_argument("--state-dir", default=None, help=f"where state, logs and the env file live "
                                                          f"(default {default_state_dir()})")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head (default 4)")
    parser.add_argument("--auth-mode", choices=("token", "disabled"), default="token",
                        help="Ray token authentication (default token); clients get the same RAY_AUTH_MODE")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            started = time.monotonic()
            stack = LocalStack(args.state_dir, num_cpus=args.num_cpus, auth_mode=args.auth_mode).start()
            endpoints = stack.endpoints()
            print(f"# local stack up in {time.monotonic() - started:.0f} s (state and logs: {stack.state_dir})")
            print(f"#   S3 (moto)      {endpoints['s3']}   buckets: "
                  + ", ".join(f"{role}={uri}" for role, uri in stack.buckets().items()))
            print(f"#   MLflow UI      {endpoints['mlflow']}")
            print(f"#   Ray dashboard  {endpoints['ray_dashboard']}   (GCS {endpoints['ray_gcs']})")
            print(f"# use it:  eval \"$(uv run --frozen python -m infra.local_stack env)\"   "
                  f"or  source {stack.state_dir / ENV_FILE}")
            print(stack.env_script(), end="")
        elif args.action == "env":
            print(LocalStack.attach(args.state_dir).env_script(), end="")
        elif args.action == "status":
            stack = LocalStack.attach(args.state_dir)
            health = stack.status()
            endpoints = stack.endpoints()
            urls = {"s3": endpoints["s3"], "mlflow": endpoints["mlflow"], "ray": endpoints["ray_dashboard"]}
            for name in SERVICES:
                print(f"{name:<7} {'up' if health[name] else 'DOWN':<5} {urls[name]}  pid {stack.pids.get(name)}")
            return 0 if all(health.values()) else 1
        elif args.action == "down":
            try:
                stack = LocalStack.attach(args.state_dir)
            except LocalStackError:
                print("no local stack is running")
                return 0
            forced = stack.stop()
            print("local stack stopped" + (f" (killed after the grace period: {forced})" if forced else ""))
    except LocalStackError as exc:
        print(f"local_stack: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
