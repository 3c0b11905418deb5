"""`metallo quickstart --pretrained` argument handling, and the Ray-free logic behind it and
benchmarks/real_fewshot.py: the selection/test split and paired gains over the same tasks (the fine-tuning
engine itself: tests/fewshot/test_finetune_engine.py). Seconds, no Ray."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from metallo_core.commands import quickstart as quickstart_command
from metallo_core.errors import ConfigError
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
from metallo_core.fewshot.folder_benchmark import (
    PRETRAINED_COSINE_SCALE,
    LabelledFolder,
    draw_tasks,
    folder_cache,
    pretrained_protonet,
    score_task_set,
    split_pools,
)
from metallo_core.fewshot.metrics import paired_gain
from metallo_core.fewshot.protonet import ImageNormalizer
from metallo_core.quickstart_pretrained import resolve_eval_images


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quickstart_command.register(parser.add_subparsers())
    return parser.parse_args(["quickstart", *argv])


def test_pretrained_flags_parse_and_eval_images_needs_pretrained():
    args = parse(["--pretrained", "--eval-images", "/data/x", "evaluate.tasks=50"])
    assert args.pretrained and args.eval_images == "/data/x" and args.overrides == ["evaluate.tasks=50"]
    assert not parse([]).pretrained
    with pytest.raises(SystemExit, match="applies to `metallo quickstart --pretrained` only"):
        quickstart_command._quickstart(parse(["--eval-images", "/data/x"]))


def test_eval_images_flag_default_and_fallback(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_eval_images(str(tmp_path / "missing"))
    assert resolve_eval_images(str(tmp_path)) == tmp_path
    repo = tmp_path / "repo"
    repo.mkdir()
    assert resolve_eval_images(None, repo_root=repo) is None  # -> synthetic test classes
    (tmp_path / "shared" / "data" / "x-sdd").mkdir(parents=True)
    assert resolve_eval_images(None, repo_root=repo) == (tmp_path / "shared" / "data" / "x-sdd").resolve()


def test_split_pools_is_disjoint_seeded_and_covers_every_image():
    labels = np.repeat(np.arange(3), [10, 20, 7])
    selection, test = split_pools(labels, 0.3, seed=0)
    assert [len(s) for s in selection] == [3, 6, 2]
    for chosen, held in zip(selection, test):
        assert not set(chosen) & set(held)
    assert sorted(np.concatenate(selection + test)) == list(range(len(labels)))
    again, _ = split_pools(labels, 0.3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(selection, again))


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None)
    network.fc = nn.Identity()
    return network.eval()


def test_score_task_set_pairs_ft_with_pn_over_the_same_tasks():
    model = pretrained_protonet(small_resnet())
    images = np.random.default_rng(0).integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
    folder = LabelledFolder(images, np.repeat(np.arange(3), 10), ["a", "b", "c"], "toy")
    pools = [np.flatnonzero(folder.labels == c) for c in range(3)]
    episodes = draw_tasks(pools, 3, 1, 2, 4, seed=0)
    normalizer = ImageNormalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    noop = FinetuneEngine(model, FinetuneSettings(steps=0), normalizer)
    cache = folder_cache(folder, noop)
    result, scores = score_task_set(noop, cache, episodes, ["pn", "ft"], seed=0)
    assert scores["ft"].accuracies == scores["pn"].accuracies  # no step: fine-tuning is plain ProtoNet
    assert result.gains["ft - pn"] == {"mean": 0.0, "ci95": 0.0}
    assert result.tasks == 4 and result.shot == 1 and result.way == 3
    adapted = noop.with_settings(steps=2, lr=1e-2)
    result, scores = score_task_set(adapted, cache, episodes, ["pn", "ft"], seed=0)
    expected = paired_gain(scores["pn"].accuracies, scores["ft"].accuracies)
    assert (result.gains["ft - pn"]["mean"], result.gains["ft - pn"]["ci95"]) == pytest.approx(expected)


def test_pretrained_quickstart_registers_what_classify_finetune_will_use(monkeypatch, tmp_path):
    """The whole offline path on a few synthetic tasks (no X-SDD folder): both models registered under
    @pretrained, the ProtoNet's head at the fine-tuning scale chosen on X-SDD (not the meta-training
    init of 10), and the fine-tuning settings recorded on it for `classify --finetune`."""
    from metallo_core.models.finetune_choice import recorded_for_model
    from metallo_core.models.protonet_store import load_protonet
    from metallo_core.models.registry import resolve_version
    from metallo_core.quickstart_pretrained import PRETRAINED_DEFAULTS, run_pretrained_quickstart

    monkeypatch.setattr("metallo_core.quickstart_pretrained.DEFAULT_EVAL_IMAGES", str(tmp_path / "no-x-sdd"))
    result = run_pretrained_quickstart([
        "image_size=64", "evaluate.size=64", "evaluate.shots=[1]", "evaluate.tasks=3", "evaluate.query=2",
        "evaluate.synthetic.classes=20", "evaluate.synthetic.images_per_class=4", "evaluate.synthetic.size=64"])

    assert "synthetic benchmark" in result.evaluated_on
    assert str(resolve_version(result.models["protonet_alias"]).version) == result.models["protonet"].rsplit("/", 1)[1]
    model, spec, _ = load_protonet(result.models["protonet_alias"])
    assert spec.image_size == 64 and spec.arch == "tf_efficientnet_lite0"
    assert model.classifier.scale.item() == PRETRAINED_COSINE_SCALE != 10.0
    recorded = recorded_for_model(result.models["protonet_alias"])
    for key, value in PRETRAINED_DEFAULTS["finetune"].items():
        assert getattr(recorded.settings, key) == value, key
    [scores] = result.results
    assert (scores["shot"], scores["tasks"]) == (1, 3) and set(scores["methods"]) == {"pn", "ft"}
