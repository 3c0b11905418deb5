"""Small image trees and files, written by the tests in the real layouts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: int = 24, fmt: str = "PNG", mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        pixels = rng.integers(0, 65535, (size, size + 4), dtype=np.uint16)
        image = Image.fromarray(pixels)
    elif mode == "RGB":
        image = Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8), "RGB")
    else:
        image = Image.fromarray(rng.integers(0, 255, (size, size + 4), dtype=np.uint8), "L")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_image_folder(root: Path, images_per_class: dict[str, int], fmt: str = "PNG",
                      suffix: str = ".png") -> dict[str, bytes]:
    """Write root/<class>/<class>_<i><suffix>; returns relative path -> bytes written."""
    written = {}
    seed = 0
    for class_name, count in images_per_class.items():
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            data = image_bytes(seed, fmt=fmt)
            seed += 1
            relative = f"{class_name}/{class_name}_{i:03d}{suffix}"
            (root / relative).write_bytes(data)
            written[relative] = data
    return written
