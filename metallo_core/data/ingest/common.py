"""What every ingester shares: reading one image as given, validating it, optional resize, bad-input policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from metallo_core.data.crop import EdgeCrop
from metallo_core.data.images import IMAGE_SUFFIXES, PreparedBytes, prepare_bytes
from metallo_core.data.microscope import MicroscopeMetadata, crop_with_data_bar, read_microscope_metadata
from metallo_core.data.shards import DatasetWriter
from metallo_core.errors import DataError
from metallo_core.fewshot.physical_scale import MAX_UPSAMPLE

OnError = Literal["fail", "skip"]


@dataclass
class IngestOptions:
    size: int | None = None  # re-encode so the shorter side is this many pixels; None keeps the bytes as ingested
    on_error: OnError = "fail"
    overwrite: bool = False
    seed: int = 0
    name: str | None = None
    crop: EdgeCrop = field(default_factory=EdgeCrop)  # edges (a data bar) cut before storing; recorded in the manifest
    # Resample every image to this many nm per pixel from its metadata (data/microscope.py); None: as stored.
    pixel_size_nm: float | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 8:
            raise DataError(f"--size must be at least 8 pixels, got {self.size}")
        if self.on_error not in ("fail", "skip"):
            raise DataError(f"--on-error must be fail or skip, got {self.on_error!r}")
        if self.pixel_size_nm is not None and not self.pixel_size_nm > 0:
            raise DataError(f"--pixel-size-nm must be positive, got {self.pixel_size_nm}")
        if self.pixel_size_nm is not None and self.size is not None:
            raise DataError("--pixel-size-nm and --size cannot be combined: --size would resize each image to its "
                            "own shorter side and undo the common pixel size; drop one")


PreparedImage = PreparedBytes  # data, info (height, width, encoding), decode notes, bottom rows cropped


@dataclass
class SkipLog:
    """Images left out under --on-error skip: how many and which, for the manifest and the report."""

    entries: list[dict[str, str]] = field(default_factory=list)

    def add(self, source: str, reason: str) -> None:
        self.entries.append({"source": source, "reason": reason})


def prepare_image(data: bytes, source: str, size: int | None, crop: EdgeCrop | None = None,
                  scale: float = 1.0) -> PreparedImage:
    """Validate the image (a full decode under the decode policy) and, only if a size, a crop or a scale
    was asked for, re-encode it."""
    try:
        return prepare_bytes(data, source, size, crop, scale)
    except DataError as exc:
        raise DataError(f"{exc}; replace the file or ingest with --on-error skip") from exc


def microscope_settings(data: bytes, source: str, options: IngestOptions) -> tuple[MicroscopeMetadata, EdgeCrop, float]:
    """(what the file's metadata says about its scale, the crop to apply with its data bar cut exactly, the
    resampling factor to `options.pixel_size_nm`). DataError naming the file for garbled microscope
    metadata, for a file without a pixel size when one is asked for, and for a factor that would enlarge
    it more than MAX_UPSAMPLE times (the bound classify uses)."""
    try:
        metadata = read_microscope_metadata(data, source)
    except DataError as exc:
        raise DataError(f"{exc}; or ingest with --on-error skip") from exc
    crop = crop_with_data_bar(options.crop, metadata)
    if options.pixel_size_nm is None:
        return metadata, crop, 1.0
    if metadata.pixel_size is None:
        raise DataError(f"{source}: --pixel-size-nm needs every image's pixel size, and this file's metadata "
                        "gives none (a plain image, or a TIFF without microscope tags); remove it, ingest "
                        "without --pixel-size-nm, or with --on-error skip")
    factor = metadata.pixel_size.nanometres / options.pixel_size_nm
    if factor > MAX_UPSAMPLE:
        raise DataError(f"{source}: its pixels are {metadata.pixel_size.nanometres:.4g} nm; --pixel-size-nm "
                        f"{options.pixel_size_nm:g} would enlarge it {factor:.3g}x (at most {MAX_UPSAMPLE:g}x); "
                        "choose a coarser --pixel-size-nm or leave this image out (--on-error skip)")
    return metadata, crop, factor


def check_suffix(source: str) -> None:
    if not source.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(
            f"{source}: unsupported file type; images must be one of {', '.join(IMAGE_SUFFIXES)} "
            "(remove the file or ingest with --on-error skip)"
        )


def handle_bad_image(error: DataError, source: str, options: IngestOptions, skipped: SkipLog) -> None:
    """Raise under --on-error fail; record and continue under --on-error skip."""
    if options.on_error == "fail":
        raise error
    skipped.add(source, str(error))


def parse_split_sizes(text: str | None, kind: type, option: str) -> tuple | None:
    if text is None:
        return None
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError as exc:
        raise DataError(f"{option} must be comma-separated {kind.__name__}s like 15,5,5, got {text!r}") from exc
    if not 2 <= len(values) <= 3 or any(v <= 0 for v in values):
        raise DataError(f"{option} needs 2 or 3 positive values (train,val[,test]), got {text!r}")
    return values


def split_names(count: int) -> list[str]:
    return ["train", "test"] if count == 2 else ["train", "val", "test"]


def class_split_writer(out: str, options: IngestOptions, ingester: str, split_classes: dict[str, list[str]],
                       **source: Any) -> DatasetWriter:
    """The writer of a dataset split by classes (each class in one split, in `split_classes`' order), named
    after the ingester unless `options.name` says otherwise; `source` is recorded in the manifest."""
    class_names = [name for names in split_classes.values() for name in names]
    return DatasetWriter(out, options.name or ingester, class_names, split_kind="classes",
                         split_classes=split_classes, overwrite=options.overwrite,
                         source={"ingester": ingester, **source})
