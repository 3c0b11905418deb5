"""ResNet feature backbones (torchvision ResNet-18/34/50, fc removed), with a small-input stem option.

A `BackboneSpec` says how to rebuild a backbone (architecture, stem, input size, normalisation); it
travels with every checkpoint and registered model so any stage can reconstruct the exact network
and load weights with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision import models

from metallo_core.config import require
from metallo_core.errors import ConfigError

Architecture = Literal["resnet18", "resnet34", "resnet50"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


@dataclass
class BackboneSpec:
    arch: Architecture = "resnet18"
    # CIFAR-style stem (3x3 conv, stride 1, no max-pool) for 32-96 px inputs, where the ImageNet stem
    # would shrink the image 4x before the first block.
    small_input: bool = False
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIMS[self.arch]

    def validate(self) -> None:
        require(self.arch in FEATURE_DIMS, f"backbone.arch must be one of {sorted(FEATURE_DIMS)}, got {self.arch!r}")
        require(16 <= self.image_size <= 1024, f"backbone.image_size must be 16..1024, got {self.image_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BackboneSpec":
        data = json.loads(text)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """A randomly initialised ResNet whose forward returns pooled features of size `spec.feature_dim`."""
    backbone = getattr(models, spec.arch)(weights=None)
    if spec.small_input:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    return backbone


def load_torchvision_weights(backbone: nn.Module, path: str | Path, spec: BackboneSpec) -> None:
    """Initialise from a torchvision checkpoint file (e.g. resnet50-11ad3fa6.pth) read from local disk.

    Nothing is downloaded: the file must be there. The classifier (`fc.*`) is dropped; with the small
    stem, `conv1` keeps its fresh initialisation because its shape differs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"backbone weights file {path} does not exist; copy the torchvision weights there "
            "(metallo never downloads weights at run time)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConfigError(f"backbone weights file {path} cannot be read as a torch state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    if spec.small_input:
        state = {k: v for k, v in state.items() if not k.startswith("conv1.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape: another architecture
        raise ConfigError(f"backbone weights file {path} does not fit a {spec.arch}: {exc}; check backbone.arch") from exc
    allowed_missing = {"conv1.weight"} if spec.small_input else set()
    if set(missing) - allowed_missing or unexpected:
        raise ConfigError(
            f"backbone weights file {path} does not fit a {spec.arch}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; check backbone.arch"
        )


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain CPU state dict, unwrapping DDP/compile wrappers so keys match `build_backbone`."""
    module = getattr(backbone, "module", backbone)
    module = getattr(module, "_orig_mod", module)
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
