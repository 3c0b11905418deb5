"""Both searches survive a hard kill of their driver: `metallo tune metatrain|finetune` runs as a subprocess
on the session's Ray cluster, is SIGKILLed mid-trial (no Ctrl-C, no chance to save anything), and the same
command run again finishes the search with its interrupted trials going on from their checkpoints:

- ASHA over meta-training: the trial's Ray Train run resumes from its last committed epoch (the epochs
  before it are not trained again) and Tune's first result of the resumed trial is past epoch 1;
- Optuna over fine-tuning, killed in its second trial: the finished first trial is not run again, the second
  resumes from its last reported task (the tasks before it are not fine-tuned again) and Tune's first result
  of the resumed trial is past the first chunk; the final test runs once, and the finished search run yet
  again runs no trial and no test.

The kill comes only once Tune's stored experiment state (what a restore reads) lists the trial as running
(and, for fine-tuning, with a checkpoint): before that, a restore could not know the trial, whatever the code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from metallo_core import tracking
from metallo_core.config import load_config, to_yaml
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.models.backbones import BackboneSpec
from metallo_core.train.checkpoint_commit import committed_epoch
from metallo_core.tuning.config import FinetuneSearchConfig, MetaTrainSearchConfig
from metallo_core.tuning.finetune_search import run_finetune_search
from metallo_core.tuning.search_runs import FINAL_TEST_TAG, TRIAL_TAG
from tests.fewshot_fixtures import TINY_SPEC, register_untrained_protonet, write_tiny_fewshot

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
VAL_TASKS, REPORT_EVERY = 6, 2


def search_command(kind: str, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "metallo_core.cli", "tune", kind, "--config", str(config_file)]


FINISHED = ("TERMINATED", "ERROR")  # a stored trial in any other state is run (on) by a restore


def stored_trials(search_dir: Path) -> list[Any] | None:
    """The trials of Tune's stored experiment state (what `Tuner.restore` starts from), or None before there is
    one (or while it is being rewritten). Tune stores a running trial as PENDING."""
    import logging

    from ray.tune import ExperimentAnalysis

    # It warns about every trial without results yet (each poll, for every trial still starting).
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        return ExperimentAnalysis(str(search_dir)).trials
    except Exception:  # noqa: BLE001 - no state file yet, or one caught mid-copy: look again
        return None


class Search:
    """One `metallo tune <kind>` driver process, killed once `ready()` says so, then run again to the end."""

    def __init__(self, kind: str, config_file: Path, env: dict[str, str], log: Path, ready: Callable[[], Any]):
        self.kind, self.config_file, self.env, self.log, self.ready = kind, config_file, env, log, ready
        self.at_kill: Any = None
        self.process = self._start(log)

    def _start(self, log: Path) -> subprocess.Popen:
        with open(log, "w") as output:
            return subprocess.Popen([sys.executable, "-m", "metallo_core.cli", "tune", self.kind, "--config",
                                     str(self.config_file)], env=self.env, stdout=output, stderr=subprocess.STDOUT,
                                    cwd=REPO)

    def kill_if_ready(self) -> bool:
        """Whether the driver is killed (now or before); fails if it ended on its own first."""
        if self.at_kill is not None:
            return True
        if self.process.poll() is not None:
            pytest.fail(f"search {self.kind} ended ({self.process.returncode}) before it could be killed mid-trial:\n"
                        f"{self.log.read_text()[-4000:]}")
        found = self.ready()
        if not found:
            return False
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        assert self.process.returncode == -signal.SIGKILL
        self.at_kill = found
        return True

    def run_again(self) -> None:
        self.process = self._start(self.log.with_suffix(".resumed.log"))

    def wait_for_the_end(self, timeout_s: float = 900) -> None:
        self.process.wait(timeout=timeout_s)
        output = self.log.with_suffix(".resumed.log").read_text()
        assert self.process.returncode == 0, output[-6000:]
        assert "resuming search" in output, output[-3000:]


def kill_each_when_ready(searches: list[Search], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not all([search.kill_if_ready() for search in searches]):  # a list: every search is looked at
        if time.monotonic() > deadline:
            pytest.fail(f"no trial reached the point to kill its search at within {timeout_s} s")
        time.sleep(0.2)


def child_runs(experiment: str) -> dict[str, Any]:
    """trial id -> its MLflow child run (exactly one run per trial)."""
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    trial_ids = [run.data.tags[TRIAL_TAG] for run in children]
    assert len(trial_ids) == len(set(trial_ids)), trial_ids
    return {run.data.tags[TRIAL_TAG]: run for run in children}


def first_result_after_restart(search_dir: Path, trial_id: str) -> dict[str, Any]:
    """The trial's first Tune result from the process of its last result (the trial run by the resumed search)."""
    rows = [json.loads(line) for line in (search_dir / f"trial-{trial_id}" / "result.json").read_text().splitlines()
            if line.strip()]
    return next(row for row in rows if row["pid"] == rows[-1]["pid"])


@pytest.fixture(scope="module")
def fewshot_data(tmp_path_factory):
    return write_tiny_fewshot(tmp_path_factory.mktemp("fewshot"))


def test_both_searches_resume_from_trial_checkpoints_after_their_driver_is_killed(fewshot_data, ray_cluster, tmp_path):
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,  # the session's cluster, not a second one
        # Tune rewrites its experiment state at most every 10 s by default; every step here, so the test need
        # not wait for it (the kill still lands wherever the trial is).
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
    }
    storage = tmp_path / "searches"
    client = tracking.client()

    # ASHA over meta-training: one trial at a time, 2 epochs each (an ASHA rung after the first).
    metatrain = load_config(MetaTrainSearchConfig, REPO / "tuning/configs/metatrain_tiny_cpu.yaml", [
        f"base.data.uri={fewshot_data}", "base.backbone.source=scratch",
        *[f"base.backbone.{key}={value}" for key, value in TINY_SPEC.items()],
        "base.episodes.shot=1", "base.episodes.query=5", "base.episodes_per_epoch=3",
        "base.val_episodes=2", f"base.epochs={EPOCHS}",
        "base.registry.register=false", "final_test.enabled=false",
        "search.name=mt-kill", f"search.storage={storage}", "search.num_samples=2", "search.max_concurrent_trials=1",
    ])
    # Two trials with the same settings: the one interrupted and resumed must train as the other one does.
    metatrain.space = {"optim.lr": {"choice": [0.05, 0.1]}}
    metatrain.search.points_to_evaluate = [{"optim.lr": 0.05}, {"optim.lr": 0.05}]
    (tmp_path / "metatrain.yaml").write_text(to_yaml(metatrain))
    metatrain_dir = storage / "mt-kill"

    def a_trial_between_epochs() -> dict[str, int] | None:
        """trial id -> committed epoch, once a trial Tune has stored as unfinished has committed epoch 0 of 2."""
        trials = stored_trials(metatrain_dir) or []
        unfinished = [trial.trial_id for trial in trials if trial.status not in FINISHED]
        committed = {trial: committed_epoch(str(metatrain_dir / "train"), f"mt-kill-{trial}") for trial in unfinished}
        if any(epoch is not None and epoch <= EPOCHS - 2 for epoch in committed.values()):
            return {trial: epoch for trial, epoch in committed.items() if epoch is not None}
        return None

    # Optuna over fine-tuning: one trial at a time, 6 tasks reported 2 by 2, then a final test on 4 test tasks.
    # Its own MLflow experiment.
    register_untrained_protonet(BackboneSpec(**TINY_SPEC))
    finetune = load_config(FinetuneSearchConfig, REPO / "tuning/configs/finetune_tiny_cpu.yaml", [
        f"evaluate.data.uri={fewshot_data}", "evaluate.episodes.query=5", "evaluate.finetune.steps=1",
        "evaluate.tasks=4", f"val_tasks={VAL_TASKS}", f"report_every_tasks={REPORT_EVERY}",
        "search.name=ft-kill", f"search.storage={storage}", "search.num_samples=2", "search.max_concurrent_trials=1",
        "search.experiment=metallo-tune-ft",
    ])
    finetune.space["finetune.steps"] = {"choice": [1, 2]}
    (tmp_path / "finetune.yaml").write_text(to_yaml(finetune))
    finetune_dir = storage / "ft-kill"

    def a_second_trial_with_a_checkpoint() -> dict[str, Any] | None:
        """{"finished": trial id -> its MLflow run, "interrupted": trial id -> tasks in its stored checkpoint},
        once Tune has stored one finished trial and an unfinished one with a checkpoint."""
        trials = stored_trials(finetune_dir) or []
        finished = [trial.trial_id for trial in trials if trial.status == "TERMINATED"]
        for trial in trials:
            if finished and trial.status not in FINISHED and trial.checkpoint is not None:
                tasks = json.loads((Path(trial.checkpoint.path) / "accuracies.json").read_text())
                if len(tasks) < VAL_TASKS:
                    runs = child_runs("metallo-tune-ft")
                    return {"finished": {trial_id: runs[trial_id].info.run_id for trial_id in finished},
                            "interrupted": {trial.trial_id: len(tasks)}}
        return None

    # Both searches side by side (they share nothing but the cluster): killed, then run again to the end.
    searches = [
        Search("metatrain", tmp_path / "metatrain.yaml", env, tmp_path / "metatrain.log", a_trial_between_epochs),
        Search("finetune", tmp_path / "finetune.yaml", env, tmp_path / "finetune.log",
               a_second_trial_with_a_checkpoint),
    ]
    try:
        kill_each_when_ready(searches)
        for search in searches:
            search.run_again()
        for search in searches:
            search.wait_for_the_end()
    finally:  # a failure above leaves no driver running
        for search in searches:
            if search.process.poll() is None:
                search.process.kill()
                search.process.wait(timeout=60)

    at_kill = searches[0].at_kill
    interrupted = [trial for trial, epoch in at_kill.items() if epoch <= EPOCHS - 2]
    children = child_runs("metallo-tune")
    assert len(children) == 2 and set(interrupted) <= set(children)  # the restored searcher made one more, no more
    for trial in interrupted:
        run_id = children[trial].info.run_id
        resumed_at = [metric.value for metric in client.get_metric_history(run_id, "resumed_at_epoch")]
        # Resumed once, from the checkpoint committed before the kill (or a later one), not from scratch.
        assert len(resumed_at) == 1 and at_kill[trial] + 1 <= resumed_at[0] <= EPOCHS - 1, (trial, resumed_at)
        epochs_done = Counter(int(metric.value) for metric in client.get_metric_history(run_id, "epochs_done"))
        # The epochs before the resume point were trained once; at least one epoch was trained after it.
        assert all(epochs_done[epoch] == 1 for epoch in range(1, int(resumed_at[0]) + 1)), epochs_done
        assert max(epochs_done) > resumed_at[0], epochs_done
        assert first_result_after_restart(metatrain_dir, trial)["epochs_done"] > 1
    # The trial that ran after the resume was not interrupted; with the same settings and seed it ties with the
    # interrupted one at ASHA's rung, and both train their last epoch alike only if the resume loaded the
    # checkpoint's weights and optimiser state (not just its epoch number).
    (uninterrupted,) = set(children) - set(interrupted)
    last_epoch_step = EPOCHS * 3  # 3 episodes per epoch on one worker
    for key in ("train_loss", "val_accuracy"):
        resumed_values, straight_values = (
            {metric.value for metric in client.get_metric_history(children[trial].info.run_id, key)
             if metric.step == last_epoch_step} for trial in (interrupted[0], uninterrupted))
        assert len(resumed_values) == len(straight_values) == 1, (key, resumed_values, straight_values)
        assert resumed_values.pop() == pytest.approx(straight_values.pop(), rel=1e-5), key
    assert {run.data.tags["metallo.tune.status"] for run in children.values()} == {"completed"}
    assert {run.info.status for run in children.values()} == {"FINISHED"}

    finished_at_kill, interrupted_at_kill = searches[1].at_kill["finished"], searches[1].at_kill["interrupted"]
    children = child_runs("metallo-tune-ft")
    assert len(children) == 2 and set(finished_at_kill) | set(interrupted_at_kill) == set(children)
    for trial, run_id in finished_at_kill.items():  # finished before the kill: not run again
        assert children[trial].info.run_id == run_id
        steps = [int(point.step) for point in client.get_metric_history(run_id, "val_accuracy")]
        assert steps == list(range(REPORT_EVERY, VAL_TASKS + 1, REPORT_EVERY)), steps
    for trial, tasks_at_kill in interrupted_at_kill.items():
        curve = client.get_metric_history(children[trial].info.run_id, "val_accuracy")
        logged = Counter(int(point.step) for point in curve)
        # The tasks in the checkpoint were fine-tuned once (a restart from the first task would log them twice),
        # and the trial went on to the last task.
        assert all(logged[step] == 1 for step in range(REPORT_EVERY, tasks_at_kill + 1, REPORT_EVERY)), logged
        assert max(logged) == VAL_TASKS, logged
        assert first_result_after_restart(finetune_dir, trial)["tasks_done"] > tasks_at_kill
    assert {run.data.tags["metallo.tune.status"] for run in children.values()} == {"completed"}
    assert {run.info.status for run in children.values()} == {"FINISHED"}

    # The resumed search ran its final test once, on the parent run, and wrote a best config that loads.
    (parent,) = {run.data.tags["mlflow.parentRunId"] for run in children.values()}
    assert client.get_run(parent).data.tags[FINAL_TEST_TAG] == "done"
    assert len(client.get_metric_history(parent, "test/finetune_best_accuracy")) == 1
    best = load_config(EvaluateConfig, finetune_dir / "best_config.yaml")
    # The finished search run again (here, in-process): no trial and no test run again, the same answer.
    again = run_finetune_search(finetune)
    assert again.resumed and again.parent_run_id == parent and len(child_runs("metallo-tune-ft")) == 2
    assert best.finetune.lr == pytest.approx(again.best_settings["lr"])
    assert again.final_test["gains"]["finetune_best_minus_finetune_default"]["mean"] == pytest.approx(
        client.get_run(parent).data.metrics["test/finetune_best_minus_finetune_default"])
    assert len(client.get_metric_history(parent, "test/finetune_best_accuracy")) == 1
