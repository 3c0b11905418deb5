""""None of these": a query image that resembles no support class is flagged unknown instead of being forced
into the nearest one (`metallo classify --unknown`).

The score and its calibration come from the task's own support set, so they work with one shot per class
(where leave-one-out distances do not exist) and for any backbone:
- `similarity`: the cosine of the query's feature to its nearest class prototype (the class mean of the
  support features), after the inference's power transform;
- `separation` of a class: the cosine of its prototype to the nearest *other* prototype, i.e. how close two
  known classes of this support set come to each other;
- the score is similarity - the mean separation of the task's classes: a query no closer to its nearest class
  than the support's classes typically are to each other looks like another class, not one of these. The
  query is flagged when its score is below `margin`, a single number fitted once on selection tasks
  (`benchmarks/open_set.py`), never on the test pool.
The shift by the support's own separation is what carries one margin across supports, shot counts, power
transforms and backbones (a fine-tuned backbone's cosines sit at other levels than a frozen one's); on a
fixed backbone a bare cosine threshold ranks about as well (README "Open set": both were compared, and the
separation of the predicted class alone, on selection tasks).
Prototypes are the support's alone, never refined by the queries, even with transductive inference: the
flag of an image depends on that image and the support only (unknown queries cannot pull a prototype
toward themselves and then look known), whatever else is in the query folder. Rejecting a query by its
distance to the nearest class mean is the usual open-set baseline; the separation-relative threshold is this
project's calibration for 1-shot supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metallo_core.config import require
from metallo_core.fewshot.inference import class_prototypes, power_transform

# Fitted on X-SDD selection tasks (5 known + 2 held-out classes, 1- and 5-shot pooled, the frozen ImageNet
# EfficientNet-Lite0 at 128 px, power 0.5, 100 tasks per shot; 300 per shot give +0.014): the margin
# maximising Youden's J (unknown recall minus the rate of known queries flagged). How, and what it gives on
# test tasks: README "Open set".
SELECTED_MARGIN = 0.015


@dataclass
class OpenSetSettings:
    """When a query image is flagged unknown: score (module docstring) below `margin`."""

    margin: float = SELECTED_MARGIN  # in cosine units; higher flags more images

    def validate(self) -> None:
        require(-2 <= self.margin <= 2, f"open-set margin is a difference of cosines, in [-2, 2]; got {self.margin}")


@dataclass
class OpenSetFlags:
    """Per query: the score, the class it is nearest, the threshold it was held to and the flag."""

    scores: Tensor  # (Q,) similarity minus the mean of `separation`
    similarity: Tensor  # (Q,) cosine to the nearest prototype
    nearest: Tensor  # (Q,) int64 index of the nearest prototype
    separation: Tensor  # (way,) cosine of each prototype to its nearest other prototype
    unknown: Tensor  # (Q,) bool: scores < margin


def prototype_separation(prototypes: Tensor) -> Tensor:
    """(way,) cosine of each of the (way, D) prototypes to its nearest other prototype; ValueError for way < 2
    (with one class there is nothing to be closer to)."""
    if len(prototypes) < 2:
        raise ValueError(f"the open-set calibration needs at least 2 classes, got {len(prototypes)}")
    unit = F.normalize(prototypes, dim=1)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-torch.inf)
    return cosine.max(dim=1).values


def nearest_prototype(query: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """((Q,) cosine of each (Q, D) query feature to its nearest prototype, (Q,) that prototype's index)."""
    cosine = F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).T
    similarity, nearest = cosine.max(dim=1)
    return similarity, nearest


@torch.no_grad()
def open_set_flags(support: Tensor, support_labels: Tensor, query: Tensor, way: int, power: float,
                   settings: OpenSetSettings) -> OpenSetFlags:
    """Flag each of the (Q, D) query features that resembles none of the `way` classes of the (S, D) support
    features with labels 0..way-1, after the signed power transform `power` (the inference's: the features
    the predictions are made from). Every class needs a support feature (ValueError otherwise)."""
    present = torch.bincount(support_labels, minlength=way)
    if len(present) != way or bool((present == 0).any()):
        raise ValueError(f"every class 0..{way - 1} needs a support feature, got labels "
                         f"{sorted(set(support_labels.tolist()))}")
    support, query = power_transform(support.float(), power), power_transform(query.float(), power)
    prototypes = class_prototypes(support, support_labels, way)
    separation = prototype_separation(prototypes)
    similarity, nearest = nearest_prototype(query, prototypes)
    scores = similarity - separation.mean()
    return OpenSetFlags(scores, similarity, nearest, separation, scores < settings.margin)


def youden_margin(known_scores: Tensor, unknown_scores: Tensor) -> tuple[float, float]:
    """(margin, J): the threshold t maximising Youden's J = P(unknown score < t) - P(known score < t), i.e.
    unknown recall minus the rate of known queries flagged, over the pooled (N,) scores of selection tasks
    (how `SELECTED_MARGIN` was fitted). t is placed halfway between two neighbouring scores; ValueError when
    either side is empty."""
    if len(known_scores) == 0 or len(unknown_scores) == 0:
        raise ValueError(f"fitting a margin needs known and unknown scores, got {len(known_scores)} and "
                         f"{len(unknown_scores)}")
    values, order = torch.sort(torch.cat([known_scores, unknown_scores]).double())
    is_unknown = torch.cat([torch.zeros(len(known_scores)), torch.ones(len(unknown_scores))]).double()[order]
    # Thresholds between neighbours: below it lie the first k sorted scores, k = 0..N.
    unknown_below = torch.cat([torch.zeros(1, dtype=torch.float64), is_unknown.cumsum(0)])
    known_below = torch.arange(len(values) + 1, dtype=torch.float64) - unknown_below
    youden = unknown_below / len(unknown_scores) - known_below / len(known_scores)
    distinct = torch.cat([torch.tensor([True]), values[1:] > values[:-1], torch.tensor([True])])
    youden[~distinct] = -torch.inf  # a threshold cannot fall between two equal scores
    best = int(youden.argmax())
    edges = torch.cat([values[:1] - 1, values, values[-1:] + 1])
    return float((edges[best] + edges[best + 1]) / 2), float(youden[best])
