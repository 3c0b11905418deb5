"""Typed configuration: dataclasses loaded from YAML, overridden by `key.sub=value`, validated early.

Every stage describes its settings as (nested) stdlib dataclasses. `load_config` reads a YAML file,
applies command-line overrides, lets pydantic convert every value to its declared type (unknown keys,
wrong types and choices outside a Literal are all reported at once, each with its dotted path) and calls
each dataclass's `validate()` so mistakes surface before any cluster resource is requested.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import pydantic
import yaml

from metallo_core.errors import ConfigError

T = TypeVar("T")
logger = logging.getLogger(__name__)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from an optional YAML file plus `key.sub=value` overrides, then validate it.

    Old spellings (`Renamed`) are read as the new ones in the file and in the overrides separately, so an
    override in either spelling replaces the file's setting in either spelling."""
    data: dict[str, Any] = {}
    if path is not None:
        data = migrate_settings(cls, read_yaml(path))
    data = apply_overrides(data, migrate_overrides(cls, overrides))
    return from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An old spelling of a setting, read as the new one for one release with a deprecation line.

    `old` and `new` are dotted paths below the dataclass that lists this in its `RENAMED_SETTINGS` class
    attribute. A section (e.g. backbone.spec) moves key by key into its new section (backbone). An old
    value of None or "" meant "not set" and is dropped. Given both spellings, the new one's value must be
    the same, or one of `replaces` (placeholders the old spelling filled in, e.g. source: auto next to
    weights_path); otherwise it is a ConfigError naming both.
    """

    old: str
    new: str
    replaces: tuple[Any, ...] = ()


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(old: str, new: str) -> None:
    """One deprecation line per old spelling and process (a stage loads its config more than once)."""
    if (old, new) not in _ANNOUNCED:
        _ANNOUNCED.add((old, new))
        logger.warning("config: %s is deprecated, write %s instead (the old spelling is read for this release "
                       "only)", old, new)


def _renames(cls: Any) -> tuple[Renamed, ...]:
    return tuple(getattr(cls, "RENAMED_SETTINGS", ()))


def migrate_settings(cls: type, data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of the plain settings `data` of dataclass `cls` with every old spelling (see `Renamed`) in
    `cls` and its sections (lists of sections too) moved to its new one. Raises ConfigError where both
    spellings are set to different values."""
    result = to_dict(dict(data))
    for renamed in _renames(cls):
        _move(result, renamed, where)
    hints = get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for name, annotation in hints.items():
        value, section = result.get(name), _without_none(annotation)
        item = get_args(section)[0] if get_origin(section) is list and get_args(section) else None
        if isinstance(value, Mapping) and dataclasses.is_dataclass(section):
            result[name] = migrate_settings(cast(type, section), value, _join(where, name))
        elif isinstance(value, list) and dataclasses.is_dataclass(item):
            result[name] = [migrate_settings(cast(type, item), entry, f"{_join(where, name)}[{index}]")
                            if isinstance(entry, Mapping) else entry for index, entry in enumerate(value)]
    return result


def _move(data: dict[str, Any], renamed: Renamed, where: str) -> None:
    *old_parents, old_key = renamed.old.split(".")
    parent: Any = data
    for part in old_parents:
        parent = parent.get(part) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or old_key not in parent:
        return
    value = parent.pop(old_key)
    old_name, new_name = _join(where, renamed.old), _join(where, renamed.new)
    _announce(*((f"{old_name}.*", f"{new_name}.*") if isinstance(value, dict) else (old_name, new_name)))
    if value is None or value == "":
        return
    *new_parents, new_key = renamed.new.split(".")
    target = data
    for part in new_parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{old_name} is the old spelling of {new_name}, but {_join(where, part)} is a value, "
                              "not a section")
        target = child
    if isinstance(value, dict):
        section = target.setdefault(new_key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{old_name} is a section, the old spelling of the section {new_name}; "
                              f"{new_name} is given as a value ({section!r})")
        for key, item in value.items():
            _put(section, key, item, renamed, f"{old_name}.{key}", f"{new_name}.{key}")
    else:
        _put(target, new_key, value, renamed, old_name, new_name)


def _put(section: dict[str, Any], key: str, value: Any, renamed: Renamed, old_name: str, new_name: str) -> None:
    present = section.get(key)
    if key in section and present != value and present not in renamed.replaces:
        raise ConfigError(f"{old_name} is the old spelling of {new_name}, and both are set ({value!r} and "
                          f"{present!r}); keep {new_name} only")
    section[key] = value


def renamed_settings(cls: type, where: str = "") -> list[tuple[str, str]]:
    """(old, new) dotted paths of every old spelling `migrate_settings` reads in `cls` and its sections
    (a list of sections shows as `name[]`), for the documentation."""
    pairs = []
    for renamed in _renames(cls):
        section = dataclasses.is_dataclass(_annotation_at(cls, renamed.new.split(".")))
        suffix = ".*" if section else ""
        pairs.append((_join(where, renamed.old) + suffix, _join(where, renamed.new) + suffix))
    for name, annotation in (get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}).items():
        section = _without_none(annotation)
        if get_origin(section) is list and get_args(section):
            section, name = get_args(section)[0], f"{name}[]"
        if dataclasses.is_dataclass(section):
            pairs += renamed_settings(cast(type, section), _join(where, name))
    return pairs


def migrate_overrides(cls: type, overrides: Sequence[str]) -> list[str]:
    """`overrides` (`key.sub=value`) with each old key (see `Renamed`) spelled the new way, announced once.
    An override of a whole old section (`backbone.spec={arch: resnet50}`) becomes one override per key of
    its new section, so it does not replace that section's other settings."""
    result: list[str] = []
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        new_key, whole_section = _renamed_key(cls, key.strip().split("."), "")
        if not sep or new_key == key.strip():
            result.append(override)
            continue
        value = load_yaml(raw_value, f"override {override!r}") if whole_section and raw_value.strip() else None
        if isinstance(value, Mapping):
            result += [f"{new_key}.{name}={json.dumps(item)}" for name, item in value.items()]
        else:
            result.append(f"{new_key}={raw_value}")
    return result


def migrate_section_overrides(sections: Mapping[str, type], overrides: Sequence[str]) -> list[str]:
    """`migrate_overrides` for settings that hold several stages' configs as sections (the quickstart's
    `pretrain.`, `metatrain.`): an override below `sections`' key is migrated by that section's class."""
    result: list[str] = []
    for override in overrides:
        section, dot, rest = override.partition(".")
        if dot and section in sections and "=" in rest:
            result += [f"{section}.{item}" for item in migrate_overrides(sections[section], [rest])]
        else:
            result.append(override)
    return result


def _renamed_key(cls: Any, parts: list[str], where: str) -> tuple[str, bool]:
    """The new dotted key for `parts` below `cls`, and whether it names a whole renamed section."""
    whole_section = False
    for renamed in _renames(cls):
        old = renamed.old.split(".")
        if parts[:len(old)] == old:
            whole_section = len(parts) == len(old)
            new = renamed.new.split(".") + parts[len(old):]
            _announce(_join(where, ".".join(parts)), _join(where, ".".join(new)))
            parts = new
            break
    if len(parts) > 1 and dataclasses.is_dataclass(cls):
        section = _without_none(get_type_hints(cls).get(parts[0]))
        if dataclasses.is_dataclass(section):
            rest, whole_section = _renamed_key(section, parts[1:], _join(where, parts[0]))
            return f"{parts[0]}.{rest}", whole_section
    return ".".join(parts), whole_section


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = load_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML says keys are
    unique, and PyYAML would silently keep the last (a second `optim:` block further down wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges may be overridden, by design
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = first_lines.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error follows
            if first != line:
                raise _DuplicateKey(key, first, line)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML `text` (from `where`, e.g. "config file x.yaml") safely; invalid YAML and a key given
    twice in one mapping are ConfigErrors naming `where`, the key and both line numbers."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"{where}: the key {exc.key!r} is given twice, on line {exc.first_line} and line "
                          f"{exc.second_line} (YAML would keep only the second); merge them into one") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` applied; values are parsed as YAML scalars."""
    result = json.loads(json.dumps(data))  # deep copy of plain data
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} must look like key.sub=value")
        try:
            value = load_yaml(raw_value, f"override {override!r}") if raw_value.strip() else ""
        except ConfigError as exc:
            if isinstance(exc.__cause__, _DuplicateKey):
                raise
            value = raw_value
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, section by section (plain data; neither input changes)."""
    merged = to_dict(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = to_dict(value)
    return merged


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Convert a plain mapping into the dataclass `cls`, strictly, and validate the result.

    Every type error, unknown and missing setting is reported at once, each with its dotted path
    (prefixed by `where`); then each dataclass's `validate()` checks relations between fields.
    Raises ConfigError.
    """
    instance = validate_types(cls, data, where)
    errors = _validate_tree(instance)
    if errors:
        raise ConfigError(join_errors(errors))
    return instance


def to_dict(config: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config tree, suitable for YAML, JSON and MLflow."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {str(key): to_dict(value) for key, value in config.items()}
    return config


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_hash(config: Any) -> str:
    """A short stable hash of a config tree, used as lineage in the model registry."""
    canonical = json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b": 1, ...}` for a config tree; lists are kept whole as values."""
    plain = to_dict(config)
    flat: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        else:
            flat[path] = node

    walk(plain, prefix)
    return flat


def validate_types(cls: type[T], data: Any, where: str = "") -> T:
    """`cls` built from `data` by pydantic, with every unknown, missing or mistyped setting reported at
    once (ConfigError, one line per setting, each with its dotted path); `validate()` is not called.

    pydantic's lax mode does the conversions YAML needs (an int where a float is declared, "1e-4" read as a
    string by YAML 1.1, a number where a string is declared, 3.0 for an int, a list for a tuple); its strict
    mode then refuses the ones that hide mistakes (true for an int or a float, 1 or "yes" for a bool, "3"
    for an int). A partial section starts from its field's own default, not from its class's.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping of settings, got {data!r}")
    data = _overlay_section_defaults(cls, migrate_settings(cls, data, where))
    errors: list[Any] = []
    try:
        instance = _wrapper_model(cast(type, cls), strict=False).model_validate({"config": data}).config
    except pydantic.ValidationError as exc:
        instance, errors = None, exc.errors()
    seen = {error["loc"] for error in errors}
    errors += [error for error in _strict_errors(cls, data) if error["loc"] not in seen]
    if errors:
        raise ConfigError(join_errors([_message(cls, error, where) for error in _group_unknown(errors)]))
    return instance


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the config dataclass `cls` as `from_dict` accepts it: types,
    defaults, Literal choices, and no settings beyond the declared ones (additionalProperties: false)."""
    schema = _wrapper_model(cls, strict=False).model_json_schema()
    definitions = schema.get("$defs", {})
    top = definitions.pop(schema["properties"]["config"]["$ref"].rsplit("/", 1)[-1])
    return {**top, "$defs": definitions} if definitions else top


def join_errors(messages: Sequence[str]) -> str:
    """One message for one error; a count and one indented line per error for several."""
    if len(messages) == 1:
        return messages[0]
    return f"{len(messages)} settings are invalid:\n" + "\n".join(f"  - {message}" for message in messages)


@functools.cache
def _wrapper_model(cls: Any, strict: bool) -> Any:
    """A pydantic model with one field, `config: cls`, that forbids unknown keys at every depth."""
    # pydantic takes no config for a stdlib dataclass itself; nested ones use their enclosing model's.
    config = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True, strict=strict)
    return pydantic.create_model(f"{cls.__name__}Settings", __config__=config, config=(cls, ...))


def _strict_errors(cls: type, data: Mapping[str, Any]) -> list[Any]:
    """The errors of pydantic's strict mode that lax mode lets through and the old hand-written
    conversion refused: a bool for an int or float, anything but a bool for a bool, a string for an int.

    Strict mode runs on JSON because in Python it accepts only dataclass instances, not mappings."""
    text = json.dumps({"config": to_dict(data)}, default=str)
    try:
        _wrapper_model(cls, strict=True).model_validate_json(text)
    except pydantic.ValidationError as exc:
        return [error for error in exc.errors() if _hides_a_mistake(error)]
    return []


def _hides_a_mistake(error: Mapping[str, Any]) -> bool:
    kind, value = error["type"], error["input"]
    return (kind == "bool_type" or (kind == "int_type" and isinstance(value, (bool, str)))
            or (kind == "float_type" and isinstance(value, bool)))


def _group_unknown(errors: list[Any]) -> list[Any]:
    """`errors` with the unknown settings of one section merged into one entry (loc: the section,
    names: the unknown keys), so the message lists what the section accepts once."""
    grouped: dict[tuple, dict[str, Any]] = {}
    result: list[Any] = []
    for error in errors:
        if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            section = tuple(error["loc"][:-1])
            if section not in grouped:
                grouped[section] = {"type": "unknown", "loc": section, "names": []}
                result.append(grouped[section])
            grouped[section]["names"].append(error["loc"][-1])
        else:
            result.append(error)
    return result


_KIND_MESSAGES = {
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be a mapping", "dataclass_type": "must be a mapping of settings",
}


def _message(cls: type, error: Mapping[str, Any], where: str) -> str:
    """One error in the house phrasing: the dotted path, what it must be, what it got."""
    loc = tuple(error["loc"])[1:]  # drop the wrapper's "config"
    path = _path(where, loc)
    kind = error["type"]
    if kind == "unknown":
        names = ", ".join(_path(path, (name,)) for name in error["names"])
        section = _annotation_at(cls, loc)
        accepts = (f"; {path or 'the top level'} accepts: {', '.join(sorted(_field_names(section)))}"
                   if isinstance(section, type) and dataclasses.is_dataclass(section) else "")
        return f"unknown setting(s) {names}{accepts}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length tuple given too few items
        return f"{_path(where, loc[:-1])} must have {_tuple_length(cls, loc[:-1])} items, got {len(error['input'])}"
    if kind == "missing":
        return f"setting {path} is required"
    if kind == "too_long" and error.get("ctx", {}).get("field_type") == "Tuple":
        return f"{path} must have {_tuple_length(cls, loc)} items, got {error['ctx']['actual_length']}"
    if kind == "literal_error":
        choices = get_args(_annotation_at(cls, loc))
        expected = ", ".join(map(repr, choices)) if choices else error["ctx"]["expected"]
        return f"{path} must be one of {expected}, got {error['input']!r}"
    if kind in _KIND_MESSAGES:
        return f"{path or 'config'} {_KIND_MESSAGES[kind]}, got {error['input']!r}"
    return f"{path or 'config'}: {error['msg']}"


def _path(prefix: str, loc: Sequence[Any]) -> str:
    path = prefix
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    return path


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _annotation_at(cls: type, loc: Sequence[Any]) -> Any:
    """The declared type at `loc` below `cls` (Optional unwrapped), or None where it cannot be told."""
    annotation: Any = cls
    for part in loc:
        annotation = _without_none(annotation)
        if dataclasses.is_dataclass(annotation):
            annotation = get_type_hints(annotation).get(str(part))
        else:
            args = get_args(annotation)
            fixed_tuple = get_origin(annotation) is tuple and Ellipsis not in args
            annotation = args[part] if fixed_tuple and isinstance(part, int) and part < len(args) else (
                args[-1] if args else None)
        if annotation is None:
            return None
    return _without_none(annotation)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        return options[0] if len(options) == 1 else annotation
    return annotation


def _tuple_length(cls: type, loc: Sequence[Any]) -> int | str:
    args = get_args(_annotation_at(cls, loc))
    return len(args) if args and Ellipsis not in args else "more"


def _field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls) if field.init]


def _overlay_section_defaults(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with each partial section laid over its field's own default (e.g. MetaTrainConfig's
    registry named metallo-protonet), which pydantic would fill from the section class's defaults."""
    hints = get_type_hints(cls)
    result = dict(data)
    for field in dataclasses.fields(cls):
        value, section = data.get(field.name), hints.get(field.name)
        if not (isinstance(value, Mapping) and isinstance(section, type) and dataclasses.is_dataclass(section)):
            continue
        if field.default_factory is not dataclasses.MISSING:
            value = deep_merge(to_dict(field.default_factory()), value)
        result[field.name] = _overlay_section_defaults(section, value)
    return result


def _validate_tree(node: Any) -> list[str]:
    """The messages of every failed `validate()` in the tree; a section's own check runs only once
    its sub-sections pass, since it may rely on them."""
    if not (dataclasses.is_dataclass(node) and not isinstance(node, type)):
        return []
    errors = [message for field in dataclasses.fields(node) for message in _validate_tree(getattr(node, field.name))]
    validate = getattr(node, "validate", None)
    if not errors and callable(validate):
        try:
            validate()
        except ConfigError as exc:
            errors.append(str(exc))
    return errors


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`; keeps `validate()` methods to one line per rule."""
    if not condition:
        raise ConfigError(message)
