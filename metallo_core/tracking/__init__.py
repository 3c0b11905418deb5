"""The one place that configures MLflow: where runs go, how configs/metrics/artifacts are logged, the registry.

Embedded default: a sqlite store and an artifact folder under `./metallo-runs/` (absolute paths, since
Ray workers run in other directories), or the server named by `MLFLOW_TRACKING_URI`. Only rank 0 of
a distributed job logs; other ranks get a logger that does nothing. No other module creates runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from metallo_core.config import flatten, to_yaml
from metallo_core.errors import TrackingError

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_HOME = "METALLO_HOME"
MAX_PARAM_LENGTH = 6000


def local_home() -> Path:
    """Where embedded-default runs, artifacts and checkpoints live (`$METALLO_HOME` or ./metallo-runs)."""
    return Path(os.environ.get(ENV_HOME) or Path.cwd() / "metallo-runs").resolve()


def tracking_uri() -> str:
    uri = os.environ.get(ENV_TRACKING_URI)
    if uri:
        return uri
    return f"sqlite:///{local_home() / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local store lives in (sqlite database, file store), None for a server."""
    if uri.startswith("sqlite:"):
        path = uri.removeprefix("sqlite:").removeprefix("//").removeprefix("/")
        # sqlite:////abs/x -> /abs/x (absolute); sqlite:///rel/x -> rel/x (relative to the working directory)
        return Path(path) if uri.startswith("sqlite:////") or path.startswith("/") else Path(path).resolve()
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" not in uri:
        return Path(uri).expanduser().resolve()
    return None


def describe_store() -> str:
    """Where look-ups go and why, for error messages: the URI and the setting it came from."""
    uri = tracking_uri()
    if os.environ.get(ENV_TRACKING_URI):
        return f"{uri} (from {ENV_TRACKING_URI})"
    if os.environ.get(ENV_HOME):
        return f"{uri} (from {ENV_HOME}={os.environ[ENV_HOME]})"
    return f"{uri} ({ENV_HOME} and {ENV_TRACKING_URI} unset: ./metallo-runs under the working directory {Path.cwd()})"


def how_to_point_at_a_store() -> str:
    return (f"point metallo at the store that holds it: run from the folder that holds metallo-runs/, or set "
            f"{ENV_HOME}=/path/to/metallo-runs, or {ENV_TRACKING_URI}=sqlite:////path/to/metallo-runs/mlflow.db "
            "(or a server's http://host:port)")


def require_existing_store(uri: str | None = None) -> None:
    """Fail, creating nothing, when a local store does not exist: a look-up (a model, a run) can only find
    what is already stored, and MLflow would otherwise create an empty store wherever it was pointed."""
    uri = uri or tracking_uri()
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise TrackingError(f"no MLflow store at {path}: looked in {describe_store()}; nothing was created. "
                            + how_to_point_at_a_store())


_configured_uri: str | None = None


def configure(*, create: bool = True) -> str:
    """Point MLflow at the tracking store, export it for Ray workers, and fail fast if a server is unreachable.

    `create=False` is for look-ups (loading a model, reading a run): a local store that does not exist
    is an error naming where it was looked for (see `require_existing_store`) instead of a new empty store."""
    global _configured_uri
    import mlflow

    uri = tracking_uri()
    if not create:
        require_existing_store(uri)
    if uri.startswith("sqlite:") and create:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")) and _configured_uri != uri:
        check_server(uri)
    mlflow.set_tracking_uri(uri)
    os.environ[ENV_TRACKING_URI] = uri  # Ray workers and subprocesses log to the same place
    _configured_uri = uri
    return uri


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an unreachable server or refused credentials. `/health` stays open under basic auth,
    so the probe is an authenticated read (one experiment), sent with the credentials MLflow would use."""
    import base64

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if username and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingError(
                f"MLflow server {uri} refused the credentials (HTTP {exc.code}); set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from exc
        problem = f"answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = f"cannot be reached ({getattr(exc, 'reason', exc)})"
    raise TrackingError(
        f"MLflow server {uri} {problem}; check {ENV_TRACKING_URI} (unset it to use the local sqlite store "
        f"under {local_home()})"
    )


def client(*, create: bool = True):
    """An MlflowClient on the configured store; `create=False` for look-ups (see `configure`)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=configure(create=create))


def lookup_client():
    """A client for reading what is stored (models, runs): never creates a store."""
    return client(create=False)


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if needed (artifacts in the local home for local stores)."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if is_local_store(tracking_uri()):
        artifact_location = (local_home() / "artifacts" / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first (mlflow#4123)
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def is_rank_zero() -> bool:
    """True outside distributed jobs and on rank 0 inside them."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")) == 0


class RunLogger:
    """Logs to one MLflow run by id (safe from any process and thread, no global active run)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._mlflow_client = None

    @property
    def _client(self):
        if self._mlflow_client is None:
            self._mlflow_client = client()
        return self._mlflow_client

    @property
    def enabled(self) -> bool:
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), timestamp, step or 0)
            for key, value in metrics.items()
            if value is not None
        ]
        for start in range(0, len(entries), 1000):
            self._client.log_batch(self.run_id, metrics=entries[start:start + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(entries), 100):
            self._client.log_batch(self.run_id, params=entries[start:start + 100])

    def log_config(self, config: Any) -> None:
        """The whole config: flattened as params (searchable) and as config.yaml (reproducible)."""
        self.log_params(flatten(config))
        self.log_text(to_yaml(config), "config.yaml")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / Path(artifact_file).name
            figure.savefig(path, dpi=120, bbox_inches="tight")
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)


class NullLogger:
    """What ranks other than 0 get: every call does nothing."""

    run_id = None
    enabled = False

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def logger_for(run_id: str | None) -> RunLogger | NullLogger:
    """A logger for `run_id` on rank 0; a NullLogger elsewhere or when there is no run."""
    if run_id is None or not is_rank_zero():
        return NullLogger()
    return RunLogger(run_id)


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    *,
    config: Any = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Create a run, log its config and tags, and close it FINISHED, or FAILED if the body raises."""
    mlflow_client = client()
    all_tags = {"metallo.version": _code_version(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(ensure_experiment(experiment), run_name=run_name, tags=all_tags)
    logger = RunLogger(run.info.run_id)
    if config is not None:
        logger.log_config(config)
    try:
        yield logger
    except BaseException:
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        raise
    mlflow_client.set_terminated(run.info.run_id, status="FINISHED")


RUN_NAME_TAG = "metallo.run_name"


@contextmanager
def open_run(
    experiment: str,
    run_name: str,
    *,
    config: Any = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Like `start_run`, but a run that was started before under the same name is reopened, so a
    resumed job keeps logging into the run it began (its config and tags are logged only once)."""
    mlflow_client = client()
    experiment_id = ensure_experiment(experiment)
    previous = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", order_by=["start_time DESC"],
        max_results=1,
    )
    if not previous:
        with start_run(experiment, run_name, config=config, tags={RUN_NAME_TAG: run_name, **(tags or {})},
                       parent_run_id=parent_run_id) as run:
            yield run
        return
    run_id = previous[0].info.run_id
    mlflow_client.update_run(run_id, status="RUNNING")
    logger = RunLogger(run_id)
    try:
        yield logger
    except BaseException:
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise
    mlflow_client.set_terminated(run_id, status="FINISHED")


def run_url(run_id: str) -> str:
    """Where a person finds the run: the server's page, or the command that opens the local UI."""
    uri = tracking_uri()
    mlflow_client = client()
    run = mlflow_client.get_run(run_id)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"run {run_id} in experiment {run.info.experiment_id}; open with: {ui_command()}"


def ui_command() -> str:
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        return f"uv run mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _code_version() -> str:
    """The package version, plus the git commit when running from a checkout (lineage for models)."""
    import subprocess

    from metallo_core import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


code_version = _code_version
