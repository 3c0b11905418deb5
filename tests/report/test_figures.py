"""The matplotlib figures: what each chart plots (series, points, error bars, cell colours, labels), the SVG
the report inlines (well-formed, escaped, self-contained, ids apart), and figures logged to an MLflow run."""

import math
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from PIL import Image

from metallo_core import tracking
from metallo_core.fewshot.confusion import Confusion
from metallo_core.report.figures import (
    Line,
    ShotSeries,
    accuracy_vs_shots,
    confusion_heatmap,
    line_chart,
    one_per_step,
    svg_text,
    thin,
    training_curves_figure,
)
from metallo_core.tracking.figures import log_figures

SVG = "{http://www.w3.org/2000/svg}"
CLASSES = ["ferrite", "pearlite & co", "a" * 40]


def parse(svg: str | bytes) -> ElementTree.Element:
    return ElementTree.fromstring(svg)  # raises on anything malformed, e.g. an unescaped '<' or '&'


def svg_texts(svg: str) -> list[str]:
    return [element.text for element in parse(svg).iter(f"{SVG}text") if element.text]


def errorbars(axes) -> list[ErrorbarContainer]:
    return [container for container in axes.containers if isinstance(container, ErrorbarContainer)]


def bar_extents(container: ErrorbarContainer) -> np.ndarray:
    """(bars, 3): x, low and high of every drawn error bar of one series (a NaN half-width draws none)."""
    (bars,) = container.lines[2]
    extents = np.array([(segment[0][0], segment[0][1], segment[1][1]) for segment in bars.get_segments()
                        if len(segment) == 2]).reshape(-1, 3)
    return extents[np.isfinite(extents).all(axis=1)]


def tiny_confusion() -> Confusion:
    """ferrite and pearlite met in every task; the long-named class met ferrite never, pearlite sometimes."""
    counts = np.array([[18, 2, 0], [0, 20, 1], [0, 5, 15]])
    opportunities = np.array([[20, 20, 0], [20, 20, 20], [0, 20, 20]])
    return Confusion(CLASSES, counts, opportunities, tasks=10)


def test_thin_keeps_the_last_point_and_bounds_the_count():
    points = [(step, float(step)) for step in range(10_001)]
    kept = thin(points, limit=500)
    assert len(kept) <= 502 and kept[0] == (0, 0.0) and kept[-1] == (10_000, 10_000.0)
    assert thin(points[:10], limit=500) == points[:10]


def test_one_per_step_averages_values_logged_at_the_same_step():
    assert one_per_step([(20, 1.0), (10, 4.0), (20, 3.0)]) == [(10, 4.0), (20, 2.0)]


def test_line_chart_plots_every_series_with_its_points_error_bars_and_escaped_labels():
    lines = [
        Line("PN <b>&", x=[5, 1], y=[80.0, 65.36], error=[1.0, 1.23]),  # unsorted: drawn in x order
        Line("PN+FT", x=[1, 5], y=[90.72, 93.0], error=[1.01, math.nan], dashed=True),  # NaN: no bar at 5
        Line("plain", x=[1, 3, 5], y=[50.0, math.nan, 55.0]),  # NaN points are left out
    ]
    figure = line_chart(lines, title="tiny & test", x_label="shots per class", y_label="accuracy (%)",
                        x_ticks=[1, 5], y_limits=(0, 100))
    (axes,) = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title(loc="left")) == (
        "shots per class", "accuracy (%)", "tiny & test")
    assert list(axes.get_xticks()) == [1, 5]
    low, high = axes.get_ylim()
    assert 0 <= low <= 50 and 93 + 1.01 <= high <= 100
    first, second = errorbars(axes)
    assert list(first.lines[0].get_xdata()) == [1, 5] and list(first.lines[0].get_ydata()) == [65.36, 80.0]
    np.testing.assert_allclose(bar_extents(first), [(1, 65.36 - 1.23, 65.36 + 1.23), (5, 79.0, 81.0)])
    np.testing.assert_allclose(bar_extents(second), [(1, 90.72 - 1.01, 90.72 + 1.01)])
    assert second.lines[0].get_linestyle() == "--" and second.lines[0].get_markerfacecolor() == "#ffffff"
    plain = [line for line in axes.get_lines() if line.get_label() == "plain"]
    assert len(plain) == 1 and list(plain[0].get_xdata()) == [1, 5]
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["PN <b>&", "PN+FT", "plain"]

    svg = svg_text(figure)
    texts = svg_texts(svg)
    assert "PN <b>&" in texts and "tiny & test" in texts and "accuracy (%)" in texts  # parsed back: escaped
    assert "&lt;b&gt;&amp;" in svg and "<b>" not in svg
    assert {"1", "5"} <= set(texts)  # ticks at exactly the given values


def test_line_chart_without_points_says_so():
    figure = line_chart([Line("empty", x=[], y=[]), Line("nan", x=[1], y=[math.nan])], title="t", x_label="x",
                        y_label="y")
    assert not figure.axes[0].get_lines() and "no data" in svg_texts(svg_text(figure))


def test_accuracy_vs_shots_draws_percent_with_intervals_and_keeps_series_apart():
    series = [
        ShotSeries("PN", {1: (0.6536, 0.0123), 5: (0.8, 0.01)}, color="C0"),
        ShotSeries("PN+FT", {1: (0.9072, 0.0101), 5: (0.995, 0.02)}, color="C0", dashed=True),
    ]
    figure = accuracy_vs_shots(series, title="MEM-25, 5-way")
    (axes,) = figure.axes
    assert axes.get_xlabel() == "shots per class" and axes.get_ylabel() == "accuracy (%)"
    assert list(axes.get_xticks()) == [1, 5] and axes.get_ylim()[1] <= 100  # 99.5 + 2 is cut at 100
    protonet, finetuned = errorbars(axes)
    assert list(protonet.lines[0].get_ydata()) == pytest.approx([65.36, 80.0])
    extents = bar_extents(protonet)
    np.testing.assert_allclose(extents[:, 2] - extents[:, 1], [2.46, 2.0])
    # the two series sit symmetrically either side of each shot, close to it
    for (x_pn, x_ft), shot in zip(zip(protonet.lines[0].get_xdata(), finetuned.lines[0].get_xdata()), [1, 5]):
        assert x_pn < shot < x_ft and x_pn + x_ft == pytest.approx(2 * shot) and x_ft - shot < 0.1
    assert finetuned.lines[0].get_linestyle() == "--"


def test_training_curves_have_one_panel_per_metric_with_accuracy_in_percent():
    history = {
        "train_loss": [(0, 1.5), (10, 1.3), (10, 1.1), (20, 0.8)],  # two values at step 10: averaged
        "val_accuracy": [(10, 0.52), (20, 0.61)],
        "val_ci95": [(10, 0.03), (20, 0.02)],
    }
    figure = training_curves_figure(history, title="protonet-test", intervals={"val_accuracy": "val_ci95"})
    loss, accuracy = figure.axes
    assert (loss.get_ylabel(), accuracy.get_ylabel()) == ("train_loss", "val_accuracy (%)")
    assert loss.get_xlabel() == "training step" and figure.get_suptitle() == "protonet-test"
    (loss_line,) = loss.get_lines()
    assert list(loss_line.get_ydata()) == pytest.approx([1.5, 1.2, 0.8])
    (bars,) = errorbars(accuracy)
    assert list(bars.lines[0].get_ydata()) == pytest.approx([52.0, 61.0])
    np.testing.assert_allclose(bar_extents(bars), [(10, 49.0, 55.0), (20, 59.0, 63.0)])
    assert len(training_curves_figure(history, metrics=["val_ci95"]).axes) == 1
    with pytest.raises(KeyError, match="knn_accuracy"):
        training_curves_figure(history, metrics=["knn_accuracy"])


def test_confusion_heatmap_colours_right_answers_green_confusions_red_and_unmet_pairs_grey():
    figure = confusion_heatmap(tiny_confusion(), title="PN, 5w1s")
    (axes,) = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted", "true")
    names = ["ferrite", "pearlite & co", "a" * 21 + "…"]  # long names shortened
    assert [label.get_text() for label in axes.get_xticklabels()] == names
    assert [label.get_text() for label in axes.get_yticklabels()] == names
    # the percentages written in the cells: confusions that happened and the diagonal, not zero confusions
    cells = {(round(text.get_position()[1] - 0.5), round(text.get_position()[0] - 0.5)): text.get_text()
             for text in axes.texts}
    assert cells == {(0, 0): "90%", (0, 1): "10%", (1, 1): "100%", (1, 2): "5%", (2, 1): "25%", (2, 2): "75%"}

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)

    def colour(row: int, column: int) -> tuple[int, int, int]:
        # a point inside the cell, off its centred percentage text
        x, y = axes.transData.transform((column + 0.2, row + 0.2))
        return tuple(pixels[pixels.shape[0] - int(round(y)), int(round(x))])

    red, green, blue = colour(1, 1)
    assert green > red + 30 and green > blue + 30  # a right answer (100%: the darkest green)
    red, green, blue = colour(2, 1)
    assert red > green + 60 and red > blue + 60  # a confusion
    assert colour(0, 2) == colour(2, 0) == (0xEE, 0xEE, 0xEE)  # never shared a task
    assert min(colour(1, 0)) > 230  # met, never confused: near white

    svg = svg_text(figure)
    texts = svg_texts(svg)
    assert "pearlite & co" in texts and "a" * 21 + "…" in texts and "PN, 5w1s" in texts
    assert "pearlite &amp; co" in svg


def test_svg_is_one_self_contained_element_with_ids_apart_per_salt():
    figure = accuracy_vs_shots([ShotSeries("PN", {1: (0.5, 0.1), 5: (0.7, 0.1)})], title="t")
    first, second = svg_text(figure, salt="first"), svg_text(figure, salt="second")
    assert first.startswith("<svg") and first.endswith("</svg>") and first.count("<svg") == 1
    assert set(re.findall(r"https?://[^\"' <]*", first)) == {"http://www.w3.org/2000/svg"}
    assert "url(" not in first and "xlink" not in first and "<script" not in first
    ids = set(re.findall(r'id="([^"]+)"', first))
    hashed = {name for name in ids if re.fullmatch(r"[mp][0-9a-f]{10}", name)}  # markers and clip paths
    assert hashed and not hashed & set(re.findall(r'id="([^"]+)"', second))
    assert svg_text(figure, salt="first") == first  # deterministic: the report diffs cleanly


def test_logged_figures_are_run_artifacts(isolated_tracking):
    with tracking.start_run("unit", "figures") as run:
        log_figures(run.run_id, {"confusion/protonet.png": confusion_heatmap(tiny_confusion(), title="t"),
                                 "curves.svg": training_curves_figure({"loss": [(0, 2.0), (1, 1.0)]})})
    client = tracking.client()
    assert [item.path for item in client.list_artifacts(run.run_id, "confusion")] == ["confusion/protonet.png"]
    png = client.download_artifacts(run.run_id, "confusion/protonet.png")
    image = Image.open(png)
    assert image.format == "PNG" and min(image.size) > 300
    svg = parse(Path(client.download_artifacts(run.run_id, "curves.svg")).read_bytes())
    assert svg.tag == f"{SVG}svg" and len(list(svg.iter(f"{SVG}path"))) > 10
    log_figures(None, {"ignored.png": confusion_heatmap(tiny_confusion(), title="t")})  # rank != 0: no-op


def test_the_grid_chart_gives_each_model_one_colour_and_dashes_the_fine_tuned_rows():
    from metallo_core.fewshot.grid import GridRow
    from metallo_core.train.grid import results_figure

    rows = [GridRow("ResNet18", "-", "synthetic", "ProtoNet (PN)", {1: (0.65, 0.01), 5: (0.8, 0.01)}),
            GridRow("ResNet18", "-", "synthetic", "PN+FT", {1: (0.9, 0.01)}),
            GridRow("ResNet50", "DINO", "synthetic", "ProtoNet (PN)", {1: (0.7, 0.01), 5: (0.85, 0.01)})]
    (axes,) = results_figure(rows, 5, "MEM-25").axes
    lines = [container.lines[0] for container in errorbars(axes)]
    assert [len(line.get_xdata()) for line in lines] == [2, 1, 2]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-"]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    assert axes.get_title(loc="left") == "MEM-25, 5-way"
