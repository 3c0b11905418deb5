"""Which files in a user's folder are images: the one listing policy of `data ingest`, `classify` and
`multilabel predict`.

- Images are files whose extension is one of IMAGE_SUFFIXES, compared case-insensitively.
- Operating-system and NAS metadata is ignored and counted: macOS AppleDouble companions (`._name`),
  `.DS_Store`, `__MACOSX/`, Spotlight/Trash folders; Windows `Thumbs.db`, `desktop.ini`, `$RECYCLE.BIN/`;
  Synology `@eaDir/` (thumbnails such as `@eaDir/<image>/SYNOPHOTO_THUMB_M.jpg`), `#recycle/`, `#snapshot/`;
  QNAP `.@__thumb/`, `@Recycle/`; NetApp `.snapshot/`; `lost+found/`. A metadata folder is skipped whole.
- Other hidden files and folders (names starting with a dot) are skipped and counted.
- Files with other extensions are listed apart (`other_files`): `classify` and `multilabel predict`
  skip and count them; ingest treats each as a bad input (`--on-error`), so no training file is
  dropped unnoticed.
- Symbolic links are followed, to files and folders; a folder reached twice (a link loop, or two links
  to one folder) is read once and the repeat is counted. Broken links are counted.
- Paths are relative to the root, with `/`, sorted.
Local folders are walked; for `s3://` sources the same name rules apply to the object keys.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from metallo_core.data.images import IMAGE_SUFFIXES
from metallo_core.errors import DataError

# The policy in one paragraph, for the --help of every command that lists folders.
LISTING_HELP = ("Folders are listed by one policy (data ingest, classify, multilabel predict): images are .png .jpg "
                ".jpeg .tif .tiff .bmp .dm3 .dm4 in any case; OS/NAS metadata (._* AppleDouble, .DS_Store, Thumbs.db, "
                "desktop.ini, @eaDir, #recycle, __MACOSX, ...) and hidden files are skipped and counted; "
                "symbolic links are followed (a folder reached twice is read once); other files are skipped and "
                "counted (ingest: bad inputs under --on-error).")

METADATA_FILES = frozenset(name.lower() for name in (
    ".DS_Store", ".localized", "Icon\r", "Thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini",
    ".directory", ".picasa.ini",
))
METADATA_FOLDERS = frozenset(name.lower() for name in (
    "@eaDir", "#recycle", "#snapshot", "@Recycle", ".@__thumb", "@__thumb", "__MACOSX", ".Spotlight-V100",
    ".Trashes", ".fseventsd", ".TemporaryItems", ".DocumentRevisions-V100", ".AppleDouble", ".AppleDB",
    ".AppleDesktop", "Network Trash Folder", "Temporary Items", "$RECYCLE.BIN", "System Volume Information",
    ".snapshot", ".streams", "lost+found",
))


def is_metadata_name(name: str, is_folder: bool) -> bool:
    """True for operating-system and NAS metadata (see the module docstring)."""
    lowered = name.lower()
    if is_folder:
        return lowered in METADATA_FOLDERS
    return lowered in METADATA_FILES or name.startswith("._")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@dataclass
class FolderListing:
    """What a folder holds under the policy; all paths relative to `root`, with `/`."""

    root: str
    images: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)  # metadata files, and metadata folders (each once)
    hidden: list[str] = field(default_factory=list)
    repeated_folders: list[str] = field(default_factory=list)  # reached again through a link: read once
    broken_links: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # every folder read (empty ones included)

    def ignored_counts(self) -> dict[str, int]:
        counts = {"os/nas metadata": len(self.metadata), "hidden": len(self.hidden),
                  "repeated folder links": len(self.repeated_folders), "broken links": len(self.broken_links)}
        return {name: count for name, count in counts.items() if count}

    def describe_ignored(self, include_other_files: bool = True) -> str:
        """One line for a command's summary, e.g. `ignored 3 os/nas metadata, 1 hidden`; '' when nothing was."""
        counts = self.ignored_counts()
        if include_other_files and self.other_files:
            counts["non-image files"] = len(self.other_files)
        if not counts:
            return ""
        examples = sorted({Path(p).name for p in self.metadata})[:3]
        return ("ignored " + ", ".join(f"{count} {name}" for name, count in counts.items())
                + (f" (e.g. {', '.join(examples)})" if examples else ""))

    def by_top_folder(self) -> tuple[dict[str, list[str]], list[str]]:
        """({top-level folder: its images, recursively}, images lying directly in the root)."""
        groups: dict[str, list[str]] = {name: [] for name in self.folders if "/" not in name}
        loose = []
        for relative in self.images:
            if "/" in relative:
                groups.setdefault(relative.split("/", 1)[0], []).append(relative)
            else:
                loose.append(relative)
        return {name: groups[name] for name in sorted(groups)}, loose


def list_folder(directory: str | os.PathLike) -> FolderListing:
    """Walk a local folder under the policy (symbolic links followed, loops read once)."""
    root = Path(directory).expanduser()
    listing = FolderListing(str(root))
    seen_folders: set[tuple[int, int]] = set()

    def visit(folder: Path, relative: str) -> None:
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen_folders:
            listing.repeated_folders.append(relative)
            return
        seen_folders.add((stat.st_dev, stat.st_ino))
        if relative:
            listing.folders.append(relative)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise DataError(f"{folder}: cannot be listed ({exc})") from exc
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            try:
                is_folder, is_file = entry.is_dir(), entry.is_file()  # both follow symbolic links
            except OSError:
                is_folder = is_file = False
            if not is_folder and not is_file:
                (listing.broken_links if entry.is_symlink() else listing.other_files).append(path)
            elif is_metadata_name(entry.name, is_folder):
                listing.metadata.append(path)
            elif entry.name.startswith("."):
                listing.hidden.append(path)
            elif is_folder:
                visit(Path(entry.path), path)
            elif is_image_name(entry.name):
                listing.images.append(path)
            else:
                listing.other_files.append(path)

    visit(root, "")
    for names in (listing.images, listing.other_files, listing.metadata, listing.hidden, listing.folders):
        names.sort()
    return listing


def filter_keys(root: str, relative_paths: list[str]) -> FolderListing:
    """The policy applied to object-store keys (relative to `root`): there are no links and no empty folders."""
    listing = FolderListing(root)
    metadata, hidden, folders = set(), set(), set()
    for relative in relative_paths:
        parts = relative.split("/")
        for depth, part in enumerate(parts):
            prefix = "/".join(parts[:depth + 1])
            is_folder = depth < len(parts) - 1
            if is_metadata_name(part, is_folder):
                metadata.add(prefix)
                break
            if part.startswith("."):
                hidden.add(prefix)
                break
            if is_folder:
                folders.add(prefix)
        else:
            (listing.images if is_image_name(parts[-1]) else listing.other_files).append(relative)
    listing.metadata, listing.hidden, listing.folders = sorted(metadata), sorted(hidden), sorted(folders)
    listing.images.sort()
    listing.other_files.sort()
    return listing


def report_ignored(listing: FolderListing, what: str, include_other_files: bool = True) -> None:
    """Print what the listing left out (stderr, one line), so nothing is dropped silently."""
    line = listing.describe_ignored(include_other_files)
    if line:
        print(f"metallo: {what} {listing.root}: {line}", file=sys.stderr)
