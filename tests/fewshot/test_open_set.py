"""The open-set flag (fewshot/open_set.py) and its AUROC (fewshot/metrics.py), Ray-free on small synthetic
features: the score against a re-derivation, the calibration from the support alone at 1 shot, flags that
do not depend on the other queries (skewed and tiny query sets), and `predict` carrying the flag."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metallo_core.errors import ConfigError
from metallo_core.fewshot.inference import InferenceSettings
from metallo_core.fewshot.metrics import auroc
from metallo_core.fewshot.open_set import (
    OpenSetSettings,
    open_set_flags,
    prototype_separation,
    youden_margin,
)


def clusters(way: int, per_class: int, seed: int, spread: float = 0.35, dim: int = 32) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(features, labels): non-negative features (as a ReLU network gives) around `way` random centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(way, dim, generator=generator) ** 3 * 4
    labels = torch.arange(way).repeat_interleave(per_class)
    features = (centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)).clamp(min=0)
    return features, labels


def test_separation_is_each_prototypes_nearest_other_cosine():
    prototypes = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    expected = [max(float(F.cosine_similarity(prototypes[a], prototypes[b], dim=0)) for b in range(5) if b != a)
                for a in range(5)]
    assert prototype_separation(prototypes).tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        prototype_separation(prototypes[:1])


def test_score_is_cosine_to_nearest_prototype_minus_the_mean_separation_after_the_power_transform():
    support, labels = clusters(4, 3, seed=1)
    query, _ = clusters(4, 2, seed=2)
    flags = open_set_flags(support, labels, query, 4, 0.5, OpenSetSettings(margin=0.01))
    # Re-derived by hand: class means of sqrt features, cosines, nearest, minus that class's separation.
    prototypes = torch.stack([support[labels == c].sqrt().mean(0) for c in range(4)])
    for row in range(len(query)):
        cosines = [float(F.cosine_similarity(query[row].sqrt(), prototypes[c], dim=0)) for c in range(4)]
        nearest = int(np.argmax(cosines))
        separation = np.mean([max(float(F.cosine_similarity(prototypes[a], prototypes[b], dim=0))
                                  for b in range(4) if b != a) for a in range(4)])
        assert int(flags.nearest[row]) == nearest
        assert float(flags.scores[row]) == pytest.approx(cosines[nearest] - separation, abs=1e-5)
        assert bool(flags.unknown[row]) == (cosines[nearest] - separation < 0.01)


def test_one_shot_calibration_flags_unseen_classes_and_keeps_known_ones():
    """At 1 shot (no leave-one-out possible): 5 support classes that share a common texture component (cosine
    0.5 between their centres) and 2 unseen classes that share little of it (cosine about 0.2 to each known
    centre). The unseen classes' queries lie further from every prototype than the prototypes lie from each
    other, so margin 0 flags them, and keeps the known queries."""
    generator = torch.Generator().manual_seed(3)
    dim, per_class = 64, 16
    own = torch.zeros(7, dim)
    for c in range(7):  # each class its own block of 8 dimensions, the common component the last 8
        own[c, 8 * c:8 * c + 8] = 1 / 8 ** 0.5
    common = torch.zeros(dim)
    common[56:] = 1 / 8 ** 0.5
    shared = torch.tensor([1.0] * 5 + [0.3] * 2)
    centres = own + shared[:, None] * common
    labels = torch.arange(7).repeat_interleave(per_class)
    features = centres[labels] + 0.08 * torch.randn(len(labels), dim, generator=generator)
    support_rows = torch.tensor([c * per_class for c in range(5)])  # one shot of classes 0-4
    query_rows = torch.tensor([row for row in range(len(labels)) if row not in support_rows.tolist()])
    flags = open_set_flags(features[support_rows], labels[support_rows], features[query_rows], 5, 1.0,
                           OpenSetSettings(margin=0.0))
    is_known = labels[query_rows] < 5
    assert auroc(flags.scores[is_known].numpy(), flags.scores[~is_known].numpy()) > 0.95
    assert flags.unknown[~is_known].float().mean() > 0.9 and flags.unknown[is_known].float().mean() < 0.1
    # A copy of a support image is its own prototype at 1 shot: cosine 1, never flagged at margin 0.
    copies = open_set_flags(features[support_rows], labels[support_rows], features[support_rows], 5, 1.0,
                            OpenSetSettings(margin=0.0))
    assert not copies.unknown.any() and copies.nearest.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("subset", ["one image", "only unknowns", "one class", "all"])
def test_flags_do_not_depend_on_the_other_queries(subset):
    """Skewed query sets: each image's flag is computed against the support alone, so scoring it among
    other queries, among only unknowns, or alone gives the same score."""
    features, labels = clusters(6, 10, seed=4)
    support_rows = torch.tensor([c * 10 + s for c in range(4) for s in range(2)])  # 2-shot, classes 0-3
    query_rows = torch.arange(len(labels))[~torch.isin(torch.arange(len(labels)), support_rows)]
    chosen = {"one image": query_rows[:1], "only unknowns": query_rows[labels[query_rows] >= 4],
              "one class": query_rows[labels[query_rows] == 2], "all": query_rows}[subset]
    everything = open_set_flags(features[support_rows], labels[support_rows], features[query_rows], 4, 0.5,
                                OpenSetSettings())
    alone = open_set_flags(features[support_rows], labels[support_rows], features[chosen], 4, 0.5, OpenSetSettings())
    positions = torch.searchsorted(query_rows, chosen)
    assert torch.allclose(alone.scores, everything.scores[positions], atol=1e-6)
    assert torch.equal(alone.unknown, everything.unknown[positions])


def test_a_class_without_support_is_refused():
    features, labels = clusters(3, 2, seed=5)
    with pytest.raises(ValueError, match="every class 0..3"):
        open_set_flags(features, labels, features, 4, 1.0, OpenSetSettings())


def test_margin_setting_is_validated():
    OpenSetSettings(margin=-0.1).validate()
    with pytest.raises(ConfigError, match="margin"):
        OpenSetSettings(margin=3.0).validate()


def brute_force_auroc(known, unknown) -> float:
    pairs = [(k > u) + 0.5 * (k == u) for k, u in itertools.product(known, unknown)]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_the_pairwise_count_ties_included(seed):
    rng = np.random.default_rng(seed)
    known, unknown = rng.integers(0, 6, 13).astype(float), rng.integers(0, 4, 7).astype(float)  # many ties
    assert auroc(known, unknown) == pytest.approx(brute_force_auroc(known, unknown))
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="known and unknown"):
        auroc([], [1.0])


@pytest.mark.parametrize("seed", [0, 1])
def test_youden_margin_is_the_best_threshold_of_all(seed):
    rng = np.random.default_rng(seed)
    known, unknown = torch.tensor(rng.normal(0.3, 0.2, 40)), torch.tensor(rng.normal(0.0, 0.2, 15))
    margin, youden = youden_margin(known, unknown)

    def j(threshold: float) -> float:
        return float((unknown < threshold).double().mean() - (known < threshold).double().mean())

    every = torch.cat([known, unknown]).sort().values
    best = max(j(float(t)) for t in torch.cat([every - 1e-9, every + 1e-9]))
    assert youden == pytest.approx(best) and j(margin) == pytest.approx(youden)
    with pytest.raises(ValueError, match="known and unknown"):
        youden_margin(known, unknown[:0])


def test_predict_carries_the_flag_with_tiles_and_transductive_inference():
    """predict's open-set flag is the image's mean feature against the support's own prototypes: the same
    with transductive inference as without (the queries refine the prediction's prototypes, not the flag's)."""
    from metallo_core.fewshot.predict import PredictSettings, predict
    from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
    from metallo_core.fewshot.tiles import TiledImages
    from metallo_core.models.backbones import BackboneSpec, build_backbone

    torch.manual_seed(0)
    spec = BackboneSpec(arch="resnet18", small_input=True, image_size=16)
    model = ProtoNet(build_backbone(spec)).eval()
    normalizer = ImageNormalizer.for_backbone(spec, torch.device("cpu"))
    rng = np.random.default_rng(0)
    support = TiledImages(rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), np.array([0, 0, 1, 1, 2, 2]), 3)
    queries = TiledImages(np.concatenate([support.tiles[:2], rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)]),
                          np.array([0, 0, 1, 1, 1]), 2)  # image 0: the tiles of support image 0
    found = {}
    for name, inference in (("plain", InferenceSettings()),
                            ("soft_kmeans", InferenceSettings(transductive="soft_kmeans", power=0.5))):
        for margin in (-2.0, 2.0):
            settings = PredictSettings(inference, precision="fp32", open_set=OpenSetSettings(margin))
            found[name, margin] = predict(model, normalizer, support, np.array([0, 1, 2]), [queries], settings)
    assert found["plain", -2.0].unknown == [False, False] and found["plain", 2.0].unknown == [True, True]
    # Image 0 is support image 0 itself: its mean feature is class 0's prototype, cosine 1.
    separation = found["plain", -2.0].separation
    assert found["plain", -2.0].open_set_scores[0] == pytest.approx(1 - np.mean(separation), abs=1e-4)
    plain_scores = predict(model, normalizer, support, np.array([0, 1, 2]), [queries],
                           PredictSettings(InferenceSettings(power=0.5), precision="fp32",
                                           open_set=OpenSetSettings())).open_set_scores
    assert found["soft_kmeans", 2.0].open_set_scores == pytest.approx(plain_scores, abs=1e-5)
    assert predict(model, normalizer, support, np.array([0, 1, 2]), [queries],
                   PredictSettings(InferenceSettings())).unknown == []
