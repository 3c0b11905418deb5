"""Backbones in the MLflow model registry: logged with their spec and weights, found by alias or version.

Each logged backbone is an MLflow pytorch model in the safe `pt2` (torch.export) format, for serving
and for classifying new images, plus two extra files that let any stage rebuild the trainable
`nn.Module`: `backbone_spec.json` (library, architecture, stem, input size, normalisation, feature width,
weights origin) and
`backbone_weights.pt` (a state dict, loaded with `weights_only=True`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metallo_core.errors import TrackingError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.models.sources import backbone_from_source

# Re-exported: stages look registered backbones up here (the registry mechanics live in tracking.registry).
from metallo_core.tracking.registry import (
    RegisteredModel,
    download_model,
    find_versions,
    log_torch_model,
    resolve_version,
)

SPEC_FILE = "backbone_spec.json"
WEIGHTS_FILE = "backbone_weights.pt"
METADATA_FILE = "metallo_model.json"  # what kind of model this is and its non-backbone parameters

__all__ = ["METADATA_FILE", "SPEC_FILE", "WEIGHTS_FILE", "backbone_from_any_source", "download_model",
           "find_versions", "load_backbone", "load_backbone_and_metadata", "log_backbone", "resolve_version"]


def _pip_requirements(spec: BackboneSpec | None = None) -> list[str]:
    packages = ("torch", "torchvision", "numpy") + (("timm",) if spec is not None and spec.library == "timm" else ())
    return [f"{package}=={package_metadata.version(package)}" for package in packages]


def log_backbone(
    run_id: str,
    backbone: nn.Module,
    spec: BackboneSpec,
    *,
    registered_name: str | None,
    tags: Mapping[str, Any],
    alias: str = "",
    artifact_name: str = "backbone",
    metadata: Mapping[str, Any] | None = None,
) -> RegisteredModel | None:
    """Log `backbone` to run `run_id` with its spec, weights and `metadata` files and, if `registered_name`,
    register it with `tags` and `alias`; the registered version (pinned models:/name/N URI) or None."""
    backbone = backbone.float().cpu().eval()
    with tempfile.TemporaryDirectory() as directory:
        spec_path, weights_path = Path(directory) / SPEC_FILE, Path(directory) / WEIGHTS_FILE
        metadata_path = Path(directory) / METADATA_FILE
        spec_path.write_text(spec.to_json())
        metadata_path.write_text(json.dumps({"kind": "backbone", **(metadata or {})}, indent=2))
        torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, weights_path)
        example = np.zeros((2, 3, spec.image_size, spec.image_size), dtype=np.float32)
        _, registered = log_torch_model(run_id, backbone, name=artifact_name, input_example=example,
                                        extra_files=[spec_path, weights_path, metadata_path],
                                        pip_requirements=_pip_requirements(spec), registered_name=registered_name,
                                        tags=tags, alias=alias)
    return registered


def load_backbone(model_uri: str) -> tuple[nn.Module, BackboneSpec]:
    """Rebuild the trainable backbone of a logged model (state dict loaded with weights_only=True)."""
    backbone, spec, _ = load_backbone_and_metadata(model_uri)
    return backbone, spec


def load_backbone_and_metadata(model_uri: str) -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    """The backbone plus the model's metadata (e.g. a ProtoNet's distance and cosine scale)."""
    directory = download_model(model_uri)
    spec_files = list(directory.rglob(SPEC_FILE))
    weight_files = list(directory.rglob(WEIGHTS_FILE))
    if not spec_files or not weight_files:
        raise TrackingError(f"model {model_uri} holds no {SPEC_FILE}/{WEIGHTS_FILE}: it was not logged by metallo")
    spec = BackboneSpec.from_json(spec_files[0].read_text())
    backbone = build_backbone(spec)
    try:
        state = torch.load(weight_files[0], map_location="cpu", weights_only=True)
        backbone.load_state_dict(state)
    except Exception as exc:
        raise TrackingError(f"weights of model {model_uri} cannot be loaded: {exc}") from exc
    metadata_files = list(directory.rglob(METADATA_FILE))
    metadata = json.loads(metadata_files[0].read_text()) if metadata_files else {"kind": "backbone"}
    return backbone, spec, metadata


def backbone_from_any_source(source: str, spec: BackboneSpec) -> tuple[nn.Module, BackboneSpec]:
    """`models.sources.backbone_from_source` with registry sources (`models:/...`, `runs:/...`) loaded from
    this registry: what every stage that reads a user's `backbone.source` calls. Raises ConfigError naming
    the source, TrackingError for registry look-ups."""
    return backbone_from_source(source, spec, load_registered=load_backbone)
