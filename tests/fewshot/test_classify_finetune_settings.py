"""`classify --finetune` uses the fine-tuning settings an evaluation or a search chose for the model (whole:
lr with steps, update, BatchNorm mode, augmentations), or those of `--finetune-from`; explicit flags override
single fields; it says which it used and where from."""

from __future__ import annotations

import json

import pytest
import yaml

from metallo_core import cli, tracking
from metallo_core.errors import ConfigError
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
from metallo_core.fewshot.inference import InferenceSettings
from metallo_core.tracking.finetune_choice import (
    CHOSEN_BY_TAG,
    SETTINGS_TAG,
    choose,
    record_chosen_inference,
    record_chosen_settings,
    settings_from,
)
from tests.fewshot.test_classify import SPEC, folders  # noqa: F401 - the support/query folders fixture
from tests.fewshot_fixtures import register_untrained_protonet

QUICKSTART_CHOICE = FinetuneSettings(steps=2, lr=0.003, update="last_stage", bn_mode="train")


def test_classify_fine_tunes_with_the_settings_recorded_on_the_model(folders, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    model_uri = register_untrained_protonet(SPEC)
    assert "defaults" in choose(model_uri).source  # nothing recorded yet: the defaults, and it says so
    with tracking.start_run("metallo-evaluate", "eval-5w5s") as run:
        pass
    record_chosen_settings(run.run_id, model_uri, QUICKSTART_CHOICE, "evaluation 'eval-5w5s', lr and steps "
                           "chosen on 16 meta-validation tasks")
    version = tracking.client().get_model_version("metallo-protonet", "1")
    assert json.loads(version.tags[SETTINGS_TAG])["update"] == "last_stage"
    assert run.run_id in version.tags[CHOSEN_BY_TAG]

    used = []
    real_adapt = FinetuneEngine.adapt
    monkeypatch.setattr(FinetuneEngine, "adapt",
                        lambda engine, *args, **kwargs: used.append(engine.settings) or real_adapt(engine, *args,
                                                                                                   **kwargs))
    support, query = folders
    out = tmp_path / "p.csv"
    assert cli.main(["classify", "--model", model_uri, "--support", str(support), "--query", str(query),
                     "--out", str(out), "--finetune", "--lr", "0.001", "--json"]) == 0
    # The lr given on the command line; everything else as the evaluation chose it.
    assert used == [FinetuneSettings(steps=2, lr=0.001, update="last_stage", bn_mode="train")]
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["finetune"]["settings"]["update"] == "last_stage" and summary["finetune"]["settings"]["lr"] == 0.001
    assert "models:/metallo-protonet/1" in summary["finetune"]["source"]
    assert "eval-5w5s" in summary["finetune"]["source"] and "overridden: lr 0.001" in summary["finetune"]["source"]
    assert "[classify] fine-tuning with lr 0.001, steps 2, update last_stage, bn_mode train" in captured.err

    used.clear()
    best = tmp_path / "best_config.yaml"
    best.write_text(yaml.safe_dump({"model": model_uri, "finetune": {"lr": 0.0013, "steps": 1, "update": "all",
                                                                     "bn_mode": "eval", "pseudo_queries": "pixels"}}))
    assert cli.main(["classify", "--model", model_uri, "--support", str(support), "--query", str(query),
                     "--out", str(out), "--finetune-from", str(best)]) == 0  # implies --finetune
    assert used == [FinetuneSettings(steps=1, lr=0.0013, update="all", bn_mode="eval", pseudo_queries="pixels")]
    assert f"from the finetune: section of {best}" in capsys.readouterr().out


def test_settings_from_runs_old_and_new(tmp_path):
    with tracking.start_run("metallo-tune", "search-x") as search:
        pass
    record_chosen_settings(search.run_id, "runs:/abc/protonet", QUICKSTART_CHOICE, "search 'x', best of 4 trials")
    chosen = settings_from(search.run_id)
    assert chosen.settings == QUICKSTART_CHOICE and "search 'x'" in chosen.source

    # An evaluation logged before choices were recorded: its config, with the lr and steps it selected.
    config = {"model": "models:/m/1", "finetune": {"lr": 0.003, "steps": 10, "update": "last_stage",
                                                   "bn_mode": "train"}}
    with tracking.start_run("metallo-evaluate", "old-eval", config=config) as old:
        old.log_dict([{"lr": 0.003, "steps": 10, "val_accuracy": 0.91},
                      {"lr": 0.01, "steps": 10, "val_accuracy": 0.93}],
                     "selection/finetune_on_meta_val.json")
    chosen = settings_from(old.run_id)
    assert (chosen.settings.lr, chosen.settings.update, chosen.settings.bn_mode) == (0.01, "last_stage", "train")
    assert chosen.settings.pseudo_queries == "pixels"  # logged before trunk maps existed: what it ran then
    assert "selected on meta-validation tasks" in chosen.source

    search_config = tmp_path / "search.yaml"
    search_config.write_text(yaml.safe_dump({"evaluate": {"finetune": {"lr": 0.002, "update": "last_stage"}}}))
    from_file = settings_from(str(search_config)).settings
    assert from_file.lr == 0.002 and from_file.pseudo_queries == "trunk_maps"  # a config file: the defaults


@pytest.mark.parametrize("source, message", [
    ("nowhere.yaml", "no such file"),
    ("not-a-run", "neither a run id"),
])
def test_bad_sources_are_named(source, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        settings_from(source)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"finetune": {"update": "everything"}}))
    with pytest.raises(ConfigError, match=f"{bad}.*update"):
        settings_from(str(bad))


def test_classify_scores_with_the_inference_recorded_on_the_model_and_says_it_is_transductive(
        folders, tmp_path, capsys):  # noqa: F811
    model_uri = register_untrained_protonet(SPEC)
    support, query = folders

    def run(out, *flags):
        assert cli.main(["classify", "--model", model_uri, "--support", str(support), "--query", str(query),
                         "--out", str(out), "--json", *flags]) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out.strip().splitlines()[-1]), captured.err

    before, err = run(tmp_path / "before.csv")
    assert before["inference"]["settings"]["transductive"] == "none" and "no evaluation recorded" in \
        before["inference"]["source"]
    assert "transductive:" not in err

    with tracking.start_run("metallo-evaluate", "eval-levers") as recording:
        pass
    record_chosen_inference(recording.run_id, model_uri, InferenceSettings(transductive="soft_kmeans", power=0.5),
                            "evaluation 'eval-levers', chosen on 16 meta-validation tasks")
    chosen, err = run(tmp_path / "chosen.csv")
    assert chosen["inference"]["settings"] == {**before["inference"]["settings"], "transductive": "soft_kmeans",
                                               "power": 0.5}
    assert "eval-levers" in chosen["inference"]["source"]
    assert "shape the class prototypes together" in err  # said plainly: predictions depend on the folder

    plain, err = run(tmp_path / "plain.csv", "--inference", "plain")
    assert plain["inference"]["settings"]["transductive"] == "none" and "transductive:" not in err
    # Plain inference is the ProtoNet classify always ran: the same CSV as before anything was recorded.
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "before.csv").read_text()
    overridden, _ = run(tmp_path / "bd.csv", "--transductive", "bd_cspn")
    assert overridden["inference"]["settings"]["transductive"] == "bd_cspn"
    assert overridden["inference"]["settings"]["power"] == 0.5 and "overridden" in overridden["inference"]["source"]
