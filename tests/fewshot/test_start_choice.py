"""The starting network's choice on selection tasks: the incumbent stays unless a larger offline network wins
with a paired 95% interval above 0 (fewshot.start_choice), on real offline weights with scripted task scores."""

from __future__ import annotations

import pytest

from metallo_core.errors import ConfigError
from metallo_core.fewshot.selection_probe import ProbeScore
from metallo_core.fewshot.start_choice import choose_start, network_words

CANDIDATES = ["imagenet-offline", "imagenet-offline:lite1", "imagenet-offline:lite2"]


class ScriptedTasks:
    """Stands in for SelectionTasks: per-task accuracies by architecture, and a record of what was scored."""

    def __init__(self, by_arch: dict[str, list[float]]):
        self.by_arch, self.scored = by_arch, []

    def score(self, backbone, spec, device="cpu") -> ProbeScore:
        self.scored.append((spec.arch, spec.image_size, spec.weights))
        return ProbeScore(task_accuracies=self.by_arch[spec.arch], knn_accuracy=0.0)


def accuracies(base: float, jitter: float = 0.02, tasks: int = 30) -> list[float]:
    return [base + (jitter if index % 2 else -jitter) for index in range(tasks)]


def test_a_larger_network_replaces_the_incumbent_only_with_an_interval_above_zero():
    tasks = ScriptedTasks({"tf_efficientnet_lite0": accuracies(0.70), "tf_efficientnet_lite1": accuracies(0.69),
                           "tf_efficientnet_lite2": accuracies(0.75)})
    choice = choose_start(tasks, 64, CANDIDATES)
    assert choice.source == "imagenet-offline:lite2" and choice.verdict is not None and choice.verdict.kept
    assert choice.verdict.stage == "start" and "EfficientNet-Lite2" in choice.verdict.trained_on
    assert tasks.scored == [("tf_efficientnet_lite0", 64, "imagenet-offline"),
                            ("tf_efficientnet_lite1", 64, "imagenet-offline:lite1"),
                            ("tf_efficientnet_lite2", 64, "imagenet-offline:lite2")]
    assert set(choice.task_accuracies) == set(CANDIDATES)


def test_the_incumbent_stays_when_the_best_challenger_is_within_the_noise_or_worse():
    noisy = [0.70 + (0.2 if index % 2 else -0.18) for index in range(30)]  # mean +0.01, interval across 0
    tasks = ScriptedTasks({"tf_efficientnet_lite0": accuracies(0.70), "tf_efficientnet_lite1": noisy,
                           "tf_efficientnet_lite2": accuracies(0.60)})
    choice = choose_start(tasks, 64, CANDIDATES)
    assert choice.source == "imagenet-offline" and not choice.verdict.kept
    assert "EfficientNet-Lite1" in choice.verdict.trained_on  # the most accurate challenger was judged
    assert "the baseline stays" in choice.verdict.reason


def test_one_candidate_is_taken_unjudged_and_a_wrong_name_fails_before_any_network_loads():
    tasks = ScriptedTasks({"tf_efficientnet_lite0": accuracies(0.7)})
    choice = choose_start(tasks, 64, ["imagenet-offline"])
    assert (choice.source, choice.verdict) == ("imagenet-offline", None)
    untouched = ScriptedTasks({})
    with pytest.raises(ConfigError, match="lite3"):
        choose_start(untouched, 64, ["imagenet-offline", "imagenet-offline:lite3"])
    assert untouched.scored == []
    assert network_words("imagenet-offline:lite1") == "ImageNet EfficientNet-Lite1 (offline)"
