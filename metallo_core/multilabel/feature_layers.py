"""Which backbone features the heads read, and the rule that picks them on the validation rows.

A feature set is named `final` (the backbone's pooled features), `early<N>` (the spatial averages of its
first N stages, `metallo_core/models/pooling.py`) or `early<N>+final` (both, averages first). Under
`backbone.feature_layers: auto` the candidates are extracted once, as one table holding the widest set,
and each candidate is a choice of that table's columns; the heads are trained on each, and the one with
the lowest validation score is kept (ties: the earlier candidate in the list). The test rows never enter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metallo_core.errors import ConfigError

AUTO = "auto"
FINAL = "final"
LAYERS_NAME = re.compile(r"^(?:early([1-9][0-9]*)(\+final)?|final)$")
# Fewest features first: a tie goes to the smaller head. early2 is seed 002's working choice on its
# binary-phase images; final is what deep features of real micrographs need; early2+final covers both.
DEFAULT_CANDIDATES = ("early1", "early2", FINAL, "early2+final")


@dataclass(frozen=True)
class FeatureLayers:
    """One feature set: the averages of the first `early_stages` stages, then (`final`) the pooled features."""

    early_stages: int = 0
    final: bool = True

    def __post_init__(self) -> None:
        if self.early_stages < 0 or not (self.final or self.early_stages):
            raise ConfigError(f"a feature set needs early stages or the final features, got {self}")

    @property
    def name(self) -> str:
        if not self.early_stages:
            return FINAL
        return f"early{self.early_stages}" + ("+final" if self.final else "")

    @classmethod
    def parse(cls, text: str, setting: str = "backbone.feature_layers") -> FeatureLayers:
        """`final`, `early<N>` or `early<N>+final` -> FeatureLayers; ConfigError naming `setting` otherwise."""
        match = LAYERS_NAME.match(text.strip())
        if not match:
            raise ConfigError(f"{setting}: {text!r} is not a feature set; use final, early<N> (the first N stages' "
                              f"averages, N >= 1) or early<N>+final" + (", or auto" if "candidates" not in setting
                                                                         else ""))
        if match.group(1) is None:
            return cls(0, True)
        return cls(int(match.group(1)), bool(match.group(2)))

    def columns(self, stage_widths: Sequence[int], total: int) -> np.ndarray:
        """Column indices of this set in a table laid out as [stage 1 | ... | stage K | final] (K =
        len(stage_widths), `total` columns in all; the final features are whatever follows the stages).

        Raises ConfigError when the table lacks the stages or the final features this set needs.
        """
        early = sum(stage_widths[:self.early_stages])
        final_start = sum(stage_widths)
        if self.early_stages > len(stage_widths) or (self.final and final_start >= total):
            raise ConfigError(f"feature set {self.name} is not in a table of {len(stage_widths)} stage average(s)"
                              f"{' and final features' if final_start < total else ''}")
        parts = [np.arange(early)]
        if self.final:
            parts.append(np.arange(final_start, total))
        return np.concatenate(parts)


FINAL_LAYERS = FeatureLayers()  # the backbone's pooled features only (the default before auto)


def widest(candidates: Sequence[FeatureLayers]) -> FeatureLayers:
    """The one set whose table holds every candidate's columns."""
    return FeatureLayers(max(c.early_stages for c in candidates), any(c.final for c in candidates))


@dataclass
class CandidateScore:
    """What the choice sees of one candidate: figures on the validation rows only."""

    layers: FeatureLayers
    validation_error: float  # cumulative classification error of the kept weights (NaN: regression only)
    validation_loss: float  # summed multi-task loss of the kept weights
    epochs_trained: int = 0
    kept_epoch: int = 0
    train_seconds: float = 0.0
    feature_dim: int = 0

    @property
    def score(self) -> float:
        """The validation error; for regression-only models (no error) the validation loss."""
        return self.validation_loss if math.isnan(self.validation_error) else self.validation_error


def choose(scores: Sequence[CandidateScore]) -> int:
    """Index of the candidate with the lowest `score`; a tie (within 1e-12) goes to the earliest.

    Raises ValueError for no candidates or a NaN score (a candidate trained without validation rows).
    """
    if not scores:
        raise ValueError("no feature-set candidates to choose from")
    if any(math.isnan(s.score) for s in scores):
        raise ValueError("every candidate needs a validation score (optim.validation_fraction > 0)")
    best = 0
    for index, candidate in enumerate(scores):
        if candidate.score < scores[best].score - 1e-12:
            best = index
    return best
