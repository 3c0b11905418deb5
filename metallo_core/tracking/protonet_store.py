"""ProtoNets and the model registry: the backbone source meta-training starts from (an alias pinned to its
version), the metadata a registered ProtoNet carries (distance, cosine head), and loading one back.

Kept out of `fewshot/` (the maths, free of MLflow): everything here may talk to the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metallo_core.fewshot.protonet import ProtoNet
from metallo_core.models.backbone_choice import BackboneChoice
from metallo_core.models.backbones import BackboneSpec
from metallo_core.models.sources import absolute_file_source
from metallo_core.tracking.backbone_store import backbone_from_any_source, load_backbone_and_metadata
from metallo_core.tracking.registry import pin_model_uri

PROTONET_KIND = "protonet"


def pin_backbone_source(init: BackboneChoice) -> str:
    """The exact source meta-training starts from: an alias is resolved to its version now, so the run's
    lineage names what it actually used even if the alias moves later; a file path becomes absolute."""
    if init.kind == "file":
        return absolute_file_source(init.source)
    if init.kind != "registry":
        return init.source
    return pin_model_uri(init.source)


def check_backbone_source(init: BackboneChoice, pinned_source: str) -> BackboneSpec:
    """Fail before any cluster time is spent: build the starting backbone once on the driver (a weights file
    that does not fit is a ConfigError naming the file and its missing/unexpected keys); its spec."""
    _, spec = initial_backbone(init, pinned_source)
    return spec


def initial_backbone(init: BackboneChoice, pinned_source: str) -> tuple[nn.Module, BackboneSpec]:
    """The starting backbone of meta-training (in train mode) and the spec it really has."""
    backbone, spec = backbone_from_any_source(pinned_source, init.spec)
    return backbone.train(), spec


def protonet_metadata(model: ProtoNet, **extra: Any) -> dict[str, Any]:
    head = {name: float(value.detach()) for name, value in model.classifier.named_parameters()}
    return {"kind": PROTONET_KIND, "distance": model.distance, "classifier": head, **extra}


def load_protonet(model_uri: str) -> tuple[ProtoNet, BackboneSpec, dict[str, Any]]:
    """A ProtoNet from any registry/run model URI; a plain backbone gets the default cosine head."""
    backbone, spec, metadata = load_backbone_and_metadata(model_uri)
    model = ProtoNet(backbone, distance=metadata.get("distance", "cosine"))
    with torch.no_grad():
        # Metadata is {"scale": s} now; models registered before the cosine head lost its (inert,
        # constant-shift) bias also hold "bias", which is ignored: see protonet.CosineClassifier.
        for name, parameter in model.classifier.named_parameters():
            if name in metadata.get("classifier", {}):
                parameter.fill_(metadata["classifier"][name])
    return model, spec, metadata
