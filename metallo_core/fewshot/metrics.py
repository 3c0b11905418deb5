"""Few-shot scores: per-task accuracy, and the mean with its 95% confidence interval over tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

Z_95 = 1.96  # two-sided 95% quantile of the normal distribution


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return float((logits.argmax(dim=1) == labels).float().mean())


def task_std(per_task_accuracies: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1), the unbiased-variance estimate a confidence interval calls for.
    Code using np.std (ddof=0, e.g. FEAT-style `compute_confidence_interval`) is smaller by sqrt((n-1)/n):
    0.08% at 600 tasks, 0.5% at 100. NaN for a single task."""
    values = _as_array(per_task_accuracies)
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def mean_and_ci95(per_task_accuracies: Sequence[float]) -> tuple[float, float]:
    """(mean, half width) with half width = 1.96 * sd / sqrt(n), sd with ddof=1: the few-shot convention
    of reporting mean +- CI over per-task accuracies, never pooled over all queries."""
    values = _as_array(per_task_accuracies)
    return float(values.mean()), Z_95 * task_std(values) / math.sqrt(len(values))


def paired_gain(per_task_baseline: Sequence[float], per_task_method: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% half width) of the per-task difference method - baseline over the same tasks. Much
    tighter than comparing two intervals, since task difficulty, the main source of variance, cancels."""
    baseline, method = _as_array(per_task_baseline), _as_array(per_task_method)
    if baseline.shape != method.shape:
        raise ValueError(f"a paired gain needs the same tasks for both: {len(baseline)} vs {len(method)} tasks")
    return mean_and_ci95(method - baseline)


def summarize(per_task_accuracies: Sequence[float]) -> dict[str, float | int]:
    mean, ci95 = mean_and_ci95(per_task_accuracies)
    return {"mean": mean, "ci95": ci95, "n": len(per_task_accuracies), "std": task_std(per_task_accuracies)}


def _as_array(per_task_accuracies: Sequence[float]) -> np.ndarray:
    values = np.asarray(per_task_accuracies, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"expected a non-empty list of per-task accuracies, got shape {values.shape}")
    return values


def auroc(known_scores: Sequence[float] | np.ndarray, unknown_scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of telling unknown from known by a score that is *higher for known*: the
    probability that a random known score exceeds a random unknown one, ties counting one half
    (Mann-Whitney U / (n_known * n_unknown), with average ranks for ties). ValueError when either side is empty."""
    known = np.asarray(known_scores, dtype=np.float64).ravel()
    unknown = np.asarray(unknown_scores, dtype=np.float64).ravel()
    if len(known) == 0 or len(unknown) == 0:
        raise ValueError(f"an AUROC needs known and unknown scores, got {len(known)} and {len(unknown)}")
    values = np.concatenate([known, unknown])
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    # Average ranks within each run of equal values (ties count one half).
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(unique))
    ranks = (sums / counts)[inverse]
    u_statistic = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u_statistic / (len(known) * len(unknown)))
