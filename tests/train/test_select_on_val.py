"""How an evaluation chooses its fine-tuning settings on meta-validation tasks (`select_on_val`): only on
the validation split, never the test split; lr 0 (plain ProtoNet) is a candidate that fine-tuning must beat
with a paired 95% interval above 0 on the same tasks; ties go to the smaller lr. Ray-free: the actors are
replaced by a scorer that records what it was asked."""

from __future__ import annotations

import pytest

from metallo_core.config import from_dict
from metallo_core.fewshot.config import EvaluateConfig
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
    """Stands in for the Ray actors: records the split it was built for and the lrs it scored."""

    splits: list[str] = []
    lrs: list[float | None] = []
    modes: list[str] = []

    def __init__(self, config, split, progress_every_s: float = 30.0):
        RecordingScorer.splits.append(split)

    def score(self, mode, episodes, settings, seed, lr=None):
        RecordingScorer.lrs.append(lr)
        gain = 0.2 if lr == 3e-3 else 0.0
        RecordingScorer.modes.append(mode)
        return [min(1.0, 0.5 + gain + 0.01 * (index % 3)) for index in range(len(episodes))], 1.0

    def close(self):
        pass


class NullRun:
    def log_text(self, *args):
        pass

    def log_dict(self, *args):
        pass

    def log_metrics(self, *args):
        pass


def test_selection_scores_only_the_validation_split_and_every_candidate(tmp_path, monkeypatch):
    uri = write_tiny_fewshot(tmp_path)
    monkeypatch.setattr(evaluate, "ParallelScorer", RecordingScorer)
    RecordingScorer.splits, RecordingScorer.lrs, RecordingScorer.modes = [], [], []
    config = from_dict(EvaluateConfig, {"model": "models:/m/1", "data": {"uri": uri}, "split": "test",
                                        "episodes": {"way": 5, "shot": 1, "query": 5}, "select_tasks": 6,
                                        "select_lrs": [0.0, 1e-3, 3e-3]})
    lr, steps, selection = select_finetune_on_val(config, NullRun())
    assert RecordingScorer.splits == ["val"]  # never the test split
    # lr 0 adapts nothing: it is scored as plain ProtoNet (one embedding per image), the others fine-tuned
    assert RecordingScorer.modes == ["protonet", "finetune", "finetune"]
    assert RecordingScorer.lrs == [None, 1e-3, 3e-3]
    assert lr == pytest.approx(3e-3) and steps == config.finetune.steps
    assert selection["on"] == "val" and selection["verdict"]["kept"]
