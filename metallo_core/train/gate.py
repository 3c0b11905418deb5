"""The stage gate in the driver: after a stage trained, score its output and its baseline on the gate's
selection tasks, record the verdict on the stage's MLflow run, register the new version (always: lineage)
and point the registry alias at it only if the stage helped, or if forced.

Ray-free: `run_dino_pretraining` and `run_metatraining` call `gate_and_register` once training is done, and
the tests call it directly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from metallo_core import tracking
from metallo_core.errors import DataError
from metallo_core.fewshot.selection_probe import ProbeScore, SelectionTasks
from metallo_core.fewshot.stage_gate import StageVerdict, judge, unopposed
from metallo_core.models.backbones import BackboneSpec
from metallo_core.settings import GateSettings, RegistrySettings
from metallo_core.train import skeleton

logger = logging.getLogger(__name__)

VERDICT_ARTIFACT = "gate/verdict.json"
TAG_PREFIX = "metallo.gate."


@dataclass
class GatedRegistration:
    """What registration did: the new version (None when registry.register is off), the gate's verdict
    (None when the gate is off) and whether the alias now points at the new version."""

    model_uri: str | None
    verdict: StageVerdict | None
    alias_moved: bool


@dataclass(frozen=True)
class Baseline:
    """What the stage output is compared with: a backbone source, or None when there is nothing to compare
    with (`words` then says why)."""

    source: str | None
    words: str


def choose_baseline(gate: GateSettings, registry: RegistrySettings, input_source: str) -> Baseline:
    """The baseline `gate.baseline` names: the version at registry.name@registry.alias now ("alias", pinned),
    else the stage's starting weights `input_source` (pinned already); none for a scratch start."""
    from metallo_core.models.sources import source_kind
    from metallo_core.tracking.registry import alias_version, version_uri

    if gate.baseline == "alias" and registry.alias:
        version = alias_version(registry.name, registry.alias)
        if version is not None:
            return Baseline(version_uri(registry.name, version), f"{registry.name}@{registry.alias} (v{version})")
    if source_kind(input_source) == "scratch":
        where = (f"a scratch start and no model at {registry.name}@{registry.alias} yet"
                 if gate.baseline == "alias" and registry.alias else "a scratch start")
        return Baseline(None, where)
    return Baseline(input_source, f"the starting weights {input_source}")


def check_selection_split(gate: GateSettings) -> None:
    """Fail before any cluster time when the gate's split is missing or has fewer classes than gate.way."""
    from metallo_core.data.class_index import load_split_labels

    if not gate.enabled:
        return
    _, class_names = load_split_labels(gate.uri, gate.split)
    if len(class_names) < gate.way:
        raise DataError(f"gate split {gate.split!r} of {gate.uri} has {len(class_names)} classes, fewer than "
                        f"gate.way = {gate.way}; lower gate.way or point gate.uri/gate.split at a larger split")


def data_in_words(uri: str, split: str) -> str:
    """`<dataset name> (<split> split)`, the dataset named by its manifest."""
    from metallo_core.data.manifest import read_manifest

    return f"{read_manifest(uri).name} ({split} split)"


def gate_and_register(*, stage: str, gate: GateSettings, registry: RegistrySettings, run_id: str,
                      epochs_done: int, candidate: nn.Module, candidate_spec: BackboneSpec, input_source: str,
                      input_spec: BackboneSpec, trained_on: str,
                      register: Callable[[dict[str, str]], str]) -> GatedRegistration:
    """Judge the stage output `candidate` against its baseline (when `gate` is on), log the verdict on run
    `run_id`, register the output once per (run, epochs done) through `register(identity_tags)` (which must
    register it without moving any alias and return its models:/name/N URI), tag the version with the
    verdict, and point registry.alias at it: with the gate off, when the version is new (as before gates: a
    finished run submitted again leaves the alias where it is); with the gate on, when the output was kept or
    `gate.force` (also for a version registered before: rerun a finished run with --force to move the alias).

    `input_source` is the stage's (pinned) starting weights, built with `input_spec` where the source brings
    no spec of its own."""
    from metallo_core.tracking.registry import point_alias, tag_version

    verdict = None
    if gate.enabled:
        verdict = judge_stage(stage=stage, gate=gate, registry=registry, run_id=run_id, candidate=candidate,
                              candidate_spec=candidate_spec, input_source=input_source, input_spec=input_spec,
                              trained_on=trained_on)
    model_uri, new = None, False
    if registry.register:
        model_uri, new = skeleton.register_once(registry, run_id, epochs_done, register)
        if verdict is not None:
            tag_version(model_uri, {**verdict_tags(verdict), f"{TAG_PREFIX}forced": str(gate.force).lower()})
    wanted = new if verdict is None else verdict.kept or gate.force
    move = model_uri is not None and bool(registry.alias) and wanted
    if move:
        assert model_uri is not None
        point_alias(model_uri, registry.alias)
    if verdict is not None:
        tracking.logger_for(run_id).set_tags({f"{TAG_PREFIX}alias_moved": str(move).lower()})
        logger.info("%s", alias_line(registry, model_uri, verdict, forced=gate.force, moved=move))
    return GatedRegistration(model_uri=model_uri, verdict=verdict, alias_moved=move)


def judge_stage(*, stage: str, gate: GateSettings, registry: RegistrySettings, run_id: str, candidate: nn.Module,
                candidate_spec: BackboneSpec, input_source: str, input_spec: BackboneSpec,
                trained_on: str) -> StageVerdict:
    """Probe the baseline and `candidate` on the same selection tasks, judge, log the verdict on `run_id` and
    print its line."""
    baseline = choose_baseline(gate, registry, input_source)
    if baseline.source is None:
        verdict = unopposed(stage, trained_on, baseline.words)
        log_verdict(run_id, verdict)
        logger.info("%s", verdict.line())
        return verdict
    from metallo_core.tracking.backbone_store import backbone_from_any_source

    tasks = SelectionTasks(gate.uri, gate.split, gate.way, gate.shot, gate.query, gate.tasks, gate.seed)
    device = _probe_device()
    baseline_backbone, baseline_spec = backbone_from_any_source(baseline.source, input_spec)
    before = tasks.score(baseline_backbone, baseline_spec, device)
    del baseline_backbone
    after = tasks.score(candidate, candidate_spec, device)
    verdict = judge(stage, trained_on, baseline.words, before.task_accuracies, after.task_accuracies,
                    min_gain=gate.min_gain)
    log_verdict(run_id, verdict, before, after)
    logger.info("%s", verdict.line())
    return verdict


def log_verdict(run_id: str, verdict: StageVerdict, before: ProbeScore | None = None,
                after: ProbeScore | None = None) -> None:
    """The verdict on the stage's run: metrics gate_before/after/gain (fractions), their intervals, the k-NN
    accuracies (information only), tags metallo.gate.*, and the whole verdict as gate/verdict.json."""
    run_log = tracking.logger_for(run_id)
    metrics: dict[str, float] = {}
    if verdict.before is not None and verdict.after is not None and verdict.gain is not None:
        metrics = {"gate_before": verdict.before.mean, "gate_before_ci95": verdict.before.ci95,
                   "gate_after": verdict.after.mean, "gate_after_ci95": verdict.after.ci95,
                   "gate_gain": verdict.gain.mean, "gate_gain_ci95": verdict.gain.ci95}
    if before is not None and after is not None:
        metrics.update(gate_knn_before=before.knn_accuracy, gate_knn_after=after.knn_accuracy)
    if metrics:
        run_log.log_metrics(metrics)
    run_log.set_tags(verdict_tags(verdict))
    document: dict[str, Any] = verdict.to_dict()
    if before is not None and after is not None:
        document["knn_accuracy"] = {"before": before.knn_accuracy, "after": after.knn_accuracy}
    run_log.log_dict(document, VERDICT_ARTIFACT)


def verdict_tags(verdict: StageVerdict) -> dict[str, str]:
    """metallo.gate.* tags of a verdict (on the stage's run and on the version it registered)."""
    tags = {f"{TAG_PREFIX}kept": str(verdict.kept).lower(), f"{TAG_PREFIX}baseline": verdict.baseline,
            f"{TAG_PREFIX}tasks": str(verdict.tasks), f"{TAG_PREFIX}reason": verdict.reason[:500]}
    if verdict.gain is not None:
        tags[f"{TAG_PREFIX}gain"] = f"{verdict.gain.mean:.4f}"
        tags[f"{TAG_PREFIX}gain_ci95"] = f"{verdict.gain.ci95:.4f}"
    return tags


def alias_line(registry: RegistrySettings, model_uri: str | None, verdict: StageVerdict, *, forced: bool,
               moved: bool) -> str:
    """One line saying what happened to the alias, and why."""
    target = f"{registry.name}@{registry.alias}"
    if model_uri is None:
        return f"{verdict.stage} gate: registry.register is off, nothing registered; {target} stays"
    if not registry.alias:
        return f"{verdict.stage} gate: registered {model_uri}; registry.alias is empty, no alias to move"
    if moved and not verdict.kept and forced:
        return f"{verdict.stage} gate: registered {model_uri} and moved {target} to it, FORCED (it did not help)"
    if moved:
        return f"{verdict.stage} gate: registered {model_uri} and moved {target} to it"
    return (f"{verdict.stage} gate: registered {model_uri} for lineage; {target} stays where it was "
            "(--force moves it anyway)")


def _probe_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
