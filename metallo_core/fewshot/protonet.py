"""Prototypical networks over any feature backbone: class-mean prototypes scored by a learnable-scale
cosine head (P>M>F, seed 000 eq. 4) or by negative squared euclidean distance (original ProtoNet)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metallo_core.data.tensor_augment import normalize, to_float
from metallo_core.errors import ConfigError

if TYPE_CHECKING:
    from metallo_core.models.backbones import BackboneSpec

Distance = Literal["cosine", "euclidean"]


def prototypes(support_features: Tensor, support_labels: Tensor, way: int) -> Tensor:
    """(way, D) class means of the support features; every label 0..way-1 must occur."""
    one_hot = F.one_hot(support_labels, way).to(support_features.dtype)  # (N, way)
    counts = one_hot.sum(dim=0).unsqueeze(1)  # (way, 1)
    return one_hot.t() @ support_features / counts


class CosineClassifier(nn.Module):
    """logits = scale * cos(query, prototype), (Q, way); the scale is learned in meta-training.

    The scale turns cosines in [-1, 1] into logits sharp enough for a softmax (P>M>F initialises it at 10).
    P>M>F's head is `scale * (cos + bias)` with a learnable scalar bias (init 0); we leave the bias out
    because it cannot mean anything: one scalar added to every class's logit is a constant shift, which
    the softmax (and so cross-entropy, the predictions and every other gradient) ignores, and its own
    gradient, sum over classes of (softmax - one_hot), is exactly zero (only float rounding, ~1e-7, is
    left), so it never moves from its initial value. A per-class bias would not help either: episode
    labels 0..way-1 are a fresh random order of classes every task. Checkpoints and registered models
    from before this change carry a `bias` entry; it is dropped on load (see `_load_from_state_dict`
    and `tracking.protonet_store.load_protonet`), which changes no prediction."""

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, query_features: Tensor, class_prototypes: Tensor) -> Tensor:
        cosines = F.normalize(query_features, dim=-1) @ F.normalize(class_prototypes, dim=-1).t()
        return self.scale * cosines

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Older ProtoNet state dicts (meta-training checkpoints, `best` states) hold `classifier.bias`;
        # it was a constant logit shift with no effect (class docstring), so it is dropped, not an error.
        state_dict.pop(prefix + "bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EuclideanClassifier(nn.Module):
    """logits = -||query - prototype||^2, as in Snell et al.'s ProtoNet."""

    def forward(self, query_features: Tensor, class_prototypes: Tensor) -> Tensor:
        # The explicit difference, not cdist: exact, and its gradient is finite at zero distance.
        return -(query_features.unsqueeze(1) - class_prototypes.unsqueeze(0)).pow(2).sum(dim=-1)


def build_classifier(distance: Distance, cosine_scale: float = 10.0) -> nn.Module:
    if distance == "cosine":
        return CosineClassifier(scale=cosine_scale)
    if distance == "euclidean":
        return EuclideanClassifier()
    raise ConfigError(f"protonet distance must be 'cosine' or 'euclidean', got {distance!r}")


class ProtoNet(nn.Module):
    """A backbone plus a prototype classifier. Images enter normalised, float (B, 3, H, W)."""

    def __init__(self, backbone: nn.Module, distance: Distance = "cosine", cosine_scale: float = 10.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.distance = distance
        self.classifier = build_classifier(distance, cosine_scale)
        self._prototypes: Tensor | None = None

    def embed(self, images: Tensor) -> Tensor:
        return self.backbone(images).flatten(1)

    def forward(self, support_images: Tensor, support_labels: Tensor, query_images: Tensor, way: int) -> Tensor:
        """(Q, way) query logits. Support and query go through the backbone in one pass (one kernel launch
        per layer, and in BN train mode one set of batch statistics, as in P>M>F)."""
        features = self.embed(torch.cat([support_images, query_images]))
        support_features, query_features = features.split([len(support_images), len(query_images)])
        return self.logits_from_features(support_features, support_labels, query_features, way)

    def logits_from_features(
        self, support_features: Tensor, support_labels: Tensor, query_features: Tensor, way: int
    ) -> Tensor:
        return self.classifier(query_features, prototypes(support_features, support_labels, way))

    # easyfsl's two-call contract: fix the support set once, then classify any number of query batches.
    def process_support_set(self, support_images: Tensor, support_labels: Tensor, way: int) -> None:
        self._prototypes = prototypes(self.embed(support_images), support_labels, way)

    def classify(self, query_images: Tensor) -> Tensor:
        if self._prototypes is None:
            raise RuntimeError("call process_support_set(...) before classify(...)")
        return self.classifier(self.embed(query_images), self._prototypes)


class ImageNormalizer:
    """Turns reader images, (B, S, S, 3) uint8 arrays or tensors, into the backbone's input: float
    (B, 3, S, S) on `device`, normalised by the backbone's mean/std, optionally channels_last.

    The two halves are separate because meta-test fine-tuning augments in [0, 1] (colour ops clamp
    there) and normalises afterwards: `to_unit` then `normalize`; `__call__` does both."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.channels_last = channels_last

    @classmethod
    def for_backbone(
        cls, spec: BackboneSpec, device: torch.device | str = "cpu", channels_last: bool = False
    ) -> ImageNormalizer:
        return cls(spec.mean, spec.std, device, channels_last)

    def to_unit(self, images: np.ndarray | Tensor) -> Tensor:
        """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1] on the device."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images shaped (B, S, S, 3), got {images.dtype} {tuple(images.shape)}")
        # Move the uint8 bytes, a quarter of the float32 size, then convert on the device.
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return to_float(images)

    def normalize(self, unit_images: Tensor) -> Tensor:
        """float [0, 1] (B, 3, H, W) -> the backbone's normalised input."""
        normalised = normalize(unit_images, self.mean, self.std)
        if self.channels_last:
            return normalised.contiguous(memory_format=torch.channels_last)
        return normalised.contiguous()

    def __call__(self, images: np.ndarray | Tensor) -> Tensor:
        return self.normalize(self.to_unit(images))
