"""The report's tables, built from collected records without touching MLflow.

The main one is the paper's: a row per (backbone, pre-training, meta-training set, model, method), a
column group per evaluated task (set, way, shot) holding "mean% ± 95% interval" and, for the fine-tuned
methods, the gain over ProtoNet paired over the same tasks.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from metallo_core.report.collect import EVALUATION_MODES, EvaluationRecord, ReportData, RunRecord
from metallo_core.report.document import Cell, Link, Table
from metallo_core.report.lineage import (
    LineageEntry,
    RowLabels,
    dataset_name,
    describe_source,
    evaluated_set,
    model_label,
    pretty_arch,
    row_labels,
)

METHOD_LABELS = {"protonet": "PN", "finetune": "PN+FT", "finetune_autolr": "PN+FT (auto lr)"}
NOT_MEASURED = "—"


@dataclass(frozen=True, order=True)
class TaskColumn:
    evaluated_set: str
    way: int
    shot: int

    @property
    def label(self) -> str:
        return f"{self.way}w{self.shot}s"


@dataclass
class ResultCell:
    mean: float
    ci95: float
    gain: float | None
    gain_ci95: float | None
    run_id: str
    superseded: int = 0  # earlier runs of the same model on the same task that this one replaces


@dataclass
class ResultRow:
    labels: RowLabels
    mode: str
    cells: dict[TaskColumn, ResultCell] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return METHOD_LABELS.get(self.mode, self.mode)


@dataclass
class Results:
    columns: list[TaskColumn]
    rows: list[ResultRow]
    notes: list[str]


def percent(mean: float, ci95: float) -> str:
    """An accuracy as the papers print it: 65.36% ± 1.23 (the interval in percentage points)."""
    return f"{100 * mean:.2f}% ± {100 * ci95:.2f}"


def points(gain: float | None, ci95: float | None) -> str:
    """A paired gain in percentage points: +25.36 ± 1.01."""
    if gain is None:
        return NOT_MEASURED
    return f"{100 * gain:+.2f} ± {100 * (ci95 or 0.0):.2f}"


def when(start_time_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start_time_ms / 1000)) if start_time_ms else ""


def gather_results(data: ReportData) -> Results:
    """The finished evaluations as table rows; a later run of the same model on the same task replaces an
    earlier one (and the table says so)."""
    rows: dict[tuple[RowLabels, str], ResultRow] = {}
    columns: set[TaskColumn] = set()
    for evaluation in sorted(data.evaluations, key=lambda e: data.runs[e.run_id].start_time):
        if data.runs[evaluation.run_id].status != "FINISHED":
            continue
        labels = row_labels(data, evaluation)
        column = TaskColumn(evaluated_set(evaluation), evaluation.way, evaluation.shot)
        columns.add(column)
        for mode, score in evaluation.modes.items():
            row = rows.setdefault((labels, mode), ResultRow(labels, mode))
            previous = row.cells.get(column)
            row.cells[column] = ResultCell(score.mean, score.ci95, score.gain, score.gain_ci95, evaluation.run_id,
                                           superseded=previous.superseded + 1 if previous else 0)
    ordered = sorted(rows.values(), key=_row_order)
    notes = []
    superseded = sum(cell.superseded for row in ordered for cell in row.cells.values())
    if superseded:
        notes.append(f"{superseded} earlier evaluation result(s) of the same model on the same task are replaced "
                     "by the latest run; all runs are listed under Evaluations.")
    return Results(sorted(columns), ordered, notes)


def results_table(results: Results) -> Table:
    """Rows grouped by backbone and pre-training (repeated labels left blank, as in the papers); per task
    column group the accuracy and, for fine-tuned methods, the paired gain over PN."""
    headers = ["Architecture", "Pre-training", "Meta-training", "Model", "Method"]
    label_columns = len(headers)
    groups: list[tuple[str, int]] = [("", label_columns)]
    for column in results.columns:
        headers += ["accuracy", "gain over PN"]
        groups.append((f"{column.evaluated_set} {column.label}", 2))
    table = Table(headers=headers, rows=[], groups=groups, numeric_from=label_columns)
    previous: list[Cell] = []
    for index, row in enumerate(results.rows):
        labels = [row.labels.architecture, row.labels.pretraining, row.labels.metatraining,
                  Link(row.labels.model, model_anchor_for(row.labels.model_uri)), row.method]
        if labels[:2] != previous[:2]:
            table.group_starts.add(index)
        shown: list[Cell] = []
        for position, label in enumerate(labels[:4]):
            same_so_far = labels[:position + 1] == previous[:position + 1]
            shown.append("" if same_so_far and index not in table.group_starts else label)
        shown.append(row.method)
        for column in results.columns:
            cell = row.cells.get(column)
            if cell is None:
                shown += [NOT_MEASURED, NOT_MEASURED]
                continue
            shown += [percent(cell.mean, cell.ci95), points(cell.gain, cell.gain_ci95) if row.mode != "protonet"
                      else NOT_MEASURED]
        table.rows.append(shown)
        previous = labels
    return table


def model_anchor_for(model_uri: str) -> str:
    """The id of a model's lineage entry in the report."""
    text = model_uri.removeprefix("models:/").removeprefix("runs:/")
    return "model-" + "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def pretraining_table(data: ReportData, runs: list[RunRecord]) -> Table:
    headers = ["Run", "Experiment", "Architecture", "Data", "Epochs", "Final epoch loss", "k-NN accuracy",
               "Registered as", "Status"]
    table = Table(headers=headers, rows=[])
    for run in runs:
        knn = run.metrics.get("knn_accuracy")
        table.rows.append([
            run.name,
            run.experiment,
            pretty_arch(run.params.get("backbone.arch", "")),
            dataset_name(run.tags.get("metallo.dataset_uri", run.params.get("data.uri", ""))),
            run.params.get("epochs", ""),
            f"{run.metrics['epoch_loss']:.4f}" if "epoch_loss" in run.metrics else NOT_MEASURED,
            f"{100 * knn:.2f}%" if knn is not None else NOT_MEASURED,
            _registered(data, run),
            run.status,
        ])
    return table


def metatraining_table(data: ReportData, runs: list[RunRecord]) -> Table:
    headers = ["Run", "Experiment", "Started from", "Data", "Episodes", "Epochs", "Best meta-val accuracy",
               "Registered as", "Status"]
    table = Table(headers=headers, rows=[])
    for run in runs:
        way, shot = run.params.get("episodes.way", "?"), run.params.get("episodes.shot", "?")
        table.rows.append([
            run.name,
            run.experiment,
            describe_source(data, run.tags.get("metallo.backbone_source", "")),
            dataset_name(run.tags.get("metallo.dataset_uri", run.params.get("data.uri", ""))),
            f"{way}-way {shot}-shot",
            run.params.get("epochs", ""),
            _best_validation(data, run),
            _registered(data, run),
            run.status,
        ])
    return table


def evaluations_table(data: ReportData, evaluations: list[EvaluationRecord]) -> Table:
    headers = ["Run", "Experiment", "Model", "Evaluated set", "Task", "Tasks", "Methods", "Fine-tuning lr",
               "Started", "Status"]
    table = Table(headers=headers, rows=[])
    for evaluation in evaluations:
        run = data.runs[evaluation.run_id]
        lr = run.metrics.get("selected_lr")
        lr_text = f"{lr:g} (chosen on meta-val)" if lr is not None else run.params.get("finetune.lr", "")
        labels = row_labels(data, evaluation)
        table.rows.append([
            run.name,
            run.experiment,
            Link(labels.model, model_anchor_for(labels.model_uri)),
            evaluated_set(evaluation),
            f"{evaluation.way}-way {evaluation.shot}-shot",
            str(evaluation.tasks) if evaluation.tasks is not None else "",
            ", ".join(METHOD_LABELS.get(mode, mode) for mode in EVALUATION_MODES if mode in evaluation.modes),
            lr_text if any(mode != "protonet" for mode in evaluation.modes) else NOT_MEASURED,
            when(run.start_time),
            run.status,
        ])
    return table


def other_runs_table(runs: list[RunRecord], metrics_shown: int = 4) -> Table:
    """Runs of stages the report has no section for (e.g. multilabel), with a few of their last metrics."""
    table = Table(headers=["Run", "Stage", "Status", "Started", "Last metrics"], rows=[])
    for run in runs:
        shown = ", ".join(f"{key} {value:.4g}" for key, value in sorted(run.metrics.items())[:metrics_shown])
        table.rows.append([run.name, run.stage or "(none)", run.status, when(run.start_time), shown])
    return table


def lineage_facts(entry: LineageEntry) -> list[tuple[str, Cell]]:
    """What a registered model is made of, as key-value pairs."""
    run = entry.run
    tags = {**(run.tags if run else {}), **entry.model.tags}
    facts: list[tuple[str, Cell]] = [
        ("aliases", ", ".join(f"@{alias}" for alias in entry.model.aliases) or "none"),
        ("stage", {"pretrain": "DINO pretraining", "metatrain": "ProtoNet meta-training"}.get(entry.stage,
                                                                                              entry.stage or "?")),
        ("architecture", entry.architecture),
    ]
    if entry.stage != "pretrain":
        facts.append(("started from", Link(entry.started_from, model_anchor_for(entry.started_from_model))
                      if entry.started_from_model else entry.started_from))
    facts += [
        ("data", entry.dataset_uri or "?"),
        ("data manifest sha256", tags.get("metallo.dataset_manifest_sha256", "?")),
        ("config hash", tags.get("metallo.config_hash", "?")),
        ("code version", tags.get("metallo.code_version") or tags.get("metallo.version", "?")),
        ("source run", f"{run.name} ({run.run_id}) in experiment {run.experiment}" if run
         else entry.model.run_id or "?"),
    ]
    if entry.score:
        facts.append(("selected by", entry.score))
    return facts


def _registered(data: ReportData, run: RunRecord) -> Cell:
    models = [model for model in data.models.values() if model.run_id == run.run_id]
    if not models:
        return NOT_MEASURED
    model = max(models, key=lambda m: int(m.version) if m.version.isdigit() else 0)
    return Link(model_label(model), model_anchor_for(model.uri))


def _best_validation(data: ReportData, run: RunRecord) -> str:
    """The best epoch's meta-val accuracy with its interval (read from the per-epoch histories)."""
    curves = data.curves.get(run.run_id, {})
    accuracy, interval = curves.get("val_accuracy", []), dict(curves.get("val_ci95", []))
    if not accuracy:
        best = run.metrics.get("best_val_accuracy")
        return f"{100 * best:.2f}%" if best is not None else NOT_MEASURED
    step, value = max(accuracy, key=lambda point: point[1])
    epoch = accuracy.index((step, value))
    return (percent(value, interval[step]) if step in interval else f"{100 * value:.2f}%") + f" (epoch {epoch})"


def _row_order(row: ResultRow) -> tuple:
    labels = row.labels
    mode_rank = EVALUATION_MODES.index(row.mode) if row.mode in EVALUATION_MODES else len(EVALUATION_MODES)
    return (_natural(labels.architecture), _natural(labels.pretraining), _natural(labels.metatraining),
            _natural(labels.model_uri), mode_rank)


def _natural(text: str) -> tuple:
    """Sort key that puts ResNet18 before ResNet101 and v9 before v10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", text) if part)
