"""The fine-tuning settings an evaluation or a search chose, recorded where `classify` finds them.

An evaluation that picks its lr (and steps) on meta-validation tasks (`select_on_val`, as the quickstart
does) and a fine-tuning search (`metallo tune finetune`) each choose a whole `FinetuneSettings`: lr, steps,
which layers are updated, the BatchNorm mode, the augmentations. The lr alone means little without the rest
(an lr chosen for `update: last_stage, bn_mode: train` can wreck a model when every layer is updated with
BatchNorm frozen). So the choice is recorded whole:

- on the run that made it, as the artifact `finetune_settings.json` (`{"settings": ..., "chosen_by": ...}`);
- on the evaluated model version, as the tags `metallo.finetune.settings` (the settings as JSON) and
  `metallo.finetune.chosen_by` (which run chose them, and how). The latest choice wins.

`classify` takes them from the model version by default, or from `finetune_from`: a run id (an evaluation
run or a search's parent run), a `models:/` URI, or a YAML file with a `finetune:` section (an evaluation
config, a search's `best_config.yaml`, or a search config's `evaluate.finetune`). Single fields given
explicitly (e.g. `--lr`) override the chosen ones. Where nothing is recorded, the `FinetuneSettings`
defaults are used, and the source says so. Records from before `pseudo_queries` existed (no such key) load
as `pseudo_queries: pixels`, the form they were chosen with; a YAML file's section is a config like any
other (missing fields take the defaults).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.config import from_dict, load_yaml, to_dict
from metallo_core.errors import ConfigError, TrackingError
from metallo_core.fewshot.finetune import FinetuneSettings
from metallo_core.fewshot.inference import InferenceSettings

SETTINGS_TAG = "metallo.finetune.settings"
CHOSEN_BY_TAG = "metallo.finetune.chosen_by"
SETTINGS_ARTIFACT = "finetune_settings.json"
# The inference settings (fewshot.inference) chosen beside them, recorded the same way.
INFERENCE_TAG = "metallo.inference.settings"
INFERENCE_CHOSEN_BY_TAG = "metallo.inference.chosen_by"
INFERENCE_ARTIFACT = "inference_settings.json"
LEGACY_PSEUDO_QUERIES = "pixels"  # what every recorded choice without the field used (see recorded_plain)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ChosenFinetune:
    settings: FinetuneSettings
    source: str  # where they came from, in words (printed by classify)

    def describe(self) -> str:
        s = self.settings
        common = (f"lr {s.lr:g}, steps {s.steps}, update {s.update}, bn_mode {s.bn_mode}, pseudo_queries "
                  f"{s.pseudo_queries} ({s.pseudo_queries_per_class} per class and step")
        if s.pseudo_queries == "trunk_maps":
            return (f"{common}: crops of {s.crop_scale:g}-1 of the trunk maps cached at stage {s.cache_stage}, "
                    f"{'h+v' if s.vflip else 'h'} flips)")
        return f"{common}: augmentations {'+'.join(s.augmentations) or 'none'}, augment_p {s.augment_p:g})"


def record_chosen_settings(run_id: str, model_uri: str, settings: FinetuneSettings, chosen_by: str, *,
                           tag_model: bool = True) -> None:
    """Log `settings` on run `run_id` and, with `tag_model` (a choice made on meta-validation tasks, not
    settings merely evaluated), tag the model version behind `model_uri` (models:/name/version or @alias;
    other URIs get only the run artifact)."""
    from metallo_core.tracking.registry import parse_model_uri, resolve_version

    plain = to_dict(settings)
    client = tracking.client()
    client.log_text(run_id, json.dumps({"settings": plain, "chosen_by": chosen_by}, indent=2), SETTINGS_ARTIFACT)
    if tag_model and parse_model_uri(model_uri):
        version = resolve_version(model_uri)
        client.set_model_version_tag(version.name, version.version, SETTINGS_TAG, json.dumps(plain))
        client.set_model_version_tag(version.name, version.version, CHOSEN_BY_TAG, f"{chosen_by} (run {run_id})")


def record_chosen_inference(run_id: str, model_uri: str, inference: InferenceSettings, chosen_by: str) -> None:
    """Log the inference settings chosen on meta-validation tasks on run `run_id` and tag the model version
    behind `model_uri` with them (as `record_chosen_settings` does for fine-tuning settings)."""
    from metallo_core.tracking.registry import parse_model_uri, resolve_version

    plain = to_dict(inference)
    client = tracking.client()
    client.log_text(run_id, json.dumps({"settings": plain, "chosen_by": chosen_by}, indent=2), INFERENCE_ARTIFACT)
    if parse_model_uri(model_uri):
        version = resolve_version(model_uri)
        client.set_model_version_tag(version.name, version.version, INFERENCE_TAG, json.dumps(plain))
        client.set_model_version_tag(version.name, version.version, INFERENCE_CHOSEN_BY_TAG,
                                     f"{chosen_by} (run {run_id})")


def recorded_inference(model_uri: str) -> tuple[InferenceSettings, str]:
    """(the inference settings recorded on a registered model version, where they came from in words); plain
    ProtoNet, saying why, where none are recorded."""
    from metallo_core.tracking.registry import parse_model_uri, resolve_version, version_uri

    if not parse_model_uri(model_uri):
        return InferenceSettings(), f"plain ({model_uri} is not a registered model version)"
    version = resolve_version(model_uri)
    tags = dict(version.tags or {})
    where = version_uri(version.name, version.version)
    if INFERENCE_TAG not in tags:
        return InferenceSettings(), f"plain (no evaluation recorded inference settings on {where})"
    try:
        settings = from_dict(InferenceSettings, json.loads(tags[INFERENCE_TAG]), "inference")
        settings.validate()
    except ConfigError as exc:
        raise ConfigError(f"inference settings from tag {INFERENCE_TAG} of {where}: {exc}") from exc
    return settings, f"recorded on {where} by {tags.get(INFERENCE_CHOSEN_BY_TAG, 'an earlier run')}"


def choose(model_uri: str, finetune_from: str = "", overrides: dict[str, Any] | None = None) -> ChosenFinetune:
    """The settings to fine-tune `model_uri` with: from `finetune_from` when given, else those recorded on
    the model version, else the defaults; then `overrides` (fields given explicitly, None values ignored)."""
    chosen = settings_from(finetune_from) if finetune_from else recorded_for_model(model_uri)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if given:
        chosen = ChosenFinetune(
            _validated(dataclasses.replace(chosen.settings, **given), "command-line overrides"),
            f"{chosen.source}; overridden: {', '.join(f'{key} {value}' for key, value in given.items())}")
    return chosen


def recorded_for_model(model_uri: str) -> ChosenFinetune:
    """The settings recorded on a registered model version, or the defaults (saying why)."""
    from metallo_core.tracking.registry import parse_model_uri, resolve_version, version_uri

    if not parse_model_uri(model_uri):
        return ChosenFinetune(FinetuneSettings(), f"the defaults ({model_uri} is not a registered model version, "
                                                  "which is where chosen settings are recorded; see --finetune-from)")
    version = resolve_version(model_uri)
    tags = dict(version.tags or {})
    where = version_uri(version.name, version.version)
    if SETTINGS_TAG not in tags:
        return ChosenFinetune(FinetuneSettings(), f"the defaults (no evaluation or search recorded fine-tuning "
                                                  f"settings on {where}; see --finetune-from)")
    settings = _settings_from_plain(recorded_plain(json.loads(tags[SETTINGS_TAG])), f"tag {SETTINGS_TAG} of {where}")
    return ChosenFinetune(settings, f"recorded on {where} by {tags.get(CHOSEN_BY_TAG, 'an earlier run')}")


def settings_from(source: str) -> ChosenFinetune:
    """Settings from a run id, a models:/ URI or a YAML config file (see the module docstring)."""
    if source.startswith("models:/"):
        return recorded_for_model(source)
    path = Path(source).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        return _from_yaml(path)
    if RUN_ID.match(source):
        return _from_run(source)
    raise ConfigError(f"--finetune-from {source!r} is neither a run id (32 hex digits), a models:/ URI nor an "
                      "existing YAML file")


def _from_yaml(path: Path) -> ChosenFinetune:
    if not path.is_file():
        raise ConfigError(f"--finetune-from {path}: no such file")
    data = load_yaml(path.read_text(), f"--finetune-from {path}") or {}
    section = data.get("finetune") if isinstance(data, dict) else None
    if section is None and isinstance(data, dict) and isinstance(data.get("evaluate"), dict):
        section = data["evaluate"].get("finetune")
    if not isinstance(section, dict):
        raise ConfigError(f"--finetune-from {path}: no finetune: section (nor evaluate.finetune:) to take "
                          "fine-tuning settings from")
    return ChosenFinetune(_settings_from_plain(section, str(path)), f"the finetune: section of {path}")


def _from_run(run_id: str) -> ChosenFinetune:
    """A run's recorded choice; for runs logged before choices were recorded, a search's best_config.yaml
    or an evaluation's config with its meta-val selection."""
    client = tracking.lookup_client()
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException or HTTP errors
        raise TrackingError(f"--finetune-from: no run {run_id} in {tracking.describe_store()} ({exc})") from exc
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    if SETTINGS_ARTIFACT in artifacts:
        record = json.loads(_read_artifact(client, run_id, SETTINGS_ARTIFACT))
        return ChosenFinetune(_settings_from_plain(recorded_plain(record["settings"]),
                                                   f"{SETTINGS_ARTIFACT} of run {run_id}"),
                              f"run {run_id}: {record.get('chosen_by', 'recorded choice')}")
    for name in ("best_config.yaml", "config.yaml"):
        if name not in artifacts:
            continue
        data = load_yaml(_read_artifact(client, run_id, name), f"{name} of run {run_id}") or {}
        section = data.get("finetune") or (data.get("evaluate") or {}).get("finetune")
        if not isinstance(section, dict):
            continue
        section = recorded_plain(section)
        how = f"{name} of run {run_id} ({run.info.run_name})"
        if name == "config.yaml" and "selection" in artifacts:
            best = json.loads(_read_artifact(client, run_id, "selection/finetune_on_meta_val.json"))
            top = max(best, key=lambda row: (row["val_accuracy"], -row["lr"]))
            section.update(lr=top["lr"], steps=top["steps"])
            how += ", lr and steps as selected on meta-validation tasks"
        return ChosenFinetune(_settings_from_plain(section, how), how)
    raise ConfigError(f"--finetune-from: run {run_id} ({run.info.run_name}) records no fine-tuning settings "
                      f"({SETTINGS_ARTIFACT}, best_config.yaml or a config.yaml with finetune:)")


def recorded_plain(plain: dict[str, Any]) -> dict[str, Any]:
    """Settings a run or model version recorded, as they were meant: records (always whole, `to_dict` of the
    settings) made before the cached-trunk form existed have no `pseudo_queries` and fine-tuned on pixels,
    which the defaults no longer do."""
    plain = dict(plain)
    plain.setdefault("pseudo_queries", LEGACY_PSEUDO_QUERIES)
    return plain


def _read_artifact(client, run_id: str, path: str) -> str:
    return Path(client.download_artifacts(run_id, path)).read_text()


def _settings_from_plain(plain: dict[str, Any], where: str) -> FinetuneSettings:
    try:
        settings = from_dict(FinetuneSettings, plain, "finetune")
    except ConfigError as exc:
        raise ConfigError(f"fine-tuning settings from {where}: {exc}") from exc
    return _validated(settings, where)


def _validated(settings: FinetuneSettings, where: str) -> FinetuneSettings:
    try:
        settings.validate()
    except ConfigError as exc:
        raise ConfigError(f"fine-tuning settings from {where}: {exc}") from exc
    return settings
