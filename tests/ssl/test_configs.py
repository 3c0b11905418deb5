"""Every shipped pretraining config loads and validates (a typo fails here, not on the cluster)."""

from pathlib import Path

import pytest

from metallo_core.config import load_config
from metallo_core.ssl.config import DinoConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_pretrain_config_validates(path):
    config = load_config(DinoConfig, path)
    assert config.data.uri and config.epochs >= 1


def test_the_three_documented_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny_cpu.yaml", "miniimagenet_resnet50.yaml", "imagenet_resnet50_8gpu.yaml"}
