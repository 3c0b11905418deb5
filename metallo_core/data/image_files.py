"""Image files on local disk, as users hand them over: folders of micrographs for prediction and
support sets. Listing follows the one policy of `listing.py`; decoding lives in `images.py`."""

from __future__ import annotations

import os
from pathlib import Path

from metallo_core.data.images import IMAGE_SUFFIXES
from metallo_core.data.listing import FolderListing, is_image_name, is_metadata_name, list_folder, report_ignored
from metallo_core.errors import DataError


def list_image_listing(directory: str | os.PathLike, what: str = "--images",
                       require_images: bool = True) -> FolderListing:
    """The folder's listing (errors name `what`); prints what was ignored; at least one image unless
    `require_images` is False."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory of images")
    listing = list_folder(root)
    report_ignored(listing, what)
    if require_images and not listing.images:
        raise DataError(f"{what} {root} holds no images ({', '.join(IMAGE_SUFFIXES)}, any case)"
                        + (f"; {listing.describe_ignored()}" if listing.describe_ignored() else ""))
    return listing


def list_image_files(directory: str | os.PathLike, what: str = "--images") -> list[Path]:
    """Every image below `directory` (sub-folders included, links followed), sorted; `what` names it in errors."""
    listing = list_image_listing(directory, what)
    root = Path(directory).expanduser()
    return [root / relative for relative in listing.images]


def is_image_file(path: Path) -> bool:
    """A single file a user named: an image by extension, and not OS/NAS metadata such as `._name.png`."""
    return path.is_file() and is_image_name(path.name) and not is_metadata_name(path.name, False)


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
