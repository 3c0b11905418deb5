"""`metallo serve`'s rules without a browser: loopback unless a password is set, folders only inside the roots,
upload limits with a clear message, uploads staged in classify's layout, the results' filters and confusion
matrix, and classify stopped between steps by a listener that cancels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metallo_core.commands.classify_app import ClassifySettings, classify
from metallo_core.commands.serve import page_auth
from metallo_core.commands.serve_inputs import ServerRoots, UploadLimits, check_uploads, stage_queries, stage_support
from metallo_core.commands.serve_results import (
    Results,
    confusion,
    filtered,
    labels_from_csv,
    labels_from_names,
    read_results,
    table_html,
)
from metallo_core.errors import Cancelled, ConfigError, DataError
from metallo_core.fewshot.predict import PredictListener
from metallo_core.models.backbones import BackboneSpec
from tests.fewshot_fixtures import register_untrained_protonet


def test_another_address_needs_a_password(tmp_path):
    assert page_auth("127.0.0.1", "metallo", "", environ={}) is None
    assert page_auth("localhost", "metallo", "", environ={}) is None
    assert page_auth("::1", "metallo", "", environ={}) is None
    with pytest.raises(ConfigError, match="--host 0.0.0.0 lets other machines reach the page; set a password"):
        page_auth("0.0.0.0", "metallo", "", environ={})
    assert page_auth("0.0.0.0", "ana", "", environ={"METALLO_SERVE_PASSWORD": "s3cret"}) == ("ana", "s3cret")
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    assert page_auth("192.168.1.5", "metallo", str(secret), environ={}) == ("metallo", "from-file")
    secret.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        page_auth("192.168.1.5", "metallo", str(secret), environ={})


def test_folders_given_in_the_page_stay_inside_the_roots(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "private"
    (root / "support" / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = ServerRoots([root])
    assert roots.resolve("support", "support folder") == (root / "support").resolve()
    assert roots.resolve(str(root / "support" / "a"), "support folder") == (root / "support" / "a").resolve()
    for sneaky in ("../private", str(outside), "escape", "support/../../private", "/etc"):
        with pytest.raises(DataError, match="is outside the folders this server may read"):
            roots.resolve(sneaky, "support folder")
    with pytest.raises(DataError, match="does not exist"):
        roots.resolve("nowhere", "query folder")
    with pytest.raises(DataError, match="this server reads no folders"):
        ServerRoots([]).resolve("support", "support folder")


def test_uploads_are_limited_in_count_and_size_with_a_clear_message(tmp_path):
    files = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        path.write_bytes(b"x" * 2000)
        files.append(str(path))
    check_uploads([files[:2], files[2:]], UploadLimits(max_files=3, max_file_mb=1))
    with pytest.raises(DataError, match="3 files uploaded; this server takes at most 2 per run"):
        check_uploads([files[:2], files[2:]], UploadLimits(max_files=2))
    with pytest.raises(DataError, match=r"0.png is 0.0 MB; this server takes files up to 0.001 MB"):
        check_uploads([files], UploadLimits(max_file_mb=0.001))


def test_uploads_are_staged_in_classifys_layout(tmp_path):
    uploads = tmp_path / "gradio"
    for name in ("a/one.png", "b/one.png", "c/two.png"):
        (uploads / name).parent.mkdir(parents=True, exist_ok=True)
        (uploads / name).write_bytes(name.encode())
    support = stage_support([" pearlite ", "ferrite"], [[str(uploads / "a/one.png"), str(uploads / "b/one.png")],
                                                        [str(uploads / "c/two.png")]], tmp_path / "support")
    assert sorted(p.relative_to(support).as_posix() for p in support.rglob("*.png")) == [
        "ferrite/two.png", "pearlite/one-2.png", "pearlite/one.png"]
    for names, message in ((["a", "a"], "given twice"), (["a", ""], "class 2 has no name"),
                           (["a", "../b"], "cannot contain")):
        with pytest.raises(DataError, match=message):
            stage_support(names, [[str(uploads / "a/one.png")]] * 2, tmp_path / "other")
    with pytest.raises(DataError, match="class 'b' has no images"):
        stage_support(["a", "b"], [[str(uploads / "a/one.png")], []], tmp_path / "third")
    with pytest.raises(DataError, match="no query images"):
        stage_queries([], tmp_path / "query")


def results_with(rows: list[dict[str, str]], columns: list[str], tmp_path: Path) -> Results:
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, columns)
        writer.writeheader()
        writer.writerows(rows)
    return read_results(path, tmp_path, tmp_path, {})


def test_filters_and_confusion_matrix(tmp_path):
    columns = ["file", "predicted", "p_ferrite", "p_pearlite", "nearest_support", "tiles", "tile_votes"]
    rows = [{"file": "ferrite_1.png", "predicted": "ferrite", "p_ferrite": "0.9", "p_pearlite": "0.1"},
            {"file": "pearlite/2.png", "predicted": "ferrite", "p_ferrite": "0.55", "p_pearlite": "0.45"},
            {"file": "x.png", "predicted": "pearlite", "p_ferrite": "0.3", "p_pearlite": "0.7"}]
    results = results_with(rows, columns, tmp_path)
    assert results.classes == ["ferrite", "pearlite"] and not results.has_unknown
    assert [row["file"] for row in filtered(results, 0.8)] == ["pearlite/2.png", "x.png"]
    assert filtered(results, 1.0) == results.rows and filtered(results, 1.0, only_unknown=True) == []

    results.labels = labels_from_names([row["file"] for row in rows], results.classes)
    assert results.labels == {"ferrite_1.png": "ferrite", "pearlite/2.png": "pearlite"}
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nx.png,bainite\n")
    results.labels.update(labels_from_csv(labels))
    assert confusion(results) == (["ferrite", "pearlite", "bainite"], [[1, 0], [1, 0], [0, 1]])
    labels.write_text("name,label\nx.png,bainite\n")
    with pytest.raises(DataError, match="needs a 'file' column"):
        labels_from_csv(labels)

    marked = results_with([{**row, "unknown": flag} for row, flag in zip(rows, ("false", "true", "0"))],
                          [*columns, "unknown"], tmp_path)
    assert [row["file"] for row in filtered(marked, 1.0, only_unknown=True)] == ["pearlite/2.png"]


def test_table_holds_the_csvs_columns_and_escapes_names(tmp_path):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "<b>.png")
    columns = ["file", "predicted", "p_a", "p_b", "nearest_support", "tiles", "tile_votes", "pixel_size_nm"]
    row = {"file": "<b>.png", "predicted": "a", "p_a": "0.6", "p_b": "0.4", "nearest_support": "<b>.png",
           "tiles": "1", "tile_votes": "a:1", "pixel_size_nm": "12.5"}
    page = table_html(results_with([row], columns, tmp_path), [row])
    assert "<th>pixel_size_nm</th>" in page and "<td data-column='pixel_size_nm'>12.5</td>" in page
    assert "&lt;b&gt;.png" in page and "<b>.png" not in page.replace("alt='&lt;b&gt;.png'", "")
    assert page.count("data:image/jpeg;base64,") == 2  # the query's and its nearest support image's


class CancelAtFirstChunk(PredictListener):
    def __init__(self) -> None:
        self.heard: list[str] = []

    def queries_started(self) -> None:
        self.heard.append("started")

    def queries_embedded(self, images: int) -> None:
        self.heard.append(f"embedded {images}")
        raise Cancelled("stopped by the test")


def test_a_listener_cancels_classify_between_steps_and_nothing_is_written(tmp_path):
    model = register_untrained_protonet(BackboneSpec(arch="resnet18", small_input=True, image_size=16))
    rng = np.random.default_rng(0)
    for name in ("support/a/1.png", "support/b/1.png", *(f"query/{i}.png" for i in range(5))):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / name)
    listener = CancelAtFirstChunk()
    out = tmp_path / "p.csv"
    with pytest.raises(Cancelled, match="stopped by the test"):
        classify(model, tmp_path / "support", tmp_path / "query", out, ClassifySettings(batch_size=2), listener)
    assert listener.heard == ["started", "embedded 2"]  # stopped after the first of three chunks
    assert not out.exists() and not list(tmp_path.glob(".p.csv.*"))


def test_serve_refuses_another_address_without_a_password(monkeypatch, capsys, restore_console):
    from metallo_core import cli

    monkeypatch.delenv("METALLO_SERVE_PASSWORD", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2
    assert "--host 0.0.0.0 lets other machines reach the page; set a password" in capsys.readouterr().err


def test_page_progress_reports_counts_and_cancels_at_the_next_step():
    import threading

    from metallo_core.commands.serve_page import PageProgress

    shown: list[tuple] = []
    cancel = threading.Event()
    listener = PageProgress(lambda progress, desc="", unit="": shown.append((progress, unit)), cancel, queries=5)
    listener.finetune_started(steps=3, tiles=4)
    listener.finetune_step(0, 1.5)
    listener.queries_started()
    listener.queries_embedded(2)
    assert shown == [((0, 3), "steps"), ((1, 3), "steps"), ((0, 5), "images"), ((2, 5), "images")]
    cancel.set()
    with pytest.raises(Cancelled, match="cancelled on the page"):
        listener.queries_embedded(2)
    with pytest.raises(Cancelled):
        listener.finetune_step(1, 1.0)
