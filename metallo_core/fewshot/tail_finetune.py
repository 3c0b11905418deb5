"""Meta-test fine-tuning of a backbone's last stages on cached trunk features: the cheap form of
`finetune.adapt_to_support` for pretrained networks at their native input size.

The backbone is cut into three parts (`split_backbone`): a frozen trunk (stem and the first stages,
most of the FLOPs), a frozen middle, and the tuned tail (the last stages and the head). The trunk's
output of each image is computed once (`trunk_features`); every fine-tuning step then draws the
pseudo-queries as random resized crops and flips *of those feature maps* (the support's augmented
copies, P>M>F / seed 000 §2.3, moved from pixels to the trunk's output), runs the middle without
gradients and only the tail with them. On EfficientNet-Lite0 at 128 px this makes a step ~100x cheaper
than updating the whole network on augmented pixels, so hundreds of fine-tuned tasks fit a CPU.

Why feature-map crops are a fair pseudo-query: the trunk ends at 1/8 of the input's side, where a crop
of 60-100% of the map is, up to the receptive-field border, the map of a crop of the image, i.e. the
same texture at a slightly different magnification, which is what another image of the class shows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from metallo_core.config import require
from metallo_core.data.tensor_augment import random_resized_crop
from metallo_core.errors import ConfigError
from metallo_core.fewshot.finetune import pseudo_query_views
from metallo_core.fewshot.protonet import prototypes


@dataclass
class TailFinetuneSettings:
    """Defaults chosen on held-apart X-SDD selection tasks (5-way 1-shot, EfficientNet-Lite0 at 128 px,
    100 tasks, FT - PN paired; `benchmarks/real_fewshot.py --select`): tuning the last stage and the head at
    lr 3e-3 gained +4.2 ± 1.6 points with 10 steps and +4.6 ± 1.5 with 30 (crop_scale 0.6); crop_scale 0.35
    gained ~1 point less, lr 1e-2 lost up to 1.1 points, tuning stages 5-6 at lr 1e-3 (30 steps) gained +3.2.
    10 steps: within the noise of the best, at a third of its cost. Then, on 300 selection tasks, more
    pseudo-queries per step: 1 / 4 / 8 per class gained +4.3 / +5.0 / +5.1 points in 10 steps (+4.6 / +5.1
    in 30 steps for 1 and 4). Then, with 8 per class, the scale of the cosine logits in the fine-tuning loss:
    2.5 / 3.5 / 5 / 10 / 20 gained +5.5 / +5.6 / +5.6 / +5.1 / +4.2 (5: the middle of the plateau)."""

    steps: int = 10
    lr: float = 3e-3
    cache_stage: int = 3  # the trunk is the stem and stages [0, cache_stage); its output is cached
    tune_stage: int = 6  # stages [tune_stage, last] and the head are fine-tuned; the ones between are frozen
    crop_scale: float = 0.6  # smallest area fraction of a feature-map crop
    pseudo_queries_per_class: int = 8  # per step, at least one crop of each support map (finetune.pseudo_query_views)
    vflip: bool = True  # vertical flips as well as horizontal (no up/down in a micrograph or steel surface)
    bn_mode: Literal["train", "eval"] = "eval"  # BatchNorm of the tuned tail while adapting
    cosine_scale: float = 5.0  # logits = scale * cosine in the fine-tuning loss (prototype ranking does not use it)

    def validate(self) -> None:
        require(self.steps >= 0, f"finetune steps must be >= 0, got {self.steps}")
        require(self.lr >= 0, f"finetune lr must be >= 0, got {self.lr}")
        require(0 <= self.cache_stage <= self.tune_stage,
                f"finetune cache_stage ({self.cache_stage}) must be <= tune_stage ({self.tune_stage})")
        require(0.05 <= self.crop_scale <= 1.0, f"finetune crop_scale must be in [0.05, 1], got {self.crop_scale}")
        require(self.pseudo_queries_per_class >= 1,
                f"finetune pseudo_queries_per_class must be >= 1, got {self.pseudo_queries_per_class}")
        require(self.bn_mode in ("train", "eval"), f"finetune bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")


class StagedBackbone(nn.Module):
    """A feature backbone as stem -> stages -> head, (B, 3, H, W) -> (B, D); the same network (shared
    modules, no copies) as the backbone it was made from, and the same forward."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.stages, self.head = stem, nn.ModuleList(stages), head

    def run(self, x: Tensor, start: int, stop: int) -> Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.run(self.stem(images), 0, len(self.stages)))


class _PoolFlatten(nn.Module):
    def __init__(self, before: nn.Module) -> None:
        super().__init__()
        self.before = before

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.before(x), 1), 1)


def split_backbone(backbone: nn.Module) -> StagedBackbone:
    """The stages of a timm EfficientNet/MobileNet-style network (`conv_stem`, `bn1`, `blocks`,
    `conv_head`, `bn2`) or of a torchvision ResNet (fc removed). ConfigError for any other network:
    fine-tune it with `finetune.adapt_to_support` (whole backbone) instead."""
    if all(hasattr(backbone, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return StagedBackbone(nn.Sequential(backbone.conv_stem, backbone.bn1), list(backbone.blocks),
                              _PoolFlatten(nn.Sequential(backbone.conv_head, backbone.bn2)))
    if isinstance(backbone, torchvision.models.ResNet) and isinstance(backbone.fc, nn.Identity):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        return StagedBackbone(stem, [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4],
                              _PoolFlatten(nn.Identity()))
    raise ConfigError(
        f"stage-wise fine-tuning needs a timm EfficientNet-style network or a torchvision ResNet, not "
        f"{type(backbone).__name__}; use whole-backbone fine-tuning (finetune.adapt_to_support)")


@torch.no_grad()
def trunk_features(staged: StagedBackbone, images: Tensor, cache_stage: int, batch_size: int = 64) -> Tensor:
    """(N, C, h, w) trunk output of normalised images (N, 3, H, W), in eval mode, float16 to halve memory."""
    staged.eval()
    return torch.cat([staged.run(staged.stem(images[start:start + batch_size]), 0, cache_stage).half()
                      for start in range(0, len(images), batch_size)])


class TailFinetuner:
    """Per-task fine-tuning of the tail from cached trunk features; the tail is restored after each task."""

    def __init__(self, staged: StagedBackbone, settings: TailFinetuneSettings) -> None:
        settings.validate()
        if settings.tune_stage > len(staged.stages):
            raise ConfigError(f"finetune tune_stage {settings.tune_stage} > the backbone's {len(staged.stages)} stages")
        self.staged, self.settings = staged, settings
        self.tail = nn.ModuleList([*staged.stages[settings.tune_stage:], staged.head])
        self._saved = copy.deepcopy(self.tail.state_dict())

    def middle(self, trunk: Tensor) -> Tensor:
        with torch.no_grad():
            return self.staged.run(trunk.float(), self.settings.cache_stage, self.settings.tune_stage)

    def embed_tail(self, middle: Tensor) -> Tensor:
        return self.staged.head(self.staged.run(middle, self.settings.tune_stage, len(self.staged.stages)))

    @torch.no_grad()
    def embed(self, trunk: Tensor, batch_size: int = 256) -> Tensor:
        """(N, D) features of cached trunk outputs with the current tail, eval mode."""
        self.staged.eval()
        return torch.cat([self.embed_tail(self.middle(trunk[start:start + batch_size]))
                          for start in range(0, len(trunk), batch_size)])

    def pseudo_queries(self, support_trunk: Tensor, views: int, generator: torch.Generator) -> Tensor:
        """(views * S, C, h, w): `views` independently augmented copies of the S support maps, view-major."""
        side = support_trunk.shape[-1]
        copies = support_trunk.float().repeat(views, 1, 1, 1)
        return random_resized_crop(copies, side, scale=(self.settings.crop_scale, 1.0),
                                   hflip_p=0.5, vflip_p=0.5 if self.settings.vflip else 0.0,
                                   antialias=False, generator=generator)

    def adapt(self, support_trunk: Tensor, support_labels: Tensor, way: int, generator: torch.Generator,
              on_step: Callable[[int, float], None] | None = None) -> None:
        """`steps` Adam steps on the tail: pseudo-queries (crops of the support's trunk maps) are classified
        by the prototypes of the un-augmented support, recomputed with the current tail every step."""
        settings = self.settings
        parameters = list(self.tail.parameters())
        for parameter in self.staged.parameters():
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=settings.lr)
        self.staged.eval()
        if settings.bn_mode == "train":
            for module in self.tail.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        support_middle = self.middle(support_trunk)
        views = pseudo_query_views(settings.pseudo_queries_per_class, len(support_labels), way)
        pseudo_query_labels = support_labels.repeat(views)
        with torch.enable_grad():
            for step in range(settings.steps):
                query_middle = self.middle(self.pseudo_queries(support_trunk, views, generator))
                features = self.embed_tail(torch.cat([support_middle, query_middle]))
                support_features, query_features = features.split([len(support_middle), len(query_middle)])
                class_prototypes = prototypes(support_features, support_labels, way)
                logits = (settings.cosine_scale * F.normalize(query_features, dim=1)
                          @ F.normalize(class_prototypes, dim=1).T)
                loss = F.cross_entropy(logits, pseudo_query_labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if on_step is not None:
                    on_step(step, float(loss.detach()))
        for parameter in parameters:
            parameter.requires_grad_(False)
        self.staged.eval()

    def restore(self) -> None:
        self.tail.load_state_dict(self._saved)

    def task_logits(self, support_trunk: Tensor, support_labels: Tensor, query_trunk: Tensor, way: int,
                    generator: torch.Generator) -> Tensor:
        """(Q, way) cosine logits after adapting to the support; the tail is restored afterwards."""
        try:
            if self.settings.steps > 0 and self.settings.lr > 0:
                self.adapt(support_trunk, support_labels, way, generator)
            support_features, query_features = self.embed(support_trunk), self.embed(query_trunk)
            class_prototypes = prototypes(support_features, support_labels, way)
            return F.normalize(query_features, dim=1) @ F.normalize(class_prototypes, dim=1).T
        finally:
            self.restore()
