"""Gatan DigitalMicrograph DM3 and DM4 files, written from the format's public description, for the tests.

No library here writes DM files; rosettasciio's reader (`rsciio.digitalmicrograph`) is the oracle this writer
is checked against (tests/data/test_digitalmicrograph.py: it reads back the exact pixels and scale).

The layout (a tag file):
- Header: the version (3 or 4), the length of what follows, and the byte order of the data values (1: little
  endian); each a big-endian integer, the length 4 bytes in DM3 and 8 in DM4.
- The root tag group: sorted flag, open flag (1 byte each), number of tags (4 bytes in DM3, 8 in DM4).
- Each tag: its kind (20 a group, 21 data), its name's length (2 bytes) and name; in DM4 the tag's length in
  bytes (8). A group then holds a tag group as above; data holds the delimiter `%%%%`, the length of its
  type description, the description (4- or 8-byte big-endian integers: a simple type's code; 20, element
  code, count for an array; 15 ... for a struct) and the values in the header's byte order.
- The end: 8 zero bytes.
The image lies under `ImageList` (one unnamed group per image; the first is the thumbnail, named by
`Thumbnails`), `ImageData` holding `Data` (an array), `DataType` (the image's type code), `Dimensions` (one
unnamed value per axis, x first) and `Calibrations/Dimension` (one unnamed group per axis: `Origin`, `Scale`,
`Units`), beside `ImageTags` (free-form metadata, where DM says a spectrum is one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

# Simple type codes of a data tag: numpy dtype -> code.
SIMPLE_TYPES = {np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("uint16"): 4, np.dtype("uint32"): 5,
                np.dtype("float32"): 6, np.dtype("float64"): 7, np.dtype("bool"): 8, np.dtype("int8"): 9,
                np.dtype("uint8"): 10, np.dtype("int64"): 11, np.dtype("uint64"): 12}
ARRAY, GROUP, DATA = 20, 20, 21
# The image's own type code (ImageData.DataType): numpy dtype -> code; RGB is 23 (4 bytes per pixel).
IMAGE_TYPES = {np.dtype("int16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 6, np.dtype("int32"): 7,
               np.dtype("int8"): 9, np.dtype("uint16"): 10, np.dtype("uint32"): 11, np.dtype("float64"): 12}
RGB_TYPE = 23


@dataclass(frozen=True)
class Value:
    """One data tag: a scalar or a 1-D array of a simple type (a text is an array of uint16 code units)."""

    values: np.ndarray
    is_array: bool

    @staticmethod
    def scalar(value: float, dtype: str) -> Value:
        return Value(np.array([value], dtype), False)

    @staticmethod
    def array(values: np.ndarray) -> Value:
        return Value(np.ascontiguousarray(values).ravel(), True)

    @staticmethod
    def text(text: str) -> Value:
        return Value(np.frombuffer(text.encode("utf-16-le"), "<u2"), True)


Group = list  # of (name, Value | Group) pairs; "" for an unnamed tag


def dm_file(pixels: np.ndarray, scale: float = 1.0, units: str = "", version: int = 3, *, rgb: bool = False,
            image_tags: Group | None = None) -> bytes:
    """A DM3 (`version` 3) or DM4 file holding `pixels` and a thumbnail, as DigitalMicrograph saves one.

    `pixels`: (H, W) of a type in IMAGE_TYPES, or (H, W, 3) uint8 with `rgb`; also (N,) for a spectrum or
    (Z, H, W) for a stack. Every axis is calibrated to `scale` `units` per pixel (the last, for a spectrum:
    eV). `image_tags`: the ImageTags group (e.g. [("Meta Data", [("Format", Value.text("Spectrum"))])])."""
    image = _image_group(pixels, scale, units, rgb, image_tags or [])
    thumbnail = _image_group(np.zeros((8, 8, 3), np.uint8), 1.0, "", True, [])
    root: Group = [
        ("ApplicationBounds", Value.array(np.array([0, 0, 512, 512], "<i4"))),
        ("ImageList", [("", thumbnail), ("", image)]),
        ("Thumbnails", [("", [("ImageIndex", Value.scalar(0, "uint32"))])]),
    ]
    body = _group_body(root, version)
    size_format = ">I" if version == 3 else ">Q"
    # The length written is that of the root group and the end marker, which follow the header.
    header = struct.pack(">I", version) + struct.pack(size_format, len(body) + 8) + struct.pack(">I", 1)
    return header + body + bytes(8)


def _image_group(pixels: np.ndarray, scale: float, units: str, rgb: bool, image_tags: Group) -> Group:
    if rgb:
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError("an RGB image is (H, W, 3) uint8")
        height, width = pixels.shape[:2]
        bgra = np.zeros((height, width, 4), np.uint8)
        bgra[..., 0], bgra[..., 1], bgra[..., 2] = pixels[..., 2], pixels[..., 1], pixels[..., 0]
        data, data_type, shape = bgra.view("<u4")[..., 0], RGB_TYPE, (height, width)
    else:
        data, data_type, shape = pixels.astype(pixels.dtype.newbyteorder("<")), IMAGE_TYPES[pixels.dtype], pixels.shape
    axes = shape[::-1]  # DM lists x first
    spectrum = len(shape) == 1
    calibrations: Group = [("", [("Origin", Value.scalar(0.0, "float32")),
                                 ("Scale", Value.scalar(scale, "float32")),
                                 ("Units", Value.text("eV" if spectrum else units))]) for _ in axes]
    return [
        ("ImageData", [
            ("Calibrations", [
                ("Brightness", [("Origin", Value.scalar(0.0, "float32")), ("Scale", Value.scalar(1.0, "float32")),
                                ("Units", Value.text("Counts"))]),
                ("Dimension", calibrations),
                ("DisplayCalibratedUnits", Value.scalar(1, "bool")),
            ]),
            ("Data", Value.array(data)),
            ("DataType", Value.scalar(data_type, "int32")),
            ("Dimensions", [("", Value.scalar(length, "uint32")) for length in axes]),
            ("PixelDepth", Value.scalar(data.dtype.itemsize, "uint32")),
        ]),
        ("ImageTags", image_tags),
        ("Name", Value.text("metallo test image")),
    ]


def _group_body(entries: Group, version: int) -> bytes:
    """A tag group: sorted flag 0, open flag 1, the tag count, then the tags."""
    body = bytearray(b"\x00\x01" + _integer(len(entries), version))
    for name, value in entries:
        body += _tag(name, value, version)
    return bytes(body)


def _tag(name: str, value: Value | Group, version: int) -> bytes:
    encoded = name.encode("latin-1")
    if isinstance(value, Value):
        kind, content = DATA, b"%%%%" + _data(value, version)
    else:
        kind, content = GROUP, _group_body(value, version)
    head = bytes([kind]) + struct.pack(">H", len(encoded)) + encoded
    if version == 4:
        head += struct.pack(">Q", len(content))  # DM4 gives each tag's length, so readers may skip it
    return head + content


def _data(value: Value, version: int) -> bytes:
    code = SIMPLE_TYPES[value.values.dtype.newbyteorder("=")]
    description = [ARRAY, code, value.values.size] if value.is_array else [code]
    return (_integer(len(description), version) + b"".join(_integer(item, version) for item in description)
            + value.values.astype(value.values.dtype.newbyteorder("<")).tobytes())


def _integer(value: int, version: int) -> bytes:
    return struct.pack(">I" if version == 3 else ">Q", value)
