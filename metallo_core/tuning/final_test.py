"""The one evaluation of a search's winner on test tasks, logged on the search's parent run.

Several variants (plain ProtoNet, the default fine-tuning, the searched fine-tuning) are scored on the
same fixed tasks, so their differences are paired: the interval of a gain is that of the per-task
differences, much tighter than the two accuracies' own intervals suggest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from metallo_core import tracking
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain
from metallo_core.tuning.search_runs import FINAL_TEST_TAG


@dataclass
class Variant:
    mode: str  # protonet | finetune
    settings: dict[str, Any]  # fine-tuning settings (ignored by protonet)


def score_variants_on_test(config: EvaluateConfig, variants: dict[str, Variant], parent,
                           gains: list[tuple[str, str]]) -> dict[str, Any]:
    """Score each variant once on `config.tasks` tasks of `config.split`; log `test/<variant>_accuracy`,
    `_ci95` and the paired `test/<a>_minus_<b>` gains on `parent`, then mark the final test done."""
    from metallo_core.tracking.registry import pin_model_uri
    from metallo_core.train import ray_setup
    from metallo_core.train.evaluate import ParallelScorer, plan_tasks

    config = copy.deepcopy(config)
    config.model = pin_model_uri(config.model)
    ray_setup.connect(config.ray_address, "evaluate.ray_address")
    tasks, tasks_json = plan_tasks(config.data.uri, config.split, config, config.tasks, seed=config.seed)
    parent.log_text(tasks_json, f"final_test/episodes_{config.split}.json")
    scorer = ParallelScorer(config, config.split)
    per_task: dict[str, list[float]] = {}
    summary: dict[str, Any] = {"model": config.model, "split": config.split, "tasks": len(tasks),
                               "task": f"{config.episodes.way}-way {config.episodes.shot}-shot", "variants": {}}
    try:
        for name, variant in variants.items():
            accuracies, rate = scorer.score(variant.mode, tasks, variant.settings, config.seed, None)
            per_task[name] = accuracies
            mean, ci95 = mean_and_ci95(accuracies)
            summary["variants"][name] = {"mode": variant.mode, "mean": mean, "ci95": ci95,
                                         "settings": variant.settings if variant.mode != "protonet" else {}}
            parent.log_metrics({f"test/{name}_accuracy": mean, f"test/{name}_ci95": ci95,
                                f"test/{name}_episodes_per_s": rate})
            print(f"[final test] {name}: {100 * mean:.2f}% ± {100 * ci95:.2f} over {len(accuracies)} tasks",
                  flush=True)
    finally:
        scorer.close()
    summary["gains"] = {}
    for better, reference in gains:
        if better in per_task and reference in per_task:
            gain, ci95 = paired_gain(per_task[reference], per_task[better])
            summary["gains"][f"{better}_minus_{reference}"] = {"mean": gain, "ci95": ci95}
            parent.log_metrics({f"test/{better}_minus_{reference}": gain,
                                f"test/{better}_minus_{reference}_ci95": ci95})
            print(f"[final test] {better} - {reference}, paired: {100 * gain:+.2f} ± {100 * ci95:.2f} points",
                  flush=True)
    parent.log_dict(summary, "final_test/summary.json")
    parent.set_tags({FINAL_TEST_TAG: "done", "metallo.tune.final_test_model": config.model})
    return summary


def logged_final_test(parent_run_id: str) -> dict[str, Any]:
    """The summary a previous run of the search logged (a finished search run again does not re-test)."""
    import json

    path = tracking.client().download_artifacts(parent_run_id, "final_test/summary.json")
    with open(path) as handle:
        return json.load(handle)
