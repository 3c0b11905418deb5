"""The n-furcated model of seed 002: encoder -> shared fc layer -> one head per property, and its loss.

Classification heads output logits; regression heads output standardised values (the loss compares
them with standardised targets; `decode_outputs` maps them back to the property's units).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metallo_core.errors import ConfigError
from metallo_core.models.pooling import StageAverages, early_stage_names, pooled_with_early_stages
from metallo_core.multilabel.properties import PropertyInfo


class NFurcatedHead(nn.Module):
    """features -> [input standardisation] -> Linear(in, fc_width) -> act -> {Linear(fc_width, out_i)}.

    Heads are kept in a ModuleList in property order (property names may clash with Module attributes).
    """

    def __init__(self, in_dim: int, fc_width: int, properties: list[PropertyInfo], *,
                 activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.property_names = [prop.name for prop in properties]
        self.is_class = [prop.is_class for prop in properties]
        # Per-dimension statistics of the training features (identity until set_input_statistics).
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        layers: list[nn.Module] = [nn.Linear(in_dim, fc_width)]
        if activation == "relu":
            layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(fc_width, prop.output_dim) for prop in properties)

    def set_input_statistics(self, features: torch.Tensor) -> None:
        """Standardise with the training features' per-dimension mean and std, (N, D) -> buffers (D,).

        A dimension that is (nearly) constant on the training rows (a channel a pretrained network
        barely uses at this image size) would be divided by ~0 and blow up on unseen images, so std is
        floored at 1% of the median std.
        """
        std = features.std(0)
        floor = max(0.01 * float(std.median()), 1e-6)
        self.input_mean.copy_(features.mean(0))
        self.input_std.copy_(std.clamp_min(floor))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.shared((features - self.input_mean) / self.input_std)
        outputs = {}
        for name, is_class, head in zip(self.property_names, self.is_class, self.heads):
            output = head(shared)
            outputs[name] = output if is_class else output.squeeze(-1)
        return outputs


class ImageEncoder(nn.Module):
    """float images (B, 3, H, W) in [0, 1] -> normalised -> backbone -> pooled features (B, D), preceded by
    the spatial means of the `pooled_stages` outputs when any are named (`metallo_core.models.pooling`);
    `final_features=False` keeps only those means."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 pooled_stages: Sequence[str] = (), final_features: bool = True):
        super().__init__()
        if not final_features and not pooled_stages:
            raise ConfigError("an encoder without the final features needs early stages to pool "
                              "(backbone.pooled_early_stages >= 1 with backbone.final_features false)")
        self.backbone = backbone
        self.pooled_stages = tuple(pooled_stages)
        self.final_features = final_features
        self._stage_averages = StageAverages(backbone, self.pooled_stages) if self.pooled_stages else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.mean) / self.std
        if self._stage_averages is None:
            return self.backbone(normalised)
        return pooled_with_early_stages(self.backbone, self._stage_averages, normalised,
                                        include_final=self.final_features)

    def remove_hooks(self) -> None:
        """Detach the stage hooks from the backbone (an encoder used once, e.g. to extract features)."""
        if self._stage_averages is not None:
            self._stage_averages.remove()
            self._stage_averages = None

    def output_dim(self, image_size: int) -> int:
        """D of `forward` at `image_size` px (one probe forward in eval mode, without gradients)."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            dim = self(torch.zeros(1, 3, image_size, image_size, device=self.mean.device)).shape[1]
        self.train(was_training)
        return int(dim)


def backbone_image_encoder(backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                           pooled_early_stages: int, final_features: bool = True) -> ImageEncoder:
    """`ImageEncoder` over a pretrained backbone, with its first `pooled_early_stages` stages averaged in
    (`backbone.pooled_early_stages`, `backbone.final_features`; ConfigError if the backbone has no such
    stages)."""
    stages = early_stage_names(backbone, pooled_early_stages) if pooled_early_stages else ()
    return ImageEncoder(backbone, mean, std, stages, final_features)


def last_stage_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of a backbone's last stage: ResNet `layer4`; timm EfficientNet / MobileNet
    the last block group with the head convolution and its norm. ConfigError for other networks."""
    if hasattr(backbone, "layer4"):
        return ("layer4.",)
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(backbone, "conv_head"):
        return (f"blocks.{len(blocks) - 1}.", "conv_head.", "bn2.")
    raise ConfigError(f"backbone.unfreeze_last_stage: no known last stage in a {type(backbone).__name__} "
                      "(ResNets and timm EfficientNets have one); set it to false")


def freeze_backbone(backbone: nn.Module, *, train_last_stage: bool) -> list[str]:
    """Freeze every parameter except, optionally, the last stage (`last_stage_prefixes`); returns the
    trainable names."""
    prefixes = last_stage_prefixes(backbone) if train_last_stage else ()
    trainable = []
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(bool(prefixes) and name.startswith(prefixes))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


class MultilabelNet(nn.Module):
    """encoder (identity on cached features) followed by the n-furcated head.

    In train mode, frozen parts of the encoder stay in eval mode (BatchNorm statistics are not updated);
    only modules with trainable parameters switch to train mode.
    """

    def __init__(self, encoder: nn.Module, head: NFurcatedHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def train(self, mode: bool = True) -> MultilabelNet:
        super().train(mode)
        if mode:
            for module in self.encoder.modules():
                own = list(module.parameters(recurse=False))
                if own and not any(p.requires_grad for p in own):
                    module.eval()
        return self

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.encoder(inputs))


class MultiTaskLoss(nn.Module):
    """Weighted sum of one loss per property: cross-entropy, or MSE / Huber on standardised targets."""

    def __init__(self, properties: list[PropertyInfo]):
        super().__init__()
        self.properties = list(properties)

    def forward(self, outputs: dict[str, torch.Tensor],
                targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components = {}
        total = None
        for prop in self.properties:
            output, target = outputs[prop.name], targets[prop.name]
            if prop.is_class:
                loss = F.cross_entropy(output, target)
            else:
                standardised = (target.float() - prop.target_mean) / prop.target_std
                if prop.loss == "huber":
                    loss = F.huber_loss(output, standardised, delta=prop.huber_delta)
                else:
                    loss = F.mse_loss(output, standardised)
            components[prop.name] = loss
            weighted = prop.weight * loss
            total = weighted if total is None else total + weighted
        return total, components


def decode_outputs(outputs: dict[str, torch.Tensor], properties: list[PropertyInfo]) -> dict[str, torch.Tensor]:
    """Class probabilities (B, C) for classification properties, values in the property's units (B,) for regression."""
    decoded = {}
    for prop in properties:
        output = outputs[prop.name].float()
        decoded[prop.name] = output.softmax(-1) if prop.is_class else output * prop.target_std + prop.target_mean
    return decoded


class ExportedMultilabelNet(nn.Module):
    """What the MLflow pytorch model serves: images (B, 3, H, W) in [0, 1] -> one tensor (B, sum of outputs):
    each classification property's probabilities, then each regression value, in property order."""

    def __init__(self, network: MultilabelNet, properties: list[PropertyInfo]):
        super().__init__()
        self.network = network
        self.properties = list(properties)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        decoded = decode_outputs(self.network(images), self.properties)
        columns = [decoded[p.name] if p.is_class else decoded[p.name].unsqueeze(-1) for p in self.properties]
        return torch.cat(columns, dim=-1)


def images_to_unit_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)
