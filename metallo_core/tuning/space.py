"""Search spaces as YAML: dotted config keys mapped to distributions, turned into Ray Tune domains.

    space:
      optim.lr: {loguniform: [1.0e-3, 1.0e-1]}
      episodes.shot: {choice: [1, 5]}
      finetune.augmentations: {choice: [[crop, flip], [crop, flip, rot90]]}
      epochs: 4                      # a plain value is fixed for every trial

Model-based searchers (Optuna) only take scalar categories, so a choice among lists or mappings is
carried through Tune as a JSON string and decoded when the trial builds its config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from metallo_core.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "qloguniform", "randint", "choice", "grid")
ENCODED_PREFIX = "json:"


def validate_space(space: Mapping[str, Any], config_type: type, *, forbidden: tuple[str, ...] = (),
                   base: Mapping[str, Any] | None = None, where: str = "") -> None:
    """Every key must name a field of `config_type` (dotted through nested dataclasses), with a known
    distribution and sane bounds; `forbidden` prefixes (run names, data locations) cannot be searched.
    With `base` (the plain config every trial starts from), every value a trial could get is checked
    against the field before any trial starts: each choice and grid value, both bounds of a range and a
    fixed value must make a valid config (the field's type, its Literal choices, its `validate()` ranges),
    and a range that draws fractions cannot feed an integer setting. `where` prefixes keys in messages."""
    if not space:
        raise ConfigError("space is empty: name at least one setting to search (see tuning/configs/)")
    for key, spec in space.items():
        if any(key == prefix or key.startswith(prefix + ".") for prefix in forbidden):
            raise ConfigError(f"space: {key!r} cannot be searched (the search sets it for every trial)")
        annotation = _field_type(config_type, key)
        if isinstance(spec, Mapping):
            _validate_distribution(f"{where}{key}", spec)
        if base is not None:
            _check_values(key, spec, annotation, config_type, base, where)


def check_point(point: Mapping[str, Any], config_type: type, base: Mapping[str, Any], where: str = "") -> None:
    """A known configuration (search.points_to_evaluate) must make a valid config as a whole."""
    from metallo_core.config import from_dict

    try:
        from_dict(config_type, apply_params(base, {key.removeprefix(where): value for key, value in point.items()}))
    except ConfigError as exc:
        raise ConfigError(f"search.points_to_evaluate: the point {dict(point)} is not a valid config ({exc})") from exc


def _check_values(key: str, spec: Any, annotation: Any, config_type: type, base: Mapping[str, Any],
                  where: str) -> None:
    from metallo_core.config import from_dict

    name = f"space.{where}{key}"
    if not isinstance(spec, Mapping):
        candidates = [("the fixed value", spec)]
    else:
        (kind, args), = spec.items()
        if kind in ("choice", "grid"):
            candidates = [(kind, value) for value in args]
        else:
            integer = _without_optional(annotation) is int
            if integer and kind in ("uniform", "loguniform"):
                raise ConfigError(f"{name}: {kind} draws fractions, but {where}{key} is an integer setting; "
                                  "use randint [low, high], or quniform/qloguniform with a whole step")
            if integer and kind.startswith("q") and float(args[2]) != int(float(args[2])):
                raise ConfigError(f"{name}: {kind} step {args[2]} is not whole, but {where}{key} is an integer")
            convert = int if kind == "randint" or integer else float
            candidates = [("lower bound", convert(args[0])), ("upper bound", convert(args[1]))]
    for label, value in candidates:
        try:
            from_dict(config_type, apply_params(base, {key: value}))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {label} {value!r} is not a valid value ({exc})") from exc


def _without_optional(annotation: Any) -> Any:
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return options[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1 \
        else annotation


def to_tune_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """The Tune param space: one flat entry per dotted key (Tune and Optuna name parameters by these keys)."""
    from ray import tune

    result: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, Mapping):
            result[key] = _encode(spec)
            continue
        (kind, args), = spec.items()
        if kind == "loguniform":
            result[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            result[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "quniform":
            result[key] = tune.quniform(float(args[0]), float(args[1]), float(args[2]))
        elif kind == "qloguniform":
            result[key] = tune.qloguniform(float(args[0]), float(args[1]), float(args[2]))
        elif kind == "randint":  # inclusive bounds in YAML, as people read them; Tune's upper bound is exclusive
            result[key] = tune.randint(int(args[0]), int(args[1]) + 1)
        elif kind == "choice":
            result[key] = tune.choice([_encode(value) for value in args])
        else:  # grid
            result[key] = tune.grid_search([_encode(value) for value in args])
    return result


def encode_point(point: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """A known configuration (dotted keys, plain values) in the form the Tune space carries it, for a
    searcher's `points_to_evaluate`; it must give a value for every searched key."""
    missing = sorted(set(space) - set(point))
    extra = sorted(set(point) - set(space))
    if missing or extra:
        raise ConfigError(f"search.points_to_evaluate: each point needs exactly the space's keys; "
                          f"missing {missing}, not in the space {extra}")
    return {key: _encode(value) for key, value in point.items()}


def decode_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Trial parameters back to config values (JSON-carried choices decoded, numpy scalars made plain)."""
    decoded = {}
    for key, value in params.items():
        if isinstance(value, str) and value.startswith(ENCODED_PREFIX):
            value = json.loads(value[len(ENCODED_PREFIX):])
        elif hasattr(value, "item") and callable(value.item):
            value = value.item()
        decoded[key] = value
    return decoded


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the plain config `base` with each dotted key of `params` set (missing sections created)."""
    result = copy.deepcopy(dict(base))
    for key, value in decode_params(params).items():
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return result


def describe_params(params: Mapping[str, Any]) -> str:
    """A short, readable line for progress output: `optim.lr=0.0123 episodes.shot=5`."""
    parts = []
    for key, value in decode_params(params).items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, tuple)):
            value = "+".join(map(str, value))
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _encode(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return ENCODED_PREFIX + json.dumps(value)
    return value


def _validate_distribution(key: str, spec: Mapping[str, Any]) -> None:
    if len(spec) != 1:
        raise ConfigError(f"space.{key}: give exactly one distribution, one of {list(DISTRIBUTIONS)}; got {dict(spec)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"space.{key}: unknown distribution {kind!r}; use one of {list(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space.{key}: {kind} needs a non-empty list of values")
        return
    wanted = 3 if kind.startswith("q") else 2
    if not isinstance(args, list) or len(args) != wanted:
        raise ConfigError(f"space.{key}: {kind} needs [{'low, high, step' if wanted == 3 else 'low, high'}]")
    low, high = float(args[0]), float(args[1])
    if not low < high and not (kind == "randint" and low == high):
        raise ConfigError(f"space.{key}: {kind} needs low < high, got {args}")
    if "log" in kind and low <= 0:
        raise ConfigError(f"space.{key}: {kind} needs positive bounds, got {args}")


def _field_type(config_type: type, key: str) -> Any:
    """The annotation a dotted key points at; a clear error naming the first part that does not exist."""
    current: Any = config_type
    walked = []
    for part in key.split("."):
        if not (isinstance(current, type) and dataclasses.is_dataclass(current)):
            raise ConfigError(f"space: {key!r} goes below {'.'.join(walked)!r}, which is not a section")
        hints = typing.get_type_hints(current)
        if part not in hints:
            names = sorted(hints)
            raise ConfigError(f"space: {key!r} names no setting ({part!r} is not one of {names} "
                              f"in {'.'.join(walked) or 'the top level'})")
        walked.append(part)
        current = hints[part]
    return current
