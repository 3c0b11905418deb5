"""What every ingester shares: reading one image as given, validating it, optional resize, bad-input policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from metallo_core.data.images import IMAGE_SUFFIXES, ImageInfo, probe_image, resize_encoded
from metallo_core.errors import DataError

OnError = Literal["fail", "skip"]


@dataclass
class IngestOptions:
    size: int | None = None  # re-encode so the shorter side is this many pixels; None keeps the bytes as ingested
    on_error: OnError = "fail"
    overwrite: bool = False
    seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 8:
            raise DataError(f"--size must be at least 8 pixels, got {self.size}")
        if self.on_error not in ("fail", "skip"):
            raise DataError(f"--on-error must be fail or skip, got {self.on_error!r}")


@dataclass
class PreparedImage:
    data: bytes
    info: ImageInfo


@dataclass
class SkipLog:
    """Images left out under --on-error skip: how many and which, for the manifest and the report."""

    entries: list[dict[str, str]] = field(default_factory=list)

    def add(self, source: str, reason: str) -> None:
        self.entries.append({"source": source, "reason": reason})


def prepare_image(data: bytes, source: str, size: int | None) -> PreparedImage:
    """Validate the image (a full decode) and, only if a size was asked for, re-encode it."""
    if size is None:
        return PreparedImage(data, probe_image(data, source))
    resized, info = resize_encoded(data, size, source)
    return PreparedImage(resized, info)


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
