"""The `multilabel train` stage: check the config against the dataset, get features (cached), train the
n-furcated head, log the run to MLflow and register the model with its lineage.

`prepare_inputs` and `train_model` are shared with the experiment grid, whose Tune trials call
`train_model` on a table the driver prepared once.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from metallo_core import tracking
from metallo_core.config import config_hash
from metallo_core.data.manifest import Manifest, read_manifest
from metallo_core.errors import ConfigError, DataError
from metallo_core.models.pooling import early_stage_names, stage_widths
from metallo_core.models.sources import absolute_file_source, source_kind
from metallo_core.models.stages import stage_names
from metallo_core.multilabel.baseline_cnn import CNN_MEAN, CNN_STD, SmallCNN
from metallo_core.multilabel.config import OLDER_SOURCES, BackboneSettings, MultilabelConfig
from metallo_core.multilabel.feature_layers import CandidateScore, FeatureLayers, choose, widest
from metallo_core.multilabel.features import (
    InputTable,
    ResolvedBackbone,
    load_feature_table,
    load_image_table,
    resolve_backbone,
)
from metallo_core.multilabel.model import (
    ImageEncoder,
    MultilabelNet,
    NFurcatedHead,
    backbone_image_encoder,
    freeze_backbone,
)
from metallo_core.multilabel.properties import (
    PropertyInfo,
    property_targets,
    resolve_properties,
    with_target_statistics,
)
from metallo_core.multilabel.split import stratified_split, validation_split
from metallo_core.multilabel.train import (
    CUMULATIVE,
    EpochRecord,
    TrainingHistory,
    fit,
    saturation_epoch,
    to_tensors,
)
from metallo_core.progress import Progress
from metallo_core.storage import with_absolute_uris
from metallo_core.tracking.multilabel_backbone import registered_backbone

SMALL_CNN_IMAGE_SIZE = 64


@dataclass
class MultilabelResult:
    errors: dict[str, float]  # property -> test error rate (classification) or MAE (regression)
    cumulative_error: float  # sum of the classification error rates
    model: str | None  # models:/<name>/<version> when registered
    run_id: str
    epochs_to_saturation: int
    epochs_trained: int
    backbone: str
    feature_cache: str | None
    num_train: int  # the training side of the split (num_validation of them held out for early stopping)
    num_test: int
    train_seconds: float
    logged_model: str | None = None  # models:/m-... (also set when not registered)
    regression_properties: list[str] = dataclasses.field(default_factory=list)  # their `errors` are MAEs
    num_validation: int = 0
    kept_epoch: int = 0  # the epoch whose weights the model has (the best validation epoch)
    seconds_per_epoch: float = 0.0
    extract_seconds: float | None = None  # feature extraction of this run (None: features from the cache)
    feature_layers: str = ""  # the feature set the model reads ("" for the small CNN)
    feature_layers_chosen: bool = False  # chosen on the validation rows (auto), else named by the config
    # auto: every candidate's validation figures, in candidate order (see CandidateScore)
    feature_candidates: list[dict] = dataclasses.field(default_factory=list)


@dataclass
class PreparedInputs:
    """Everything training needs, prepared once (the experiment grid ships it to every trial)."""

    table: InputTable
    properties: list[PropertyInfo]
    train_rows: np.ndarray
    test_rows: np.ndarray
    image_size: int
    backbone: ResolvedBackbone | None
    # Pretrained encoder: the feature set the table's columns hold (under auto the widest candidate, laid
    # out as [stage 1 | ... | stage K | final] with `stage_widths` = (C_1, ..., C_K)); None for images.
    layers: FeatureLayers | None = None
    stage_widths: tuple[int, ...] = ()
    candidates: list[FeatureLayers] = dataclasses.field(default_factory=list)  # auto: the sets to try


@dataclass
class TrainedModel:
    network: MultilabelNet  # encoder as trained (identity on cached features) + head
    head: NFurcatedHead
    properties: list[PropertyInfo]  # with the training targets' statistics
    history: TrainingHistory
    saturation_epoch: int
    num_validation: int = 0  # training rows held out for early stopping

    @property
    def errors(self) -> dict[str, float]:
        return dict(self.history.final.errors)

    @property
    def cumulative_error(self) -> float:
        return self.history.final.cumulative_error


C = TypeVar("C", bound=MultilabelConfig)
LOCATION_SETTINGS = ("data.uri", "backbone.cache_dir")  # resolved before Ray workers, with a file backbone.source


def with_absolute_locations(config: C) -> C:
    """A copy of `config` whose locations (`LOCATION_SETTINGS`, a weights file named by backbone.source) are
    absolute: Ray workers and later stages run in other directories."""
    config = with_absolute_uris(config, LOCATION_SETTINGS)
    source = config.backbone.source
    if source_kind(source) == "file" and source not in OLDER_SOURCES:
        config.backbone.source = absolute_file_source(source)
    return config


def effective_image_size(config: MultilabelConfig, backbone: ResolvedBackbone | None) -> int:
    if config.data.image_size:
        return config.data.image_size
    return backbone.spec.image_size if backbone is not None else SMALL_CNN_IMAGE_SIZE


def feature_cache_dir(settings: BackboneSettings) -> Path | None:
    """The absolute folder of feature-cache entries: `backbone.cache_dir`, else `$METALLO_HOME/cache/features`;
    None when `backbone.cache` is off."""
    if not settings.cache:
        return None
    return Path(settings.cache_dir or tracking.local_home() / "cache" / "features").expanduser().resolve()


def check_dataset(config: MultilabelConfig) -> tuple[Manifest, list[PropertyInfo]]:
    """Fail before any heavy work if a split or a declared property does not fit the dataset."""
    manifest = read_manifest(config.data.uri)
    manifest.split(config.data.split)
    if config.data.test_split:
        manifest.split(config.data.test_split)
    return manifest, resolve_properties(config.properties, manifest)


def prepare_inputs(config: MultilabelConfig, manifest: Manifest, properties: list[PropertyInfo], *,
                   backbone: ResolvedBackbone | None = None) -> PreparedInputs:
    """Features (cached) or images for the training and test rows."""
    if config.encoder == "pretrained" and backbone is None:
        backbone = resolve_backbone(config.backbone, seed=config.seed, image_size=config.data.image_size,
                                    registered=registered_backbone)
    image_size = effective_image_size(config, backbone)
    layers = config.feature_layers
    widths: tuple[int, ...] = ()
    candidates: list[FeatureLayers] = []
    if config.chooses_feature_layers:
        assert backbone is not None  # uses_feature_cache implies a pretrained encoder
        candidates = usable_candidates(config.backbone.candidate_layers, backbone.module)
        layers = widest(candidates)
        widths = stage_widths(backbone.module, early_stage_names(backbone.module, layers.early_stages), image_size)
    splits = [config.data.split] + ([config.data.test_split] if config.data.test_split else [])
    tables = []
    for split in splits:
        if config.uses_feature_cache:
            assert backbone is not None and layers is not None
            tables.append(load_feature_table(config.data.uri, split, backbone=backbone, image_size=image_size,
                                             manifest=manifest, cache_dir=feature_cache_dir(config.backbone),
                                             extract_batch_size=config.backbone.extract_batch_size,
                                             max_images=config.data.max_images, layers=layers))
        else:
            # Training the encoder (small CNN, or an unfrozen last stage) changes the features every step,
            # so there is nothing to cache: the model sees images.
            tables.append(load_image_table(config.data.uri, split, image_size=image_size, manifest=manifest,
                                           max_images=config.data.max_images))
    if len(tables) == 1:
        table = tables[0]
        train_rows, test_rows = stratified_split(table.dataset_labels, config.data.test_fraction,
                                                 config.data.split_seed)
    else:
        table = concat_tables(tables[0], tables[1])
        train_rows = np.arange(len(tables[0]))
        test_rows = np.arange(len(tables[0]), len(table))
    if len(test_rows) == 0:
        raise DataError(f"the test set is empty (data.test_split={config.data.test_split!r})")
    return PreparedInputs(table, properties, train_rows, test_rows, image_size, backbone, layers, widths, candidates)


def usable_candidates(candidates: list[FeatureLayers], backbone: nn.Module) -> list[FeatureLayers]:
    """The candidates this backbone can compute: early<N> needs N stages before the last (none for a ViT).

    The others are left out with a note on stderr, so auto works on any backbone; ConfigError if none is left.
    """
    try:
        count = len(stage_names(backbone)) - 1  # the last stage already feeds the final features
    except ConfigError:
        count = 0
    usable = [layers for layers in candidates if layers.early_stages <= count]
    skipped = [layers.name for layers in candidates if layers.early_stages > count]
    if skipped:
        print(f"feature layers: {type(backbone).__name__} has {count} early stage(s) to average; "
              f"leaving out candidate(s) {', '.join(skipped)}", file=sys.stderr, flush=True)
    if not usable:
        raise ConfigError(f"none of backbone.feature_candidates fits this {type(backbone).__name__} "
                          f"({count} early stages); add final")
    return usable


def with_feature_layers(prepared: PreparedInputs, layers: FeatureLayers) -> PreparedInputs:
    """`prepared` with only the columns of `layers` (a copy of them); the rows stay the same.

    ConfigError when the table does not hold them (see `FeatureLayers.columns`).
    """
    columns = layers.columns(prepared.stage_widths, prepared.table.inputs.shape[1])
    table = dataclasses.replace(prepared.table, inputs=np.ascontiguousarray(prepared.table.inputs[:, columns]))
    return dataclasses.replace(prepared, table=table, layers=layers, stage_widths=(), candidates=[])


def concat_tables(first: InputTable, second: InputTable) -> InputTable:
    return InputTable(
        inputs=np.concatenate([first.inputs, second.inputs]),
        dataset_labels=np.concatenate([first.dataset_labels, second.dataset_labels]),
        extras={name: np.concatenate([first.extras[name], second.extras[name]]) for name in first.extras},
        sources=first.sources + second.sources,
        kind=first.kind,
        cache_path=first.cache_path,
        from_cache=first.from_cache and second.from_cache,
        extras_order=first.extras_order,
        extract_seconds=(None if first.extract_seconds is None and second.extract_seconds is None
                         else (first.extract_seconds or 0.0) + (second.extract_seconds or 0.0)),
    )


def make_image_encoder(config: MultilabelConfig, backbone: ResolvedBackbone | None,
                       layers: FeatureLayers | None = None) -> tuple[ImageEncoder, int]:
    """The image -> feature part of the model (frozen backbone, backbone with a trainable last stage, or CNN),
    reading `layers` (default: the config's fixed set; under auto pass the chosen one)."""
    if config.encoder == "small_cnn":
        cnn = SmallCNN(config.cnn.channels, config.cnn.pooled_size)
        return ImageEncoder(cnn, CNN_MEAN, CNN_STD), cnn.feature_dim
    if backbone is None:
        raise ValueError("a pretrained encoder needs a resolved backbone")
    layers = layers or config.feature_layers
    if layers is None:
        raise ValueError("backbone.feature_layers is auto: pass the feature set chosen on the validation rows")
    freeze_backbone(backbone.module, train_last_stage=config.backbone.unfreeze_last_stage)
    encoder = backbone_image_encoder(backbone.module, backbone.spec.mean, backbone.spec.std,
                                     layers.early_stages, layers.final)
    if not encoder.pooled_stages:
        return encoder, backbone.spec.feature_dim
    return encoder, encoder.output_dim(effective_image_size(config, backbone))


def train_model(
    config: MultilabelConfig,
    prepared: PreparedInputs,
    *,
    image_encoder: ImageEncoder | None = None,
    feature_dim: int | None = None,
    max_epochs: int | None = None,
    on_epoch=None,
) -> TrainedModel:
    """Train the head (and any trainable encoder part) on the prepared training rows, less the validation
    rows (`optim.validation_fraction`) that decide when to stop; the test curve is recorded."""
    table = prepared.table
    targets = property_targets(prepared.properties, table.extras, table.dataset_labels)
    fit_rows, validation_rows = validation_split(prepared.train_rows, table.dataset_labels,
                                                 config.optim.validation_fraction, config.data.split_seed)
    properties = with_target_statistics(prepared.properties, targets, fit_rows)
    train_inputs, train_targets = to_tensors(table.inputs, targets, fit_rows)
    validation_inputs, validation_targets = to_tensors(table.inputs, targets, validation_rows)
    test_inputs, test_targets = to_tensors(table.inputs, targets, prepared.test_rows)
    if table.kind == "features":
        encoder: nn.Module = nn.Identity()
        in_dim = table.inputs.shape[1]
    else:
        if image_encoder is None or feature_dim is None:
            raise ValueError("training on images needs the image encoder and its feature size")
        encoder, in_dim = image_encoder, feature_dim
    torch.manual_seed(config.seed)
    head = NFurcatedHead(in_dim, config.head.fc_width, properties, activation=config.head.activation,
                         dropout=config.head.dropout)
    if table.kind == "features" and config.head.input_norm:
        head.set_input_statistics(train_inputs)
    network = MultilabelNet(encoder, head)
    history = fit(network, properties, train_inputs, train_targets, test_inputs, test_targets, config.optim,
                  seed=config.seed, max_epochs=max_epochs, on_epoch=on_epoch,
                  validation_inputs=validation_inputs, validation_targets=validation_targets)
    return TrainedModel(network, head, properties, history,
                        saturation_epoch(history, properties, config.optim.saturation_tolerance),
                        num_validation=len(validation_rows))


@dataclass
class LayerChoice:
    """The outcome of choosing the feature set on the validation rows."""

    layers: FeatureLayers  # the chosen set
    scores: list[CandidateScore]  # every candidate's validation figures, in candidate order
    trained: TrainedModel  # the heads trained on the chosen set (kept, not retrained)
    prepared: PreparedInputs  # the inputs with only the chosen set's columns


def train_choosing_layers(config: MultilabelConfig, prepared: PreparedInputs, *,
                          on_epoch_for=None) -> LayerChoice:
    """Train the heads once per candidate (`prepared.candidates`: `backbone.feature_candidates` the backbone
    can compute) on its columns of the widest table `prepared` holds, and keep the candidate with the lowest
    validation score (`feature_layers.choose`).

    Every candidate sees the same fit / validation / test rows and seed. Only the validation figures of the
    kept weights enter the choice; the test curve each training records is not read. `on_epoch_for(layers)`
    may return a per-epoch callback for that candidate's training.
    """
    has_classes = any(prop.is_class for prop in prepared.properties)
    scores, trained_models, inputs = [], [], []
    for layers in prepared.candidates:
        candidate_inputs = with_feature_layers(prepared, layers)
        trained = train_model(config, candidate_inputs, on_epoch=on_epoch_for(layers) if on_epoch_for else None)
        kept = trained.history.final
        scores.append(CandidateScore(
            layers, kept.validation_error if has_classes else math.nan, kept.validation_loss,
            epochs_trained=trained.history.epochs_trained, kept_epoch=kept.epoch,
            train_seconds=round(trained.history.seconds, 2), feature_dim=candidate_inputs.table.inputs.shape[1]))
        trained_models.append(trained)
        inputs.append(candidate_inputs)
    best = choose(scores)
    return LayerChoice(scores[best].layers, scores, trained_models[best], inputs[best])


def candidate_records(scores: list[CandidateScore]) -> list[dict]:
    """One plain dict per candidate (JSON, the run's results.json; no error for regression-only: None)."""
    return [{"layers": score.layers.name,
             "validation_cumulative_error": None if math.isnan(score.validation_error) else score.validation_error,
             "validation_loss": score.validation_loss, "epochs_trained": score.epochs_trained,
             "kept_epoch": score.kept_epoch, "train_seconds": score.train_seconds, "feature_dim": score.feature_dim}
            for score in scores]


def candidate_metrics(scores: list[CandidateScore]) -> dict[str, float]:
    """MLflow metrics `feature_choice/<set>/...` (MLflow keys allow no '+': early2+final is early2_final)."""
    metrics = {}
    for score in scores:
        key = f"feature_choice/{score.layers.name.replace('+', '_')}"
        if not math.isnan(score.validation_error):
            metrics[f"{key}/validation_cumulative_error"] = score.validation_error
        metrics[f"{key}/validation_loss"] = score.validation_loss
        metrics[f"{key}/epochs_trained"] = score.epochs_trained
        metrics[f"{key}/train_seconds"] = score.train_seconds
    return metrics


def history_metrics(history: TrainingHistory) -> list[tuple[int, dict[str, float]]]:
    """(epoch, metrics) pairs for MLflow: the training loss and the test error curves."""
    pairs = []
    for record in history.records:
        metrics = {CUMULATIVE: record.cumulative_error,
                   **{f"test_error/{name}": value for name, value in record.errors.items()}}
        if record.epoch > 0:
            metrics["train_loss"] = record.train_loss
        if not math.isnan(record.validation_loss):
            metrics["validation_loss"] = record.validation_loss
            metrics["validation_cumulative_error"] = record.validation_error
        pairs.append((record.epoch, metrics))
    return pairs


def log_history(run_id: str, history: TrainingHistory) -> None:
    """All epochs in one batched call (MlflowClient splits it; a call per epoch would be slow on SQLite)."""
    import time

    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    entries = [Metric(key, float(value), timestamp, epoch)
               for epoch, metrics in history_metrics(history) for key, value in metrics.items()]
    tracking.client().log_batch(run_id, metrics=entries)


def summary_metrics(trained: TrainedModel, prepared: PreparedInputs) -> dict[str, float]:
    return {
        **{f"final/test_error/{name}": value for name, value in trained.errors.items()},
        f"final/{CUMULATIVE}": trained.cumulative_error,
        "epochs_to_saturation": trained.saturation_epoch,
        "epochs_trained": trained.history.epochs_trained,
        "kept_epoch": trained.history.final.epoch,
        "train_seconds": trained.history.seconds,
        "seconds_per_epoch": trained.history.seconds_per_epoch,
        "num_train": len(prepared.train_rows),
        "num_validation": trained.num_validation,
        "num_test": len(prepared.test_rows),
    }


def lineage_tags(config: MultilabelConfig, prepared: PreparedInputs) -> dict[str, str]:
    backbone = prepared.backbone
    return {
        "metallo.stage": "multilabel",
        **tracking.dataset_tags(config.data.uri),
        "metallo.config_hash": config_hash(config),
        "metallo.code_version": tracking.code_version(),
        "metallo.encoder": config.encoder,
        "metallo.backbone": (backbone.uri or backbone.identity) if backbone else "small_cnn (from scratch)",
        "metallo.backbone_identity": backbone.identity if backbone else "",
        "metallo.backbone_random_init": str(bool(backbone and backbone.random_init)).lower(),
        "metallo.unfreeze_last_stage": str(config.backbone.unfreeze_last_stage).lower(),
        "metallo.properties": ",".join(p.name for p in prepared.properties),
        "metallo.image_size": str(prepared.image_size),
    }


def model_spec(config: MultilabelConfig, trained: TrainedModel, prepared: PreparedInputs, feature_dim: int,
               lineage: dict[str, str], image_encoder: ImageEncoder | None = None):
    from metallo_core.tracking.multilabel_store import MultilabelModelSpec

    backbone = prepared.backbone
    return MultilabelModelSpec(
        properties=[prop.to_dict() for prop in trained.properties],
        in_dim=feature_dim,
        fc_width=config.head.fc_width,
        activation=config.head.activation,
        dropout=config.head.dropout,
        encoder="small_cnn" if config.encoder == "small_cnn" else "backbone",
        image_size=prepared.image_size,
        mean=list(CNN_MEAN if backbone is None else backbone.spec.mean),
        std=list(CNN_STD if backbone is None else backbone.spec.std),
        # The backbone's spec at the size its features were computed at: predict resizes to it.
        backbone_spec=(dataclasses.asdict(dataclasses.replace(backbone.spec, image_size=prepared.image_size))
                       if backbone is not None else None),
        cnn=dataclasses.asdict(config.cnn) if config.encoder == "small_cnn" else None,
        pooled_stages=list(image_encoder.pooled_stages) if image_encoder is not None else [],
        final_features=image_encoder.final_features if image_encoder is not None else True,
        feature_layers=prepared.layers.name if prepared.layers is not None else "",
        lineage=lineage,
    )


def run_multilabel_training(config: MultilabelConfig) -> MultilabelResult:
    config = with_absolute_locations(config)
    tracking.configure()  # fails fast on an unreachable tracking server
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    manifest, properties = check_dataset(config)
    prepared = prepare_inputs(config, manifest, properties)
    lineage = lineage_tags(config, prepared)
    if prepared.backbone is not None:
        print(f"backbone: {prepared.backbone.description}", file=sys.stderr, flush=True)
    with tracking.start_run(config.run.experiment, config.run.name, config=config, tags=lineage) as run:
        def progress_report(label: str):
            progress = Progress(label, config.optim.max_epochs)

            def report(record: EpochRecord) -> None:
                errors = " ".join(f"{name}={value:.4f}" for name, value in record.errors.items())
                progress.done = record.epoch - 1
                progress.advance(1, f"loss={record.train_loss:.4f} test: {errors}")

            return progress, report

        scores: list[CandidateScore] = []
        if config.chooses_feature_layers:
            progresses = []

            def on_epoch_for(layers: FeatureLayers):
                if progresses:
                    progresses[-1].finish()
                progress, report = progress_report(f"train heads [{layers.name}]")
                progresses.append(progress)
                return report

            choice = train_choosing_layers(config, prepared, on_epoch_for=on_epoch_for)
            progresses[-1].finish()
            trained, prepared, scores = choice.trained, choice.prepared, choice.scores
            print(describe_choice(choice.layers, scores, trained.num_validation), file=sys.stderr, flush=True)
            # The exported encoder reads the chosen set; predict rebuilds it from the saved spec.
            image_encoder, feature_dim = make_image_encoder(config, prepared.backbone, choice.layers)
        else:
            progress, report = progress_report("train heads")
            image_encoder, feature_dim = make_image_encoder(config, prepared.backbone)
            trained = train_model(config, prepared, image_encoder=image_encoder, feature_dim=feature_dim,
                                  on_epoch=report)
            progress.finish()
        layer_tags = feature_layer_tags(prepared, scores)
        lineage = {**lineage, **layer_tags}
        log_history(run.run_id, trained.history)
        run.log_metrics({**summary_metrics(trained, prepared), **candidate_metrics(scores)},
                        step=trained.history.epochs_trained)
        run.log_dict({"errors": trained.errors, CUMULATIVE: trained.cumulative_error,
                      "epochs_to_saturation": trained.saturation_epoch,
                      "properties": [p.to_dict() for p in trained.properties],
                      "feature_layers": prepared.layers.name if prepared.layers else "",
                      "feature_candidates": candidate_records(scores)}, "results.json")
        run.set_tags({"metallo.feature_cache": prepared.table.cache_path or "",
                      "metallo.feature_cache_hit": str(prepared.table.from_cache).lower(), **layer_tags})
        logged_model = registered_uri = None
        if config.registry.register:
            from metallo_core.tracking.multilabel_store import log_multilabel_model

            export_network = MultilabelNet(image_encoder, trained.head)
            spec = model_spec(config, trained, prepared, feature_dim, lineage, image_encoder)
            tags = {**lineage, "metallo.run_id": run.run_id,
                    f"metallo.{CUMULATIVE}": f"{trained.cumulative_error:.6f}",
                    **{f"metallo.test_error.{name}": f"{value:.6f}" for name, value in trained.errors.items()}}
            logged_model, registered = log_multilabel_model(
                run.run_id, export_network, spec, registered_name=config.registry.name, tags=tags,
                alias=config.registry.alias)
            registered_uri = registered.uri if registered else None
        return MultilabelResult(
            errors=trained.errors,
            cumulative_error=trained.cumulative_error,
            model=registered_uri,
            run_id=run.run_id,
            epochs_to_saturation=trained.saturation_epoch,
            epochs_trained=trained.history.epochs_trained,
            backbone=prepared.backbone.description if prepared.backbone else "small CNN trained from scratch",
            feature_cache=prepared.table.cache_path,
            num_train=len(prepared.train_rows),
            num_test=len(prepared.test_rows),
            train_seconds=round(trained.history.seconds, 2),
            num_validation=trained.num_validation,
            kept_epoch=trained.history.final.epoch,
            seconds_per_epoch=round(trained.history.seconds_per_epoch, 4),
            extract_seconds=prepared.table.extract_seconds,
            logged_model=logged_model,
            regression_properties=[p.name for p in trained.properties if not p.is_class],
            feature_layers=prepared.layers.name if prepared.layers else "",
            feature_layers_chosen=bool(scores),
            feature_candidates=candidate_records(scores),
        )


def feature_layer_tags(prepared: PreparedInputs, scores: list[CandidateScore]) -> dict[str, str]:
    """The feature set the model reads, and how it was decided (run and model-version tags)."""
    if prepared.layers is None:
        return {}
    tags = {"metallo.feature_layers": prepared.layers.name,
            "metallo.feature_layers_chosen_by": "validation" if scores else "config"}
    if scores:
        tags["metallo.feature_candidates"] = ",".join(score.layers.name for score in scores)
    return tags


def describe_choice(chosen: FeatureLayers, scores: list[CandidateScore], num_validation: int) -> str:
    """Lines for people: the chosen set, then every candidate's validation figures."""
    measure = "loss" if all(math.isnan(score.validation_error) for score in scores) else "cumulative error"
    lines = [f"  feature layers: {chosen.name} (lowest {measure} on the {num_validation} validation images; "
             "the test images decide nothing)"]
    for score in scores:
        error = ("" if math.isnan(score.validation_error)
                 else f"validation cumulative error {score.validation_error:.4%}, ")
        lines.append(f"    {'*' if score.layers == chosen else ' '} {score.layers.name:<14} {error}"
                     f"loss {score.validation_loss:.4f}, {score.feature_dim} features, kept epoch "
                     f"{score.kept_epoch} of {score.epochs_trained}, {score.train_seconds:.1f} s")
    return "\n".join(lines)


def describe_result(result: MultilabelResult) -> str:
    fitted = result.num_train - result.num_validation
    stop = (f"kept epoch {result.kept_epoch} (best on {result.num_validation} held-out validation images)"
            if result.num_validation else f"kept epoch {result.kept_epoch}")
    extraction = ("features from the cache" if result.extract_seconds is None
                  else f"features extracted in {result.extract_seconds:.1f} s")
    lines = [f"multi-label training done: {result.epochs_trained} epoch(s) on {fitted} images, {stop}; "
             f"tested on {result.num_test}; MLflow run {result.run_id}",
             f"  backbone: {result.backbone}",
             f"  time: {extraction}; heads {result.train_seconds:.1f} s ({result.seconds_per_epoch:.3f} s/epoch)"]
    for name, value in result.errors.items():
        lines.append(f"  {name}: MAE {value:.5f}" if name in result.regression_properties else
                     f"  {name}: {value:.4%} test error")
    lines.append(f"  cumulative error: {result.cumulative_error:.4%} "
                 f"(epochs to saturation: {result.epochs_to_saturation})")
    if result.feature_candidates:
        chosen = FeatureLayers.parse(result.feature_layers)
        lines.append(describe_choice(chosen, [
            CandidateScore(FeatureLayers.parse(item["layers"]),
                           math.nan if item["validation_cumulative_error"] is None
                           else item["validation_cumulative_error"],
                           item["validation_loss"], item["epochs_trained"], item["kept_epoch"],
                           item["train_seconds"], item["feature_dim"]) for item in result.feature_candidates],
            result.num_validation))
    elif result.feature_layers:
        lines.append(f"  feature layers: {result.feature_layers} (backbone settings of the config)")
    if result.model:
        lines.append(f"  registered model: {result.model}")
    lines.append(f"  see it in MLflow: {tracking.ui_command()}")
    return "\n".join(lines)
