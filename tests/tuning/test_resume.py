"""Running a search again under the same name (pure: no Ray): more samples extend it, run settings may
change, anything else is refused naming the setting and the way out."""

import copy
from pathlib import Path

import pytest

from metallo_core.config import load_config
from metallo_core.tuning.config import FinetuneSearchConfig, MetaTrainSearchConfig
from metallo_core.tuning.resume import SPEC_FILE, SearchChanged, check_resume, compare_specs, search_spec

REPO = Path(__file__).resolve().parents[2]


def finetune_config(*overrides: str) -> FinetuneSearchConfig:
    return load_config(FinetuneSearchConfig, REPO / "tuning/configs/finetune_tiny_cpu.yaml",
                       ["search.num_samples=2", *overrides])


def test_the_same_config_resumes_unchanged():
    stored = search_spec(finetune_config())
    plan = check_resume(stored, search_spec(finetune_config()), "finetune-tiny", "/s/finetune-tiny")
    assert not plan.refused and not plan.ignored and not plan.extends


def test_more_samples_extend_the_search():
    plan = check_resume(search_spec(finetune_config()), search_spec(finetune_config("search.num_samples=3")),
                        "finetune-tiny", "/s")
    assert plan.extends and (plan.stored_samples, plan.samples) == (2, 3)


@pytest.mark.parametrize("change, named", [
    (lambda c: c.space.update({"finetune.lr": {"loguniform": [1.0e-3, 1.0e-2]}}),
     r"space: finetune.lr: was \{\"loguniform\": \[0.0001, 0.03\]\}, now \{\"loguniform\": \[0.001, 0.01\]\}"),
    (lambda c: c.space.update({"finetune.bn_mode": {"choice": ["train", "eval"]}}),
     r"space: finetune.bn_mode: was \(absent\), now \{\"choice\": \[\"train\", \"eval\"\]\}"),
    (lambda c: c.space.pop("finetune.update"), r"space: finetune.update: was \{\"choice\".*now \(absent\)"),
    (lambda c: setattr(c.evaluate, "model", "models:/metallo-protonet/7"), r"evaluate.model: was 'models:/"),
    (lambda c: setattr(c, "val_tasks", 40), r"val_tasks: was 20, now 40"),
    (lambda c: setattr(c.search, "num_samples", 1), r"search.num_samples: was 2, now 1"),
    (lambda c: setattr(c.search, "searcher", "random"), r"search.searcher: was 'optuna', now 'random'"),
])
def test_other_changes_are_refused_naming_the_setting_and_the_way_out(change, named):
    config = finetune_config()
    stored = search_spec(config)
    changed = copy.deepcopy(config)
    change(changed)
    with pytest.raises(SearchChanged, match=named) as caught:
        check_resume(stored, search_spec(changed), "finetune-tiny", "/s/finetune-tiny")
    message = str(caught.value)
    assert "search.name=finetune-tiny-2" in message and f"/s/finetune-tiny/{SPEC_FILE}" in message
    assert "nothing was run" in message


def test_yaml_spellings_of_the_same_bound_are_the_same_space():
    config = finetune_config()
    respelled = copy.deepcopy(config)
    respelled.space["finetune.lr"] = {"loguniform": ["1e-4", "3.0e-2"]}  # PyYAML reads 1e-4 as a string
    assert not compare_specs(search_spec(config), search_spec(respelled)).refused


def test_run_settings_may_change_and_are_reported():
    stored = search_spec(finetune_config())
    plan = compare_specs(stored, search_spec(finetune_config(
        "search.max_concurrent_trials=4", "search.gpus_per_trial=0.25", "evaluate.parallelism=8")))
    assert not plan.refused
    assert {change.setting for change in plan.ignored} == {
        "search.max_concurrent_trials", "search.gpus_per_trial", "evaluate.parallelism"}


def test_a_random_search_cannot_grow():
    config = finetune_config("search.searcher=random")
    more = finetune_config("search.searcher=random", "search.num_samples=3")
    with pytest.raises(SearchChanged, match="searcher random cannot be extended"):
        check_resume(search_spec(config), search_spec(more), "s", "/s")


def test_metatrain_search_specs_compare_the_trial_template():
    config = load_config(MetaTrainSearchConfig, REPO / "tuning/configs/metatrain_tiny_cpu.yaml")
    changed = copy.deepcopy(config)
    changed.base.episodes_per_epoch += 1
    changed.base.compute.cpus_per_worker = 2.0  # how a trial runs: allowed
    plan = compare_specs(search_spec(config), search_spec(changed))
    assert [change.setting for change in plan.refused] == ["base.episodes_per_epoch"]
    assert [change.setting for change in plan.ignored] == ["base.compute.cpus_per_worker"]
