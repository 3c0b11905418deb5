"""Seed 002's experiment grid as one command: every (model variant, test fraction) is a Ray Tune trial.

The driver resolves the backbone and computes (or loads from the cache) the features once; Tune ships
them to every trial through the object store, so a trial only trains heads (seconds to minutes). Each
trial logs a child MLflow run under one parent run; the parent gets the tables as markdown and JSON.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from metallo_core import tracking
from metallo_core.config import from_dict, to_dict
from metallo_core.errors import MetalloError
from metallo_core.multilabel.config import (
    ExperimentsConfig,
    MultilabelConfig,
    VariantSettings,
)
from metallo_core.multilabel.features import InputTable
from metallo_core.multilabel.properties import PropertyInfo
from metallo_core.multilabel.train import CUMULATIVE

# Seed 002 (Senapati 2020), frozen ImageNet ResNet-50, 3,500 images. (test fraction) -> (error, epochs).
SEED002_SINGLE = {
    "morphology": {0.1: (0.0, 38), 0.5: (0.0, 698), 0.9: (0.003175, 1024), 0.95: (0.026466, 1024)},
    "volume_fraction_class": {0.1: (0.004011, 212), 0.5: (0.009882, 902), 0.9: (0.023556, 1024),
                              0.95: (0.062126, 1024)},
}
# Table 3: bifurcated head, fc width -> (cumulative error, saturation epochs); the split is not stated.
SEED002_BIFURCATED = {100: (0.081429, 320), 1000: (0.080119, 521)}
SEED002_PAIR = ("morphology", "volume_fraction_class")
EXPERIMENTS_ONLY_KEYS = ("test_fractions", "variants", "tune")


@dataclass
class ExperimentsResult:
    parent_run_id: str
    backbone: str
    feature_cache: str | None
    rows: list[dict[str, Any]]
    tables: str  # markdown
    failed_trials: list[str] = field(default_factory=list)


def variant_properties(config: ExperimentsConfig, variant: VariantSettings) -> list[str]:
    return list(variant.properties) or [prop.name for prop in config.properties]


def trial_config(config: ExperimentsConfig, variant: VariantSettings, test_fraction: float) -> MultilabelConfig:
    """The single-model config one trial trains: the grid's settings with the variant's choices."""
    plain = {key: value for key, value in to_dict(config).items() if key not in EXPERIMENTS_ONLY_KEYS}
    names = variant_properties(config, variant)
    plain["properties"] = [prop for name in names for prop in plain["properties"] if prop["name"] == name]
    plain["encoder"] = variant.encoder
    plain["head"]["fc_width"] = variant.fc_width
    plain["data"]["test_fraction"] = test_fraction
    if variant.max_epochs:
        plain["optim"]["max_epochs"] = variant.max_epochs
    plain["run"]["name"] = trial_name(variant.name, test_fraction)
    plain["registry"]["register"] = False  # a grid of throw-away models; `multilabel train` registers one
    return from_dict(MultilabelConfig, plain)


def trial_name(variant: str, test_fraction: float) -> str:
    return f"{variant}@test{test_fraction:g}"


def trial_specs(config: ExperimentsConfig) -> list[dict[str, Any]]:
    specs = []
    for variant in config.variants:
        for fraction in variant.test_fractions or config.test_fractions:
            single = trial_config(config, variant, fraction)
            specs.append({
                "variant": variant.name,
                "test_fraction": fraction,
                "input": "images" if variant.encoder == "small_cnn" else "features",
                "config": to_dict(single),
            })
    return specs


def run_trial(spec: dict[str, Any], tables: dict[str, InputTable], properties: list[dict], *,
              parent_run_id: str | None, tracking_uri: str, torch_threads: int = 1) -> dict[str, Any]:
    """Train one model of the grid on the shared table and log it as a child run; returns its table row."""
    import torch

    from metallo_core.multilabel.pipeline import (
        PreparedInputs,
        log_history,
        make_image_encoder,
        summary_metrics,
        train_model,
    )
    from metallo_core.multilabel.split import stratified_split

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
            "metallo.test_fraction": spec["test_fraction"], "metallo.encoder": config.encoder}
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


def _tune_trial(params: dict, specs=None, tables=None, properties=None, context=None) -> None:
    from ray import tune

    row = run_trial(specs[params["index"]], tables, properties, parent_run_id=context["parent_run_id"],
                    tracking_uri=context["tracking_uri"], torch_threads=context["torch_threads"])
    tune.report(row)


def _progress_callback(names: list[str]):
    """A Tune callback printing one line per finished (or failed) trial to stderr."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self):
            self.finished = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            result = trial.last_result or {}
            errors = " ".join(f"{key.removeprefix('error/')}={value:.4f}" for key, value in result.items()
                              if key.startswith("error/"))
            print(f"[sweep] {self.finished}/{len(names)} {names[trial.config['index']]}: {errors} "
                  f"(epochs {result.get('epochs_trained')}, {result.get('seconds')} s)", file=sys.stderr, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.finished += 1
            print(f"[sweep] {self.finished}/{len(names)} {names[trial.config['index']]}: FAILED", file=sys.stderr,
                  flush=True)

    return TrialProgress()


def run_sweep(config: ExperimentsConfig, specs: list[dict[str, Any]], tables: dict[str, InputTable],
              properties: list[dict], parent_run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """All trials as parallel Tune trials (one CPU each by default); returns (rows, failure messages)."""
    from metallo_core.train import ray_setup

    ray_setup.connect(config.tune.ray_address)
    from ray import tune

    concurrent = config.tune.max_concurrent_trials or os.cpu_count() or 1
    context = {"parent_run_id": parent_run_id, "tracking_uri": tracking.tracking_uri(),
               "torch_threads": max(1, int(config.tune.cpus_per_trial))}
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, specs=specs, tables=tables, properties=properties, context=context),
        {"cpu": config.tune.cpus_per_trial},
    )
    names = [trial_name(spec["variant"], spec["test_fraction"]) for spec in specs]
    # Image-training trials (the small CNN) take longest: start them first so they overlap the rest.
    launch_order = sorted(range(len(specs)), key=lambda index: specs[index]["input"] != "images")
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(launch_order)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda trial: names[trial.config["index"]],
            trial_dirname_creator=lambda trial: f"{names[trial.config['index']]}-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"{config.run.name}-{parent_run_id[:12]}",
            storage_path=str(tracking.local_home() / "ray"),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,  # Tune's status boxes would bury the tables; one line per finished trial instead
            callbacks=[_progress_callback(names)],
        ),
    )
    grid = tuner.fit()
    rows, failures = [], []
    for result in grid:
        if result.error is not None:
            failures.append(f"{names[result.config['index']]}: {result.error}")
        elif "variant" not in (result.metrics or {}):
            failures.append(f"{names[result.config['index']]}: did not finish (the sweep was interrupted)")
        else:
            rows.append({key: value for key, value in result.metrics.items()
                         if key in ("variant", "test_fraction", CUMULATIVE, "epochs_to_saturation", "epochs_trained",
                                    "num_train", "num_test", "seconds", "run_id") or key.startswith("error/")})
    order = {name: index for index, name in enumerate(names)}
    rows.sort(key=lambda row: order[trial_name(row["variant"], row["test_fraction"])])
    return rows, failures


def run_experiments(config: ExperimentsConfig) -> ExperimentsResult:
    from metallo_core.multilabel.pipeline import (
        check_dataset,
        lineage_tags,
        prepare_inputs,
        with_absolute_uris,
    )

    config = with_absolute_uris(config)
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
        parent.log_dict({"rows": rows, "failed_trials": failures, "backbone": describe_backbone}, "seed002_results.json")
        parent.log_metrics({f"{row['variant']}/test{row['test_fraction']:g}/{CUMULATIVE}": row[CUMULATIVE]
                            for row in rows})
        if failures:
            parent.set_tags({"metallo.failed_trials": "; ".join(failures)[:4000]})
            _close_orphaned_children(parent.run_id)
        result = ExperimentsResult(parent.run_id, describe_backbone, feature_cache, rows, tables_markdown, failures)
    if failures:
        print(tables_markdown)
        raise MetalloError(f"{len(failures)} trial(s) failed (tables above hold the others): " + "; ".join(failures))
    return result


def _close_orphaned_children(parent_run_id: str) -> None:
    """Trials killed mid-run (an interrupted sweep) cannot close their own child runs: mark them KILLED."""
    client = tracking.client()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                                 "and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")


def describe_experiments(result: ExperimentsResult) -> str:
    return (f"{result.tables}\n\nMLflow parent run {result.parent_run_id} ({len(result.rows)} child runs); "
            f"see it with: {tracking.ui_command()}")


# ---------------------------------------------------------------------------------------------- tables


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _variant_title(variant: VariantSettings, names: list[str], infos: dict[str, PropertyInfo]) -> str:
    encoder = "small CNN from scratch" if variant.encoder == "small_cnn" else "frozen backbone"
    heads = ", ".join(f"{name} ({'class' if infos[name].is_class else 'regression'})" for name in names)
    return f"### {variant.name}: {encoder}, shared fc {variant.fc_width}, heads: {heads}"


def render_tables(rows: list[dict[str, Any]], config: ExperimentsConfig, properties: list[PropertyInfo],
                  backbone: str, *, random_init: bool = False) -> str:
    infos = {prop.name: prop for prop in properties}
    lines = [
        "## Seed 002 reproduction: multi-label quantification on frozen features",
        "",
        f"Backbone: {backbone}." + (" **The extractor is randomly initialised: a frozen random network says "
                                    "nothing about transfer learning.**" if random_init else ""),
        f"Data: {config.data.uri}, test set carved per class (stratified by the dataset label), split seed "
        f"{config.data.split_seed}. Optimiser {config.optim.optimizer} lr {config.optim.lr:g}, batch "
        f"{config.optim.batch_size}, up to {config.optim.max_epochs} epochs (variants may cap lower)"
        + (f", early stopping on {config.optim.validation_fraction:g} of the training rows (patience "
           f"{config.optim.patience})." if config.optim.validation_fraction and config.optim.patience else "."),
        "",
        "*Error* = test error rate of the weights kept (the best validation epoch with early stopping, else the "
        "last; no model selection on the test set); for regression heads "
        "the mean absolute error in the property's units. *Cumulative* = sum of the classification error rates "
        "(seed 002's measure). *Epochs to saturation* = the first epoch whose test error (the cumulative error "
        f"for multi-head models) is within {100 * config.optim.saturation_tolerance:g} percentage points of the "
        "lowest test error the run reached.",
        "",
    ]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    for variant in config.variants:
        variant_rows = sorted(by_variant.get(variant.name, []), key=lambda row: row["test_fraction"])
        names = variant_properties(config, variant)
        seed_single = SEED002_SINGLE.get(names[0]) if len(names) == 1 and variant.encoder == "pretrained" else None
        class_names = [name for name in names if infos[name].is_class]
        header = ["test fraction", "train / test images"]
        header += [f"{name} {'error' if infos[name].is_class else 'MAE'}" for name in names]
        if len(class_names) > 1:
            header.append("cumulative error")
        header += ["epochs to saturation", "epochs run"]
        if seed_single:
            header += ["seed 002 error", "seed 002 epochs"]
        lines += [_variant_title(variant, names, infos), "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for row in variant_rows:
            cells = [f"{row['test_fraction']:g}", f"{row['num_train']} / {row['num_test']}"]
            for name in names:
                value = row[f"error/{name}"]
                cells.append(_percent(value) if infos[name].is_class else f"{value:.4f}")
            if len(class_names) > 1:
                cells.append(_percent(row[CUMULATIVE]))
            cells += [str(row["epochs_to_saturation"]), str(row["epochs_trained"])]
            if seed_single:
                reference = seed_single.get(round(row["test_fraction"], 4))
                cells += [_percent(reference[0]), str(reference[1])] if reference else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        if not variant_rows:
            lines.append("| (no finished trials) |")
        lines.append("")
    lines += _seed_table3(rows, config)
    return "\n".join(lines).rstrip() + "\n"


def _seed_table3(rows: list[dict[str, Any]], config: ExperimentsConfig) -> list[str]:
    """Seed 002's Table 3 next to ours: bifurcated (morphology + volume fraction class) models by fc width."""
    bifurcated = [variant for variant in config.variants if variant.encoder == "pretrained"
                  and sorted(variant_properties(config, variant)) == sorted(SEED002_PAIR)]
    if not bifurcated:
        return []
    lines = ["### Seed 002 Table 3 vs ours: cumulative error of the two classification heads", "",
             "| model | fc width | test fraction | ours: cumulative error | ours: epochs to saturation | "
             "seed 002: cumulative error | seed 002: saturation epochs |", "|---|---|---|---|---|---|---|"]
    for variant in bifurcated:
        reference = SEED002_BIFURCATED.get(variant.fc_width)
        for row in sorted((r for r in rows if r["variant"] == variant.name), key=lambda r: r["test_fraction"]):
            seed_cells = [_percent(reference[0]) + " (split not stated)", str(reference[1])] if reference else ["", ""]
            cells = [variant.name, str(variant.fc_width), f"{row['test_fraction']:g}", _percent(row[CUMULATIVE]),
                     str(row["epochs_to_saturation"]), *seed_cells]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def summary_for_json(result: ExperimentsResult) -> dict[str, Any]:
    return {"parent_run_id": result.parent_run_id, "backbone": result.backbone, "feature_cache": result.feature_cache,
            "rows": result.rows, "failed_trials": result.failed_trials}

