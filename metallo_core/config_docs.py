"""A config dataclass documented for its user: defaults as commented YAML, and a described JSON schema.

The documentation of a setting is the `#` comment beside or above its field in the source (where the
code's readers already look), so it is written once and stays next to the setting it describes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any, get_args, get_type_hints

import yaml

from metallo_core.config import json_schema, to_dict

WIDTH = 110


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its `#` comments (the block just above it, then the one on its line)} for the
    dataclass `cls`; {} when its source cannot be read (e.g. a class made at run time)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    class_node = ast.parse(source).body[0]
    if not isinstance(class_node, ast.ClassDef):
        return {}
    docs = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        if above or beside:
            docs[node.target.id] = " ".join(above + beside)
    return docs


def class_doc(cls: type) -> str:
    """The first paragraph of `cls`'s own docstring, on one line ("" for the one dataclass writes)."""
    doc = inspect.getdoc(cls) or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def defaults_yaml(cls: type) -> str:
    """`cls`'s defaults as YAML a config file can start from: each setting with its type as a trailing
    comment and its documentation above it; a required setting (no default) shows null."""
    lines = [f"# {line}" for line in textwrap.wrap(class_doc(cls), WIDTH)]
    _render_section(cls, None, "", lines)
    return "\n".join(lines) + "\n"


def described_json_schema(cls: type) -> dict[str, Any]:
    """`json_schema(cls)` with each property's description taken from its field's comments, and the
    defaults of fields with a default factory (e.g. a section's own defaults) filled in."""
    schema = json_schema(cls)
    classes = {section.__name__: section for section in _section_classes(cls)}
    for definition in [schema, *schema.get("$defs", {}).values()]:
        section = classes.get(definition.get("title", ""))
        if section is None:
            continue
        if "description" not in definition and class_doc(section):
            definition["description"] = class_doc(section)
        properties = definition.get("properties", {})
        for name, doc in field_docs(section).items():
            properties.get(name, {}).setdefault("description", doc)
        for field in dataclasses.fields(section):  # pydantic leaves out defaults made by a factory
            if field.name in properties and field.default_factory is not dataclasses.MISSING:
                properties[field.name].setdefault("default", to_dict(field.default_factory()))
    return schema


def _render_section(cls: type, instance: Any, indent: str, lines: list[str]) -> None:
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        value = getattr(instance, field.name) if instance is not None else _field_default(field)
        doc = docs.get(field.name, "")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            doc = doc or class_doc(type(value))
        lines.extend(f"{indent}# {line}" for line in textwrap.wrap(doc, WIDTH - len(indent) - 2))
        kind = _type_name(field.type) + ("" if value is not dataclasses.MISSING else ", required")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append(f"{indent}{field.name}:  # {kind}")
            _render_section(type(value), value, indent + "  ", lines)
            continue
        plain = None if value is dataclasses.MISSING else to_dict(value)
        # In a one-item flow list, any value (scalar, list, mapping) dumps on one line, quoted as needed.
        flow = yaml.safe_dump([plain], default_flow_style=True, sort_keys=False, width=10**6).strip()[1:-1]
        lines.append(f"{indent}{field.name}: {flow}  # {kind}")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):  # modules with `from __future__ import annotations`
        return re.sub(r"\b(Output)?PathSetting\b", "str", annotation)  # a path is a str; ~ and $VARS expanded
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _section_classes(cls: type) -> list[type]:
    """`cls` and every dataclass its fields hold, at any depth (inside lists, dicts and Optionals too)."""
    found: list[type] = []

    def visit(annotation: Any) -> None:
        if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
            if annotation in found:
                return
            found.append(annotation)
            for hint in get_type_hints(annotation).values():
                visit(hint)
        for arg in get_args(annotation):
            visit(arg)

    visit(cls)
    return found
