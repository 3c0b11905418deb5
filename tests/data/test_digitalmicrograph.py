"""Gatan DigitalMicrograph DM3/DM4 files (metallo_core/data/digitalmicrograph.py): the test writer checked
against rosettasciio's reader, the image decoded as the same values in a TIFF are, the pixel size from the
calibration in metres, and stacks, spectra and damaged files refused naming the file."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest
import tifffile
from PIL import Image

from metallo_core.data.decode import decode_to_rgb8
from metallo_core.data.digitalmicrograph import is_dm_file
from metallo_core.data.images import prepare_bytes
from metallo_core.data.listing import is_image_name
from metallo_core.data.microscope import read_microscope_metadata, read_microscope_metadata_of
from metallo_core.errors import DataError
from tests.dm_files import Value, dm_file

RNG = np.random.default_rng(0)
# Detector-like values for each type DM stores: a 12-bit signal in 16/32 bits, signed data around 0, floats.
IMAGES = {
    "uint8": RNG.integers(0, 256, (24, 20)).astype(np.uint8),
    "int8": RNG.integers(-100, 100, (24, 20)).astype(np.int8),
    "uint16": RNG.integers(1000, 2500, (24, 20)).astype(np.uint16),
    "int16": RNG.integers(-1500, 2500, (24, 20)).astype(np.int16),
    "uint32": RNG.integers(0, 3_000_000, (24, 20)).astype(np.uint32),
    "int32": RNG.integers(-70_000, 70_000, (24, 20)).astype(np.int32),
    "float32": RNG.normal(0.5, 0.2, (24, 20)).astype(np.float32),
    "float64": RNG.normal(-3e3, 40.0, (24, 20)),
}


def rsciio_read(data: bytes) -> list[dict]:
    from rsciio.digitalmicrograph import file_reader

    handle, path = tempfile.mkstemp(suffix=".dm3")
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
    try:
        return file_reader(path)
    finally:
        os.unlink(path)


def tiff_bytes(pixels: np.ndarray) -> bytes:
    stream = io.BytesIO()
    tifffile.imwrite(stream, pixels, photometric="rgb" if pixels.ndim == 3 else "minisblack")
    return stream.getvalue()


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("dtype", list(IMAGES))
def test_the_writer_is_read_back_exactly_by_rosettasciio(version, dtype):
    pixels = IMAGES[dtype]
    signals = rsciio_read(dm_file(pixels, 2.5, "nm", version))
    assert len(signals) == 1  # the thumbnail is left out, as in DigitalMicrograph's own files
    assert signals[0]["data"].dtype == pixels.dtype
    np.testing.assert_array_equal(signals[0]["data"], pixels)
    assert [(axis["name"], axis["size"], axis["scale"], axis["units"]) for axis in signals[0]["axes"]] == [
        ("y", 24, 2.5, "nm"), ("x", 20, 2.5, "nm")]


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("dtype", list(IMAGES))
def test_a_dm_image_decodes_as_the_same_values_in_a_tiff(version, dtype):
    data = dm_file(IMAGES[dtype], 1.0, "nm", version)
    assert is_dm_file(data)
    decoded = decode_to_rgb8(data, f"a-{dtype}-{version}.dm{version}")
    np.testing.assert_array_equal(decoded, decode_to_rgb8(tiff_bytes(IMAGES[dtype]), f"a-{dtype}.tif"))


@pytest.mark.parametrize("version", [3, 4])
def test_an_rgb_dm_image_decodes_as_its_colours(version):
    rgb = RNG.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    np.testing.assert_array_equal(decode_to_rgb8(dm_file(rgb, 1.0, "nm", version, rgb=True), "rgb.dm4"), rgb)


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize(("scale", "units", "metres"), [(2.5, "nm", 2.5e-9), (0.25, "µm", 0.25e-6),
                                                        (0.8, "Å", 0.8e-10), (1.5, "um", 1.5e-6)])
def test_the_pixel_size_comes_from_the_calibration_in_metres(version, scale, units, metres):
    found = read_microscope_metadata(dm_file(IMAGES["int16"], scale, units, version), "a.dm3")
    assert found.pixel_size is not None
    assert found.pixel_size.metres == pytest.approx(metres, rel=1e-6)  # DM stores the scale as float32
    assert "DigitalMicrograph" in found.pixel_size.source
    assert found.data_bar_rows is None


def test_an_uncalibrated_dm_image_has_no_pixel_size(tmp_path):
    assert read_microscope_metadata(dm_file(IMAGES["uint16"], 1.0, ""), "plain.dm3").pixel_size is None
    (tmp_path / "a.dm4").write_bytes(dm_file(IMAGES["uint16"], 4.0, "nm", 4))
    found = read_microscope_metadata_of(tmp_path / "a.dm4")  # read whole: its header says DM
    assert found.pixel_size is not None and found.pixel_size.nanometres == pytest.approx(4.0)


@pytest.mark.parametrize(("pixels", "tags", "holds"), [
    (np.linspace(0, 1, 64, dtype=np.float32), [], r"a spectrum or profile of 64 points"),
    (np.zeros((3, 8, 6), np.int16), [], r"a stack of 3 images of 8 x 6"),
    (np.zeros((5, 32), np.float32), [("Meta Data", [("Format", Value.text("Spectrum"))])], r"spectra"),
    (np.zeros((4, 6, 32), np.float32), [("Meta Data", [("Format", Value.text("Spectrum image")),
                                                       ("Signal", Value.text("EELS"))])],
     r"a spectrum image \(EELS\), data of 4 x 6 x 32"),
])
def test_a_stack_or_spectrum_is_refused_naming_the_file(pixels, tags, holds):
    data = dm_file(pixels, 1.0, "nm", image_tags=tags)
    for read in (decode_to_rgb8, read_microscope_metadata):
        with pytest.raises(DataError, match=rf"eels\.dm3: holds {holds}.*not one 2-D image"):
            read(data, "eels.dm3")


def test_a_one_frame_stack_is_an_image():
    frame = IMAGES["uint16"]
    decoded = decode_to_rgb8(dm_file(frame[None], 1.0, "nm"), "one.dm3")
    np.testing.assert_array_equal(decoded, decode_to_rgb8(tiff_bytes(frame), "one.tif"))


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("kept", [0.3, 0.9])  # cut in the tags, and in the image data
def test_a_truncated_dm_file_is_a_decode_error_naming_it(version, kept):
    data = dm_file(IMAGES["int16"], 1.0, "nm", version)
    cut = data[: int(len(data) * kept)]
    assert is_dm_file(cut)
    for read in (decode_to_rgb8, read_microscope_metadata):
        with pytest.raises(DataError, match=r"cut\.dm3: not a readable DigitalMicrograph file"):
            read(cut, "cut.dm3")


def test_dm_files_are_listed_and_stored_as_png():
    assert is_image_name("a.dm3") and is_image_name("B.DM4")
    prepared = prepare_bytes(dm_file(IMAGES["uint16"], 1.0, "nm", 4), "a.dm4")
    assert prepared.info.encoding == "png" and (prepared.info.height, prepared.info.width) == (24, 20)
    with Image.open(io.BytesIO(prepared.data)) as stored:
        np.testing.assert_array_equal(np.asarray(stored), IMAGES["uint16"])  # 16 bits kept


def test_other_files_are_not_taken_for_dm():
    assert not is_dm_file(b"\x00\x00\x00\x03" + bytes(4) + b"\x00\x00\x00\x07" + bytes(8))
    assert not is_dm_file(tiff_bytes(IMAGES["uint8"]))

