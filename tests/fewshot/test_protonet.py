"""ProtoNet maths against hand computations: prototypes, cosine logits with a learned scale (and why
P>M>F's shared logit bias was dropped), euclidean logits, one-pass forward vs the easyfsl two-call
contract, loading pre-change heads that still carry a bias, and the image normaliser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

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
    assert classifier.scale.item() == 10.0
    assert [name for name, _ in classifier.named_parameters()] == ["scale"]
    with torch.no_grad():
        classifier.scale.fill_(4.0)
    r = 1 / math.sqrt(2)
    cosines = torch.tensor([[1.0, 0.0, -r], [r, r, -1.0]])
    torch.testing.assert_close(classifier(query, protos), 4.0 * cosines)


def test_euclidean_logits_by_hand():
    query = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    expected = -torch.tensor([[1.0, 1.0 + 9.0], [1.0 + 1.0, 1.0 + 4.0]])  # squared, not plain, distances
    torch.testing.assert_close(EuclideanClassifier()(query, protos), expected)


def episode_loss(model: ProtoNet, shift: Tensor | float = 0.0) -> Tensor:
    """Cross-entropy of a fixed 2-way episode, with `shift` added to the logits (P>M>F's `scale * bias`)."""
    generator = torch.Generator().manual_seed(1)
    support, query = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(6, 3, 8, 8, generator=generator)
    logits = model(support, torch.tensor([0, 0, 1, 1]), query, 2)
    return nn.functional.cross_entropy(logits + shift, torch.tensor([0, 1, 0, 1, 0, 1]))


def test_a_shared_logit_bias_is_inert_which_is_why_the_head_has_none():
    """P>M>F's `scale * (cos + bias)` adds scale*bias to every logit. Oracle: softmax is shift-invariant,
    so the loss and every other gradient are identical with and without it, and its own gradient is
    zero up to rounding; a per-class shift (the guard) does change them, so the comparison can fail."""
    plain_model, shifted_model = ProtoNet(flat_backbone()), ProtoNet(flat_backbone())
    bias = torch.tensor(0.37, requires_grad=True)
    plain, shifted = episode_loss(plain_model), episode_loss(shifted_model, plain_model.classifier.scale * bias)
    plain.backward()
    shifted.backward()
    torch.testing.assert_close(shifted, plain)
    for (name, with_shift), (_, without) in zip(shifted_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(with_shift.grad, without.grad, msg=name)
    assert abs(bias.grad.item()) < 1e-6 and abs(plain_model.classifier.scale.grad.item()) > 1e-3

    guard_model = ProtoNet(flat_backbone())
    per_class = episode_loss(guard_model, torch.tensor([0.0, 3.0]))
    assert abs(per_class.item() - plain.item()) > 0.1
    per_class.backward()
    assert not torch.allclose(guard_model.classifier.scale.grad, plain_model.classifier.scale.grad)


@pytest.mark.parametrize("separable, direction", [(True, 1.0), (False, -1.0)])
def test_the_cosine_scale_learns_the_sharpness_the_data_supports(separable, direction):
    """Training only the scale: on cleanly separated classes it grows (sharper softmax, lower loss); with
    half the labels flipped it shrinks towards a flat softmax. Either way the loss at least halves."""
    generator = torch.Generator().manual_seed(0)
    prototypes_ = torch.eye(4)
    labels = torch.arange(4).repeat(25)
    query = prototypes_[labels] + 0.2 * torch.randn(100, 4, generator=generator)
    targets = labels if separable else torch.where(torch.arange(100) % 2 == 0, labels, (labels + 1) % 4)
    classifier = CosineClassifier(scale=10.0)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(classifier(query, prototypes_), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert direction * (classifier.scale.item() - 10.0) > 3.0
    assert losses[-1] < 0.5 * losses[0]


def test_pre_change_heads_with_a_bias_still_load(monkeypatch):
    """Meta-training checkpoints and registered models from before the bias was dropped carry it; it is
    ignored (it never changed a prediction). Guard: any other unexpected key still fails the load."""
    source = ProtoNet(flat_backbone(seed=3))
    with torch.no_grad():
        source.classifier.scale.fill_(7.5)
    old_state = {**source.state_dict(), "classifier.bias": torch.tensor(0.25)}
    loaded = ProtoNet(flat_backbone(seed=4))
    loaded.load_state_dict(old_state)
    query, support = torch.randn(5, 3, 8, 8), torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(loaded(support, labels, query, 2), source(support, labels, query, 2))
    with pytest.raises(RuntimeError, match="classifier.offset"):
        ProtoNet(flat_backbone()).load_state_dict({**source.state_dict(), "classifier.offset": torch.tensor(1.0)})

    from metallo_core.tracking import protonet_store

    old_metadata = {"kind": "protonet", "distance": "cosine", "classifier": {"scale": 6.0, "bias": 0.4}}
    monkeypatch.setattr(protonet_store, "load_backbone_and_metadata",
                        lambda uri: (flat_backbone(), BackboneSpec(), old_metadata))
    model, _, metadata = protonet_store.load_protonet("models:/metallo-protonet/1")
    assert model.classifier.scale.item() == 6.0 and metadata == old_metadata
    assert protonet_store.protonet_metadata(model)["classifier"] == {"scale": 6.0}


def test_euclidean_head_has_no_parameters():
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
