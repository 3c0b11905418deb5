"""Fast batched decoding of shard images to square training tensors, with the careful path as fallback.

What ingest writes is almost always plain 8-bit JPEG or PNG (grey or RGB, no EXIF rotation, no alpha).
For those bytes the stored values are exactly what `metallo_core.data.images` renders, so they can be
decoded by torchvision's libjpeg-turbo/libpng bindings (which release the GIL, so threads scale) or by
nvJPEG on the GPU, and resized with torch's uint8 antialiased bilinear kernel, which is what PIL's
bilinear filter computes (within one grey level of rounding). Everything else (16-bit, float, CMYK,
alpha, EXIF orientation, TIFF, BMP, a JPEG large enough for PIL's DCT-domain draft, a truncated file)
goes through `images.decode_resized` image by image, so the pixels never depend on which path ran.

Why a second path at all: most of PIL's cost per image is its resize, not libjpeg; how much the fast
path saves per core is `benchmarks/read_throughput.py`'s output (README, Benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Encoded = bytes | bytearray | memoryview | np.ndarray

_JPEG_SOF_FAST = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive Huffman: what libjpeg-turbo decodes
_JPEG_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless/arithmetic/...
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL's resize(reducing_gap=3.0) box-reduces first once an axis shrinks by 2 x 3 = 6 or more; torch has
# no such step, so such images take the careful path (they are rare in shards: ingest --size avoids them).
_MAX_FAST_SHRINK = 6.0


@dataclass(frozen=True)
class FastImage:
    """What the header of an image the fast path can decode says: its encoding and stored size."""

    encoding: str  # jpeg | png
    height: int
    width: int


def sniff_fast(data: Encoded) -> FastImage | None:
    """Header check (no decoding): a `FastImage` for plain 8-bit grey/RGB JPEG or PNG, else None.

    None means "use the careful path": anything unusual, unknown or malformed is left to the decoder
    that knows the policy (and raises the clear error for broken files)."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if len(view) >= 4 and view[0] == 0xFF and view[1] == 0xD8:
        return _sniff_jpeg(view)
    if len(view) >= 33 and bytes(view[:8]) == _PNG_SIGNATURE:
        return _sniff_png(view)
    return None


def _sniff_jpeg(view: memoryview) -> FastImage | None:
    if view[-2] != 0xFF or view[-1] != 0xD9:
        return None  # no end-of-image marker: truncated; PIL's message is the one to show
    position, end = 2, len(view)
    while position + 4 <= end:
        if view[position] != 0xFF:
            return None
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        length = (view[position + 2] << 8) | view[position + 3]
        segment = position + 4
        if marker == 0xE1 and _exif_orientation(view[segment:position + 2 + length]) not in (0, 1):
            return None  # the careful path rotates/flips it
        if marker in _JPEG_SOF_FAST:
            if segment + 6 > end:
                return None
            precision, components = view[segment], view[segment + 5]
            height = (view[segment + 1] << 8) | view[segment + 2]
            width = (view[segment + 3] << 8) | view[segment + 4]
            if precision != 8 or components not in (1, 3) or height == 0 or width == 0:
                return None  # 12-bit, CMYK/YCCK, or a height given later in a DNL marker
            return FastImage("jpeg", height, width)
        if marker in _JPEG_SOF_OTHER or marker == 0xDA:  # a frame type we skip, or scan data before a frame
            return None
        position += 2 + length
    return None


def _exif_orientation(segment: memoryview) -> int:
    """The orientation tag (0x0112) of an APP1 Exif segment's first IFD; 0 when absent or unreadable."""
    if len(segment) < 14 or bytes(segment[:6]) != b"Exif\x00\x00":
        return 0
    tiff = bytes(segment[6:])
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 0
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 0
    entries = int.from_bytes(tiff[ifd:ifd + 2], order)
    for index in range(entries):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return 0
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)
    return 0


def _sniff_png(view: memoryview) -> FastImage | None:
    if bytes(view[12:16]) != b"IHDR":
        return None
    width = int.from_bytes(view[16:20], "big")
    height = int.from_bytes(view[20:24], "big")
    bit_depth, colour_type = view[24], view[25]
    if bit_depth != 8 or colour_type not in (0, 2) or height == 0 or width == 0:
        return None  # 1/2/4/16-bit, palette, grey+alpha, RGBA
    position = 8
    while position + 8 <= len(view):
        length = int.from_bytes(view[position:position + 4], "big")
        kind = bytes(view[position + 4:position + 8])
        if kind == b"IDAT":
            return FastImage("png", height, width)
        if kind == b"tRNS":
            return None  # a transparent colour: leave the policy to the careful path
        position += 12 + length
    return None


def fast_path_fits(image: FastImage, size: int) -> bool:
    """True when decode + resize here gives the careful path's pixels for a `size` output.

    PIL's JPEG draft (DCT-domain downscale by 2, 4 or 8) kicks in once both sides are >= 2 x size, and
    its resize box-reduces first from a 6x shrink; torch does neither, so those images go the careful way."""
    shorter = min(image.height, image.width)
    if image.encoding == "jpeg" and image.height >= 2 * size and image.width >= 2 * size:
        return False
    return shorter / size < _MAX_FAST_SHRINK


def square_target(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) `images.square_resized` resizes to before its centre crop."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def resize_square_nhwc(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W, C) uint8 of one shape -> (N, size, size, C): shorter side to `size` (antialiased
    bilinear, PIL's filter), then the centre crop `images.square_resized` takes.

    Works in channels-last memory throughout: torch's uint8 antialiased kernel is channels-last
    inside, and a (C, H, W) <-> (H, W, C) uint8 copy costs about as much as the JPEG decode itself."""
    from torchvision.transforms.v2 import functional as F

    height, width = images.shape[1:3]
    if (height, width) != (size, size):
        new_h, new_w = square_target(height, width, size)
        resized = F.resize(images.permute(0, 3, 1, 2), [new_h, new_w], interpolation=F.InterpolationMode.BILINEAR,
                           antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = resized[..., top:top + size, left:left + size].permute(0, 2, 3, 1)
    return images


def as_uint8_tensor(data: Encoded) -> torch.Tensor:
    """A 1-D uint8 CPU tensor over encoded bytes (copied once: torch wants a writable buffer)."""
    if isinstance(data, np.ndarray):
        return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def binary_views(column) -> list[np.ndarray]:
    """Zero-copy uint8 views of each value of a pyarrow binary column (Array or ChunkedArray), so a
    batch goes from Parquet to the decoder without building one Python `bytes` per image."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views: list[np.ndarray] = []
    for chunk in chunks:
        if chunk.type != pa.binary() and chunk.type != pa.large_binary():
            chunk = chunk.cast(pa.binary())
        if chunk.null_count:
            raise ValueError("the image column holds nulls; the shard is damaged, write the dataset again")
        offset_type = np.int64 if chunk.type == pa.large_binary() else np.int32
        buffers = chunk.buffers()
        offsets = np.frombuffer(buffers[1], dtype=offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        values = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
        views.extend(values[start:stop] for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    return views


def decode_batch_resized(
    images: Sequence[Encoded],
    size: int,
    *,
    device: str | torch.device = "cpu",
    sources: Sequence[str] | None = None,
) -> torch.Tensor:
    """Encoded images -> (B, size, size, 3) uint8 on `device` (NHWC, as `images.decode_resized` stacks).

    JPEG/PNG that pass `sniff_fast` and `fast_path_fits` are decoded by torchvision (nvJPEG in one
    batched call when `device` is CUDA; PNG always on the CPU), grouped by shape and resized together;
    the rest, and any image torchvision refuses, by `images.decode_resized` (DataError naming the
    source for a broken file). Output pixels equal the careful path's within one grey level."""
    from metallo_core.data.images import decode_resized

    device = torch.device(device)
    count = len(images)
    output = torch.empty((count, size, size, 3), dtype=torch.uint8, device=device)
    names = sources if sources is not None else [f"<image {index}>" for index in range(count)]
    jpeg_rows: list[int] = []
    png_rows: list[int] = []
    careful_rows: list[int] = []
    for row, data in enumerate(images):
        header = sniff_fast(data)
        if header is None or not fast_path_fits(header, size):
            careful_rows.append(row)
        else:
            (jpeg_rows if header.encoding == "jpeg" else png_rows).append(row)

    decoded: dict[int, torch.Tensor] = {}
    careful_rows += _decode_fast(images, jpeg_rows, "jpeg", device, decoded)
    careful_rows += _decode_fast(images, png_rows, "png", device, decoded)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for row, pixels in decoded.items():
        by_shape.setdefault(tuple(pixels.shape[:2]), []).append(row)
    for rows in by_shape.values():
        resized = resize_square_nhwc(torch.stack([decoded[row] for row in rows]), size)
        for index, row in enumerate(rows):
            output[row].copy_(resized[index])
    for row in sorted(careful_rows):
        pixels = decode_resized(_as_bytes(images[row]), size, names[row])
        output[row] = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    return output


def _decode_fast(images: Sequence[Encoded], rows: list[int], encoding: str, device: torch.device,
                 decoded: dict[int, torch.Tensor]) -> list[int]:
    """Decode `rows` with torchvision into `decoded` (row -> (H, W, 3) uint8 on `device`); returns the
    rows it could not decode, for the careful path. (torchvision's CPU decoders fill (H, W, 3) memory
    and return a (3, H, W) view of it: permuting back is free, copying it to (3, H, W) is not.)"""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    if not rows:
        return []
    tensors = [as_uint8_tensor(images[row]) for row in rows]
    if encoding == "jpeg" and device.type == "cuda":
        try:
            for row, pixels in zip(rows, decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)):
                decoded[row] = pixels.permute(1, 2, 0)
            return []
        except RuntimeError:
            pass  # one bad image fails nvJPEG's whole batch: retry image by image on the CPU below
    refused = []
    for row, tensor in zip(rows, tensors):
        try:
            if encoding == "jpeg":
                pixels = decode_jpeg(tensor, mode=ImageReadMode.RGB)
            else:
                pixels = decode_png(tensor, mode=ImageReadMode.RGB)
        except RuntimeError:
            refused.append(row)
            continue
        decoded[row] = pixels.permute(1, 2, 0).to(device, non_blocking=True)
    return refused


def _as_bytes(data: Encoded) -> bytes:
    return data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
