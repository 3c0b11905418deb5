"""The registered models a person can pick from by name and alias, and what is recorded with each version:
its lineage tags and the fine-tuning and inference settings `classify` would use (what `metallo serve`
lists and shows beside its model choice)."""

from __future__ import annotations

from dataclasses import dataclass

from metallo_core.errors import TrackingError
from metallo_core.tracking.finetune_choice import (
    CHOSEN_BY_TAG,
    INFERENCE_CHOSEN_BY_TAG,
    INFERENCE_TAG,
    SETTINGS_TAG,
    recorded_for_model,
    recorded_inference,
)
from metallo_core.tracking.registry import resolve_version, version_uri
from metallo_core.tracking.store import describe_store, lookup_client

# The settings tags are shown in words (below), not as raw JSON among the lineage.
_SETTINGS_TAGS = {SETTINGS_TAG, CHOSEN_BY_TAG, INFERENCE_TAG, INFERENCE_CHOSEN_BY_TAG}


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model list: `uri` is what classify is given (models:/name@alias, or models:/name/N
    for a version no alias points at); `label` names the version too."""

    uri: str
    label: str


@dataclass
class ModelCard:
    """What is recorded with one registered version."""

    uri: str  # the pinned models:/name/N
    aliases: list[str]
    run_id: str
    description: str
    lineage: dict[str, str]  # the version's tags other than the settings ones (metallo.* lineage, stage, figures)
    finetune: str  # the fine-tuning settings classify --finetune would use, and where they come from
    inference: str  # the inference settings classify would use, and where they come from


def model_choices(versions_per_model: int = 5) -> list[ModelChoice]:
    """Every alias of every registered model (sorted by name, then alias), then each model's newest
    `versions_per_model` versions no alias points at. TrackingError naming the store when it cannot be read."""
    client = lookup_client()
    try:
        registered = sorted(client.search_registered_models(), key=lambda model: model.name)
    except Exception as exc:
        raise TrackingError(f"cannot list the registered models in {describe_store()}: {exc}") from exc
    choices = []
    for model in registered:
        aliases = dict(model.aliases or {})
        for alias, version in sorted(aliases.items()):
            choices.append(ModelChoice(f"models:/{model.name}@{alias}", f"{model.name}@{alias} (v{version})"))
        versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{model.name}'")),
                          reverse=True)
        unaliased = [v for v in versions if str(v) not in {str(a) for a in aliases.values()}]
        for version in unaliased[:versions_per_model]:
            choices.append(ModelChoice(version_uri(model.name, version), f"{model.name} v{version}"))
    return choices


def model_card(model_uri: str) -> ModelCard:
    """The registered version behind `model_uri` (models:/name@alias or models:/name/N) and what is
    recorded with it; TrackingError for an unknown name, alias or version."""
    version = resolve_version(model_uri)
    registered = lookup_client().get_registered_model(version.name)
    aliases = sorted(alias for alias, number in dict(registered.aliases or {}).items()
                     if str(number) == str(version.version))
    tags = {key: str(value) for key, value in sorted(dict(version.tags or {}).items()) if key not in _SETTINGS_TAGS}
    finetune = recorded_for_model(model_uri)
    inference, inference_source = recorded_inference(model_uri)
    return ModelCard(version_uri(version.name, version.version), aliases, version.run_id or "",
                     version.description or "", tags, f"{finetune.describe()}; from {finetune.source}",
                     f"{inference.describe()}; from {inference_source}")
