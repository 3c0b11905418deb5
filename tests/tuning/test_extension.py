"""Extending a finished search (pure, and Optuna's searcher without a cluster): how many samples a new stage
runs, and the warm start that gives its searcher every finished trial's result."""

import optuna
import pytest

from metallo_core.tuning.extension import extension_name, extension_samples, extension_seed, warm_start
from metallo_core.tuning.space import to_tune_space
from metallo_core.tuning.trials import TrialRow

SPACE = {
    "finetune.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "finetune.augmentations": {"choice": [["crop"], ["crop", "flip"]]},
    "finetune.steps": 5,  # fixed: not an Optuna parameter
}


def row(trial_id: str, lr: float, augmentations: list[str], objective: float | None, **kwargs) -> TrialRow:
    params = {"finetune.lr": lr, "finetune.augmentations": augmentations, "finetune.steps": 5}
    return TrialRow(trial_id, params, objective, budget_used=kwargs.pop("used", 20), completed=True, **kwargs)


ROWS = [
    row("a", 1.0e-3, ["crop"], 0.62),
    row("b", 3.0e-4, ["crop", "flip"], 0.41, used=10),  # stopped early by ASHA: its last value counts
    row("c", 5.0e-3, ["crop"], None, error="CUDA out of memory"),  # failed before reporting
]


def test_the_missing_samples_run_once_the_latest_stage_has_finished():
    assert extension_samples(finished=2, unfinished=0, expected=5, searcher="optuna") == 3
    assert extension_samples(finished=2, unfinished=1, expected=5, searcher="optuna") == 0  # resumed first
    assert extension_samples(finished=5, unfinished=0, expected=5, searcher="optuna") == 0
    assert extension_samples(finished=2, unfinished=0, expected=5, searcher="random") == 0  # only resumed


def test_extensions_are_numbered_from_one_with_their_own_seed():
    assert extension_name(1) == "extension-1"
    with pytest.raises(ValueError, match="from 1"):
        extension_name(0)
    assert extension_seed(7, 1) != extension_seed(7, 2) != 7


def test_the_warm_start_holds_each_scored_trial_in_tunes_form():
    points, rewards = warm_start(ROWS, SPACE)
    encoded = to_tune_space(SPACE)["finetune.augmentations"].categories
    assert rewards == [0.62, 0.41]
    assert points == [{"finetune.lr": 1.0e-3, "finetune.augmentations": encoded[0]},
                      {"finetune.lr": 3.0e-4, "finetune.augmentations": encoded[1]}]


def test_an_extensions_optuna_study_starts_from_the_finished_trials():
    """Through OptunaSearch's public warm start, as Tune sets it up: the finished trials enter the study as
    COMPLETE with their objective (not run again), and the searcher goes on suggesting new points."""
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.InMemoryStorage()
    points, rewards = warm_start(ROWS, SPACE)
    searcher = OptunaSearch(points_to_evaluate=points, evaluated_rewards=rewards, seed=extension_seed(0, 1),
                            study_name="extension-1", storage=storage)
    assert searcher.set_search_properties("val_accuracy", "max", to_tune_space(SPACE))
    study = optuna.load_study(study_name="extension-1", storage=storage)
    assert [(trial.state, trial.value) for trial in study.trials] == [
        (optuna.trial.TrialState.COMPLETE, 0.62), (optuna.trial.TrialState.COMPLETE, 0.41)]
    assert study.best_trial.params["finetune.lr"] == pytest.approx(1.0e-3)
    suggested = searcher.suggest("extension-trial")
    assert 1.0e-4 <= suggested["finetune.lr"] <= 1.0e-2
    assert suggested["finetune.augmentations"] in to_tune_space(SPACE)["finetune.augmentations"].categories
    assert len(optuna.load_study(study_name="extension-1", storage=storage).trials) == 3
