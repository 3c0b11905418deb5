from dataclasses import dataclass, field
from typing import Literal

import pytest

from metallo_core.config import apply_overrides, config_hash, flatten, from_dict, load_config, require, to_dict
from metallo_core.errors import ConfigError


@dataclass
class Optimizer:
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        require(self.lr > 0, f"optimizer.lr must be positive, got {self.lr}")


@dataclass
class Job:
    data_uri: str
    epochs: int = 10
    crops: list[int] = field(default_factory=lambda: [224, 96])
    optimizer: Optimizer = field(default_factory=Optimizer)
    note: str | None = None


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data_uri: s3://bucket/ds\nepochs: 3\noptimizer:\n  lr: 1e-4\n")
    job = load_config(Job, path, ["optimizer.name=sgd", "crops=[64, 32]", "note=hello"])
    assert job.data_uri == "s3://bucket/ds"
    assert job.epochs == 3
    assert job.optimizer == Optimizer(name="sgd", lr=1e-4)
    assert job.crops == [64, 32]
    assert job.note == "hello"


def test_unknown_key_names_the_setting_and_the_choices():
    with pytest.raises(ConfigError, match=r"optimizer\.momentum.*accepts: betas, lr, name"):
        from_dict(Job, {"data_uri": "x", "optimizer": {"momentum": 0.9}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epochs": 3}, "setting data_uri is required"),
        ({"data_uri": "x", "epochs": "many"}, "epochs must be an integer"),
        ({"data_uri": "x", "optimizer": {"name": "lamb"}}, "optimizer.name must be one of 'sgd', 'adamw'"),
        ({"data_uri": "x", "optimizer": {"lr": -1}}, "optimizer.lr must be positive"),
        ({"data_uri": "x", "optimizer": {"betas": [0.9]}}, "optimizer.betas must have 2 items"),
        ({"data_uri": "x", "epochs": True}, "epochs must be an integer"),
    ],
)
def test_bad_values_raise_clear_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Job, data)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["epochs"])


def test_round_trip_hash_and_flatten():
    job = from_dict(Job, {"data_uri": "x"})
    again = from_dict(Job, to_dict(job))
    assert again == job
    assert config_hash(job) == config_hash(again)
    assert config_hash(job) != config_hash(from_dict(Job, {"data_uri": "y"}))
    flat = flatten(job)
    assert flat["optimizer.lr"] == 1e-3 and flat["crops"] == [224, 96]


def test_a_partial_section_keeps_the_fields_own_default():
    from metallo_core.fewshot.config import MetaTrainConfig

    config = from_dict(MetaTrainConfig, {"data": {"uri": "d"}, "registry": {"alias": "x"}})
    assert (config.registry.name, config.registry.alias) == ("metallo-protonet", "x")
