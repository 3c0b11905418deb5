"""The two Ray Tune searches end to end on tiny synthetic data and CPU: ASHA over meta-training runs
(each trial a Ray Train run), and an Optuna search over fine-tuning
run again with changed settings, its state on the S3-compatible store.

Checked: the best trial is the one with the best meta-val accuracy; MLflow holds one parent run and one
child run per trial with params and metric curves; the best config is written (beside the search's state
and where asked) and loads; the final test runs on the parent run. Resuming after a killed driver, and a
finished search run again, are tests/tuning/test_hard_kill.py."""

from pathlib import Path

import pytest

from metallo_core import tracking
from metallo_core.config import load_config
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.models.backbones import BackboneSpec
from metallo_core.storage import locate
from metallo_core.tracking.backbone_store import resolve_version
from metallo_core.tuning.config import FinetuneSearchConfig, MetaTrainSearchConfig
from metallo_core.tuning.finetune_search import run_finetune_search
from metallo_core.tuning.metatrain_search import run_metatrain_search
from metallo_core.tuning.search_runs import FINAL_TEST_TAG, TRIAL_TAG
from tests.fewshot_fixtures import TINY_SPEC, register_untrained_protonet, write_tiny_fewshot

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SPEC = TINY_SPEC


@pytest.fixture(scope="module")
def fewshot_data(tmp_path_factory):
    return write_tiny_fewshot(tmp_path_factory.mktemp("fewshot"))


def search_runs(experiment: str):
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parents, children


def test_metatrain_search_asha_picks_the_best_trial_and_tracks_every_trial(fewshot_data, ray_cluster, tmp_path):
    config = load_config(MetaTrainSearchConfig, REPO / "tuning/configs/metatrain_tiny_cpu.yaml", [
        f"base.data.uri={fewshot_data}",
        "base.backbone.source=scratch",
        *[f"base.backbone.{key}={value}" for key, value in SPEC.items()],
        "base.episodes.query=5",
        "base.episodes_per_epoch=8",
        "base.val_episodes=12",
        "search.name=mt-test",
        f"search.best_config_out={tmp_path / 'best.yaml'}",
        "final_test.tasks=10",
        "final_test.query=5",
    ])
    assert config.search.num_samples == 4 and config.base.epochs == 2  # 2 ASHA rungs: epoch 1 and epoch 2
    # Four fixed trials, good and destructive in turn (two at a time), so that ASHA's decisions do not
    # hang on chance: Adam at lr 1.0 wrecks a scratch ResNet within an epoch (at 0.1 it did in bf16, not in
    # fp32), SGD at 0.05 and 0.1 learns. At the first rung (reduction factor 2) a trial goes on only if it is
    # not below the median of those that reached it: both SGD trials always go on (>= 2 finish), and an Adam
    # trial that reaches the rung after an SGD one (the 4th always does, the 2nd nearly always) is stopped.
    # The two SGD trials differ in lr: two identical trials train identically in fp32 and tie exactly.
    config.space = {"optim.name": {"choice": ["sgd", "adamw"]}, "optim.lr": {"choice": [0.05, 0.1, 1.0]},
                    "episodes.shot": {"choice": [1, 5]}}
    destroys = {"optim.name": "adamw", "optim.lr": 1.0, "episodes.shot": 5}
    config.search.points_to_evaluate = [{"optim.name": "sgd", "optim.lr": 0.05, "episodes.shot": 5}, destroys,
                                        {"optim.name": "sgd", "optim.lr": 0.1, "episodes.shot": 5}, destroys]
    result = run_metatrain_search(config)

    parents, children = search_runs("metallo-tune")
    assert [parent.info.run_id for parent in parents] == [result.parent_run_id]
    assert len(children) == 4
    assert {child.data.tags["mlflow.parentRunId"] for child in children} == {result.parent_run_id}
    client = tracking.client()
    best_by_trial = {}
    for child in children:
        epochs = [m.value for m in client.get_metric_history(child.info.run_id, "epochs_done")]
        curve = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert len(curve) == len(epochs) and epochs[0] == 1, epochs
        assert "optim.lr" in child.data.params and "episodes.shot" in child.data.params
        completed = child.data.tags["metallo.tune.status"] == "completed"
        if completed:  # ran both rungs
            assert child.info.status == "FINISHED" and epochs == [1, 2]
        else:  # ASHA stopped it at the first rung (the trial was killed mid-run: its run could not close itself)
            assert child.data.tags["metallo.tune.status"] == "stopped early" and child.info.status == "KILLED"
        best_by_trial[child.data.tags[TRIAL_TAG]] = (max(point.value for point in curve), completed)
    finished = {trial: value for trial, (value, completed) in best_by_trial.items() if completed}
    # "Picks the best" means something only if ASHA chose: it stopped a trial and >= 2 ran to the end.
    assert len(finished) >= 2 and len(best_by_trial) - len(finished) >= 1, best_by_trial
    # The best of the finished curves (a tie is broken by the search's own rule; any tied trial is the best).
    assert finished[result.best_trial] == max(finished.values()), (result.best_trial, finished)
    assert result.best_params["optim.name"] == "sgd"
    assert result.best_val_accuracy == pytest.approx(finished[result.best_trial], abs=1e-6)

    assert len(result.best_config) == 2  # beside the search's state, and where asked
    assert locate(result.best_config[0]).read_bytes() == (tmp_path / "best.yaml").read_bytes()
    best = load_config(MetaTrainConfig, tmp_path / "best.yaml")
    assert best.optim.lr == pytest.approx(result.best_params["optim.lr"])
    assert best.episodes.shot == result.best_params["episodes.shot"]
    assert (best.val_way, best.val_shot) == (5, 1)  # pinned: every trial scored the same tasks
    version = resolve_version("models:/metallo-protonet@tuned")
    assert result.model_uri == f"models:/metallo-protonet/{version.version}"
    assert version.tags["metallo.tune.trial_id"] == result.best_trial
    assert version.tags["metallo.tune.parent_run_id"] == result.parent_run_id

    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags[FINAL_TEST_TAG] == "done"
    tested = result.final_test["variants"]["protonet"]["mean"]
    assert parent.data.metrics["test/protonet_accuracy"] == pytest.approx(tested)
    assert parent.data.metrics["best_trial/best_val_accuracy"] == pytest.approx(result.best_val_accuracy)
    assert "best_config.yaml" in {item.path for item in client.list_artifacts(result.parent_run_id)}


@pytest.fixture
def registered_protonet() -> str:
    return register_untrained_protonet(BackboneSpec(**SPEC))


def test_a_search_run_again_with_changed_settings_extends_or_is_refused(fewshot_data, registered_protonet,
                                                                       ray_cluster, s3_bucket):
    """(a) more samples extend a finished search to the new count; (b) a new lr range and (c) a new key in
    space are refused before any trial runs, naming the setting, and the finished parent run stays FINISHED.
    The search's state (Tune's experiments, its stored spec, the best config) lives on the S3-compatible store,
    so the extension reads the finished trials back from there, and the extended search run again runs none."""
    import copy

    from metallo_core.tuning.resume import SearchChanged

    config = load_config(FinetuneSearchConfig, REPO / "tuning/configs/finetune_tiny_cpu.yaml", [
        f"evaluate.data.uri={fewshot_data}", "evaluate.episodes.query=5", "evaluate.finetune.steps=1",
        "val_tasks=4", "report_every_tasks=4", "search.name=ft-change", "search.num_samples=2", "final_test=false",
        f"search.storage=s3://{s3_bucket}/searches"])
    config.space["finetune.steps"] = {"choice": [1, 2]}
    first = run_finetune_search(config)
    client = tracking.client()
    assert len(search_runs("metallo-tune")[1]) == 2

    new_range = copy.deepcopy(config)
    new_range.space["finetune.lr"] = {"loguniform": [1.0e-3, 1.0e-2]}
    with pytest.raises(SearchChanged, match=r"(?s)space: finetune.lr: was .*search.name=ft-change-2"):
        run_finetune_search(new_range)
    new_key = copy.deepcopy(config)
    new_key.space["finetune.bn_mode"] = {"choice": ["train", "eval"]}
    with pytest.raises(SearchChanged, match=r"space: finetune.bn_mode: was \(absent\)"):
        run_finetune_search(new_key)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    assert len(search_runs("metallo-tune")[1]) == 2  # no trial ran

    more = copy.deepcopy(config)
    more.search.num_samples = 3
    extended = run_finetune_search(more)
    assert extended.resumed and extended.parent_run_id == first.parent_run_id
    parents, children = search_runs("metallo-tune")
    assert len(parents) == 1 and len(children) == 3
    assert {child.data.tags["metallo.tune.status"] for child in children} == {"completed"}
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    # The parent names the best of all three trials, also when the extension found a new best (which MLflow
    # params could not record: they cannot change).
    parent_tags = client.get_run(first.parent_run_id).data.tags
    best_child = next(child for child in children if child.data.tags["metallo.tune.trial_id"] == extended.best_trial)
    assert parent_tags["metallo.tune.best_trial"] == extended.best_trial
    best_lr = float(best_child.data.params["finetune.lr"])
    assert float(parent_tags["metallo.tune.best.finetune.lr"]) == pytest.approx(best_lr)
    assert extended.best_config == [f"s3://{s3_bucket}/searches/ft-change/best_config.yaml"]
    assert locate(extended.best_config[0]).exists()
    # The extension is a Tune run of its own beside the first one's state; the search reports all trials.
    assert locate(f"s3://{s3_bucket}/searches/ft-change/extension-1/tuner.pkl").exists()
    assert len(extended.trials.splitlines()) == 2 + 3  # header, rule, one line per trial

    again = run_finetune_search(more)  # finished: both Tune runs are read back, nothing runs
    assert again.resumed and again.best_trial == extended.best_trial
    assert len(search_runs("metallo-tune")[1]) == 3
