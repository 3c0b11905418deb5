"""Backbone weights sources: every file format loads (tiny fabricated checkpoints with the real key
structure), a mismatched file is a clear ConfigError, and sources are recognised by name."""

from __future__ import annotations

import pytest
import torch
import torchvision

from metallo_core.errors import ConfigError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.sources import backbone_from_source, load_file_weights, source_kind

RESNET = BackboneSpec(arch="resnet18", image_size=32)
VIT = BackboneSpec(arch="test_vit", library="timm", image_size=32)  # timm's smallest ViT, DINO ViT key names


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state = b.state_dict()
    return all(torch.equal(value, state[key]) for key, value in a.state_dict().items())


def fabricated(spec: BackboneSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(spec)


@pytest.mark.parametrize(("source", "kind"), [
    ("scratch", "scratch"), ("imagenet-offline", "offline"), ("download", "download"),
    ("download:IMAGENET1K_V2", "download"), ("models:/metallo-backbone@current", "registry"),
    ("runs:/abc/backbone", "registry"), ("/w/resnet50.pth", "file"), ("file:/w/checkpoint.pth#student", "file"),
    ("weights/dino_resnet50_pretrain.pth", "file"),
])
def test_sources_are_recognised_by_name(source, kind):
    assert source_kind(source) == kind


def test_torchvision_classification_file_loads_without_its_classifier(tmp_path):
    torch.manual_seed(1)
    full = torchvision.models.resnet18(weights=None)  # exactly what torchvision's resnet18-*.pth holds
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(full.state_dict(), path)
    backbone, spec = backbone_from_source(str(path), RESNET)
    full.fc = torch.nn.Identity()
    assert same_weights(full, backbone)
    assert spec.weights.startswith(f"file:{path}#sha256=")
    assert backbone.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_dino_resnet_backbone_only_file_loads(tmp_path):
    # The layout of facebookresearch's dino_resnet50_pretrain.pth (a torchvision ResNet without fc),
    # on a ResNet-18 to keep the test fast.
    source = fabricated(RESNET, seed=2)
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(source.state_dict(), path)
    backbone, _ = backbone_from_source(f"file:{path}", RESNET)
    assert same_weights(source, backbone)


def dino_vit_checkpoint(path, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """facebookresearch/dino's checkpoint.pth: the student is DDP-wrapped (module.), both are
    MultiCropWrappers (backbone., head.), and the file also holds the optimiser and counters."""
    head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.ones(16, 1),
            "head.last_layer.weight_v": torch.randn(16, 8)}
    torch.save({
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "dino_loss": {"center": torch.zeros(1, 16)},
    }, path)


def test_dino_vit_full_checkpoint_loads_the_teacher_or_the_student(tmp_path):
    teacher, student = fabricated(VIT, seed=3), fabricated(VIT, seed=4)
    path = tmp_path / "checkpoint.pth"
    dino_vit_checkpoint(path, teacher, student)
    from_teacher, _ = backbone_from_source(str(path), VIT)
    from_student, _ = backbone_from_source(f"file:{path}#student", VIT)
    assert same_weights(teacher, from_teacher) and same_weights(student, from_student)
    assert not same_weights(from_teacher, from_student)


def test_dino_vit_backbone_only_and_timm_files_load(tmp_path):
    # dino_deitsmall16_pretrain.pth: bare ViT keys; a timm file also carries its classifier (head.*).
    source = fabricated(VIT, seed=5)
    bare, with_classifier = tmp_path / "dino_deitsmall16_pretrain.pth", tmp_path / "timm_vit.pth"
    torch.save(source.state_dict(), bare)
    torch.save({**source.state_dict(), "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)},
               with_classifier)
    assert same_weights(source, backbone_from_source(str(bare), VIT)[0])
    assert same_weights(source, backbone_from_source(str(with_classifier), VIT)[0])


def test_a_file_of_another_architecture_is_a_clear_error_naming_file_and_keys(tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(fabricated(VIT, seed=6).state_dict(), path)
    with pytest.raises(ConfigError) as error:
        backbone_from_source(str(path), RESNET)
    message = str(error.value)
    assert str(path) in message and "does not fit a resnet18 (torchvision)" in message
    assert "missing keys [bn1.bias" in message and "unexpected keys [blocks.0." in message
    assert "more)" in message  # counts beyond the few keys shown


def test_a_file_of_another_depth_names_the_tensors_of_another_shape(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(fabricated(BackboneSpec(arch="resnet34"), seed=7).state_dict(), path)
    with pytest.raises(ConfigError, match=r"0 missing; 96 unexpected keys \[layer1\.2\..*Check backbone.arch"):
        backbone_from_source(str(path), RESNET)
    # A small-input-stem ResNet's weights (3x3 conv1) into a standard ResNet: same keys, one other shape.
    small_stem = tmp_path / "small_stem.pth"
    torch.save(fabricated(BackboneSpec(arch="resnet18", small_input=True, image_size=32), seed=7).state_dict(),
               small_stem)
    shape_error = r"1 of another shape keys \[conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)\]"
    with pytest.raises(ConfigError, match=shape_error):
        backbone_from_source(str(small_stem), RESNET)


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.pth does not exist"):
        backbone_from_source(str(tmp_path / "absent.pth"), RESNET)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"garbage\.pth cannot be read as a torch state dict"):
        backbone_from_source(str(garbage), RESNET)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"teacher": fabricated(RESNET, 8).state_dict()}, checkpoint)
    with pytest.raises(ConfigError, match="without a 'student' entry"):
        backbone_from_source(f"{checkpoint}#student", RESNET)


def test_a_small_input_stem_keeps_its_fresh_conv1_when_loading_a_weights_file(tmp_path):
    source = fabricated(RESNET, seed=9)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    small = BackboneSpec(arch="resnet18", small_input=True, image_size=32)
    backbone = build_backbone(small)
    load_file_weights(backbone, str(path), small)
    assert torch.equal(backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert backbone.conv1.weight.shape == (64, 3, 3, 3)


def test_download_is_explicit_and_maps_the_library_weights(monkeypatch):
    # No network in tests: the torchvision weights enum hands over a fabricated state dict.
    source = torchvision.models.resnet18(weights=None)
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict",
                        lambda self, progress=True, **kwargs: source.state_dict())
    backbone, spec = backbone_from_source("download:IMAGENET1K_V1", RESNET)
    source.fc = torch.nn.Identity()
    assert same_weights(source, backbone)
    assert spec.weights == "download:IMAGENET1K_V1" and spec.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError, match="has no weights named 'NOPE'"):
        backbone_from_source("download:NOPE", RESNET)
