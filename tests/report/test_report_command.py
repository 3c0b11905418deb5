"""`metallo report` on a tiny experiment logged as the stages log it: the HTML and markdown tables hold the
logged numbers in the right cells, lineage is followed into another experiment, the page is self-contained
and escaped, and headless Chromium renders it (tables and coloured SVG plots on the screenshot)."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

import pytest

from metallo_core import tracking
from metallo_core.cli import main
from metallo_core.errors import MetalloError
from metallo_core.report.build import write_report
from tests.browser import chromium
from tests.report import tiny_experiment
from tests.report.tiny_experiment import EXPERIMENT, GRID_EXPERIMENT, SCORES

FIGURES = 1 + 2 * len(SCORES) + 2 + 2  # accuracy vs shots, a confusion per (evaluation, method), DINO, ProtoNet


def expected_cells(mean, ci95, gain, gain_ci95) -> tuple[str, str]:
    accuracy = f"{100 * mean:.2f}% ± {100 * ci95:.2f}"
    return accuracy, "—" if gain is None else f"{100 * gain:+.2f} ± {100 * gain_ci95:.2f}"


def both_shots(model: str, mode: str) -> list[str]:
    """The row's four number cells: 5w1s accuracy and gain, then 5w5s accuracy and gain."""
    return [*expected_cells(*SCORES[model, 1][mode]), *expected_cells(*SCORES[model, 5][mode])]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The tiny experiment in its own store and its report, made once for this module's tests (each test
    still gets its own store from the autouse fixture; `in_tiny_store` points it at this one)."""
    home = tmp_path_factory.mktemp("tiny-store")
    out = home / "report"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tracking.ENV_HOME, str(home))
        patch.setenv(tracking.ENV_TRACKING_URI, f"sqlite:///{home / 'mlflow.db'}")
        tiny = tiny_experiment.build()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["report", "--experiment", EXPERIMENT, "--out", str(out), "--title", "Tiny <report>"]) == 0
    assert str(out / "report.html") in printed.getvalue() and str(out / "report.md") in printed.getvalue()
    return tiny, out


@pytest.fixture
def in_tiny_store(report, monkeypatch):
    _, out = report
    monkeypatch.setenv(tracking.ENV_HOME, str(out.parent))
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, f"sqlite:///{out.parent / 'mlflow.db'}")


def test_tables_hold_the_logged_numbers(report):
    tiny, out = report
    html, markdown = (out / "report.html").read_text(), (out / "report.md").read_text()
    for (model, shot), modes in SCORES.items():
        for mode, scores in modes.items():
            accuracy, gain = expected_cells(*scores)
            assert accuracy in html and accuracy in markdown, (model, shot, mode)
            if scores[2] is not None:
                assert gain in html and gain in markdown
    # each row has its numbers in task order: 5w1s then 5w5s (accuracy, gain)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Architecture | Pre-training | Meta-training | Model | Method | "
                              "tiny-target (test) 5w1s accuracy | tiny-target (test) 5w1s gain over PN | "
                              "tiny-target (test) 5w5s accuracy")
    dino = tiny.protonet_uris["dino"].rsplit("/", 1)[-1]
    pn = next(index for index, row in enumerate(rows) if f"metallo-protonet v{dino}]" in row)
    cells = [cell.strip() for cell in rows[pn].strip("|").split("|")]
    assert cells[:3] == ["ResNet18", "DINO (tiny-unlabelled)", "tiny-train-set"] and cells[4] == "PN"
    assert cells[5:] == both_shots("dino", "protonet")
    cells = [cell.strip() for cell in rows[pn + 1].strip("|").split("|")]
    assert cells[4] == "PN+FT"
    assert cells[5:] == both_shots("dino", "finetune")
    first_number = expected_cells(*SCORES["dino", 1]["protonet"])[0]
    assert f'{dino}</a></td><td>PN</td><td class="num">{first_number}</td>' in html


def test_lineage_plots_and_self_containment(report):
    tiny, out = report
    html = (out / "report.html").read_text()
    # the DINO run behind the backbone lives in another experiment, and is reported with its k-NN accuracy
    assert "tiny-report-pretrain" in html and "DINO (tiny-unlabelled)" in html and "45.00%" in html
    assert f'id="model-metallo-backbone-{tiny.backbone_uri.rsplit("/", 1)[-1]}"' in html
    assert "data: /data/tiny-train-set" in (out / "report.md").read_text().replace("- data: ", "data: ")
    assert "6 in the experiment, 1 more followed through lineage" in html
    assert "backbone:\n  source: " + tiny.backbone_uri in html  # its run's config, folded in
    # a confusion matrix per evaluated set and method, plus the curves, inline and as files for the markdown
    assert html.count("<svg") == FIGURES and len(list((out / "figures").glob("*.svg"))) == FIGURES
    assert html.count("Most confused:") == 2 * len(SCORES)
    # escaped, self-contained: no scripts, no fetched resources (the SVG namespace is a name, not a fetch)
    assert "&lt;b&gt;widmanstätten &amp; co&lt;/b&gt;" in html and "<b>widmanstätten" not in html
    assert "<title>Tiny &lt;report&gt;</title>" in html
    for forbidden in ("<script", "<link", "src=", "url(", "@import", "<iframe"):
        assert forbidden not in html.lower()
    assert set(re.findall(r"https?://[^\"' <]*", html)) == {"http://www.w3.org/2000/svg"}


def test_a_logged_report_is_left_out_of_the_next_one(report, in_tiny_store, tmp_path):
    files = write_report(EXPERIMENT, tmp_path / "logged", log_to_mlflow=True)
    client = tracking.client()
    names = {Path(item.path).name for item in client.list_artifacts(files.run_id, "report")}
    assert {"report.html", "report.md", "figures"} <= names
    again = write_report(EXPERIMENT, tmp_path / "again")
    assert "6 in the experiment," in again.html.read_text()


def test_a_grid_experiment_reports_its_children_under_the_grids_names(report, in_tiny_store, tmp_path):
    markdown = write_report(GRID_EXPERIMENT, tmp_path / "grid").markdown.read_text()
    assert "1 in the experiment, 4 more followed through lineage" in markdown  # 2 evaluations, ProtoNet, DINO
    assert "MEM-25 (test) 5w1s accuracy" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| ResNet18-small "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:3] == ["DINO (miniImageNet)", "synthetic"]
    assert cells[5:] == both_shots("dino", "protonet")


def test_unknown_or_empty_experiment_is_a_clear_error(in_tiny_store, capsys, tmp_path):
    assert main(["report", "--experiment", "no-such-experiment", "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("metallo: error: no MLflow experiment named 'no-such-experiment'")
    tracking.ensure_experiment("empty-one")
    with pytest.raises(MetalloError, match="experiment 'empty-one' .* has no runs"):
        write_report("empty-one", tmp_path / "r")
    assert not (tmp_path / "r" / "report.html").exists()


# ------------------------------------------------------------------------------------------ the browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    browser = chromium("the report is not rendered")
    _, out = report
    url = (out / "report.html").as_uri()
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<tbody>" in dom.stdout and expected_cells(*SCORES["dino", 1]["finetune"])[0] in dom.stdout
    assert dom.stdout.count("<svg") == FIGURES

    screenshot = tmp_path / "report.png"
    shot = subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={screenshot}", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    assert screenshot.stat().st_size > 30_000
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 2400)
    small = image.resize((320, 600))
    pixels = [small.getpixel((x, y)) for y in range(small.height) for x in range(small.width)]
    inked = sum(1 for r, g, b in pixels if min(r, g, b) < 200) / len(pixels)
    assert inked > 0.02, f"the page looks blank ({inked:.1%} of it inked)"
    # the SVGs were drawn: blue chart lines, green correct answers and red confusions in the heatmaps
    assert any(b > 150 and b > r + 80 for r, g, b in pixels)
    assert any(g > r + 60 and g > b + 60 for r, g, b in pixels)
    assert any(r > g + 60 and r > b + 60 for r, g, b in pixels)
