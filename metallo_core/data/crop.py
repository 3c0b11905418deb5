"""Cropping image edges, and finding the burned-in data bar of SEM micrographs (scale bar, kV, magnification).

One spelling everywhere (`metallo classify --crop`, `metallo data ingest --crop`; training reads what
ingest cropped): `bottom=64` (pixels), `bottom=0.1` (a fraction of the height), several edges joined
by commas (`bottom=0.08,left=12`), `auto` (find a data bar at the bottom of each image), or `none`.
A value below 1 is a fraction of that side; a whole number of 1 or more is pixels.

Automatic detection looks for a bottom band whose rows are dominated by one background grey (a bar
with text on it), which the image above does not share, with a sharp edge where the image starts.
When the bottom rows look like neither a bar nor the image, it refuses to guess (`DataError`, asking
for an explicit crop) rather than cut or keep something it is unsure of.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from metallo_core.errors import ConfigError, DataError

EDGES = ("top", "bottom", "left", "right")
MIN_SIDE = 8  # pixels a crop must leave on each axis

# Detection thresholds (grey levels of 0..255, fractions of a row's pixels).
_BACKGROUND_TOLERANCE = 8  # a bar's background varies this much at most (JPEG noise)
_BAR_ROW_SHARE = 0.4  # a row of the bar has at least this share of background pixels (text covers the rest)
_IMAGE_ROW_SHARE = 0.15  # the image above a bar has at most this median share of the bar's background grey
_BAR_LIKE_ROWS_ABOVE = 0.05  # more of the image's own rows than this look like the band: unsure
_FLAT_ROW_STD = 2.0  # a row this uniform (a separator line) belongs to the bar whatever its grey
_MIN_BAR_ROWS, _MAX_BAR_FRACTION = 3, 0.4
_MIN_HEIGHT_TO_JUDGE = 32


@dataclass(frozen=True)
class BarDetection:
    status: Literal["bar", "none", "unsure"]
    rows: int  # rows of the bar at the bottom (0 unless status == "bar")
    reason: str


@dataclass(frozen=True)
class EdgeCrop:
    """Pixels or fractions to cut from each edge; `auto_bottom` finds a data bar per image instead of `bottom`."""

    top: float = 0.0
    bottom: float = 0.0
    left: float = 0.0
    right: float = 0.0
    auto_bottom: bool = False

    def __post_init__(self) -> None:
        for edge in EDGES:
            value = getattr(self, edge)
            if value < 0 or (value >= 1 and value != int(value)):
                raise ConfigError(f"crop {edge}={value:g}: use a fraction below 1 or a whole number of pixels")
        if self.auto_bottom and self.bottom:
            raise ConfigError("crop: 'auto' finds the bottom bar itself; drop bottom=... or drop auto")
        if self.top + self.bottom >= 1 and max(self.top, self.bottom) < 1:
            raise ConfigError(f"crop top={self.top:g} and bottom={self.bottom:g} leave nothing of the image")
        if self.left + self.right >= 1 and max(self.left, self.right) < 1:
            raise ConfigError(f"crop left={self.left:g} and right={self.right:g} leave nothing of the image")

    @classmethod
    def parse(cls, text: str | None) -> EdgeCrop:
        """`none`, `auto`, or `edge=value` pairs joined by commas (`auto` may join them: `auto,left=4`)."""
        if text is None or text.strip().lower() in ("", "none", "0"):
            return cls()
        values: dict[str, float] = {}
        auto = False
        for part in text.split(","):
            part = part.strip().lower()
            if part == "auto":
                auto = True
                continue
            edge, _, number = part.partition("=")
            if edge.strip() not in EDGES or not number:
                raise ConfigError(f"--crop {text!r}: expected auto, none, or edge=value pairs with edges "
                                  f"{', '.join(EDGES)} (e.g. bottom=64 or bottom=0.1,left=8)")
            try:
                values[edge.strip()] = float(number)
            except ValueError as exc:
                raise ConfigError(f"--crop {text!r}: {number!r} is not a number") from exc
        return cls(**values, auto_bottom=auto)

    @classmethod
    def from_dict(cls, values: dict | None) -> EdgeCrop:
        """From a config mapping such as `{bottom: 0.1}` or `{auto_bottom: true}`."""
        if not values:
            return cls()
        unknown = sorted(set(values) - {*EDGES, "auto_bottom"})
        if unknown:
            raise ConfigError(f"crop: unknown key(s) {unknown}; use {', '.join(EDGES)} or auto_bottom")
        return cls(**values)

    @property
    def is_identity(self) -> bool:
        return not self.auto_bottom and not any(getattr(self, edge) for edge in EDGES)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """How it reads on a command line: `bottom=64,left=0.05`, `auto`, or `none`."""
        parts = ["auto"] if self.auto_bottom else []
        parts += [f"{edge}={getattr(self, edge):g}" for edge in EDGES if getattr(self, edge)]
        return ",".join(parts) or "none"

    def edges_in_pixels(self, height: int, width: int) -> dict[str, int]:
        sides = {"top": height, "bottom": height, "left": width, "right": width}
        return {edge: int(round(getattr(self, edge) * sides[edge])) if getattr(self, edge) < 1
                else int(getattr(self, edge)) for edge in EDGES}

    def apply(self, pixels: np.ndarray, source: str, rgb8: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Crop (H, W[, C]) `pixels`; returns (cropped, bottom rows removed). Auto detection runs on
        `rgb8` (an 8-bit rendering of the same image) when given, else on `pixels` (which must be uint8)."""
        if self.is_identity:
            return pixels, 0
        height, width = pixels.shape[:2]
        cut = self.edges_in_pixels(height, width)
        if self.auto_bottom:
            detection = detect_data_bar(rgb8 if rgb8 is not None else pixels)
            if detection.status == "unsure":
                raise DataError(f"{source}: --crop auto cannot tell whether the bottom holds a data bar "
                                f"({detection.reason}); give the bar's height instead, e.g. --crop bottom=64")
            cut["bottom"] = detection.rows
        if height - cut["top"] - cut["bottom"] < MIN_SIDE or width - cut["left"] - cut["right"] < MIN_SIDE:
            raise DataError(f"{source}: crop {self.describe()} would leave less than {MIN_SIDE} pixels of its "
                            f"{width} x {height}; use a smaller crop")
        return pixels[cut["top"]:height - cut["bottom"], cut["left"]:width - cut["right"]], cut["bottom"]


def detect_data_bar(pixels: np.ndarray) -> BarDetection:
    """Look for a data bar at the bottom of an (H, W) or (H, W, 3) uint8 image (see the module docstring)."""
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels.astype(np.float32)
    height = grey.shape[0]
    if height < _MIN_HEIGHT_TO_JUDGE:
        return BarDetection("unsure", 0, f"only {height} rows high")
    bottom_rows = grey[-max(2, height // 100):]
    histogram = np.bincount(np.clip(bottom_rows, 0, 255).astype(np.int64).ravel(), minlength=256)
    window = np.convolve(histogram, np.ones(2 * _BACKGROUND_TOLERANCE + 1), mode="same")
    background = int(window.argmax())
    share = (np.abs(grey - background) <= _BACKGROUND_TOLERANCE).mean(axis=1)
    flat = grey.std(axis=1) < _FLAT_ROW_STD
    in_bar = (share >= _BAR_ROW_SHARE) | flat
    rows = 0
    while rows < height and in_bar[height - 1 - rows]:
        rows += 1
    image_share = float(np.median(share[:height - rows])) if rows < height else 1.0
    edge_share = float(share[max(0, height - rows - 3):height - rows].mean()) if rows < height else 1.0
    if rows < _MIN_BAR_ROWS:  # none, or a thin border line that is no data bar
        return BarDetection("none", 0, f"{rows} bottom row(s) dominated by one grey: no data bar")
    if rows > _MAX_BAR_FRACTION * height:
        return BarDetection("unsure", 0, f"{rows} of {height} rows share the bottom's grey {background}: "
                                         "too many for a data bar")
    bar_like_above = float(in_bar[:height - rows].mean())
    if image_share > _IMAGE_ROW_SHARE or edge_share > _BAR_ROW_SHARE or bar_like_above > _BAR_LIKE_ROWS_ABOVE:
        return BarDetection("unsure", 0, f"the image above shares the bottom band's grey {background} "
                                         f"({image_share:.0%} of a typical row's pixels, {bar_like_above:.0%} "
                                         "of its rows look like the band)")
    return BarDetection("bar", rows, f"{rows}-row band of grey {background} (image above: {image_share:.0%})")
