"""Report tables and layout from hand-made records (no MLflow): lineage names the rows, cells carry the logged
numbers, later runs replace earlier ones, and both renderers escape what MLflow hands back."""

import numpy as np

from metallo_core.fewshot.confusion import Confusion
from metallo_core.report.collect import EvaluationRecord, ModelRecord, ModeScore, ReportData, RunRecord
from metallo_core.report.document import Link, Table
from metallo_core.report.html_page import render_html
from metallo_core.report.lineage import describe_source, lineage_entries, row_labels
from metallo_core.report.markdown_page import render_markdown
from metallo_core.report.sections import build_document, most_confused
from metallo_core.report.tables import gather_results, percent, points, results_table


def run(run_id, stage, start, *, tags=None, params=None, metrics=None, status="FINISHED", name=None,
        experiment="exp", in_experiment=True):
    return RunRecord(run_id, name or run_id, experiment, status, start, {"metallo.stage": stage, **(tags or {})},
                     params or {}, metrics or {}, in_experiment)


def evaluation(run_id, model_uri, shot, modes, split="test", grid_labels=None):
    return EvaluationRecord(run_id, model_uri, "s3://bucket/target-set", split, 5, shot, 100,
                            {mode: ModeScore(*values) for mode, values in modes.items()},
                            grid_labels=grid_labels or {})


def report_data(evaluations, extra_runs=()) -> ReportData:
    runs = [
        run("dino", "pretrain", 1, tags={"metallo.dataset_uri": "/data/mini"}, params={"backbone.arch": "resnet50"},
            metrics={"knn_accuracy": 0.5, "epoch_loss": 4.25}, experiment="metallo-pretrain", in_experiment=False),
        run("pn-dino", "metatrain", 2, tags={"metallo.backbone_source": "models:/metallo-backbone/4"}),
        run("pn-scratch", "metatrain", 3, tags={"metallo.backbone_source": "scratch"}),
        *[run(e.run_id, "evaluate", 10 + index) for index, e in enumerate(evaluations)],
        *extra_runs,
    ]
    models = [
        ModelRecord("metallo-backbone", "4", "dino", ["current"],
                    {"metallo.stage": "pretrain", "metallo.arch": "resnet50"}),
        ModelRecord("metallo-protonet", "7", "pn-dino", [], {
            "metallo.stage": "metatrain", "metallo.arch": "resnet50",
            "metallo.backbone_source": "models:/metallo-backbone/4", "metallo.dataset_uri": "/data/micrographs",
            "metallo.best_val_accuracy": "0.8123", "metallo.best_epoch": "3"}),
        ModelRecord("metallo-protonet", "8", "pn-scratch", ["current"], {
            "metallo.stage": "metatrain", "metallo.arch": "resnet18", "metallo.backbone_source": "scratch",
            "metallo.dataset_uri": "/data/micrographs"}),
    ]
    return ReportData(experiment="exp", tracking_uri="sqlite:///x.db", runs={r.run_id: r for r in runs},
                      evaluations=list(evaluations), models={m.uri: m for m in models}, curves={}, configs={},
                      problems=[])


EVALUATIONS = [
    evaluation("e1", "models:/metallo-protonet/7", 1,
               {"protonet": (0.6536, 0.0123), "finetune": (0.9072, 0.0101, 0.2536, 0.0111)}),
    evaluation("e5", "models:/metallo-protonet/7", 5,
               {"protonet": (0.8, 0.01), "finetune": (0.93, 0.005, 0.13, 0.004)}),
    evaluation("s1", "models:/metallo-protonet/8", 1, {"protonet": (0.41, 0.015)}),
]


def test_formats_are_the_papers():
    assert percent(0.6536, 0.0123) == "65.36% ± 1.23"
    assert points(0.2536, 0.0111) == "+25.36 ± 1.11" and points(-0.01, 0.002) == "-1.00 ± 0.20"
    assert points(None, None) == "—"


def test_rows_are_named_through_the_lineage():
    data = report_data(EVALUATIONS)
    dino = row_labels(data, EVALUATIONS[0])
    assert (dino.architecture, dino.pretraining, dino.metatraining, dino.model) == (
        "ResNet50", "DINO (mini)", "micrographs", "metallo-protonet v7")
    assert row_labels(data, EVALUATIONS[2]).pretraining == "none (scratch)"
    assert describe_source(data, "/weights/resnet50-imagenet.pth") == "weights file resnet50-imagenet.pth"
    assert describe_source(data, "models:/metallo-backbone@current") == "DINO (mini)"  # an alias, as it points now
    # a grid's own names win, except "-", the grid's value for "not stated"
    named = evaluation("g", "models:/metallo-protonet/8", 1, {"protonet": (0.5, 0.01)},
                       grid_labels={"backbone": "ResNet18", "pretraining": "-", "set": "synthetic", "target": "MEM"})
    labels = row_labels(report_data([named]), named)
    assert (labels.architecture, labels.pretraining, labels.metatraining) == ("ResNet18", "none (scratch)", "synthetic")


def test_results_table_has_a_column_group_per_task_and_the_logged_numbers():
    table = results_table(gather_results(report_data(EVALUATIONS)))
    assert [label for label, _ in table.groups] == ["", "target-set (test) 5w1s", "target-set (test) 5w5s"]
    assert table.headers[5:] == ["accuracy", "gain over PN"] * 2
    scratch, pn, ft = table.rows  # ResNet18 before ResNet50
    model = Link("metallo-protonet v7", "model-metallo-protonet-7")
    assert pn[:5] == ["ResNet50", "DINO (mini)", "micrographs", model, "PN"]
    assert pn[5:] == ["65.36% ± 1.23", "—", "80.00% ± 1.00", "—"]
    assert ft[:5] == ["", "", "", "", "PN+FT"]  # repeated labels left blank, as in the papers
    assert ft[5:] == ["90.72% ± 1.01", "+25.36 ± 1.11", "93.00% ± 0.50", "+13.00 ± 0.40"]
    assert scratch[:2] == ["ResNet18", "none (scratch)"] and scratch[5:] == ["41.00% ± 1.50", "—", "—", "—"]
    assert table.group_starts == {0, 1}


def test_a_later_run_replaces_an_earlier_one_and_unfinished_runs_are_left_out():
    again = evaluation("e1-again", "models:/metallo-protonet/7", 1, {"protonet": (0.7, 0.02)})
    failed = evaluation("e1-failed", "models:/metallo-protonet/7", 1, {"protonet": (0.1, 0.02)})
    data = report_data([*EVALUATIONS, again, failed])
    data.runs["e1-failed"].status = "FAILED"
    results = gather_results(data)
    assert results.rows[1].cells[results.columns[0]].mean == 0.7  # rows[0] is the ResNet18
    assert "1 earlier evaluation result(s)" in results.notes[0]
    document = build_document(data, title="t", generated="now")
    notes = next(section for section in document.sections if section.anchor == "notes")
    assert "e1-failed (evaluate): FAILED" in notes.blocks[0].text


def test_lineage_lists_protonets_before_their_backbones():
    entries = lineage_entries(report_data(EVALUATIONS))
    assert [entry.model.uri for entry in entries] == [
        "models:/metallo-protonet/7", "models:/metallo-protonet/8", "models:/metallo-backbone/4"]
    assert entries[0].started_from == "DINO (mini)" and entries[0].started_from_model == "models:/metallo-backbone/4"
    assert entries[0].score == "best meta-val accuracy 81.23% (epoch 3)"
    assert entries[2].score == "final k-NN accuracy 50.00%"


def test_most_confused_pairs_ignore_the_diagonal_and_unmet_pairs():
    confusion = Confusion(["a", "b", "c"], np.array([[8, 2, 0], [1, 9, 0], [0, 0, 5]]),
                          np.array([[10, 10, 0], [10, 10, 0], [0, 0, 5]]), tasks=3)
    assert most_confused(confusion) == ["a → b 20.0% (2 of 10)", "b → a 10.0% (1 of 10)"]


def test_renderers_escape_text_from_mlflow():
    hostile = "<script>alert(1)</script> | *x*"
    data = report_data(EVALUATIONS, extra_runs=[run("other", "multilabel", 50, name=hostile, metrics={"f1": 0.5})])
    document = build_document(data, title="t", generated="now")
    html = render_html(document)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    markdown = render_markdown(document)
    assert "\\<script\\>alert(1)\\</script\\> \\| \\*x\\*" in markdown
    assert "| ResNet50 | DINO (mini) | micrographs | [metallo-protonet v7](#model-metallo-protonet-7) | PN | " \
           "65.36% ± 1.23 | — | 80.00% ± 1.00 | — |" in markdown


def test_markdown_folds_group_headers_into_column_names():
    table = Table(headers=["Model", "accuracy", "gain"], rows=[["m", "1", "2"]], groups=[("", 1), ("set 5w1s", 2)],
                  numeric_from=1)
    lines = render_markdown_table(table)
    assert lines[0] == "| Model | set 5w1s accuracy | set 5w1s gain |" and lines[1] == "|---|---:|---:|"


def render_markdown_table(table: Table) -> list[str]:
    from metallo_core.report.document import Document, Section

    text = render_markdown(Document("t", [], [Section("s", "S", [table])]))
    return [line for line in text.splitlines() if line.startswith("|")]
