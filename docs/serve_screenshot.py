"""The README's screenshot of `metallo serve` (docs/serve.png): X-SDD micrographs classified on the page.

    uv run --frozen python docs/serve_screenshot.py [--out docs/serve.png]

Runs in a throw-away metallo home (your own registry is not touched): registers a frozen ImageNet
EfficientNet-Lite0 ProtoNet (the offline weights metallo installs, no meta-training) as
metallo-protonet@imagenet, opens the page in headless Chromium (/usr/bin/chromium), drops 2 support
images per class for 5 X-SDD classes and 3 queries per class named after their class (so the page draws a
confusion matrix), classifies, and saves the page as a small palette PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
X_SDD = ROOT / "metallo_core" / "datasets" / "x_sdd" / "images"
CLASSES = ("red_iron", "slag_inclusion", "surface_scratch", "iron_sheet_ash", "finishing_roll_printing")
SHOTS, QUERIES = 2, 3


def register_imagenet_protonet() -> str:
    import mlflow

    from metallo_core import tracking
    from metallo_core.fewshot.protonet import ProtoNet
    from metallo_core.models.sources import offline_imagenet_backbone
    from metallo_core.tracking.backbone_store import log_backbone
    from metallo_core.tracking.protonet_store import protonet_metadata

    backbone, spec = offline_imagenet_backbone(image_size=128)  # X-SDD images are 128 px
    model = ProtoNet(backbone)
    tracking.configure()
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("serve-screenshot"))
    with mlflow.start_run(run_name="imagenet-protonet") as run:
        pass
    log_backbone(run.info.run_id, model.backbone, spec, registered_name="metallo-protonet",
                 tags={"metallo.stage": "frozen ImageNet backbone (no meta-training)",
                       "metallo.backbone.source": "imagenet-offline"},
                 alias="imagenet", artifact_name="protonet", metadata=protonet_metadata(model))
    return "models:/metallo-protonet@imagenet"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="metallo-serve-shot-"))
    os.environ["METALLO_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from metallo_core.commands.serve_page import PageOptions, build_page

    model = register_imagenet_protonet()
    staged = home / "images"
    support, queries = {}, []
    for name in CLASSES:
        files = sorted((X_SDD / name).iterdir())
        support[name] = [str(path) for path in files[:SHOTS]]
        for path in files[SHOTS + 10:SHOTS + 10 + QUERIES]:  # queries apart from the support images
            target = staged / f"{name}_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            queries.append(str(target))
    page_app = build_page(PageOptions(work_dir=home / "work", default_model=model))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(home / "work")], footer_links=[])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.set_default_timeout(180_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#model-card :text('models:/metallo-protonet/1')")
            count = page.locator("#class-count input[type=number]")
            count.fill(str(len(CLASSES)))
            count.press("Enter")
            page.wait_for_selector(f"#class-name-{len(CLASSES) - 1}", state="visible")
            for index, name in enumerate(CLASSES):
                page.locator(f"#class-name-{index} input").fill(name)
                page.locator(f"#class-files-{index} input[type=file]").first.set_input_files(support[name])
            page.locator("#query-files input[type=file]").first.set_input_files(queries)
            for path in [*queries, *(p for files in support.values() for p in files)]:
                page.wait_for_selector(f"td.filename[aria-label='{Path(path).name}']")
            page.click("#run")
            page.wait_for_selector("#results table tbody tr")
            page.wait_for_selector("#confusion table tbody tr")
            page.wait_for_timeout(1000)  # let the page settle to its full height
            shot = home / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        page_app.close()
    image = Image.open(shot).convert("RGB")
    image = image.resize((960, round(image.height * 960 / image.width)), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {os.path.getsize(args.out) / 1024:.0f} KB")
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
