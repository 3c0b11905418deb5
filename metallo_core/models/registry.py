"""Backbones in the MLflow model registry: logged with their spec and weights, found by alias or version.

Each logged backbone is an MLflow pytorch model in the safe `pt2` (torch.export) format, for serving
and for classifying new images, plus two extra files that let any stage rebuild the trainable
`nn.Module`: `backbone_spec.json` (library, architecture, stem, input size, normalisation, feature width,
weights origin) and
`backbone_weights.pt` (a state dict, loaded with `weights_only=True`).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from metallo_core import tracking
from metallo_core.errors import TrackingError
from metallo_core.models.backbones import BackboneSpec, build_backbone

SPEC_FILE = "backbone_spec.json"
WEIGHTS_FILE = "backbone_weights.pt"
METADATA_FILE = "metallo_model.json"  # what kind of model this is and its non-backbone parameters
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass
class RegisteredBackbone:
    name: str
    version: str
    uri: str  # models:/name/version
    model_id: str | None = None


def _pip_requirements(spec: BackboneSpec | None = None) -> list[str]:
    # Listing them avoids MLflow's requirement inference, which loads the model in a subprocess.
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
) -> RegisteredBackbone | None:
    """Log `backbone` to run `run_id` and, if `registered_name`, register it with `tags` and `alias`."""
    import mlflow

    tracking.configure()
    backbone = backbone.float().cpu().eval()
    with tempfile.TemporaryDirectory() as directory:
        spec_path, weights_path = Path(directory) / SPEC_FILE, Path(directory) / WEIGHTS_FILE
        metadata_path = Path(directory) / METADATA_FILE
        spec_path.write_text(spec.to_json())
        metadata_path.write_text(json.dumps({"kind": "backbone", **(metadata or {})}, indent=2))
        torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, weights_path)
        example = np.zeros((2, 3, spec.image_size, spec.image_size), dtype=np.float32)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(
                backbone,
                name=artifact_name,
                input_example=example,
                serialization_format="pt2",
                extra_files=[str(spec_path), str(weights_path), str(metadata_path)],
                pip_requirements=_pip_requirements(spec),
            )
    if not registered_name:
        return None
    string_tags = {key: str(value) for key, value in tags.items()}
    version = mlflow.register_model(info.model_uri, registered_name, tags=string_tags)
    client = tracking.client()
    if alias:
        client.set_registered_model_alias(registered_name, alias, version.version)
    return RegisteredBackbone(registered_name, str(version.version), f"models:/{registered_name}/{version.version}",
                              info.model_id)


def resolve_version(model_uri: str):
    """The registry entry behind `models:/name@alias` or `models:/name/version`, with clear errors."""
    match = MODEL_URI.match(model_uri)
    if not match:
        raise TrackingError(f"{model_uri!r} is not a registry URI; use models:/<name>@<alias> or models:/<name>/<version>")
    client = tracking.lookup_client()  # a look-up never creates a store
    name = match["name"]
    try:
        registered = client.get_registered_model(name)
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException subclasses and HTTP errors
        raise TrackingError(f"no registered model {name!r} in the registry at {tracking.describe_store()}; if it "
                            f"was registered elsewhere, {tracking.how_to_point_at_a_store()} ({exc})") from exc
    if match["alias"]:
        aliases = dict(registered.aliases or {})
        if match["alias"] not in aliases:
            known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise TrackingError(f"model {name!r} has no alias {match['alias']!r}; its aliases: {known}")
        return client.get_model_version(name, aliases[match["alias"]])
    try:
        return client.get_model_version(name, match["version"])
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"model {name!r} has no version {match['version']} ({exc})") from exc


def download_model(model_uri: str) -> Path:
    """Download the model's files; works for models:/, runs:/ and m-... URIs."""
    import mlflow

    tracking.configure(create=False)  # a look-up never creates a store
    if model_uri.startswith("models:/") and MODEL_URI.match(model_uri):
        resolve_version(model_uri)  # a clear error for a wrong name, alias or version
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"cannot download model {model_uri} from {tracking.describe_store()}: {exc}") from exc


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
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"weights of model {model_uri} cannot be loaded: {exc}") from exc
    metadata_files = list(directory.rglob(METADATA_FILE))
    metadata = json.loads(metadata_files[0].read_text()) if metadata_files else {"kind": "backbone"}
    return backbone, spec, metadata


def find_versions(name: str, tags: Mapping[str, str]) -> list:
    """Registered versions of `name` carrying all of `tags` (used to keep registration idempotent)."""
    client = tracking.client()
    clauses = [f"name='{name}'"] + [f"tag.`{key}`='{value}'" for key, value in tags.items()]
    try:
        return list(client.search_model_versions(" and ".join(clauses)))
    except Exception:  # noqa: BLE001 - the model may not exist yet
        return []
