"""How a ProtoNet turns one task's support and query features into query logits: the few-shot classifier's
inference settings, beside the fine-tuning ones (`finetune.FinetuneSettings`), used by every scorer
(`metallo classify`, `metallo evaluate`, the quickstart's stages, `benchmarks/real_fewshot.py`).

Two levers, each off by default and chosen per dataset on selection tasks (`choose_inference`):
- `power`: a signed power transform of every feature, sign(x) |x|^power, before prototypes are formed
  (Hu et al., "Leveraging the Feature Distribution in Transfer-based Few-Shot Learning", 2021: it makes
  the skewed, non-negative features of a ReLU network more Gaussian). 1 leaves features as they are.
- `transductive`: the queries of the task also shape the prototypes.
  - "soft_kmeans": Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification" (ICLR 2018),
    refinement by soft k-means: each prototype becomes the mean of its support features and of every
    query weighted by the query's soft assignment to it, `soft_kmeans_steps` times, on L2-normalised
    features with assignments softmax(temperature * cosine). The support keeps weight 1 per image, so a
    class with no query in the folder keeps a prototype close to its support.
  - "bd_cspn": Liu et al., "Prototype Rectification for Few-Shot Learning" (ECCV 2020): the query set is
    shifted onto the support's mean, then pseudo-labelled queries join their class's prototype weighted by
    confidence; easyfsl's implementation (`easyfsl.methods.BDCSPN`) on the features.
  A transductive prediction depends on which other queries were scored with it: classify says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metallo_core.config import from_dict, require
from metallo_core.fewshot.task import FewShotTask

Transductive = Literal["none", "soft_kmeans", "bd_cspn"]
TRANSDUCTIVE: tuple[str, ...] = get_args(Transductive)


@dataclass
class InferenceSettings:
    """The few-shot classifier's inference levers (module docstring); the defaults are plain ProtoNet."""

    transductive: Transductive = "none"
    power: float = 1.0  # exponent of the signed power transform of the features; 1: off
    soft_kmeans_steps: int = 3  # refinement rounds of "soft_kmeans"
    temperature: float = 10.0  # "soft_kmeans": assignments are softmax(temperature * cosine)

    def validate(self) -> None:
        require(self.transductive in TRANSDUCTIVE,
                f"inference.transductive must be one of {', '.join(TRANSDUCTIVE)}, got {self.transductive!r}")
        require(0 < self.power <= 1, f"inference.power must be in (0, 1] (1: off), got {self.power}")
        require(self.soft_kmeans_steps >= 1, f"inference.soft_kmeans_steps must be >= 1, got {self.soft_kmeans_steps}")
        require(self.temperature > 0, f"inference.temperature must be > 0, got {self.temperature}")

    @property
    def is_transductive(self) -> bool:
        return self.transductive != "none"

    def describe(self) -> str:
        parts = [f"transductive {self.transductive}" if self.is_transductive else "inductive"]
        if self.power != 1:
            parts.append(f"power transform {self.power:g}")
        return ", ".join(parts)


def describe_recorded(settings: dict | None, transductive_caveat: str) -> str:
    """Inference settings as recorded (a dict, None or {} for plain) in words, followed by
    `transductive_caveat` when the queries shape the prototypes, so no transductive figure stands unexplained."""
    inference = from_dict(InferenceSettings, settings or {}, "inference")
    return f"{inference.describe()}{transductive_caveat if inference.is_transductive else ''}"


def power_transform(features: Tensor, power: float) -> Tensor:
    """sign(x) |x|^power, elementwise, (N, D) -> (N, D); the identity for power 1."""
    if power == 1:
        return features
    return features.sign() * features.abs().pow(power)


def class_prototypes(features: Tensor, labels: Tensor, way: int) -> Tensor:
    """(way, D) means of (N, D) features by label; a label with no row gets a zero prototype."""
    one_hot = F.one_hot(labels, way).to(features.dtype)
    return one_hot.t() @ features / one_hot.sum(dim=0).clamp(min=1).unsqueeze(1)


def soft_kmeans_prototypes(features: FewShotTask, steps: int, temperature: float) -> Tensor:
    """(way, D) prototypes refined by the queries (Ren et al. 2018), on L2-normalised features:
    p_c = (sum of class c's support + sum_q z_qc q) / (n_c + sum_q z_qc), z_q = softmax(temperature * cos(q, p)),
    recomputed `steps` times from the support-only prototypes; `features` is a task of (S, D) support and
    (Q, D) query features."""
    support, query = F.normalize(features.support.examples, dim=1), F.normalize(features.query, dim=1)
    one_hot = F.one_hot(features.support.labels, features.support.way).to(support.dtype)  # (S, way)
    support_sums, support_counts = one_hot.t() @ support, one_hot.sum(dim=0).unsqueeze(1)
    refined = support_sums / support_counts.clamp(min=1)
    for _ in range(steps):
        assignment = (temperature * query @ F.normalize(refined, dim=1).t()).softmax(dim=1)  # (Q, way)
        refined = (support_sums + assignment.t() @ query) / (support_counts + assignment.sum(dim=0).unsqueeze(1))
    return refined


def bd_cspn_prototypes(features: FewShotTask) -> Tensor:
    """(way, D) prototypes rectified by BD-CSPN (Liu et al. 2020), through easyfsl's implementation on
    L2-normalised features of a task's support and queries."""
    from easyfsl.methods import BDCSPN

    support_labels, way = features.support.labels, features.support.way
    method = BDCSPN(nn.Identity())
    method.process_support_set(F.normalize(features.support.examples, dim=1), support_labels)
    method.rectify_prototypes(F.normalize(features.query, dim=1))
    if len(method.prototypes) != way:  # easyfsl counts the classes present
        present = support_labels.unique().tolist()
        raise ValueError(f"every class 0..{way - 1} needs a support image, got labels {present}")
    return method.prototypes


@torch.no_grad()
def query_logits(classifier: nn.Module, features: FewShotTask, settings: InferenceSettings) -> Tensor:
    """(Q, way) logits of a task's (Q, D) query features against its (S, D) support features with labels
    in 0..way-1, through the ProtoNet's own head `classifier(query_features, prototypes)`. With the default
    settings this is exactly `ProtoNet.logits_from_features`. Transductive prototypes live on the unit
    sphere, so the queries are L2-normalised too (a cosine head is unchanged by that)."""
    transformed = features.mapped(lambda rows: power_transform(rows, settings.power))
    support, query = transformed.support, transformed.query
    if settings.transductive == "none":
        return classifier(query, class_prototypes(support.examples, support.labels, support.way))
    if settings.transductive == "soft_kmeans":
        refined = soft_kmeans_prototypes(transformed, settings.soft_kmeans_steps, settings.temperature)
    else:
        refined = bd_cspn_prototypes(transformed)
    return classifier(F.normalize(query, dim=1), refined)
