"""File bytes through a rosettasciio reader, which reads only from a path: the one place that writes the
temporary file and keeps rosettasciio's own log notices (unmapped metadata, "could not be imported") quiet,
since its callers (`microscope.py`, `digitalmicrograph.py`) turn failures into their own DataError."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any


def read_signals(file_reader: Callable[[str], list[dict[str, Any]]], data: bytes, suffix: str) -> list[dict[str, Any]]:
    """`file_reader(path)` on a temporary copy of `data` named `*<suffix>` (removed afterwards): rosettasciio's
    signal dicts (`data`, `axes`, `metadata`, `original_metadata`). The reader's exceptions pass through."""
    handle, path = tempfile.mkstemp(suffix=suffix, prefix="metallo-rsciio-")
    logger = logging.getLogger("rsciio")
    level = logger.level
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        logger.setLevel(logging.ERROR)
        return file_reader(path)
    finally:
        logger.setLevel(level)
        os.unlink(path)
