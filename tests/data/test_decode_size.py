"""Images the decoder refuses for their size become a DataError naming the file (classify's and ingest's
skip policies handle it); large legitimate micrographs decode reduced, and say so."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metallo_core import cli
from metallo_core.data import decode
from metallo_core.data.decode import ImageDecodeWarning, decode_to_rgb8
from metallo_core.data.manifest import read_manifest
from metallo_core.errors import DataError


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (one tiny IDAT): what Pillow's bomb check refuses at open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 8))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_data_error_naming_the_file():
    with pytest.raises(DataError, match=r"huge\.png: too large to decode.*downscale or tile"):
        decode_to_rgb8(png_header_only(47_000, 47_000), "huge.png")


def test_over_the_limit_but_under_pillows_bomb_check_is_refused_too():
    with pytest.raises(DataError, match=r"big\.png: 40000 x 30000 pixels is more than metallo decodes"):
        decode_to_rgb8(png_header_only(40_000, 30_000), "big.png")


def test_any_decoder_exception_becomes_a_data_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a codec bug")

    monkeypatch.setattr(decode, "_read_with_pillow", broken)
    with pytest.raises(DataError, match=r"x\.png: not a readable image \(RuntimeError: a codec bug\)"):
        decode_to_rgb8(png_header_only(8, 8), "x.png")


def test_ingest_skips_a_bomb_under_on_error_skip(tmp_path, capsys):
    src = tmp_path / "src"
    for kind in ("a", "b"):
        (src / kind).mkdir(parents=True)
        for index in range(2):
            Image.new("L", (12, 12), 40 * index + 20).save(src / kind / f"{index}.png")
    (src / "a" / "huge.png").write_bytes(png_header_only(47_000, 47_000))
    code = cli.main(["data", "ingest", "--format", "imagefolder", "--src", str(src), "--out", str(tmp_path / "ds"),
                     "--on-error", "skip"])
    assert code == 0, capsys.readouterr().err
    skipped = read_manifest(str(tmp_path / "ds")).skipped
    assert [Path(entry["source"]).name for entry in skipped] == ["huge.png"]
    assert "too large to decode" in skipped[0]["reason"]


def test_a_large_micrograph_decodes_reduced_with_a_note():
    # 20000 x 15000 grey, a gradient so the reduction can be checked (PNG of repeated rows stays small).
    row = (np.arange(20_000) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (15_000, 20_000))).save(buffer, format="PNG", compress_level=1)
    with pytest.warns(ImageDecodeWarning, match=r"20000 x 15000 pixels.*reduced to 6667 x 5000"):
        pixels = decode_to_rgb8(buffer.getvalue(), "sem.png")
    assert pixels.shape == (5000, 6667, 3)
    assert pixels[0, 0, 0] == 1  # the box average of columns 0, 1, 2


def test_a_large_jpeg_is_reduced_by_libjpeg_first(monkeypatch):
    monkeypatch.setattr(decode, "DOWNSCALE_ABOVE_PIXELS", 64 * 64)
    buffer = io.BytesIO()
    Image.new("RGB", (512, 256), (200, 100, 50)).save(buffer, format="JPEG", quality=95)
    with pytest.warns(ImageDecodeWarning, match=r"512 x 256 pixels.*reduced to 64 x 32"):
        pixels = decode_to_rgb8(buffer.getvalue(), "sem.jpg")
    assert pixels.shape == (32, 64, 3)
    assert np.abs(pixels[16, 32].astype(int) - (200, 100, 50)).max() <= 3
