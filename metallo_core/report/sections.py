"""The report's layout: which sections, in which order, holding which tables and plots. Pure: a
`ReportData` in, a `Document` out."""

from __future__ import annotations

import math
from collections import defaultdict

from metallo_core.fewshot.confusion import Confusion
from metallo_core.report.collect import EvaluationRecord, ReportData, RunRecord
from metallo_core.report.document import Details, Document, Facts, Figure, Paragraph, Section
from metallo_core.report.figures import (
    Line,
    ShotSeries,
    accuracy_vs_shots,
    confusion_heatmap,
    line_chart,
    one_per_step,
    svg_text,
    thin,
)
from metallo_core.report.lineage import evaluated_set, lineage_entries, model_label, row_labels
from metallo_core.report.tables import (
    METHOD_LABELS,
    Results,
    evaluations_table,
    gather_results,
    lineage_facts,
    metatraining_table,
    model_anchor_for,
    other_runs_table,
    pretraining_table,
    results_table,
)

KNOWN_STAGES = ("pretrain", "metatrain", "evaluate", "grid")
MOST_CONFUSED = 3  # pairs named under each confusion matrix


def build_document(data: ReportData, *, title: str, generated: str) -> Document:
    runs = sorted(data.runs.values(), key=lambda run: run.start_time)
    own = sum(run.in_experiment for run in runs)
    facts = [
        ("experiment", data.experiment),
        ("tracking store", data.tracking_uri),
        ("generated", generated),
        ("runs", f"{own} in the experiment" + (f", {len(runs) - own} more followed through lineage"
                                              if len(runs) > own else "")),
    ]
    results = gather_results(data)
    sections = [
        results_section(results),
        shots_section(results),
        confusion_section(data),
        pretraining_section(data, [run for run in runs if run.stage == "pretrain"]),
        metatraining_section(data, [run for run in runs if run.stage == "metatrain"]),
        evaluations_section(data),
        lineage_section(data),
    ]
    others = [run for run in runs if run.stage not in KNOWN_STAGES and run.in_experiment]
    if others:
        sections.append(Section("other-runs", "Other runs", [
            Paragraph("Runs of stages this report has no section for."), other_runs_table(others)]))
    notes = notes_section(data, runs)
    if notes is not None:
        sections.append(notes)
    return Document(title=title, facts=facts, sections=sections)


def results_section(results: Results) -> Section:
    section = Section("results", "Few-shot accuracy")
    if not results.rows:
        section.blocks.append(Paragraph("No finished evaluation runs: run `metallo evaluate` (or `metallo grid`, "
                                        "`metallo quickstart`) with this experiment."))
        return section
    section.blocks.append(Paragraph(
        "Mean accuracy over the fixed test tasks with its 95% interval (1.96 sd / sqrt(tasks)). PN is plain "
        "ProtoNet, PN+FT adds per-task fine-tuning of the backbone on the support set; the gain is PN+FT minus "
        "PN paired over the same tasks, in percentage points."))
    section.blocks.append(results_table(results))
    section.blocks += [Paragraph(note) for note in results.notes]
    return section


def shots_section(results: Results) -> Section:
    section = Section("shots", "Accuracy against shots")
    charts: dict[tuple[str, int], list] = defaultdict(list)
    for column in results.columns:
        charts[(column.evaluated_set, column.way)].append(column)
    if not charts:
        section.blocks.append(Paragraph("Nothing evaluated yet."))
        return section
    identities = list(dict.fromkeys(row.labels for row in results.rows))
    for number, ((evaluated, way), columns) in enumerate(sorted(charts.items()), start=1):
        series = []
        for row in results.rows:
            measured = {column.shot: row.cells[column] for column in columns if column in row.cells}
            if not measured:
                continue
            labels = row.labels
            series.append(ShotSeries(
                label=f"{labels.architecture} · {labels.pretraining} · {labels.model} · {row.method}",
                accuracies={shot: (cell.mean, cell.ci95) for shot, cell in measured.items()},
                color=f"C{identities.index(labels) % 10}",  # one colour per model, PN and PN+FT alike
                dashed=row.mode != "protonet",
            ))
        title = f"{evaluated}, {way}-way"
        name = f"accuracy-vs-shots-{number}"
        section.blocks.append(Figure(name, svg_text(accuracy_vs_shots(series, title=title), salt=name),
                                     f"{title}: mean accuracy with 95% intervals; dashed lines are fine-tuned."))
    return section


def confusion_section(data: ReportData) -> Section:
    section = Section("confusion", "Confusion matrices")
    evaluations = [e for e in data.evaluations if e.confusions and data.runs[e.run_id].status == "FINISHED"]
    if not evaluations:
        section.blocks.append(Paragraph("No evaluation run in view logged confusion matrices (they are logged as "
                                        "confusion/<method>.json since metallo records them)."))
        return section
    section.blocks.append(Paragraph(
        "True class (rows) against predicted class (columns), pooled over all tasks of the evaluated split. Each "
        "task offers only its own classes, so a cell shows how often the row class was taken for the column class "
        "among the queries of tasks that offered both; grey cells never shared a task."))
    for number, evaluation in enumerate(evaluations, start=1):
        labels = row_labels(data, evaluation)
        task = f"{evaluation.way}-way {evaluation.shot}-shot"
        run = data.runs[evaluation.run_id]
        subsection = Section(f"confusion-{number}", f"{evaluated_set(evaluation)}, {task}: {labels.model}")
        for mode, confusion in evaluation.confusions.items():
            method = METHOD_LABELS.get(mode, mode)
            pairs = most_confused(confusion)
            caption = (f"{method}: {confusion.tasks} tasks, {confusion.queries} queries (run {run.name})."
                       + (" Most confused: " + "; ".join(pairs) + "." if pairs else ""))
            title = f"{method}, {labels.model}, {evaluation.way}w{evaluation.shot}s"
            name = f"confusion-{number}-{mode}"
            svg = svg_text(confusion_heatmap(confusion, title=title), salt=name)
            subsection.blocks.append(Figure(name, svg, caption))
        section.blocks.append(subsection)
    return section


def most_confused(confusion: Confusion, limit: int = MOST_CONFUSED) -> list[str]:
    """The off-diagonal cells with the highest rates, as "true → predicted 12.0% (30 of 250)"."""
    rates = confusion.rates()
    cells = [(float(rates[r, c]), r, c) for r in range(len(confusion.classes)) for c in range(len(confusion.classes))
             if r != c and confusion.counts[r, c] > 0 and math.isfinite(rates[r, c])]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [f"{confusion.classes[r]} → {confusion.classes[c]} {100 * rate:.1f}% "
            f"({confusion.counts[r, c]} of {confusion.opportunities[r, c]})" for rate, r, c in cells[:limit]]


def pretraining_section(data: ReportData, runs: list[RunRecord]) -> Section:
    section = Section("pretraining", "DINO pretraining")
    if not runs:
        section.blocks.append(Paragraph("No DINO pretraining runs in view (none in the experiment, and no evaluated "
                                        "model started from a DINO backbone)."))
        return section
    section.blocks.append(pretraining_table(data, runs))
    section.blocks.append(curve_figure(data, runs, "loss", "dino-loss", "DINO loss", "loss",
                                       "DINO loss per logged training step, one line per run."))
    if any("knn_accuracy" in data.curves.get(run.run_id, {}) for run in runs):
        section.blocks.append(curve_figure(data, runs, "knn_accuracy", "dino-knn", "k-NN accuracy of the teacher "
                                           "backbone", "k-NN accuracy (%)",
                                           "k-NN probe on held-out labelled images after each probed epoch.",
                                           scale=100))
    return section


def metatraining_section(data: ReportData, runs: list[RunRecord]) -> Section:
    section = Section("metatraining", "ProtoNet meta-training")
    if not runs:
        section.blocks.append(Paragraph("No ProtoNet meta-training runs in view."))
        return section
    section.blocks.append(metatraining_table(data, runs))
    section.blocks.append(curve_figure(data, runs, "val_accuracy", "metatrain-val", "Meta-validation accuracy",
                                       "accuracy (%)", "Accuracy on the fixed meta-validation tasks after each "
                                       "epoch, with 95% intervals.", scale=100, interval="val_ci95"))
    section.blocks.append(curve_figure(data, runs, "train_loss", "metatrain-loss", "Meta-training loss",
                                       "episode loss", "Cross-entropy of logged training episodes."))
    return section


def curve_figure(data: ReportData, runs: list[RunRecord], metric: str, name: str, title: str, y_label: str,
                 caption: str, *, scale: float = 1.0, interval: str = "") -> Figure:
    lines = []
    for index, run in enumerate(runs):
        curves = data.curves.get(run.run_id, {})
        if metric not in curves:
            continue
        widths = dict(curves.get(interval, [])) if interval else {}
        points = thin(one_per_step(curves[metric]))
        lines.append(Line(
            label=run.name,
            x=[step for step, _ in points],
            y=[scale * value for _, value in points],
            error=[scale * widths.get(step, math.nan) for step, _ in points] if widths else None,
            color=f"C{index % 10}",
        ))
    chart = line_chart(lines, title=title, x_label="training step", y_label=y_label)
    return Figure(name, svg_text(chart, salt=name), caption)


def evaluations_section(data: ReportData) -> Section:
    section = Section("evaluations", "Evaluations")
    evaluations: list[EvaluationRecord] = sorted(data.evaluations, key=lambda e: data.runs[e.run_id].start_time)
    if not evaluations:
        section.blocks.append(Paragraph("No evaluation runs in view."))
        return section
    section.blocks.append(Paragraph("Every evaluation run the tables draw on, oldest first."))
    section.blocks.append(evaluations_table(data, evaluations))
    return section


def lineage_section(data: ReportData) -> Section:
    section = Section("lineage", "Model lineage")
    entries = lineage_entries(data)
    if not entries:
        section.blocks.append(Paragraph("No registered models in view."))
        return section
    section.blocks.append(Paragraph("Each registered model in view: what it was trained from, on which data, with "
                                    "which config (the full config of its run is folded below each entry)."))
    for entry in entries:
        model = entry.model
        blocks = [Facts(lineage_facts(entry))]
        if entry.run is not None and entry.run.run_id in data.configs:
            blocks.append(Details(f"config of run {entry.run.name}", data.configs[entry.run.run_id]))
        section.blocks.append(Section(model_anchor_for(model.uri), model_label(model), blocks))
    return section


def notes_section(data: ReportData, runs: list[RunRecord]) -> Section | None:
    unfinished = [f"{run.name} ({run.stage or 'no stage'}): {run.status}" for run in runs
                  if run.status != "FINISHED"]
    lines = list(data.problems)
    if unfinished:
        lines.append("Runs not finished, left out of the tables: " + "; ".join(unfinished) + ".")
    if not lines:
        return None
    return Section("notes", "Notes", [Paragraph(line) for line in lines])
