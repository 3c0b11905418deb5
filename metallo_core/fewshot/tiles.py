"""How a micrograph of any size becomes model inputs for few-shot prediction: the tiling and scale policy.

- `tile = 0`: the whole image, shorter side resized to the model's input size and centre-cropped, as
  ingestion (`--size`) prepares training images.
- `tile = PX`: the image is cut into non-overlapping PX x PX tiles (a remainder narrower than half a tile is
  dropped), each resized to the input size. A large micrograph then keeps its texture at the scale the model
  was trained on instead of being shrunk to a thumbnail. An image smaller than one tile stays whole.
- `scale`: the image is resampled by this factor first: its pixel size over the common one when every
  file has one (`fewshot/physical_scale.py`), else `--query-scale` for queries imaged at another pixel size
  than the support (e.g. 0.5 for queries at twice the support's magnification).

Pure array functions: reading and decoding files is the caller's (`metallo_core/commands/classify_app.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from metallo_core.data.images import square_resized


@dataclass
class TiledImages:
    """The tiles of `images` images, in image order: tile i belongs to image owner[i]; every image has at
    least one tile."""

    tiles: np.ndarray  # (T, S, S, 3) uint8
    owner: np.ndarray  # (T,) integer image index in 0..images-1
    images: int


def image_tiles(pixels: np.ndarray, size: int, tile: int, scale: float = 1.0) -> np.ndarray:
    """(T, size, size, 3) uint8 tiles of an (H, W, 3) uint8 image under the module's policy (T >= 1)."""
    image = Image.fromarray(pixels)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=3.0)
    if tile == 0 or min(image.width, image.height) < tile:
        return square_resized(np.asarray(image), size)[None]
    columns = _tile_starts(image.width, tile)
    rows = _tile_starts(image.height, tile)
    return np.stack([square_resized(np.asarray(image.crop((x, y, x + tile, y + tile))), size)
                     for y in rows for x in columns])


def _tile_starts(length: int, tile: int) -> list[int]:
    """Offsets in pixels of the tiles along one side of `length` pixels (tile <= length)."""
    count = length // tile + (1 if length % tile >= tile / 2 else 0)
    if count <= 1:
        return [(length - tile) // 2]
    # Spread the tiles evenly over the whole length (overlapping a little when a half-tile remains).
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]
