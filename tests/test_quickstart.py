"""`metallo quickstart`'s Ray-free logic: flags, the folder it runs on, crop sizes, the fine-tuning stage's
verdict from the selection grid, the test-pool figures (paired over the same tasks) and the printed summary."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from metallo_core.commands import quickstart as quickstart_command
from metallo_core.datasets import xsdd_images
from metallo_core.errors import DataError
from metallo_core.quickstart import (
    QuickstartResult,
    describe,
    figures_on_test_pool,
    finetune_verdict,
    labelled_folder,
    local_crop_size,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quickstart_command.register(parser.add_subparsers())
    return parser.parse_args(["quickstart", *argv])


def test_flags_parse_and_images_does_not_apply_to_from_scratch():
    args = parse(["--images", "/data/x", "evaluate.tasks=50"])
    assert args.images == "/data/x" and not args.from_scratch and args.overrides == ["evaluate.tasks=50"]
    assert parse(["--from-scratch"]).from_scratch
    with pytest.raises(SystemExit, match="--images applies to the real-image quickstart"):
        quickstart_command._quickstart(parse(["--from-scratch", "--images", "/data/x"]))


def test_the_chain_runs_on_the_built_in_xsdd_unless_given_a_folder(tmp_path):
    assert labelled_folder("") == xsdd_images()
    assert labelled_folder(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(DataError, match="is not a directory of class folders"):
        labelled_folder(str(tmp_path / "missing"))


def test_local_crops_keep_dinos_ratio_on_a_multiple_of_8():
    assert local_crop_size(224) == 96
    assert local_crop_size(128) == 56
    assert local_crop_size(64) == 32  # never below 32


def evaluation(per_task: dict, grid: list[dict] | None = None, best_lr: float | None = None):
    best = next((row for row in grid or [] if row["lr"] == best_lr), None)
    return SimpleNamespace(way=5, shot=1, tasks=len(next(iter(per_task.values()))), per_task=per_task,
                           selection={"grid": grid, "best": best} if grid else {},
                           modes={"finetune": SimpleNamespace(lr=0.003 if best_lr is None else best_lr)})


def test_finetuning_is_judged_against_lr_0_on_the_same_selection_tasks():
    plain = [0.5, 0.6, 0.4, 0.5, 0.7, 0.6]
    better = [a + 0.1 for a in plain]
    grid = [{"lr": 0.0, "steps": 10, "val_accuracy": 0.55, "per_task": plain},
            {"lr": 0.003, "steps": 10, "val_accuracy": 0.65, "per_task": better}]
    verdict = finetune_verdict(evaluation({"protonet": plain}, grid, best_lr=0.003))
    assert verdict.stage == "finetune" and verdict.kept
    assert verdict.gain.mean == pytest.approx(0.1)
    same = [grid[0], {**grid[1], "val_accuracy": 0.55, "per_task": plain}]
    assert not finetune_verdict(evaluation({"protonet": plain}, same, 0.0)).kept
    assert finetune_verdict(evaluation({"protonet": plain})) is None  # no selection ran


def test_figures_on_test_pool_pair_every_method_with_the_imagenet_start_over_the_same_tasks():
    imagenet = [0.6, 0.7, 0.5, 0.6]
    chain = evaluation({"protonet": imagenet, "finetune": [0.7, 0.8, 0.6, 0.7]})
    figures = figures_on_test_pool(chain, evaluation({"protonet": imagenet}))
    assert figures["tasks"] == 4 and (figures["way"], figures["shot"]) == (5, 1)
    assert figures["gains"]["finetune - imagenet_protonet"]["mean"] == pytest.approx(0.1)
    assert figures["gains"]["finetune - imagenet_protonet"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert figures["gains"]["protonet - imagenet_protonet"] == {"mean": 0.0, "ci95": 0.0}


def test_summary_shows_what_each_stage_saw_the_stage_table_and_the_paired_test_figures():
    imagenet = [0.6, 0.7, 0.5, 0.6]
    figures = figures_on_test_pool(evaluation({"protonet": imagenet, "finetune": [0.7, 0.8, 0.6, 0.7]}),
                                evaluation({"protonet": imagenet}))
    result = QuickstartResult(
        images="/x/x_sdd/images", pools={"test": "test: 816 images of 7 classes, seen by no training stage"},
        stage_table="| stage | ... |", test=figures,
        models={"protonet": "models:/metallo-protonet/3", "protonet_alias": "models:/metallo-protonet@quickstart"},
        minutes=7.5)
    text = describe(result)
    assert "finished in 7.5 min, on /x/x_sdd/images" in text
    assert "test: 816 images of 7 classes, seen by no training stage" in text
    assert "| frozen ImageNet EfficientNet-Lite0 (offline), plain ProtoNet | 60.00% ± " in text
    assert "| registered model, plain ProtoNet | 60.00% ± " in text
    assert "| registered model as classify runs it: fine-tuning lr 0.003, inductive | 70.00% ± " in text
    assert "as classify runs it - frozen ImageNet ProtoNet, paired: +10.00 ± 0.00 points" in text
    assert "metallo classify --model models:/metallo-protonet@quickstart" in text and "--finetune" in text
    result.start = "imagenet-offline:lite2"  # where the selection tasks chose a larger start, its row says so
    assert "| frozen ImageNet EfficientNet-Lite2 (offline), plain ProtoNet | 60.00% ± " in describe(result)


def test_summary_with_levers_chosen_and_no_finetuning_names_what_classify_runs():
    """lr 0 and a transductive lever chosen: the plain rows are the evaluation's `<mode>_plain`, and the
    classify command has no --finetune (it would change nothing)."""
    imagenet, levers = [0.6, 0.7, 0.5, 0.6], [0.8, 0.9, 0.7, 0.8]
    chain = evaluation({"protonet": levers, "finetune": levers, "protonet_plain": imagenet,
                        "finetune_plain": imagenet}, best_lr=0.0)
    figures = figures_on_test_pool(chain, chain)
    assert figures["finetune_lr"] == 0.0 and figures["imagenet_protonet"]["mean"] == pytest.approx(0.6)
    assert figures["gains"]["finetune - protonet_plain"]["mean"] == pytest.approx(0.2)
    result = QuickstartResult(
        images="/x", pools={}, stage_table="| stage |", test=figures,
        inference={"transductive": "soft_kmeans", "power": 0.5},
        models={"protonet": "models:/metallo-protonet/3", "protonet_alias": "models:/metallo-protonet@quickstart"},
        minutes=1.0)
    text = describe(result)
    assert "| registered model, plain ProtoNet | 60.00% ± " in text
    assert ("| registered model as classify runs it: no fine-tuning (lr 0 chosen), transductive soft_kmeans, "
            "power transform 0.5 | 80.00% ± ") in text
    assert "as classify runs it - plain ProtoNet, paired: +20.00 ± 0.00 points" in text
    assert "--finetune" not in text.split("classify with it:")[1]
