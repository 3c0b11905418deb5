"""The experiment grid on Ray Tune: parallel trials, one child MLflow run each under a parent, tables logged."""

import json

import pytest

from metallo_core import tracking
from metallo_core.config import from_dict
from metallo_core.data.synth_dataset import write_nfurcated
from metallo_core.multilabel.config import ExperimentsConfig
from metallo_core.tuning.multilabel_grid import run_experiments

pytestmark = pytest.mark.ray


def test_grid_runs_as_tune_trials_logged_as_child_runs_of_one_parent(tmp_path, ray_cluster):
    data = tmp_path / "nfurcated"
    write_nfurcated(str(data), images_per_combination=2, size=32, seed=1)  # 140 images
    config = from_dict(ExperimentsConfig, {
        "data": {"uri": str(data), "image_size": 16},
        "backbone": {"source": "scratch", "arch": "resnet18", "small_input": True},
        "optim": {"max_epochs": 3},
        "test_fractions": [0.5],
        "variants": [
            {"name": "bifurcated-fc100", "properties": ["morphology", "volume_fraction_class"], "fc_width": 100},
            {"name": "cnn", "properties": ["morphology", "volume_fraction"], "encoder": "small_cnn",
             "fc_width": 16, "max_epochs": 2},
        ],
        "cnn": {"channels": [4, 8]},
        "tune": {"max_concurrent_trials": 2},
    })
    result = run_experiments(config)

    assert not result.failed_trials
    assert [(row["variant"], row["test_fraction"], row["num_train"]) for row in result.rows] == [
        ("bifurcated-fc100", 0.5, 70), ("cnn", 0.5, 70)]
    assert result.rows[0]["epochs_trained"] == 3 and result.rows[1]["epochs_trained"] == 2
    assert "error/volume_fraction" in result.rows[1] and "error/volume_fraction_class" not in result.rows[1]
    assert result.feature_cache and "RANDOM-INIT" in result.backbone

    client = tracking.client()
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(run.info.run_id for run in children) == sorted(row["run_id"] for row in result.rows)
    assert all(run.info.status == "FINISHED" for run in children)
    assert {run.data.tags["metallo.variant"] for run in children} == {"bifurcated-fc100", "cnn"}
    history = client.get_metric_history(result.rows[0]["run_id"], "cumulative_error")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]

    artifacts = tracking.local_home() / "artifacts"
    tables = next(artifacts.rglob("seed002_tables.md")).read_text()
    assert "### bifurcated-fc100" in tables and "### cnn: small CNN from scratch" in tables
    logged = json.loads(next(artifacts.rglob("seed002_results.json")).read_text())
    assert len(logged["rows"]) == 2
