"""Declared properties checked against the dataset's label columns, and their target arrays.

A property is a label column of the dataset (`manifest.extra_columns`), or `label`, the dataset's own
class. Class columns become classification heads; value columns become regression heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from metallo_core.data.manifest import Manifest
from metallo_core.errors import ConfigError, DataError
from metallo_core.multilabel.config import PropertySettings

DATASET_LABEL = "label"  # the dataset's own class as a property


@dataclass
class PropertyInfo:
    """A property as the model sees it; saved with the model so `predict` can name classes and units."""

    name: str
    kind: Literal["class", "value"]
    classes: list[str] = field(default_factory=list)  # classification: class names by id
    weight: float = 1.0
    loss: Literal["cross_entropy", "mse", "huber"] = "cross_entropy"
    huber_delta: float = 1.0
    # Regression targets are standardised with the training set's statistics; outputs are mapped back.
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def is_class(self) -> bool:
        return self.kind == "class"

    @property
    def output_dim(self) -> int:
        return len(self.classes) if self.is_class else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PropertyInfo:
        return cls(**dict(data))


def resolve_properties(declared: list[PropertySettings], manifest: Manifest) -> list[PropertyInfo]:
    """Match declared properties to the dataset's label columns; clear errors name the setting and column."""
    columns = manifest.extra_columns
    if not declared:
        if not columns:
            raise DataError(
                f"dataset {manifest.name!r} declares no label columns; declare `properties` in the config "
                f"(e.g. `- name: {DATASET_LABEL}` to predict the dataset's own class)"
            )
        declared = [PropertySettings(name) for name in columns]
    available = ", ".join([*columns, DATASET_LABEL])
    resolved = []
    for index, prop in enumerate(declared):
        where = f"properties[{index}] ({prop.name!r})"
        if prop.name == DATASET_LABEL:
            column_kind, classes = "class", manifest.class_names
        elif prop.name in columns:
            column_kind, classes = columns[prop.name].kind, list(columns[prop.name].classes)
        else:
            raise DataError(f"{where} is not a label column of dataset {manifest.name!r}; its label columns are: "
                            f"{available}")
        kind = column_kind if prop.kind == "auto" else prop.kind
        if kind == "class" and column_kind == "value":
            raise ConfigError(
                f"{where} is declared kind 'class' but column {prop.name!r} of dataset {manifest.name!r} holds "
                "continuous float values; declare `kind: value` to regress it, or add a binned class column"
            )
        if kind == "value" and column_kind == "class":
            raise ConfigError(
                f"{where} is declared kind 'value' but column {prop.name!r} holds class ids "
                f"({len(classes)} classes); regressing ids is not meaningful, declare `kind: class`"
            )
        if kind == "class" and len(classes) < 2:
            raise DataError(f"{where}: column {prop.name!r} lists {len(classes)} class name(s) in the manifest; "
                            "a classification head needs at least 2")
        resolved.append(PropertyInfo(
            name=prop.name,
            kind=kind,
            classes=classes if kind == "class" else [],
            weight=prop.weight,
            loss="cross_entropy" if kind == "class" else prop.regression_loss,
            huber_delta=prop.huber_delta,
        ))
    return resolved


def property_targets(properties: list[PropertyInfo], extras: Mapping[str, np.ndarray],
                     dataset_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Target array per property (int64 class ids or float32 values), checked against the declarations."""
    targets = {}
    for prop in properties:
        values = dataset_labels if prop.name == DATASET_LABEL else extras.get(prop.name)
        if values is None:
            raise DataError(f"label column {prop.name!r} was not read from the dataset")
        values = np.asarray(values)
        if prop.is_class:
            if not np.issubdtype(values.dtype, np.integer):
                raise DataError(f"label column {prop.name!r} holds {values.dtype} values, but a classification "
                                "property needs integer class ids; declare `kind: value` to regress it")
            bad = (values < 0) | (values >= len(prop.classes))
            if bad.any():
                raise DataError(f"label column {prop.name!r} has {int(bad.sum())} id(s) "
                                f"outside 0..{len(prop.classes) - 1} "
                                f"(the manifest lists {len(prop.classes)} classes); the dataset is inconsistent")
            targets[prop.name] = values.astype(np.int64)
        else:
            values = values.astype(np.float32)
            missing = ~np.isfinite(values)
            if missing.any():
                raise DataError(f"label column {prop.name!r} has {int(missing.sum())} missing or non-finite value(s); "
                                "a regression property needs a value for every image")
            targets[prop.name] = values
    return targets


def with_target_statistics(properties: list[PropertyInfo], targets: Mapping[str, np.ndarray],
                           train_rows: np.ndarray) -> list[PropertyInfo]:
    """Copies of `properties` whose regression targets are standardised with the training rows' mean and std."""
    updated = []
    for prop in properties:
        prop = PropertyInfo.from_dict(prop.to_dict())
        if not prop.is_class:
            values = targets[prop.name][train_rows].astype(np.float64)
            prop.target_mean = float(values.mean())
            prop.target_std = float(max(values.std(), 1e-6))
        updated.append(prop)
    return updated
