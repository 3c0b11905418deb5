"""Image files on local disk, as users hand them over: folders of micrographs for prediction and
support sets. Listing and reading with errors that name the path; decoding lives in `images.py`."""

from __future__ import annotations

import os
from pathlib import Path

from metallo_core.data.images import IMAGE_SUFFIXES
from metallo_core.errors import DataError


def list_image_files(directory: str | os.PathLike, what: str = "--images") -> list[Path]:
    """Every image below `directory` (sub-folders included), sorted; `what` names it in errors."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what} {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
