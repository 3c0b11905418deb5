"""`metallo serve`'s page in headless Chromium: X-SDD micrographs dropped on the support and query zones,
classified, the table read back, the CSV downloaded and compared with `metallo classify`'s on the same
images (same code path, so the same bytes); closing the tab deletes what the session uploaded."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from metallo_core import cli
from metallo_core.models.backbones import BackboneSpec
from tests.browser import chromium
from tests.conftest import REPO_ROOT
from tests.fewshot_fixtures import register_untrained_protonet

X_SDD = REPO_ROOT / "metallo_core" / "datasets" / "x_sdd" / "images"
CLASSES = ("red_iron", "slag_inclusion", "surface_scratch")
SPEC = BackboneSpec(arch="resnet18", small_input=True, image_size=16)


def micrographs(tmp_path: Path) -> tuple[Path, Path]:
    """Two support images and two queries per class, the queries named after their class (so the page
    can draw a confusion matrix)."""
    support, query = tmp_path / "support", tmp_path / "query"
    query.mkdir()
    for name in CLASSES:
        files = sorted((X_SDD / name).iterdir())
        (support / name).mkdir(parents=True)
        for path in files[:2]:
            shutil.copy(path, support / name / path.name)
        for path in files[2:4]:
            shutil.copy(path, query / f"{name}_{path.name}")
    return support, query


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_page_classifies_uploads_like_the_cli(tmp_path):
    browser_path = chromium("the page is not tested")
    from playwright.sync_api import sync_playwright

    from metallo_core.commands.serve_page import PageOptions, build_page

    model = register_untrained_protonet(SPEC)
    support, query = micrographs(tmp_path)
    cli_csv = tmp_path / "cli.csv"
    assert cli.main(["classify", "--model", model, "--support", str(support), "--query", str(query),
                     "--out", str(cli_csv), "--unknown"]) == 0

    work = tmp_path / "work"
    work.mkdir()
    page_app = build_page(PageOptions(work_dir=work, default_model=model))
    port = free_port()
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(work)], footer_links=[])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#model-card :text('models:/metallo-protonet/1')")
            for index, name in enumerate(CLASSES):
                page.locator(f"#class-name-{index} input, #class-name-{index} textarea").first.fill(name)
                page.locator(f"#class-files-{index} input[type=file]").first.set_input_files(
                    sorted(str(path) for path in (support / name).iterdir()))
            page.locator("#query-files input[type=file]").first.set_input_files(sorted(str(p) for p in query.iterdir()))
            for path in [*query.iterdir(), *support.rglob("*.jpg")]:  # every upload arrived
                page.wait_for_selector(f"td.filename[aria-label='{path.name}']")
            page.get_by_text("Options (as metallo classify's switches)").click()
            page.locator("#unknown input").check()
            page.click("#run")
            page.wait_for_selector("#results table tbody tr")
            header = page.locator("#results thead th").all_inner_texts()
            rows = [dict(zip(header, row.locator("td").all_inner_texts()))
                    for row in page.locator("#results tbody tr").all()]
            assert page.locator("#results tbody img").count() == 2 * len(rows)  # query and nearest support
            assert page.locator("#confusion table").count() == 1
            with page.expect_download() as download:
                page.click("#download")
            page_csv = Path(download.value.path()).read_bytes()
            page.close()
            browser.close()
    finally:
        page_app.close()

    assert page_csv == cli_csv.read_bytes()
    cli_lines = cli_csv.read_text().splitlines()
    assert [(row["file"], row["predicted"]) for row in rows] == [
        tuple(line.split(",")[:2]) for line in cli_lines[1:]]
    assert header[:3] == ["file", "image", "predicted"] and "label" in header
    assert {row["unknown"] for row in rows} <= {"true", "false"}  # checked, as with the CLI's --unknown
    # Closing the tab ends the session: its uploads and results are deleted (the unload event may land late).
    deadline = time.monotonic() + 30
    while any(work.glob("*/run-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(work.glob("*/run-*"))
