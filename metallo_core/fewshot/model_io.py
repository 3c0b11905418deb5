"""Building ProtoNets from where their backbones come from: scratch, torchvision weights, or the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metallo_core.fewshot.config import BackboneInit
from metallo_core.fewshot.protonet import ProtoNet
from metallo_core.models.backbones import BackboneSpec, build_backbone, load_torchvision_weights
from metallo_core.models.registry import load_backbone_and_metadata, resolve_version

PROTONET_KIND = "protonet"


def pin_backbone_source(init: BackboneInit) -> str:
    """The exact source meta-training starts from: an alias is resolved to its version now, so the run's
    lineage names what it actually used even if the alias moves later."""
    if init.kind != "registry" or not init.source.startswith("models:/") or "@" not in init.source:
        return init.source
    version = resolve_version(init.source)
    return f"models:/{version.name}/{version.version}"


def initial_backbone(init: BackboneInit, pinned_source: str) -> tuple[nn.Module, BackboneSpec]:
    if init.kind == "scratch":
        return build_backbone(init.spec), init.spec
    if init.kind == "torchvision":
        backbone = build_backbone(init.spec)
        load_torchvision_weights(backbone, init.source, init.spec)
        return backbone, init.spec
    backbone, spec, _ = load_backbone_and_metadata(pinned_source)
    return backbone, spec


def protonet_metadata(model: ProtoNet, **extra: Any) -> dict[str, Any]:
    head = {name: float(value.detach()) for name, value in model.classifier.named_parameters()}
    return {"kind": PROTONET_KIND, "distance": model.distance, "classifier": head, **extra}


def load_protonet(model_uri: str) -> tuple[ProtoNet, BackboneSpec, dict[str, Any]]:
    """A ProtoNet from any registry/run model URI; a plain backbone gets the default cosine head."""
    backbone, spec, metadata = load_backbone_and_metadata(model_uri)
    model = ProtoNet(backbone, distance=metadata.get("distance", "cosine"))
    with torch.no_grad():
        for name, parameter in model.classifier.named_parameters():
            if name in metadata.get("classifier", {}):
                parameter.fill_(metadata["classifier"][name])
    return model, spec, metadata
