"""`metallo classify` on microscope files: support and queries brought to one physical scale from their
metadata (FEI TIFF and Gatan DM3 alike), the data bar cut exactly, the pixel size used written per image, a
plain fallback when some files lack a pixel size, and a clear error for garbled metadata."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metallo_core import cli
from metallo_core.commands.classify_app import ClassifySettings, classify
from metallo_core.errors import ConfigError, DataError
from tests.dm_files import dm_file
from tests.fewshot.test_classify import texture
from tests.microscope_files import fei_tiff

BAR_ROWS = 10


def with_bar(pixels: np.ndarray) -> np.ndarray:
    bar = np.zeros((BAR_ROWS, pixels.shape[1]), np.uint8)
    bar[3:6, 4:20] = 255  # its text
    return np.concatenate([pixels, bar])


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Support at 10 nm per pixel: an FEI TIFF with a data bar and a 16-bit Gatan DM3 calibrated in µm (DM
    images carry no bar); queries at 20 nm (half the magnification), FEI TIFFs with a data bar."""
    support, query = tmp_path / "support", tmp_path / "query"
    for kind in ("horizontal", "vertical"):
        (support / kind).mkdir(parents=True)
    (support / "horizontal" / "horizontal.tif").write_bytes(
        fei_tiff(with_bar(texture("horizontal", 0, 48)), 10e-9, BAR_ROWS))
    (support / "vertical" / "vertical.dm3").write_bytes(
        dm_file(texture("vertical", 0, 48).astype(np.uint16) * 257, 0.01, "µm"))
    query.mkdir()
    for kind in ("horizontal", "vertical"):
        (query / f"{kind}.tif").write_bytes(fei_tiff(with_bar(texture(kind, 1, 32)), 20e-9, BAR_ROWS))
    return support, query


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return {row["file"]: row for row in csv.DictReader(stream)}


def test_microscope_files_are_brought_to_one_scale_and_their_bar_cut(registered_protonet, folders, tmp_path,
                                                                      capsys):
    support, query = folders
    out = tmp_path / "predictions.csv"
    assert cli.main(["classify", "--model", registered_protonet, "--support", str(support), "--query", str(query),
                     "--out", str(out)]) == 0
    rows = read_rows(out)
    assert {row["pixel_size_nm"] for row in rows.values()} == {"10"}  # the support's median: 20 nm queries doubled
    printed = capsys.readouterr()
    assert "physical scale: every image resampled to 10 nm per pixel" in printed.err
    assert f"data bar of {BAR_ROWS}-{BAR_ROWS} rows, measured by the files' metadata, cut from 3 of 4" in printed.out


def test_some_files_without_a_pixel_size_fall_back_and_say_which(registered_protonet, folders, tmp_path, capsys):
    support, query = folders
    Image.fromarray(texture("vertical", 2)).save(query / "plain.png")
    result = classify(registered_protonet, support, query, tmp_path / "p.csv")
    assert "pixel size known for 4 of 5 images only" in result.physical_scale
    assert "plain.png" in capsys.readouterr().err
    rows = read_rows(tmp_path / "p.csv")
    assert rows["plain.png"]["pixel_size_nm"] == ""
    assert rows["horizontal.tif"]["pixel_size_nm"] == "20"  # its own, unscaled
    halved = classify(registered_protonet, support, query, tmp_path / "q.csv", ClassifySettings(query_scale=2.0))
    assert {p.file: p.pixel_size_nm for p in halved.predictions}["horizontal.tif"] == pytest.approx(10.0)


def test_query_scale_is_refused_when_every_file_has_its_pixel_size(registered_protonet, folders, tmp_path):
    support, query = folders
    with pytest.raises(ConfigError, match="--query-scale 0.5: every image has its pixel size"):
        classify(registered_protonet, support, query, tmp_path / "p.csv", ClassifySettings(query_scale=0.5))
    assert not (tmp_path / "p.csv").exists()


def test_a_query_with_garbled_metadata_is_an_error_naming_it(registered_protonet, folders, tmp_path):
    support, query = folders
    (query / "broken.tif").write_bytes(fei_tiff(texture("vertical", 3), 1e-8, metadata="[Scan]\r\nPixelWidth=?\r\n"))
    with pytest.raises(DataError, match=r"broken\.tif: carries FEI/Thermo metadata"):
        classify(registered_protonet, support, query, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
