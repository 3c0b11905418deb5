"""The few-shot classifier's inference levers (fewshot/inference.py), Ray-free on small synthetic features:
plain settings are exactly ProtoNet, the transductive methods use the queries' structure, survive skewed and
tiny query sets, any way and unequal shots, and the power transform keeps signs."""

from __future__ import annotations

import pytest
import torch

from metallo_core.errors import ConfigError
from metallo_core.fewshot.inference import (
    TRANSDUCTIVE,
    InferenceSettings,
    power_transform,
    query_logits,
    soft_kmeans_prototypes,
)
from metallo_core.fewshot.protonet import CosineClassifier, EuclideanClassifier, ProtoNet
from metallo_core.fewshot.task import FewShotTask, SupportSet


def clusters(way: int, shots: list[int], queries: list[int], seed: int = 0, spread: float = 0.6,
             dim: int = 16) -> tuple[FewShotTask, torch.Tensor]:
    """(task of support and query features, query labels): Gaussian clusters around random unit centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(way, dim, generator=generator), dim=1) * 3

    def draw(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.cat([torch.full((count,), label) for label, count in enumerate(counts)]).long()
        return centres[labels] + spread * 3 * torch.randn(len(labels), dim, generator=generator) / dim ** 0.5, labels

    support, support_labels = draw(shots)
    query, query_labels = draw(queries)
    return FewShotTask(SupportSet(support, support_labels, way), query), query_labels


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


@pytest.mark.parametrize("classifier", [CosineClassifier(scale=7.0), EuclideanClassifier()])
def test_the_default_settings_are_exactly_protonet(classifier):
    task, _ = clusters(5, [2] * 5, [3] * 5)
    model = ProtoNet(torch.nn.Identity())
    model.classifier = classifier
    expected = model.logits_from_features(task.support.examples, task.support.labels, task.query, 5)
    assert torch.equal(query_logits(classifier, task, InferenceSettings()), expected)


def test_the_power_transform_keeps_signs_and_is_the_identity_at_1():
    features = torch.tensor([[-4.0, 0.0, 9.0]])
    assert torch.equal(power_transform(features, 1.0), features)
    assert torch.equal(power_transform(features, 0.5), torch.tensor([[-2.0, 0.0, 3.0]]))


def test_soft_kmeans_uses_the_queries_to_correct_an_unrepresentative_support():
    # One shot per class drawn far from its class's centre: the queries' clusters pull the prototypes back.
    task, query_labels = clusters(5, [1] * 5, [15] * 5, seed=3, spread=1.1)
    inductive = query_logits(CosineClassifier(), task, InferenceSettings())
    transductive = query_logits(CosineClassifier(), task, InferenceSettings(transductive="soft_kmeans"))
    assert accuracy(transductive, query_labels) > accuracy(inductive, query_labels)


def test_a_class_absent_from_the_queries_keeps_a_prototype_near_its_support():
    task, query_labels = clusters(3, [1, 1, 1], [20, 0, 0], seed=1)
    refined = soft_kmeans_prototypes(task, steps=5, temperature=10.0)
    unit_support = torch.nn.functional.normalize(task.support.examples, dim=1)
    # Class 1 and 2 have no query: their prototypes stay within a small angle of their own support image.
    for label in (1, 2):
        cosine = torch.nn.functional.cosine_similarity(refined[label], unit_support[label], dim=0)
        assert cosine > 0.9
    logits = query_logits(CosineClassifier(), task, InferenceSettings(transductive="soft_kmeans"))
    assert accuracy(logits, query_labels) == 1.0


@pytest.mark.parametrize("transductive", TRANSDUCTIVE)
@pytest.mark.parametrize(("way", "shots", "queries"), [
    (2, [1, 1], [1, 0]),  # one query in the folder
    (5, [1, 5, 2, 1, 3], [0, 7, 1, 0, 2]),  # unequal shots, skewed queries, classes without queries
    (20, [1] * 20, [2] * 20),
])
def test_every_method_scores_any_way_unequal_shots_and_skewed_queries(transductive, way, shots, queries):
    task, _ = clusters(way, shots, queries, seed=way, spread=0.3)
    settings = InferenceSettings(transductive=transductive, power=0.5)
    logits = query_logits(CosineClassifier(), task.mapped(torch.abs), settings)
    assert logits.shape == (len(task.query), way) and torch.isfinite(logits).all()


def test_settings_are_validated_with_the_field_named():
    with pytest.raises(ConfigError, match="inference.transductive"):
        InferenceSettings(transductive="laplacian").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="inference.power"):
        InferenceSettings(power=2.0).validate()
    assert InferenceSettings(transductive="soft_kmeans", power=0.5).describe() == \
        "transductive soft_kmeans, power transform 0.5"
