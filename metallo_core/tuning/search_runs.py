"""A search's books in MLflow and storage: the tags that tie trial runs to their search, where the search
lives, closing each trial's child run with how its trial ended, the best configuration and the summary on the
parent run, and whether the final test already ran. No Ray: `runner` drives Tune and calls these."""

from __future__ import annotations

from metallo_core import tracking
from metallo_core.storage import Location, locate
from metallo_core.tuning.config import SearchSettings
from metallo_core.tuning.trials import TrialRow, best_setting_tags, trials_table

TRIAL_TAG = "metallo.tune.trial_id"
SEARCH_TAG = "metallo.tune.search"
FINAL_TEST_TAG = "metallo.tune.final_test"
FINAL_TEST_TRIAL_TAG = "metallo.tune.final_test_trial"  # the best trial the final test scored
BEST_CONFIG_ARTIFACT = "best_config.yaml"


def search_location(settings: SearchSettings) -> Location:
    """Where the Tune experiment lives: <storage>/<name> (local directory or s3://)."""
    root = locate(settings.storage or str(tracking.local_home() / "tune"))
    root.check_access()
    return root.join(settings.name)


def close_trial_runs(parent_run_id: str, rows: list[TrialRow]) -> dict[str, str]:
    """Give each trial's child run its final status: trials stopped early by the scheduler (or by an
    interruption) were killed mid-run and could not close their own runs. Returns trial id -> run id."""
    client = tracking.client()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=5000)
    by_trial = {run.data.tags.get(TRIAL_TAG): run for run in children if run.data.tags.get(TRIAL_TAG)}
    known = {row.trial_id for row in rows}
    for run in children:
        if run.info.status == "RUNNING" and run.data.tags.get(TRIAL_TAG) not in known:
            client.set_terminated(run.info.run_id, status="KILLED")
    for row in rows:
        run = by_trial.get(row.trial_id)
        if run is None:
            continue
        client.set_tag(run.info.run_id, "metallo.tune.status", row.status)
        if row.objective is not None:
            client.set_tag(run.info.run_id, "metallo.tune.objective", f"{row.objective:.6f}")
        # A trial without an error whose run reads FAILED was stopped by Tune, not broken: the scheduler
        # kills early-stopped trials mid-epoch, and also stops a trial right after it reports its last
        # epoch (max_t), before its run could close itself.
        if run.info.status == "RUNNING" or (not row.error and run.info.status == "FAILED"):
            client.set_terminated(run.info.run_id, status="FINISHED" if row.status == "completed" else "KILLED")
    return {trial: run.info.run_id for trial, run in by_trial.items()}


def write_best_config(settings: SearchSettings, text: str, parent) -> list[str]:
    """The best configuration as YAML: next to the search's state, where the user asked, and on the parent
    run. Returns where it was written."""
    targets = [search_location(settings).join(BEST_CONFIG_ARTIFACT)]
    if settings.best_config_out:
        targets.append(locate(settings.best_config_out))
    for target in targets:
        target.write_bytes(text.encode())
    parent.log_text(text, BEST_CONFIG_ARTIFACT)
    return [target.uri for target in targets]


def final_test_done(parent_run_id: str, best_trial_id: str | None = None) -> bool:
    """Whether the final test ran (for `best_trial_id`: an extended search whose best trial changed tests
    its new winner; a run without the trial tag predates it and counts as tested)."""
    tags = tracking.client().get_run(parent_run_id).data.tags
    if tags.get(FINAL_TEST_TAG) != "done":
        return False
    return best_trial_id is None or tags.get(FINAL_TEST_TRIAL_TAG, best_trial_id) == best_trial_id


def logged_metrics(run_id: str, prefix: str) -> dict[str, float]:
    return {key: value for key, value in tracking.client().get_run(run_id).data.metrics.items()
            if key.startswith(prefix)}


def log_search_summary(parent, rows: list[TrialRow], best: TrialRow, metric: str, time_attr: str) -> str:
    """The trial table (markdown and JSON), the counts by status and the best trial's settings on the parent
    run; returns the markdown table."""
    table = trials_table(rows, metric, time_attr, best)
    parent.log_text(table + "\n", "trials.md")
    parent.log_dict([vars(row) | {"status": row.status} for row in rows], "trials.json")
    parent.log_metrics({
        f"best_trial/{metric}": best.objective,
        "trials_completed": sum(row.status == "completed" for row in rows),
        "trials_stopped_early": sum(row.status == "stopped early" for row in rows),
        "trials_failed": sum(row.status == "failed" for row in rows),
    })
    # Tags, not params: a search extended with more samples may find a new best, and MLflow params cannot change.
    parent.set_tags({"metallo.tune.best_trial": best.trial_id, **best_setting_tags(best.params)})
    return table
