"""`metallo classify`: a registered ProtoNet classifies query micrographs against support folders; the
tiling policy; and every bad input ends in one clear error with nothing written to --out."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metallo_core import cli, tracking
from metallo_core.commands.classify_app import ClassifySettings, classify
from metallo_core.errors import ConfigError, DataError, TrackingError
from metallo_core.fewshot.tiles import _tile_starts, image_tiles
from tests.fewshot.conftest import CLASSIFY_SPEC

SPEC = CLASSIFY_SPEC


def texture(kind: str, seed: int, size: int = 40) -> np.ndarray:
    """Distinct 8-bit grey textures: horizontal stripes, vertical stripes, or speckle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    if kind == "horizontal":
        pixels = 127 + 120 * np.sin(y * 1.3 + rng.uniform(0, 6))
    elif kind == "vertical":
        pixels = 127 + 120 * np.sin(x * 0.7 + rng.uniform(0, 6))
    else:
        pixels = rng.integers(0, 256, (size, size))
    return pixels.astype(np.uint8)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    support, query = tmp_path / "support", tmp_path / "query"
    for kind in ("horizontal", "vertical", "speckle"):
        (support / kind).mkdir(parents=True)
        Image.fromarray(texture(kind, 0)).save(support / kind / f"{kind}-0.png")
    # A 16-bit grey TIFF as the speckle class's support image, as microscopes write them.
    Image.fromarray(texture("speckle", 0).astype(np.uint16) * 257).save(support / "speckle" / "speckle-0.tif")
    (support / "speckle" / "speckle-0.png").unlink()
    (query / "more").mkdir(parents=True)
    for kind in ("horizontal", "vertical"):  # exact copies of support images
        shutil.copy(support / kind / f"{kind}-0.png", query / f"copy-{kind}.png")
    Image.fromarray(texture("vertical", 5, size=64)).convert("RGB").save(query / "more" / "new-vertical.jpg",
                                                                         quality=95)
    (query / "notes.txt").write_text("not an image, ignored")
    return support, query


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_classify_writes_one_row_per_query_with_probabilities_and_nearest_support(registered_protonet, folders,
                                                                                   tmp_path):
    support, query = folders
    out = tmp_path / "out" / "predictions.csv"
    assert cli.main(["classify", "--model", registered_protonet, "--support", str(support), "--query", str(query),
                     "--out", str(out)]) == 0
    rows = {row["file"]: row for row in read_csv(out)}
    assert set(rows) == {"copy-horizontal.png", "copy-vertical.png", "more/new-vertical.jpg"}
    assert list(read_csv(out)[0]) == ["file", "predicted", "p_horizontal", "p_speckle", "p_vertical",
                                      "nearest_support", "tiles", "tile_votes", "unknown", "pixel_size_nm"]
    for kind in ("horizontal", "vertical"):
        # One shot per class: the prototype is that image, so its exact copy is nearest and of its class.
        row = rows[f"copy-{kind}.png"]
        assert row["predicted"] == kind and row["nearest_support"] == f"{kind}/{kind}-0.png"
        assert row["p_" + kind] == max(row["p_horizontal"], row["p_speckle"], row["p_vertical"])
    for row in rows.values():
        assert sum(float(row[f"p_{k}"]) for k in ("horizontal", "speckle", "vertical")) == pytest.approx(1, abs=1e-4)
        assert row["tiles"] == "1" and row["tile_votes"] == f"{row['predicted']}:1"
        assert row["pixel_size_nm"] == ""  # plain images: no pixel size
        assert row["unknown"] == ""  # not checked without --unknown: neither true nor false


def test_unknown_flags_images_that_resemble_no_support_class(registered_protonet, folders, tmp_path, capsys):
    """--unknown: the CSV's unknown column says true/false per image, the summary counts them apart from the
    classes, and the margin used is recorded with the result. A copy of a support image is that class's
    prototype (1 shot: cosine 1) and is kept at margin 0; at the largest margin every image is flagged."""
    support, query = folders
    out = tmp_path / "open.csv"
    assert cli.main(["classify", "--model", registered_protonet, "--support", str(support), "--query", str(query),
                     "--out", str(out), "--unknown", "--unknown-margin", "0", "--inference", "plain",
                     "--precision", "fp32"]) == 0
    rows = {row["file"]: row for row in read_csv(out)}
    assert rows["copy-horizontal.png"]["unknown"] == rows["copy-vertical.png"]["unknown"] == "false"
    assert rows["more/new-vertical.jpg"]["unknown"] in ("true", "false")
    flagged = sum(row["unknown"] == "true" for row in rows.values())
    assert f"; unknown: {flagged})" in capsys.readouterr().out

    every = classify(registered_protonet, support, query, tmp_path / "all.csv",
                     ClassifySettings(unknown=True, unknown_margin=2.0, tile=16))
    assert all(p.unknown for p in every.predictions) and {row["unknown"] for row in read_csv(tmp_path / "all.csv")} \
        == {"true"}
    assert every.open_set is not None and every.open_set["margin"] == 2.0
    assert set(every.open_set["separation"]) == {"horizontal", "speckle", "vertical"}
    with pytest.raises(ConfigError, match="--unknown-margin needs --unknown"):
        classify(registered_protonet, support, query, None, ClassifySettings(unknown_margin=0.1))


def test_one_query_image_tiles_and_finetuning(registered_protonet, folders, tmp_path):
    support, query = folders
    big = tmp_path / "big.png"
    Image.fromarray(texture("horizontal", 3, size=100)[:60]).save(big)  # 100 x 60 pixels
    settings = ClassifySettings(tile=32, finetune=True, steps=3, lr=1e-3)
    result = classify(registered_protonet, support, big, tmp_path / "p.csv", settings)
    (prediction,) = result.predictions
    assert prediction.file == "big.png" and prediction.tiles == 6  # 3 columns x 2 rows of 32-px tiles
    assert sum(prediction.tile_votes.values()) == 6 and result.finetuned
    assert result.shots == {"horizontal": 1, "speckle": 1, "vertical": 1}

    # Fine-tuning ran: the same query scored by the same model without it gets other probabilities,
    # while two runs without it agree exactly (so the difference is the adapted backbone, not noise).
    plain = [classify(registered_protonet, support, big, tmp_path / f"plain{i}.csv", ClassifySettings(tile=32))
             for i in range(2)]
    assert not plain[0].finetuned and plain[0].finetune_settings is None
    assert plain[0].predictions[0].probabilities == plain[1].predictions[0].probabilities
    change = max(abs(prediction.probabilities[name] - plain[0].predictions[0].probabilities[name])
                 for name in result.classes)
    assert change > 1e-3, (prediction.probabilities, plain[0].predictions[0].probabilities)


def test_tiling_policy():
    pixels = np.zeros((60, 100, 3), np.uint8)
    assert image_tiles(pixels, 16, tile=0).shape == (1, 16, 16, 3)
    assert image_tiles(pixels, 16, tile=32).shape == (6, 16, 16, 3)
    assert image_tiles(pixels, 16, tile=32, scale=0.5).shape == (1, 16, 16, 3)  # 50 x 30: smaller than a tile
    assert _tile_starts(100, 32) == [0, 34, 68]  # a 4-px remainder is dropped, tiles spread over the width
    assert _tile_starts(60, 32) == [0, 28]  # a 28-px remainder earns a (slightly overlapping) tile


@pytest.mark.parametrize("breakage, message", [
    ("empty_class", "class 'vertical' .* has no images"),
    ("one_class", "has 1 class folder"),
    ("corrupt_support", "vertical-0.png: not a readable image"),
    ("corrupt_query", "copy-vertical.png: not a readable image"),
    ("missing_query", "does not exist"),
])
def test_bad_inputs_are_named_and_nothing_is_written(breakage, message, registered_protonet, folders, tmp_path, capsys):
    support, query = folders
    if breakage == "empty_class":
        (support / "vertical" / "vertical-0.png").unlink()
    elif breakage == "one_class":
        shutil.rmtree(support / "vertical")
        shutil.rmtree(support / "speckle")
    elif breakage == "corrupt_support":
        (support / "vertical" / "vertical-0.png").write_bytes(b"\x89PNG truncated")
    elif breakage == "corrupt_query":
        (query / "copy-vertical.png").write_text("text with an image's name")
    elif breakage == "missing_query":
        query = query / "nowhere"
    out = tmp_path / "predictions.csv"
    with pytest.raises(DataError, match=message):
        classify(registered_protonet, support, query, out)
    assert cli.main(["classify", "--model", registered_protonet, "--support", str(support), "--query", str(query),
                     "--out", str(out)]) == 2
    assert "metallo: error:" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".predictions.csv.*"))


def test_unknown_alias_and_unreachable_server_are_clear_errors(registered_protonet, folders, tmp_path, monkeypatch):
    support, query = folders
    out = tmp_path / "predictions.csv"
    with pytest.raises(TrackingError, match="has no alias 'nope'; its aliases: @current -> v1"):
        classify("models:/metallo-protonet@nope", support, query, out)
    with pytest.raises(TrackingError, match="no registered model 'missing'"):
        classify("models:/missing@current", support, query, out)
    monkeypatch.setenv(tracking.ENV_TRACKING_URI, "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(TrackingError, match="cannot be reached"):
        classify(registered_protonet, support, query, out)
    assert not out.exists()
