"""The MLflow model registry: model URIs read in one place, an alias pinned to the version it points at or
pointed at a new one, torch models logged (safe `pt2` format, no active run needed) and registered with
tags and an alias, and a model's files downloaded for rebuilding. What a model holds is for its owner
(tracking.backbone_store for backbones, tracking.protonet_store for ProtoNets, tracking.multilabel_store for multi-label
networks)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metallo_core.errors import TrackingError
from metallo_core.tracking.store import (
    client,
    configure,
    describe_store,
    how_to_point_at_a_store,
    lookup_client,
)

# models:/<name>@<alias> or models:/<name>/<version>; runs:/..., models:/m-... and m-... name no registry entry.
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """A registry URI taken apart: the name and either an alias or a version number (as text)."""

    name: str
    alias: str | None
    version: str | None


@dataclass
class RegisteredModel:
    """A registered model version: `uri` is the pinned models:/name/version, `model_id` MLflow's m-... id."""

    name: str
    version: str
    uri: str
    model_id: str | None = None


def parse_model_uri(model_uri: str) -> ModelRef | None:
    """`models:/name@alias` or `models:/name/N` taken apart; None for any other URI (runs:/, m-..., paths)."""
    match = MODEL_URI.match(model_uri)
    if not match:
        return None
    return ModelRef(match["name"], match["alias"], match["version"])


def version_uri(name: str, version: str | int) -> str:
    """The pinned URI of one registered version: models:/name/version."""
    return f"models:/{name}/{version}"


def resolve_version(model_uri: str):
    """The registry entry (an MLflow ModelVersion) behind `models:/name@alias` or `models:/name/version`.

    Raises TrackingError naming the store for a URI of another form, an unknown model, alias or version.
    A look-up: never creates a store."""
    ref = parse_model_uri(model_uri)
    if ref is None:
        raise TrackingError(f"{model_uri!r} is not a registry URI; "
                            "use models:/<name>@<alias> or models:/<name>/<version>")
    mlflow_client = lookup_client()
    try:
        registered = mlflow_client.get_registered_model(ref.name)
    except Exception as exc:
        raise TrackingError(f"no registered model {ref.name!r} in the registry at {describe_store()}; if it "
                            f"was registered elsewhere, {how_to_point_at_a_store()} ({exc})") from exc
    if ref.alias:
        # get_registered_model(...).aliases, not search_model_versions (whose aliases are empty, mlflow#9783)
        aliases = dict(registered.aliases or {})
        if ref.alias not in aliases:
            known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise TrackingError(f"model {ref.name!r} has no alias {ref.alias!r}; its aliases: {known}")
        return mlflow_client.get_model_version(ref.name, aliases[ref.alias])
    try:
        return mlflow_client.get_model_version(ref.name, ref.version)
    except Exception as exc:
        raise TrackingError(f"model {ref.name!r} has no version {ref.version} ({exc})") from exc


def pin_model_uri(model_uri: str) -> str:
    """`models:/name@alias` -> `models:/name/N`, the version the alias points at now, so that every later
    step (workers, trials, lineage tags) uses that version even if the alias moves. Other URIs are returned
    as they are. Raises TrackingError for an unknown model or alias."""
    ref = parse_model_uri(model_uri)
    if ref is None or ref.alias is None:
        return model_uri
    version = resolve_version(model_uri)
    return version_uri(version.name, version.version)


def log_torch_model(
    run_id: str,
    module,
    *,
    name: str,
    input_example,
    extra_files: Sequence[str | Path] = (),
    pip_requirements: Sequence[str] = (),
    registered_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str = "",
) -> tuple[str, RegisteredModel | None]:
    """Log `module` (an eval-mode float CPU nn.Module) as an MLflow pytorch model of run `run_id`, in the
    `pt2` (torch.export) format, with `extra_files` beside it; with `registered_name`, register it with
    `tags` (as strings) and point `alias` at the new version. Needs no active run.

    `input_example` is a numpy array whose batch dimension is more than 1 (it fixes the signature and
    keeps the batch dimension dynamic in the export). Returns (the logged model's URI, the registered
    version or None)."""
    import mlflow

    configure()
    string_tags = {key: str(value) for key, value in (tags or {}).items()}
    info = mlflow.pytorch.log_model(
        module,
        name=name,
        run_id=run_id,
        tags=string_tags,
        input_example=input_example,
        serialization_format="pt2",
        extra_files=[str(path) for path in extra_files],
        # Listed so MLflow does not infer them (inference loads the model in a subprocess).
        pip_requirements=list(pip_requirements),
    )
    if not registered_name:
        return info.model_uri, None
    version = mlflow.register_model(info.model_uri, registered_name, tags=string_tags)
    if alias:
        point_alias(version_uri(registered_name, version.version), alias)
    registered = RegisteredModel(registered_name, str(version.version), version_uri(registered_name, version.version),
                                 info.model_id)
    return info.model_uri, registered


def alias_version(name: str, alias: str) -> str | None:
    """The version number `name@alias` points at now, or None when there is no such model or alias yet."""
    try:
        registered = client().get_registered_model(name)
    except Exception:  # noqa: BLE001 - the model may not exist yet
        return None
    version = dict(registered.aliases or {}).get(alias)  # not search_model_versions (mlflow#9783)
    return None if version is None else str(version)


def point_alias(model_uri: str, alias: str) -> None:
    """Point `alias` of the registered model at the version `model_uri` (models:/name/N) names."""
    ref = parse_model_uri(model_uri)
    if ref is None or ref.version is None:
        raise TrackingError(f"an alias points at a registered version (models:/<name>/<version>), not {model_uri!r}")
    client().set_registered_model_alias(ref.name, alias, ref.version)


def tag_version(model_uri: str, tags: Mapping[str, Any]) -> None:
    """Set `tags` (as strings) on the registered version `model_uri` (models:/name/N) names."""
    ref = parse_model_uri(model_uri)
    if ref is None or ref.version is None:
        raise TrackingError(f"tags go on a registered version (models:/<name>/<version>), not {model_uri!r}")
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(ref.name, ref.version, key, str(value))


def find_versions(name: str, tags: Mapping[str, str]) -> list:
    """Registered versions of `name` carrying all of `tags` (used to keep registration idempotent)."""
    mlflow_client = client()
    clauses = [f"name='{name}'"] + [f"tag.`{key}`='{value}'" for key, value in tags.items()]
    try:
        return list(mlflow_client.search_model_versions(" and ".join(clauses)))
    except Exception:  # noqa: BLE001 - the model may not exist yet
        return []


def download_model(model_uri: str) -> Path:
    """Download a logged model's files (models:/, runs:/ and m-... URIs) into a temporary folder; its path.
    A wrong registry name, alias or version is a TrackingError naming it. A look-up: never creates a store."""
    import mlflow

    configure(create=False)
    if parse_model_uri(model_uri):
        resolve_version(model_uri)  # a clear error for a wrong name, alias or version
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as exc:
        raise TrackingError(f"cannot download model {model_uri} from {describe_store()}: {exc}") from exc
