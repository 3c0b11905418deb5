"""A convolutional backbone cut into stem -> stages -> head, so the output of its first stages can be
computed once and cached (`finetune` with `pseudo_queries: trunk_maps`) and the rest run on top of it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from metallo_core.errors import ConfigError


class StagedBackbone(nn.Module):
    """A feature backbone as stem -> stages -> head, (B, 3, H, W) -> (B, D); the same network (shared
    modules, no copies) as the backbone it was made from, and the same forward."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.stages, self.head = stem, nn.ModuleList(stages), head

    def run(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Stages [start, stop) applied to `x`, the output of stage start - 1 (or of the stem for 0)."""
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def trunk(self, images: Tensor, cache_stage: int) -> Tensor:
        """(B, C, h, w): the stem and stages [0, cache_stage) of normalised images."""
        return self.run(self.stem(images), 0, cache_stage)

    def from_trunk(self, maps: Tensor, cache_stage: int) -> Tensor:
        """(B, D) features from `trunk(images, cache_stage)`: the stages after it and the head."""
        return self.head(self.run(maps, cache_stage, len(self.stages)))

    def forward(self, images: Tensor) -> Tensor:
        return self.from_trunk(self.trunk(images, 0), 0)


class _PoolFlatten(nn.Module):
    def __init__(self, before: nn.Module) -> None:
        super().__init__()
        self.before = before

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.before(x), 1), 1)


def split_backbone(backbone: nn.Module) -> StagedBackbone:
    """The stages of a timm EfficientNet/MobileNet-style network (`conv_stem`, `bn1`, `blocks`,
    `conv_head`, `bn2`; stages = its block groups) or of a torchvision ResNet with `fc` removed (stages =
    layer1..layer4). ConfigError for any other network (ViT, Swin, ...), naming `finetune.pseudo_queries`."""
    module: Any = getattr(backbone, "_orig_mod", getattr(backbone, "module", backbone))  # torch.compile, DDP
    if all(hasattr(module, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return StagedBackbone(nn.Sequential(module.conv_stem, module.bn1), list(module.blocks),
                              _PoolFlatten(nn.Sequential(module.conv_head, module.bn2)))
    if isinstance(module, torchvision.models.ResNet) and isinstance(module.fc, nn.Identity):
        stem = nn.Sequential(module.conv1, module.bn1, module.relu, module.maxpool)
        return StagedBackbone(stem, [module.layer1, module.layer2, module.layer3, module.layer4],
                              _PoolFlatten(nn.Identity()))
    raise ConfigError(
        f"finetune.pseudo_queries 'trunk_maps' caches the output of a network's first stages, which needs a timm "
        f"EfficientNet-style network or a torchvision ResNet, not {type(module).__name__}; "
        "use finetune.pseudo_queries: pixels")
