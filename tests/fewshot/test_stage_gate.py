"""The stage gate's verdicts: kept iff the paired gain's 95% interval lies above the minimum gain."""

import math

import numpy as np
import pytest

from metallo_core.fewshot.stage_gate import judge, stage_table, unopposed


def paired(gains, base=0.5):
    before = np.full(len(gains), base) + np.linspace(-0.2, 0.2, len(gains))  # task difficulty varies
    return list(before), list(before + np.asarray(gains))


def test_a_gain_whose_interval_lies_above_zero_is_kept():
    before, after = paired([0.04, 0.06] * 10)
    verdict = judge("pretrain", "X-SDD train", "imagenet-offline", before, after)
    assert verdict.kept and verdict.tasks == 20
    assert verdict.gain.mean == pytest.approx(0.05)
    # the oracle: 1.96 * sd(ddof=1) / sqrt(n) of the per-task differences
    assert verdict.gain.ci95 == pytest.approx(1.96 * np.std([0.04, 0.06] * 10, ddof=1) / math.sqrt(20))
    assert verdict.before.mean == pytest.approx(0.5) and verdict.after.mean == pytest.approx(0.55)
    assert verdict.reason.startswith("gain +5.0 ± 0.4 points: the interval lies above 0")


def test_a_gain_whose_interval_includes_zero_leaves_the_baseline():
    before, after = paired([0.01, -0.005, 0.002, 0.0] * 5)
    verdict = judge("metatrain", "miniImageNet train", "models:/metallo-protonet/3", before, after)
    assert not verdict.kept
    assert "the interval includes 0, the baseline stays" in verdict.reason
    assert verdict.reason.startswith("gain +0.2 ± 0.")


def test_a_loss_is_not_kept_and_says_the_interval_lies_below():
    before, after = paired([-0.1, -0.12] * 10)
    verdict = judge("pretrain", "d", "b", before, after)
    assert not verdict.kept and "lies below 0" in verdict.reason


def test_the_pairing_is_what_decides_not_the_two_separate_intervals():
    # Tasks differ a lot in difficulty; every task gains one point. The separate intervals overlap widely,
    # the paired one does not include 0.
    before = list(np.linspace(0.2, 0.9, 30))
    after = [accuracy + 0.01 for accuracy in before]
    verdict = judge("pretrain", "d", "b", before, after)
    assert verdict.after.mean - verdict.after.ci95 < verdict.before.mean + verdict.before.ci95
    assert verdict.kept and verdict.gain.ci95 == pytest.approx(0.0, abs=1e-12)


def test_min_gain_raises_the_bar():
    before, after = paired([0.02, 0.03] * 10)
    assert judge("s", "d", "b", before, after, min_gain=0.0).kept
    verdict = judge("s", "d", "b", before, after, min_gain=0.05)
    assert not verdict.kept and "the minimum gain +5.0" in verdict.reason


def test_tasks_must_pair():
    with pytest.raises(ValueError, match="same tasks"):
        judge("s", "d", "b", [0.5, 0.6], [0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="at least 2"):
        judge("s", "d", "b", [0.5], [0.6])


def test_no_baseline_keeps_the_output_and_says_why():
    verdict = unopposed("pretrain", "X-SDD train", "scratch start, no model at metallo-backbone@current")
    assert verdict.kept and not verdict.compared and verdict.gain is None and verdict.tasks == 0
    assert "no baseline to compare with" in verdict.reason and "scratch start" in verdict.reason
    assert verdict.to_dict()["before"] is None


def test_the_table_has_one_row_per_stage_with_scores_gain_and_decision():
    before, after = paired([-0.1, -0.12] * 10)
    table = stage_table([unopposed("pretrain", "X-SDD train", "scratch start"),
                         judge("metatrain", "far | domain", "the DINO backbone", before, after)])
    lines = table.splitlines()
    assert lines[0] == ("| stage | trained on | selection accuracy before -> after | paired gain | kept? | why |")
    assert len(lines) == 4
    assert lines[2].startswith("| pretrain | X-SDD train | n/a | n/a | yes | no baseline")
    assert "| metatrain | far \\| domain | 50.0 ± " in lines[3] and "-> 39.0 ± " in lines[3]
    assert "| -11.0 ± 0.4 points | no |" in lines[3]


def test_the_verdict_reads_as_one_line_and_as_plain_data():
    before, after = paired([0.04, 0.06] * 10)
    verdict = judge("pretrain", "d", "imagenet-offline", before, after)
    assert "\n" not in verdict.line() and "kept" in verdict.line() and "imagenet-offline" in verdict.line()
    assert verdict.to_dict()["gain"] == {"mean": pytest.approx(0.05), "ci95": pytest.approx(verdict.gain.ci95)}
