"""How an evaluation chooses its fine-tuning settings on meta-validation tasks (`select_on_val`): only on
the validation split, never the test split; lr 0 (plain ProtoNet) is a candidate that fine-tuning must beat
with a paired 95% interval above 0 on the same tasks; ties go to the smaller lr. Ray-free: the actors are
replaced by a scorer that records what it was asked."""

from __future__ import annotations

import numpy as np
import pytest

from metallo_core.config import from_dict, to_dict
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.fewshot.inference import InferenceSettings
from metallo_core.train import evaluate
from metallo_core.train.evaluate import choose_on_selection, select_finetune_on_val
from tests.fewshot_fixtures import write_tiny_fewshot

PLAIN = [0.4, 0.6, 0.5, 0.7, 0.5, 0.6, 0.4, 0.5]


def row(lr: float, per_task: list[float]) -> dict:
    return {"lr": lr, "steps": 10, "val_accuracy": sum(per_task) / len(per_task), "per_task": per_task}


def test_a_clear_paired_gain_picks_the_finetuning_lr():
    chosen, verdict = choose_on_selection([row(0.0, PLAIN), row(1e-3, [a + 0.1 for a in PLAIN])])
    assert chosen["lr"] == 1e-3 and verdict.kept and verdict.stage == "finetune"


def test_a_higher_mean_whose_interval_includes_0_keeps_plain_protonet():
    noisy = [a + d for a, d in zip(PLAIN, [0.3, -0.2, 0.3, -0.2, 0.3, -0.2, 0.3, -0.2])]
    assert sum(noisy) > sum(PLAIN)
    chosen, verdict = choose_on_selection([row(0.0, PLAIN), row(3e-3, noisy)])
    assert chosen["lr"] == 0.0 and not verdict.kept and "includes 0" in verdict.reason


def test_lr_0_winning_outright_is_kept_and_ties_go_to_the_smaller_lr():
    chosen, verdict = choose_on_selection([row(0.0, PLAIN), row(1e-3, [a - 0.1 for a in PLAIN])])
    assert chosen["lr"] == 0.0 and not verdict.kept
    better = [a + 0.1 for a in PLAIN]
    chosen, _ = choose_on_selection([row(0.0, PLAIN), row(3e-3, better), row(1e-3, better)])
    assert chosen["lr"] == 1e-3


def test_without_an_lr_0_candidate_the_most_accurate_row_is_used_ungated():
    chosen, verdict = choose_on_selection([row(1e-3, PLAIN), row(3e-3, [a + 0.05 for a in PLAIN])])
    assert chosen["lr"] == 3e-3 and verdict is None


class RecordingScorer:
    """Stands in for the Ray actors: records the split it was built for, the lrs and inference settings it
    scored; fine-tuning at lr 3e-3 and soft k-means inference answer every query right, the rest miss some."""

    splits: list[str] = []
    lrs: list[float | None] = []
    modes: list[str] = []
    inferences: list[list[dict]] = []

    def __init__(self, config, split, progress_every_s: float = 30.0):
        RecordingScorer.splits.append(split)

    def predict_by_inference(self, mode, episodes, settings, seed, lr, inferences):
        RecordingScorer.lrs.append(lr)
        RecordingScorer.modes.append(mode)
        RecordingScorer.inferences.append(inferences)

        def predicted(episode, index, perfect):
            labels = np.array(episode.query_labels)
            missed = 0 if perfect else 1 + index % 3
            labels[:missed] = (labels[:missed] + 1) % len(episode.classes)
            return labels

        return [[predicted(episode, index, lr == 3e-3 or inference["transductive"] == "soft_kmeans")
                 for index, episode in enumerate(episodes)] for inference in inferences], 1.0

    def close(self):
        pass


class NullRun:
    def log_text(self, *args):
        pass

    def log_dict(self, *args):
        pass

    def log_metrics(self, *args):
        pass

    def set_tags(self, *args):
        pass


@pytest.fixture
def recorded_selection_config(tmp_path, monkeypatch):
    """An EvaluateConfig on tiny data whose selection is scored by RecordingScorer (cleared), with `extra`
    selection settings; the split to report on is the test split, so the selection must not use it."""
    uri = write_tiny_fewshot(tmp_path)
    monkeypatch.setattr(evaluate, "ParallelScorer", RecordingScorer)
    RecordingScorer.splits, RecordingScorer.lrs, RecordingScorer.modes, RecordingScorer.inferences = [], [], [], []

    def config(**extra) -> EvaluateConfig:
        return from_dict(EvaluateConfig, {"model": "models:/m/1", "data": {"uri": uri}, "split": "test",
                                          "episodes": {"way": 5, "shot": 1, "query": 5}, "select_tasks": 6,
                                          **extra})
    return config


def test_selection_scores_only_the_validation_split_and_every_candidate(recorded_selection_config):
    config = recorded_selection_config(select_lrs=[0.0, 1e-3, 3e-3])
    lr, steps, selection = select_finetune_on_val(config, NullRun())
    assert RecordingScorer.splits == ["val"]  # never the test split
    # lr 0 adapts nothing: it is scored as plain ProtoNet (one embedding per image), the others fine-tuned
    assert RecordingScorer.modes == ["protonet", "finetune", "finetune"]
    assert RecordingScorer.lrs == [None, 1e-3, 3e-3]
    assert lr == pytest.approx(3e-3) and steps == config.finetune.steps
    assert selection["on"] == "val" and selection["verdict"]["kept"]


def test_inference_levers_are_candidates_on_every_lr_and_gated_against_plain_protonet(recorded_selection_config):
    config = recorded_selection_config(select_lrs=[0.0, 1e-3],
                                       select_inference=[{"power": 0.5}, {"transductive": "soft_kmeans"}])
    lr, _, selection = select_finetune_on_val(config, NullRun())
    plain = to_dict(InferenceSettings())
    # Every lr's adaptation is scored under plain inference (the baseline, first) and each candidate.
    assert all([i["transductive"] for i in scored] == ["none", "none", "soft_kmeans"]
               for scored in RecordingScorer.inferences)
    assert RecordingScorer.inferences[0][0] == plain and RecordingScorer.inferences[0][1]["power"] == 0.5
    assert len(selection["grid"]) == 6
    # Soft k-means wins at lr 0 and at lr 1e-3 alike: the tie goes to the smaller lr, no fine-tuning.
    assert lr == 0.0 and selection["best"]["inference"]["transductive"] == "soft_kmeans"
    assert selection["verdict"]["kept"]


def test_rows_without_inference_are_plain_and_a_lever_must_beat_plain_protonet_paired():
    better = [a + 0.1 for a in PLAIN]
    lever = {**to_dict(InferenceSettings()), "transductive": "soft_kmeans"}
    chosen, verdict = choose_on_selection([row(0.0, PLAIN), {**row(0.0, better), "inference": lever}])
    assert chosen["inference"] == lever and verdict is not None and verdict.kept
    noisy = [a + (0.3 if index % 2 else -0.25) for index, a in enumerate(PLAIN)]
    chosen, verdict = choose_on_selection([row(0.0, PLAIN), {**row(0.0, noisy), "inference": lever}])
    assert "inference" not in chosen and verdict is not None and not verdict.kept
