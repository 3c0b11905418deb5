"""The page `metallo serve` shows (Gradio): a registered model by name and alias, a support set (one drop zone
per class, or a folder on the server), queries (dropped or a folder), classify's switches, a progress bar
that can be cancelled, and the results table, filters, confusion matrix and CSV.

A run is `commands.classify_app.classify` on the uploads copied into classify's folder layout: the CSV
offered for download is the one `metallo classify` writes for the same folders."""

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from metallo_core.commands.classify_app import ClassifySettings, classify
from metallo_core.commands.serve_inputs import (
    ServerRoots,
    UploadLimits,
    check_uploads,
    stage_queries,
    stage_support,
)
from metallo_core.commands.serve_results import (
    Results,
    confusion_html,
    filtered,
    labels_from_csv,
    labels_from_names,
    read_results,
    table_html,
)
from metallo_core.data.crop import EdgeCrop
from metallo_core.data.images import IMAGE_SUFFIXES
from metallo_core.errors import Cancelled, MetalloError
from metallo_core.fewshot.open_set import SELECTED_MARGIN
from metallo_core.fewshot.predict import PredictListener
from metallo_core.tracking.model_catalog import model_card, model_choices

MAX_CLASSES = 10  # drop zones on the page; more classes: a support folder on the server
CSV_NAME = "predictions.csv"
# What the drop zones offer in the file chooser: every suffix classify's listing takes (TIFF and DM3/DM4 are
# not in the browser's "image" category).
IMAGE_FILE_TYPES = ["image", *IMAGE_SUFFIXES]


@dataclass
class PageOptions:
    """What the server was started with (see commands/serve.py)."""

    roots: ServerRoots = field(default_factory=ServerRoots)
    limits: UploadLimits = field(default_factory=UploadLimits)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="metallo-serve-")))
    default_model: str = ""
    device: str = "cpu"


class Sessions:
    """Each browser session's folder under the work folder (removed when the tab closes) and its cancel flag."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def folder(self, session: str) -> Path:
        return self.work_dir / (session or "anonymous")

    def cancel_flag(self, session: str) -> threading.Event:
        with self._lock:
            return self._cancel.setdefault(session, threading.Event())

    def close(self, session: str) -> None:
        """Forget the session and delete everything it uploaded or produced."""
        with self._lock:
            self._cancel.pop(session, None)
        shutil.rmtree(self.folder(session), ignore_errors=True)


class PageProgress(PredictListener):
    """classify's progress on the page's bar (Gradio shows the rate and an ETA from the counts); raises
    Cancelled at the next step once `cancel` is set."""

    def __init__(self, progress: gr.Progress, cancel: threading.Event, queries: int) -> None:
        self.progress, self.cancel, self.queries, self.done = progress, cancel, queries, 0

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled on the page; nothing was written")

    def finetune_started(self, steps: int, tiles: int) -> None:
        self.steps = steps
        self.progress((0, steps), desc=f"fine-tuning on {tiles} support tiles", unit="steps")
        self._check()

    def finetune_step(self, step: int, loss: float) -> None:
        self._check()
        self.progress((step + 1, self.steps), desc=f"fine-tuning (loss {loss:.4f})", unit="steps")

    def queries_started(self) -> None:
        self._check()
        self.progress((0, self.queries), desc="classifying", unit="images")

    def queries_embedded(self, images: int) -> None:
        self.done += images
        self.progress((self.done, self.queries), desc="classifying", unit="images")
        self._check()


def describe_model(model_uri: str) -> str:
    """The model card as markdown (lineage, settings), or the error in words."""
    if not model_uri:
        return "No model chosen."
    if not model_uri.startswith("models:/"):
        return f"`{model_uri}` is not a registered version: no lineage or recorded settings to show."
    try:
        card = model_card(model_uri)
    except MetalloError as exc:
        return f"**{exc}**"
    lines = [f"**{card.uri}**" + (f" (aliases: {', '.join('@' + a for a in card.aliases)})" if card.aliases else ""),
             f"- run: `{card.run_id}`" if card.run_id else "",
             f"- fine-tuning (with the switch on): {card.finetune}", f"- inference: {card.inference}"]
    lines += [f"- {key}: `{value}`" for key, value in card.lineage.items()]
    text = "\n".join(line for line in lines if line)
    return f"{text}\n\n{card.description}" if card.description else text


def build_page(options: PageOptions) -> gr.Blocks:
    sessions = Sessions(options.work_dir)
    # Gradio's own copies of uploads are deleted an hour after they arrive, and with the work folder at exit.
    with gr.Blocks(title="metallo classify", delete_cache=(600, 3600)) as page:
        gr.Markdown("# metallo classify\nClassify micrographs against a few labelled images per class "
                    "with a registered ProtoNet (the same run as `metallo classify`).")
        with gr.Row():
            model = gr.Dropdown(label="Model (registry name@alias, or any MLflow model URI)", allow_custom_value=True,
                                value=options.default_model or None, elem_id="model", scale=3)
            refresh = gr.Button("Refresh list", scale=0)
        card = gr.Markdown(elem_id="model-card")

        gr.Markdown("## Support set: a few labelled images per class")
        support_mode = gr.Radio(["upload", "folder on the server"], value="upload", label="Support from",
                                elem_id="support-mode")
        with gr.Column() as upload_box:
            class_count = gr.Slider(2, MAX_CLASSES, value=3, step=1, label="Classes", elem_id="class-count")
            names, zones, groups = [], [], []
            with gr.Row(equal_height=False):
                for index in range(MAX_CLASSES):
                    with gr.Column(visible=index < 3, min_width=180) as group:
                        names.append(gr.Textbox(value=f"class {index + 1}", label=f"Class {index + 1} name",
                                                elem_id=f"class-name-{index}", max_lines=1))
                        zones.append(gr.File(file_count="multiple", label="Images", elem_id=f"class-files-{index}",
                                             file_types=IMAGE_FILE_TYPES, height=180))
                    groups.append(group)
        support_folder = gr.Textbox(label="Support folder on the server (one sub-folder per class)",
                                    elem_id="support-folder", visible=False)

        gr.Markdown("## Queries: the images to classify")
        with gr.Row(equal_height=False):
            query_files = gr.File(file_count="multiple", label="Query images", elem_id="query-files",
                                  file_types=IMAGE_FILE_TYPES, height=200, scale=2)
            with gr.Column(scale=1):
                query_folder = gr.Textbox(label="…or a query folder on the server (searched recursively)",
                                          elem_id="query-folder")
                labels_file = gr.File(label="Optional labels CSV (file,label) for a confusion matrix",
                                      elem_id="labels", file_types=[".csv"], height=120)

        with gr.Accordion("Options (as metallo classify's switches)", open=False):
            with gr.Row():
                crop = gr.Textbox(label="--crop", placeholder="bottom=64, bottom=0.1, auto", elem_id="crop")
                tile = gr.Number(0, label="--tile (px, 0: whole image)", precision=0, elem_id="tile")
                query_scale = gr.Number(1.0, label="--query-scale", elem_id="query-scale")
                inference = gr.Radio(["recorded", "plain"], value="recorded", label="--inference")
            with gr.Row():
                finetune = gr.Checkbox(False, label="--finetune (settings recorded with the model)",
                                       elem_id="finetune")
                steps = gr.Number(None, label="--steps (empty: as recorded)", precision=0)
                lr = gr.Number(None, label="--lr (empty: as recorded)")
            with gr.Row():
                unknown = gr.Checkbox(False, label="--unknown (flag images that resemble none of the classes)",
                                      elem_id="unknown")
                unknown_margin = gr.Number(SELECTED_MARGIN, label="--unknown-margin (higher flags more)",
                                           elem_id="unknown-margin")

        with gr.Row():
            run = gr.Button("Classify", variant="primary", elem_id="run")
            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        status = gr.Markdown(elem_id="status")
        download = gr.DownloadButton("Download predictions.csv", visible=False, elem_id="download")

        gr.Markdown("## Results")
        with gr.Row():
            below = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Show rows whose top probability is below "
                              "(1: all rows)", elem_id="low-confidence")
            only_unknown = gr.Checkbox(False, label="Only 'none of these' rows (run with --unknown)",
                                       elem_id="only-unknown")
        table = gr.HTML(elem_id="results")
        matrix = gr.HTML(elem_id="confusion")
        results_state = gr.State(None)

        def choices(current: str | None):
            try:
                found = model_choices()
            except MetalloError as exc:
                gr.Warning(str(exc))
                found = []
            values = [(choice.label, choice.uri) for choice in found]
            value = current or (values[0][1] if values else None)
            return gr.Dropdown(choices=values, value=value), describe_model(value or "")

        page.load(choices, model, [model, card])
        refresh.click(choices, model, [model, card])
        model.change(describe_model, model, card)
        class_count.change(lambda count: [gr.Column(visible=index < count) for index in range(MAX_CLASSES)],
                           class_count, groups)
        support_mode.change(lambda mode: [gr.Column(visible=mode == "upload"), gr.Textbox(visible=mode != "upload")],
                            support_mode, [upload_box, support_folder])

        def classify_on_page(given: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - Gradio's way
            """One run: `given` maps each input component to its value (Gradio's set-of-inputs form)."""
            (model_uri, mode, count, support_path, queries, query_path, labels, crop_spec, tile_px, scale,
             inference_mode, adapt, steps_given, lr_given, flag_unknown, margin_given) = (
                given[component] for component in run_inputs)
            given_names, given_zones = [given[name] for name in names], [given[zone] for zone in zones]
            session = request.session_hash or "anonymous"
            flag = sessions.cancel_flag(session)
            flag.clear()
            run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=_mkdir(sessions.folder(session))))
            count = int(count)
            try:
                if not model_uri:
                    raise MetalloError("choose a model first")
                uploads = [list(files or []) for files in given_zones[:count]] if mode == "upload" else []
                check_uploads([*uploads, list(queries or [])], options.limits)
                if mode == "upload":
                    support = stage_support(given_names[:count], uploads, run_dir / "support")
                else:
                    support = options.roots.resolve(support_path or "", "support folder")
                if query_path and query_path.strip():
                    query = options.roots.resolve(query_path, "query folder")
                else:
                    query = stage_queries(list(queries or []), run_dir / "query")
                settings = ClassifySettings(tile=int(tile_px or 0), query_scale=float(scale or 1.0),
                                            finetune=bool(adapt), steps=int(steps_given) if steps_given else None,
                                            lr=float(lr_given) if lr_given else None, inference=inference_mode,
                                            unknown=bool(flag_unknown), device=options.device)
                if flag_unknown and margin_given is not None and float(margin_given) != SELECTED_MARGIN:
                    settings.unknown_margin = float(margin_given)  # as `--unknown-margin`; the default as without
                settings.crop = EdgeCrop.parse((crop_spec or "").strip() or None)
                listener = PageProgress(progress, flag, 0)
                progress(0, desc="reading the model and images")
                out = run_dir / CSV_NAME
                result = _classify_counting(model_uri, support, query, out, settings, listener)
                query_root = query if query.is_dir() else query.parent
                read = read_results(out, query_root, support, {})
                read.labels = {**labels_from_names([row["file"] for row in read.rows], read.classes),
                               **(labels_from_csv(labels) if labels else {})}
                read.labels = {name: label for name, label in read.labels.items()
                               if name in {row["file"] for row in read.rows}}
            except Cancelled as exc:
                shutil.rmtree(run_dir, ignore_errors=True)
                return f"**Cancelled**: {exc}.", gr.DownloadButton(visible=False), "", "", None
            except (MetalloError, OSError) as exc:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise gr.Error(str(exc), print_exception=False) from exc
            summary = (f"{len(result.predictions)} image(s) classified into {len(result.classes)} classes with "
                       f"{result.model}; crop {result.crop}; inference {result.inference_source}"
                       + (f"; fine-tuned from {result.finetune_source}" if result.finetuned else "")
                       + (f"; {sum(bool(p.unknown) for p in result.predictions)} flagged 'none of these' (margin "
                          f"{result.open_set['margin']:+g})" if result.open_set else ""))
            return (summary, gr.DownloadButton(value=str(out), visible=True), table_html(read, read.rows),
                    confusion_html(read), read)

        run_inputs = [model, support_mode, class_count, support_folder, query_files, query_folder, labels_file,
                      crop, tile, query_scale, inference, finetune, steps, lr, unknown, unknown_margin]
        run.click(classify_on_page, {*run_inputs, *zones, *names}, [status, download, table, matrix, results_state],
                  concurrency_limit=1)

        def cancel_run(request: gr.Request):
            sessions.cancel_flag(request.session_hash or "anonymous").set()
            return "Cancelling at the next step…"

        cancel.click(cancel_run, None, status, queue=False)

        def refilter(results: Results | None, threshold: float, unknown_only: bool) -> str:
            if results is None:
                return ""
            rows = filtered(results, threshold, unknown_only)
            note = ("" if results.has_unknown or not unknown_only
                    else "<p>These predictions have no <code>unknown</code> column: no row is marked "
                         "'none of these'.</p>")
            return note + table_html(results, rows)

        below.change(refilter, [results_state, below, only_unknown], table)
        only_unknown.change(refilter, [results_state, below, only_unknown], table)

        def close_session(request: gr.Request):
            sessions.close(request.session_hash or "anonymous")

        page.unload(close_session)
    return page


def _classify_counting(model_uri, support, query, out, settings, listener: PageProgress):
    """classify with the page's listener, told how many query images there are once classify listed them."""
    from metallo_core.commands.classify_app import list_queries

    listener.queries = len(list_queries(query)[1])
    return classify(model_uri, support, query, out, settings, listener=listener)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
