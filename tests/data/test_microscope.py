"""Reading a microscope file's scale (metallo_core/data/microscope.py): pixel sizes from FEI/Thermo, Zeiss
and ImageJ TIFF metadata, the FEI data bar's height, none for plain images, a clear error for garbled
metadata, and the data bar cut exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from metallo_core.data.crop import EdgeCrop
from metallo_core.data.decode import decode_to_rgb8
from metallo_core.data.microscope import (
    MicroscopeMetadata,
    crop_with_data_bar,
    read_microscope_metadata,
    read_microscope_metadata_of,
)
from metallo_core.errors import DataError
from tests.microscope_files import fei_tiff, imagej_tiff, zeiss_tiff

PIXELS = np.random.default_rng(0).integers(0, 256, (72, 64)).astype(np.uint8)


def test_fei_tiff_gives_its_pixel_size_and_data_bar():
    found = read_microscope_metadata(fei_tiff(PIXELS, 2.5e-8, data_bar_rows=12), "a.tif")
    assert found.pixel_size is not None
    assert found.pixel_size.metres == pytest.approx(2.5e-8)
    assert found.pixel_size.nanometres == pytest.approx(25.0)
    assert "FEI" in found.pixel_size.source and "34682" in found.pixel_size.source
    assert found.data_bar_rows == 12


def test_fei_data_bar_from_the_image_rows_when_its_height_is_not_written():
    text = "[Scan]\r\nPixelWidth=1e-08\r\nPixelHeight=1e-08\r\n[Image]\r\nResolutionX=64\r\nResolutionY=60\r\n"
    found = read_microscope_metadata(fei_tiff(PIXELS, 1e-8, metadata=text), "a.tif")
    assert found.data_bar_rows == 72 - 60
    assert found.pixel_size is not None and found.pixel_size.metres == pytest.approx(1e-8)


def test_zeiss_tiff_gives_its_pixel_size():
    found = read_microscope_metadata(zeiss_tiff(PIXELS, 7.5e-9), "z.tif")
    assert found.pixel_size is not None
    assert found.pixel_size.metres == pytest.approx(7.5e-9, rel=1e-6)
    assert "Zeiss" in found.pixel_size.source
    assert found.data_bar_rows is None


def test_imagej_calibration_in_microns_is_read_and_one_in_pixels_is_no_pixel_size():
    found = read_microscope_metadata(imagej_tiff(PIXELS, 0.25), "ij.tif")
    assert found.pixel_size is not None and found.pixel_size.metres == pytest.approx(0.25e-6)
    assert read_microscope_metadata(imagej_tiff(PIXELS, 1.0, unit="pixel"), "ij.tif").pixel_size is None


@pytest.mark.parametrize("kind", ["png", "jpeg", "plain tiff", "tiff with 300 dpi"])
def test_plain_images_have_no_pixel_size(kind):
    stream = io.BytesIO()
    if kind == "plain tiff":
        tifffile.imwrite(stream, PIXELS)
    elif kind == "tiff with 300 dpi":  # an image editor's resolution tags are not a calibration
        tifffile.imwrite(stream, PIXELS, resolution=(300, 300), resolutionunit="INCH")
    else:
        Image.fromarray(PIXELS).save(stream, kind.upper())
    found = read_microscope_metadata(stream.getvalue(), "plain")
    assert found.pixel_size is None and found.data_bar_rows is None


@pytest.mark.parametrize("text", ["[Scan]\r\nPixelWidth=banana\r\nPixelHeight=banana\r\n",
                                  "[User]\r\nDate=12/07/2026\r\n", "\x00\x01garbage without sections"])
def test_garbled_fei_metadata_is_an_error_naming_the_file(text):
    with pytest.raises(DataError, match=r"broken\.tif: carries FEI/Thermo metadata .*no readable pixel size"):
        read_microscope_metadata(fei_tiff(PIXELS, 1e-8, metadata=text), "broken.tif")


def test_a_damaged_tiff_header_is_an_error_naming_the_file():
    data = bytearray(fei_tiff(PIXELS, 1e-8))
    data[4:8] = (10**9).to_bytes(4, "little")  # the first IFD's offset points past the end
    with pytest.raises(DataError, match=r"cut\.tif"):
        read_microscope_metadata(bytes(data), "cut.tif")


def test_the_data_bar_is_cut_exactly_and_an_explicit_bottom_crop_wins():
    bar_rows = 13
    pixels = PIXELS.copy()
    pixels[-bar_rows:] = 0  # a black bar: whatever auto detection would guess, the metadata says 13
    data = fei_tiff(pixels, 1e-8, data_bar_rows=bar_rows)
    found = read_microscope_metadata(data, "a.tif")
    rgb = decode_to_rgb8(data, "a.tif")
    for asked in (EdgeCrop(), EdgeCrop.parse("auto"), EdgeCrop.parse("left=4")):
        cropped, cut = crop_with_data_bar(asked, found).apply(rgb, "a.tif")
        assert cut == bar_rows
        assert cropped.shape[0] == 72 - bar_rows
        np.testing.assert_array_equal(cropped[..., 0], PIXELS[:72 - bar_rows, asked.edges_in_pixels(72, 64)["left"]:])
    explicit, cut = crop_with_data_bar(EdgeCrop.parse("bottom=20"), found).apply(rgb, "a.tif")
    assert cut == 20 and explicit.shape[0] == 52
    assert crop_with_data_bar(EdgeCrop(), read_microscope_metadata(zeiss_tiff(PIXELS, 1e-8), "z")) == EdgeCrop()


def test_a_local_file_is_read_whole_only_when_it_is_a_tiff(tmp_path):
    (tmp_path / "a.tif").write_bytes(fei_tiff(PIXELS, 3e-9, data_bar_rows=5))
    Image.fromarray(PIXELS).save(tmp_path / "b.png")
    found = read_microscope_metadata_of(tmp_path / "a.tif")
    assert found.pixel_size is not None and found.pixel_size.nanometres == pytest.approx(3.0)
    assert found.data_bar_rows == 5
    assert read_microscope_metadata_of(tmp_path / "b.png") == MicroscopeMetadata()
    with pytest.raises(DataError, match=r"missing\.tif: cannot be read"):
        read_microscope_metadata_of(tmp_path / "missing.tif")
