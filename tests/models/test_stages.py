"""The last stage and the last block per architecture family: the right modules, and trunk -> tail == the
full forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metallo_core.errors import ConfigError
from metallo_core.fewshot.finetune import FinetuneSettings
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.fewshot.task import FewShotTask, SupportSet
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.stages import last_block, last_stage

NORMALIZER = ImageNormalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FAMILIES = [  # spec, expected last-stage names, whether it splits into trunk and tail
    (BackboneSpec(arch="resnet18", small_input=True, image_size=32), ("layer4",), True),
    (BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=64),
     ("blocks.5", "blocks.6", "conv_head", "bn2"), True),
    (BackboneSpec(arch="test_convnext", library="timm", image_size=64), ("stages.3", "norm_pre", "head"), True),
    (BackboneSpec(arch="test_vit", library="timm", image_size=32), ("blocks.5", "norm", "fc_norm"), False),
    (BackboneSpec(arch="efficientnet_b0", image_size=64), ("features.6", "features.7", "features.8"), True),
]


@pytest.mark.parametrize(("spec", "names", "splits"), FAMILIES, ids=lambda v: getattr(v, "arch", None))
def test_last_stage_names_and_split_match_the_full_forward(spec, names, splits):
    torch.manual_seed(0)
    backbone = build_backbone(spec).eval()
    stage = last_stage(backbone)
    owned = {id(p) for p in stage.modules.parameters()}
    assert owned and owned < {id(p) for p in backbone.parameters()}  # a proper part, sharing parameters
    assert_part_is_named_and_splits(stage, backbone, spec, names, splits)


def assert_part_is_named_and_splits(part, backbone, spec, names, splits) -> None:
    """The part's attribute names, and (where it splits) tail(trunk(x)) == the full forward."""
    assert part.names == names
    assert (part.trunk is not None) == splits
    if splits:
        images = torch.randn(2, 3, spec.image_size, spec.image_size)
        with torch.no_grad():
            assert torch.allclose(part.tail(part.trunk(images)), backbone(images), atol=1e-5)


LAST_BLOCKS = [  # spec, expected last-block names, whether it splits into trunk and tail
    (BackboneSpec(arch="resnet18", small_input=True, image_size=32), ("layer4.1",), True),
    (BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=64),
     ("blocks.6.0", "conv_head", "bn2"), True),
    (BackboneSpec(arch="test_resnet", library="timm", image_size=32), ("layer4.0",), False),
]


@pytest.mark.parametrize(("spec", "names", "splits"), LAST_BLOCKS, ids=lambda v: getattr(v, "arch", None))
def test_last_block_names_and_split_match_the_full_forward(spec, names, splits):
    torch.manual_seed(0)
    backbone = build_backbone(spec).eval()
    block = last_block(backbone)
    owned = {id(p) for p in block.modules.parameters()}
    assert owned and owned <= {id(p) for p in last_stage(backbone).modules.parameters()}  # a part of the stage
    assert_part_is_named_and_splits(block, backbone, spec, names, splits)


def test_last_block_of_efficientnet_lite0_is_its_last_block_group_and_the_head():
    """update last_block adapts the part the X-SDD selection chose: EfficientNet-Lite0's last block group
    (one block) and the head conv, all after the cached trunk (models.staged: stages = block groups)."""
    from metallo_core.models.staged import split_backbone

    backbone = build_backbone(BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=64))
    staged = split_backbone(backbone)
    tail = nn.ModuleList([staged.stages[6], staged.head])
    assert {id(p) for p in last_block(backbone).modules.parameters()} == {id(p) for p in tail.parameters()}


def test_last_block_of_an_unknown_network_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"not Sequential; use update: last_stage or all"):
        last_block(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))


def test_last_stage_of_an_unknown_network_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"this backbone \(Sequential\) has none; use update: all"):
        last_stage(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))


@pytest.mark.parametrize("update", ["last_stage", "last_block"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_partial_fast_path_adapts_an_efficientnet_lite_exactly_like_the_full_forward(bn_mode, update, monkeypatch):
    import metallo_core.fewshot.finetune as finetune

    torch.manual_seed(0)
    spec = BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=32)
    model = ProtoNet(build_backbone(spec))
    support = SupportSet(torch.rand(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    task = FewShotTask(support, torch.rand(5, 3, 32, 32))
    settings = FinetuneSettings(pseudo_queries="pixels", steps=3, lr=1e-2, update=update, bn_mode=bn_mode)
    before = model.backbone.blocks[0][0].conv_dw.weight.clone()

    def adapted_logits() -> torch.Tensor:
        return finetune.FinetuneEngine(model, settings, NORMALIZER).task_logits(task,
                                                                               torch.Generator().manual_seed(1))

    fast = adapted_logits()
    monkeypatch.setattr(finetune, "uses_frozen_trunk", lambda stage: False)
    full = adapted_logits()
    plain = finetune.FinetuneEngine(model, settings, NORMALIZER).protonet_logits(task)
    assert torch.allclose(fast, full, atol=1e-4), (fast - full).abs().max()
    assert not torch.allclose(fast, plain, atol=1e-3)  # it did adapt
    assert torch.equal(model.backbone.blocks[0][0].conv_dw.weight, before)  # and restored the weights


def test_sync_batchnorm_conversion_keeps_timm_activations_inside_batchnorm():
    from timm.layers import BatchNormAct2d

    from metallo_core.models.backbones import convert_sync_batchnorm

    torch.manual_seed(0)
    spec = BackboneSpec(arch="tf_efficientnet_lite0", library="timm", image_size=32)
    backbone = build_backbone(spec).eval()
    fused = sum(isinstance(m, BatchNormAct2d) and not isinstance(m.act, nn.Identity) for m in backbone.modules())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(images)
    converted = convert_sync_batchnorm(backbone, spec).eval()
    synced = [m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert fused > 0 and len(synced) >= fused
    assert sum(not isinstance(getattr(m, "act", nn.Identity()), nn.Identity) for m in synced) == fused
    with torch.no_grad():
        assert torch.allclose(converted(images), expected, atol=1e-6)  # eval: same function, activations kept
