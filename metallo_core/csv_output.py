"""Result tables (CSV) written so that a failure never leaves a half-written or stray file, and so that any
file name can be written.

File names. On Linux a name is bytes; one copied from an old Windows share or a Latin-1 archive may not be
valid UTF-8 (e.g. `caf\\xe9.png`). Python carries such bytes as lone surrogates, which a UTF-8 file cannot
hold. `escape_name` writes every byte that is not part of valid UTF-8 as a `\\xNN` escape (as `ls -b` and
Python's `backslashreplace` show them): `caf\\xe9.png`. Valid names, including non-ASCII ones
(`ferrite-é.png`), are written unchanged. The escaping is reported once per name (`escaped_names`).

Atomicity. The table is written to a temporary file next to the target (`.<name>.<random>`) and moved into
place only when complete; on any failure (a full disk, a bug, Ctrl-C) the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from metallo_core.errors import StorageError


def escape_name(text: str) -> str:
    """`text` with every byte that is not valid UTF-8 (a surrogate-escaped byte) written as `\\xNN`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def escape_names(data: Any) -> Any:
    """Plain data (dicts, lists, strings) with `escape_name` applied to every string, keys included: for the
    JSON and YAML files a writer stores (manifests, exported configs)."""
    if isinstance(data, str):
        return escape_name(data)
    if isinstance(data, dict):
        return {escape_names(key): escape_names(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [escape_names(item) for item in data]
    return data


def escaped_names(names: Iterable[str]) -> list[tuple[str, str]]:
    """(name, escaped) for each name that needs escaping, in order, each once."""
    seen: dict[str, str] = {}
    for name in names:
        if name not in seen and escape_name(name) != name:
            seen[name] = escape_name(name)
    return list(seen.items())


def create_temporary(target: Path) -> tuple[int, str]:
    """(descriptor, path) of a new file `.<name>.<random>` next to `target`, created as open() would create
    `target` (mode 0666 less the umask; mkstemp's would be 0600, and the table is meant to be shared)."""
    while True:
        temporary = str(target.parent / f".{target.name}.{secrets.token_hex(6)}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


def write_csv_atomically(out: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]],
                         what: str = "the table") -> str:
    """Write `header` and `rows` (text cells escaped with `escape_name`) to `out`, which appears only when
    complete. Returns the path written. OSError becomes a StorageError naming `out`; any other failure is
    re-raised as it is; in every case the temporary file is removed."""
    out_path = Path(out).expanduser()
    temporary = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = create_temporary(out_path)
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow([escape_name(str(cell)) for cell in header])
            for row in rows:
                writer.writerow([escape_name(cell) if isinstance(cell, str) else cell for cell in row])
        os.replace(temporary, out_path)
        temporary = None
    except OSError as exc:
        raise StorageError(f"cannot write {what} to {escape_name(str(out_path))}: {exc}") from exc
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return str(out_path)
