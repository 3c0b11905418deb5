"""Image bytes in, pixels out: validation at ingest, decoding for training, resizing on request.

Micrographs arrive as 8- or 16-bit, grayscale or colour TIFF/PNG/JPEG/BMP. We keep the bytes as
ingested and convert to 8-bit RGB only when decoding for a model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from metallo_core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_FORMAT_NAMES = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff", "BMP": "bmp", "MPO": "jpeg"}

# Micrographs from SEMs are often large; PIL's bomb check would refuse legitimate 16k x 16k images.
Image.MAX_IMAGE_PIXELS = 1 << 30


@dataclass(frozen=True)
class ImageInfo:
    height: int
    width: int
    encoding: str  # png | jpeg | tiff | bmp


def probe_image(data: bytes, source: str) -> ImageInfo:
    """Fully decode `data` once to prove it is a readable image; raise DataError naming `source`."""
    if not data:
        raise DataError(f"{source}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                encoding = _FORMAT_NAMES.get(image.format or "")
                if encoding is None:
                    raise DataError(
                        f"{source}: unsupported image format {image.format!r}; use PNG, JPEG, TIFF or BMP"
                    )
                image.load()  # a truncated file fails here, not at open()
                return ImageInfo(height=image.height, width=image.width, encoding=encoding)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{source}: not a readable image ({exc}); replace the file or ingest with --on-error skip") from exc


def to_rgb8(image: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 array from any PIL mode, scaling 16-bit and float images to 0..255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16"):
            pixels = pixels / 257.0
        else:
            low, high = float(pixels.min()), float(pixels.max())
            pixels = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        gray = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_rgb(data: bytes, source: str = "<image>") -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 array."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb8(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{source}: not a readable image ({exc})") from exc


def decode_resized(data: bytes, size: int, source: str = "<image>") -> np.ndarray:
    """Decode and resize (shorter side to `size`, then centre crop) to a (size, size, 3) uint8 array."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the image is much larger than needed.
                image.draft("RGB", (size, size))
            return square_resized(to_rgb8(image), size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{source}: not a readable image ({exc})") from exc


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


def resize_encoded(data: bytes, size: int, source: str) -> tuple[bytes, ImageInfo]:
    """Re-encode so the shorter side is `size` px (aspect kept): PNG stays lossless, others become JPEG q95."""
    info = probe_image(data, source)
    with Image.open(io.BytesIO(data)) as image:
        scale = size / min(image.height, image.width)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if image.mode.startswith("I;16"):
            # Keep the 16-bit depth of micrographs: resize in float, store 16-bit PNG.
            pixels = np.asarray(image, dtype=np.float32)
            resized = Image.fromarray(pixels, mode="F").resize(new_size, Image.BILINEAR)
            image = Image.fromarray(np.clip(np.asarray(resized), 0, 65535).astype(np.uint16))
            encoding = "png"
        else:
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            image = image.resize(new_size, Image.BILINEAR, reducing_gap=3.0)
            encoding = "png" if info.encoding in ("png", "tiff", "bmp") else "jpeg"
        buffer = io.BytesIO()
        if encoding == "png":
            image.save(buffer, format="PNG", compress_level=3)
        else:
            image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), ImageInfo(height=new_size[1], width=new_size[0], encoding=encoding)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes for an (H, W) or (H, W, 3) uint8/uint16 array (synthetic and CIFAR data)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
