"""How a search closes its trials' MLflow child runs (Ray-free): Tune kills trials without letting their
runs close, so the search gives each the status of how the trial really ended."""

from metallo_core import tracking
from metallo_core.tuning.search_runs import TRIAL_TAG, close_trial_runs
from metallo_core.tuning.trials import TrialRow


def test_each_trial_run_ends_with_the_trials_own_outcome():
    client = tracking.client()
    experiment_id = tracking.ensure_experiment("metallo-tune")
    parent = client.create_run(experiment_id, run_name="search")
    ended = {  # trial -> the status its run was left in when Tune stopped the trial's process
        "ran-to-the-end": "FAILED",      # stopped right after reporting its last epoch
        "still-open": "RUNNING",         # completed, process gone before the run closed
        "asha-stopped": "FAILED",        # stopped early, mid-epoch
        "broke": "FAILED",               # raised: really failed
    }
    runs = {}
    for trial, status in ended.items():
        run = client.create_run(experiment_id, run_name=trial,
                                tags={"mlflow.parentRunId": parent.info.run_id, TRIAL_TAG: trial})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
        runs[trial] = run.info.run_id
    rows = [
        TrialRow("ran-to-the-end", {}, 0.6, 2, completed=True),
        TrialRow("still-open", {}, 0.5, 2, completed=True),
        TrialRow("asha-stopped", {}, 0.3, 1, completed=False),
        TrialRow("broke", {}, None, 0, completed=False, error="FloatingPointError"),
    ]
    assert close_trial_runs(parent.info.run_id, rows) == runs
    final = {trial: client.get_run(run_id) for trial, run_id in runs.items()}
    assert {trial: run.info.status for trial, run in final.items()} == {
        "ran-to-the-end": "FINISHED", "still-open": "FINISHED", "asha-stopped": "KILLED", "broke": "FAILED"}
    assert {trial: run.data.tags["metallo.tune.status"] for trial, run in final.items()} == {
        "ran-to-the-end": "completed", "still-open": "completed", "asha-stopped": "stopped early", "broke": "failed"}
