"""Make the report of one MLflow experiment and write it: report.html (self-contained), report.md and the
plots as figures/*.svg for the markdown. Files are written under temporary names and renamed into place,
so a reader never sees a half-written report, and the figures of an older report in the same folder go."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from metallo_core import tracking
from metallo_core.errors import StorageError
from metallo_core.report.collect import REPORT_STAGE, STAGE_TAG, collect
from metallo_core.report.document import Figure, Section
from metallo_core.report.html_page import render_html
from metallo_core.report.markdown_page import render_markdown
from metallo_core.report.sections import build_document

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
FIGURE_DIR = "figures"


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    figures: list[Path]
    run_id: str | None = None  # the MLflow run the files were logged to, with log_to_mlflow


def write_report(experiment: str, out: str | Path, *, title: str | None = None,
                 log_to_mlflow: bool = False) -> ReportFiles:
    """Report on `experiment` into folder `out`; with `log_to_mlflow`, also keep the files as artifacts of a
    run of the experiment (tagged so that later reports leave it out)."""
    data = collect(experiment)
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    document = build_document(data, title=title or f"metallo report: {experiment}", generated=generated)
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = _write_figures(out, list(_figures(document.sections)))
        markdown = _write_atomically(out / MARKDOWN_FILE, render_markdown(document, FIGURE_DIR))
        html = _write_atomically(out / HTML_FILE, render_html(document))
    except OSError as exc:
        raise StorageError(f"cannot write the report into {out}: {exc}") from exc
    files = ReportFiles(html=html, markdown=markdown, figures=figures)
    if log_to_mlflow:
        with tracking.start_run(experiment, f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={STAGE_TAG: REPORT_STAGE}) as run:
            run.log_artifact(html, "report")
            run.log_artifact(markdown, "report")
            if figures:
                run.log_artifacts(out / FIGURE_DIR, f"report/{FIGURE_DIR}")
            files.run_id = run.run_id
    return files


def _figures(sections: list[Section]) -> Iterator[Figure]:
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                yield block
            elif isinstance(block, Section):
                yield from _figures([block])


def _write_figures(out: Path, figures: list[Figure]) -> list[Path]:
    """Write every figure into a fresh folder, then swap it for the old one."""
    staging = out / f".{FIGURE_DIR}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: that makes it private (0700), and the report is meant to be shared
    try:
        for figure in figures:
            (staging / f"{figure.name}.svg").write_text(figure.svg, encoding="utf-8")
        target = out / FIGURE_DIR
        retired = None
        if target.exists():
            retired = out / f".{FIGURE_DIR}-old-{uuid.uuid4().hex[:12]}"
            target.rename(retired)
        staging.rename(target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return [out / FIGURE_DIR / f"{figure.name}.svg" for figure in figures]


def _write_atomically(path: Path, content: str) -> Path:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(content, encoding="utf-8")
    os.replace(temporary, path)
    return path
