"""Runs: opening one (new, or reopened by name when a job resumes), and logging to it by run id from any
process. Only rank 0 of a distributed job logs; other ranks get a logger that does nothing."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metallo_core.config import flatten, to_yaml
from metallo_core.tracking.datasets import log_dataset_input
from metallo_core.tracking.store import client, ensure_experiment

MAX_PARAM_LENGTH = 6000
RUN_NAME_TAG = "metallo.run_name"


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
        """Log every metric that is not None at `step` (0 if None); MlflowClient splits big batches itself."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step or 0)
                   for key, value in metrics.items() if value is not None]
        self._client.log_batch(self.run_id, metrics=entries)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params as strings (lists and dicts as JSON, cut to MAX_PARAM_LENGTH characters)."""
        from mlflow.entities import Param

        self._client.log_batch(self.run_id, params=[Param(key, _param_value(value)) for key, value in params.items()])

    def log_config(self, config: Any) -> None:
        """The whole config: flattened as params (searchable) and as config.yaml (reproducible)."""
        self.log_params(flatten(config))
        self.log_text(to_yaml(config), "config.yaml")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

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
    """Create a run, log its config and tags, and close it FINISHED, or FAILED if the body raises.

    Tags that name a dataset (`tracking.dataset_tags`) also log it as the run's MLflow dataset input."""
    mlflow_client = client()
    all_tags = {"metallo.version": code_version(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(ensure_experiment(experiment), run_name=run_name, tags=all_tags)
    log_dataset_input(mlflow_client, run.info.run_id, all_tags)
    logger = RunLogger(run.info.run_id)
    if config is not None:
        logger.log_config(config)
    with _closed_with_status(mlflow_client, run.info.run_id):
        yield logger


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
    resumed job keeps logging into the run it began (its config, tags and dataset input are logged once)."""
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
    with _closed_with_status(mlflow_client, run_id):
        yield RunLogger(run_id)


@contextmanager
def _closed_with_status(mlflow_client, run_id: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise
    mlflow_client.set_terminated(run_id, status="FINISHED")


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout (lineage for models)."""
    import subprocess

    from metallo_core import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            check=False,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__
