"""Configs that would lie: a YAML key given twice, and a search space value a trial could not use, are
errors before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from metallo_core import cli
from metallo_core.config import load_config
from metallo_core.errors import ConfigError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.tuning.config import FinetuneSearchConfig, MetaTrainSearchConfig

FINETUNE = Path("tuning/configs/finetune_tiny_cpu.yaml").read_text()
METATRAIN = Path("tuning/configs/metatrain_tiny_cpu.yaml").read_text()


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path):
    config = tmp_path / "metatrain.yaml"
    config.write_text("data:\n  uri: d\noptim:\n  lr: 0.1\nepochs: 2\noptim:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=rf"{config}: the key 'optim' is given twice, on line 3 and line 6"):
        load_config(MetaTrainConfig, config)


def test_a_nested_key_given_twice_is_refused_too(tmp_path, capsys):
    config = tmp_path / "metatrain.yaml"
    config.write_text("data:\n  uri: d\noptim:\n  lr: 0.1\n  name: sgd\n  lr: 0.5\n")
    assert cli.main(["metatrain", "--config", str(config), "--print-config"]) == 2
    assert "the key 'lr' is given twice, on line 4 and line 6" in capsys.readouterr().err


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    config = tmp_path / "metatrain.yaml"
    config.write_text("data:\n  uri: d\noptim:\n  <<: {lr: 0.1}\n  lr: 0.2\n")
    assert load_config(MetaTrainConfig, config).optim.lr == 0.2


def _search_config(tmp_path: Path, text: str, old: str, new: str) -> Path:
    assert old in text
    path = tmp_path / "search.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("new, message", [
    ("finetune.update: {choice: [last_stage, lastblock]}",
     r"space\.finetune\.update: choice 'lastblock' is not a valid value \(update must be one of 'all', "
     r"'last_stage', 'last_block', 'batchnorm'"),
    ("finetune.update: {loguniform: [1.0e-4, 1.0e-2]}", r"space\.finetune\.update: lower bound 0\.0001"),
])
def test_a_search_value_a_trial_could_not_use_fails_print_config(tmp_path, capsys, new, message):
    path = _search_config(tmp_path, FINETUNE, "finetune.update: {choice: [last_stage, all]}", new)
    assert cli.main(["tune", "finetune", "--config", str(path), "--print-config"]) == 2
    assert capsys.readouterr().out == ""
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneSearchConfig, path)


def test_bounds_are_checked_against_the_fields_range_and_type(tmp_path):
    lr = _search_config(tmp_path, FINETUNE, "finetune.lr: {loguniform: [1.0e-4, 3.0e-2]}",
                        "finetune.lr: {uniform: [-1.0, 3.0e-2]}")
    with pytest.raises(ConfigError, match=r"space\.finetune\.lr: lower bound -1\.0 is not a valid value.*>= 0"):
        load_config(FinetuneSearchConfig, lr)
    steps = _search_config(tmp_path, FINETUNE, "finetune.steps: {choice: [5, 10, 20]}",
                           "finetune.steps: {uniform: [5, 20]}")
    with pytest.raises(ConfigError, match=r"space\.finetune\.steps: uniform draws fractions.*integer"):
        load_config(FinetuneSearchConfig, steps)
    shot = _search_config(tmp_path, METATRAIN, "episodes.shot: {choice: [1, 5]}", "episodes.shot: {choice: [0, 5]}")
    with pytest.raises(ConfigError, match=r"space\.episodes\.shot: choice 0 is not a valid value"):
        load_config(MetaTrainSearchConfig, shot)


def test_the_shipped_search_configs_pass():
    for name in ("finetune_tiny_cpu", "finetune_synthetic"):
        load_config(FinetuneSearchConfig, f"tuning/configs/{name}.yaml")
    for name in ("metatrain_tiny_cpu", "metatrain_synthetic"):
        load_config(MetaTrainSearchConfig, f"tuning/configs/{name}.yaml")
