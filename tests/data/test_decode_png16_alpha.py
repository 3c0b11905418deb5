"""16-bit grey+alpha PNG (colour type 4, bit depth 16): every bit of the grey reaches the 16-bit grey path, and
the alpha is composited as any other (Pillow alone keeps only the high byte of each sample)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from metallo_core.data.decode import ImageDecodeWarning
from metallo_core.data.images import decode_rgb
from metallo_core.errors import DataError
from tests.data.test_decode import as_12_bit_in_16, texture


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
    return (left, up, up_left)[distances.index(min(distances))]


def filtered_row(kind: int, row: bytes, previous: bytes, bpp: int) -> bytes:
    """PNG filter `kind` (0 none, 1 sub, 2 up, 3 average, 4 paeth) of one row, as the PNG spec defines it."""
    out = bytearray([kind])
    for index, value in enumerate(row):
        left = row[index - bpp] if index >= bpp else 0
        up = previous[index]
        up_left = previous[index - bpp] if index >= bpp else 0
        predictor = (0, left, up, (left + up) // 2, _paeth(left, up, up_left))[kind]
        out.append((value - predictor) % 256)
    return bytes(out)


def png_16_bit_grey_alpha(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    """A 16-bit grey+alpha PNG written by hand (Pillow cannot write one), its rows filtered with every one of
    the five PNG filters in turn (the decoder must undo each over the 4-byte pixel)."""
    height, width = grey.shape
    samples = np.stack([grey, alpha], axis=-1).astype(">u2")
    raw_rows = [samples[y].tobytes() for y in range(height)]
    previous = bytes(len(raw_rows[0]))
    filtered = []
    for y, row in enumerate(raw_rows):
        filtered.append(filtered_row(y % 5, row, previous, bpp=4))
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)
    significant_bits = chunk(b"sBIT", bytes([12, 16]))  # an ancillary chunk whose meaning depends on the colour type
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + significant_bits
            + chunk(b"IDAT", zlib.compress(b"".join(filtered))) + chunk(b"IEND", b""))


def png_16_bit_grey(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16)).save(buffer, format="PNG")  # mode I;16: a 16-bit grey PNG
    return buffer.getvalue()


def decoded(data: bytes, source: str) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = decode_rgb(data, source)
    return pixels, [str(w.message) for w in caught if issubclass(w.category, ImageDecodeWarning)]


def test_opaque_grey_alpha_decodes_exactly_as_the_same_16_bit_grey():
    grey = as_12_bit_in_16(texture(2, seed=21), hot_pixels=2)  # 1000..2500: the high byte alone holds ~6 levels
    opaque = np.full(grey.shape, 65535, np.uint16)
    reference, reference_notes = decoded(png_16_bit_grey(grey), "grey16.png")
    pixels, notes = decoded(png_16_bit_grey_alpha(grey, opaque), "grey16a.png")
    assert np.array_equal(pixels, reference)
    assert len(np.unique(reference)) > 100  # the 16-bit path kept the texture (the high byte alone would not)
    assert [n.replace("grey16a.png", "grey16.png") for n in notes] == reference_notes  # the same stretch, reported


def test_transparency_is_composited_on_white_from_every_bit_of_grey_and_alpha():
    grey = as_12_bit_in_16(texture(0, seed=22))
    height, width = grey.shape
    # Alpha from 0x0000 to 0xFFFF across the image, low bytes varying: its high byte alone would round it.
    alpha = np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)
    grey_only, _ = decoded(png_16_bit_grey(grey), "grey-only.png")
    pixels, notes = decoded(png_16_bit_grey_alpha(grey, alpha), "translucent.png")
    weight = alpha.astype(np.float64)[..., None] / 65535.0
    expected = grey_only.astype(np.float64) * weight + 255.0 * (1.0 - weight)
    assert np.abs(pixels.astype(np.float64) - expected).max() <= 1.0
    assert pixels[0, 0].tolist() == [255, 255, 255]  # fully transparent: the white page
    assert any("composited on white" in note for note in notes)


def test_a_truncated_grey_alpha_png_is_refused_naming_the_file():
    grey = as_12_bit_in_16(texture(1, seed=23))
    data = png_16_bit_grey_alpha(grey, np.full(grey.shape, 40000, np.uint16))
    with pytest.raises(DataError, match="cut.png: not a readable image"):
        decode_rgb(data[: len(data) // 2], "cut.png")
