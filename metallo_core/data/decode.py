"""Image bytes -> the pixels a person looking at the file would see: the one decode policy of metallo.

Every reader goes through here: ingest's validation, the shard readers of training and evaluation,
`metallo classify` and `metallo multilabel predict`. Each input either decodes to what an image viewer
shows, or is refused with a `DataError` naming the file. Anything the decoder changes or has to guess
is reported once per file, as an `ImageDecodeWarning` naming it (never silently).

- 8-bit grey or RGB (PNG, JPEG, TIFF, BMP): the stored values, unchanged. 1-bit: black and white.
  Palette images: looked up. YCbCr: converted. CMYK: converted without a colour profile (reported).
- Deeper integer data (16-bit grey or colour, 32-bit) and float data are mapped linearly to 0..255 from
  the image's robust range: its 0.1st to 99.9th percentile of finite values (but at least the 16 lowest
  and highest values left out, at most 5%), one range for all channels.
  Why percentiles: a detector's 12 bits in a 16-bit TIFF (values 1000..2500, say) must fill the 8-bit
  range (dividing by 257 leaves about 6 grey levels and the texture is gone). The image's own min/max
  would do that too, but a few hot or dead pixels (one 65535 spike) would squeeze the real signal back
  into a handful of levels. Clipping 0.1% (or 16 pixels) at each end costs few pixels their exact
  value, so the choice is robust for a few defects and invisible otherwise. When the two percentiles
  coincide (a mostly constant image, a mask) the full min/max is used; a constant image keeps its
  value relative to its type's range.
- Non-finite float pixels are left out of the range; NaN is drawn at the median, +inf at white, -inf at
  black (reported with counts). An image with no finite pixel at all is refused.
- Alpha: a fully opaque alpha channel is dropped; any transparency is composited on white, as a viewer
  shows it on a white page (reported).
- Multi-frame files (multi-page TIFF): the first frame is used (reported).
- EXIF/TIFF orientation: applied, as viewers do (reported).
- Colour deeper than 8 bits per channel is read from TIFF with `tifffile` when it is installed; without
  it, and for 16-bit colour PNG (Pillow keeps only the high bytes), the file is refused.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from metallo_core.errors import DataError

# Micrographs from SEMs are often large; PIL's bomb check would refuse legitimate 16k x 16k images.
Image.MAX_IMAGE_PIXELS = 1 << 30

FORMAT_NAMES = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff", "BMP": "bmp", "MPO": "jpeg"}
LOW_PERCENTILE, HIGH_PERCENTILE = 0.1, 99.9
MIN_CLIPPED = 16  # at least this many pixels may be clipped at each end (a few hot pixels in a small image)
_PERCENTILE_SAMPLE = 1 << 22  # above this many values the range is estimated on an even subsample

# The policy in one paragraph, for the --help of every command that reads images.
DECODE_HELP = ("Decoding: 8-bit images as stored; 16/32-bit and float data mapped to 8 bits from their own "
               "0.1-99.9 percentile range (at least 16 pixels clipped per end; non-finite pixels left out and "
               "replaced); orientation tags applied; transparency composited on white; multi-page files use the "
               "first page; each such change is warned once per file, and an unreadable or all-NaN file is an "
               "error naming it.")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError)


_REPORTED: set[int] = set()
_REPORTED_LOCK = threading.Lock()
_REPORTED_LIMIT = 1_000_000


class ImageDecodeWarning(UserWarning):
    """The decoder changed or guessed something about one file (the message names it)."""


@dataclass
class RawPixels:
    """One image as stored, before rendering: `values` (H, W) or (H, W, 3) of the file's own dtype,
    `alpha` (H, W) float in 0..1 or None, and what the decoder did so far (`notes`)."""

    values: np.ndarray
    alpha: np.ndarray | None
    encoding: str  # png | jpeg | tiff | bmp
    notes: list[str] = field(default_factory=list)


def read_pixels(data: bytes, source: str, draft_size: int | None = None) -> RawPixels:
    """Decode `data` faithfully (bit depth kept); `draft_size` lets a large JPEG decode at a reduced scale."""
    if not data:
        raise DataError(f"{source}: the file is empty")
    try:
        # No warnings.catch_warnings here: it is not thread-safe, and changing the filters resets Python's
        # once-per-message memory, so every epoch would repeat every file's report.
        with Image.open(io.BytesIO(data)) as image:
            return _read_with_pillow(image, data, source, draft_size)
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _read_tiff_with_tifffile(data, source, f"Pillow cannot read it ({exc})")
        raise DataError(f"{source}: not a readable image ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(f"{source}: not a readable image ({exc})") from exc


def render_rgb8(raw: RawPixels, source: str) -> np.ndarray:
    """(H, W, 3) uint8 under the module's policy; adds to `raw.notes` what it changed."""
    values = raw.values
    if values.dtype == np.bool_:
        values = values.astype(np.uint8) * 255
    if values.dtype == np.uint8:
        rgb = values.astype(np.float32) if raw.alpha is not None else values
    else:
        rgb = stretch_to_8bit(values, source, raw.notes)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if raw.alpha is not None:
        transparent = int((raw.alpha < 1).sum())
        raw.notes.append(f"{transparent} of {raw.alpha.size} pixels are transparent: composited on white")
        alpha = raw.alpha[:, :, None]
        rgb = np.asarray(rgb, np.float32) * alpha + 255.0 * (1.0 - alpha)
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.asarray(rgb, np.float32) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def decode_to_rgb8(data: bytes, source: str, draft_size: int | None = None) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8, reporting once per file what was changed or guessed."""
    raw = read_pixels(data, source, draft_size)
    pixels = render_rgb8(raw, source)
    report_notes(source, raw.notes)
    return pixels


def report_notes(source: str, notes: list[str]) -> None:
    """One warning per file and process: a file decoded every epoch, or by several threads, is reported once."""
    if not notes:
        return
    message = f"{source}: " + "; ".join(notes)
    key = hash(message)
    with _REPORTED_LOCK:
        if key in _REPORTED:
            return
        if len(_REPORTED) >= _REPORTED_LIMIT:
            _REPORTED.clear()  # bounded memory on endless streams; a file may then be reported again
        _REPORTED.add(key)
    warnings.warn(message, ImageDecodeWarning, stacklevel=3)


def stretch_to_8bit(values: np.ndarray, source: str, notes: list[str]) -> np.ndarray:
    """Integer or float (H, W[, C]) -> float32 in 0..255 from the robust range (see the module docstring)."""
    values = np.asarray(values)
    is_float = values.dtype.kind == "f"
    finite_mask = np.isfinite(values) if is_float else None
    finite = values[finite_mask] if finite_mask is not None else values.ravel()
    if finite.size == 0:
        raise DataError(f"{source}: every pixel is NaN or infinite; there is no image to show")
    sample = finite if finite.size <= _PERCENTILE_SAMPLE else finite[:: finite.size // _PERCENTILE_SAMPLE + 1]
    data_min, data_max = float(finite.min()), float(finite.max())
    low, high = robust_range(sample)
    kind = f"{values.dtype.name}{' colour' if values.ndim == 3 else ''}"
    if high > low:
        clipped = int(((finite < low) | (finite > high)).sum())
        if values.dtype.kind in "ui" and (low, high) == (np.iinfo(values.dtype).min, np.iinfo(values.dtype).max):
            pass  # the type's own full range: the plain conversion a viewer makes, nothing to report
        else:
            notes.append(f"{kind} values {data_min:g}..{data_max:g} mapped to 0..255 from their "
                         f"robust range {low:g}..{high:g}"
                         + (f" ({clipped} pixels outside it clipped)" if clipped else ""))
    elif data_max > data_min:
        low, high = data_min, data_max
        notes.append(f"{kind} values mapped to 0..255 from their min..max {low:g}..{high:g} "
                     "(the percentile range is a single value)")
    else:
        level = _constant_level(values.dtype, data_min)
        notes.append(f"{kind} image is constant ({data_min:g}); drawn at grey level {level:.0f}")
        rendered = np.full(values.shape, level, np.float32)
        return rendered
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    if finite_mask is not None and not finite_mask.all():
        nan, pos_inf, neg_inf = np.isnan(values), np.isposinf(values), np.isneginf(values)
        median = (float(np.median(sample)) - low) * 255.0 / (high - low)
        scaled[nan], scaled[pos_inf], scaled[neg_inf] = median, 255.0, 0.0
        notes.append(f"non-finite pixels left out of the range and replaced: {int(nan.sum())} NaN (by the "
                     f"median), {int(pos_inf.sum())} +inf (white), {int(neg_inf.sum())} -inf (black)")
    return np.clip(scaled, 0, 255).astype(np.float32)


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """(low, high): the 0.1st and 99.9th percentiles, or the 16th smallest and largest values when that
    excludes more (so a few hot pixels never set the range of a small image); at most 5% per end."""
    count = values.size
    k = min(max(int(count * LOW_PERCENTILE / 100), MIN_CLIPPED), count // 20)
    if k == 0:
        return float(values.min()), float(values.max())
    ordered = np.partition(values, (k, count - 1 - k))
    return float(ordered[k]), float(ordered[count - 1 - k])


def _constant_level(dtype: np.dtype, value: float) -> float:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return 255.0 * (value - min(info.min, 0)) / (info.max - min(info.min, 0))
    return 255.0 * min(max(value, 0.0), 1.0)


# --- Pillow --------------------------------------------------------------------------------------------

def _read_with_pillow(image: Image.Image, data: bytes, source: str, draft_size: int | None) -> RawPixels:
    encoding = FORMAT_NAMES.get(image.format or "")
    if encoding is None:
        raise DataError(f"{source}: unsupported image format {image.format!r}; use PNG, JPEG, TIFF or BMP")
    notes: list[str] = []
    if encoding == "tiff" and _tiff_needs_tifffile(image):
        return _read_tiff_with_tifffile(data, source, "Pillow keeps only 8 bits of each colour channel")
    if encoding == "png" and _is_deep_colour_png(data):
        raise DataError(f"{source}: 16-bit colour PNG; Pillow keeps only the high byte of each channel, which "
                        "would lose the image's detail. Save it as 16-bit TIFF or 8-bit PNG")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(0)
        notes.append(f"has {frames} frames/pages; using the first")
    if draft_size and encoding == "jpeg":
        # Let libjpeg decode at a reduced scale when the image is much larger than needed.
        image.draft("RGB", (draft_size, draft_size))
    image.load()  # a truncated file fails here, not at open()
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in (1, 0, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"rotated/flipped as its orientation tag ({orientation}) says")
    values, alpha = _pillow_values(image, source, notes)
    return RawPixels(values, alpha, encoding, notes)


def _pillow_values(image: Image.Image, source: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    mode = image.mode
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    elif mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode in ("La", "RGBa"):
        image = image.convert("LA" if mode == "La" else "RGBA")
        mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image), None
    if mode == "1":
        return np.asarray(image.convert("L")), None
    if mode in ("LA", "RGBA"):
        array = np.asarray(image)
        colour, alpha = array[..., :-1], array[..., -1]
        colour = colour[..., 0] if mode == "LA" else colour
        return colour, (None if (alpha == 255).all() else alpha.astype(np.float32) / 255.0)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.asarray(image), None
    if mode == "CMYK":
        notes.append("CMYK converted to RGB without a colour profile")
        return np.asarray(image.convert("RGB")), None
    if mode == "YCbCr":
        return np.asarray(image.convert("RGB")), None
    raise DataError(f"{source}: images of colour mode {mode!r} are not supported; save it as grey or RGB")


def _tiff_needs_tifffile(image: Image.Image) -> bool:
    """True when Pillow would misread the TIFF: more than 8 bits in several channels, or float colour."""
    tags = getattr(image, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = tags.get(277, 1)
    return samples > 1 and max(bits) > 8


def _is_deep_colour_png(data: bytes) -> bool:
    # IHDR follows the 8-byte signature: length (4), type (4), width (4), height (4), bit depth, colour type.
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 6)


# --- tifffile (deep colour, float colour, float64) ------------------------------------------------------

_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, k=1),
}


def _read_tiff_with_tifffile(data: bytes, source: str, why: str) -> RawPixels:
    try:
        import tifffile
    except ImportError as exc:
        raise DataError(f"{source}: this TIFF needs the tifffile package ({why}); install it "
                        "(uv add tifffile) or save the image as 16-bit grey or 8-bit RGB") from exc
    notes: list[str] = []
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            if len(tiff.pages) > 1:
                notes.append(f"has {len(tiff.pages)} pages; using the first")
            array = page.asarray()
            axes = page.axes
            photometric = int(page.photometric)
            orientation_tag = page.tags.get(274)
            orientation = int(orientation_tag.value) if orientation_tag is not None else 1
    except Exception as exc:  # tifffile raises many types (codecs missing, malformed tags)
        raise DataError(f"{source}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if "S" in axes and axes.index("S") == 0 and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)  # planar (separate) samples -> pixel-interleaved
    if array.ndim not in (2, 3):
        raise DataError(f"{source}: TIFF page of shape {array.shape} ({axes}) is not a single 2-D image")
    if photometric == 0 and array.dtype == np.bool_:
        array = ~array
        notes.append("stored as min-is-white; inverted")
    elif photometric == 0:  # MINISWHITE: 0 is white
        array = np.iinfo(array.dtype).max - array if array.dtype.kind in "ui" else -array
        notes.append("stored as min-is-white; inverted")
    elif photometric not in (1, 2):
        raise DataError(f"{source}: TIFF colour model (photometric {photometric}) is not supported; "
                        "save it as grey or RGB")
    alpha = None
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2, 4):
            array, alpha_values = array[..., :-1], array[..., -1].astype(np.float64)
            top = np.iinfo(array.dtype).max if array.dtype.kind in "ui" else 1.0
            alpha = np.clip(alpha_values / top, 0, 1).astype(np.float32)
            alpha = None if (alpha >= 1).all() else alpha
        if array.shape[2] == 1:
            array = array[..., 0]
        elif array.shape[2] != 3:
            raise DataError(f"{source}: TIFF with {channels} channels; metallo reads grey or RGB(A)")
    if orientation in _ORIENTATIONS:
        array = _ORIENTATIONS[orientation](array)
        alpha = _ORIENTATIONS[orientation](alpha) if alpha is not None else None
        notes.append(f"rotated/flipped as its orientation tag ({orientation}) says")
    return RawPixels(np.ascontiguousarray(array), alpha, "tiff", notes)
