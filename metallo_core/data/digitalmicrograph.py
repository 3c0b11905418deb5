"""Gatan DigitalMicrograph DM3/DM4 files: the one 2-D image such a file holds, and its spatial calibration.

Read by rosettasciio's maintained reader (`rsciio.digitalmicrograph`, HyperSpy's); the pixels then take the
one decode policy of `decode.py` (16/32-bit and float data mapped to 8 bits like the same data in a TIFF),
the calibration `microscope.py`'s pixel size.

- Types: int8/16/32, uint8/16/32, float32/64 grey, bool, and DM's RGB (its 4th byte is no transparency:
  dropped). Complex data (an FFT) is refused.
- One image: axes of length 1 are dropped (a one-frame stack is an image). A stack, a spectrum, a line or
  map of spectra is refused with a DataError naming the file and what it holds; when a file holds several
  images (besides its thumbnail), the first is used (reported, as for a multi-page TIFF).
- A file rosettasciio cannot parse (truncated, damaged) is a DataError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from metallo_core.data.rsciio_files import read_signals
from metallo_core.errors import DataError

DM_SUFFIXES = (".dm3", ".dm4")


@dataclass(frozen=True)
class DMImage:
    """`pixels`: (H, W) of the stored type, or (H, W, 3) uint8 for RGB; `height_axis`/`width_axis`: the
    calibration of each as rosettasciio gives it (`scale` per pixel in `units`, `offset`, `size`); `notes`:
    what was guessed (for the decode warning)."""

    pixels: np.ndarray
    height_axis: dict
    width_axis: dict
    notes: list[str] = field(default_factory=list)


def is_dm_file(data: bytes) -> bool:
    """True for a DM3/DM4 header: version 3 or 4 (a big-endian 32-bit integer), then the length (4 bytes in
    DM3, 8 in DM4) and a byte-order flag of 0 or 1 (so a stray file starting with 00 00 00 03 is not taken)."""
    if len(data) < 16:
        return False
    version = int.from_bytes(data[:4], "big")
    order = {3: data[8:12], 4: data[12:16]}.get(version)
    return order in (b"\x00\x00\x00\x00", b"\x00\x00\x00\x01")


def read_dm(data: bytes, source: str) -> DMImage:
    """The image in a DM3/DM4 file's bytes (see the module docstring); `source` names it in errors.

    Raises DataError for a file rosettasciio cannot parse, one that holds no 2-D image (a stack, a
    spectrum) and complex data."""
    signals = _rsciio_signals(data, source)
    if not signals:
        raise DataError(f"{source}: the DigitalMicrograph file holds no image")
    notes = [f"holds {len(signals)} images; using the first"] if len(signals) > 1 else []
    signal = signals[0]
    values = np.asarray(signal["data"])
    axes = list(signal["axes"])
    kept = [index for index, axis in enumerate(axes) if int(axis["size"]) != 1]
    values = values.reshape([values.shape[index] for index in kept])
    axes = [axes[index] for index in kept]
    if len(axes) != 2 or any(axis.get("navigate") for axis in axes):
        raise DataError(f"{source}: holds {_what_it_holds(values, axes, signal)}, not one 2-D image; metallo "
                        "classifies single images: save the image you want from DigitalMicrograph as its own "
                        "DM3/DM4 or TIFF file")
    if values.dtype.names:  # DM's RGB: a structured R, G, B, A array
        values = np.stack([values["R"], values["G"], values["B"]], axis=-1).astype(np.uint8)
    elif values.dtype.kind == "c":
        raise DataError(f"{source}: holds complex data ({values.dtype.name}, e.g. an FFT), not an image; save "
                        "its amplitude or the real-space image")
    return DMImage(np.ascontiguousarray(values), axes[0], axes[1], notes)


def _rsciio_signals(data: bytes, source: str) -> list[dict]:
    from rsciio.digitalmicrograph import file_reader  # imported here: it loads dask and friends

    try:
        return read_signals(file_reader, data, ".dm4")
    except Exception as exc:  # the reader raises many kinds on a damaged file (struct.error, ValueError, ...)
        raise DataError(f"{source}: not a readable DigitalMicrograph file ({type(exc).__name__}: {exc}); save "
                        "it again from DigitalMicrograph, or export it as TIFF") from exc


def _what_it_holds(values: np.ndarray, axes: list[dict], signal: dict) -> str:
    """In words, for the refusal: `a spectrum or profile of 2048 points`, `a stack of 12 images of 512 x 512`,
    `a spectrum image (EELS), data of 64 x 64 x 1024`, ..."""
    kind = (signal.get("metadata") or {}).get("Signal", {}).get("signal_type") or ""
    meta_data = _image_tags(signal).get("Meta Data")
    dm_format = meta_data.get("Format") if isinstance(meta_data, dict) else None
    shape = " x ".join(str(length) for length in values.shape)
    label = f" ({kind})" if kind else ""
    if len(axes) == 0:
        return "a single value"
    if len(axes) == 1:
        return f"a spectrum or profile of {values.shape[0]} points{label}"
    navigation = [axis for axis in axes if axis.get("navigate")]
    signal_axes = [axis for axis in axes if not axis.get("navigate")]
    if len(signal_axes) == 1:
        return f"spectra{label}, data of {shape}"
    if "spectrum" in str(dm_format or "").lower():
        return f"a spectrum image{label}, data of {shape}"
    if len(axes) == 3 and len(navigation) == 1:
        return f"a stack of {values.shape[0]} images of {values.shape[1]} x {values.shape[2]}{label}"
    return f"{len(axes)}-D data of {shape}{label}"


def _image_tags(signal: dict) -> dict:
    """The DM ImageTags of the signal's image (rosettasciio keeps them under ImageList.TagGroup0)."""
    tags = (signal.get("original_metadata") or {}).get("ImageList", {}).get("TagGroup0", {}).get("ImageTags")
    return tags if isinstance(tags, dict) else {}
