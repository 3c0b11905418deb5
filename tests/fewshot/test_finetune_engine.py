"""The one fine-tuning engine in its default form, cached trunk maps: it beats ProtoNet on real images, steps 0
or lr 0 is ProtoNet bit for bit (in both forms), weights come back bit-exactly, the split before the cache is
exact, settings it cannot run are refused naming the setting, and settings recorded before the form existed
load as pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from metallo_core.config import from_dict
from metallo_core.errors import ConfigError
from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings, crop_trunk_maps, task_generator
from metallo_core.fewshot.metrics import paired_gain
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.fewshot.task import FewShotTask, SupportSet
from metallo_core.models.staged import split_backbone
from tests.fewshot.test_finetune import NORMALIZER, same_state, state_copy, tiny_protonet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_resnet_protonet(seed: int = 0) -> ProtoNet:
    torch.manual_seed(seed)
    network = torchvision.models.resnet18(weights=None)
    network.fc = nn.Identity()
    return ProtoNet(network.eval())


def toy_task(seed: int = 0, way: int = 3, shot: int = 2, query: int = 3, size: int = 32) -> FewShotTask:
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(way * shot, 3, size, size, generator=generator)
    queries = torch.rand(way * query, 3, size, size, generator=generator)
    return FewShotTask(SupportSet(support, torch.arange(way).repeat_interleave(shot), way), queries)


ADAPTING = {"steps": 3, "lr": 1e-2}
FORMS = [
    ("trunk_maps", lambda: small_resnet_protonet(), {"cache_stage": 3, "update": "last_block"}),
    ("pixels", lambda: small_resnet_protonet(), {"update": "last_stage"}),
    ("pixels", lambda: tiny_protonet(), {"update": "all"}),
]


# ------------------------------------------------------------------------------------------- learning


def test_trunk_maps_fine_tuning_beats_protonet_on_real_xsdd_images():
    """The README's claim in small: the default settings on the ImageNet EfficientNet-Lite0, 5-way 1-shot tasks
    of X-SDD's selection pool at 128 px, fp32; the paired gain's 95% interval must lie above 0."""
    from metallo_core.datasets import xsdd_images
    from metallo_core.fewshot.folder_benchmark import (
        LabelledFolder,
        draw_tasks,
        folder_cache,
        pretrained_protonet,
        read_labelled_folder,
        score_task_set,
        split_pools,
    )
    from metallo_core.models.sources import offline_imagenet_backbone

    folder = read_labelled_folder(xsdd_images(), 128)
    assert len(folder.classes) == 7
    selection = split_pools(folder, (0.2, 0.2, 0.6), seed=0)["val"]  # the quickstart's selection pool
    # Only the selection pool's images are prepared (what the tasks draw from): a third of the cost.
    rows = np.concatenate(selection)
    pool = LabelledFolder(folder.images[rows], folder.labels[rows], folder.classes, folder.root)
    pools = [np.flatnonzero(pool.labels == label) for label in range(len(pool.classes))]
    episodes = draw_tasks(pools, 5, 1, 5, 30, seed=11, classes=pool.classes)
    backbone, spec = offline_imagenet_backbone(128)
    engine = FinetuneEngine(pretrained_protonet(backbone), FinetuneSettings(), ImageNormalizer.for_backbone(spec))
    _, scores = score_task_set(engine, folder_cache(pool, engine), episodes, ["pn", "ft"], seed=0)
    gain, ci95 = paired_gain(scores["pn"].accuracies, scores["ft"].accuracies)
    assert gain - ci95 > 0, (gain, ci95, np.mean(scores["pn"].accuracies), np.mean(scores["ft"].accuracies))


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("form,build,changes", FORMS)
@pytest.mark.parametrize("noop", [{"steps": 0, "lr": 1e-2}, {"steps": 3, "lr": 0.0}])
def test_no_steps_or_zero_lr_is_plain_protonet_bit_for_bit(form, build, changes, noop):
    model = build()
    engine = FinetuneEngine(model, FinetuneSettings(pseudo_queries=form, bn_mode="train", **changes, **noop),
                            NORMALIZER)
    cached = toy_task().mapped(engine.prepare)
    logits = engine.task_logits(cached, task_generator(0, 0))
    with torch.no_grad():  # ProtoNet by definition, on the engine's features of the same cache
        expected = model.logits_from_features(engine.embed(cached.support.examples), cached.support.labels,
                                              engine.embed(cached.query), 3)
    assert torch.equal(logits, expected)
    assert torch.equal(logits, engine.mode_logits("protonet", cached, task_generator(0, 0)))
    adapted = FinetuneEngine(model, FinetuneSettings(pseudo_queries=form, bn_mode="train", **changes, **ADAPTING),
                             NORMALIZER)
    assert not torch.equal(adapted.task_logits(cached, task_generator(0, 0)), logits)


@pytest.mark.parametrize("form,build,changes", FORMS)
def test_weights_restored_bit_exactly_after_a_task_and_after_an_exception(form, build, changes):
    model = build()
    model.train()
    before = state_copy(model)
    engine = FinetuneEngine(model, FinetuneSettings(pseudo_queries=form, bn_mode="train", **changes, **ADAPTING),
                            NORMALIZER)
    cached = toy_task().mapped(engine.prepare)
    first = engine.task_logits(cached, task_generator(0, 0))
    assert same_state(model, before)  # weights, BatchNorm statistics and counters
    assert model.training and all(module.training for module in model.modules())
    assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())
    assert torch.equal(engine.task_logits(cached, task_generator(0, 0)), first)

    steps = []

    def fail_on_third_step(step: int, loss: float) -> None:
        steps.append(step)
        if step == 2:
            assert not same_state(model, before)  # it had adapted when it failed
            raise RuntimeError("simulated failure (out of memory, interrupted task)")

    with pytest.raises(RuntimeError, match="simulated failure"), torch.no_grad():
        from metallo_core.fewshot.finetune import restored_afterwards

        with restored_afterwards(model):
            engine.adapt(cached.support, task_generator(0, 0), on_step=fail_on_third_step)
    assert steps == [0, 1, 2] and same_state(model, before)

    def failing_embed(cache):
        raise RuntimeError("simulated failure while scoring the queries")

    engine.embed = failing_embed  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="while scoring"):
        engine.task_logits(cached, task_generator(0, 0))
    assert same_state(model, before)
    assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())


def test_trunk_maps_split_is_exact_and_an_uncut_unflipped_crop_is_the_map_itself():
    model = small_resnet_protonet()
    images = torch.rand(4, 3, 64, 64)
    staged = split_backbone(model.backbone)
    with torch.no_grad():
        full = model.embed(NORMALIZER.normalize(images))
        for cache_stage in range(5):
            maps = staged.trunk(NORMALIZER.normalize(images), cache_stage)
            assert torch.allclose(staged.from_trunk(maps, cache_stage), full, atol=1e-5)
    engine = FinetuneEngine(model, FinetuneSettings(cache_stage=2), NORMALIZER)
    cache = engine.prepare(images)
    assert cache.dtype == torch.float16 and cache.shape[:2] == (4, 128)
    # float16 maps: the features agree to the cache's precision
    torch.testing.assert_close(engine.embed(cache), full, rtol=2e-2, atol=2e-2)
    crops = crop_trunk_maps(cache.float(), 3, crop_scale=1.0, vflip=False, generator=task_generator(0, 0),
                            hflip=False)
    torch.testing.assert_close(crops, cache.float().repeat(3, 1, 1, 1), rtol=0, atol=1e-4)
    torch.testing.assert_close(engine.embed(crops[:4]), engine.embed(cache), rtol=0, atol=1e-4)


def test_trunk_maps_run_inside_a_cpu_bfloat16_autocast_region():
    """What evaluation opens around preparing a split and scoring a task (precision auto on a CPU): the float16
    cache is concatenated and adapted from there, and the logits follow the fp32 ones."""
    model = small_resnet_protonet()
    engine = FinetuneEngine(model, FinetuneSettings(**ADAPTING), NORMALIZER)
    task = toy_task()
    fp32 = engine.protonet_logits(task.mapped(engine.prepare))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = task.mapped(engine.prepare)
        plain = engine.protonet_logits(cached)
        adapted = engine.task_logits(cached, task_generator(0, 0))
    assert cached.support.examples.dtype == torch.float16 and adapted.shape == (9, 3)
    torch.testing.assert_close(plain.float(), fp32, rtol=0.05, atol=0.05)
    assert not torch.equal(adapted, plain)


def test_pseudo_query_maps_are_view_major_copies_of_the_support():
    # Oracle: a crop or flip of a constant map is the same constant, so row v * S + i of the pseudo-queries
    # must hold support image i's constant: the order the loss's `support_labels.repeat(views)` assumes.
    constants = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 8, 6, 6)
    crops = crop_trunk_maps(constants, 3, 0.6, True, task_generator(0, 0))
    assert crops.shape == (12, 8, 6, 6)
    torch.testing.assert_close(crops.mean(dim=(1, 2, 3)), torch.arange(4.0).repeat(3))
    views = crop_trunk_maps(torch.rand(4, 8, 6, 6), 3, 0.6, True, task_generator(0, 0)).view(3, 4, 8, 6, 6)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[1], views[2])


def test_task_generator_is_one_rule_for_every_caller():
    assert torch.equal(torch.rand(3, generator=task_generator(2, 5)), torch.rand(3, generator=task_generator(2, 5)))
    assert not torch.equal(torch.rand(3, generator=task_generator(2, 5)),
                           torch.rand(3, generator=task_generator(2, 6)))
    assert task_generator(0, 0).initial_seed() == 0  # classify: task 0 of seed 0


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad,message", [
    ({"pseudo_queries": "features"}, "finetune.pseudo_queries must be one of pixels, trunk_maps"),
    ({"update": "all"}, "finetune.update 'all'.*finetune.pseudo_queries: pixels"),
    ({"cache_stage": -1}, "finetune.cache_stage must be >= 0"),
    ({"crop_scale": 0.0}, "finetune.crop_scale must be in"),
    ({"crop_scale": 1.5}, "finetune.crop_scale must be in"),
])
def test_invalid_settings_name_the_setting(bad, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneSettings(**bad).validate()


def test_settings_a_model_cannot_run_in_trunk_maps_name_the_setting_and_the_way_out():
    resnet = small_resnet_protonet()
    # layer4 is stage 3: caching 4 stages would cache the block that is to be updated
    with pytest.raises(ConfigError, match="finetune.update 'last_block' reaches into the cached trunk.*"
                                          "finetune.pseudo_queries: pixels"):
        FinetuneEngine(resnet, FinetuneSettings(cache_stage=4), NORMALIZER)
    with pytest.raises(ConfigError, match="finetune.cache_stage 5 is past this backbone's 4 stages"):
        FinetuneEngine(resnet, FinetuneSettings(cache_stage=5, update="batchnorm"), NORMALIZER)
    vit = ProtoNet(torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                        hidden_dim=8, mlp_dim=8))
    with pytest.raises(ConfigError, match="finetune.pseudo_queries 'trunk_maps'.*VisionTransformer.*"
                                          "use finetune.pseudo_queries: pixels"):
        FinetuneEngine(vit, FinetuneSettings(update="last_stage"), NORMALIZER)
    FinetuneEngine(vit, FinetuneSettings(pseudo_queries="pixels", update="last_stage"), NORMALIZER)


# ------------------------------------------------------------------------------------------- recorded settings


def test_defaults_are_the_ones_chosen_on_xsdd_selection_tasks():
    settings = FinetuneSettings()
    assert (settings.pseudo_queries, settings.cache_stage, settings.update, settings.steps, settings.lr,
            settings.bn_mode, settings.pseudo_queries_per_class, settings.crop_scale, settings.vflip) == (
        "trunk_maps", 3, "last_block", 10, 3e-3, "eval", 8, 0.6, True)


def test_settings_recorded_before_trunk_maps_existed_load_as_pixels(monkeypatch):
    from metallo_core.tracking import finetune_choice

    # A version tag exactly as evaluations and searches wrote it before this change: no pseudo_queries key.
    old = {"steps": 10, "lr": 0.003, "lr_candidates": [0.0, 0.0001, 0.0005, 0.001], "augmentations": ["crop", "flip"],
           "augment_p": 0.9, "pseudo_queries_per_class": 1, "bn_mode": "train", "update": "all", "autolr_steps": 20}

    class Version:
        name, version = "metallo-protonet", "3"
        tags = {finetune_choice.SETTINGS_TAG: json.dumps(old), finetune_choice.CHOSEN_BY_TAG: "evaluation 'old'"}

    monkeypatch.setattr("metallo_core.tracking.registry.parse_model_uri", lambda uri: True)
    monkeypatch.setattr("metallo_core.tracking.registry.resolve_version", lambda uri: Version)
    chosen = finetune_choice.recorded_for_model("models:/metallo-protonet/3")
    assert chosen.settings.pseudo_queries == "pixels" and chosen.settings.update == "all"
    assert chosen.settings.steps == 10 and chosen.settings.pseudo_queries_per_class == 1
    assert "pseudo_queries pixels" in chosen.describe()
    # Read as plain config, the same record would fine-tune the whole backbone on trunk maps: refused.
    with pytest.raises(ConfigError, match="finetune.update 'all'"):
        from_dict(FinetuneSettings, old)
    # A record made now names its form and keeps it.
    new = {**old, "pseudo_queries": "trunk_maps", "update": "last_block"}
    Version.tags = {finetune_choice.SETTINGS_TAG: json.dumps(new)}
    assert finetune_choice.recorded_for_model("models:/m/3").settings.pseudo_queries == "trunk_maps"
