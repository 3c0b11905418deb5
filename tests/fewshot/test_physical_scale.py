"""The physical-scale rule (metallo_core/fewshot/physical_scale.py): one common pixel size, the support's
median bounded so nothing is enlarged more than MAX_UPSAMPLE times, and no rescaling unless every image
has a pixel size."""

from __future__ import annotations

import numpy as np
import pytest

from metallo_core.fewshot.physical_scale import MAX_UPSAMPLE, plan_physical_scale
from metallo_core.fewshot.tiles import image_tiles


def test_every_image_is_brought_to_the_supports_median_pixel_size():
    plan = plan_physical_scale([10e-9, 20e-9, 30e-9], [40e-9, 10e-9])
    assert plan.target_m == pytest.approx(20e-9)
    assert plan.support_factors == pytest.approx([0.5, 1.0, 1.5])
    assert plan.query_factors == pytest.approx([2.0, 0.5])
    assert "20 nm per pixel" in plan.description


def test_the_target_is_raised_so_no_image_is_enlarged_more_than_the_bound():
    plan = plan_physical_scale([10e-9, 10e-9], [100e-9])  # a query at a tenth of the support's magnification
    assert plan.target_m == pytest.approx(100e-9 / MAX_UPSAMPLE)
    assert max(plan.support_factors + plan.query_factors) == pytest.approx(MAX_UPSAMPLE)
    assert plan.support_factors == pytest.approx([0.2, 0.2])
    assert "enlarged at most 2x" in plan.description


def test_no_rescaling_when_some_images_lack_a_pixel_size_and_it_says_which():
    plan = plan_physical_scale([10e-9, None], [20e-9], query_names=["q.tif"], support_names=["a.tif", "b.png"])
    assert plan.target_m is None
    assert plan.support_factors == [1.0, 1.0] and plan.query_factors == [1.0]
    assert "2 of 3" in plan.description and "b.png" in plan.description and "a.tif" not in plan.description


def test_no_rescaling_when_no_image_has_a_pixel_size():
    plan = plan_physical_scale([None, None], [None])
    assert plan.target_m is None and plan.query_factors == [1.0]
    assert plan.description == "no image has a pixel size"


@pytest.mark.parametrize("sizes", [[0.0], [-1e-9]])
def test_a_non_positive_pixel_size_is_refused(sizes):
    with pytest.raises(ValueError, match="positive"):
        plan_physical_scale(sizes, [])


def stripes(period_px: float, size: int) -> np.ndarray:
    x = np.arange(size)
    row = 127 + 120 * np.sin(2 * np.pi * x / period_px)
    return np.repeat(np.repeat(row[None, :, None], size, axis=0), 3, axis=2).astype(np.uint8)


def dominant_period(tile: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(tile[..., 0].astype(float).mean(axis=0) - tile[..., 0].mean()))
    return tile.shape[1] / int(spectrum.argmax())


def test_one_texture_at_two_magnifications_gives_the_same_tiles_once_planned():
    """A structure 160 nm apart imaged at 10 nm per pixel (16 px period) and at 20 nm per pixel (8 px)."""
    plan = plan_physical_scale([10e-9], [20e-9])
    support_tile = image_tiles(stripes(16, 256), 64, 64, plan.support_factors[0])[0]
    query_tile = image_tiles(stripes(8, 128), 64, 64, plan.query_factors[0])[0]
    assert dominant_period(support_tile) == pytest.approx(16, rel=0.05)
    assert dominant_period(query_tile) == pytest.approx(dominant_period(support_tile), rel=0.05)
    assert dominant_period(image_tiles(stripes(8, 128), 64, 64)[0]) == pytest.approx(8, rel=0.05)  # unplanned
