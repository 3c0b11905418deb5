"""Search spaces from YAML (pure: no Ray cluster is started): validation, Tune domains, JSON-carried
choices, and applying a trial's parameters to a config."""

import pytest

from metallo_core.config import from_dict, load_config, to_dict
from metallo_core.errors import ConfigError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.fewshot.finetune import FinetuneSettings
from metallo_core.tuning.config import FinetuneSearchConfig, MetaTrainSearchConfig
from metallo_core.tuning.metatrain_search import _epoch_budget
from metallo_core.tuning.space import (
    apply_params,
    decode_params,
    describe_params,
    encode_point,
    to_tune_space,
    validate_space,
)
from metallo_core.tuning.trials import TrialRow, best_trial, trials_table

SPACE = {
    "optim.lr": {"loguniform": [1.0e-3, 1.0e-1]},
    "episodes.shot": {"choice": [1, 5]},
    "epochs": {"randint": [2, 4]},
    "augment_p": {"uniform": ["0.0", 0.5]},
    "bn_mode": "eval",
}


def test_space_becomes_tune_domains_with_inclusive_integer_bounds():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = to_tune_space(SPACE)
    assert isinstance(space["optim.lr"], Float) and space["optim.lr"].lower == pytest.approx(1e-3)
    assert isinstance(space["episodes.shot"], Categorical) and space["episodes.shot"].categories == [1, 5]
    assert isinstance(space["epochs"], Integer) and (space["epochs"].lower, space["epochs"].upper) == (2, 5)
    assert space["bn_mode"] == "eval"
    assert {space["epochs"].sample() for _ in range(200)} == {2, 3, 4}


def test_list_choices_travel_as_strings_and_come_back_as_lists():
    space = to_tune_space({"finetune.augmentations": {"choice": [["crop", "flip"], ["flip", "rot90"]]}})
    categories = space["finetune.augmentations"].categories
    assert all(isinstance(value, str) for value in categories)  # what Optuna's categorical accepts
    params = {"finetune.augmentations": categories[1], "finetune.lr": 0.01}
    assert decode_params(params) == {"finetune.augmentations": ["flip", "rot90"], "finetune.lr": 0.01}
    assert describe_params(params) == "finetune.augmentations=flip+rot90 finetune.lr=0.01"
    plain = apply_params({"finetune": {"lr": 1e-4, "steps": 50}}, params)
    settings = from_dict(FinetuneSettings, plain["finetune"])
    assert settings.augmentations == ("flip", "rot90") and settings.lr == 0.01 and settings.steps == 50


def test_apply_params_sets_nested_keys_without_touching_the_base():
    base = {"optim": {"lr": 0.01, "name": "sgd"}, "episodes": {"way": 5, "shot": 5}}
    trial = apply_params(base, {"optim.lr": 0.05, "episodes.shot": 1})
    assert trial == {"optim": {"lr": 0.05, "name": "sgd"}, "episodes": {"way": 5, "shot": 1}}
    assert base["optim"]["lr"] == 0.01 and base["episodes"]["shot"] == 5


@pytest.mark.parametrize("space, message", [
    ({"optim.learning_rate": {"uniform": [0, 1]}}, "'learning_rate' is not one of"),
    ({"optim.lr.x": {"uniform": [0, 1]}}, "not a section"),
    ({"optim.lr": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
    ({"optim.lr": {"loguniform": [0, 1]}}, "positive bounds"),
    ({"optim.lr": {"uniform": [1, 0]}}, "low < high"),
    ({"optim.lr": {"uniform": [0, 1], "choice": [1]}}, "exactly one distribution"),
    ({"episodes.shot": {"choice": []}}, "non-empty list"),
    ({"run.name": {"choice": ["a", "b"]}}, "cannot be searched"),
    ({}, "space is empty"),
])
def test_bad_spaces_are_named(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_space(space, MetaTrainConfig, forbidden=("run", "data"))


def test_points_to_evaluate_must_cover_the_space():
    space = {"finetune.lr": {"loguniform": [1e-4, 1e-2]}, "finetune.augmentations": {"choice": [["crop"]]}}
    point = encode_point({"finetune.lr": 0.003, "finetune.augmentations": ["crop"]}, space)
    assert point["finetune.augmentations"] in to_tune_space(space)["finetune.augmentations"].categories
    with pytest.raises(ConfigError, match="missing"):
        encode_point({"finetune.lr": 0.003}, space)


def test_repository_search_configs_load_and_validate(repo_root):
    for name in ("metatrain_tiny_cpu", "metatrain_synthetic"):
        config = load_config(MetaTrainSearchConfig, repo_root / f"tuning/configs/{name}.yaml")
        to_tune_space(config.space)
    for name in ("finetune_tiny_cpu", "finetune_synthetic"):
        config = load_config(FinetuneSearchConfig, repo_root / f"tuning/configs/{name}.yaml")
        to_tune_space(config.space)
        for point in config.search.points_to_evaluate:
            encode_point(point, config.space)
    with pytest.raises(ConfigError, match="finetune.\\* keys only"):
        load_config(FinetuneSearchConfig, repo_root / "tuning/configs/finetune_tiny_cpu.yaml",
                    ["space={optim.lr: 0.1}"])


def test_asha_budget_is_the_longest_trial(repo_root):
    config = load_config(MetaTrainSearchConfig, repo_root / "tuning/configs/metatrain_synthetic.yaml")
    assert _epoch_budget(config) == 8  # epochs: {choice: [4, 8]}
    config.space["epochs"] = {"randint": [2, 6]}
    assert _epoch_budget(config) == 6
    del config.space["epochs"]
    assert _epoch_budget(config) == config.base.epochs


def test_best_trial_prefers_trials_that_ran_their_whole_budget():
    rows = [
        TrialRow("a", {"lr": 0.1}, 0.70, 2, completed=True),
        TrialRow("b", {"lr": 0.2}, 0.90, 1, completed=False),  # stopped early on a lucky partial mean
        TrialRow("c", {"lr": 0.3}, 0.75, 2, completed=True),
        TrialRow("d", {"lr": 0.4}, None, 0, completed=False, error="boom"),
    ]
    assert best_trial(rows).trial_id == "c"
    table = trials_table(rows, "val_accuracy", "epochs_done", best_trial(rows))
    assert table.splitlines()[2].startswith("| b | 90.00% | 1 | stopped early")
    assert "| c (best) | 75.00% | 2 | completed | 0.3 |" in table
    assert "| d | - | 0 | failed |" in table


def test_the_cached_trunk_settings_are_searchable(repo_root):
    space = ("space={finetune.pseudo_queries: {choice: [pixels, trunk_maps]}, finetune.cache_stage: {choice: [2, 3]}, "
             "finetune.crop_scale: {uniform: [0.35, 1.0]}, finetune.vflip: {choice: [true, false]}}")
    config = load_config(FinetuneSearchConfig, repo_root / "tuning/configs/finetune_tiny_cpu.yaml", [space])
    assert set(to_tune_space(config.space)) == {"finetune.pseudo_queries", "finetune.cache_stage",
                                                "finetune.crop_scale", "finetune.vflip"}
    params = {"finetune.pseudo_queries": "trunk_maps", "finetune.cache_stage": 2, "finetune.crop_scale": 0.5,
              "finetune.vflip": False}
    plain = apply_params({"finetune": to_dict(config.evaluate.finetune)}, params)["finetune"]
    settings = from_dict(FinetuneSettings, plain)
    assert (settings.pseudo_queries, settings.cache_stage, settings.crop_scale, settings.vflip) == (
        "trunk_maps", 2, 0.5, False)
