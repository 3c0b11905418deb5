"""Support sets as users bring them, not 5-way 1-shot: 2 to 20 classes, unequal shots with a class of a single
image, and query images of classes that are not in the support, through `classify` with fine-tuning and every
transductive method (the class index, the engine's pseudo-queries and the refined prototypes all see them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metallo_core.commands.classify_app import ClassifySettings, classify
from metallo_core.models.backbones import BackboneSpec
from tests.fewshot_fixtures import register_untrained_protonet

SPEC = BackboneSpec(arch="resnet18", small_input=True, image_size=16)


def pattern(label: int, seed: int) -> np.ndarray:
    """A 24-px grey texture per class: stripes whose frequency and angle are set by the class label."""
    rng = np.random.default_rng(1000 * label + seed)
    y, x = np.mgrid[:24, :24]
    angle = np.pi * label / 7
    phase = (x * np.cos(angle) + y * np.sin(angle)) * (0.4 + 0.15 * (label % 5))
    return (127 + 110 * np.sin(phase + rng.uniform(0, 6)) + rng.normal(0, 8, (24, 24))).clip(0, 255).astype(np.uint8)


def write_task(root: Path, shots: list[int], absent: int) -> tuple[Path, Path, list[str]]:
    """support/<class>/ with shots[c] images of class c; query/ with a fresh image of every class, a copy of
    the first support image of every class, and `absent` images of classes beyond the support's."""
    support, query = root / "support", root / "query"
    names = [f"class{c:02d}" for c in range(len(shots))]
    for label, (name, shot) in enumerate(zip(names, shots)):
        (support / name).mkdir(parents=True)
        for index in range(shot):
            Image.fromarray(pattern(label, index)).save(support / name / f"s{index}.png")
    query.mkdir()
    for label, name in enumerate(names):
        Image.fromarray(pattern(label, 50)).save(query / f"fresh-{name}.png")
        Image.fromarray(pattern(label, 0)).save(query / f"copy-{name}.png")
    for extra in range(absent):
        Image.fromarray(pattern(len(shots) + extra, 7)).save(query / f"absent-{extra}.png")
    return support, query, names


SHAPES = [  # (shots per class, query images of classes the support lacks, transductive method)
    ([1, 4], 0, "soft_kmeans"),  # 2-way, one class of a single image
    ([3, 1, 2, 5, 1], 2, "none"),  # 5-way with unequal shots and queries of two classes the support lacks
    ([3, 1, 2, 5, 1], 2, "soft_kmeans"),
    ([3, 1, 2, 5, 1], 2, "bd_cspn"),
    ([1] * 12 + [2] * 8, 1, "bd_cspn"),  # 20-way
]


def test_any_way_unequal_shots_and_absent_classes(tmp_path):
    # One registered model for every shape: registering is most of this test's time.
    model_uri = register_untrained_protonet(SPEC)
    for case, (shots, absent, transductive) in enumerate(SHAPES):
        where = f"{len(shots)}-way shots {shots}, {absent} absent, {transductive}"
        support, query, names = write_task(tmp_path / f"case{case}", shots, absent)
        settings = ClassifySettings(finetune=True, steps=2, lr=1e-3, transductive=transductive)
        result = classify(model_uri, support, query, tmp_path / f"p{case}.csv", settings)

        assert result.classes == names and result.shots == dict(zip(names, shots)), where
        assert result.finetuned and result.inference["transductive"] == transductive, where
        assert len(result.predictions) == 2 * len(names) + absent, where  # a row for every query
        for prediction in result.predictions:
            assert prediction.predicted in names and set(prediction.probabilities) == set(names), where
            assert sum(prediction.probabilities.values()) == pytest.approx(1, abs=1e-4), where
            assert all(np.isfinite(p) and 0 <= p <= 1 for p in prediction.probabilities.values()), where

    # Inductive ProtoNet: a class of one support image has that image's features as its prototype, so an
    # exact copy of it lies at cosine 1 and is predicted as that class, whatever the other classes' shots.
    shots = [1, 4, 2, 1, 3, 1]
    support, query, names = write_task(tmp_path / "single", shots, absent=2)
    result = classify(model_uri, support, query, tmp_path / "single.csv", ClassifySettings(inference="plain"))
    predicted = {prediction.file: prediction.predicted for prediction in result.predictions}
    for name, shot in zip(names, shots):
        if shot == 1:
            assert predicted[f"copy-{name}.png"] == name


def test_a_network_without_stages_classifies_through_its_own_forward_pass(tmp_path):
    """A ViT has no block groups to cache trunk maps of: plain classify embeds whole images instead."""
    model_uri = register_untrained_protonet(BackboneSpec(arch="test_vit", library="timm", image_size=32))
    support, query, names = write_task(tmp_path, [1, 2, 1], absent=0)
    result = classify(model_uri, support, query, tmp_path / "p.csv", ClassifySettings(inference="plain"))
    predicted = {prediction.file: prediction.predicted for prediction in result.predictions}
    assert len(predicted) == 6
    for name, shot in zip(names, [1, 2, 1]):
        if shot == 1:  # a single-image prototype is that image's features: its copy is at cosine 1
            assert predicted[f"copy-{name}.png"] == name
