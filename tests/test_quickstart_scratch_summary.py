"""The from-scratch quickstart's printed summary says what meta-val chose, including "no fine-tuning" (lr 0)."""

import pytest

from metallo_core.quickstart_scratch import QuickstartResult, describe


def result(lr: float | None) -> QuickstartResult:
    return QuickstartResult(
        protonet={"mean": 0.8190, "ci95": 0.0160}, finetune={"mean": 0.8190, "ci95": 0.0160},
        models={"backbone": "models:/metallo-backbone/1", "protonet": "models:/metallo-protonet/1"},
        dataset="/tmp/ds", way=5, shot=5, tasks=80, finetune_lr=lr, gain={"mean": 0.0, "ci95": 0.0},
    )


@pytest.mark.parametrize("lr,expected", [
    (0.0, "fine-tuning lr 0 chosen on meta-validation tasks: no lr tried beat plain ProtoNet there"),
    (0.01, "fine-tuning lr 0.01, chosen on meta-validation tasks"),
])
def test_summary_names_the_lr_meta_val_chose(lr, expected):
    text = describe(result(lr))
    assert expected in text
    assert "| ProtoNet (PN) | 81.90% ± 1.60 |" in text
    assert "PN+FT - PN, paired over the same tasks: +0.00 ± 0.00 points" in text


def test_summary_without_selection_names_no_lr():
    assert "fine-tuning lr" not in describe(result(None))
