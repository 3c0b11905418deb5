"""Image bytes in, pixels out: validation at ingest, decoding for models, re-encoding on request.

Micrographs arrive as 8- to 32-bit, grey or colour TIFF/PNG/JPEG/BMP, or as DM3/DM4 files. We keep the bytes
as ingested (a DM file's image is stored as PNG: the shards' readers decode image formats) and convert to
8-bit RGB only when decoding for a model, always under the policy of `decode.py`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from metallo_core.data.crop import EdgeCrop
from metallo_core.data.decode import (
    FORMAT_NAMES,
    ImageDecodeWarning,
    RawPixels,
    decode_to_rgb8,
    read_pixels,
    render_rgb8,
    report_notes,
    stretch_to_8bit,
)
from metallo_core.data.digitalmicrograph import DM_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "ImageDecodeWarning", "ImageInfo", "PreparedBytes", "decode_resized", "decode_rgb",
           "encode_png", "prepare_bytes", "probe_image", "resize_encoded", "square_resized", "to_rgb8"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DM_SUFFIXES)
_FORMAT_NAMES = FORMAT_NAMES


@dataclass(frozen=True)
class ImageInfo:
    height: int
    width: int
    encoding: str  # png | jpeg | tiff | bmp | dm (a DM3/DM4 file: re-encoded before it is stored)


@dataclass
class PreparedBytes:
    """An image ready to store: its bytes, their shape and encoding, what decoding changed or guessed
    (`notes`), and how many bottom rows a crop removed."""

    data: bytes
    info: ImageInfo
    notes: list[str] = field(default_factory=list)
    bottom_cropped: int = 0


def probe_image(data: bytes, source: str) -> ImageInfo:
    """Fully decode `data` once, under the decode policy, to prove it is a usable image (DataError naming
    `source` otherwise); reports what the decoder changed."""
    return prepare_bytes(data, source).info


def prepare_bytes(data: bytes, source: str, size: int | None = None, crop: EdgeCrop | None = None,
                  scale: float = 1.0) -> PreparedBytes:
    """Validate (a full decode) and, only when a `size`, a `crop` or a `scale` changes the pixels, re-encode.

    Without them, or with a `size` the shorter side already has, the bytes stay as given (a JPEG is not
    compressed twice for nothing), except a DM3/DM4 file's, whose image is always stored as below. Otherwise
    the image is cropped, resampled by `scale` (a physical-scale factor: > 1 enlarges), then resized so its
    shorter side is `size` px (aspect kept), and stored lossless (PNG, 8-bit, or 16-bit for deeper grey data)
    unless it came as JPEG (then JPEG q95)."""
    raw = read_pixels(data, source)
    rgb8 = render_rgb8(raw, source)  # proves the file renders (e.g. not all-NaN) and records the notes
    notes = list(raw.notes)
    report_notes(source, notes)
    crop = crop or EdgeCrop()
    if raw.encoding != "dm" and crop.is_identity and scale == 1.0 and (size is None or size == min(rgb8.shape[:2])):
        height, width = rgb8.shape[:2]
        return PreparedBytes(data, ImageInfo(height, width, raw.encoding), notes)
    return _reencode(raw, rgb8, source, size, crop, notes, scale)


def _reencode(raw: RawPixels, rgb8: np.ndarray, source: str, size: int | None, crop: EdgeCrop,
              notes: list[str], scale: float = 1.0) -> PreparedBytes:
    values = raw.values
    if raw.alpha is not None or values.dtype == np.bool_ or (values.ndim == 3 and values.dtype != np.uint8):
        values = rgb8  # alpha composited / 1-bit / deep colour (PIL writes no 48-bit PNG): the 8-bit rendering
    elif values.dtype not in (np.uint8, np.uint16):
        # 32-bit and float grey: keep the detail in 16 bits, over the same robust range the decoder uses.
        values = np.clip(stretch_to_8bit(values, source, []) * 257.0 + 0.5, 0, 65535).astype(np.uint16)
    values, bottom = crop.apply(values, source, rgb8)
    if scale != 1.0:
        values = _resampled(values, scale)
    if size is not None and size != min(values.shape[:2]):
        values = _resampled(values, size / min(values.shape[:2]))
    image = Image.fromarray(values)
    encoding = "jpeg" if raw.encoding == "jpeg" and values.dtype == np.uint8 else "png"
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG", compress_level=3)
    else:
        image.save(buffer, format="JPEG", quality=95)
    return PreparedBytes(buffer.getvalue(), ImageInfo(image.height, image.width, encoding), notes, bottom)


def _resampled(values: np.ndarray, factor: float) -> np.ndarray:
    """(H, W[, 3]) uint8 or uint16 grey resampled by `factor` (bilinear; 16-bit detail kept)."""
    height, width = values.shape[:2]
    new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if values.dtype == np.uint16:
        resized = Image.fromarray(values.astype(np.float32), mode="F").resize(new_size, Image.BILINEAR)
        return np.clip(np.asarray(resized) + 0.5, 0, 65535).astype(np.uint16)
    return np.asarray(Image.fromarray(values).resize(new_size, Image.BILINEAR, reducing_gap=3.0))


def resize_encoded(data: bytes, size: int, source: str) -> tuple[bytes, ImageInfo]:
    """Re-encode so the shorter side is `size` px (aspect kept): PNG stays lossless (16-bit depth kept),
    JPEG becomes JPEG q95."""
    prepared = prepare_bytes(data, source, size=size)
    return prepared.data, prepared.info


def to_rgb8(image: Image.Image, source: str = "<image>") -> np.ndarray:
    """An (H, W, 3) uint8 array from an opened PIL image, under the decode policy."""
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if image.mode in ("I;16", "I", "F") else "PNG")
    return decode_rgb(buffer.getvalue(), source)


def decode_rgb(data: bytes, source: str = "<image>") -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 array (the policy of `decode.py`; DataError naming `source`)."""
    return decode_to_rgb8(data, source)


def decode_resized(data: bytes, size: int, source: str = "<image>") -> np.ndarray:
    """Decode and resize (shorter side to `size`, then centre crop) to a (size, size, 3) uint8 array."""
    return square_resized(decode_to_rgb8(data, source, draft_size=size), size)


def square_resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3): shorter side resized to `size`, then centre-cropped."""
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes for an (H, W) or (H, W, 3) uint8/uint16 array (synthetic and CIFAR data)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
