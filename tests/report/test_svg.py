"""Inline SVG plots: well-formed XML, axes that cover the data, escaped labels, error bars and heatmap colours."""

import math
import xml.etree.ElementTree as ElementTree

import pytest

from metallo_core.report.svg import Series, heatmap, line_chart, nice_axis, number, thin

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ElementTree.Element:
    return ElementTree.fromstring(svg)  # raises on anything malformed, e.g. an unescaped '<' or '&'


def test_nice_axis_covers_the_range_with_round_steps():
    axis = nice_axis(61.3, 93.8)
    assert axis.low <= 61.3 and axis.high >= 93.8
    steps = {round(b - a, 9) for a, b in zip(axis.ticks, axis.ticks[1:])}
    assert steps == {10.0} and axis.ticks == (60, 70, 80, 90, 100)
    assert nice_axis(0.012, 0.094).ticks == (0, 0.02, 0.04, 0.06, 0.08, 0.1)
    flat = nice_axis(0.5, 0.5)  # a single value still gets a range around it
    assert flat.low < 0.5 < flat.high
    assert nice_axis(math.nan, 3).ticks[0] == 0


def test_thin_keeps_the_last_point_and_bounds_the_count():
    points = [(step, float(step)) for step in range(10_001)]
    kept = thin(points, limit=500)
    assert len(kept) <= 502 and kept[0] == (0, 0.0) and kept[-1] == (10_000, 10_000.0)
    assert thin(points[:10], limit=500) == points[:10]


def test_line_chart_draws_lines_error_bars_and_an_escaped_legend():
    series = [
        Series("PN <b>&", [(1, 65.36, 1.23), (5, 80.0, 1.0)]),
        Series("PN+FT", [(1, 90.72, 1.01), (5, 93.0, 0.5)], dashed=True),
    ]
    svg = line_chart(series, title="tiny & test", x_label="shots per class", y_label="accuracy (%)",
                     x_ticks=[1, 5], y_bounds=(0, 100))
    root = parse(svg)
    assert len(root.findall(f"{SVG}polyline")) == 2
    assert root.findall(f"{SVG}polyline")[1].get("stroke-dasharray")
    assert len(root.findall(f"{SVG}path")) == 4  # one error bar per point
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert "PN <b>&" in texts and "tiny & test" in texts  # parsed back: escaped in the source
    assert "&lt;b&gt;&amp;" in svg and "<b>" not in svg
    assert {"1", "5"} <= set(texts)  # ticks at exactly the shot counts
    tips = [element.text for element in root.iter(f"{SVG}title")]
    assert "PN+FT: 1, 90.72 ± 1.01" in tips


def test_line_chart_without_points_says_so():
    root = parse(line_chart([Series("empty", [])], title="t", x_label="x", y_label="y"))
    assert "no data" in [element.text for element in root.iter(f"{SVG}text")]


def test_heatmap_colours_right_answers_green_confusions_red_and_unmet_pairs_grey():
    values = [[0.9, 0.1, math.nan], [0.0, 1.0, 0.2], [math.nan, 0.25, 0.75]]
    texts = [["90%", "10%", ""], ["", "100%", "20%"], ["", "25%", "75%"]]
    tips = [[f"cell {r}{c}" for c in range(3)] for r in range(3)]
    svg = heatmap(["ferrite", "pearlite & co", "a" * 40], values, texts, tips, title="confusion")
    root = parse(svg)
    cells = [rect for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None]
    assert len(cells) == 9
    fills = {rect.find(f"{SVG}title").text: rect.get("fill") for rect in cells}
    green, red = fills["cell 11"], fills["cell 12"]
    assert int(green[3:5], 16) > int(green[1:3], 16)  # green channel dominates on the diagonal
    assert int(red[1:3], 16) > int(red[3:5], 16)
    assert fills["cell 02"] == "#eeeeee" and fills["cell 10"] == "#ffffff"
    labels = [element[0].tail for element in root.iter(f"{SVG}text") if len(element)]  # after the tooltip
    assert labels.count("pearlite & co") == 2  # row and column
    assert "a" * 21 + "…" in labels  # long names shortened, full name kept in the tooltip
    assert "a" * 40 in [element.text for element in root.iter(f"{SVG}title")]


@pytest.mark.parametrize("value, text", [(5.0, "5"), (0.25, "0.25"), (12000.0, "12000"), (1 / 3, "0.3333")])
def test_tick_numbers(value, text):
    assert number(value) == text
