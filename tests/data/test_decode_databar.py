"""Cropping a burned-in SEM data bar (metallo_core/data/crop.py): the spelling, the automatic detection (which
refuses to guess when unsure), and its effect in `classify` and `data ingest`: a bar present only in one
class's support images no longer flips queries once cropped."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metallo_core import cli
from metallo_core.commands.classify_app import ClassifySettings, classify
from metallo_core.data.crop import EdgeCrop, detect_data_bar
from metallo_core.data.ingest import IngestOptions, ingest
from metallo_core.data.shards import read_split_table
from metallo_core.errors import ConfigError, DataError
from metallo_core.models.backbones import BackboneSpec
from tests.fewshot_fixtures import register_untrained_protonet

BAR_ROWS = 24


def speckle(mean: float, seed: int, height: int = 128, width: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(mean + rng.normal(0, 25, (height, width)), 0, 255).astype(np.uint8)


def with_bar(pixels: np.ndarray, rows: int = BAR_ROWS) -> np.ndarray:
    """A black SEM data bar with white text and a scale bar across the bottom `rows` rows."""
    image = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(image)
    height, width = pixels.shape[:2]
    draw.rectangle([0, height - rows, width, height], fill=(0, 0, 0))
    draw.text((4, height - rows + 4), "20 kV  x5000", fill=(255, 255, 255))
    draw.rectangle([width - 40, height - 8, width - 8, height - 6], fill=(255, 255, 255))
    return np.asarray(image)


def test_detection_finds_a_bar_finds_none_and_refuses_to_guess():
    found = detect_data_bar(with_bar(speckle(120, 0)))
    assert found.status == "bar" and found.rows == BAR_ROWS
    assert detect_data_bar(speckle(120, 1)).status == "none"
    # A dark image whose own pixels share the bottom band's black: a bar, or just a dark region? Unsure.
    dark = speckle(120, 2)
    dark[::3] = 0
    dark[-20:] = 0
    assert detect_data_bar(dark).status == "unsure"
    with pytest.raises(DataError, match=r"dark\.png: --crop auto cannot tell .* --crop bottom=64"):
        EdgeCrop.parse("auto").apply(dark, "dark.png")


@pytest.mark.parametrize("text, cut", [
    ("bottom=24", (0, 24, 0, 0)),
    ("bottom=0.25,left=8", (0, 32, 8, 0)),
    ("TOP=0.5 , right=1", (64, 0, 0, 1)),
    ("none", (0, 0, 0, 0)),
])
def test_crop_spelling_and_edges(text, cut):
    crop = EdgeCrop.parse(text)
    assert tuple(crop.edges_in_pixels(128, 128).values()) == cut
    cropped, _ = crop.apply(np.zeros((128, 128, 3), np.uint8), "x.png")
    assert cropped.shape == (128 - cut[0] - cut[1], 128 - cut[2] - cut[3], 3)
    assert EdgeCrop.from_dict(crop.to_dict()) == crop


@pytest.mark.parametrize("text, message", [
    ("bottom=1.5", "fraction below 1 or a whole number"),
    ("middle=3", "expected auto, none, or edge=value"),
    ("auto,bottom=3", "drop bottom=... or drop auto"),
    ("top=0.6,bottom=0.5", "leave nothing"),
])
def test_bad_crop_settings_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        EdgeCrop.parse(text)


def test_crop_leaving_too_little_is_an_error_naming_the_file():
    with pytest.raises(DataError, match=r"small\.png: crop bottom=30 would leave less than 8 pixels"):
        EdgeCrop.parse("bottom=30").apply(np.zeros((32, 32), np.uint8), "small.png")


def test_classify_crop_removes_the_influence_of_a_bar_in_one_class_support(tmp_path, capsys):
    """Only the 'bright' support image has a data bar; every query has one (same microscope). Uncropped, the
    bar pulls the 'dark' queries to 'bright'; cropped (by pixels or found automatically), none flips."""
    model = register_untrained_protonet(BackboneSpec(arch="resnet18", small_input=True, image_size=16))
    support, query = tmp_path / "support", tmp_path / "query"
    means = {"bright": 150, "dark": 100}
    for name in means:
        (support / name).mkdir(parents=True)
    Image.fromarray(with_bar(speckle(means["bright"], 0))).save(support / "bright" / "s.png")
    Image.fromarray(speckle(means["dark"], 1)).save(support / "dark" / "s.png")
    query.mkdir()
    for index in range(3):
        for name, mean in means.items():
            Image.fromarray(with_bar(speckle(mean, 10 + index))).save(query / f"{name}-{index}.png")

    def wrong(crop: str) -> int:
        result = classify(model, support, query, None, ClassifySettings(crop=EdgeCrop.parse(crop)))
        return sum(not p.file.startswith(p.predicted) for p in result.predictions)

    assert wrong("none") >= 2  # the bar flips queries
    assert wrong(f"bottom={BAR_ROWS}") == 0
    assert wrong("auto") == 0
    assert cli.main(["classify", "--model", model, "--support", str(support), "--query", str(query),
                     "--out", str(tmp_path / "p.csv"), "--crop", "auto", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["crop"] == f"auto (bar of {BAR_ROWS}-{BAR_ROWS} rows cut from 7 of 8 images)"


def test_ingest_crop_is_applied_and_recorded(tmp_path, capsys):
    src = tmp_path / "src"
    for name, mean in (("a", 150), ("b", 100)):
        (src / name).mkdir(parents=True)
        Image.fromarray(with_bar(speckle(mean, 3))).save(src / name / "bar.png")
        Image.fromarray(speckle(mean, 4)).save(src / name / "plain.png")
    manifest = ingest("imagefolder", str(src), str(tmp_path / "ds"), IngestOptions(crop=EdgeCrop.parse("auto")))
    assert manifest.source["crop"] == "auto"
    assert manifest.source["crop_auto_bars"] == {"images": 4, "with_bar": 2, "rows_min": BAR_ROWS,
                                                 "rows_max": BAR_ROWS}
    table = read_split_table(str(tmp_path / "ds"), "train", ["source", "height"])
    heights = dict(zip(table.column("source").to_pylist(), table.column("height").to_pylist()))
    assert heights == {"a/bar.png": 128 - BAR_ROWS, "a/plain.png": 128, "b/bar.png": 128 - BAR_ROWS,
                       "b/plain.png": 128}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["data", "info", str(tmp_path / "ds")]) == 0
    assert f"crop      auto (data bar found in 2 of 4 images, {BAR_ROWS}-{BAR_ROWS} rows)" in capsys.readouterr().out
