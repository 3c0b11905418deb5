"""metallo_core.tracking: the embedded store, config logging, rank-0-only logging, run status."""

from pathlib import Path

import pytest

from metallo_core import tracking


@pytest.fixture
def local_store(isolated_tracking):
    return isolated_tracking


def test_embedded_default_is_an_absolute_sqlite_store(local_store):
    uri = tracking.configure()
    assert uri == f"sqlite:///{local_store / 'mlflow.db'}"
    assert (local_store / "mlflow.db").parent.is_dir()


def test_run_logs_config_metrics_and_status(local_store):
    config = {"data": {"uri": "s3://bucket/ds"}, "epochs": 3}
    with tracking.start_run("unit", "first", config=config, tags={"stage": "test"}) as run:
        run.log_metrics({"loss": 1.5, "lr": 0.1}, step=2)
        run_id = run.run_id
    stored = tracking.client().get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"data.uri": "s3://bucket/ds", "epochs": "3"}
    assert stored.data.tags["stage"] == "test"
    assert stored.data.tags["metallo.version"].startswith("0.1.0")
    history = tracking.client().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.5)]
    artifacts = [a.path for a in tracking.client().list_artifacts(run_id)]
    assert "config.yaml" in artifacts
    experiment = tracking.client().get_experiment(stored.info.experiment_id)
    assert experiment.artifact_location.startswith((local_store / "artifacts").as_uri())


def test_failed_body_marks_run_failed(local_store):
    with pytest.raises(ValueError):
        with tracking.start_run("unit", "broken") as run:
            run_id = run.run_id
            raise ValueError("boom")
    assert tracking.client().get_run(run_id).info.status == "FAILED"


def test_only_rank_zero_logs(local_store, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert isinstance(tracking.logger_for("abc"), tracking.NullLogger)
    tracking.logger_for("abc").log_metrics({"loss": 1.0})  # does nothing, raises nothing
    monkeypatch.setenv("RANK", "0")
    assert isinstance(tracking.logger_for("abc"), tracking.RunLogger)


def test_unreachable_server_fails_fast_naming_the_variable(monkeypatch):
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, "http://127.0.0.1:9")
    with pytest.raises(tracking.TrackingError, match=r"127\.0\.0\.1:9 cannot be reached.*MLFLOW_TRACKING_URI"):
        tracking.configure()


def test_a_lookup_never_creates_a_store_and_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.ENV_HOME)
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.lookup_client()
    message = str(caught.value)
    assert f"no MLflow store at {tmp_path / 'metallo-runs' / 'mlflow.db'}" in message
    assert f"working directory {tmp_path}" in message and "METALLO_HOME=" in message and "MLFLOW_TRACKING_URI=" in message
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, f"file://{tmp_path / 'mlruns'}")
    with pytest.raises(tracking.TrackingError, match=r"mlruns.*\(from MLFLOW_TRACKING_URI\)"):
        tracking.configure(create=False)
    assert list(tmp_path.iterdir()) == []


def test_a_store_that_exists_is_found_by_lookups(local_store):
    tracking.configure()  # a writer creates the store
    tracking.client().create_experiment("unit")
    assert tracking.lookup_client().get_experiment_by_name("unit") is not None


@pytest.mark.parametrize("uri, path", [
    ("sqlite:////abs/metallo-runs/mlflow.db", "/abs/metallo-runs/mlflow.db"),
    ("file:///abs/mlruns", "/abs/mlruns"),
    ("http://mlflow:5000", None),
])
def test_local_store_paths(uri, path):
    assert tracking.local_store_path(uri) == (None if path is None else Path(path))
