"""Choosing the feature set on the validation rows: names, column layout, the choice rule, the config
switch between auto and an explicit set, and a choice that the test rows cannot move (no Ray, no MLflow)."""

import math
from pathlib import Path

import numpy as np
import pytest

from metallo_core.config import from_dict, load_config
from metallo_core.errors import ConfigError
from metallo_core.multilabel.config import ExperimentsConfig, MultilabelConfig
from metallo_core.multilabel.feature_layers import (
    DEFAULT_CANDIDATES,
    CandidateScore,
    FeatureLayers,
    choose,
    widest,
)
from metallo_core.multilabel.features import InputTable
from metallo_core.multilabel.grid import trial_specs
from metallo_core.multilabel.properties import PropertyInfo
from metallo_core.train.multilabel import PreparedInputs, train_choosing_layers, with_feature_layers


@pytest.mark.parametrize("name, early, final", [("final", 0, True), ("early1", 1, False), ("early2+final", 2, True),
                                                ("early12", 12, False)])
def test_feature_set_names_round_trip(name, early, final):
    layers = FeatureLayers.parse(name)
    assert (layers.early_stages, layers.final) == (early, final) and layers.name == name


@pytest.mark.parametrize("name", ["early0", "early", "final+early2", "auto", "early2+", "Final"])
def test_bad_feature_set_names_are_refused_with_the_setting(name):
    with pytest.raises(ConfigError, match="backbone.feature_layers"):
        FeatureLayers.parse(name)


def test_columns_pick_each_set_out_of_the_widest_table():
    widths, total = (16, 24), 16 + 24 + 1280  # [stage 1 | stage 2 | final], as the pooled encoder lays it out
    assert np.array_equal(FeatureLayers.parse("early1").columns(widths, total), np.arange(16))
    assert np.array_equal(FeatureLayers.parse("early2").columns(widths, total), np.arange(40))
    assert np.array_equal(FeatureLayers.parse("final").columns(widths, total), np.arange(40, total))
    assert np.array_equal(FeatureLayers.parse("early1+final").columns(widths, total),
                          np.r_[np.arange(16), np.arange(40, total)])
    with pytest.raises(ConfigError, match="early3 is not in a table of 2 stage"):
        FeatureLayers.parse("early3").columns(widths, total)
    with pytest.raises(ConfigError, match="early1\\+final is not in a table"):
        FeatureLayers.parse("early1+final").columns(widths, 40)  # a table without the final features
    assert widest([FeatureLayers.parse(n) for n in ("early1", "final", "early2")]) == FeatureLayers(2, True)
    assert widest([FeatureLayers.parse(n) for n in ("early1", "early2")]) == FeatureLayers(2, False)


def _score(name, error, loss=1.0):
    return CandidateScore(FeatureLayers.parse(name), error, loss)


def test_the_lowest_validation_error_wins_and_a_tie_goes_to_the_earlier_candidate():
    assert choose([_score("final", 0.45), _score("early1", 0.02), _score("early2", 0.01)]) == 2
    # Equal errors: the earlier one, even with a higher loss (the list order is the cost order).
    assert choose([_score("early1", 0.01, loss=0.9), _score("early2", 0.01, loss=0.1), _score("final", 0.3)]) == 0
    assert choose([_score("early2", 0.0), _score("early2+final", 0.0)]) == 0
    # Regression-only models have no error: the validation loss decides.
    assert choose([_score("final", math.nan, 0.5), _score("early1", math.nan, 0.2)]) == 1
    with pytest.raises(ValueError, match="no feature-set candidates"):
        choose([])


def test_auto_is_the_default_and_explicit_settings_bypass_it():
    config = load_config(MultilabelConfig, None, ["data.uri=/d"])
    assert config.backbone.feature_layers == "auto" and config.chooses_feature_layers
    assert config.feature_layers is None and config.backbone.feature_candidates == list(DEFAULT_CANDIDATES)
    # The older keys name a set exactly as before auto existed (unset ones read 0 stages / final features).
    legacy = load_config(MultilabelConfig, None, ["data.uri=/d", "backbone.pooled_early_stages=2",
                                                  "backbone.final_features=false"])
    assert not legacy.chooses_feature_layers and legacy.feature_layers == FeatureLayers(2, False)
    assert load_config(MultilabelConfig, None, ["data.uri=/d", "backbone.pooled_early_stages=1"]).feature_layers \
        == FeatureLayers(1, True)
    assert load_config(MultilabelConfig, None, ["data.uri=/d", "backbone.pooled_early_stages=0"]).feature_layers \
        == FeatureLayers(0, True)
    named = load_config(MultilabelConfig, None, ["data.uri=/d", "backbone.feature_layers=early2+final"])
    assert not named.chooses_feature_layers and named.feature_layers == FeatureLayers(2, True)
    configs = Path(__file__).resolve().parents[2] / "configs" / "multilabel"
    shipped = load_config(MultilabelConfig, configs / "seed002_bifurcated.yaml", [])
    assert not shipped.chooses_feature_layers and shipped.feature_layers == FeatureLayers(2, False)
    grid = load_config(ExperimentsConfig, configs / "seed002_experiments.yaml", [])
    assert grid.feature_layers == FeatureLayers(2, False)
    # An unfrozen stage trains on images: auto keeps the final features rather than train once per candidate.
    unfrozen = load_config(MultilabelConfig, None, ["data.uri=/d", "backbone.unfreeze_last_stage=true"])
    assert not unfrozen.chooses_feature_layers and unfrozen.feature_layers == FeatureLayers(0, True)


@pytest.mark.parametrize("overrides, message", [
    (["backbone.feature_layers=early2", "backbone.pooled_early_stages=2"], "both choose the features"),
    (["backbone.feature_layers=early0"], "backbone.feature_layers: 'early0' is not a feature set"),
    (["backbone.feature_candidates=[final, early9x]"], "backbone.feature_candidates: 'early9x'"),
    (["backbone.feature_candidates=[final, final]"], "lists a set twice"),
    (["backbone.feature_candidates=[]"], "at least one feature set"),
    (["optim.validation_fraction=0"], "auto chooses the features on the validation rows"),
])
def test_config_errors_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MultilabelConfig, None, ["data.uri=/d", *overrides])


def test_the_grid_does_not_choose_and_its_trials_read_the_table_it_extracts():
    grid = from_dict(ExperimentsConfig, {"data": {"uri": "/d"}})
    assert not grid.chooses_feature_layers and grid.feature_layers == FeatureLayers(0, True)
    trial = trial_specs(grid)[0]["config"]
    assert trial["backbone"]["feature_layers"] == "final"
    assert from_dict(MultilabelConfig, trial).feature_layers == FeatureLayers(0, True)


def _classes(name, count):
    return PropertyInfo(name=name, kind="class", classes=[str(i) for i in range(count)])


def _layered_table(rows: int, test_signal_in_final: np.ndarray | None = None) -> InputTable:
    """Features laid out [stage 1 (4) | stage 2 (4) | final (8)]: the class shows only in stage 1's columns
    (the final columns are noise), except on `test_signal_in_final` rows, where it is the other way round."""
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 4
    centres = rng.normal(size=(4, 4)) * 3
    inputs = rng.normal(size=(rows, 16)).astype(np.float32)
    inputs[:, :4] += centres[labels]
    if test_signal_in_final is not None:
        inputs[test_signal_in_final, :4] = rng.normal(size=(len(test_signal_in_final), 4))
        inputs[test_signal_in_final, 8:12] += centres[labels[test_signal_in_final]]
    return InputTable(inputs.astype(np.float32), labels, {"kind": labels}, [f"{i}.png" for i in range(rows)],
                      "features", extras_order=["kind"])


def _prepared(table: InputTable) -> PreparedInputs:
    rows = np.arange(len(table))
    return PreparedInputs(table, [_classes("kind", 4)], rows[rows % 5 != 0], rows[rows % 5 == 0], 32, None,
                          layers=FeatureLayers(2, True), stage_widths=(4, 4),
                          candidates=[FeatureLayers.parse(name) for name in ("final", "early2", "early1")])


def test_the_choice_reads_the_validation_rows_and_the_test_rows_cannot_move_it():
    config = load_config(MultilabelConfig, None, [
        "data.uri=/d", "head.fc_width=32",
        "optim.validation_fraction=0.25", "optim.max_epochs=40", "optim.patience=10", "optim.lr=0.01"])
    plain = _prepared(_layered_table(240))
    choice = train_choosing_layers(config, plain)
    scores = {score.layers.name: score for score in choice.scores}
    assert list(scores) == ["final", "early2", "early1"]
    assert scores["final"].validation_error > 0.5  # noise: near chance (0.75)
    assert scores["early2"].validation_error < 0.1 and scores["early1"].validation_error < 0.1
    assert choice.layers.name in ("early2", "early1") and choice.scores[choose(choice.scores)].layers == choice.layers
    assert choice.prepared.table.inputs.shape[1] == scores[choice.layers.name].feature_dim
    assert choice.trained.num_validation == 48 and scores[choice.layers.name].feature_dim in (4, 8)

    # The same rows, but on the test rows the class lives in the final columns: a choice made on test
    # errors would now pick final. The validation figures, and so the choice, must not change.
    swapped = _prepared(_layered_table(240, test_signal_in_final=plain.test_rows))
    swapped_choice = train_choosing_layers(config, swapped)
    assert swapped_choice.layers == choice.layers
    assert [(s.validation_error, s.validation_loss) for s in swapped_choice.scores] == \
        [(s.validation_error, s.validation_loss) for s in choice.scores]
    # ... while the test errors did see the swap (so the test above could have failed).
    assert swapped_choice.trained.errors["kind"] > choice.trained.errors["kind"] + 0.3


def test_with_feature_layers_keeps_the_rows_and_takes_the_columns():
    prepared = _prepared(_layered_table(20))
    subset = with_feature_layers(prepared, FeatureLayers.parse("early1+final"))
    assert np.array_equal(subset.table.inputs, prepared.table.inputs[:, [0, 1, 2, 3, *range(8, 16)]])
    assert subset.layers == FeatureLayers(1, True) and np.array_equal(subset.test_rows, prepared.test_rows)
    assert prepared.table.inputs.shape == (20, 16)  # the widest table stays whole for the other candidates


def test_candidates_a_backbone_cannot_compute_are_left_out():
    import torchvision
    from torch import nn

    from metallo_core.models.backbones import BackboneSpec, build_backbone
    from metallo_core.train.multilabel import usable_candidates

    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    wanted = [FeatureLayers.parse(name) for name in ("early1", "early3", "early4", "final")]
    assert [c.name for c in usable_candidates(wanted, resnet)] == ["early1", "early3", "final"]
    vit = build_backbone(BackboneSpec(arch="test_vit", library="timm", image_size=32))
    assert [c.name for c in usable_candidates(wanted, vit)] == ["final"]  # no stage list: final only
    with pytest.raises(ConfigError, match="none of backbone.feature_candidates fits"):
        usable_candidates(wanted[:2], vit)
