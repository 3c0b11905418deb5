"""A backbone's spec travels with it (MLflow registry round trip), and every stage starts from any source:
DINO's student and teacher from the same pretrained weights, meta-training from a checked file."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from metallo_core import tracking
from metallo_core.config import from_dict
from metallo_core.errors import ConfigError, MetalloError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.ssl.config import DinoConfig
from metallo_core.ssl.trainer import DinoTrainer
from metallo_core.tracking.backbone_store import (
    SPEC_FILE,
    download_model,
    load_backbone,
    log_backbone,
)
from metallo_core.train.dino import check_start_weights
from tests.fewshot_fixtures import write_tiny_fewshot

LITE = {"arch": "tf_efficientnet_lite0", "library": "timm", "image_size": 32, "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5]}
DINO_TINY = {
    "data": {"uri": "unused", "base_size": 36},
    "backbone": LITE,
    "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "multicrop": {"global_size": 32, "local_size": 16, "local_crops": 2, "micrograph": True,
                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "optim": {"batch_size_per_worker": 4, "warmup_epochs": 0, "lr": 1e-4, "freeze_last_layer_epochs": 1},
    "epochs": 2,
}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state = b.state_dict()
    return all(torch.equal(value, state[key]) for key, value in a.state_dict().items())


def test_spec_with_library_and_origin_round_trips_through_the_registry():
    spec = BackboneSpec(arch="test_efficientnet", library="timm", image_size=32, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), weights="file:/w/effnet.pth#sha256=0123456789abcdef")
    torch.manual_seed(0)
    backbone = build_backbone(spec).eval()
    tracking.configure()
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("test-backbones"))
    with mlflow.start_run() as run:
        pass
    log_backbone(run.info.run_id, backbone, spec, registered_name="metallo-backbone", tags={}, alias="timm")
    loaded, loaded_spec = load_backbone("models:/metallo-backbone@timm")
    assert loaded_spec == spec
    assert same_weights(backbone, loaded)
    written = json.loads(next(download_model("models:/metallo-backbone@timm").rglob(SPEC_FILE)).read_text())
    assert written["feature_dim"] == 256 and written["library"] == "timm"


def test_spec_files_written_before_library_and_weights_existed_still_load():
    old = '{"arch": "resnet18", "small_input": true, "image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}'
    spec = BackboneSpec.from_json(old)
    assert (spec.library, spec.weights, spec.feature_dim, spec.small_input) == ("torchvision", "", 512, True)


def with_source(config: dict, source: str) -> dict:
    """`config` with backbone.source set (student and teacher start from it)."""
    return {**config, "backbone": {**config["backbone"], "source": source}}


def test_dino_starts_student_and_teacher_from_the_same_pretrained_weights(tmp_path):
    torch.manual_seed(5)
    pretrained = build_backbone(from_dict(BackboneSpec, LITE))
    path = tmp_path / "lite0.pth"
    torch.save(pretrained.state_dict(), path)
    config = from_dict(DinoConfig, with_source(DINO_TINY, f"file:{path}"))
    check_start_weights(config)  # what the driver does before asking Ray for workers
    trainer = DinoTrainer(config, steps_per_epoch=2, world_size=1, rank=0, device=torch.device("cpu"))
    assert same_weights(pretrained, trainer.student_module.backbone)
    assert same_weights(pretrained, trainer.teacher.backbone)


def test_dino_from_the_offline_imagenet_weights_needs_the_matching_backbone_spec():
    config = from_dict(DinoConfig, with_source(DINO_TINY, "imagenet-offline"))
    trainer = DinoTrainer(config, steps_per_epoch=2, world_size=1, rank=0, device=torch.device("cpu"))
    from metallo_core.models.sources import offline_imagenet_backbone

    offline, _ = offline_imagenet_backbone()
    assert same_weights(offline, trainer.teacher.backbone) and same_weights(offline, trainer.student_module.backbone)
    with pytest.raises(ConfigError, match="set backbone.library, backbone.arch, backbone.mean, backbone.std"):
        from_dict(DinoConfig, {**DINO_TINY, "backbone": {"source": "imagenet-offline", "arch": "resnet18",
                                                         "image_size": 32},
                               "multicrop": {**DINO_TINY["multicrop"], "mean": [0.485, 0.456, 0.406],
                                             "std": [0.229, 0.224, 0.225]}})


def test_dino_with_weights_of_another_network_fails_on_the_driver(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(build_backbone(BackboneSpec(arch="resnet18")).state_dict(), path)
    config = from_dict(DinoConfig, with_source(DINO_TINY, str(path)))
    with pytest.raises(ConfigError, match=r"resnet18\.pth does not fit a tf_efficientnet_lite0 \(timm\)"):
        check_start_weights(config)
    with pytest.raises(ConfigError, match="multicrop.mean/std .* must equal backbone.mean/std"):
        from_dict(DinoConfig, {**DINO_TINY, "multicrop": {**DINO_TINY["multicrop"], "mean": [0.4, 0.4, 0.4]}})


def test_metatraining_from_a_mismatched_file_fails_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from metallo_core.train import metatrain

    def must_not_be_reached(*args, **kwargs):
        raise AssertionError("metatraining went past the weights check")

    # Another test may have started this session's Ray already, so "before Ray starts" is checked as:
    # no MLflow run is opened, no trainer is built, and Ray's state is what it was.
    monkeypatch.setattr(metatrain.tracking, "open_run", must_not_be_reached)
    monkeypatch.setattr(metatrain.skeleton, "fit_on_ray", must_not_be_reached)
    ray_was_running = ray.is_initialized()

    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(build_backbone(BackboneSpec(arch="resnet34")).state_dict(), path)
    config = from_dict(MetaTrainConfig, {
        "data": {"uri": write_tiny_fewshot(tmp_path)},
        "backbone": {"source": str(path), "arch": "resnet18", "small_input": True, "image_size": 20},
        "episodes": {"way": 3, "shot": 1, "query": 2}, "val_episodes": 2, "episodes_per_epoch": 2, "epochs": 1,
        "run": {"storage": str(tmp_path / "runs")},
    })
    with pytest.raises(MetalloError, match=r"dino_resnet50_pretrain\.pth does not fit a resnet18.*unexpected keys"):
        metatrain.run_metatraining(config)
    assert ray.is_initialized() == ray_was_running


def test_shipped_configs_that_start_from_pretrained_weights_validate():
    from pathlib import Path

    from metallo_core.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    dino = load_config(DinoConfig, root / "pretrain" / "domain_adapt_efficientnet_lite0.yaml")
    assert dino.backbone.source == "imagenet-offline" and dino.backbone.image_size == 224
    assert dino.optim.lr < DinoConfig().optim.lr  # gentler than DINO from scratch
    metatrain = load_config(MetaTrainConfig, root / "metatrain" / "pretrained_efficientnet_lite0.yaml")
    assert metatrain.backbone.kind == "offline" and metatrain.data.image_size == 0
