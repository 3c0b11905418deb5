"""Accuracy and the 95% confidence interval against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metallo_core.fewshot.metrics import accuracy, mean_and_ci95, summarize


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5


def test_ci95_by_hand_with_sample_sd():
    # mean 0.7; squared deviations 0.04, 0, 0.04, 0 sum to 0.08; sd with ddof=1 is sqrt(0.08 / 3).
    mean, half_width = mean_and_ci95([0.5, 0.7, 0.9, 0.7])
    assert mean == pytest.approx(0.7)
    assert half_width == pytest.approx(1.96 * math.sqrt(0.08 / 3) / math.sqrt(4))
    assert half_width == pytest.approx(0.160033, abs=1e-6)
    assert half_width != pytest.approx(1.96 * math.sqrt(0.08 / 4) / math.sqrt(4))  # not the ddof=0 figure


def test_summarize_and_edge_cases():
    summary = summarize([0.5, 0.7])
    assert summary["n"] == 2 and summary["mean"] == pytest.approx(0.6)
    assert summary["std"] == pytest.approx(math.sqrt(0.02))  # ddof=1: (0.01 + 0.01) / 1
    assert summary["ci95"] == pytest.approx(1.96 * math.sqrt(0.02) / math.sqrt(2))
    mean, half_width = mean_and_ci95([0.8])
    assert mean == 0.8 and math.isnan(half_width)
    with pytest.raises(ValueError, match="non-empty"):
        mean_and_ci95([])


def test_paired_gain_is_the_interval_of_per_task_differences():
    from metallo_core.fewshot.metrics import paired_gain

    baseline = [0.5, 0.9, 0.3, 0.7]
    method = [0.6, 0.9, 0.4, 0.9]  # hard and easy tasks alike, the method is ahead or equal
    gain, ci95 = paired_gain(baseline, method)
    differences = np.array([0.1, 0.0, 0.1, 0.2])
    assert gain == pytest.approx(differences.mean())
    assert ci95 == pytest.approx(1.96 * differences.std(ddof=1) / 2)
    assert ci95 < mean_and_ci95(method)[1]  # task difficulty cancels
    with pytest.raises(ValueError, match="same tasks"):
        paired_gain(baseline, method[:3])
