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
- Alpha: a fully opaque alpha channel is dropped, and so is one that is 0 everywhere (32-bit BMPs from
  Photoshop and Windows carry such a mask; viewers show them opaque; reported); any other transparency
  is composited on white, as a viewer shows it on a white page (reported). TIFF extra samples say what
  the 4th channel is: unassociated alpha as above, associated (premultiplied) alpha un-premultiplied
  first, an unspecified extra sample dropped (reported).
- TIFF photometric interpretation: min-is-white grey (tag 262 = 0) is inverted at every bit depth and
  through either reader (Pillow, tifffile), so 0 shows white as the file says (reported).
- Size: images over DOWNSCALE_ABOVE_PIXELS (8192 x 8192) are reduced by a whole factor while decoding
  (JPEG by libjpeg's draft scaling, then a box average; reported with both sizes), so a 20000 x 15000
  micrograph decodes in bounded memory; over MAX_DECODE_PIXELS (2^30) the file is refused, naming its
  size. Any failure of a decoder, whatever its kind, is a DataError naming the file.
- Multi-frame files (multi-page TIFF): the first frame is used (reported).
- Gatan DigitalMicrograph DM3/DM4 (recognised by their header, read by `digitalmicrograph.py` through
  rosettasciio): the one 2-D image they hold takes the rules above for its type, so it decodes to what the
  same values give in a TIFF; a stack or spectrum is refused, naming the file.
- EXIF/TIFF orientation: applied, as viewers do (reported).
- Colour deeper than 8 bits per channel is read from TIFF with `tifffile` when it is installed; without
  it, and for 16-bit colour PNG (Pillow keeps only the high bytes), the file is refused. 16-bit grey+alpha
  PNG, which Pillow also cuts to its high bytes, is read whole: its grey takes the 16-bit grey path.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from metallo_core.data.digitalmicrograph import is_dm_file, read_dm
from metallo_core.errors import DataError

# Micrographs from SEMs are often large; PIL's bomb check would refuse legitimate 16k x 16k images.
# Above MAX_DECODE_PIXELS the decoder refuses the file itself (Pillow would only warn up to twice that).
MAX_DECODE_PIXELS = 1 << 30
Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
DOWNSCALE_ABOVE_PIXELS = 1 << 26  # 8192 x 8192: larger images are reduced while decoding (reported)

FORMAT_NAMES = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff", "BMP": "bmp", "MPO": "jpeg"}
LOW_PERCENTILE, HIGH_PERCENTILE = 0.1, 99.9
MIN_CLIPPED = 16  # at least this many pixels may be clipped at each end (a few hot pixels in a small image)
_PERCENTILE_SAMPLE = 1 << 22  # above this many values the range is estimated on an even subsample

# The policy in one paragraph, for the --help of every command that reads images.
DECODE_HELP = ("Decoding: 8-bit images as stored; 16/32-bit and float data mapped to 8 bits from their own "
               "0.1-99.9 percentile range (at least 16 pixels clipped per end; non-finite pixels left out and "
               "replaced); orientation tags applied; min-is-white TIFFs inverted; transparency composited on "
               "white (an alpha channel that is 0 everywhere counts as opaque); images over 8192 x 8192 reduced "
               "by a whole factor, over 2^30 pixels refused; multi-page files use the first page; DM3/DM4 files "
               "give their one 2-D image (stacks and spectra refused); each such "
               "change is warned once per file, and an unreadable or all-NaN file is an error naming it.")


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
    encoding: str  # png | jpeg | tiff | bmp | dm (DM3/DM4)
    notes: list[str] = field(default_factory=list)


def read_pixels(data: bytes, source: str, draft_size: int | None = None) -> RawPixels:
    """Decode `data` faithfully (bit depth kept); `draft_size` lets a large JPEG decode at a reduced scale."""
    if not data:
        raise DataError(f"{source}: the file is empty")
    if is_dm_file(data):
        return _read_dm(data, source)
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
    except Image.DecompressionBombError as exc:
        raise DataError(f"{source}: too large to decode ({exc}); metallo decodes up to {MAX_DECODE_PIXELS} "
                        "pixels: downscale or tile the image first") from exc
    except Exception as exc:  # any decoder failure (Pillow raises many kinds, MemoryError included)
        raise DataError(f"{source}: not a readable image ({type(exc).__name__}: {exc})") from exc


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
        raise DataError(f"{source}: unsupported image format {image.format!r}; use PNG, JPEG, TIFF, BMP "
                        "or DM3/DM4")
    notes: list[str] = []
    if encoding == "tiff" and _tiff_needs_tifffile(image):
        return _read_tiff_with_tifffile(data, source, "Pillow keeps only 8 bits of each colour channel")
    if encoding == "png" and _is_deep_grey_alpha_png(data):
        return _read_deep_grey_alpha_png(data, source)
    if encoding == "png" and _is_deep_colour_png(data):
        raise DataError(f"{source}: 16-bit colour PNG; Pillow keeps only the high byte of each channel, which "
                        "would lose the image's detail. Save it as 16-bit TIFF or 8-bit PNG")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(0)
        notes.append(f"has {frames} frames/pages; using the first")
    stored_size = image.size
    _refuse_too_large(stored_size, source)
    factor = _reduction_factor(stored_size)
    if encoding == "jpeg" and (draft_size or factor > 1):
        # Let libjpeg decode at a reduced scale (1/2 .. 1/8) when the image is much larger than needed.
        wanted = (draft_size, draft_size) if draft_size else (-(-stored_size[0] // factor),
                                                                -(-stored_size[1] // factor))
        image.draft("RGB", wanted)
    min_is_white = encoding == "tiff" and getattr(image, "tag_v2", {}).get(262) == 0
    image.load()  # a truncated file fails here, not at open()
    orientation = image.getexif().get(0x0112, 1)
    stored_mode = image.mode
    image = _downscaled(image, stored_size, notes)
    if orientation in _TRANSPOSES:
        image = image.transpose(_TRANSPOSES[orientation])
        notes.append(f"rotated/flipped as its orientation tag ({orientation}) says")
    values, alpha = _pillow_values(image, source, notes)
    if min_is_white and stored_mode in ("I;16", "I;16B", "I", "F"):
        values = _inverted(values, stored_mode)  # Pillow inverts 1/2/4/8-bit min-is-white itself, not these
        notes.append("stored as min-is-white; inverted")
    return RawPixels(values, alpha, encoding, notes)


_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _refuse_too_large(size: tuple[int, int], source: str) -> None:
    if size[0] * size[1] > MAX_DECODE_PIXELS:
        raise DataError(f"{source}: {size[0]} x {size[1]} pixels is more than metallo decodes "
                        f"({MAX_DECODE_PIXELS} pixels, e.g. 32768 x 32768); downscale or tile the image first")


def _reduction_factor(size: tuple[int, int]) -> int:
    """The smallest whole factor that brings `size` within DOWNSCALE_ABOVE_PIXELS (1: none needed)."""
    pixels = size[0] * size[1]
    return 1 if pixels <= DOWNSCALE_ABOVE_PIXELS else math.ceil(math.sqrt(pixels / DOWNSCALE_ABOVE_PIXELS))


def _downscaled(image: Image.Image, stored_size: tuple[int, int], notes: list[str]) -> Image.Image:
    """`image` reduced by a whole factor (box average) when over DOWNSCALE_ABOVE_PIXELS; a JPEG may already
    have been reduced by libjpeg (draft), which counts towards the factor."""
    factor = _reduction_factor(image.size)
    if factor > 1:
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        elif image.mode == "1":
            image = image.convert("L")
        elif image.mode.startswith("I;16"):
            image = image.convert("I")  # reduce() takes 8-bit bands, I and F; the values are kept
        image = image.reduce(factor)
    if _reduction_factor(stored_size) > 1:  # (a draft for a small training size alone is not reported)
        notes.append(f"{stored_size[0]} x {stored_size[1]} pixels, more than {DOWNSCALE_ABOVE_PIXELS} "
                     f"(8192 x 8192): reduced to {image.width} x {image.height} while decoding")
    return image


def _inverted(values: np.ndarray, stored_mode: str) -> np.ndarray:
    """Min-is-white values as min-is-black: the type's maximum minus the value (negated for floats)."""
    if values.dtype.kind == "f":
        return -values
    if stored_mode.startswith("I;16"):
        return (65535 - values.astype(np.int64)).astype(values.dtype)  # an I;16 image reduced to int32 too
    return np.invert(values)


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
        return colour, _alpha_or_none(alpha.astype(np.float32) / 255.0, notes)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.asarray(image), None
    if mode == "CMYK":
        notes.append("CMYK converted to RGB without a colour profile")
        return np.asarray(image.convert("RGB")), None
    if mode == "YCbCr":
        return np.asarray(image.convert("RGB")), None
    raise DataError(f"{source}: images of colour mode {mode!r} are not supported; save it as grey or RGB")


def _alpha_or_none(alpha: np.ndarray, notes: list[str]) -> np.ndarray | None:
    """`alpha` (0..1), or None when it carries no transparency: 1 everywhere, or 0 everywhere (a mask
    that was never filled in, as Photoshop's and Windows' 32-bit BMPs have; viewers show them opaque)."""
    if (alpha >= 1).all():
        return None
    if (alpha <= 0).all():
        notes.append("its alpha channel is 0 everywhere, which carries no transparency: shown opaque")
        return None
    return alpha


def _tiff_needs_tifffile(image: Image.Image) -> bool:
    """True when Pillow would misread the TIFF: more than 8 bits in several channels, float colour,
    32-bit unsigned grey (Pillow's mode I is signed: 2^32-1 would show black), or signed 8-bit data (Pillow
    reads its bytes as unsigned: -1 would show white)."""
    tags = getattr(image, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = tags.get(277, 1)
    sample_format = tags.get(339, 1)
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return ((samples > 1 and max(bits) > 8) or (max(bits) == 32 and sample_format == 1)
            or (max(bits) == 8 and sample_format == 2))


def _is_deep_colour_png(data: bytes) -> bool:
    # IHDR follows the 8-byte signature: length (4), type (4), width (4), height (4), bit depth, colour type.
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 6)


def _is_deep_grey_alpha_png(data: bytes) -> bool:
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 16 and data[25] == 4


# PNG chunks the relabelled 16-bit grey+alpha file keeps: the pixels and the orientation (eXIf). The others
# (sBIT, bKGD, ...) would be read with the meaning they have for RGBA, and none of them changes the pixels.
_KEPT_PNG_CHUNKS = (b"IHDR", b"IDAT", b"IEND", b"eXIf")


def _read_deep_grey_alpha_png(data: bytes, source: str) -> RawPixels:
    """16-bit grey+alpha PNG as 16-bit grey values and their alpha (Pillow keeps only the high byte of each).

    Its rows are laid out as an 8-bit RGBA PNG's: 4 bytes per pixel, filtered over the same 4-byte distance,
    interlaced in the same passes. Relabelled as 8-bit RGBA (IHDR only), Pillow's decoder unfilters it exactly,
    and each pixel's R, G, B, A are the grey's high and low bytes and the alpha's high and low bytes. The grey
    then takes the 16-bit grey path (stretch_to_8bit), the alpha the same compositing as any other."""
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    _refuse_too_large((width, height), source)
    notes: list[str] = []
    with Image.open(io.BytesIO(_png_relabelled_as_rgba8(data, source))) as image:
        image.load()  # a truncated file fails here
        orientation = image.getexif().get(0x0112, 1)
        samples = np.asarray(image).astype(np.uint16)  # (H, W, 4): grey high, grey low, alpha high, alpha low
    grey = (samples[..., 0] << 8) | samples[..., 1]
    alpha = ((samples[..., 2] << 8) | samples[..., 3]).astype(np.float32) / 65535.0
    grey, alpha = _block_reduced(grey, alpha, notes)
    if orientation in _ORIENTATIONS:
        grey, alpha = _ORIENTATIONS[orientation](grey), _ORIENTATIONS[orientation](alpha)
        notes.append(f"rotated/flipped as its orientation tag ({orientation}) says")
    return RawPixels(np.ascontiguousarray(grey), _alpha_or_none(np.ascontiguousarray(alpha), notes), "png", notes)


def _png_relabelled_as_rgba8(data: bytes, source: str) -> bytes:
    """The PNG `data` (16-bit grey+alpha) with its IHDR saying 8-bit RGBA and only `_KEPT_PNG_CHUNKS` left."""
    import struct
    import zlib

    chunks, position = [], 8
    while position + 12 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if len(body) < length:
            break  # truncated: Pillow refuses what is left
        if kind == b"IHDR":
            body = body[:8] + bytes([8, 6]) + body[10:]
        if kind in _KEPT_PNG_CHUNKS:
            chunks.append(struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
        position += 12 + length
        if kind == b"IEND":
            break
    if not chunks or not chunks[0][4:8] == b"IHDR":
        raise DataError(f"{source}: not a readable PNG (no IHDR chunk)")
    return data[:8] + b"".join(chunks)


# --- Gatan DigitalMicrograph (DM3, DM4) -------------------------------------------------------------------

def _read_dm(data: bytes, source: str) -> RawPixels:
    """The image of a DM3/DM4 file (`digitalmicrograph.read_dm`) as stored; it then renders as the same
    values in a TIFF do, and is reduced like the tifffile path's images when over DOWNSCALE_ABOVE_PIXELS."""
    image = read_dm(data, source)
    notes = list(image.notes)
    _refuse_too_large((image.pixels.shape[1], image.pixels.shape[0]), source)
    values, _ = _block_reduced(image.pixels, None, notes)
    return RawPixels(np.ascontiguousarray(values), None, "dm", notes)


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
            _refuse_too_large((int(page.imagewidth), int(page.imagelength)), source)
            array = page.asarray()
            axes = page.axes
            photometric = int(page.photometric)
            extra_samples = tuple(int(kind) for kind in np.atleast_1d(page.extrasamples))
            orientation_tag = page.tags.get(274)
            orientation = int(orientation_tag.value) if orientation_tag is not None else 1
    except Exception as exc:  # tifffile raises many types (codecs missing, malformed tags)
        raise DataError(f"{source}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if "S" in axes and axes.index("S") == 0 and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)  # planar (separate) samples -> pixel-interleaved
    if array.ndim not in (2, 3):
        raise DataError(f"{source}: TIFF page of shape {array.shape} ({axes}) is not a single 2-D image")
    if photometric not in (0, 1, 2):
        raise DataError(f"{source}: TIFF colour model (photometric {photometric}) is not supported; "
                        "save it as grey or RGB")
    alpha = None
    if array.ndim == 3:
        channels = array.shape[2]
        array, alpha = _split_extra_samples(array, extra_samples, notes)
        if array.shape[2] == 1:
            array = array[..., 0]
        elif array.shape[2] != 3:
            raise DataError(f"{source}: TIFF with {channels} channels; metallo reads grey or RGB(A)")
    if photometric == 0:  # MINISWHITE: 0 is white (the colour samples only, never the alpha)
        array = -array if array.dtype.kind == "f" else np.invert(array)
        notes.append("stored as min-is-white; inverted")
    array, alpha = _block_reduced(array, alpha, notes)
    if orientation in _ORIENTATIONS:
        array = _ORIENTATIONS[orientation](array)
        alpha = _ORIENTATIONS[orientation](alpha) if alpha is not None else None
        notes.append(f"rotated/flipped as its orientation tag ({orientation}) says")
    return RawPixels(np.ascontiguousarray(array), alpha, "tiff", notes)


def _block_reduced(array: np.ndarray, alpha: np.ndarray | None,
                   notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The tifffile path's reduction over DOWNSCALE_ABOVE_PIXELS: the mean of factor x factor blocks (edge
    rows and columns that fill no whole block are dropped), in the array's own type."""
    height, width = array.shape[:2]
    factor = _reduction_factor((width, height))
    if factor == 1:
        return array, alpha

    def reduce(values: np.ndarray) -> np.ndarray:
        rows, cols = values.shape[0] // factor, values.shape[1] // factor
        blocks = values[:rows * factor, :cols * factor].reshape(rows, factor, cols, factor, *values.shape[2:])
        mean = blocks.mean(axis=(1, 3), dtype=np.float64)
        return np.rint(mean).astype(values.dtype) if values.dtype.kind in "uib" else mean.astype(values.dtype)

    reduced = reduce(array)
    notes.append(f"{width} x {height} pixels, more than {DOWNSCALE_ABOVE_PIXELS} (8192 x 8192): reduced to "
                 f"{reduced.shape[1]} x {reduced.shape[0]} while decoding")
    return reduced, (reduce(alpha) if alpha is not None else None)


def _split_extra_samples(array: np.ndarray, extra_samples: tuple[int, ...],
                         notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour, alpha 0..1 or None) of an (H, W, C) TIFF array by its ExtraSamples tag (338): 1 associated
    (premultiplied) alpha, 2 unassociated alpha, 0 unspecified (dropped). Without the tag, a 2nd or 4th
    channel is taken as unassociated alpha, as Pillow and viewers do."""
    channels = array.shape[2]
    if not extra_samples and channels in (2, 4):
        extra_samples = (2,)
    if not extra_samples or len(extra_samples) >= channels:
        return array, None
    colour, extras = array[..., :channels - len(extra_samples)], array[..., channels - len(extra_samples):]
    if extra_samples[0] == 0:
        notes.append(f"{len(extra_samples)} unspecified extra sample(s) dropped")
        return colour, None
    top = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
    alpha = np.clip(extras[..., 0].astype(np.float64) / top, 0, 1).astype(np.float32)
    if len(extra_samples) > 1:
        notes.append(f"{len(extra_samples) - 1} further extra sample(s) dropped")
    if extra_samples[0] == 1 and not (alpha >= 1).all():
        # Premultiplied: colour = true colour * alpha. Undo it where alpha > 0 so compositing is done once.
        scale = np.where(alpha > 0, 1.0 / np.maximum(alpha, 1e-12), 0.0)
        scale = scale[..., None] if colour.ndim == 3 else scale
        restored = colour.astype(np.float64) * scale
        if colour.dtype.kind in "ui":
            info = np.iinfo(colour.dtype)
            restored = np.clip(np.rint(restored), info.min, info.max)
        colour = restored.astype(colour.dtype)
        notes.append("associated (premultiplied) alpha un-premultiplied")
    return colour, _alpha_or_none(alpha, notes)
