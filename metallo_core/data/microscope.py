"""What a microscope file says about its own scale: the physical pixel size and the data-bar height.

SEM/TEM/optical software writes the calibration into TIFF tags that plain image readers ignore. The tags
are read by rosettasciio (HyperSpy's maintained readers, `rsciio.tiff`): FEI/Thermo Fisher (tag 34682 or
34680), Zeiss SEM (CZ_SEM, tag 34118), TVIPS, Olympus SIS, JEOL SightX, Gatan DigitalMicrograph TIFF
exports and ImageJ calibrations. Gatan DigitalMicrograph DM3/DM4 files give theirs from the image's
`Calibrations/Dimension` (scale and units per axis, read by `digitalmicrograph.py` through
`rsciio.digitalmicrograph`). The pixels themselves are still decoded by `decode.py`, under the one decode
policy; this module only adds the metadata.

- Pixel size: metres per pixel along the image's width (the height's is checked against it: a file whose
  two sizes differ by more than 1% is reported, and the width's is used).
- Data bar: FEI/Thermo files carry `[PrivateFei] DatabarHeight` (rows appended below the image), or a
  stored height larger than `[Image] ResolutionY` by the bar's rows.
- Units: m, mm, µm, nm, pm and Å (1e-10 m), as UNIT_METRES spells them.
- Plain images (PNG, JPEG, BMP, TIFF without microscope tags) have no pixel size here. The TIFF
  resolution tags (dots per inch/cm) are not used: every image editor writes 72 or 96 dpi into them.
- A DM3/DM4 image whose axes are not calibrated in a length (DigitalMicrograph's default, scale 1 with no
  unit, or a diffraction pattern in 1/nm) has no pixel size; that is common, so it is not an error.
- A file that carries microscope tags from which no length calibration can be read (garbled, or missing
  the pixel-size fields) is refused with a `DataError` naming the file and the tag: a calibrated
  instrument's file without its calibration is more likely damaged than plain, and reading it as plain
  would silently mix scales.
- Tescan TIFFs (tag 50431) are read as plain: rosettasciio 0.15's TIFF reader does not parse that tag.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import tifffile

from metallo_core.data.crop import EdgeCrop
from metallo_core.data.decode import ImageDecodeWarning
from metallo_core.data.digitalmicrograph import is_dm_file, read_dm
from metallo_core.data.rsciio_files import read_signals
from metallo_core.errors import DataError

# TIFF tags whose presence says an instrument wrote a calibration (tag code: whose metadata it is).
CALIBRATION_TAGS = {
    34682: "FEI/Thermo metadata (TIFF tag 34682)",
    34680: "FEI/Thermo metadata (TIFF tag 34680)",
    34118: "Zeiss SEM metadata (CZ_SEM, TIFF tag 34118)",
    37706: "TVIPS metadata (TIFF tag 37706)",
    33560: "Olympus SIS metadata (TIFF tag 33560)",
}
# Length units as rosettasciio writes them, in metres.
UNIT_METRES = {
    "m": 1.0, "mm": 1e-3, "µm": 1e-6, "μm": 1e-6, "um": 1e-6, "micron": 1e-6, "microns": 1e-6,
    "nm": 1e-9, "pm": 1e-12, "å": 1e-10, "angstrom": 1e-10, "a": 1e-10,
}
_ANISOTROPY_TOLERANCE = 0.01
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order


@dataclass(frozen=True)
class PixelSize:
    """Metres per pixel along the width, and the metadata it was read from (in words)."""

    metres: float
    source: str

    @property
    def nanometres(self) -> float:
        return self.metres * 1e9


@dataclass(frozen=True)
class MicroscopeMetadata:
    """What a file says about its scale: `pixel_size` (None: not known) and `data_bar_rows` (rows of a data
    bar at the bottom of the stored image; None: the metadata does not say)."""

    pixel_size: PixelSize | None = None
    data_bar_rows: int | None = None


def read_microscope_metadata_of(path: Path) -> MicroscopeMetadata:
    """`read_microscope_metadata` of a local file, reading only its first bytes when it is no TIFF or DM
    file (so a folder of PNGs is not read twice); DataError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(16)
            if head[:4] not in TIFF_MAGIC and not is_dm_file(head):
                return MicroscopeMetadata()
            stream.seek(0)
            data = stream.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    return read_microscope_metadata(data, str(path))


def read_microscope_metadata(data: bytes, source: str) -> MicroscopeMetadata:
    """The scale metadata of one file's bytes (see the module docstring); `source` names it in errors.

    Raises DataError when the file carries microscope tags without a readable length calibration, and for
    a DM3/DM4 file that holds no single image or cannot be read. Files that are not TIFF or DM, or TIFF
    without microscope tags, give an empty MicroscopeMetadata."""
    if is_dm_file(data):
        return _dm_metadata(data, source)
    if data[:4] not in TIFF_MAGIC:
        return MicroscopeMetadata()
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            codes = {tag.code for tag in page.tags}
            stored_height = int(page.shape[0])
            calibrated = [name for code, name in CALIBRATION_TAGS.items() if code in codes]
            if "SightX_Notes" in {tag.name for tag in page.tags}:
                calibrated.append("JEOL SightX metadata")
            if 65003 in codes:
                calibrated.append("DigitalMicrograph TIFF metadata (tags 65003+)")
            # ImageJ's unit may be no length (pixel, inch of a screenshot): used when it is one, never an error.
            imagej = tiff.is_imagej and "unit=" in (page.description or "")
            fei = tiff.fei_metadata if tiff.is_fei else None
    except Exception as exc:  # tifffile raises many kinds on a damaged header
        raise DataError(f"{source}: its TIFF header cannot be read ({type(exc).__name__}: {exc})") from exc
    if not calibrated and not imagej:
        return MicroscopeMetadata()
    where = calibrated[0] if calibrated else "ImageJ calibration (TIFF ImageDescription)"
    metres = _pixel_size_metres(data, source, where, required=bool(calibrated))
    if metres is None:
        return MicroscopeMetadata()
    pixel_size = PixelSize(metres, where)
    return MicroscopeMetadata(pixel_size, _fei_data_bar_rows(fei, stored_height) if fei else None)


def _dm_metadata(data: bytes, source: str) -> MicroscopeMetadata:
    """A DM3/DM4 file's pixel size from its image's calibration (None when that is no length)."""
    image = read_dm(data, source)
    metres = _width_metres(image.width_axis, image.height_axis, source)
    if metres is None:
        return MicroscopeMetadata()
    return MicroscopeMetadata(PixelSize(metres, "DigitalMicrograph calibration (ImageData.Calibrations)"))


def _pixel_size_metres(data: bytes, source: str, where: str, required: bool) -> float | None:
    """Metres per pixel from rosettasciio's axes; when the tags give no length calibration, a DataError if
    `required`, else None."""
    from rsciio.tiff import file_reader  # imported here: it loads dask and friends

    try:
        signals = read_signals(file_reader, data, ".tif")
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on damaged tags
        raise DataError(f"{source}: its {where} cannot be read ({type(exc).__name__}: {exc}); export it again "
                        "from the microscope software, or save it as a plain PNG/TIFF to use it without a "
                        "pixel size") from exc
    axes = {axis.get("name"): axis for axis in signals[0]["axes"]}
    width, height = axes.get("width"), axes.get("height")
    metres = _width_metres(width, height, source)
    if metres is None and required:
        found = f"scale {width.get('scale')!r} in units {width.get('units')!r}" if width else "no image axes"
        raise DataError(f"{source}: carries {where} but no readable pixel size ({found}); the metadata is "
                        "garbled or incomplete: export it again from the microscope software, or save it as a "
                        "plain PNG/TIFF to use it without a pixel size")
    return metres


def _width_metres(width: dict | None, height: dict | None, source: str) -> float | None:
    """Metres per pixel along the width (None: no length calibration); a warning naming the file when the
    height's differs by more than _ANISOTROPY_TOLERANCE."""
    metres = [_axis_metres(axis) for axis in (width, height)]
    if metres[0] is None:
        return None
    if metres[1] is not None and abs(metres[1] / metres[0] - 1) > _ANISOTROPY_TOLERANCE:
        warnings.warn(f"{source}: pixels are {metres[0] * 1e9:g} nm wide but {metres[1] * 1e9:g} nm high "
                      "(non-square); the width's size is used", ImageDecodeWarning, stacklevel=4)
    return metres[0]


def _axis_metres(axis: dict | None) -> float | None:
    if axis is None:
        return None
    unit = str(axis.get("units") or "").strip().lower()
    scale = axis.get("scale")
    if unit not in UNIT_METRES or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        return None
    return float(scale) * UNIT_METRES[unit]


def _fei_data_bar_rows(fei: dict, stored_height: int) -> int | None:
    """The FEI data bar's rows: `DatabarHeight`, else the stored height beyond `ResolutionY` (None: unknown)."""
    rows = (fei.get("PrivateFei") or {}).get("DatabarHeight")
    if isinstance(rows, int) and 0 < rows < stored_height:
        return rows
    image_rows = (fei.get("Image") or {}).get("ResolutionY")
    if isinstance(image_rows, int) and 0 < image_rows < stored_height:
        return stored_height - image_rows
    return None


def crop_with_data_bar(crop: EdgeCrop, metadata: MicroscopeMetadata) -> EdgeCrop:
    """The crop to apply to a file: its metadata's data bar cut exactly from the bottom (instead of `auto`
    detection, and also when no crop was asked for: a data bar is never texture), unless the user gave an
    explicit bottom crop, which is applied as given."""
    if metadata.data_bar_rows is None or crop.bottom:
        return crop
    return dataclasses.replace(crop, bottom=float(metadata.data_bar_rows), auto_bottom=False)
