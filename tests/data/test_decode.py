"""The one decode policy (metallo_core/data/decode.py): every kind of input decodes to what a person sees,
or is refused with a message naming the file; whatever the decoder changes is warned, once per file."""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from metallo_core.data.decode import ImageDecodeWarning
from metallo_core.data.images import decode_resized, decode_rgb, prepare_bytes
from metallo_core.errors import DataError


def texture(kind: int, seed: int, size: int = 48) -> np.ndarray:
    """8-bit grey textures of 5 kinds: stripes at 5 orientations/frequencies, with noise. (H, W) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float64)
    angle, frequency = [(0.0, 0.8), (np.pi / 2, 0.8), (np.pi / 4, 0.5), (-np.pi / 4, 0.5), (0.0, 0.25)][kind]
    phase = rng.uniform(0, 2 * np.pi)
    pixels = 127 + 90 * np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    return np.clip(pixels + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode_with_warnings(data: bytes, source: str) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = decode_rgb(data, source)
    return pixels, [str(w.message) for w in caught if issubclass(w.category, ImageDecodeWarning)]


def as_12_bit_in_16(pixels: np.ndarray, hot_pixels: int = 0) -> np.ndarray:
    """The 8-bit texture mapped to 1000..2500 in uint16 (a 12-bit detector in a 16-bit TIFF), with hot pixels."""
    values = (1000 + pixels.astype(np.float64) * (1500 / 255)).round().astype(np.uint16)
    flat = values.reshape(-1)
    flat[np.random.default_rng(1).choice(flat.size, hot_pixels, replace=False)] = 65535
    return values


def nearest_prototype_accuracy(train: list[tuple[np.ndarray, int]], test: list[tuple[np.ndarray, int]]) -> float:
    """Nearest class mean of normalised power spectra (a texture feature); the fraction right on `test`."""
    def feature(pixels: np.ndarray) -> np.ndarray:
        grey = pixels[..., 0].astype(np.float64)
        spectrum = np.abs(np.fft.fft2(grey - grey.mean()))[:12, :12].ravel()
        return spectrum / (np.linalg.norm(spectrum) + 1e-9)

    classes = sorted({label for _, label in train})
    prototypes = np.stack([np.mean([feature(p) for p, label in train if label == c], axis=0) for c in classes])
    right = [classes[int(np.argmax(prototypes @ feature(p)))] == label for p, label in test]
    return float(np.mean(right))


@pytest.mark.parametrize("hot_pixels", [0, 3])
def test_12_bit_data_in_16_bit_tiff_keeps_its_texture(hot_pixels):
    pixels = texture(0, seed=0)
    stored = as_12_bit_in_16(pixels, hot_pixels)
    decoded, notes = decode_with_warnings(tiff_bytes(stored), "sem/12bit.tif")
    assert len(np.unique(decoded)) > 150  # dividing by 257 left about 6 grey levels
    assert (decoded[..., 0] == decoded[..., 2]).all()
    # The 8-bit original up to a linear contrast stretch (and the few values clipped at each end).
    signal = stored != 65535
    assert np.corrcoef(decoded[..., 0][signal], pixels[signal])[0, 1] > 0.998
    assert len(notes) == 1 and "sem/12bit.tif" in notes[0] and "1000" in notes[0]


def test_12_bit_textures_classify_as_well_as_8_bit():
    """The issue's case: 5 texture kinds, nearest prototype; 12-bit-in-16-bit renderings do as well as 8-bit."""
    images = [(texture(kind, seed), kind) for kind in range(5) for seed in range(6)]
    train, test = images[::2], images[1::2]  # 3 support and 3 query images per kind

    def rendered(items, sixteen_bit: bool):
        return [(decode_rgb(tiff_bytes(as_12_bit_in_16(p, 2)) if sixteen_bit else pil_bytes(Image.fromarray(p), "PNG"),
                            f"{label}.tif"), label) for p, label in items]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        eight = nearest_prototype_accuracy(rendered(train, False), rendered(test, False))
        sixteen = nearest_prototype_accuracy(rendered(train, True), rendered(test, True))
    assert eight >= 0.9
    assert sixteen >= eight


def test_float_tiff_with_nan_and_inf_keeps_its_texture_and_says_so():
    pixels = texture(1, seed=2).astype(np.float32) / 255.0 * 3.0 - 1.0  # float data in -1..2
    pixels[3, 4], pixels[10, 10], pixels[20, 5] = np.nan, np.inf, -np.inf
    decoded, notes = decode_with_warnings(tiff_bytes(pixels), "float.tif")
    reference = texture(1, seed=2)
    finite = np.isfinite(pixels)
    assert len(np.unique(decoded)) > 150
    assert np.corrcoef(decoded[..., 0][finite], reference[finite])[0, 1] > 0.999
    assert decoded[10, 10, 0] == 255 and decoded[20, 5, 0] == 0
    assert abs(int(decoded[3, 4, 0]) - int(np.median(decoded[..., 0]))) <= 2
    assert len(notes) == 1 and "float.tif" in notes[0] and "1 NaN" in notes[0] and "1 +inf" in notes[0]


def test_all_non_finite_is_an_error_naming_the_file_at_decode_and_at_ingest():
    data = tiff_bytes(np.full((16, 16), np.nan, np.float32))
    with pytest.raises(DataError, match=r"empty\.tif: every pixel is NaN or infinite"):
        decode_rgb(data, "empty.tif")
    with pytest.raises(DataError, match=r"empty\.tif: every pixel is NaN or infinite"):
        prepare_bytes(data, "empty.tif")


def test_each_file_is_warned_once_per_process():
    data = tiff_bytes(as_12_bit_in_16(texture(0, seed=4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):  # e.g. three epochs over the same image
            decode_resized(data, 16, "once-only.tif")
    assert sum("once-only.tif" in str(w.message) for w in caught) == 1


def test_eight_bit_images_are_unchanged_and_not_reported():
    grey = texture(2, seed=5)
    colour = np.stack([grey, 255 - grey, grey // 2], axis=2)
    for data, expected in ((pil_bytes(Image.fromarray(grey), "PNG"), np.repeat(grey[..., None], 3, 2)),
                           (pil_bytes(Image.fromarray(colour), "PNG"), colour),
                           (tiff_bytes(colour, photometric="rgb"), colour),
                           (pil_bytes(Image.fromarray(colour), "BMP"), colour)):
        decoded, notes = decode_with_warnings(data, "plain")
        np.testing.assert_array_equal(decoded, expected)
        assert notes == []


def test_one_bit_palette_and_opaque_alpha_decode_as_seen_without_notes():
    bits = (texture(0, seed=6) > 127)
    decoded, notes = decode_with_warnings(pil_bytes(Image.fromarray(bits), "PNG"), "mask.png")
    assert set(np.unique(decoded)) == {0, 255} and (decoded[..., 0] == bits * 255).all() and notes == []

    colour = np.stack([texture(0, 7), texture(1, 7), texture(2, 7)], axis=2)
    palette_image = Image.fromarray(colour).quantize(64)
    decoded, notes = decode_with_warnings(pil_bytes(palette_image, "PNG"), "palette.png")
    np.testing.assert_array_equal(decoded, np.asarray(palette_image.convert("RGB")))
    assert notes == []

    opaque = np.dstack([colour, np.full(colour.shape[:2], 255, np.uint8)])
    decoded, notes = decode_with_warnings(pil_bytes(Image.fromarray(opaque, "RGBA"), "PNG"), "opaque.png")
    np.testing.assert_array_equal(decoded, colour)
    assert notes == []


def test_transparency_is_composited_on_white_and_reported():
    grey = np.full((8, 8), 40, np.uint8)
    alpha = np.full((8, 8), 255, np.uint8)
    alpha[:, :4] = 0
    decoded, notes = decode_with_warnings(pil_bytes(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), "la.png")
    assert (decoded[:, :4] == 255).all() and (decoded[:, 4:] == 40).all()
    assert len(notes) == 1 and "la.png" in notes[0] and "white" in notes[0]


def test_exif_orientation_is_applied_and_reported():
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :10] = 255  # a bright band on the left of a landscape image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    decoded, notes = decode_with_warnings(pil_bytes(image, "JPEG", exif=exif, quality=95), "phone.jpg")
    assert decoded.shape == (40, 20, 3)
    assert decoded[:10, :, 0].mean() > 200 and decoded[20:, :, 0].mean() < 50  # the band is now on top
    assert len(notes) == 1 and "orientation" in notes[0]


def test_multi_page_tiff_uses_the_first_page_and_says_so():
    first, second = texture(0, 8), texture(1, 8)
    decoded, notes = decode_with_warnings(tiff_bytes(np.stack([first, second])), "stack.tif")
    np.testing.assert_array_equal(decoded[..., 0], first)
    assert len(notes) == 1 and "2 frames" in notes[0]


def test_cmyk_is_converted_and_reported():
    cmyk = Image.fromarray(np.stack([texture(0, 9)] * 3, axis=2)).convert("CMYK")
    decoded, notes = decode_with_warnings(pil_bytes(cmyk, "JPEG", quality=95), "print.jpg")
    assert np.corrcoef(decoded[..., 0].ravel(), texture(0, 9).ravel())[0, 1] > 0.95
    assert len(notes) == 1 and "CMYK" in notes[0]


def test_sixteen_bit_colour_tiff_keeps_its_range_and_channel_order():
    grey = texture(3, 10)
    colour = np.stack([grey, grey // 2, 255 - grey], axis=2)
    decoded, notes = decode_with_warnings(tiff_bytes(as_12_bit_in_16(colour), photometric="rgb"), "optical.tif")
    assert len(np.unique(decoded[..., 0])) > 150
    # One range for all channels: the colour balance survives (red > green everywhere).
    assert (decoded[..., 0].astype(int) >= decoded[..., 1]).all()
    assert np.corrcoef(decoded[..., 2].ravel(), colour[..., 2].ravel())[0, 1] > 0.99
    assert len(notes) == 1 and "optical.tif" in notes[0]


def test_float64_and_signed_integer_tiffs_decode():
    reference = texture(4, 11)
    signed_8_bit = (reference.astype(np.int16) - 128).astype(np.int8)  # Pillow alone reads -1 as 255
    for array in (reference.astype(np.float64) * 1e-3, reference.astype(np.int16) - 300, signed_8_bit):
        decoded, _ = decode_with_warnings(tiff_bytes(array), "numbers.tif")
        assert np.corrcoef(decoded[..., 0].ravel(), reference.ravel())[0, 1] > 0.999


def test_sixteen_bit_colour_without_tifffile_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)  # as on an install without the package
    data = tiff_bytes(as_12_bit_in_16(np.stack([texture(0, 12)] * 3, axis=2)), photometric="rgb")
    with pytest.raises(DataError, match=r"optical\.tif: this TIFF needs the tifffile package"):
        decode_rgb(data, "optical.tif")


def png_16_bit_rgb(pixels: np.ndarray) -> bytes:
    """A 48-bit PNG written by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_colour_png_is_refused_not_truncated():
    data = png_16_bit_rgb(as_12_bit_in_16(np.stack([texture(0, 13)] * 3, axis=2)))
    with pytest.raises(DataError, match=r"camera\.png: 16-bit colour PNG"):
        decode_rgb(data, "camera.png")


@pytest.mark.parametrize("data, message", [
    (b"", "the file is empty"),
    (b"\x89PNG\r\n\x1a\n truncated", "not a readable image"),
    (pil_bytes(Image.new("L", (8, 8)), "GIF"), "unsupported image format 'GIF'"),
])
def test_unreadable_inputs_are_refused_naming_the_file(data, message):
    with pytest.raises(DataError, match=f"bad/input.png: {message}"):
        decode_rgb(data, "bad/input.png")


def test_constant_deep_image_is_uniform_and_reported():
    decoded, notes = decode_with_warnings(tiff_bytes(np.full((8, 8), 1200, np.uint16)), "flat.tif")
    assert len(np.unique(decoded)) == 1
    assert len(notes) == 1 and "constant" in notes[0]


def test_ingest_reencoding_keeps_float_detail_in_16_bits():
    pixels = texture(0, 14).astype(np.float32) * 0.01
    pixels[0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        prepared = prepare_bytes(tiff_bytes(pixels), "f.tif", size=24)
        assert prepared.info.encoding == "png" and prepared.info.height == 24
        assert any("NaN" in note for note in prepared.notes)
        with Image.open(io.BytesIO(prepared.data)) as image:
            assert image.mode.startswith("I") and len(np.unique(np.asarray(image))) > 300


def test_ingest_keeps_the_bytes_of_an_image_already_at_the_asked_size():
    """`--size 128` on 128-px JPEGs (X-SDD, as the quickstart ingests it) must not compress them a second
    time; an image of another size is still resized and re-encoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(texture(1, 8)[..., None].astype(np.uint8), 3, axis=-1)).resize((160, 128)).save(
        buffer, format="JPEG", quality=80)
    original = buffer.getvalue()
    kept = prepare_bytes(original, "a.jpg", size=128)
    assert kept.data == original and (kept.info.height, kept.info.width) == (128, 160)
    resized = prepare_bytes(original, "a.jpg", size=64)
    assert resized.data != original and (resized.info.height, resized.info.width) == (64, 80)
