"""What may change when a search is run again under the same `search.name`.

Ray Tune restores a search as it was started: its trials, its searcher's state and its sample count come
from the stored state, and a changed `param_space` is either ignored or a raw `ValueError` (Tune's
`Tuner.restore` wants "the same param_space"). metallo keeps that contract and makes it explicit: the
search's spec (its space and every setting that decides which trials count) is stored next to Tune's state
(`<storage>/<name>/metallo_search_spec.json`) and compared on every resume, before any trial runs:

- more samples (`search.num_samples` raised, searcher `optuna`): the search is extended, keeping every
  finished trial: once its stored trials have finished, a new Tune run of the missing samples starts, its
  Optuna searcher seeded with every finished trial's result (`extension.py`), and its trials count with the
  earlier ones as one search (trial table, best trial, final test, MLflow parent run);
- settings that only say how trials run (`RUN_SETTINGS`: resources, concurrency, retries, where the best
  config is copied) may change freely (concurrency from the next new Tune run on: Tune restores an
  interrupted run with its own);
- anything else (a range, a new or removed key in `space:`, the model, the data, the task, the trial
  template, fewer samples, the searcher) is refused, naming each changed setting and the way out: a new
  `search.name` (or the stored settings, to resume the search as it was).

The comparison is pure (plain dicts in, a plan out) so it is tested without Ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metallo_core.config import flatten, to_dict
from metallo_core.errors import ConfigError

SPEC_FILE = "metallo_search_spec.json"
SPEC_VERSION = 1

# How trials run, not which trials count: free to change between runs of one search (dotted prefixes).
RUN_SETTINGS = (
    "search.max_concurrent_trials",
    "search.cpus_per_trial",
    "search.gpus_per_trial",
    "search.max_failures",
    "search.ray_address",
    "search.best_config_out",
    "search.storage",  # the search's location itself: the same state was found there
    "evaluate.parallelism",
    "evaluate.cpus_per_actor",
    "evaluate.gpus_per_actor",
    "evaluate.ray_address",
    "base.compute.ray_address",
    "base.compute.cpus_per_worker",
    "base.compute.gpus_per_worker",
    "base.compute.torch_threads",
    "base.compute.prefetch_batches",
    "base.run.log_every_steps",
    "base.run.max_failures",
    "base.run.keep_checkpoints",
    "final_test.parallelism",
    "final_test.cpus_per_actor",
    "final_test.gpus_per_actor",
)
EXTENDABLE_SEARCHERS = ("optuna",)
_RANGE_KINDS = ("loguniform", "uniform", "quniform", "qloguniform", "randint")


class SearchChanged(ConfigError):
    """A search was run again under the same name with settings that would mix two different searches."""


@dataclass
class SpecChange:
    setting: str  # "space: finetune.lr", "evaluate.data.uri", "search.num_samples"
    stored: Any
    current: Any

    def describe(self) -> str:
        return f"{self.setting}: was {_show(self.stored)}, now {_show(self.current)}"


@dataclass
class ResumePlan:
    """What running a stored search again with the current config does."""

    stored_samples: int
    samples: int
    refused: list[SpecChange] = field(default_factory=list)
    ignored: list[SpecChange] = field(default_factory=list)  # run settings that changed (allowed)

    @property
    def extends(self) -> bool:
        return not self.refused and self.samples > self.stored_samples


def search_spec(config: Any) -> dict[str, Any]:
    """The stored form of a search config (Finetune/MetaTrainSearchConfig, with the data URIs made
    absolute and the model alias pinned by the caller): JSON-plain, the space per key with numeric
    bounds as numbers (YAML reads `1e-4` as a string), every other setting flat by dotted key."""
    plain = to_dict(config)
    space = {key: _normal_distribution(value) for key, value in dict(plain.pop("space", {})).items()}
    return json.loads(json.dumps({"version": SPEC_VERSION, "space": space, "settings": flatten(plain)},
                                 sort_keys=True, default=str))


def compare_specs(stored: Mapping[str, Any], current: Mapping[str, Any]) -> ResumePlan:
    """The plan for resuming a search stored as `stored` with the config `current` (both `search_spec`s)."""
    stored_settings, current_settings = dict(stored["settings"]), dict(current["settings"])
    plan = ResumePlan(stored_samples=int(stored_settings.pop("search.num_samples")),
                      samples=int(current_settings.pop("search.num_samples")))
    for key in sorted(set(stored["space"]) | set(current["space"])):
        before, after = stored["space"].get(key, _ABSENT), current["space"].get(key, _ABSENT)
        if before != after:
            plan.refused.append(SpecChange(f"space: {key}", before, after))
    for key in sorted(set(stored_settings) | set(current_settings)):
        before, after = stored_settings.get(key, _ABSENT), current_settings.get(key, _ABSENT)
        if before == after:
            continue
        change = SpecChange(key, before, after)
        is_run_setting = any(key == prefix or key.startswith(prefix + ".") for prefix in RUN_SETTINGS)
        (plan.ignored if is_run_setting else plan.refused).append(change)
    searcher = current_settings.get("search.searcher")
    if plan.samples < plan.stored_samples:
        plan.refused.append(SpecChange("search.num_samples", plan.stored_samples, plan.samples))
    elif plan.samples > plan.stored_samples and searcher not in EXTENDABLE_SEARCHERS:
        plan.refused.append(SpecChange(f"search.num_samples (searcher {searcher} cannot be extended; "
                                       f"{' or '.join(EXTENDABLE_SEARCHERS)} can)", plan.stored_samples,
                                       plan.samples))
    return plan


def check_resume(stored: Mapping[str, Any], current: Mapping[str, Any], name: str, where: str) -> ResumePlan:
    """The plan, or SearchChanged naming every refused change and the way out."""
    plan = compare_specs(stored, current)
    if plan.refused:
        changes = "\n".join(f"  - {change.describe()}" for change in plan.refused)
        raise SearchChanged(
            f"search {name!r} ({where}) was started with other settings; running it again would mix trials of "
            f"two different searches, so nothing was run:\n{changes}\n"
            f"To search with the new settings, give the search a new name (e.g. search.name={name}-2); to resume "
            f"or extend this one, run it with its stored settings ({where}/{SPEC_FILE}). Only "
            "search.num_samples may grow, and resources and concurrency may change.")
    return plan


def describe_plan(plan: ResumePlan) -> list[str]:
    """Lines for the log: an extension, and run settings that changed."""
    lines = []
    if plan.extends:
        lines.append(f"extending the search from {plan.stored_samples} to {plan.samples} trials "
                     "(finished trials are kept; the new ones are suggested from their results)")
    lines += [f"changed run setting {change.describe()}" for change in plan.ignored]
    return lines


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def _normal_distribution(spec: Any) -> Any:
    if isinstance(spec, Mapping) and len(spec) == 1:
        (kind, args), = spec.items()
        if kind in _RANGE_KINDS and isinstance(args, (list, tuple)):
            return {kind: [_number(value) for value in args]}
    return spec


def _number(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() else number
