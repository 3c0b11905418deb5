"""The trained multi-label model in MLflow: logged, registered with lineage tags, and loaded back by any model URI.

The logged model is an MLflow pytorch model in the safe `pt2` format (images in [0, 1] -> probabilities
and values, for serving), plus three files from which `predict` rebuilds the network without pickle:
`multilabel_spec.json` (properties, class names, head shape, encoder description, input size),
`encoder_weights.pt` and `head_weights.pt` (state dicts, loaded with `weights_only=True`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metallo_core.errors import TrackingError
from metallo_core.models.backbones import BackboneSpec, build_backbone
from metallo_core.multilabel.baseline_cnn import SmallCNN
from metallo_core.multilabel.model import (
    ExportedMultilabelNet,
    ImageEncoder,
    MultilabelNet,
    NFurcatedHead,
)
from metallo_core.multilabel.properties import PropertyInfo
from metallo_core.tracking.registry import (
    RegisteredModel,
    download_model,
    log_torch_model,
)
from metallo_core.versioned_json import load_versioned_json

SPEC_FILE = "multilabel_spec.json"
ENCODER_WEIGHTS_FILE = "encoder_weights.pt"
HEAD_WEIGHTS_FILE = "head_weights.pt"
ARTIFACT_NAME = "multilabel_model"
FORMAT_VERSION = 1


@dataclass
class MultilabelModelSpec:
    properties: list[dict]
    in_dim: int
    fc_width: int
    activation: str
    dropout: float
    encoder: str  # backbone (written as "resnet" before other architectures existed) | small_cnn
    image_size: int  # predict resizes every image to image_size x image_size
    mean: list[float]  # the normalisation the encoder applies to images in [0, 1]
    std: list[float]
    # backbone: its BackboneSpec (library, arch, weights source, normalisation) at `image_size`
    backbone_spec: dict | None = None
    cnn: dict | None = None  # small_cnn: channels, pooled_size
    pooled_stages: list[str] = field(default_factory=list)  # backbone stages averaged into the features
    final_features: bool = True  # the backbone's own pooled features follow those averages
    feature_layers: str = ""  # their name (final, early2, ...; feature_layers.py); "" for the small CNN
    lineage: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def property_infos(self) -> list[PropertyInfo]:
        return [PropertyInfo.from_dict(item) for item in self.properties]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> MultilabelModelSpec:
        return cls(**load_versioned_json(text, where, key="format_version", version=FORMAT_VERSION,
                                         error=TrackingError, remedy="retrain the model with this version"))


def build_network(spec: MultilabelModelSpec) -> tuple[MultilabelNet, list[PropertyInfo]]:
    """An untrained image -> outputs network of the shape `spec` describes."""
    properties = spec.property_infos
    if spec.encoder == "small_cnn":
        backbone = SmallCNN(list(spec.cnn["channels"]), int(spec.cnn["pooled_size"]))
    else:
        backbone = build_backbone(BackboneSpec.from_json(json.dumps(spec.backbone_spec)))
    encoder = ImageEncoder(backbone, tuple(spec.mean), tuple(spec.std), tuple(spec.pooled_stages), spec.final_features)
    head = NFurcatedHead(spec.in_dim, spec.fc_width, properties, activation=spec.activation, dropout=spec.dropout)
    return MultilabelNet(encoder, head), properties


def save_model_files(directory: str | Path, spec: MultilabelModelSpec, network: MultilabelNet) -> list[Path]:
    directory = Path(directory)
    paths = [directory / SPEC_FILE, directory / ENCODER_WEIGHTS_FILE, directory / HEAD_WEIGHTS_FILE]
    paths[0].write_text(spec.to_json())
    torch.save(_cpu_state(network.encoder.backbone), paths[1])
    torch.save(_cpu_state(network.head), paths[2])
    return paths


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def _pip_requirements() -> list[str]:
    from importlib import metadata

    return [f"{package}=={metadata.version(package)}" for package in ("torch", "torchvision", "numpy")]


def log_multilabel_model(
    run_id: str,
    network: MultilabelNet,
    spec: MultilabelModelSpec,
    *,
    registered_name: str | None,
    tags: Mapping[str, Any],
    alias: str = "",
) -> tuple[str, RegisteredModel | None]:
    """Log the model to run `run_id` (no active run needed) and register it; returns (model_uri, registered)."""
    network = network.float().cpu().eval()
    with tempfile.TemporaryDirectory() as directory:
        files = save_model_files(directory, spec, network)
        example = np.random.default_rng(0).random((2, 3, spec.image_size, spec.image_size), dtype=np.float32)
        return log_torch_model(run_id, ExportedMultilabelNet(network, spec.property_infos).eval(), name=ARTIFACT_NAME,
                               input_example=example, extra_files=files, pip_requirements=_pip_requirements(),
                               registered_name=registered_name, tags=tags, alias=alias)


@dataclass
class LoadedMultilabelModel:
    network: MultilabelNet
    properties: list[PropertyInfo]
    spec: MultilabelModelSpec
    uri: str


def load_multilabel_model(model_uri: str) -> LoadedMultilabelModel:
    """Rebuild a logged multi-label model from models:/name@alias, models:/name/N, runs:/... or m-... URIs."""
    directory = download_model(model_uri)
    return load_model_directory(directory, model_uri)


def load_model_directory(directory: str | Path, where: str) -> LoadedMultilabelModel:
    directory = Path(directory)
    found = {name: sorted(directory.rglob(name)) for name in (SPEC_FILE, ENCODER_WEIGHTS_FILE, HEAD_WEIGHTS_FILE)}
    missing = [name for name, paths in found.items() if not paths]
    if missing:
        raise TrackingError(f"model {where} holds no {', '.join(missing)}: it is not a metallo multi-label model "
                            "(train one with `metallo multilabel train`)")
    spec = MultilabelModelSpec.from_json(found[SPEC_FILE][0].read_text(), f"{where}/{SPEC_FILE}")
    network, properties = build_network(spec)
    try:
        network.encoder.backbone.load_state_dict(
            torch.load(found[ENCODER_WEIGHTS_FILE][0], map_location="cpu", weights_only=True))
        network.head.load_state_dict(torch.load(found[HEAD_WEIGHTS_FILE][0], map_location="cpu", weights_only=True))
    except Exception as exc:
        raise TrackingError(f"weights of model {where} cannot be loaded: {exc}") from exc
    return LoadedMultilabelModel(network.eval(), properties, spec, where)
