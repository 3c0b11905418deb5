"""`metallo multilabel predict`: run a registered multi-label model over a folder of images into a CSV.

One row per image: `file` (relative to the folder), then for each classification property its predicted
class name and `<property>_probability`, and for each regression property its value
(`multilabel.predict`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metallo_core.csv_output import escaped_names, write_csv_atomically
from metallo_core.data.image_files import list_image_files, read_file_bytes
from metallo_core.data.images import decode_resized
from metallo_core.multilabel.predict import predict_rows, property_columns
from metallo_core.progress import Progress
from metallo_core.tracking.multilabel_store import load_multilabel_model


@dataclass
class PredictionSummary:
    num_images: int
    out: str
    columns: list[str]
    model: str


def list_images(directory: str | os.PathLike) -> list[Path]:
    """The images under `directory`, by the listing policy of `data.listing` (errors name --images)."""
    return list_image_files(directory, "--images")


def _read_image(path: Path, size: int) -> np.ndarray:
    return decode_resized(read_file_bytes(path), size, str(path))


def predict_folder(model_uri: str, images_dir: str, out: str, *, batch_size: int = 64) -> PredictionSummary:
    """Predict every image under `images_dir` (resized to the model's image size) with the model at
    `model_uri`, `batch_size` images at a time, into the CSV `out` (written whole or not at all). Raises
    DataError naming the folder or file that cannot be listed or decoded, TrackingError for a model that
    cannot be loaded."""
    files = list_images(images_dir)  # before the download, so a wrong folder fails fast
    model = load_multilabel_model(model_uri)
    columns = ["file", *property_columns(model.properties)]
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
            for path, row in zip(chunk, predict_rows(model.network, model.properties, images)):
                yield [path.relative_to(root).as_posix(), *(row[column] for column in columns[1:])]
            progress.advance(len(chunk))

    # Written to a temporary file and moved into place when complete; any failure removes it.
    out_path = write_csv_atomically(out, columns, rows(), "predictions")
    progress.finish()
    return PredictionSummary(len(files), str(out_path), columns, model_uri)
