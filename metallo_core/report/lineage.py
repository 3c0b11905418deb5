"""What each evaluated model is made of, in the words of the paper's table: backbone architecture, how the
backbone was pre-trained, what it was meta-trained on, and the chain of registered models behind it.

Pure: reads a `ReportData`, never MLflow. A grid names its rows itself (grid/runs.json); those names win.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from metallo_core.models.sources import is_offline_source, offline_network
from metallo_core.report.collect import EvaluationRecord, ModelRecord, ReportData, RunRecord
from metallo_core.tracking.registry import parse_model_uri

UNKNOWN = "?"


@dataclass(frozen=True)
class RowLabels:
    architecture: str
    pretraining: str
    metatraining: str
    model: str  # how the table shows the model, e.g. "metallo-protonet v3"
    model_uri: str


@dataclass
class LineageEntry:
    """One registered model and where it came from."""

    model: ModelRecord
    run: RunRecord | None
    stage: str
    architecture: str
    dataset_uri: str
    started_from: str  # a readable description of the starting weights ("" for a DINO backbone)
    started_from_model: str  # models:/name/version when it started from a registered model, else ""
    score: str  # the number that chose this model (best meta-val accuracy, final k-NN accuracy)


def dataset_name(uri: str) -> str:
    """The last path component of a dataset URI (local path or s3://bucket/prefix)."""
    if not uri:
        return UNKNOWN
    path = uri.split("://", 1)[-1].rstrip("/")
    return PurePosixPath(path).name or path


def evaluated_set(evaluation: EvaluationRecord) -> str:
    """The column group's name: the dataset (or the grid's name for it) and the split scored."""
    name = evaluation.grid_labels.get("target") or dataset_name(evaluation.dataset_uri)
    return f"{name} ({evaluation.split})" if evaluation.split else name


def pretty_arch(arch: str) -> str:
    """resnet18 -> ResNet18, as papers write it."""
    if arch.lower().startswith("resnet"):
        return "ResNet" + arch[len("resnet"):]
    return arch or UNKNOWN


def model_label(model: ModelRecord) -> str:
    return f"{model.name} v{model.version}"


def find_model(data: ReportData, uri: str) -> ModelRecord | None:
    """The registered model behind `uri` (pinned `models:/name/N`, or `models:/name@alias` as it points now)."""
    if uri in data.models:
        return data.models[uri]
    ref = parse_model_uri(uri)
    if ref is not None and ref.alias:
        return next((m for m in data.models.values() if m.name == ref.name and ref.alias in m.aliases), None)
    return None


def source_run(data: ReportData, model_uri: str) -> RunRecord | None:
    """The run that produced the model: its registry entry's run, or the run of a runs:/ URI."""
    model = find_model(data, model_uri)
    if model is not None:
        return data.runs.get(model.run_id)
    if model_uri.startswith("runs:/"):
        return data.runs.get(model_uri.removeprefix("runs:/").split("/", 1)[0])
    return None


def lineage_tags(data: ReportData, model_uri: str) -> dict[str, str]:
    """The model's lineage tags over its source run's (the registry copy is what registration saw)."""
    run, model = source_run(data, model_uri), find_model(data, model_uri)
    return {**(run.tags if run else {}), **(model.tags if model else {})}


def describe_source(data: ReportData, source: str) -> str:
    """The table's "Pre-training" words for a meta-training starting point."""
    if not source:
        return UNKNOWN
    if source == "scratch":
        return "none (scratch)"
    if is_offline_source(source):
        return f"ImageNet (EfficientNet-{offline_network(source).variant.title()}, offline)"
    if source == "download" or source.startswith("download:"):
        return f"downloaded weights ({source.partition(':')[2] or 'default'})"
    if source.startswith(("models:/", "runs:/")):
        run = source_run(data, source)
        if run is not None and run.stage == "pretrain":
            return f"DINO ({dataset_name(run.tags.get('metallo.dataset_uri', run.params.get('data.uri', '')))})"
        model = find_model(data, source)
        return model_label(model) if model else source
    return f"weights file {PurePosixPath(source).name}"


def row_labels(data: ReportData, evaluation: EvaluationRecord) -> RowLabels:
    tags = lineage_tags(data, evaluation.model_uri)
    run = source_run(data, evaluation.model_uri)
    model = find_model(data, evaluation.model_uri)
    arch = tags.get("metallo.arch") or (
        run.params.get("backbone.arch") or run.params.get("backbone.spec.arch", "") if run else "")  # older runs: spec
    labels = RowLabels(
        architecture=pretty_arch(arch),
        pretraining=describe_source(data, tags.get("metallo.backbone_source", "")),
        metatraining=dataset_name(tags.get("metallo.dataset_uri", "")),
        model=model_label(model) if model else evaluation.model_uri or UNKNOWN,
        model_uri=model.uri if model else evaluation.model_uri,
    )
    grid = evaluation.grid_labels
    return RowLabels(
        architecture=grid.get("backbone") or labels.architecture,
        # "-" is the grid's default for "nothing said"; what lineage knows is then more useful
        pretraining=grid["pretraining"] if grid.get("pretraining", "-") != "-" else labels.pretraining,
        metatraining=grid.get("set") or labels.metatraining,
        model=labels.model,
        model_uri=labels.model_uri,
    )


def lineage_entries(data: ReportData) -> list[LineageEntry]:
    """Every registered model in view: meta-trained ones first, each followed by what it started from."""
    entries = []
    for model in sorted(data.models.values(), key=_model_order):
        run = data.runs.get(model.run_id)
        tags = {**(run.tags if run else {}), **model.tags}
        stage = tags.get("metallo.stage", "")
        source = tags.get("metallo.backbone_source", "")
        started_from = describe_source(data, source) if stage != "pretrain" else ""
        arch = tags.get("metallo.arch") or (run.params.get("backbone.arch", "") if run else "")
        entries.append(LineageEntry(
            model=model,
            run=run,
            stage=stage,
            architecture=pretty_arch(arch),
            dataset_uri=tags.get("metallo.dataset_uri", ""),
            started_from=started_from,
            started_from_model=(find_model(data, source).uri if find_model(data, source) else ""),
            score=_selection_score(tags, run),
        ))
    return entries


def _selection_score(tags: dict[str, str], run: RunRecord | None) -> str:
    if "metallo.best_val_accuracy" in tags:
        epoch = tags.get("metallo.best_epoch")
        where = f" (epoch {epoch})" if epoch is not None else ""
        return f"best meta-val accuracy {100 * float(tags['metallo.best_val_accuracy']):.2f}%{where}"
    if run is not None and "knn_accuracy" in run.metrics:
        return f"final k-NN accuracy {100 * run.metrics['knn_accuracy']:.2f}%"
    return ""


def _model_order(model: ModelRecord) -> tuple[int, str, int]:
    # ProtoNets (what the tables score) before the backbones they started from
    kind = 0 if model.tags.get("metallo.stage") == "metatrain" else 1
    return kind, model.name, int(model.version) if model.version.isdigit() else 0
