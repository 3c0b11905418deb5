"""The decoder against what a viewer shows, per photometric interpretation, extra sample and bit depth.
Each test writes its file with Pillow, tifffile or plain bytes."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tifffile
from PIL import Image

from metallo_core.data.decode import decode_to_rgb8

# Left half dark, right half bright (as a viewer shows the min-is-black file); each test stores it its way.
DARK_BRIGHT = np.repeat(np.array([[0, 1]]), 4, axis=0).repeat(4, axis=1)  # (4, 8) of 0 and 1


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def grey(pixels: np.ndarray) -> np.ndarray:
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0]


def bmp_bitfields_32(bgra: np.ndarray) -> bytes:
    """A 32-bit BI_BITFIELDS BMP with a BITMAPV4HEADER and an alpha mask, as Photoshop and Windows write."""
    height, width = bgra.shape[:2]
    pixels = np.ascontiguousarray(bgra[::-1]).tobytes()  # bottom-up rows
    header = struct.pack("<IiiHHIIiiII", 108, width, height, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    header += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    header += b"BGRs" + b"\x00" * 48  # colour space, endpoints, gamma
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + pixels


def test_bmp_whose_alpha_is_zero_everywhere_is_opaque():
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2] = 30, 120, 200  # B, G, R; alpha bytes all 0
    with pytest.warns(UserWarning, match="alpha channel is 0 everywhere"):
        pixels = decode_to_rgb8(bmp_bitfields_32(bgra), "photoshop.bmp")
    assert (pixels == (200, 120, 30)).all()


def test_bmp_with_real_transparency_is_still_composited_on_white():
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., 3] = 255
    bgra[:, :3, 3] = 0  # left half transparent
    pixels = decode_to_rgb8(bmp_bitfields_32(bgra), "half.bmp")
    assert (pixels[:, :3] == 255).all() and (pixels[:, 3:] == 0).all()


def test_png_whose_alpha_is_zero_everywhere_is_opaque():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 90
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert (decode_to_rgb8(buffer.getvalue(), "mask.png")[..., 0] == 90).all()


@pytest.mark.parametrize("dtype, byteorder", [
    (np.uint8, "<"),     # Pillow, inverted by its own raw mode
    (np.uint16, "<"),    # Pillow reads it as I;16 without inverting: metallo inverts
    (np.uint16, ">"),    # Pillow cannot read big-endian min-is-white 16-bit: tifffile
    (np.uint32, "<"),    # tifffile
    (np.int16, "<"),     # tifffile, signed
    (np.float32, "<"),   # Pillow F
    (np.float64, "<"),   # tifffile
])
def test_min_is_white_grey_shows_as_a_viewer_shows_it(dtype, byteorder):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    low, high = (info.min, info.max) if info else (0.0, 1.0)
    stored_white_is_low = np.where(DARK_BRIGHT == 1, low, high).astype(dtype)  # min-is-white: low is white
    as_black = np.where(DARK_BRIGHT == 1, high, low).astype(dtype)
    inverted = decode_to_rgb8(tiff(stored_white_is_low, photometric="miniswhite", byteorder=byteorder), "w.tif")
    plain = decode_to_rgb8(tiff(as_black, photometric="minisblack", byteorder=byteorder), "b.tif")
    assert (grey(inverted)[:, :4] == 0).all() and (grey(inverted)[:, 4:] == 255).all()
    assert (inverted == plain).all()


def test_min_is_white_one_bit():
    image = Image.fromarray(DARK_BRIGHT.astype(bool)).convert("1")
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")  # Pillow writes 1-bit as min-is-black; tifffile for min-is-white
    white_low = tiff(DARK_BRIGHT == 0, photometric="miniswhite")
    assert (grey(decode_to_rgb8(white_low, "w1.tif")) == grey(decode_to_rgb8(buffer.getvalue(), "b1.tif"))).all()


def test_min_is_white_grey_with_alpha_inverts_the_grey_not_the_alpha():
    value = np.where(DARK_BRIGHT == 1, 0, 255).astype(np.uint8)  # min-is-white
    alpha = np.full_like(value, 255)
    alpha[0] = 0  # the first row transparent
    pixels = grey(decode_to_rgb8(tiff(np.dstack([value, alpha]), photometric="miniswhite", extrasamples=[2]),
                                 "wa.tif"))
    assert (pixels[0] == 255).all()  # transparent: white page
    assert (pixels[1:, :4] == 0).all() and (pixels[1:, 4:] == 255).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgb_tiff_extra_samples(dtype):
    top = np.iinfo(dtype).max
    colour = np.zeros((4, 8, 3), dtype)
    colour[..., 0] = top // 2  # half-intensity red (as a viewer shows the unassociated colour)
    alpha = np.full((4, 8), top, dtype)
    alpha[:, :4] = top // 2  # left half half-transparent
    unassociated = decode_to_rgb8(tiff(np.dstack([colour, alpha]), photometric="rgb", extrasamples=[2]), "u.tif")
    premultiplied = colour.astype(np.float64) * (alpha[..., None] / top)
    associated = decode_to_rgb8(tiff(np.dstack([np.rint(premultiplied).astype(dtype), alpha]), photometric="rgb",
                                     extrasamples=[1]), "a.tif")
    assert np.abs(associated.astype(int) - unassociated.astype(int)).max() <= 2
    assert abs(int(unassociated[0, 0, 1]) - 128) <= 2  # green: half of white shows through
    unspecified = decode_to_rgb8(tiff(np.dstack([colour, alpha]), photometric="rgb", extrasamples=[0]), "x.tif")
    assert (unspecified[..., 1] == 0).all()  # the extra sample is not alpha: opaque
