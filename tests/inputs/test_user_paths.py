"""`~` and `$VARIABLES` in every path setting (environment, config, flags) are expanded in one place."""

from __future__ import annotations

import pytest

from metallo_core import cli, tracking
from metallo_core.config import load_config
from metallo_core.errors import ConfigError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.storage import locate
from metallo_core.tuning.config import FinetuneSearchConfig


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATASETS", str(tmp_path / "datasets"))
    return tmp_path


def test_metallo_home_with_a_tilde_names_the_existing_store(home, monkeypatch):
    (home / "metallo-runs").mkdir()
    monkeypatch.setenv("METALLO_HOME", "~/metallo-runs")
    assert tracking.local_home() == home / "metallo-runs"
    assert tracking.local_home().is_dir()


def test_config_path_settings_expand_tilde_and_variables(home):
    config = load_config(MetaTrainConfig, None, ["data.uri=$DATASETS/fewshot", "run.storage=~/ray"])
    assert config.data.uri == str(home / "datasets" / "fewshot")
    assert config.run.storage == str(home / "ray")
    search = load_config(FinetuneSearchConfig, "tuning/configs/finetune_tiny_cpu.yaml",
                         ["search.storage=${DATASETS}/tune", "search.best_config_out=~/best.yaml"])
    assert search.search.storage == str(home / "datasets" / "tune")
    assert search.search.best_config_out == str(home / "best.yaml")


def test_an_unset_variable_is_an_error_naming_the_setting(home):
    with pytest.raises(ConfigError, match=r"data\.uri.*NO_SUCH_VARIABLE.*not set"):
        load_config(MetaTrainConfig, None, ["data.uri=$NO_SUCH_VARIABLE/fewshot"])


def test_flags_and_locations_expand_too(home, capsys):
    assert locate("~/x").path == str(home / "x")
    assert locate("s3://bucket/p").uri == "s3://bucket/p"
    (home / "datasets").mkdir()
    code = cli.main(["data", "info", "$DATASETS/missing"])
    err = capsys.readouterr().err
    assert code == 2 and str(home / "datasets" / "missing") in err
