"""`metallo serve`'s results: the CSV classify wrote, read back into rows for the page's table (thumbnails of
the query and of its nearest support image beside it), its filters, and the confusion matrix when the
query names or a labels CSV carry the true classes.

The table is built from the CSV's own header (`classify_app.prediction_columns`), so columns classify
adds later show up without a change here; the 'none of these' filter reads an `unknown` column when
there is one."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from metallo_core.data.image_files import read_file_bytes
from metallo_core.data.images import decode_rgb
from metallo_core.errors import DataError

THUMBNAIL_PX = 72
# Compact cells and a horizontal scroll bar: a row holds a probability per class.
_STYLE = ("<style>.metallo-scroll{overflow-x:auto}.metallo-results,.metallo-confusion{font-size:0.8em}"
          ".metallo-results td,.metallo-results th,.metallo-confusion td,.metallo-confusion th"
          "{padding:2px 6px !important;line-height:1.2 !important;vertical-align:middle}"
          ".metallo-results img{width:48px;height:48px;max-width:none;margin:0 !important;object-fit:cover}</style>")
UNKNOWN_COLUMN = "unknown"
_TRUE = {"1", "true", "yes", "y"}


@dataclass
class Results:
    """One classify run as the page shows it: the CSV's header and rows (strings, as written), the classes
    in column order, the roots the CSV's file names are relative to, and the true class of each query file
    that has one (from its name or a labels CSV)."""

    columns: list[str]
    rows: list[dict[str, str]]
    classes: list[str]
    query_root: Path
    support_root: Path
    labels: dict[str, str] = field(default_factory=dict)
    thumbnails: dict[str, str] = field(default_factory=dict)  # path -> data: URI, made once per image

    @property
    def has_unknown(self) -> bool:
        return UNKNOWN_COLUMN in self.columns

    def confidence(self, row: dict[str, str]) -> float:
        """The predicted class's probability."""
        return float(row[f"p_{row['predicted']}"]) if f"p_{row['predicted']}" in row else 0.0


def read_results(csv_path: Path, query_root: Path, support_root: Path, labels: dict[str, str]) -> Results:
    """The CSV classify wrote, with the labels that apply to its files."""
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    classes = [column[2:] for column in columns if column.startswith("p_")]
    return Results(columns, rows, classes, query_root, support_root,
                   {row["file"]: labels[row["file"]] for row in rows if row["file"] in labels})


def labels_from_names(files: list[str], classes: list[str]) -> dict[str, str]:
    """{file: class} for query files whose name says their class: the top folder is a class's name
    (query/<class>/...), or the file name starts with one (longest first: `red_iron_01.png` -> red_iron)."""
    found = {}
    by_length = sorted(classes, key=len, reverse=True)
    for name in files:
        parts = name.split("/")
        if len(parts) > 1 and parts[0] in classes:
            found[name] = parts[0]
            continue
        base = parts[-1]
        match = next((label for label in by_length if base.startswith(label)), None)
        if match is not None:
            found[name] = match
    return found


def labels_from_csv(path: str | os.PathLike) -> dict[str, str]:
    """{file: class} from a CSV with a `file` column and a `label` (or `class`) column; DataError otherwise."""
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        fields = reader.fieldnames or []
        label = next((name for name in ("label", "class", "true") if name in fields), None)
        if "file" not in fields or label is None:
            raise DataError(f"labels CSV {Path(path).name} needs a 'file' column and a 'label' column, "
                            f"got {', '.join(fields) or 'no header'}")
        return {row["file"]: row[label] for row in reader if row.get("file")}


def filtered(results: Results, max_confidence: float = 1.0, only_unknown: bool = False) -> list[dict[str, str]]:
    """The rows whose predicted class's probability is below `max_confidence` (1: every row) and, with
    `only_unknown`, marked 'none of these' in the `unknown` column (no row when there is no such column)."""
    rows = [row for row in results.rows if max_confidence >= 1.0 or results.confidence(row) < max_confidence]
    if only_unknown:
        rows = [row for row in rows if results.has_unknown and row[UNKNOWN_COLUMN].strip().lower() in _TRUE]
    return rows


def confusion(results: Results) -> tuple[list[str], list[list[int]]] | None:
    """(true classes in row order, counts[true][predicted] over the classes in column order) for the
    labelled rows, or None when no row is labelled. Labels that are not a support class get a row of their own."""
    labelled = [row for row in results.rows if row["file"] in results.labels]
    if not labelled:
        return None
    truths = results.classes + sorted({results.labels[row["file"]] for row in labelled} - set(results.classes))
    counts = [[0] * len(results.classes) for _ in truths]
    for row in labelled:
        if row["predicted"] in results.classes:
            counts[truths.index(results.labels[row["file"]])][results.classes.index(row["predicted"])] += 1
    return truths, counts


def table_html(results: Results, rows: list[dict[str, str]]) -> str:
    """The rows as an HTML table: the CSV's columns, with the query's thumbnail after `file` and the
    nearest support image's after `nearest_support`."""
    head = []
    for column in results.columns:
        head.append(column)
        if column in ("file", "nearest_support"):
            head.append("image" if column == "file" else "nearest image")
    if "label" not in head and results.labels:
        head.append("label")
    lines = [_STYLE, "<div class='metallo-scroll'><table class='metallo-results'><thead><tr>",
             *(f"<th>{html.escape(name)}</th>" for name in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for column in results.columns:
            value = row.get(column, "")
            cells.append(f"<td data-column='{html.escape(column)}'>{html.escape(value)}</td>")
            if column == "file":
                cells.append(f"<td>{_img(results, results.query_root / value)}</td>")
            elif column == "nearest_support":
                cells.append(f"<td>{_img(results, results.support_root / value)}</td>")
        if results.labels:
            cells.append(f"<td data-column='label'>{html.escape(results.labels.get(row['file'], ''))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table></div>")
    return "".join(lines)


def confusion_html(results: Results) -> str:
    """The confusion matrix and accuracy over the labelled rows, or a line saying why there is none."""
    matrix = confusion(results)
    if matrix is None:
        return ("<p>No confusion matrix: no query name starts with a class name (or sits in a class's folder) "
                "and no labels CSV was given.</p>")
    truths, counts = matrix
    total = sum(map(sum, counts))
    right = sum(counts[truths.index(name)][column] for column, name in enumerate(results.classes))
    lines = [f"<p>{right} of {total} labelled queries right ({100 * right / max(total, 1):.1f}%); rows: true class, "
             "columns: predicted</p><table class='metallo-confusion'><thead><tr><th></th>",
             *(f"<th>{html.escape(name)}</th>" for name in results.classes), "</tr></thead><tbody>"]
    for truth, row in zip(truths, counts):
        lines.append(f"<tr><th>{html.escape(truth)}</th>" + "".join(f"<td>{count}</td>" for count in row) + "</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def _img(results: Results, path: Path) -> str:
    key = str(path)
    if key not in results.thumbnails:
        results.thumbnails[key] = _thumbnail(path)
    return f"<img src='{results.thumbnails[key]}' alt='{html.escape(path.name)}' loading='lazy'>"


def _thumbnail(path: Path) -> str:
    """A small JPEG of the image as a data: URI, decoded by classify's own policy (16-bit TIFF included)."""
    image = Image.fromarray(decode_rgb(read_file_bytes(path), str(path)))
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
