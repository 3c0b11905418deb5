"""What `metallo serve`'s page may be given and where it puts it: uploads copied into a session's own folder
in classify's layout (support/<class>/<file>, query/<file>), within the server's size and count limits, and
folders on the server only inside the roots it was started with.

No Gradio here: the page hands over plain paths and names, so every rule is tested without a browser."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metallo_core.errors import DataError

# A class name becomes a folder name (and a CSV column p_<name>): no separators, no dot-only names.
_UNSAFE_NAME = re.compile(r"[/\\\x00]|^\.+$")


@dataclass(frozen=True)
class UploadLimits:
    """How much one run of the page may upload: files in all (support and query together) and bytes per file
    (Gradio refuses bigger files before they arrive; this checks again what reached us)."""

    max_files: int = 500
    max_file_mb: float = 50.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


@dataclass
class ServerRoots:
    """The folders on the server a page may name (support or query folders); none: uploads only."""

    roots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.roots = [Path(root).expanduser().resolve() for root in self.roots]
        for root in self.roots:
            if not root.is_dir():
                raise DataError(f"--root {root} is not a directory")

    def resolve(self, given: str, what: str) -> Path:
        """The folder or file `given` in the page, resolved (symbolic links and `..` followed), if it lies
        inside a root; a relative path is taken from the first root. DataError otherwise, naming the roots."""
        if not self.roots:
            raise DataError(f"{what}: this server reads no folders (start metallo serve with --root DIR to allow "
                            "folders under DIR); upload the images instead")
        path = Path(given.strip()).expanduser()
        resolved = (path if path.is_absolute() else self.roots[0] / path).resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise DataError(f"{what} {given!r} is outside the folders this server may read: "
                            f"{', '.join(str(root) for root in self.roots)}")
        if not resolved.exists():
            raise DataError(f"{what} {given!r} does not exist (under {', '.join(map(str, self.roots))})")
        return resolved


def check_class_names(names: Sequence[str]) -> list[str]:
    """The names stripped; DataError for an empty, repeated or path-like name (each becomes a folder)."""
    cleaned = [name.strip() for name in names]
    for index, name in enumerate(cleaned):
        if not name:
            raise DataError(f"class {index + 1} has no name; type one above its drop zone")
        if _UNSAFE_NAME.search(name):
            raise DataError(f"class name {name!r} cannot contain / or \\ or be only dots")
    repeated = sorted({name for name in cleaned if cleaned.count(name) > 1})
    if repeated:
        raise DataError(f"class name(s) {', '.join(map(repr, repeated))} given twice; each class needs its own name")
    return cleaned


def check_uploads(groups: Sequence[Sequence[str]], limits: UploadLimits) -> None:
    """DataError when the uploads (lists of file paths) are more files than allowed or one is too big."""
    files = [path for group in groups for path in group]
    if len(files) > limits.max_files:
        raise DataError(f"{len(files)} files uploaded; this server takes at most {limits.max_files} per run "
                        "(metallo serve --max-files), so give a folder on the server or fewer images")
    for path in files:
        size = os.path.getsize(path)
        if size > limits.max_file_bytes:
            raise DataError(f"{Path(path).name} is {size / 1e6:.1f} MB; this server takes files up to "
                            f"{limits.max_file_mb:g} MB (metallo serve --max-file-mb)")


def stage_support(names: Sequence[str], uploads: Sequence[Sequence[str]], folder: Path) -> Path:
    """Copy each class's uploaded files into `folder`/<class name>/ (classify's support layout); the folder.
    Files keep their uploaded names (a repeated name gets a numbered suffix), so the CSV's nearest_support
    reads <class>/<file> as it would for the same folder given to the CLI."""
    names = check_class_names(names)
    for name, files in zip(names, uploads, strict=True):
        if not files:
            raise DataError(f"class {name!r} has no images; drop 1-5 labelled images on its zone")
        _copy_all(files, folder / name)
    return folder


def stage_queries(uploads: Sequence[str], folder: Path) -> Path:
    """Copy the uploaded query files into `folder`; the folder (DataError when there are none)."""
    if not uploads:
        raise DataError("no query images; drop the images to classify on the query zone, or give a folder")
    _copy_all(uploads, folder)
    return folder


def _copy_all(files: Sequence[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source in files:
        name = _uploaded_name(source)
        target = folder / name
        stem, suffix = os.path.splitext(name)
        count = 1
        while target.exists():
            count += 1
            target = folder / f"{stem}-{count}{suffix}"
        shutil.copyfile(source, target)


def _uploaded_name(path: str) -> str:
    """The name the user's file had: Gradio keeps it as the last part of the upload's path."""
    name = Path(path).name
    if not name or name.startswith("."):  # a hidden name would be skipped by the folder listing
        raise DataError(f"uploaded file {name!r} has a hidden or empty name; rename it")
    return name
