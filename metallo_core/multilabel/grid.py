"""Seed 002's experiment grid as trials (Ray-free): every (model variant, test fraction) is one
single-model config, named `<variant>@test<fraction>`, trained on the shared features or on the images."""

from __future__ import annotations

from typing import Any

from metallo_core.config import from_dict, to_dict
from metallo_core.multilabel.config import (
    ExperimentsConfig,
    MultilabelConfig,
    VariantSettings,
)

EXPERIMENTS_ONLY_KEYS = ("test_fractions", "variants", "tune")


def variant_properties(config: ExperimentsConfig, variant: VariantSettings) -> list[str]:
    return list(variant.properties) or [prop.name for prop in config.properties]


def trial_config(config: ExperimentsConfig, variant: VariantSettings, test_fraction: float) -> MultilabelConfig:
    """The single-model config one trial trains: the grid's settings with the variant's choices."""
    plain = {key: value for key, value in to_dict(config).items() if key not in EXPERIMENTS_ONLY_KEYS}
    names = variant_properties(config, variant)
    plain["properties"] = [prop for name in names for prop in plain["properties"] if prop["name"] == name]
    plain["encoder"] = variant.encoder
    if config.backbone.explicit_layers is None and config.feature_layers is not None:
        plain["backbone"]["feature_layers"] = config.feature_layers.name  # what the shared table holds
    plain["head"]["fc_width"] = variant.fc_width
    plain["data"]["test_fraction"] = test_fraction
    if variant.max_epochs:
        plain["optim"]["max_epochs"] = variant.max_epochs
    plain["run"]["name"] = trial_name(variant.name, test_fraction)
    plain["registry"]["register"] = False  # a grid of throw-away models; `multilabel train` registers one
    return from_dict(MultilabelConfig, plain)


def trial_name(variant: str, test_fraction: float) -> str:
    return f"{variant}@test{test_fraction:g}"


def trial_specs(config: ExperimentsConfig) -> list[dict[str, Any]]:
    specs = []
    for variant in config.variants:
        for fraction in variant.test_fractions or config.test_fractions:
            single = trial_config(config, variant, fraction)
            specs.append({
                "variant": variant.name,
                "test_fraction": fraction,
                "input": "images" if variant.encoder == "small_cnn" else "features",
                "config": to_dict(single),
            })
    return specs
