"""A backbone from the MLflow registry as the multi-label feature extractor (`multilabel.features`).

`multilabel.features.resolve_backbone` imports no MLflow: the multilabel stages hand it `registered_backbone`
for registry sources (models:/name@alias, models:/name/N, runs:/..., m-...).
"""

from __future__ import annotations

from metallo_core.multilabel.features import ResolvedBackbone
from metallo_core.tracking.backbone_store import load_backbone
from metallo_core.tracking.registry import parse_model_uri, resolve_version, version_uri


def registered_backbone(uri: str) -> ResolvedBackbone:
    """The backbone logged at `uri`, with the spec (architecture, normalisation, image size) it was logged with.

    A models:/ URI is pinned to the version it names now: the weights are that version's, `identity`
    (the feature-cache key, the lineage tag) is `mlflow:<the version's source>` so it names the logged
    weights even if the alias moves later, and `uri` is models:/name/N. Other URIs are loaded as given, with
    identity `mlflow:<uri>`. Raises TrackingError for an unknown model, alias or version, or a model metallo
    did not log.
    """
    identity, resolved_uri = f"mlflow:{uri}", uri
    if parse_model_uri(uri):
        version = resolve_version(uri)
        identity = f"mlflow:{version.source}"
        resolved_uri = version_uri(version.name, version.version)
    module, spec = load_backbone(resolved_uri)  # the pinned version: the alias may move meanwhile
    description = f"{resolved_uri} ({spec.arch}{', small-input stem' if spec.small_input else ''}, "\
                  f"trained at {spec.image_size} px; from {uri})"
    return ResolvedBackbone(module, spec, identity, description, uri=resolved_uri)
