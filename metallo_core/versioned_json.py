"""Reading the JSON documents metallo writes with a version number in them (dataset manifests, model specs):
an unreadable or other-version document is an error that names the file and what to do, never a KeyError
later."""

from __future__ import annotations

import json
from typing import Any

from metallo_core.errors import MetalloError


def load_versioned_json(text: str, where: str, *, key: str, version: int, error: type[MetalloError],
                        remedy: str, kind: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """The parsed object of `text` (read from `where`) whose `key` is `version`; with `kind` = (field, value,
    what the document is), first checks that the document is of that kind. Raises `error` naming `where`:
    ending in `remedy` when the text is not JSON or holds another version."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc}); {remedy}") from exc
    if not isinstance(data, dict):
        raise error(f"{where} holds a JSON {type(data).__name__}, not an object; {remedy}")
    if kind is not None and data.get(kind[0]) != kind[1]:
        raise error(f"{where} is not {kind[2]} ({kind[0]}={data.get(kind[0])!r})")
    if data.get(key) != version:
        raise error(f"{where} has {key.replace('_', ' ')} {data.get(key)}, this metallo reads {version}; {remedy}")
    return data
