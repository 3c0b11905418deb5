"""The rule every command checks before any work: no output may replace one of its inputs.

An output replaces an input when it is the same file (or a link to it), when it is a folder that holds the
input (ingest clears its --out; the report swaps its figures/), or when it is an existing image inside an
input folder (classify --query Q --out Q/a.png would read Q/a.png and then write the CSV over it)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_type_hints

from metallo_core.data.listing import is_image_name
from metallo_core.errors import StorageError
from metallo_core.user_paths import OutputMarker

PathLike = str | os.PathLike[str]


def refuse_output_over_inputs(outputs: Mapping[str, PathLike | None],
                              inputs: Mapping[str, PathLike | None]) -> None:
    """Raise StorageError naming both paths when an output (label -> path) would replace an input.
    Labels are what the user typed (`--out`, `search.best_config_out`); empty and remote (s3://, models:/)
    paths are left out."""
    local_inputs = {label: path for label, path in _local(inputs).items()}
    for out_label, out in _local(outputs).items():
        for in_label, source in local_inputs.items():
            why = _replaces(out, source)
            if why:
                raise StorageError(f"{out_label} {out} would replace {why} {in_label} {source}; "
                                   f"choose an {out_label} outside the inputs")


def output_settings(config: Any, prefix: str = "") -> dict[str, str]:
    """Every setting of a config tree declared as an output path (`OutputPathSetting`), by dotted name."""
    found: dict[str, str] = {}
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        return found
    hints = get_type_hints(type(config), include_extras=True)
    for field in dataclasses.fields(config):
        name, value = f"{prefix}{field.name}", getattr(config, field.name)
        if any(isinstance(extra, OutputMarker) for extra in get_args(hints.get(field.name))[1:]):
            found[name] = value
        else:
            found.update(output_settings(value, f"{name}."))
    return found


def _local(paths: Mapping[str, PathLike | None]) -> dict[str, Path]:
    result = {}
    for label, path in paths.items():
        text = os.fspath(path) if path is not None else ""
        if not text or ("://" in text and not text.startswith("file://")) or text.startswith(("models:", "runs:")):
            continue
        result[label] = Path(text.removeprefix("file://")).expanduser().resolve()
    return result


def _replaces(out: Path, source: Path) -> str:
    """'' when writing `out` leaves `source` alone, else the words saying what it replaces."""
    if out == source or (out.exists() and source.exists() and os.path.samefile(out, source)):
        return "the input"
    if source.is_relative_to(out):
        return "the folder holding the input"
    if out.is_relative_to(source) and source.is_dir() and out.is_file() and is_image_name(out.name):
        return "an image of the input folder"
    return ""
