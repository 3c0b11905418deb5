"""`metallo quickstart --pretrained` argument handling, and the Ray-free logic behind it and
benchmarks/real_fewshot.py: the selection/test split, stage-wise fine-tuning on cached trunk features
(exact restore, no-op equals plain ProtoNet), and paired gains over the same tasks. Seconds, no Ray."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from metallo_core.commands import quickstart as quickstart_command
from metallo_core.errors import ConfigError
from metallo_core.fewshot.folder_benchmark import (
    LabelledFolder,
    draw_tasks,
    score_task_set,
    split_pools,
)
from metallo_core.fewshot.metrics import paired_gain
from metallo_core.fewshot.tail_finetune import (
    TailFinetuner,
    TailFinetuneSettings,
    split_backbone,
    trunk_features,
)
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


def test_staged_backbone_computes_the_same_features():
    network = small_resnet()
    images = torch.rand(4, 3, 64, 64)
    staged = split_backbone(network)
    with torch.no_grad():
        assert torch.allclose(staged(images), network(images), atol=1e-5)
        tuner = TailFinetuner(staged, TailFinetuneSettings(cache_stage=2, tune_stage=3))
        assert torch.allclose(tuner.embed(trunk_features(staged, images, 2)), network(images), atol=2e-2)
    with pytest.raises(ConfigError, match="EfficientNet-style network or a torchvision ResNet"):
        split_backbone(nn.Linear(3, 3))


def test_tail_finetuning_restores_weights_and_zero_steps_is_plain_protonet():
    network = small_resnet()
    staged = split_backbone(network)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    trunk = trunk_features(staged, torch.rand(12, 3, 64, 64), cache_stage=2)
    labels = torch.arange(3).repeat_interleave(2)
    tuner = TailFinetuner(staged, TailFinetuneSettings(steps=3, lr=1e-2, cache_stage=2, tune_stage=3, bn_mode="train"))
    losses = []
    tuner.adapt(trunk[:6], labels, 3, torch.Generator().manual_seed(0), on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 3
    assert any(not torch.equal(before[k], v) for k, v in network.state_dict().items())  # it did adapt
    tuner.restore()
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    tuner.task_logits(trunk[:6], labels, trunk[6:], 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_pseudo_query_maps_are_view_major_copies_of_the_support():
    # Oracle: a crop or flip of a constant map is the same constant, so row v * S + i of the pseudo-queries
    # must hold support image i's constant: the order the loss's `support_labels.repeat(views)` assumes.
    staged = split_backbone(small_resnet())
    support = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 8, 6, 6).half()
    tuner = TailFinetuner(staged, TailFinetuneSettings(cache_stage=2, tune_stage=3))
    queries = tuner.pseudo_queries(support, 3, torch.Generator().manual_seed(0))
    assert queries.shape == (12, 8, 6, 6)
    torch.testing.assert_close(queries.mean(dim=(1, 2, 3)), torch.arange(4.0).repeat(3))
    # On real maps each view is its own draw: no two copies of an image are the same crop.
    textured = torch.rand(4, 8, 6, 6).half()
    views = tuner.pseudo_queries(textured, 3, torch.Generator().manual_seed(0)).view(3, 4, 8, 6, 6)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[1], views[2])
    with pytest.raises(ConfigError, match="pseudo_queries_per_class must be >= 1"):
        TailFinetuneSettings(pseudo_queries_per_class=0).validate()


def test_score_task_set_pairs_ft_with_pn_over_the_same_tasks():
    network = small_resnet()
    staged = split_backbone(network)
    images = torch.rand(30, 3, 64, 64)
    folder = LabelledFolder(np.zeros((30, 64, 64, 3), np.uint8), np.repeat(np.arange(3), 10), ["a", "b", "c"], "toy")
    pools = [np.flatnonzero(folder.labels == c) for c in range(3)]
    episodes = draw_tasks(pools, 3, 1, 2, 4, seed=0)
    trunk = trunk_features(staged, images, cache_stage=2)
    noop = TailFinetuneSettings(steps=0, cache_stage=2, tune_stage=3)
    result, scores = score_task_set(staged, trunk, episodes, ["pn", "ft"], noop, seed=0)
    assert scores["ft"].accuracies == scores["pn"].accuracies  # no step: fine-tuning is plain ProtoNet
    assert result.gains["ft - pn"] == {"mean": 0.0, "ci95": 0.0}
    assert result.tasks == 4 and result.shot == 1 and result.way == 3
    adapted = TailFinetuneSettings(steps=2, lr=1e-2, cache_stage=2, tune_stage=3)
    result, scores = score_task_set(staged, trunk, episodes, ["pn", "ft"], adapted, seed=0)
    expected = paired_gain(scores["pn"].accuracies, scores["ft"].accuracies)
    assert (result.gains["ft - pn"]["mean"], result.gains["ft - pn"]["ci95"]) == pytest.approx(expected)


def test_pretrained_quickstart_registers_what_classify_finetune_will_use(monkeypatch, tmp_path):
    """The whole offline path on a few synthetic tasks (no X-SDD folder): both models registered under
    @pretrained, the ProtoNet's head at the fine-tuning scale chosen for the tail (not the meta-training
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
    assert model.classifier.scale.item() == TailFinetuneSettings().cosine_scale != 10.0
    recorded = recorded_for_model(result.models["protonet_alias"])
    for key, value in PRETRAINED_DEFAULTS["finetune"].items():
        assert getattr(recorded.settings, key) == value, key
    [scores] = result.results
    assert (scores["shot"], scores["tasks"]) == (1, 3) and set(scores["methods"]) == {"pn", "ft"}
