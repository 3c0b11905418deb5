"""Tiny few-shot data and a registered, untrained ProtoNet: what the few-shot and tuning tests start from."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

from metallo_core import tracking
from metallo_core.data.synth_dataset import write_fewshot
from metallo_core.fewshot.protonet import ProtoNet
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.tracking.backbone_store import log_backbone
from metallo_core.tracking.protonet_store import protonet_metadata

TINY_SPEC = {"arch": "resnet18", "small_input": True, "image_size": 20}


def write_tiny_fewshot(root: Path) -> str:
    """15 synthetic classes of 24 images at 20 px: 5 train / 5 val / 5 test classes."""
    uri = root / "ds"
    write_fewshot(str(uri), num_classes=15, images_per_class=24, size=20)
    return str(uri)


def register_untrained_protonet(spec: BackboneSpec, alias: str = "current", seed: int = 0) -> str:
    """A randomly initialised ProtoNet registered as metallo-protonet@<alias> (in the test's own store)."""
    torch.manual_seed(seed)
    model = ProtoNet(build_backbone(spec))
    tracking.configure()
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("test-models"))
    with mlflow.start_run() as run:
        pass
    log_backbone(run.info.run_id, model.backbone, spec, registered_name="metallo-protonet", tags={},
                 alias=alias, artifact_name="protonet", metadata=protonet_metadata(model))
    return f"models:/metallo-protonet@{alias}"
