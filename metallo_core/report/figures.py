"""Every chart metallo draws, on matplotlib: learning curves, accuracy against shots, confusion heatmaps.

Pure functions, numbers in and a `matplotlib.figure.Figure` out. Figures are built without pyplot, so
no global figure registry fills up and no backend is chosen for the caller: saving to PNG goes through
Agg, `svg_text` renders the SVG that the report inlines, and the same Figure objects are logged to the
MLflow runs that produce them (`metallo_core.tracking.figures.log_figures`).
"""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from metallo_core.fewshot.confusion import Confusion

MARKER_LIMIT = 40  # above this many points a line is drawn without markers
DODGE = 0.012  # sideways step between series on the accuracy-vs-shots chart, as a fraction of the shot range
LABEL_CHARS = 22  # longer class names are shortened on heatmap axes
CELL_TEXT_LIMIT = 15  # above this many classes the heatmap's cells are too small for their percentages
UNMET_COLOR = "#eeeeee"  # heatmap cells of two classes that never shared a task
CHART_SIZE = (5.8, 3.4)  # inches; two charts side by side fit the report's page width


@dataclass(frozen=True)
class Line:
    """One plotted series: `x` and `y` of equal length; `error` the half-widths of the error bars (NaN: none)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    error: Sequence[float] | None = None
    color: str | None = None  # any matplotlib colour; None: the series' place in the default cycle (C0, C1, ...)
    dashed: bool = False  # dashed line and hollow markers, e.g. the fine-tuned method


@dataclass(frozen=True)
class ShotSeries:
    """Accuracy of one model and method at several shot counts: shot -> (mean, 95% half-width), as fractions."""

    label: str
    accuracies: Mapping[int, tuple[float, float]]
    color: str | None = None
    dashed: bool = False


def line_chart(lines: Sequence[Line], *, title: str, x_label: str, y_label: str,
               x_ticks: Sequence[float] | None = None, y_limits: tuple[float, float] | None = None) -> Figure:
    """Lines on shared axes, with markers and error bars where given and a legend under the plot.

    `x_ticks` puts ticks at exactly these values (e.g. the shot counts); `y_limits` bounds the y axis
    (it still shrinks to the data inside them). With no finite point at all the chart says "no data"."""
    drawn = [line for line in lines if any(math.isfinite(value) for value in line.y)]
    figure = _figure(CHART_SIZE, legend_entries=len(drawn))
    axes = figure.subplots()
    axes.set_title(title, loc="left", fontsize=11, fontweight="bold")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    if not drawn:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="#666666")
        axes.set_xticks([])
        axes.set_yticks([])
        return figure
    handles = [_draw(axes, line, line.color or f"C{index % 10}") for index, line in enumerate(drawn)]
    if x_ticks is not None:
        axes.set_xticks(list(x_ticks))
    if y_limits is not None:
        low, high = axes.get_ylim()
        axes.set_ylim(max(low, y_limits[0]), min(high, y_limits[1]))
    axes.grid(alpha=0.3)
    # explicit handles keep the legend in series order (matplotlib lists plain lines before error bars)
    figure.legend(handles=handles, loc="outside lower left", fontsize=8, frameon=False)
    return figure


def accuracy_vs_shots(series: Sequence[ShotSeries], *, title: str) -> Figure:
    """Mean accuracy (%) against shots per class, one line per series, with its 95% interval as error bars.

    Series are shifted a little sideways from each other so that error bars at the same shot stay apart;
    the axis ticks stay at the exact shot counts."""
    shots = sorted({shot for one in series for shot in one.accuracies})
    span = (shots[-1] - shots[0]) if len(shots) > 1 else 1.0
    lines = []
    for index, one in enumerate(series):
        measured = sorted(one.accuracies)
        shift = DODGE * span * (index - (len(series) - 1) / 2)
        lines.append(Line(
            label=one.label,
            x=[shot + shift for shot in measured],
            y=[100 * one.accuracies[shot][0] for shot in measured],
            error=[100 * one.accuracies[shot][1] for shot in measured],
            color=one.color, dashed=one.dashed,
        ))
    return line_chart(lines, title=title, x_label="shots per class", y_label="accuracy (%)", x_ticks=shots,
                      y_limits=(0, 100))


def training_curves_figure(history: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "",
                           metrics: Sequence[str] | None = None, intervals: Mapping[str, str] | None = None,
                           x_label: str = "training step") -> Figure:
    """The curves of one training run, one panel per metric, for its MLflow run page.

    `history` maps a metric name to its (step, value) points, e.g. {"loss": [(0, 8.1), (10, 7.4)],
    "knn_accuracy": [(100, 0.31)], "val_accuracy": ..., "val_ci95": ...} as the run logged them (MLflow's
    `get_metric_history` gives exactly these pairs). `metrics` picks and orders the panels (default: every
    metric of `history` that `intervals` does not use as a width); `intervals` maps a metric to the metric
    holding its 95% half-widths at the same steps, drawn as error bars (e.g. {"val_accuracy": "val_ci95"}).
    Values logged twice at one step are averaged (`one_per_step`) and long histories thinned (`thin`).
    Metrics named *accuracy are drawn in percent. Raises KeyError for a named metric missing from `history`."""
    intervals = dict(intervals or {})
    names = list(metrics) if metrics is not None else [name for name in history if name not in intervals.values()]
    missing = [name for name in names if name not in history]
    if missing:
        raise KeyError(f"no history for metric(s) {missing}; the run logged {sorted(history)}")
    figure = _figure((max(3.6, 3.4 * len(names)), 3.2))
    if title:
        figure.suptitle(title, x=0.01, ha="left", fontsize=11, fontweight="bold")
    panels = figure.subplots(1, max(1, len(names)), squeeze=False)[0]
    for axes, name in zip(panels, names):
        scale, unit = (100.0, " (%)") if name.endswith("accuracy") else (1.0, "")
        points = thin(one_per_step(history[name]))
        widths = dict(history.get(intervals[name], [])) if name in intervals else {}
        line = Line(label=name, x=[step for step, _ in points], y=[scale * value for _, value in points],
                    error=[scale * widths.get(step, math.nan) for step, _ in points] if widths else None)
        _draw(axes, line, "C0")
        axes.set_xlabel(x_label)
        axes.set_ylabel(name + unit)
        axes.grid(alpha=0.3)
    return figure


def confusion_heatmap(confusion: Confusion, *, title: str) -> Figure:
    """True class (rows) against predicted class (columns) as rates in %, each row normalised by its
    opportunities (`Confusion.rates`: queries of the row class scored in a task that offered the column class).

    Right answers (the diagonal) are green, confusions red on a square-root scale so that small rates stay
    visible, and pairs that never shared a task grey. Class names longer than LABEL_CHARS are shortened."""
    rates = confusion.rates()
    size = len(confusion.classes)
    diagonal = np.eye(size, dtype=bool)
    side = min(7.5, 1.8 + 0.4 * size)
    figure = _figure((side + 0.6, side))
    axes = figure.subplots()
    axes.set_facecolor(UNMET_COLOR)  # NaN cells are masked in both meshes below, so this grey shows through
    unmet = ~np.isfinite(rates)
    cells: dict[str, Any] = {"edgecolors": "#ffffff", "linewidth": 1.0}
    axes.pcolormesh(np.ma.masked_array(rates, ~diagonal | unmet), cmap="Greens", vmin=0.0, vmax=1.0, **cells)
    axes.pcolormesh(np.ma.masked_array(rates, diagonal | unmet), cmap="Reds", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                    **cells)
    if size <= CELL_TEXT_LIMIT:
        for row in range(size):
            for column in range(size):
                count = int(confusion.counts[row, column])
                if unmet[row, column] or not (count or row == column):
                    continue
                rate = float(rates[row, column])
                strength = rate if row == column else math.sqrt(rate)
                axes.text(column + 0.5, row + 0.5, f"{100 * rate:.0f}%", ha="center", va="center", fontsize=8,
                          color="#ffffff" if strength > 0.6 else "#222222")
    names = [_shorten(name) for name in confusion.classes]
    centres = np.arange(size) + 0.5
    axes.set_xticks(centres, names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    axes.set_yticks(centres, names, fontsize=8)
    axes.set_xlim(0, size)
    axes.set_ylim(size, 0)  # the first class on top, as a matrix is read
    axes.set_aspect("equal")
    axes.tick_params(length=0)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, loc="left", fontsize=11, fontweight="bold")
    return figure


def svg_text(figure: Figure, *, salt: str = "metallo") -> str:
    """The figure as one `<svg>` element to inline in an HTML page or write as an .svg file.

    Text stays text (searchable, escaped, drawn in the page's fonts) and the element ids are derived from
    `salt`, so pass a different salt for every figure of one page: inlined SVGs share the page's id space.
    The XML prolog and doctype go (they are invalid inside HTML and name a DTD URL), SVG 1.1 `xlink:href`
    becomes SVG 2 `href` (so the page names no namespace but SVG's own), and clipping is turned off on the
    figure's artists (this changes `figure`): matplotlib's clip paths are `url(#...)` references, which a
    self-contained page avoids, and every chart here sets its limits to cover what it draws."""
    for artist in figure.findobj():
        artist.set_clip_on(False)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace("xlink:href=", "href=")
    return re.sub(r"\n\s*", "\n", text).strip()


def thin(points: Sequence[tuple[float, float]], limit: int = 600) -> list[tuple[float, float]]:
    """At most about `limit` evenly strided points, always keeping the last (per-step losses run long)."""
    if len(points) <= limit:
        return list(points)
    stride = math.ceil(len(points) / limit)
    kept = list(points[::stride])
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def one_per_step(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The mean of the values logged at one step, in step order. Meta-training logs `train_loss` per logged
    episode and per epoch under the same key, and the two meet at epoch boundaries; a line through both would
    jump."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for step, value in points:
        by_step[step].append(value)
    return [(step, sum(values) / len(values)) for step, values in sorted(by_step.items())]


def _figure(size: tuple[float, float], legend_entries: int = 0) -> Figure:
    """A figure sized in inches, taller by one legend row per entry, laid out so that labels never overlap."""
    width, height = size
    return Figure(figsize=(width, height + 0.2 * legend_entries), layout="constrained", facecolor="#ffffff")


def _draw(axes, line: Line, color: str):
    """Plot `line` on `axes` in `color`; the artist for its legend entry."""
    points = sorted(zip(line.x, line.y, line.error if line.error is not None else [math.nan] * len(line.x)))
    points = [(x, y, error) for x, y, error in points if math.isfinite(y)]
    x = [point[0] for point in points]
    y = [point[1] for point in points]
    errors = [point[2] for point in points]
    style = {
        "color": color, "linestyle": "--" if line.dashed else "-", "linewidth": 1.6,
        "marker": "o" if len(points) <= MARKER_LIMIT else None, "markersize": 4.5,
        # hollow markers on dashed series, so a lone point still tells which series it is
        "markerfacecolor": "#ffffff" if line.dashed else color, "markeredgecolor": color,
    }
    if any(math.isfinite(error) for error in errors):
        return axes.errorbar(x, y, yerr=errors, capsize=3, elinewidth=1.2, label=line.label, **style)  # NaN: no bar
    (plotted,) = axes.plot(x, y, label=line.label, **style)
    return plotted


def _shorten(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"
