"""How a finished search grows when it is run again with more samples (pure: no Ray, no MLflow).

Ray Tune restores a search as it was started, with its sample count, and offers no public way to raise it.
So a search is a chain of Tune runs ("stages") under its location: the first at `<storage>/<name>`, each
extension at `<storage>/<name>/extension-<k>`. An extension is a new Tune run of the missing samples whose
Optuna searcher starts from every finished trial of the stages before it, through OptunaSearch's public
warm start (`points_to_evaluate` with `evaluated_rewards`: the points are added to the study as finished
trials, not run again). The warm start is rebuilt from Tune's stored results, so it works wherever Tune's
state lives (a local folder or `s3://`, where an Optuna database could not be kept).

It reproduces what the running search's study held: Ray's OptunaSearch tells Optuna a trial COMPLETE with
its last reported metric (also when the scheduler stopped it early) and FAIL when it reported none, and
Optuna's TPE sampler models only COMPLETE (and PRUNED) trials, so the failed ones are left out. The
extension's ASHA scheduler starts with empty rungs (Tune offers no way to seed them): it stops a new trial
early only against the other new trials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from metallo_core.tuning.resume import EXTENDABLE_SEARCHERS
from metallo_core.tuning.space import encode_point
from metallo_core.tuning.trials import TrialRow

EXTENSION_PREFIX = "extension-"


def extension_name(stage: int) -> str:
    """The Tune experiment name of extension `stage` (1, 2, ...) inside the search's location."""
    if stage < 1:
        raise ValueError(f"extensions are numbered from 1, got {stage}")
    return f"{EXTENSION_PREFIX}{stage}"


def extension_samples(finished: int, unfinished: int, expected: int, searcher: str) -> int:
    """How many samples a new extension runs after the latest stage: `expected` (the search's trial count
    now) minus the `finished` trials of every stage, once the latest stage has no `unfinished` trial (an
    interrupted stage is resumed by restoring it, not extended). 0: nothing to add, or a searcher whose
    runs cannot be continued by another (a random or grid search is only ever resumed)."""
    if unfinished or finished >= expected or searcher not in EXTENDABLE_SEARCHERS:
        return 0
    return expected - finished


def warm_start(rows: Sequence[TrialRow], space: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[float]]:
    """(points, rewards) for OptunaSearch(points_to_evaluate=..., evaluated_rewards=...): each trial that
    reported its objective, with the searched keys of the YAML `space` in the form Tune carries them (a
    choice among lists as its JSON string); fixed values of the space are not Optuna parameters."""
    searched = [key for key, spec in space.items() if isinstance(spec, Mapping)]
    points, rewards = [], []
    for row in rows:
        if row.objective is None:
            continue
        encoded = encode_point({key: row.params[key] for key in space}, space)
        points.append({key: encoded[key] for key in searched})
        rewards.append(row.objective)
    return points, rewards


def extension_seed(seed: int, stage: int) -> int:
    """The extension's sampler seed: a fresh sampler with the search's own seed would draw the same random
    start-up points (TPE samples at random until it has 10 trials) as the first stage did."""
    return seed + stage
