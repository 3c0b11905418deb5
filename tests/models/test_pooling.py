"""Early-stage pooling: the stage lists per family, averages equal to a hand-run forward, hooks that stay
quiet outside the encoder's own forward, and an encoder that survives torch.export."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from metallo_core.errors import ConfigError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.pooling import StageAverages, early_stage_names, pooled_with_early_stages
from metallo_core.models.stages import stage_names
from metallo_core.multilabel.model import ImageEncoder, backbone_image_encoder

STAGES = [
    (BackboneSpec(arch="resnet18", small_input=True, image_size=32), ("layer1", "layer2", "layer3", "layer4")),
    (BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=64),
     tuple(f"blocks.{i}" for i in range(7))),
    (BackboneSpec(arch="efficientnet_b0", image_size=64), tuple(f"features.{i}" for i in range(1, 8))),
    (BackboneSpec(arch="test_convnext", library="timm", image_size=64), tuple(f"stages.{i}" for i in range(4))),
]


@pytest.mark.parametrize(("spec", "names"), STAGES, ids=lambda v: getattr(v, "arch", None))
def test_stage_names_per_family(spec, names):
    backbone = build_backbone(spec)
    assert stage_names(backbone) == names
    assert early_stage_names(backbone, 2) == names[:2]
    with pytest.raises(ConfigError, match="pooled_early_stages must be in 0"):
        early_stage_names(backbone, len(names))


def test_a_vit_has_no_stage_list():
    with pytest.raises(ConfigError, match="no stage list"):
        stage_names(build_backbone(BackboneSpec(arch="test_vit", library="timm", image_size=32)))


def test_stage_averages_equal_a_hand_run_resnet_forward():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.eval()
    images = torch.randn(3, 3, 64, 64)
    averages = StageAverages(resnet, ("layer1", "layer2"))
    with torch.no_grad():
        pooled = pooled_with_early_stages(resnet, averages, images)
        stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
        layer1 = resnet.layer1(stem)
        layer2 = resnet.layer2(layer1)
        expected = torch.cat([layer1.mean((2, 3)), layer2.mean((2, 3)), resnet(images)], 1)
        only_early = pooled_with_early_stages(resnet, averages, images, include_final=False)
    assert pooled.shape == (3, 64 + 128 + 512)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(only_early, expected[:, :192])


def test_hooks_collect_only_inside_the_encoders_forward():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    encoder = backbone_image_encoder(resnet, (0.5,) * 3, (0.25,) * 3, 1).eval()
    with torch.no_grad():
        for _ in range(3):
            resnet(torch.randn(2, 3, 32, 32))  # the backbone used on its own: nothing is kept
        assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 64 + 512)
    assert encoder._stage_averages._averages is None
    assert encoder.output_dim(32) == 576


def test_an_encoder_without_final_features_needs_early_stages():
    resnet = torchvision.models.resnet18()
    with pytest.raises(ConfigError, match="needs early stages"):
        ImageEncoder(resnet, (0.5,) * 3, (0.25,) * 3, (), final_features=False)


def test_the_pooled_encoder_exports_with_the_same_outputs():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=64))
    encoder = backbone_image_encoder(backbone, (0.5,) * 3, (0.5,) * 3, 2, final_features=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = encoder(images)
        exported = torch.export.export(encoder, (images,)).module()(images)
    assert expected.shape == (2, 16 + 24)
    torch.testing.assert_close(exported, expected)
