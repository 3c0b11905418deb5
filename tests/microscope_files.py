"""Small microscope files written the way SEM software writes them, for the scale tests: FEI/Thermo TIFF
(tag 34682 text block), Zeiss SEM TIFF (CZ_SEM tag 34118), ImageJ-calibrated TIFF."""

from __future__ import annotations

import io

import numpy as np
import tifffile


def fei_tiff(pixels: np.ndarray, pixel_size_m: float, data_bar_rows: int | None = None,
             metadata: str | None = None) -> bytes:
    """An FEI/Thermo TIFF: `pixels` (H, W) uint8, the last `data_bar_rows` of them being the data bar."""
    height, width = pixels.shape
    image_rows = height - (data_bar_rows or 0)
    text = metadata if metadata is not None else (
        "[User]\r\nDate=12/07/2026\r\n"
        f"[Scan]\r\nPixelWidth={pixel_size_m:.6e}\r\nPixelHeight={pixel_size_m:.6e}\r\n"
        f"HorFieldsize={pixel_size_m * width:.6e}\r\n"
        f"[Image]\r\nResolutionX={width}\r\nResolutionY={image_rows}\r\n"
        + (f"[PrivateFei]\r\nDatabarHeight={data_bar_rows}\r\n" if data_bar_rows else "")
        + "[EBeam]\r\nHV=20000\r\n")
    stream = io.BytesIO()
    tifffile.imwrite(stream, pixels, extratags=[(34682, "s", 0, text, False)])
    return stream.getvalue()


def zeiss_tiff(pixels: np.ndarray, pixel_size_m: float) -> bytes:
    """A Zeiss SEM TIFF. Its unnamed values come first; the 4th is the pixel size of the image displayed
    1024 pixels wide (as rosettasciio and Gwyddion read it), followed by named parameters."""
    width = pixels.shape[1]
    text = "\r\n".join(["", "0", "0", f"{pixel_size_m * width / 1024:.9e}", "AP_PIXEL_SIZE",
                        f"Pixel Size = {pixel_size_m * 1e9:.4g} nm", "AP_MAG", "Mag = 5.00 K X", "END", ""])
    stream = io.BytesIO()
    tifffile.imwrite(stream, pixels, extratags=[(34118, "s", 0, text, False)])
    return stream.getvalue()


def imagej_tiff(pixels: np.ndarray, microns_per_pixel: float, unit: str = "micron") -> bytes:
    stream = io.BytesIO()
    tifffile.imwrite(stream, pixels, imagej=True, resolution=(1 / microns_per_pixel, 1 / microns_per_pixel),
                     metadata={"unit": unit})
    return stream.getvalue()
