"""Inline SVG charts without a plotting library: lines with error bars, and a confusion heatmap.

Pure (numbers in, SVG text out) so the report stays one self-contained file and plots are testable as
text. Every label is escaped: class and run names come from MLflow and may hold any character.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""
MARKER_LIMIT = 40  # above this many points a line is drawn without markers
DODGE_PX = 7  # sideways step between series with `dodge`
LABEL_CHARS = 22  # longer class names are shortened in heatmap labels (the full name is in the tooltip)
CHAR_WIDTH = 6.4  # average advance of an 11 px label character, for laying out label margins


@dataclass
class Series:
    label: str
    points: list[tuple[float, float, float | None]]  # (x, y, half width of the error bar, or None)
    color: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class Axis:
    low: float
    high: float
    ticks: tuple[float, ...]


def nice_axis(low: float, high: float, target_ticks: int = 5) -> Axis:
    """An axis from `low` to `high` widened to round tick steps (1, 2, 2.5 or 5 times a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high - low < 1e-12:
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    ticks = tuple(round(index * step, 10) for index in range(first, last + 1))
    return Axis(ticks[0], ticks[-1], ticks)


def thin(points: Sequence[tuple[float, float]], limit: int = 600) -> list[tuple[float, float]]:
    """At most about `limit` evenly strided points, always keeping the last (per-step losses run long)."""
    if len(points) <= limit:
        return list(points)
    stride = math.ceil(len(points) / limit)
    kept = list(points[::stride])
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def number(value: float) -> str:
    """A tick label: integers without a decimal point, other values with up to 4 significant digits."""
    if abs(value - round(value)) < 1e-9 * max(1.0, abs(value)):
        return str(int(round(value)))
    return f"{value:.4g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_ticks: Sequence[float] | None = None,
    y_bounds: tuple[float, float] | None = None,
    dodge: bool = False,
    width: int = 560,  # two charts side by side fit the report's page width
    height: int = 320,
) -> str:
    """Lines (with markers and error bars where given) on shared axes, with a legend below the plot.
    `x_ticks` puts ticks at exactly these values (e.g. the shot counts); `y_bounds` clamps the y axis;
    `dodge` shifts each series a few pixels sideways so error bars at the same x stay apart."""
    left, right, top, bottom = 64, 20, 36, 46
    plot_width, plot_height = width - left - right, height - top - bottom
    legend_height = 10 + 18 * len(series)
    parts = [_svg_open(width, height + legend_height, title),
             f'<text x="{left}" y="22" font-size="14" font-weight="bold" {FONT}>{escape(title)}</text>']
    points = [point for line in series for point in line.points if math.isfinite(point[1])]
    if not points:
        parts.append(f'<text x="{left + plot_width / 2}" y="{top + plot_height / 2}" text-anchor="middle" '
                     f'font-size="13" fill="#666" {FONT}>no data</text></svg>')
        return "".join(parts)

    x_values = [x for x, _, _ in points] + list(x_ticks or [])
    if x_ticks:
        low, high = min(x_values), max(x_values)
        pad = (high - low) * 0.06 or 1.0
        x_axis = Axis(low - pad, high + pad, tuple(x_ticks))
    else:
        x_axis = nice_axis(min(x_values), max(x_values))
    y_low = min(y - (err or 0.0) for _, y, err in points)
    y_high = max(y + (err or 0.0) for _, y, err in points)
    pad = (y_high - y_low) * 0.08
    y_low, y_high = y_low - pad, y_high + pad
    if y_bounds:
        y_low, y_high = max(y_low, y_bounds[0]), min(y_high, y_bounds[1])
    y_axis = nice_axis(y_low, y_high)

    def px(x: float) -> float:
        return left + (x - x_axis.low) / (x_axis.high - x_axis.low) * plot_width

    def py(y: float) -> float:
        return top + plot_height - (y - y_axis.low) / (y_axis.high - y_axis.low) * plot_height

    for tick in y_axis.ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                     f'stroke="#e6e6e6"/>')
        parts.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end" font-size="11" {FONT}>'
                     f'{number(tick)}</text>')
    for tick in x_axis.ticks:
        parts.append(f'<line x1="{px(tick):.1f}" x2="{px(tick):.1f}" y1="{top + plot_height}" '
                     f'y2="{top + plot_height + 4}" stroke="#333"/>')
        parts.append(f'<text x="{px(tick):.1f}" y="{top + plot_height + 17}" text-anchor="middle" font-size="11" '
                     f'{FONT}>{number(tick)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" '
                 f'stroke="#333"/>')
    parts.append(f'<text x="{left + plot_width / 2}" y="{top + plot_height + 36}" text-anchor="middle" '
                 f'font-size="12" {FONT}>{escape(x_label)}</text>')
    parts.append(f'<text x="16" y="{top + plot_height / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 16 {top + plot_height / 2})" {FONT}>{escape(y_label)}</text>')

    for index, line in enumerate(series):
        color = escape(line.color or PALETTE[index % len(PALETTE)])
        shift = DODGE_PX * (index - (len(series) - 1) / 2) if dodge else 0.0
        drawn = [(x, y, err) for x, y, err in sorted(line.points) if math.isfinite(y)]
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        if len(drawn) > 1:
            coordinates = " ".join(f"{px(x) + shift:.1f},{py(y):.1f}" for x, y, _ in drawn)
            parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        for x, y, err in drawn:
            x_px = px(x) + shift
            if err:
                low_px, high_px = py(y - err), py(y + err)
                parts.append(f'<path d="M{x_px:.1f},{low_px:.1f}V{high_px:.1f}M{x_px - 4:.1f},{low_px:.1f}'
                             f'h8M{x_px - 4:.1f},{high_px:.1f}h8" stroke="{color}" stroke-width="1.3"/>')
            if len(drawn) <= MARKER_LIMIT:
                tip = f"{line.label}: {number(x)}, {y:.4g}" + (f" ± {err:.3g}" if err else "")
                # dashed series get hollow markers, so a lone point still tells which series it is
                fill = "#ffffff" if line.dashed else color
                parts.append(f'<circle cx="{x_px:.1f}" cy="{py(y):.1f}" r="3.4" fill="{fill}" stroke="{color}" '
                             f'stroke-width="1.5"><title>{escape(tip)}</title></circle>')

    legend_top = height + 6
    for index, line in enumerate(series):
        color = escape(line.color or PALETTE[index % len(PALETTE)])
        y = legend_top + 18 * index
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        parts.append(f'<line x1="{left}" x2="{left + 28}" y1="{y + 5}" y2="{y + 5}" stroke="{color}" '
                     f'stroke-width="2"{dash}/>')
        fill = "#ffffff" if line.dashed else color
        parts.append(f'<circle cx="{left + 14}" cy="{y + 5}" r="3.4" fill="{fill}" stroke="{color}" '
                     'stroke-width="1.5"/>')
        parts.append(f'<text x="{left + 36}" y="{y + 9}" font-size="11" {FONT}>{escape(line.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap(
    labels: Sequence[str],
    values: Sequence[Sequence[float]],
    texts: Sequence[Sequence[str]],
    tooltips: Sequence[Sequence[str]],
    *,
    title: str,
    x_label: str = "predicted",
    y_label: str = "true",
) -> str:
    """A square matrix of rates in [0, 1] (NaN: no data): the diagonal in green, the rest in red, so
    correct answers and confusions read apart at a glance. Rows are `y_label`, columns `x_label`."""
    size = len(labels)
    cell = 44 if size <= 8 else max(14, 480 // max(size, 1))
    shown = [_shorten(label) for label in labels]
    longest = max((len(label) for label in shown), default=1)
    label_extent = 0.72 * CHAR_WIDTH * longest  # a label rotated by 45 degrees reaches this far up and right
    left = int(min(180, 24 + CHAR_WIDTH * longest))
    top = int(40 + min(140, label_extent + 8))
    width = int(max(left + cell * size + min(140, label_extent) + 12, 16 + 7.6 * len(title), 240))
    height = top + cell * size + 34
    parts = [_svg_open(width, height, title),
             f'<text x="8" y="20" font-size="14" font-weight="bold" {FONT}>{escape(title)}</text>']
    for row in range(size):
        for column in range(size):
            value = values[row][column]
            fill, ink = _cell_colors(value, diagonal=row == column)
            x, y = left + column * cell, top + row * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#fff">'
                         f'<title>{escape(tooltips[row][column])}</title></rect>')
            if cell >= 26 and texts[row][column]:
                parts.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" font-size="10" '
                             f'fill="{ink}" {FONT}>{escape(texts[row][column])}</text>')
    for index, label in enumerate(shown):
        y = top + index * cell + cell / 2 + 4
        parts.append(f'<text x="{left - 6}" y="{y}" text-anchor="end" font-size="11" {FONT}>'
                     f'<title>{escape(labels[index])}</title>{escape(label)}</text>')
        x = left + index * cell + cell / 2
        parts.append(f'<text x="{x}" y="{top - 6}" font-size="11" transform="rotate(-45 {x} {top - 6})" {FONT}>'
                     f'<title>{escape(labels[index])}</title>{escape(label)}</text>')
    parts.append(f'<text x="{left + cell * size / 2}" y="{height - 10}" text-anchor="middle" font-size="12" '
                 f'{FONT}>{escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{top + cell * size / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 12 {top + cell * size / 2})" {FONT}>{escape(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cell_colors(value: float, *, diagonal: bool) -> tuple[str, str]:
    """(fill, text colour). Confusions are usually small rates: a square-root scale keeps them visible."""
    if value is None or not math.isfinite(value):
        return "#eeeeee", "#888888"
    value = min(max(value, 0.0), 1.0)
    strength = value if diagonal else math.sqrt(value)
    base = (44, 160, 44) if diagonal else (214, 39, 40)
    rgb = tuple(round(255 + (channel - 255) * strength) for channel in base)
    return "#%02x%02x%02x" % rgb, "#ffffff" if strength > 0.6 else "#222222"


def _shorten(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"


def _svg_open(width: int, height: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f'<title>{escape(title)}</title><rect width="100%" height="100%" fill="#ffffff"/>')
