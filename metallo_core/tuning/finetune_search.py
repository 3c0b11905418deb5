"""Search over meta-test fine-tuning settings (lr, steps, pseudo-query form and cache stage, crops and
augmentations, which layers are updated, BatchNorm mode) with Optuna through Ray Tune.

Every trial fine-tunes the same registered ProtoNet on the same fixed meta-validation tasks (planned once
by the driver and logged on the parent run), on its share of a GPU where there is one; the objective is
the mean meta-val accuracy, never a test number. The winner is then scored once on test tasks against
the default settings, on the same tasks.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.config import config_hash, from_dict, to_dict, to_yaml
from metallo_core.data.manifest import read_manifest
from metallo_core.storage import locate
from metallo_core.tracking.finetune_choice import record_chosen_settings
from metallo_core.tuning import runner, search_runs, trials
from metallo_core.tuning.config import FinetuneSearchConfig
from metallo_core.tuning.final_test import Variant, logged_final_test, score_variants_on_test
from metallo_core.tuning.resume import search_spec
from metallo_core.tuning.space import apply_params, describe_params

METRIC = "val_accuracy"
TIME_ATTR = "tasks_done"


@dataclass
class FinetuneSearchResult:
    parent_run_id: str
    resumed: bool
    best_trial: str
    best_settings: dict[str, Any]
    best_val_accuracy: float
    best_config: list[str]  # where the best config YAML was written
    trials: str  # markdown table
    final_test: dict[str, Any]


def finetune_trial(params: dict, *, context: dict) -> None:
    """One Tune trial: fine-tune on each fixed meta-val task with the sampled settings, reporting the
    running mean every `report_every` tasks (to MLflow as a curve and to Tune for its scheduler).

    Each report carries the per-task accuracies so far as the trial's checkpoint: a trial restored after its
    search was stopped (Ctrl-C, a killed driver) goes on from its last reported task, not from the first."""
    import torch
    from ray import tune

    from metallo_core.data.class_index import ClassIndexedImages
    from metallo_core.fewshot.episodes import episodes_from_json
    from metallo_core.fewshot.evaluation import PreparedImages, engine_accuracies
    from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.tracking.protonet_store import load_protonet

    os.environ[tracking.ENV_TRACKING_URI] = context["tracking_uri"]
    torch.set_num_threads(context["threads"])
    trial_id = tune.get_context().get_trial_id()
    plain = apply_params({"finetune": context["finetune"]}, params)["finetune"]
    settings = from_dict(FinetuneSettings, plain, "finetune")
    settings.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec, _ = load_protonet(context["model"])
    model.to(device)
    images = ClassIndexedImages.load(context["data_uri"], context["split"],
                                     image_size=context["image_size"] or spec.image_size)
    episodes, _ = episodes_from_json(context["val_json"], images.indices_by_class, "the meta-validation tasks")
    normalizer = ImageNormalizer(spec.mean, spec.std, device=device)
    engine = FinetuneEngine(model, settings, normalizer)
    prepared = PreparedImages(engine, images.images, context["precision"])  # once for every task of the trial
    tags = {search_runs.TRIAL_TAG: trial_id, search_runs.SEARCH_TAG: context["search"],
            "metallo.stage": "tune-finetune-trial", "metallo.model_uri": context["model"]}
    accuracies = _restored_accuracies(tune.get_checkpoint())
    with tracking.open_run(context["experiment"], f"{context['search']}-{trial_id}", config={"finetune": plain},
                           tags=tags, parent_run_id=context["parent_run_id"]) as run:
        every = context["report_every"]
        if accuracies and len(accuracies) >= len(episodes):  # restored after its last report: report it again
            tune.report(_running_mean(accuracies))
        for start in range(len(accuracies), len(episodes), every):
            # Seeds by task index (finetune.task_generator), so a trial is reproducible chunk by chunk.
            chunk = engine_accuracies(engine, prepared, episodes[start:start + every], "finetune",
                                      seed=context["seed"], precision=context["precision"], first_task=start)
            accuracies += chunk
            result = _running_mean(accuracies)
            run.log_metrics(result, step=len(accuracies))
            with tempfile.TemporaryDirectory() as directory:
                (Path(directory) / ACCURACIES_FILE).write_text(json.dumps(accuracies))
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))


ACCURACIES_FILE = "accuracies.json"  # a fine-tuning trial's checkpoint: its per-task accuracies so far


def _restored_accuracies(checkpoint) -> list[float]:
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        return [float(value) for value in json.loads((Path(directory) / ACCURACIES_FILE).read_text())]


def _running_mean(accuracies: list[float]) -> dict[str, float]:
    from metallo_core.fewshot.metrics import mean_and_ci95

    mean, ci95 = mean_and_ci95(accuracies) if len(accuracies) > 1 else (accuracies[0], 0.0)
    return {METRIC: mean, "val_ci95": ci95, TIME_ATTR: len(accuracies)}


def run_finetune_search(config: FinetuneSearchConfig) -> FinetuneSearchResult:
    from metallo_core.tracking.registry import pin_model_uri
    from metallo_core.train import ray_setup
    from metallo_core.train.evaluate import plan_tasks

    config = copy.deepcopy(config)
    evaluate = config.evaluate
    evaluate.data.uri = locate(evaluate.data.uri).uri
    tracking.configure()
    manifest = read_manifest(evaluate.data.uri)
    manifest.split(evaluate.data.val_split)
    manifest.split(evaluate.split)
    # Pinned once: every trial and the final test score the same version, even if the alias moves.
    model_uri = evaluate.model = pin_model_uri(evaluate.model)
    _, val_json = plan_tasks(evaluate.data.uri, evaluate.data.val_split, evaluate, config.val_tasks,
                             seed=evaluate.seed + 7)
    settings = config.search
    # Compared with the stored search before anything runs (and before its MLflow run is reopened, so a
    # refusal never marks a finished search failed); the model is pinned and the data URI absolute first.
    stored_spec = search_spec(config)
    runner.check_stored_spec(settings, stored_spec)
    ray_setup.connect(config.search.ray_address, "search.ray_address")
    lineage = {
        "metallo.stage": "tune-finetune",
        "metallo.model_uri": model_uri,
        **tracking.dataset_tags(evaluate.data.uri),
        "metallo.task": f"{evaluate.episodes.way}-way {evaluate.episodes.shot}-shot",
        "metallo.config_hash": config_hash(config),
        search_runs.SEARCH_TAG: settings.name,
    }
    with tracking.open_run(settings.experiment, f"search-{settings.name}", config=config, tags=lineage) as parent:
        parent.log_text(val_json, "episodes/meta_val_search.json")
        context = {
            "model": model_uri,
            "data_uri": evaluate.data.uri,
            "split": evaluate.data.val_split,
            "image_size": evaluate.data.image_size,
            "val_json": val_json,
            "finetune": to_dict(evaluate.finetune),
            "precision": evaluate.precision,
            "seed": evaluate.seed,
            "report_every": config.report_every_tasks,
            "threads": max(1, int(round(settings.cpus_per_trial))),
            "experiment": settings.experiment,
            "search": settings.name,
            "parent_run_id": parent.run_id,
            "tracking_uri": tracking.tracking_uri(),
        }
        from ray import tune

        spec = runner.SearchSpec.build(settings, tune.with_parameters(finetune_trial, context=context),
                                       config.space, metric=METRIC, time_attr=TIME_ATTR, budget=config.val_tasks,
                                       stored_spec=stored_spec)
        rows, resumed = runner.run_trials(spec, parent.run_id)
        best = trials.best_trial(rows)
        table = search_runs.log_search_summary(parent, rows, best, spec.metric, spec.time_attr)
        best_settings = from_dict(type(evaluate.finetune), apply_params(
            {"finetune": to_dict(evaluate.finetune)}, best.params)["finetune"], "finetune")
        best_config = copy.deepcopy(config.evaluate)
        best_config.finetune = best_settings
        written = search_runs.write_best_config(settings, _best_yaml(best_config, best, settings.name), parent)
        # Whole, on the parent run and the model version: what classify --finetune uses for this model.
        record_chosen_settings(parent.run_id, model_uri, best_settings,
                               f"search {settings.name!r}, best of {len(rows)} trials on {config.val_tasks} "
                               f"meta-validation tasks ({100 * best.objective:.2f}%)")
        print(f"search {settings.name!r}: best trial {best.trial_id} with meta-val accuracy "
              f"{100 * best.objective:.2f}% ({describe_params(best.params)})", flush=True)

        if not config.final_test:
            final = {}
        elif search_runs.final_test_done(parent.run_id, best.trial_id):
            final = logged_final_test(parent.run_id)
            print("the final test of this search already ran; its logged result:", flush=True)
        else:
            variants = {
                "protonet": Variant("protonet", {}),
                "finetune_default": Variant("finetune", to_dict(evaluate.finetune)),
                "finetune_best": Variant("finetune", to_dict(best_settings)),
            }
            final = score_variants_on_test(evaluate, variants, parent, gains=[
                ("finetune_best", "finetune_default"), ("finetune_best", "protonet"),
                ("finetune_default", "protonet")])
            parent.set_tags({search_runs.FINAL_TEST_TRIAL_TAG: best.trial_id})
    return FinetuneSearchResult(parent_run_id=parent.run_id, resumed=resumed, best_trial=best.trial_id,
                                best_settings=to_dict(best_settings), best_val_accuracy=best.objective,
                                best_config=written, trials=table, final_test=final)


def _best_yaml(best: Any, row: trials.TrialRow, search: str) -> str:
    header = (f"# The best fine-tuning settings of search {search!r}: trial {row.trial_id}, meta-val accuracy "
              f"{100 * row.objective:.2f}%.\n# Use it as an evaluation config: metallo evaluate --config <this file>\n")
    return header + to_yaml(best)


def describe_result(result: FinetuneSearchResult) -> str:
    lines = [result.trials, "",
             f"best trial {result.best_trial}: meta-val accuracy {100 * result.best_val_accuracy:.2f}%",
             f"best config: {', '.join(result.best_config)}"]
    for name, value in result.final_test.get("variants", {}).items():
        lines.append(f"  test {name:<18} {100 * value['mean']:6.2f}% ± {100 * value['ci95']:.2f}")
    for name, value in result.final_test.get("gains", {}).items():
        lines.append(f"  test {name}: {100 * value['mean']:+.2f} ± {100 * value['ci95']:.2f} points (paired)")
    lines.append(f"MLflow parent run {result.parent_run_id}; see it with: {tracking.ui_command()}")
    return "\n".join(lines)

