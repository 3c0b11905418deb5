"""ASHA search over ProtoNet meta-training (lr, optimiser, weight decay, cosine scale, training way and
shot, episodes per epoch, augmentation strength, BatchNorm mode, epochs).

Each trial is a whole Ray Train run with its own workers (`base.compute`), started from inside the Tune
trial as Ray 2.5x+ recommends; Tune's report bridge forwards its per-epoch meta-val accuracy, and ASHA
stops the weak trials at its rungs. Every trial scores the same fixed meta-validation tasks (way and shot
pinned by the search), so trials are comparable. The best trial's best epoch is registered and tested once.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from metallo_core import tracking
from metallo_core.config import config_hash, from_dict, to_dict, to_yaml
from metallo_core.data.manifest import read_manifest
from metallo_core.errors import MetalloError
from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
from metallo_core.storage import locate
from metallo_core.tuning import runner, search_runs, trials
from metallo_core.tuning.config import MetaTrainSearchConfig
from metallo_core.tuning.final_test import Variant, logged_final_test, score_variants_on_test
from metallo_core.tuning.resume import search_spec
from metallo_core.tuning.space import apply_params, describe_params

METRIC = "best_val_accuracy"  # the best epoch so far: what the trial would register
TIME_ATTR = "epochs_done"


@dataclass
class MetaTrainSearchResult:
    parent_run_id: str
    resumed: bool
    best_trial: str
    best_params: dict[str, Any]
    best_val_accuracy: float
    model_uri: str | None
    best_config: list[str]
    trials: str
    final_test: dict[str, Any]


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str,
                 context: dict[str, Any]) -> MetaTrainConfig:
    """The meta-training config of one trial: the base with the sampled params, its own run name and
    storage, in the search's MLflow experiment, not registered and not gated (only the winner is)."""
    plain = apply_params(base, params)
    plain["run"] = {**plain["run"], "name": f"{context['search']}-{trial_id}", "experiment": context["experiment"],
                    "storage": context["train_storage"]}
    plain["registry"] = {**plain["registry"], "register": False}
    plain["gate"] = {**plain.get("gate", {}), "uri": ""}
    return from_dict(MetaTrainConfig, plain)


def metatrain_trial(params: dict, *, context: dict) -> None:
    """One Tune trial: a Ray Train meta-training run whose epoch reports reach Tune (and so ASHA)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from metallo_core.train.metatrain import run_metatraining

    os.environ[tracking.ENV_TRACKING_URI] = context["tracking_uri"]
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(context["base"], params, trial_id, context)
    config.validate()
    tags = {search_runs.TRIAL_TAG: trial_id, search_runs.SEARCH_TAG: context["search"],
            "metallo.stage": "tune-metatrain-trial"}
    result = run_metatraining(config, parent_run_id=context["parent_run_id"], extra_tags=tags,
                              train_callbacks=(TuneReportCallback(),))
    if result.epochs_done >= config.epochs:
        # A trial resumed after its training had finished reports nothing from Train: report the record.
        tune.report({METRIC: result.best_val_accuracy, TIME_ATTR: result.epochs_done})


def run_metatrain_search(config: MetaTrainSearchConfig) -> MetaTrainSearchResult:
    from metallo_core.train.metatrain import pinned_inputs, plan_validation_episodes

    config = copy.deepcopy(config)
    base = pinned_inputs(config.base)
    # Every trial is scored on the same tasks: pin the meta-val way and shot before the space moves the
    # training way and shot.
    base.val_way = base.val_way or base.episodes.way
    base.val_shot = base.val_shot or base.episodes.shot
    tracking.configure()
    manifest = read_manifest(base.data.uri)
    for split in (base.data.train_split, base.data.val_split, base.data.test_split):
        manifest.split(split)
    plan_validation_episodes(base)  # too few classes fail here, before any trial starts
    settings = config.search
    location = search_runs.search_location(settings)
    # Compared with the stored search before anything runs or its MLflow run is reopened (absolute URIs,
    # pinned meta-val task shape: what the trials actually use).
    stored_spec = search_spec(dataclasses.replace(config, base=base))
    runner.check_stored_spec(settings, stored_spec)
    lineage = {
        "metallo.stage": "tune-metatrain",
        "metallo.backbone_source": base.backbone.source,
        **tracking.dataset_tags(base.data.uri),
        "metallo.config_hash": config_hash(config),
        search_runs.SEARCH_TAG: settings.name,
    }
    from metallo_core.train import ray_setup

    ray_setup.connect(settings.ray_address or base.compute.ray_address,
                      "search.ray_address" if settings.ray_address else "base.compute.ray_address")
    from ray import tune

    with tracking.open_run(settings.experiment, f"search-{settings.name}", config=config, tags=lineage) as parent:
        context = {
            "base": to_dict(base),
            "search": settings.name,
            "experiment": settings.experiment,
            "train_storage": location.join("train").uri,
            "parent_run_id": parent.run_id,
            "tracking_uri": tracking.tracking_uri(),
        }
        spec = runner.SearchSpec.build(settings, tune.with_parameters(metatrain_trial, context=context),
                                       config.space, metric=METRIC, time_attr=TIME_ATTR,
                                       budget=_epoch_budget(config),
                                       trial_budget=lambda params: int(params.get("epochs", base.epochs)),
                                       stored_spec=stored_spec)
        rows, resumed = runner.run_trials(spec, parent.run_id)
        best = trials.best_trial(rows)
        table = search_runs.log_search_summary(parent, rows, best, spec.metric, spec.time_attr)
        best_config = trial_config(context["base"], best.params, best.trial_id, context)
        model_uri = _register_best(best_config, best, config, parent.run_id)
        # The winner's config as a plain meta-training config: run it as is for a full-length model.
        final_config = copy.deepcopy(best_config)
        final_config.run = copy.deepcopy(base.run)
        final_config.registry = copy.deepcopy(base.registry)
        written = search_runs.write_best_config(settings, _best_yaml(final_config, best, settings.name), parent)
        print(f"search {settings.name!r}: best trial {best.trial_id}, meta-val accuracy {100 * best.objective:.2f}% "
              f"({describe_params(best.params)}); registered {model_uri}", flush=True)

        final: dict[str, Any] = {}
        if config.final_test.enabled and model_uri:
            if search_runs.final_test_done(parent.run_id, best.trial_id):
                final = logged_final_test(parent.run_id)
                print("the final test of this search already ran; its logged result is kept", flush=True)
            else:
                final = score_variants_on_test(_final_test_config(config, base, model_uri, settings),
                                               {mode: Variant(mode, {}) for mode in config.final_test.modes},
                                               parent, gains=[("finetune", "protonet")])
                parent.set_tags({search_runs.FINAL_TEST_TRIAL_TAG: best.trial_id})
    return MetaTrainSearchResult(parent_run_id=parent.run_id, resumed=resumed, best_trial=best.trial_id,
                                 best_params=best.params, best_val_accuracy=best.objective, model_uri=model_uri,
                                 best_config=written, trials=table, final_test=final)


def _epoch_budget(config: MetaTrainSearchConfig) -> int:
    """ASHA's max_t: the most epochs any trial can run (the space may search the epoch count)."""
    spec = config.space.get("epochs")
    if isinstance(spec, dict):
        (kind, values), = spec.items()
        return int(max(values) if kind in ("choice", "grid") else float(values[1]))
    return int(spec) if spec is not None else config.base.epochs


def _register_best(best_config: MetaTrainConfig, best: trials.TrialRow, config: MetaTrainSearchConfig,
                   parent_run_id: str) -> str | None:
    """Register the best trial's best epoch (from its last checkpoint) under the base config's registry
    name and alias, with lineage tags pointing at the trial's run and at the search."""
    from metallo_core.train import ray_setup
    from metallo_core.train.checkpoints import latest_checkpoint_record, load_checkpoint_from
    from metallo_core.train.metatrain import register_protonet

    if not config.base.registry.register:
        return None
    found = latest_checkpoint_record(locate(ray_setup.storage_uri(best_config.run)).join(best_config.run.name))
    if found is None:
        raise MetalloError(f"the best trial {best.trial_id} left no checkpoint under {best_config.run.storage}")
    state, record = load_checkpoint_from(found[0])
    client = tracking.client()
    children = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`{search_runs.TRIAL_TAG}` = '{best.trial_id}'", max_results=1)
    if not children:
        raise MetalloError(f"no MLflow run of the best trial {best.trial_id}")
    child = children[0]
    lineage = {key: value for key, value in child.data.tags.items() if key.startswith("metallo.")
               and key not in ("metallo.version",)}
    lineage["metallo.tune.parent_run_id"] = parent_run_id
    registered = copy.deepcopy(best_config)
    registered.registry = copy.deepcopy(config.base.registry)
    return register_protonet(registered, state, record, child.info.run_id, lineage)


def _final_test_config(config: MetaTrainSearchConfig, base: MetaTrainConfig, model_uri: str,
                       settings) -> EvaluateConfig:
    test = config.final_test
    return from_dict(EvaluateConfig, {
        "model": model_uri,
        "data": to_dict(base.data),
        "split": base.data.test_split,
        "episodes": {"way": base.val_way, "shot": test.shot or base.val_shot, "query": test.query,
                     "cap_query": base.episodes.cap_query},
        "tasks": test.tasks,
        "modes": list(test.modes),
        "seed": test.seed,
        "parallelism": test.parallelism,
        "cpus_per_actor": test.cpus_per_actor,
        "gpus_per_actor": test.gpus_per_actor,
        "experiment": settings.experiment,
        "ray_address": settings.ray_address,
    })


def _best_yaml(best: MetaTrainConfig, row: trials.TrialRow, search: str) -> str:
    header = (f"# The best meta-training config of search {search!r}: trial {row.trial_id}, best meta-val accuracy "
              f"{100 * row.objective:.2f}% after {row.budget_used:g} epoch(s).\n"
              "# Train it at full length: metallo metatrain --config <this file>\n")
    return header + to_yaml(best)


def describe_result(result: MetaTrainSearchResult) -> str:
    lines = [result.trials, "",
             f"best trial {result.best_trial}: meta-val accuracy {100 * result.best_val_accuracy:.2f}%"
             f" ({describe_params(result.best_params)})", f"best config: {', '.join(result.best_config)}"]
    if result.model_uri:
        lines.append(f"registered: {result.model_uri}")
    for name, value in result.final_test.get("variants", {}).items():
        lines.append(f"  test {name:<10} {100 * value['mean']:6.2f}% ± {100 * value['ci95']:.2f} "
                     f"({result.final_test['task']}, {result.final_test['tasks']} tasks)")
    lines.append(f"MLflow parent run {result.parent_run_id}; see it with: {tracking.ui_command()}")
    return "\n".join(lines)
