"""The DINO projection head: 3-layer MLP, L2 normalisation, weight-normalised last layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """`weight = g * v / ||v||` per output unit, with no bias (DINO's `last_layer`).

    With `norm_last_layer` the gain g is fixed at 1 (not trained), which DINO found stabilises training.
    Written out rather than via `nn.utils.weight_norm` so that DDP, EMA and checkpoints see two plain
    parameters with stable names.
    """

    def __init__(self, in_features: int, out_features: int, train_gain: bool):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=train_gain)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(features, weight)


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        for layer_in, layer_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(layer_in, layer_out))
            if use_bn:
                layers.append(nn.BatchNorm1d(layer_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_gain=not norm_last_layer)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(self.mlp(features), dim=-1, p=2)
        return self.last_layer(projected)

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layer's gradients (DINO freezes it during the first epoch(s))."""
        for parameter in self.last_layer.parameters():
            parameter.grad = None
