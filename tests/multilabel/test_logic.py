"""Pure logic of multi-label training: split, error rates, epochs to saturation, property checks, \
configs, cache keys."""

import numpy as np
import pytest
import torch

from metallo_core.config import from_dict, load_config
from metallo_core.data.manifest import ColumnInfo, Manifest, SplitInfo
from metallo_core.errors import ConfigError, DataError
from metallo_core.multilabel.config import (
    ExperimentsConfig,
    MultilabelConfig,
    PropertySettings,
)
from metallo_core.multilabel.features import feature_cache_key
from metallo_core.multilabel.grid import trial_specs
from metallo_core.multilabel.properties import (
    PropertyInfo,
    property_targets,
    resolve_properties,
    with_target_statistics,
)
from metallo_core.multilabel.split import stratified_split
from metallo_core.multilabel.tables import render_tables
from metallo_core.multilabel.train import (
    cumulative_error,
    epochs_to_saturation,
    error_rates,
)


def nfurcated_manifest() -> Manifest:
    return Manifest(
        name="synthetic-nfurcated", classes={0: "a/vf05", 1: "a/vf10"}, split_kind="rows",
        splits={"train": SplitInfo(["a/vf05", "a/vf10"], 4, {"a/vf05": 2, "a/vf10": 2})}, shards=[],
        image_encoding="png",
        extra_columns={
            "morphology": ColumnInfo("class", [f"m{i}" for i in range(7)]),
            "volume_fraction_class": ColumnInfo("class", [f"{5 * i}%" for i in range(1, 11)]),
            "volume_fraction": ColumnInfo("value"),
        },
    )


@pytest.mark.parametrize("fraction, expected_train", [(0.1, 3150), (0.5, 1750), (0.9, 350), (0.95, 175)])
def test_split_hits_seed002_sizes_exactly_and_keeps_every_class_on_both_sides(fraction, expected_train):
    strata = np.repeat(np.arange(70), 50)  # 7 morphologies x 10 fractions x 50 images
    train, test = stratified_split(strata, fraction, seed=3)
    assert len(train) == expected_train and len(test) == 3500 - expected_train
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).size == 3500
    assert set(strata[train]) == set(strata[test]) == set(range(70))
    per_class = np.bincount(strata[test], minlength=70)
    assert per_class.max() - per_class.min() <= 1  # as even as the total allows
    again_train, _ = stratified_split(strata, fraction, seed=3)
    other_train, _ = stratified_split(strata, fraction, seed=4)
    assert np.array_equal(train, again_train) and not np.array_equal(train, other_train)


def test_error_rates_and_cumulative_error():
    props = [PropertyInfo("m", "class", ["a", "b", "c"]), PropertyInfo("v", "class", ["x", "y"]),
             PropertyInfo("f", "value", target_mean=1.0, target_std=2.0)]
    outputs = {"m": torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 9.0, 0], [0, 0, 9.0]]),
               "v": torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]]),
               "f": torch.tensor([0.0, 0.5, -0.5, 1.0])}  # standardised: values 1, 2, 0, 3
    targets = {"m": torch.tensor([0, 1, 2, 2]), "v": torch.tensor([0, 1, 1, 1]),
               "f": torch.tensor([1.0, 2.0, 1.0, 3.0])}
    errors = error_rates(outputs, targets, props)
    assert errors == pytest.approx({"m": 0.25, "v": 0.75, "f": 0.25})
    assert cumulative_error(errors, props) == pytest.approx(1.0)  # regression MAE is not part of it


def test_epochs_to_saturation_is_the_first_epoch_within_the_tolerance_of_the_lowest_error():
    epochs = [1, 2, 3, 4, 5, 6]
    errors = [0.50, 0.10, 0.031, 0.024, 0.020, 0.022]
    assert epochs_to_saturation(epochs, errors, 0.005) == 4  # 0.024 <= 0.020 + 0.005, 0.031 is not
    assert epochs_to_saturation(epochs, errors, 0.0) == 5
    assert epochs_to_saturation(epochs, errors, 0.5) == 1
    assert epochs_to_saturation(epochs, [0.2, 0.105, 0.1], 0.1, relative=True) == 2


def test_default_properties_are_the_dataset_label_columns_with_their_kinds():
    props = resolve_properties([], nfurcated_manifest())
    assert [(p.name, p.kind, p.output_dim) for p in props] == [
        ("morphology", "class", 7), ("volume_fraction_class", "class", 10), ("volume_fraction", "value", 1)]
    assert [p.loss for p in props] == ["cross_entropy", "cross_entropy", "mse"]
    label = resolve_properties([PropertySettings("label")], nfurcated_manifest())[0]
    assert label.is_class and label.classes == ["a/vf05", "a/vf10"]


def test_unknown_property_names_the_setting_and_lists_the_label_columns():
    with pytest.raises(DataError, match=r"properties\[1\] \('grain_size'\) is not a label column .*morphology, "
                                        r"volume_fraction_class, volume_fraction, label"):
        resolve_properties([PropertySettings("morphology"), PropertySettings("grain_size")], nfurcated_manifest())


def test_classification_of_a_float_column_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"'volume_fraction'.*kind 'class'.*float values.*kind: value"):
        resolve_properties([PropertySettings("volume_fraction", kind="class")], nfurcated_manifest())
    with pytest.raises(ConfigError, match=r"kind 'value' but column 'morphology' holds class ids"):
        resolve_properties([PropertySettings("morphology", kind="value")], nfurcated_manifest())


def test_targets_are_checked_against_their_declarations():
    props = resolve_properties([], nfurcated_manifest())
    extras = {"morphology": np.array([0, 6]), "volume_fraction_class": np.array([1, 9]),
              "volume_fraction": np.array([0.1, 0.5], np.float32)}
    targets = property_targets(props, extras, np.array([0, 1]))
    assert targets["morphology"].dtype == np.int64 and targets["volume_fraction"].dtype == np.float32
    with pytest.raises(DataError, match="'morphology' holds float64 values"):
        property_targets(props, {**extras, "morphology": np.array([0.5, 1.5])}, np.array([0, 1]))
    with pytest.raises(DataError, match=r"'morphology' has 1 id\(s\) outside 0..6"):
        property_targets(props, {**extras, "morphology": np.array([0, 7])}, np.array([0, 1]))
    with pytest.raises(DataError, match="'volume_fraction' has 1 missing"):
        property_targets(props, {**extras, "volume_fraction": np.array([0.1, np.nan], np.float32)}, np.array([0, 1]))
    standardised = with_target_statistics(props, targets, np.array([0, 1]))
    assert standardised[2].target_mean == pytest.approx(0.3) and standardised[2].target_std == pytest.approx(0.2)
    assert props[2].target_mean == 0.0  # the original declarations are not modified


def test_config_validation_names_the_setting():
    with pytest.raises(ConfigError, match="data.uri is required"):
        load_config(MultilabelConfig, None, [])
    with pytest.raises(ConfigError, match="data.test_fraction must be in"):
        load_config(MultilabelConfig, None, ["data.uri=x", "data.test_fraction=1.5"])
    with pytest.raises(ConfigError, match="declared more than once"):
        load_config(MultilabelConfig, None, ["data.uri=x", "properties=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="backbone.source must be"):
        load_config(MultilabelConfig, None, ["data.uri=x", "backbone.source=imagenet"])
    with pytest.raises(ConfigError, match="backbone.weights_path is the old spelling of backbone.source, and both"):
        from_dict(MultilabelConfig, {"data": {"uri": "x"},
                                     "backbone": {"source": "models:/b@current", "weights_path": "/w.pth"}})
    with pytest.raises(ConfigError, match=r"variants: v uses \['nope'\]"):
        load_config(ExperimentsConfig, None, ["data.uri=x", "variants=[{name: v, properties: [nope]}]"])


def test_shipped_configs_load_and_the_grid_covers_seed002(repo_root):
    load_config(MultilabelConfig, repo_root / "configs/multilabel/seed002_bifurcated.yaml")
    grid = load_config(ExperimentsConfig, repo_root / "configs/multilabel/seed002_experiments.yaml")
    specs = trial_specs(grid)
    by_variant = {}
    for spec in specs:
        by_variant.setdefault(spec["variant"], []).append(spec["test_fraction"])
    assert by_variant["morphology"] == by_variant["bifurcated-fc1000"] == [0.1, 0.5, 0.9, 0.95]
    assert by_variant["small-cnn-bifurcated"] == [0.1]
    fc100 = next(s for s in specs if s["variant"] == "bifurcated-fc100")["config"]
    assert fc100["head"]["fc_width"] == 100 and not fc100["registry"]["register"]
    assert [p["name"] for p in fc100["properties"]] == ["morphology", "volume_fraction_class"]
    cnn = next(s for s in specs if s["variant"] == "small-cnn-bifurcated")
    assert cnn["input"] == "images" and cnn["config"]["encoder"] == "small_cnn"


def test_cache_key_changes_with_backbone_image_size_dataset_and_split():
    base = dict(backbone_identity="mlflow:models:/m-1", image_size=40, manifest_digest="a" * 64, split="train",
                max_images=0)
    key = feature_cache_key(**base)
    assert key == feature_cache_key(**base)
    for change in ({"backbone_identity": "mlflow:models:/m-2"}, {"image_size": 64}, {"manifest_digest": "b" * 64},
                   {"split": "val"}, {"max_images": 10}):
        assert feature_cache_key(**{**base, **change}) != key


def test_tables_show_seed002_references_next_to_ours():
    grid = from_dict(ExperimentsConfig, {"data": {"uri": "x"}, "test_fractions": [0.1]})
    props = resolve_properties(grid.properties, nfurcated_manifest())
    rows = [
        {"variant": "morphology", "test_fraction": 0.1, "error/morphology": 0.01, "cumulative_error": 0.01,
         "epochs_to_saturation": 40, "epochs_trained": 1024, "num_train": 3150, "num_test": 350},
        {"variant": "bifurcated-fc1000", "test_fraction": 0.1, "error/morphology": 0.02,
         "error/volume_fraction_class": 0.03, "cumulative_error": 0.05, "epochs_to_saturation": 300,
         "epochs_trained": 1024, "num_train": 3150, "num_test": 350},
    ]
    tables = render_tables(rows, grid, props, "models:/metallo-backbone/1")
    assert "| 0.1 | 3150 / 350 | 1.00% | 40 | 1024 | 0.00% | 38 |" in tables
    assert "| bifurcated-fc1000 | 1000 | 0.1 | 5.00% | 300 | 8.01% (split not stated) | 521 |" in tables
    assert "within 0.5 percentage points" in tables
