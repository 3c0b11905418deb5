"""pydantic-backed config validation: every error at once with its dotted path, the old strictness kept."""

from pathlib import Path

import pytest

from metallo_core.config import from_dict, load_config
from metallo_core.errors import ConfigError
from metallo_core.ssl.config import DinoConfig
from tests.test_config import Job, Optimizer

TINY_DINO = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml"


def test_several_errors_at_once_each_with_its_path():
    with pytest.raises(ConfigError) as caught:
        from_dict(Job, {"epochs": "many", "crops": [1, "x"], "extra": 1,
                        "optimizer": {"name": "lamb", "lr": "fast", "betas": [1, 2, 3], "momentum": 0.9}})
    lines = str(caught.value).splitlines()
    assert lines[0] == "8 settings are invalid:"
    assert sorted(line.removeprefix("  - ") for line in lines[1:]) == sorted([
        "setting data_uri is required",
        "epochs must be an integer, got 'many'",
        "crops[1] must be an integer, got 'x'",
        "optimizer.name must be one of 'sgd', 'adamw', got 'lamb'",
        "optimizer.lr must be a number, got 'fast'",
        "optimizer.betas must have 2 items, got 3",
        "unknown setting(s) optimizer.momentum; optimizer accepts: betas, lr, name",
        "unknown setting(s) extra; the top level accepts: crops, data_uri, epochs, note, optimizer",
    ])


def test_where_prefixes_every_path():
    with pytest.raises(ConfigError, match=r"^optimizer must be a mapping of settings, got 3$"):
        from_dict(Job, {"data_uri": "x", "optimizer": 3})
    with pytest.raises(ConfigError, match=r"^job\.epochs must be an integer, got 1\.5$"):
        from_dict(Job, {"data_uri": "x", "epochs": 1.5}, "job")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epochs": "3"}, "epochs must be an integer, got '3'"),
        ({"epochs": False}, "epochs must be an integer, got False"),
        ({"optimizer": {"lr": True}}, "optimizer.lr must be a number, got True"),
        ({"data_uri": True}, "data_uri must be a string, got True"),
        ({"crops": "224"}, "crops must be a list, got '224'"),
    ],
)
def test_lax_coercions_that_hide_mistakes_are_refused(data, message):
    with pytest.raises(ConfigError, match=f"^{message}$".replace("[", r"\[").replace("(", r"\(")):
        from_dict(Job, {"data_uri": "x", **data})


def test_conversions_yaml_needs_are_kept():
    job = from_dict(Job, {"data_uri": 7, "epochs": 3.0, "crops": (64.0, 32),
                          "optimizer": {"lr": "1e-4", "betas": [1, 0.5]}})
    assert job.data_uri == "7"
    assert job.epochs == 3 and type(job.epochs) is int
    assert job.crops == [64, 32]
    assert job.optimizer == Optimizer(lr=1e-4, betas=(1.0, 0.5))
    assert all(type(beta) is float for beta in job.optimizer.betas)


def test_a_stage_config_reports_type_errors_of_file_and_overrides_together():
    with pytest.raises(ConfigError) as caught:
        load_config(DinoConfig, TINY_DINO, ["optim.lr=fast", "epochs=true", "compute.use_gpu=1", "knn.kk=3"])
    message = str(caught.value)
    assert message.startswith("4 settings are invalid:")
    for expected in ("optim.lr must be a number, got 'fast'", "epochs must be an integer, got True",
                     "compute.use_gpu must be true or false, got 1", "unknown setting(s) knn.kk; knn accepts: "):
        assert expected in message


def test_validate_checks_of_separate_sections_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        load_config(DinoConfig, TINY_DINO, ["optim.lr=-1", "knn.k=0"])
    assert str(caught.value).splitlines()[1:] == ["  - optim.lr must be positive, got -1.0", "  - knn.k must be >= 1"]


def test_a_sections_own_check_waits_for_its_sub_sections():
    # DinoConfig.validate compares backbone and multicrop sizes; with optim broken it is not consulted.
    with pytest.raises(ConfigError, match=r"^optim\.lr must be positive, got -1\.0$"):
        load_config(DinoConfig, TINY_DINO, ["optim.lr=-1", "multicrop.global_size=96"])
