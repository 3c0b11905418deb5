"""The `multilabel experiments` stage: seed 002's experiment grid as one command, every (model variant, test
fraction) of `multilabel.grid.trial_specs` a Ray Tune trial.

The driver resolves the backbone and computes (or loads from the cache) the features once
(`train.multilabel.prepare_inputs`); Tune ships them to every trial through the object store, so a trial
only trains heads (seconds to minutes). The trials run through the searches' runner (`tuning.runner`) as a
Tune grid over the trial specs' indices: each logs a child MLflow run under one parent run, closed with how
its trial ended; the parent gets the tables (`multilabel.tables`) as markdown and JSON.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from metallo_core import tracking
from metallo_core.config import from_dict
from metallo_core.errors import MetalloError
from metallo_core.multilabel.config import ExperimentsConfig, MultilabelConfig
from metallo_core.multilabel.features import InputTable
from metallo_core.multilabel.grid import trial_name, trial_specs
from metallo_core.multilabel.properties import PropertyInfo
from metallo_core.multilabel.tables import render_tables
from metallo_core.multilabel.train import CUMULATIVE
from metallo_core.tuning import runner, search_runs
from metallo_core.tuning.config import SearchSettings

# What a trial reports that goes into the tables (besides its `error/<property>` values).
ROW_KEYS = ("variant", "test_fraction", CUMULATIVE, "epochs_to_saturation", "epochs_trained", "num_train", "num_test",
            "seconds", "run_id")


@dataclass
class ExperimentsResult:
    parent_run_id: str
    backbone: str
    feature_cache: str | None
    rows: list[dict[str, Any]]
    tables: str  # markdown
    failed_trials: list[str] = field(default_factory=list)


def run_trial(spec: dict[str, Any], tables: dict[str, InputTable], properties: list[dict], *,
              parent_run_id: str | None, tracking_uri: str, torch_threads: int = 1,
              extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one model of the grid on the shared table and log it as a child run; returns its table row."""
    import torch

    from metallo_core.multilabel.split import stratified_split
    from metallo_core.train.multilabel import (
        PreparedInputs,
        log_history,
        make_image_encoder,
        summary_metrics,
        train_model,
    )

    os.environ[tracking.ENV_TRACKING_URI] = tracking_uri
    torch.set_num_threads(torch_threads)
    config = from_dict(MultilabelConfig, spec["config"])
    wanted = [prop.name for prop in config.properties]
    infos = [PropertyInfo.from_dict(item) for name in wanted for item in properties if item["name"] == name]
    table = tables[spec["input"]]
    train_rows, test_rows = stratified_split(table.dataset_labels, config.data.test_fraction, config.data.split_seed)
    image_size = int(table.inputs.shape[1]) if table.kind == "images" else 0
    prepared = PreparedInputs(table, infos, train_rows, test_rows, image_size, backbone=None)
    image_encoder, feature_dim = make_image_encoder(config, None) if table.kind == "images" else (None, None)
    tags = {"metallo.stage": "multilabel-trial", "metallo.variant": spec["variant"],
            "metallo.test_fraction": spec["test_fraction"], "metallo.encoder": config.encoder, **(extra_tags or {})}
    with tracking.start_run(config.run.experiment, config.run.name, config=config, tags=tags,
                            parent_run_id=parent_run_id) as run:
        trained = train_model(config, prepared, image_encoder=image_encoder, feature_dim=feature_dim)
        log_history(run.run_id, trained.history)
        run.log_metrics(summary_metrics(trained, prepared), step=trained.history.epochs_trained)
        run_id = run.run_id
    return {
        "variant": spec["variant"],
        "test_fraction": spec["test_fraction"],
        **{f"error/{name}": value for name, value in trained.errors.items()},
        CUMULATIVE: trained.cumulative_error,
        "epochs_to_saturation": trained.saturation_epoch,
        "epochs_trained": trained.history.epochs_trained,
        "num_train": len(train_rows),
        "num_test": len(test_rows),
        "seconds": round(trained.history.seconds, 1),
        "run_id": run_id,
    }


def grid_trial(params: dict, *, specs: list[dict[str, Any]], tables: dict[str, InputTable], properties: list[dict],
               context: dict[str, Any]) -> None:
    """One Tune trial: the grid's trial `params["index"]`, its child run tagged as the runner expects."""
    from ray import tune

    tags = {search_runs.TRIAL_TAG: tune.get_context().get_trial_id(), search_runs.SEARCH_TAG: context["search"]}
    row = run_trial(specs[params["index"]], tables, properties, parent_run_id=context["parent_run_id"],
                    tracking_uri=context["tracking_uri"], torch_threads=context["torch_threads"], extra_tags=tags)
    tune.report(row)


def run_sweep(config: ExperimentsConfig, specs: list[dict[str, Any]], tables: dict[str, InputTable],
              properties: list[dict], parent_run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """All trials as parallel Tune trials (one CPU each by default) through the searches' runner: a grid
    of unranked trials, none retried, under a Tune experiment of its own; returns (rows in grid order,
    failure messages)."""
    from ray import tune

    from metallo_core.train import ray_setup

    ray_setup.connect(config.tune.ray_address, "tune.ray_address")
    settings = SearchSettings(
        name=f"{config.run.name}-{parent_run_id[:12]}", experiment=config.run.experiment,
        storage=str(tracking.local_home() / "ray"), num_samples=1,
        max_concurrent_trials=config.tune.max_concurrent_trials or os.cpu_count() or 1,
        searcher="random", scheduler="fifo", cpus_per_trial=config.tune.cpus_per_trial, max_failures=0)
    context = {"parent_run_id": parent_run_id, "tracking_uri": tracking.tracking_uri(), "search": settings.name,
               "torch_threads": max(1, int(config.tune.cpus_per_trial))}
    trainable = tune.with_parameters(grid_trial, specs=specs, tables=tables, properties=properties, context=context)
    names = [trial_name(spec["variant"], spec["test_fraction"]) for spec in specs]
    # Image-training trials (the small CNN) take longest: start them first so they overlap the rest.
    launch_order = sorted(range(len(specs)), key=lambda index: specs[index]["input"] != "images")
    # One report per trial, at its end: Tune's own iteration count says whether it got there.
    spec = runner.SearchSpec.build(settings, trainable, {"index": {"grid": launch_order}}, metric=None,
                                   time_attr="training_iteration", budget=1,
                                   trial_name=functools.partial(_trial_name, names), describe_result=_describe_row)
    trials, _ = runner.run_trials(spec, parent_run_id, interrupted_ok=True)
    rows, failures = [], []
    for trial in sorted(trials, key=lambda trial: trial.params["index"]):
        name = names[trial.params["index"]]
        if trial.error:
            failures.append(f"{name}: {trial.error}")
        elif not trial.completed:
            failures.append(f"{name}: did not finish (the sweep was interrupted)")
        else:
            rows.append({key: value for key, value in trial.metrics.items()
                         if key in ROW_KEYS or key.startswith("error/")})
    return rows, failures


def _trial_name(names: list[str], config: dict[str, Any]) -> str:
    return names[config["index"]]


def _describe_row(result: dict[str, Any]) -> str:
    errors = " ".join(f"{key.removeprefix('error/')}={value:.4f}" for key, value in result.items()
                      if key.startswith("error/"))
    return f"{errors} (epochs {result.get('epochs_trained')}, {result.get('seconds')} s)"


def run_experiments(config: ExperimentsConfig) -> ExperimentsResult:
    from metallo_core.train.multilabel import (
        check_dataset,
        lineage_tags,
        prepare_inputs,
        with_absolute_locations,
    )

    config = with_absolute_locations(config)
    tracking.configure()
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    manifest, properties = check_dataset(config)
    specs = trial_specs(config)
    tables: dict[str, InputTable] = {}
    backbone = None
    feature_cache = None
    lineage_source = None
    if any(spec["input"] == "features" for spec in specs):
        prepared = prepare_inputs(config, manifest, properties)
        tables["features"], backbone, feature_cache = prepared.table, prepared.backbone, prepared.table.cache_path
        lineage_source = prepared
        print(f"backbone: {backbone.description}; features {prepared.table.inputs.shape} "
              f"({'from cache ' if prepared.table.from_cache else 'extracted, cached at '}{feature_cache})",
              file=sys.stderr, flush=True)
    cnn_specs = [spec for spec in specs if spec["input"] == "images"]
    if cnn_specs:
        cnn_config = from_dict(MultilabelConfig, cnn_specs[0]["config"])
        prepared_images = prepare_inputs(cnn_config, manifest, properties)
        tables["images"] = prepared_images.table
        lineage_source = lineage_source or prepared_images
    tags = {**lineage_tags(config, lineage_source), "metallo.stage": "multilabel-experiments"}
    describe_backbone = backbone.description if backbone else "none (small CNN only)"
    with tracking.start_run(config.run.experiment, config.run.name, config=config, tags=tags) as parent:
        rows, failures = run_sweep(config, specs, tables, [p.to_dict() for p in properties], parent.run_id)
        tables_markdown = render_tables(rows, config, properties, describe_backbone,
                                        random_init=bool(backbone and backbone.random_init))
        parent.log_text(tables_markdown, "seed002_tables.md")
        parent.log_dict({"rows": rows, "failed_trials": failures, "backbone": describe_backbone},
                        "seed002_results.json")
        parent.log_metrics({f"{row['variant']}/test{row['test_fraction']:g}/{CUMULATIVE}": row[CUMULATIVE]
                            for row in rows})
        if failures:
            parent.set_tags({"metallo.failed_trials": "; ".join(failures)[:4000]})
        result = ExperimentsResult(parent.run_id, describe_backbone, feature_cache, rows, tables_markdown, failures)
    if failures:
        print(tables_markdown)
        raise MetalloError(f"{len(failures)} trial(s) failed (tables above hold the others): " + "; ".join(failures))
    return result


def describe_experiments(result: ExperimentsResult) -> str:
    return (f"{result.tables}\n\nMLflow parent run {result.parent_run_id} ({len(result.rows)} child runs); "
            f"see it with: {tracking.ui_command()}")


def summary_for_json(result: ExperimentsResult) -> dict[str, Any]:
    return {"parent_run_id": result.parent_run_id, "backbone": result.backbone, "feature_cache": result.feature_cache,
            "rows": result.rows, "failed_trials": result.failed_trials}

