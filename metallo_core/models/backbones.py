"""Feature backbones (torchvision and timm classification networks, classifier removed) and the
`BackboneSpec` that says how to rebuild one.

A `BackboneSpec` (library, architecture, stem, input size, normalisation, where the weights came from)
travels with every checkpoint and registered model, so any stage can reconstruct the exact network
with `build_backbone(spec)` and load weights with `torch.load(..., weights_only=True)`. Where weights
come from (scratch, files, the offline ImageNet EfficientNet-Lite0, downloads, the registry) is
`metallo_core.models.sources`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import nn

from metallo_core.config import require
from metallo_core.models.architectures import (
    build_feature_extractor,
    check_architecture,
    feature_dim,
    torchvision_family,
)

# The ResNets the small-input stem and the multi-label encoder were written for (kept for old callers).
Architecture = Literal["resnet18", "resnet34", "resnet50"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
RESNET_FAMILIES = ("resnet", "wide_resnet", "resnext")


@dataclass
class BackboneSpec:
    arch: str = "resnet18"  # a torchvision or timm model name, e.g. resnet50, tf_efficientnet_lite0
    # CIFAR-style stem (3x3 conv, stride 1, no max-pool) for 32-96 px inputs, where the ImageNet stem
    # would shrink the image 4x before the first block. torchvision ResNets only.
    small_input: bool = False
    # The size the backbone runs at (its native size for pretrained weights: 224 for ImageNet networks).
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the normalisation its weights expect
    std: tuple[float, float, float] = IMAGENET_STD
    library: str = "torchvision"  # torchvision | timm
    # Provenance only: the weights source the network started from (e.g. imagenet-offline,
    # file:/path#sha256=..., models:/metallo-backbone/3). build_backbone ignores it.
    weights: str = ""

    @property
    def feature_dim(self) -> int:
        """D of the pooled features (B, D) the backbone returns."""
        if self.library == "torchvision" and self.arch in FEATURE_DIMS:
            return FEATURE_DIMS[self.arch]
        return feature_dim(self.library, self.arch)

    @property
    def is_resnet(self) -> bool:
        return self.library == "torchvision" and (torchvision_family(self.arch) or "") in RESNET_FAMILIES

    def validate(self) -> None:
        check_architecture(self.library, self.arch)
        require(16 <= self.image_size <= 1024, f"backbone.image_size must be 16..1024, got {self.image_size}")
        require(not self.small_input or self.is_resnet,
                f"backbone.small_input (the CIFAR-style stem) exists for torchvision ResNets only, not "
                f"{self.library} {self.arch}; run a pretrained network at its own image_size instead")
        require(len(self.mean) == 3 and len(self.std) == 3 and all(s > 0 for s in self.std),
                f"backbone.mean and backbone.std need 3 values (RGB), std > 0; got {self.mean}, {self.std}")

    def to_json(self) -> str:
        # feature_dim is derived, but written out so a reader of the file sees the embedding width.
        return json.dumps({**asdict(self), "feature_dim": self.feature_dim})

    @classmethod
    def from_json(cls, text: str) -> BackboneSpec:
        """Also reads files written before `library` and `weights` existed (they get the defaults)."""
        data = json.loads(text)
        data.pop("feature_dim", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"backbone spec has unknown fields {unknown}; written by a newer metallo?")
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """A randomly initialised network whose forward maps normalised images (B, 3, H, W) to pooled
    features (B, spec.feature_dim)."""
    backbone = build_feature_extractor(spec.library, spec.arch, spec.image_size)
    if spec.small_input:
        if not spec.is_resnet:
            raise ValueError(f"small_input is for torchvision ResNets, not {spec.library} {spec.arch}")
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    return backbone


def convert_sync_batchnorm(network: nn.Module, spec: BackboneSpec) -> nn.Module:
    """BatchNorm layers synchronised across processes. timm networks use BatchNormAct2d (a BatchNorm with
    its activation inside), which torch's converter would replace by a bare SyncBatchNorm, silently
    dropping the activation; timm's converter keeps it (and converts plain BatchNorm too)."""
    if spec.library == "timm":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(network)
    return nn.SyncBatchNorm.convert_sync_batchnorm(network)


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain CPU state dict, unwrapping DDP/compile wrappers so keys match `build_backbone`."""
    module = getattr(backbone, "module", backbone)
    module = getattr(module, "_orig_mod", module)
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
