"""Confusion pooled over tasks: counts per (true, predicted) class name, only within each task's classes."""

import json

import numpy as np
import pytest

from metallo_core.errors import DataError
from metallo_core.fewshot.confusion import Confusion, confusion_over_tasks
from metallo_core.fewshot.episodes import Episode

NAMES = ["ferrite", "pearlite", "martensite", "bainite", "unused"]


def two_tasks() -> list[Episode]:
    # 2-way 1-shot 2-query tasks; rows are irrelevant to the confusion, only classes and label order matter.
    return [
        Episode(classes=[1, 0], support=[10, 0], query=[11, 12, 1, 2]),  # pearlite, ferrite
        Episode(classes=[2, 1], support=[20, 13], query=[21, 22, 14, 15]),  # martensite, pearlite
    ]


def test_counts_are_pooled_by_class_name_over_tasks():
    predictions = [np.array([0, 1, 1, 1]), np.array([0, 0, 1, 0])]
    confusion = confusion_over_tasks(two_tasks(), predictions, NAMES)
    # classes that appeared, in split order; bainite and unused never did
    assert confusion.classes == ["ferrite", "pearlite", "martensite"]
    assert confusion.counts.tolist() == [
        # predicted: ferrite pearlite martensite
        [2, 0, 0],  # true ferrite: both queries right (task 1)
        [1, 2, 1],  # true pearlite: 1 right + 1 as ferrite in task 1, 1 right + 1 as martensite in task 2
        [0, 0, 2],  # true martensite: both right (task 2)
    ]
    assert confusion.tasks == 2 and confusion.queries == 8
    # a confusion that cannot happen (ferrite and martensite never share a task) has no opportunity
    assert confusion.opportunities.tolist() == [[2, 2, 0], [2, 4, 2], [0, 2, 2]]
    rates = confusion.rates()
    assert np.isnan(rates[0, 2]) and rates[1, 0] == pytest.approx(0.5) and rates[0, 0] == 1.0
    # the diagonal over all queries is the pooled accuracy
    assert np.trace(confusion.counts) / confusion.queries == pytest.approx(6 / 8)


def test_json_round_trip_and_format_check():
    confusion = confusion_over_tasks(two_tasks(), [np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])], NAMES)
    payload = json.loads(json.dumps(confusion.to_json()))
    again = Confusion.from_json(payload)
    assert again.classes == confusion.classes and np.array_equal(again.counts, confusion.counts)
    assert np.array_equal(again.opportunities, confusion.opportunities) and again.tasks == 2
    with pytest.raises(DataError, match="not a metallo-confusion/1"):
        Confusion.from_json({"classes": []})


def test_predictions_must_match_the_tasks():
    with pytest.raises(ValueError, match="2 tasks but predictions for 1"):
        confusion_over_tasks(two_tasks(), [np.array([0, 0, 1, 1])], NAMES)
    with pytest.raises(ValueError, match="2-way but a prediction is 2"):
        confusion_over_tasks(two_tasks(), [np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1])], NAMES)
    with pytest.raises(ValueError, match="4 queries but 3 predictions"):
        confusion_over_tasks(two_tasks(), [np.array([0, 0, 1]), np.array([0, 0, 1, 1])], NAMES)
