"""The Ray Tune part every search of metallo shares: a resumable Tuner (restored under the search's name,
extended by a new Tune run when `num_samples` grows: extension.py), one line per finished trial, and the trial
rows made from Tune's results. The rows and their table are `trials.py` (pure); the MLflow books (child runs
closed with how their trial really ended, best configuration, summary, final-test marker) are `search_runs.py`.

The per-search modules (`metatrain_search`, `finetune_search`) supply the trainable, the metric and what
"the best trial's config" and "the final test" mean for them; seed 002's experiment grid
(`tuning.multilabel_grid`) runs a grid of unranked trials through the same Tuner. A search run again under
its name is first checked against its stored spec (`resume.py`): more samples extend it, other changes are
refused.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from metallo_core.errors import MetalloError
from metallo_core.storage import storage_for_ray
from metallo_core.tuning.config import SearchSettings
from metallo_core.tuning.extension import extension_name, extension_samples, extension_seed, warm_start
from metallo_core.tuning.resume import SPEC_FILE, ResumePlan, check_resume, describe_plan
from metallo_core.tuning.search_runs import close_trial_runs, search_location
from metallo_core.tuning.space import decode_params, describe_params, encode_point, to_tune_space
from metallo_core.tuning.trials import TrialRow


class SearchInterrupted(MetalloError):
    """The search stopped before every trial finished; the same command resumes it."""


@dataclass
class SearchSpec:
    """What a search hands the shared driver."""

    settings: SearchSettings
    trainable: Callable  # a Tune function trainable (already with its parameters bound)
    param_space: dict[str, Any]  # Tune domains, flat dotted keys
    space: dict[str, Any]  # the YAML space the domains came from
    metric: str | None  # maximised; reported by every trial. None: the trials are not ranked (a grid)
    time_attr: str  # the scheduler's time axis, reported by every trial
    budget: int  # the most any trial can use on that axis (epochs, tasks): the scheduler's max_t
    resources: dict[str, float]
    # A trial's own budget when the space searches it (e.g. epochs); None: every trial gets `budget`.
    trial_budget: Callable[[dict[str, Any]], int] | None = None
    # The search's stored spec (resume.search_spec), written next to Tune's state; None: not stored.
    stored_spec: dict[str, Any] | None = None
    # A trial's readable name from its config (Tune's trial name, and the progress lines); None: Tune names
    # it <search>-<trial id> and the progress lines list its parameters. Must pickle (Tune stores it).
    trial_name: Callable[[dict[str, Any]], str] | None = None
    # What a finished trial's last result says in its progress line; None: the metric at the time axis.
    describe_result: Callable[[dict[str, Any]], str] | None = None

    @classmethod
    def build(cls, settings: SearchSettings, trainable: Callable, space: dict[str, Any], *, metric: str | None,
              time_attr: str, budget: int, trial_budget: Callable[[dict[str, Any]], int] | None = None,
              stored_spec: dict[str, Any] | None = None,
              trial_name: Callable[[dict[str, Any]], str] | None = None,
              describe_result: Callable[[dict[str, Any]], str] | None = None) -> SearchSpec:
        """The spec of a search over the YAML `space`, each trial holding the search's per-trial resources."""
        return cls(settings=settings, trainable=trainable, param_space=to_tune_space(space), space=space,
                   metric=metric, time_attr=time_attr, budget=budget,
                   resources={"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
                   trial_budget=trial_budget, stored_spec=stored_spec, trial_name=trial_name,
                   describe_result=describe_result)

    @property
    def expected_trials(self) -> int:
        """How many trials a full run has: `num_samples`, times the size of each grid in the space (Tune
        runs every grid point `num_samples` times)."""
        count = self.settings.num_samples
        for value in self.space.values():
            if isinstance(value, Mapping) and "grid" in value:
                count *= len(value["grid"])
        return count


def _experiment_path(settings: SearchSettings, stage: int = 0) -> tuple[str, Any]:
    """(the Tune experiment path of the search's `stage`, its pyarrow filesystem or None): the first run at
    <storage>/<name>, extension k inside it (extension.py)."""
    storage_root, filesystem = storage_for_ray(search_location(settings).parent().uri)
    path = f"{storage_root.rstrip('/')}/{settings.name}"
    return (path if stage == 0 else f"{path}/{extension_name(stage)}"), filesystem


def search_exists(settings: SearchSettings) -> bool:
    """Whether Tune holds a state for this search (running it again resumes it)."""
    from ray import tune

    path, filesystem = _experiment_path(settings)
    return tune.Tuner.can_restore(path, storage_filesystem=filesystem)


def check_stored_spec(settings: SearchSettings, current: dict[str, Any]) -> ResumePlan | None:
    """Before anything runs or any MLflow run is reopened: compare the stored search's spec with the current
    one (resume.check_resume). Raises SearchChanged on a change that cannot be resumed; None for a new search
    (or one started before specs were stored, which is resumed unchecked, with a warning)."""
    if not search_exists(settings):
        return None
    location = search_location(settings)
    stored_file = location.join(SPEC_FILE)
    if not stored_file.exists():
        print(f"[tune] warning: search {settings.name!r} at {location.uri} has no stored spec (started by an "
              "older metallo): its settings cannot be checked against this config", file=sys.stderr, flush=True)
        return None
    plan = check_resume(json.loads(stored_file.read_bytes()), current, settings.name, location.uri)
    for line in describe_plan(plan):
        print(f"[tune] {line}", file=sys.stderr, flush=True)
    return plan


def stored_stages(settings: SearchSettings) -> int:
    """How many Tune runs of this search are stored (0: a new search): the first, then its extensions."""
    from ray import tune

    count = 0
    while tune.Tuner.can_restore(*_experiment_path(settings, count)):
        count += 1
    return count


def _restored_tuner(spec: SearchSpec, stage: int):
    """Stage `stage` as Tune stored it: finished trials are kept, unfinished and errored ones go on, and its
    searcher (Optuna's study) and scheduler continue where they were."""
    from ray import tune

    path, filesystem = _experiment_path(spec.settings, stage)
    return tune.Tuner.restore(path, trainable=tune.with_resources(spec.trainable, spec.resources),
                              param_space=spec.param_space, resume_unfinished=True, resume_errored=True,
                              storage_filesystem=filesystem)


def _new_tuner(spec: SearchSpec, stage: int, num_samples: int, finished: list[TrialRow]):
    """A new Tune run of `num_samples`: the search itself (stage 0, from `search.points_to_evaluate`), or
    extension `stage`, whose Optuna searcher starts from the `finished` trials (extension.warm_start)."""
    from ray import tune

    settings = spec.settings
    storage_root, filesystem = storage_for_ray(search_location(settings).parent().uri)
    if stage == 0:
        name = settings.name
        searcher = _searcher(settings, [encode_point(point, spec.space) for point in settings.points_to_evaluate])
    else:
        storage_root, name = f"{storage_root.rstrip('/')}/{settings.name}", extension_name(stage)
        searcher = _optuna(*warm_start(finished, spec.space), seed=extension_seed(settings.seed, stage))
    return tune.Tuner(
        tune.with_resources(spec.trainable, spec.resources),
        param_space=spec.param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode="max" if spec.metric else None,
            num_samples=num_samples,
            search_alg=searcher,
            scheduler=_scheduler(spec),
            max_concurrent_trials=settings.max_concurrent_trials,
            trial_name_creator=functools.partial(_trial_name, settings.name, spec.trial_name),
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_root,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[TrialProgress(spec.expected_trials,
                                     spec.describe_result or functools.partial(_metric_at, spec.metric, spec.time_attr),
                                     spec.trial_name or describe_params)],
            verbose=0,  # one line per finished trial instead of Tune's status tables
        ),
    )


def __getattr__(name: str) -> Any:
    # Searches stored by metallo before extensions became Tune runs of their own pickled their search
    # algorithm as this module's ExtendableSearch, a SearchGenerator subclass: they restore as one.
    if name == "ExtendableSearch":
        from ray.tune.search import SearchGenerator

        return SearchGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _trial_name(search: str, name: Callable[[dict[str, Any]], str] | None, trial) -> str:
    return name(trial.config) if name else f"{search}-{trial.trial_id}"


def _searcher(settings: SearchSettings, points: list[dict[str, Any]]):
    if settings.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=settings.seed, points_to_evaluate=points or None)
    return _optuna(points, None, seed=settings.seed)


def _optuna(points: list[dict[str, Any]], rewards: list[float] | None, *, seed: int):
    """Optuna's TPE (its default sampler), which models good and bad regions of the space from the finished
    trials; `points` with `rewards` are trials already run (added to the study), without them the first
    trials to run. Tune gives it the space, metric and mode, and limits its concurrency."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(points_to_evaluate=points or None, evaluated_rewards=rewards or None, seed=seed)


def _scheduler(spec: SearchSpec):
    if spec.settings.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=spec.time_attr, max_t=spec.budget,
                         grace_period=min(spec.settings.asha.grace_period, spec.budget),
                         reduction_factor=spec.settings.asha.reduction_factor)


def _progress_base():
    from ray.tune import Callback

    return Callback


class TrialProgress(_progress_base()):
    """One line per finished trial on stderr (what its last result says, and which trial it is)."""

    def __init__(self, total: int, describe_result: Callable[[dict[str, Any]], str],
                 describe_trial: Callable[[dict[str, Any]], str]):
        self.total = total
        self.describe_result, self.describe_trial = describe_result, describe_trial
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        print(f"[tune] trial {trial.trial_id} done ({self.finished} this session, {self.total} in all): "
              f"{self.describe_result(trial.last_result or {})}; {self.describe_trial(trial.config)}",
              file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} FAILED: {self.describe_trial(trial.config)}", file=sys.stderr,
              flush=True)


def _metric_at(metric: str | None, time_attr: str, result: dict[str, Any]) -> str:
    value = result.get(metric) if metric else None
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
    return f"{metric} {shown} at {time_attr} {result.get(time_attr)}"


def run_trials(spec: SearchSpec, parent_run_id: str, *, interrupted_ok: bool = False) -> tuple[list[TrialRow], bool]:
    """Fit (or resume, or extend) the search and close each trial's child run with its final status; returns
    the trial table of every stage (extension.py) and whether the search was resumed. A stored search's
    latest stage is restored and fitted (its unfinished trials go on from their checkpoints); when it ends
    with fewer finished trials than `spec.expected_trials`, an Optuna search is extended by a new stage
    (`check_stored_spec` has refused this for the other searchers). When the search ends before every
    trial finished, the interrupted trials' runs are marked KILLED (resuming reopens them) and
    SearchInterrupted is raised, unless `interrupted_ok` (then their rows say `interrupted`)."""
    settings = spec.settings
    location = search_location(settings)
    stages = stored_stages(settings)
    if spec.stored_spec is not None:
        location.join(SPEC_FILE).write_bytes(json.dumps(spec.stored_spec, indent=2, sort_keys=True).encode())
    rows: list[TrialRow] = []
    finished = 0
    for stage in range(stages - 1):  # an earlier stage ended before the next began: read, not run again
        grid = _restored_tuner(spec, stage).get_results()
        rows += [trial_row(result, spec) for result in grid]
        finished += grid.num_terminated + grid.num_errors
    if stages:
        print(f"[tune] resuming search {settings.name!r} from {location.uri}", file=sys.stderr, flush=True)
        grid = _restored_tuner(spec, stages - 1).fit()
    else:
        grid = _new_tuner(spec, 0, settings.num_samples, []).fit()
    rows += [trial_row(result, spec) for result in grid]
    finished += grid.num_terminated + grid.num_errors
    expected = spec.expected_trials
    more = extension_samples(finished, len(grid) - grid.num_terminated - grid.num_errors, expected,
                             settings.searcher)
    if more:
        stage = max(stages, 1)
        trials = f"{more} trial" + ("s" if more > 1 else "")
        print(f"[tune] extending search {settings.name!r} by {trials} ({location.uri}/{extension_name(stage)}; "
              f"its searcher starts from the {finished} finished ones)", file=sys.stderr, flush=True)
        grid = _new_tuner(spec, stage, more, rows).fit()
        rows += [trial_row(result, spec) for result in grid]
        finished += grid.num_terminated + grid.num_errors
    if finished < expected or len(rows) < expected:
        for row in rows:
            row.interrupted = not row.completed
        close_trial_runs(parent_run_id, rows)
        if interrupted_ok:
            return rows, stages > 0
        raise SearchInterrupted(
            f"search {settings.name!r} stopped with {finished} of {expected} trials finished; "
            "run the same command again to resume it (finished trials are not run again)")
    close_trial_runs(parent_run_id, rows)
    return rows, stages > 0


def trial_row(result, spec: SearchSpec) -> TrialRow:
    metrics = dict(result.metrics or {})
    history = result.metrics_dataframe
    objective = None
    if spec.metric and history is not None and spec.metric in history:
        # The value at the last report: for meta-training the metric is already "best so far".
        values = [v for v in history[spec.metric].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
        objective = float(values[-1]) if values else None
    used = float(metrics.get(spec.time_attr) or 0)
    params = decode_params({key: value for key, value in (result.config or {}).items()})
    own_budget = spec.trial_budget(params) if spec.trial_budget else spec.budget
    return TrialRow(
        trial_id=str(metrics.get("trial_id") or _trial_id(result)),
        params=params,
        objective=objective,
        budget_used=used,
        completed=result.error is None and used >= own_budget,
        error=str(result.error)[:500] if result.error is not None else "",
        metrics={key: value for key, value in metrics.items() if isinstance(value, (int, float, str))},
    )


def _trial_id(result) -> str:
    return os.path.basename(result.path.rstrip("/")).removeprefix("trial-")


