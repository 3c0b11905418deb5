"""`metallo multilabel predict`: run a registered multi-label model over a folder of images into a CSV.

One row per image: `file` (relative to the folder), then for each classification property its predicted
class name and `<property>_probability`, and for each regression property its value.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metallo_core.csv_output import escaped_names, write_csv_atomically
from metallo_core.data.image_files import list_image_files, read_file_bytes
from metallo_core.data.images import decode_resized
from metallo_core.multilabel.model import decode_outputs, images_to_unit_tensor
from metallo_core.multilabel.model_store import LoadedMultilabelModel, load_multilabel_model
from metallo_core.progress import Progress


@dataclass
class PredictionSummary:
    num_images: int
    out: str
    columns: list[str]
    model: str


def list_images(directory: str | os.PathLike) -> list[Path]:
    return list_image_files(directory, "--images")


def prediction_columns(model: LoadedMultilabelModel) -> list[str]:
    columns = ["file"]
    for prop in model.properties:
        columns += [prop.name, f"{prop.name}_probability"] if prop.is_class else [prop.name]
    return columns


def predict_rows(model: LoadedMultilabelModel, images: np.ndarray) -> list[dict[str, object]]:
    """(N, S, S, 3) uint8 images -> one dict per image: class names with probabilities, and values."""
    with torch.inference_mode():
        decoded = decode_outputs(model.network.eval()(images_to_unit_tensor(torch.from_numpy(images))),
                                 model.properties)
    rows: list[dict[str, object]] = [{} for _ in range(len(images))]
    for prop in model.properties:
        output = decoded[prop.name]
        if prop.is_class:
            probability, index = output.max(-1)
            for row, class_id, p in zip(rows, index.tolist(), probability.tolist()):
                row[prop.name] = prop.classes[class_id]
                row[f"{prop.name}_probability"] = round(p, 6)
        else:
            for row, value in zip(rows, output.tolist()):
                row[prop.name] = round(value, 6)
    return rows


def _read_image(path: Path, size: int) -> np.ndarray:
    return decode_resized(read_file_bytes(path), size, str(path))


def predict_folder(model_uri: str, images_dir: str, out: str, *, batch_size: int = 64) -> PredictionSummary:
    files = list_images(images_dir)  # before the download, so a wrong folder fails fast
    model = load_multilabel_model(model_uri)
    columns = prediction_columns(model)
    size = model.spec.image_size
    root = Path(images_dir).expanduser()
    progress = Progress("predict", len(files))
    for _, escaped in escaped_names(path.relative_to(root).as_posix() for path in files):
        print(f"[predict] warning: the name {escaped!r} is not valid UTF-8; written to the CSV with \\xNN escapes",
              file=sys.stderr, flush=True)

    def rows():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = np.stack([_read_image(path, size) for path in chunk])
            for path, row in zip(chunk, predict_rows(model, images)):
                yield [path.relative_to(root).as_posix(), *(row[column] for column in columns[1:])]
            progress.advance(len(chunk))

    # Written to a temporary file and moved into place when complete; any failure removes it.
    out_path = write_csv_atomically(out, columns, rows(), "predictions")
    progress.finish()
    return PredictionSummary(len(files), str(out_path), columns, model_uri)
