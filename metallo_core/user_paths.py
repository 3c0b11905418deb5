"""Paths as users give them: `~` and `$VARIABLES` expanded one way for every path setting, flag and
environment variable (systemd units, .env files and Ray's runtime_env pass them on unexpanded)."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

import pydantic

from metallo_core.errors import ConfigError

_UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(text: str, setting: str = "the path") -> str:
    """`text` with `$NAME`/`${NAME}` replaced from the environment and a leading `~` made the home folder
    (URIs such as s3://bucket/$PREFIX get the variables only). A variable that is not set is an error
    naming `setting`, not a folder literally called `$NAME`."""
    if not text:
        return text
    expanded = os.path.expandvars(text)
    unset = _UNSET_VARIABLE.search(expanded)
    if unset:
        name = unset.group(1).strip("{}")
        raise ConfigError(f"{setting} {text!r} uses the environment variable {name}, which is not set; "
                          "set it or write the path out")
    if "://" in expanded and not expanded.startswith("file://"):
        return expanded
    if expanded.startswith("file://"):
        return "file://" + os.path.expanduser(expanded.removeprefix("file://"))
    return os.path.expanduser(expanded)


def expand_env_path(variable: str) -> str | None:
    """The environment variable `variable` as a path (expanded), or None when it is unset or empty."""
    value = os.environ.get(variable)
    return expand_path(value, variable) if value else None


def _expand_setting(value: Any) -> Any:
    return expand_path(value, "this setting") if isinstance(value, str) else value


class OutputMarker:
    """Marks a path setting a stage writes to (checked against its inputs by `output_guard`)."""


# The type of every path setting in the config dataclasses: loading a config expands it.
PathSetting = Annotated[str, pydantic.AfterValidator(_expand_setting)]
OutputPathSetting = Annotated[str, pydantic.AfterValidator(_expand_setting), OutputMarker()]


def cli_path(text: str) -> str:
    """argparse `type=` of every path flag (argparse names the flag when this raises)."""
    try:
        return expand_path(text, "the path")
    except ConfigError as exc:
        import argparse

        raise argparse.ArgumentTypeError(str(exc)) from exc
