"""The Ray Tune part every search of metallo shares: a resumable Tuner (restored under the search's name,
extended when `num_samples` grows), one line per finished trial, and the trial rows made from Tune's results.
The rows and their table are `trials.py` (pure); the MLflow books (child runs closed with how their trial
really ended, best configuration, summary, final-test marker) are `search_runs.py`.

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
from typing import Any, ClassVar

from metallo_core.errors import MetalloError
from metallo_core.storage import storage_for_ray
from metallo_core.tuning.config import SearchSettings
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


def _experiment_path(settings: SearchSettings) -> tuple[str, Any]:
    """(the Tune experiment path, its pyarrow filesystem or None)."""
    storage_root, filesystem = storage_for_ray(search_location(settings).parent().uri)
    return f"{storage_root.rstrip('/')}/{settings.name}", filesystem


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


def _extendable_search_base():
    from ray.tune.search import SearchGenerator

    return SearchGenerator


class ExtendableSearch(_extendable_search_base()):
    """Ray Tune's SearchGenerator whose sample budget and concurrency can be raised when a stored search is
    run again (Tune restores both from its saved state, as the search was first started).

    The new values travel through `overrides[search name]`, set by `build_tuner` in the driver process
    where Tune restores the searcher (a restored Tuner offers no public way to reach its search algorithm)."""

    overrides: ClassVar[dict[str, dict[str, int]]] = {}

    def __init__(self, searcher, search_name: str):
        super().__init__(searcher)
        self.search_name = search_name

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        wanted = self.overrides.get(self.search_name, {})
        if wanted.get("num_samples", 0) > self._total_samples:
            self._total_samples = wanted["num_samples"]
            self._finished = False
        if wanted.get("max_concurrent_trials") and hasattr(self.searcher, "max_concurrent"):
            self.searcher.max_concurrent = wanted["max_concurrent_trials"]


def build_tuner(spec: SearchSpec):
    """A new Tuner, or the one restored from the same name: finished trials are kept, unfinished and
    errored ones go on, and the searcher (Optuna's study) and the scheduler continue where they were; a
    raised `num_samples` (checked by `check_stored_spec`) extends the search."""
    from ray import tune

    settings = spec.settings
    points = [encode_point(point, spec.space) for point in settings.points_to_evaluate]
    location = search_location(settings)
    storage_root, filesystem = storage_for_ray(location.parent().uri)
    experiment_path, _ = _experiment_path(settings)
    trainable = tune.with_resources(spec.trainable, spec.resources)
    ExtendableSearch.overrides[settings.name] = {"num_samples": settings.num_samples,
                                                 "max_concurrent_trials": settings.max_concurrent_trials}
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if spec.stored_spec is not None:
        location.join(SPEC_FILE).write_bytes(json.dumps(spec.stored_spec, indent=2, sort_keys=True).encode())
    if resumed:
        print(f"[tune] resuming search {settings.name!r} from {location.uri}", file=sys.stderr, flush=True)
        return tune.Tuner.restore(experiment_path, trainable=trainable, param_space=spec.param_space,
                                  resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem), True
    searcher = _searcher(settings, points)
    return tune.Tuner(
        trainable,
        param_space=spec.param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode="max" if spec.metric else None,
            num_samples=settings.num_samples,
            search_alg=searcher,
            scheduler=_scheduler(spec),
            # ExtendableSearch carries its own ConcurrencyLimiter (Tune ignores this setting for it)
            max_concurrent_trials=None if isinstance(searcher, ExtendableSearch) else settings.max_concurrent_trials,
            trial_name_creator=functools.partial(_trial_name, settings.name, spec.trial_name),
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=storage_root,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[TrialProgress(spec.expected_trials,
                                     spec.describe_result or functools.partial(_metric_at, spec.metric, spec.time_attr),
                                     spec.trial_name or describe_params)],
            verbose=0,  # one line per finished trial instead of Tune's status tables
        ),
    ), False


def _trial_name(search: str, name: Callable[[dict[str, Any]], str] | None, trial) -> str:
    return name(trial.config) if name else f"{search}-{trial.trial_id}"


def _searcher(settings: SearchSettings, points: list[dict[str, Any]]):
    if settings.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=settings.seed, points_to_evaluate=points or None)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # TPE (Optuna's default) models good and bad regions of the space from the finished trials.
    optuna = OptunaSearch(points_to_evaluate=points or None, seed=settings.seed)
    return ExtendableSearch(ConcurrencyLimiter(optuna, max_concurrent=settings.max_concurrent_trials), settings.name)


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
    """Fit (or resume) the search and close each trial's child run with its final status; returns the
    trial table and whether the search was resumed. When it ended before every trial finished, the
    interrupted trials' runs are marked KILLED (resuming reopens them) and SearchInterrupted is raised,
    unless `interrupted_ok` (then their rows say `interrupted`)."""
    tuner, resumed = build_tuner(spec)
    grid = tuner.fit()
    rows = [trial_row(result, spec) for result in grid]
    finished = grid.num_terminated + grid.num_errors
    expected = spec.expected_trials
    if finished < expected or len(rows) < expected:
        for row in rows:
            row.interrupted = not row.completed
        close_trial_runs(parent_run_id, rows)
        if interrupted_ok:
            return rows, resumed
        raise SearchInterrupted(
            f"search {spec.settings.name!r} stopped with {finished} of {expected} trials finished; "
            "run the same command again to resume it (finished trials are not run again)")
    close_trial_runs(parent_run_id, rows)
    return rows, resumed


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


