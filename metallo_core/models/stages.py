"""The "last stage" of a feature backbone, per architecture family: what `finetune.update: last_stage`
adapts and what the multi-label encoder can unfreeze; and its "last block" (`finetune.update: last_block`).

The last stage is everything from the network's last downsampling onwards (the blocks at its coarsest
resolution, plus the layers between them and the pooled features): a ResNet's `layer4`, an EfficientNet's
stages at stride 32 plus its 1x1 head convolution, a ConvNeXt's fourth stage and final norm, a ViT's last
transformer block and final norm. Where the network splits cleanly there, `trunk` and `tail` compute
the same features as the full forward in two parts (`tail(trunk(x)) == backbone(x)`), so fine-tuning
can run the frozen trunk once per task without autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metallo_core.errors import ConfigError

SUPPORTED = ("torchvision ResNet/Wide-ResNet/ResNeXt, EfficientNet, ConvNeXt, ViT, Swin; timm EfficientNet "
             "(incl. EfficientNet-Lite), ConvNeXt, ViT, ResNet")


@dataclass
class LastStage:
    modules: nn.ModuleList  # the updated part (shares parameters with the backbone)
    names: tuple[str, ...]  # their attribute paths in the backbone, e.g. ("layer4",)
    trunk: Callable[[Tensor], Tensor] | None = None  # frozen part: images -> last stage's input
    tail: Callable[[Tensor], Tensor] | None = None  # last stage's input -> pooled features (B, D)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """State-dict / named_parameters prefixes of the last stage, e.g. ("layer4.",)."""
        return tuple(name + "." for name in self.names)


def last_stage(backbone: nn.Module) -> LastStage:
    """The last stage of `backbone` (see the module docstring); ConfigError for an unknown family."""
    import torchvision

    module = getattr(backbone, "_orig_mod", getattr(backbone, "module", backbone))
    if isinstance(module, torchvision.models.ResNet) and isinstance(module.fc, nn.Identity):
        return _stage(module, ("layer4",), _resnet_trunk(module),
                      lambda x: torch.flatten(module.avgpool(module.layer4(x)), 1))
    if isinstance(module, torchvision.models.EfficientNet):
        start = _last_downsampling(list(module.features))
        names = tuple(f"features.{i}" for i in range(start, len(module.features)))
        return _stage(module, names, lambda x: module.features[:start](x),
                      lambda x: torch.flatten(module.avgpool(module.features[start:](x)), 1))
    if isinstance(module, torchvision.models.ConvNeXt):
        last = len(module.features) - 1
        return _stage(module, (f"features.{last}", "classifier"), lambda x: module.features[:last](x),
                      lambda x: module.classifier(module.avgpool(module.features[last](x))))
    if isinstance(module, torchvision.models.VisionTransformer):
        last_layer = list(module.encoder.layers._modules)[-1]  # encoder_layer_11 for ViT-B
        return _stage(module, (f"encoder.layers.{last_layer}", "encoder.ln"))
    if isinstance(module, torchvision.models.SwinTransformer):
        return _stage(module, (f"features.{len(module.features) - 1}", "norm"))
    return _timm_last_stage(module)


def _timm_last_stage(module: nn.Module) -> LastStage:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(module, EfficientNet):
        start = _last_downsampling(list(module.blocks))
        names = tuple(f"blocks.{i}" for i in range(start, len(module.blocks))) + ("conv_head", "bn2")

        def trunk(x: Tensor) -> Tensor:
            return module.blocks[:start](module.bn1(module.conv_stem(x)))

        def tail(x: Tensor) -> Tensor:
            return module.forward_head(module.bn2(module.conv_head(module.blocks[start:](x))))

        return _stage(module, names, trunk, tail)
    if isinstance(module, ConvNeXt):
        last = len(module.stages) - 1

        def trunk(x: Tensor) -> Tensor:
            return module.stages[:last](module.stem(x))

        def tail(x: Tensor) -> Tensor:
            return module.forward_head(module.norm_pre(module.stages[last](x)))

        return _stage(module, (f"stages.{last}", "norm_pre", "head"), trunk, tail)
    if isinstance(module, VisionTransformer):
        return _stage(module, (f"blocks.{len(module.blocks) - 1}", "norm", "fc_norm"))
    if isinstance(module, ResNet) or isinstance(getattr(module, "layer4", None), nn.Module):
        return _stage(module, ("layer4",))  # timm ResNets, and any network with ResNet-style stage names
    raise ConfigError(
        f"finetune.update 'last_stage' is defined for {SUPPORTED} and networks with a ResNet-style `layer4`; "
        f"this backbone ({type(module).__name__}) has none; use update: all")


def last_block(backbone: nn.Module) -> LastStage:
    """The backbone's very last block and the layers after it: a ResNet's last residual block of `layer4`,
    an EfficientNet's (timm) last inverted-residual block plus its 1x1 head convolution. The part that
    fine-tuning on X-SDD selection tasks gained most from (`finetune.FinetuneSettings`'s default, against the
    whole last stage of EfficientNet-Lite0). ConfigError for other families."""
    import torchvision
    from timm.models.efficientnet import EfficientNet

    module = getattr(backbone, "_orig_mod", getattr(backbone, "module", backbone))
    if isinstance(module, torchvision.models.ResNet) and isinstance(module.fc, nn.Identity):
        last = len(module.layer4) - 1
        return _stage(module, (f"layer4.{last}",), _resnet_trunk(module, layer4_blocks=last),
                      lambda x: torch.flatten(module.avgpool(module.layer4[last](x)), 1))
    if isinstance(module, EfficientNet):
        group, last = len(module.blocks) - 1, len(module.blocks[-1]) - 1

        def trunk(x: Tensor) -> Tensor:
            x = module.blocks[:group](module.bn1(module.conv_stem(x)))
            return module.blocks[group][:last](x)

        def tail(x: Tensor) -> Tensor:
            return module.forward_head(module.bn2(module.conv_head(module.blocks[group][last](x))))

        return _stage(module, (f"blocks.{group}.{last}", "conv_head", "bn2"), trunk, tail)
    if isinstance(getattr(module, "layer4", None), nn.Sequential):  # timm ResNets: no fast path
        return _stage(module, (f"layer4.{len(module.layer4) - 1}",))
    raise ConfigError(f"finetune.update 'last_block' is defined for ResNets and timm EfficientNets, not "
                      f"{type(module).__name__}; use update: last_stage or all")


def _stage(module: nn.Module, names: tuple[str, ...], trunk=None, tail=None) -> LastStage:
    parts = [module.get_submodule(name) for name in names]
    return LastStage(nn.ModuleList(parts), names, trunk, tail)


def _resnet_trunk(module: nn.Module, layer4_blocks: int = 0) -> Callable[[Tensor], Tensor]:
    """Stem and layer1-3, then the first `layer4_blocks` blocks of layer4."""
    def trunk(x: Tensor) -> Tensor:
        x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
        return module.layer4[:layer4_blocks](module.layer3(module.layer2(module.layer1(x))))

    return trunk


def _last_downsampling(stages: list[nn.Module]) -> int:
    """Index of the last stage whose first convolution has stride > 1 (where the coarsest resolution starts)."""
    for index in range(len(stages) - 1, -1, -1):
        convolutions = [m for m in stages[index].modules() if isinstance(m, nn.Conv2d)]
        if any(max(conv.stride) > 1 for conv in convolutions):
            return index
    raise ConfigError("cannot find the last downsampling stage of this network; use finetune.update: all")


def stage_names(backbone: nn.Module) -> tuple[str, ...]:
    """Attribute paths of a convolutional backbone's stages in forward order, from the first block group
    after the stem to the last (ResNet `layer1`..`layer4`; EfficientNet block groups; ConvNeXt stages).

    Their outputs are (B, C_i, H_i, W_i) maps; `metallo_core.models.pooling` averages them. ConfigError for
    families without such a list (ViT, Swin).
    """
    import torchvision

    module = getattr(backbone, "_orig_mod", getattr(backbone, "module", backbone))
    if isinstance(getattr(module, "layer4", None), nn.Module):  # torchvision and timm ResNets
        return tuple(f"layer{i}" for i in range(1, 5))
    if isinstance(module, torchvision.models.EfficientNet):
        # features[0] is the stem and features[-1] the 1x1 head convolution.
        return tuple(f"features.{i}" for i in range(1, len(module.features) - 1))
    if isinstance(module, torchvision.models.ConvNeXt):
        return tuple(f"features.{i}" for i in range(1, len(module.features), 2))  # stem, stage, downsample, ...
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet

    if isinstance(module, EfficientNet):
        return tuple(f"blocks.{i}" for i in range(len(module.blocks)))
    if isinstance(module, ConvNeXt):
        return tuple(f"stages.{i}" for i in range(len(module.stages)))
    raise ConfigError(f"pooling early stages is defined for ResNets, EfficientNets and ConvNeXts; this backbone "
                      f"({type(module).__name__}) has no stage list: set backbone.feature_layers: final")
