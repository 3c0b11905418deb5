"""ProtoNet maths against hand computations: prototypes, cosine logits with scale and bias, euclidean
logits, one-pass forward vs the easyfsl two-call contract, and the image normaliser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from metallo_core.errors import ConfigError
from metallo_core.fewshot.protonet import (
    CosineClassifier,
    EuclideanClassifier,
    ImageNormalizer,
    ProtoNet,
    prototypes,
)
from metallo_core.models.backbones import BackboneSpec


def flat_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))


def test_prototypes_are_class_means():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0], [0.0, 6.0]])
    labels = torch.tensor([0, 0, 2, 1, 1])
    expected = torch.tensor([[2.0, 3.0], [2.5, 5.5], [10.0, 0.0]])
    torch.testing.assert_close(prototypes(features, labels, way=3), expected)


def test_cosine_logits_by_hand():
    query = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    classifier = CosineClassifier()
    assert classifier.scale.item() == 10.0 and classifier.bias.item() == 0.0
    with torch.no_grad():
        classifier.scale.fill_(4.0)
        classifier.bias.fill_(0.5)
    r = 1 / math.sqrt(2)
    cosines = torch.tensor([[1.0, 0.0, -r], [r, r, -1.0]])
    torch.testing.assert_close(classifier(query, protos), 4.0 * (cosines + 0.5))


def test_euclidean_logits_by_hand():
    query = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    expected = -torch.tensor([[1.0, 1.0 + 9.0], [1.0 + 1.0, 1.0 + 4.0]])  # squared, not plain, distances
    torch.testing.assert_close(EuclideanClassifier()(query, protos), expected)


def test_scale_and_bias_are_learnable():
    model = ProtoNet(flat_backbone())
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.scale", "classifier.bias"} <= names
    support, query = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 0, 1, 1])
    loss = nn.functional.cross_entropy(model(support, labels, query, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    loss.backward()
    assert model.classifier.scale.grad is not None and model.classifier.scale.grad.abs() > 0
    assert model.classifier.bias.grad is not None
    assert list(ProtoNet(flat_backbone(), distance="euclidean").classifier.parameters()) == []


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_forward_matches_features_and_the_two_call_contract(distance):
    model = ProtoNet(flat_backbone(), distance=distance)
    support, query = torch.randn(6, 3, 8, 8), torch.randn(5, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = model(support, labels, query, 3)
    support_features, query_features = model.backbone(support), model.backbone(query)
    protos = torch.stack([support_features[labels == c].mean(0) for c in range(3)])
    if distance == "cosine":
        expected = 10.0 * nn.functional.cosine_similarity(query_features[:, None], protos[None], dim=-1)
    else:
        expected = -torch.cdist(query_features, protos) ** 2
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    model.process_support_set(support, labels, 3)
    torch.testing.assert_close(model.classify(query), logits)


def test_classify_before_support_and_unknown_distance():
    with pytest.raises(RuntimeError, match="process_support_set"):
        ProtoNet(flat_backbone()).classify(torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="cosine"):
        ProtoNet(flat_backbone(), distance="manhattan")


def test_image_normalizer_from_uint8_arrays():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    spec = BackboneSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    normalizer = ImageNormalizer.for_backbone(spec, channels_last=True)
    output = normalizer(images)
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) \
        / torch.tensor(spec.std).view(1, 3, 1, 1)
    assert output.shape == (2, 3, 4, 4) and output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(normalizer(torch.from_numpy(images)), expected)
    with pytest.raises(ValueError, match="uint8"):
        normalizer(images.astype(np.float32))
