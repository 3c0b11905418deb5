"""Old spellings of the backbone block (pretraining's init_weights, meta-training's and the grid's backbone.spec,
multi-label's backbone.weights_path) are read as `backbone.source` and the architecture fields for one
release, in YAML files and in key=value overrides, each with one deprecation line naming both keys."""

from __future__ import annotations

import logging

import pytest
import yaml

from metallo_core import config as config_module
from metallo_core.commands.config import config_show
from metallo_core.config import load_config, migrate_section_overrides, to_yaml
from metallo_core.errors import ConfigError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.fewshot.grid import GridConfig
from metallo_core.multilabel.config import ExperimentsConfig, MultilabelConfig
from metallo_core.ssl.config import DinoConfig

DINO_OLD = """
data: {uri: data/x}
backbone: {arch: resnet18, small_input: true, image_size: 32}
multicrop: {global_size: 32, local_size: 16}
init_weights: /weights/w.pth
"""
METATRAIN_OLD = """
data: {uri: data/x}
backbone:
  source: models:/metallo-backbone@current
  spec: {arch: resnet50, small_input: true, image_size: 64}
"""


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch, caplog):
    """Each test sees the deprecation lines its own loading prints (they are printed once per process)."""
    monkeypatch.setattr(config_module, "_ANNOUNCED", set())
    caplog.set_level(logging.WARNING, logger="metallo_core.config")


def write(tmp_path, text: str):
    path = tmp_path / "old.yaml"
    path.write_text(text)
    return path


def deprecation_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "deprecated" in record.getMessage()]


def test_pretraining_init_weights_in_a_file_is_backbone_source_with_one_line(tmp_path, caplog):
    config = load_config(DinoConfig, write(tmp_path, DINO_OLD))
    assert config.backbone.source == "/weights/w.pth" and config.backbone.arch == "resnet18"
    assert config.pretrained_start
    assert deprecation_lines(caplog) == [
        "config: init_weights is deprecated, write backbone.source instead (the old spelling is read for this "
        "release only)"]
    shown = yaml.safe_load(to_yaml(config))  # what --print-config prints
    assert "init_weights" not in shown and shown["backbone"]["source"] == "/weights/w.pth"


def test_pretraining_init_weights_override_replaces_the_files_backbone_source(tmp_path, caplog):
    new = write(tmp_path, DINO_OLD.replace("init_weights: /weights/w.pth", "")
                .replace("{arch: resnet18,", "{source: imagenet-offline, arch: resnet18,"))
    config = load_config(DinoConfig, new, ["init_weights=/other.pth"])
    assert config.backbone.source == "/other.pth"
    assert len(deprecation_lines(caplog)) == 1 and "init_weights" in deprecation_lines(caplog)[0]
    # and the other way round: the new key overrides a file written the old way
    assert load_config(DinoConfig, write(tmp_path, DINO_OLD), ["backbone.source=scratch"]).backbone.source == "scratch"


def test_pretraining_init_weights_null_is_scratch(tmp_path):
    config = load_config(DinoConfig, write(tmp_path, DINO_OLD.replace("/weights/w.pth", "null")))
    assert config.backbone.source == "scratch" and not config.pretrained_start


def test_both_spellings_with_different_values_name_the_new_key(tmp_path):
    both = DINO_OLD.replace("{arch: resnet18,", "{source: imagenet-offline, arch: resnet18,")
    with pytest.raises(ConfigError, match=r"init_weights is the old spelling of backbone.source, and both are set "
                                          r".*keep backbone.source only"):
        load_config(DinoConfig, write(tmp_path, both))


def test_metatraining_backbone_spec_section_is_the_backbone_block(tmp_path, caplog):
    config = load_config(MetaTrainConfig, write(tmp_path, METATRAIN_OLD))
    backbone = config.backbone
    assert (backbone.source, backbone.arch, backbone.small_input, backbone.image_size) == (
        "models:/metallo-backbone@current", "resnet50", True, 64)
    assert deprecation_lines(caplog) == [
        "config: backbone.spec.* is deprecated, write backbone.* instead (the old spelling is read for this "
        "release only)"]
    assert "spec" not in yaml.safe_load(to_yaml(config))["backbone"]


def test_metatraining_backbone_spec_overrides_key_by_key_and_whole(caplog):
    config = load_config(MetaTrainConfig, None, ["data.uri=x", "backbone.source=imagenet-offline",
                                                 "backbone.spec.arch=resnet34",
                                                 "backbone.spec={image_size: 48, small_input: true}"])
    # the whole-section override sets its keys only: the source and the arch set before are kept
    assert (config.backbone.source, config.backbone.arch, config.backbone.image_size) == (
        "imagenet-offline", "resnet34", 48)
    lines = deprecation_lines(caplog)
    assert any("backbone.spec.arch is deprecated, write backbone.arch" in line for line in lines)
    assert any("backbone.spec is deprecated, write backbone instead" in line for line in lines)


def test_metatraining_spec_beside_a_different_new_key_is_an_error():
    with pytest.raises(ConfigError, match="backbone.spec.arch is the old spelling of backbone.arch"):
        config_module.from_dict(MetaTrainConfig, {
            "data": {"uri": "x"}, "backbone": {"arch": "resnet18", "spec": {"arch": "resnet50"}}})


@pytest.mark.parametrize("placeholder", ["auto", "torchvision"])
def test_multilabel_weights_path_is_backbone_source(tmp_path, caplog, placeholder):
    path = write(tmp_path, f"data: {{uri: x}}\nbackbone: {{source: {placeholder}, arch: resnet18, "
                           "weights_path: /w/resnet18.pth}\n")
    for cls in (MultilabelConfig, ExperimentsConfig):
        assert load_config(cls, path).backbone.source == "/w/resnet18.pth"
    assert deprecation_lines(caplog) == [
        "config: backbone.weights_path is deprecated, write backbone.source instead (the old spelling is read "
        "for this release only)"]
    overridden = load_config(MultilabelConfig, None, ["data.uri=x", "backbone.weights_path=/w/r.pth"])
    assert overridden.backbone.source == "/w/r.pth"


def test_multilabel_weights_path_beside_another_source_names_the_new_key():
    with pytest.raises(ConfigError, match=r"backbone.weights_path is the old spelling of backbone.source.*"
                                          r"keep backbone.source only"):
        config_module.from_dict(MultilabelConfig, {"data": {"uri": "x"}, "backbone": {
            "source": "models:/b@current", "weights_path": "/w.pth"}})


def test_grid_source_and_spec_are_each_backbones_block(tmp_path, caplog):
    path = write(tmp_path, "target_uri: data/x\nbackbones:\n  - name: R18\n    source: scratch\n"
                           "    spec: {arch: resnet18, image_size: 24}\n  - name: R50\n    source: pretrain\n"
                           "    spec: {arch: resnet50}\n    pretrain: {init_weights: imagenet-offline}\n")
    first, second = load_config(GridConfig, path).backbones
    assert (first.backbone.source, first.backbone.arch, first.backbone.image_size) == ("scratch", "resnet18", 24)
    assert (second.backbone.source, second.backbone.arch) == ("pretrain", "resnet50")
    lines = deprecation_lines(caplog)
    assert any("backbones[0].source is deprecated, write backbones[0].backbone.source" in line for line in lines)
    assert any("backbones[0].spec.* is deprecated, write backbones[0].backbone.*" in line for line in lines)


def test_quickstart_section_overrides_are_migrated_by_their_stage():
    migrated = migrate_section_overrides({"pretrain": DinoConfig, "metatrain": MetaTrainConfig}, [
        "pretrain.init_weights=/w.pth", "metatrain.backbone.spec.arch=resnet50", "image_size=64",
        "pretrain.epochs=1"])
    assert migrated == ["pretrain.backbone.source=/w.pth", "metatrain.backbone.arch=resnet50", "image_size=64",
                        "pretrain.epochs=1"]


@pytest.mark.parametrize(("stage", "config_type", "line"), [
    ("pretrain", DinoConfig, "#   init_weights -> backbone.source"),
    ("metatrain", MetaTrainConfig, "#   backbone.spec.* -> backbone.*"),
    ("grid", GridConfig, "#   backbones[].spec.* -> backbones[].backbone.*"),
    ("multilabel-train", MultilabelConfig, "#   backbone.weights_path -> backbone.source"),
])
def test_config_show_lists_the_older_spellings_and_shows_the_new_one(stage, config_type, line):
    text = config_show(stage, config_type)
    assert line in text.splitlines()
    shown = yaml.safe_load(text)
    if stage != "grid":
        assert "source" in shown["backbone"] and "spec" not in shown["backbone"] and "init_weights" not in shown
