"""`metallo data ingest` on microscope files (metallo_core/data/microscope.py): the data bar the metadata
measures is cut exactly, the pixel sizes found are recorded, `--pixel-size-nm` resamples every image to one
physical scale, files without a pixel size or with garbled metadata are bad inputs naming the file, and
DM3/DM4 files are stored as PNG with their calibration (a truncated one a bad input under --on-error)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metallo_core import cli
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.shards import read_split_table
from metallo_core.errors import DataError
from tests.dm_files import dm_file
from tests.microscope_files import fei_tiff, zeiss_tiff

BAR_ROWS = 12


def speckle(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width)).astype(np.uint8)


@pytest.fixture
def src(tmp_path):
    """Class a: an FEI TIFF (80 x 64 image rows at 10 nm, plus a 12-row data bar); class b: a Zeiss TIFF at 20 nm."""
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "fei.tif").write_bytes(fei_tiff(speckle(0, 64 + BAR_ROWS, 80), 10e-9, BAR_ROWS))
    (root / "b" / "zeiss.tif").write_bytes(zeiss_tiff(speckle(1, 40, 48), 20e-9))
    return root


def stored_sizes(uri: str) -> dict[str, tuple[int, int]]:
    table = read_split_table(uri, "train", ["source", "height", "width"])
    return {source: (height, width) for source, height, width in zip(*(table.column(c).to_pylist()
                                                                        for c in ("source", "height", "width")))}


def test_ingest_cuts_the_measured_bar_and_records_the_pixel_sizes(src, tmp_path, capsys):
    manifest = ingest("imagefolder", str(src), str(tmp_path / "ds"), IngestOptions())
    assert stored_sizes(str(tmp_path / "ds")) == {"a/fei.tif": (64, 80), "b/zeiss.tif": (40, 48)}
    assert manifest.source["pixel_sizes"] == {"images": 2, "with_pixel_size": 2, "data_bars_from_metadata": 1,
                                              "min_nm": pytest.approx(10.0), "median_nm": pytest.approx(15.0),
                                              "max_nm": pytest.approx(20.0)}
    assert cli.main(["data", "info", str(tmp_path / "ds")]) == 0
    assert ("scale     2 of 2 images with a pixel size (10-20 nm in the files); 1 data bar(s) measured by the "
            "metadata cut") in capsys.readouterr().out


def test_pixel_size_nm_resamples_every_image_to_one_scale(src, tmp_path):
    manifest = ingest("imagefolder", str(src), str(tmp_path / "ds"), IngestOptions(pixel_size_nm=20.0))
    # 64 x 80 at 10 nm -> 32 x 40 at 20 nm; the Zeiss image is at 20 nm already.
    assert stored_sizes(str(tmp_path / "ds")) == {"a/fei.tif": (32, 40), "b/zeiss.tif": (40, 48)}
    assert manifest.source["pixel_size_nm"] == 20.0


def test_pixel_size_nm_refuses_images_without_one_or_enlarged_over_the_bound(src, tmp_path):
    Image.fromarray(speckle(2, 40, 40)).save(src / "b" / "plain.png")
    with pytest.raises(DataError, match=r"plain\.png: --pixel-size-nm needs every image's pixel size"):
        ingest("imagefolder", str(src), str(tmp_path / "ds"), IngestOptions(pixel_size_nm=20.0))
    (src / "b" / "plain.png").unlink()
    (src / "b" / "fei.tif").write_bytes((src / "a" / "fei.tif").read_bytes())  # 10 nm -> 5 nm: 2x, allowed
    manifest = ingest("imagefolder", str(src), str(tmp_path / "ds2"), IngestOptions(pixel_size_nm=5.0,
                                                                                      on_error="skip"))
    assert [entry["source"] for entry in manifest.skipped] == ["b/zeiss.tif"]  # 20 nm -> 5 nm: 4x enlarged
    assert "would enlarge it 4x" in manifest.skipped[0]["reason"]


def test_garbled_metadata_is_a_bad_input_naming_the_file(src, tmp_path):
    (src / "a" / "broken.tif").write_bytes(fei_tiff(speckle(3, 40, 40), 1e-8, metadata="[Scan]\r\nPixelWidth=x\r\n"))
    with pytest.raises(DataError, match=r"broken\.tif: carries FEI/Thermo metadata .*--on-error skip"):
        ingest("imagefolder", str(src), str(tmp_path / "ds"), IngestOptions())


def test_pixel_size_nm_with_size_is_refused():
    with pytest.raises(DataError, match="--pixel-size-nm and --size cannot be combined"):
        IngestOptions(size=64, pixel_size_nm=10.0)


def test_dm_files_are_stored_as_png_with_their_pixel_size_and_a_truncated_one_is_skipped(src, tmp_path):
    tem = (speckle(4, 48, 40).astype(np.uint16) * 16 + 1000).astype(np.int16)  # a 12-bit camera in int16
    (src / "b" / "tem.dm4").write_bytes(dm_file(tem, 0.04, "µm", version=4))  # 40 nm
    (src / "b" / "cut.dm3").write_bytes(dm_file(tem, 40.0, "nm")[:300])
    with pytest.raises(DataError, match=r"cut\.dm3: not a readable DigitalMicrograph file.*--on-error skip"):
        ingest("imagefolder", str(src), str(tmp_path / "ds"), IngestOptions())
    manifest = ingest("imagefolder", str(src), str(tmp_path / "ds2"), IngestOptions(pixel_size_nm=20.0,
                                                                                      on_error="skip"))
    assert [entry["source"] for entry in manifest.skipped] == ["b/cut.dm3"]
    # 48 x 40 at 40 nm -> 96 x 80 at 20 nm, stored as an image the shards' readers decode.
    assert stored_sizes(str(tmp_path / "ds2"))["b/tem.dm4"] == (96, 80)
    table = read_split_table(str(tmp_path / "ds2"), "train", ["source", "image"])
    stored = dict(zip(table.column("source").to_pylist(), table.column("image").to_pylist()))
    assert stored["b/tem.dm4"].startswith(b"\x89PNG\r\n\x1a\n")
    assert manifest.source["pixel_sizes"]["max_nm"] == pytest.approx(40.0, rel=1e-6)
