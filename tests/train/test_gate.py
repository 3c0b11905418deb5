"""The stage gate in the driver, without Ray: a stage output that does worse than its baseline on the selection
tasks is registered (lineage) but does not get the alias unless forced; one that does better gets it; with
nothing to compare with, the alias moves as it always did.

The two backbones are the offline ImageNet EfficientNet-Lite0 run at 32 px (pretrained) and the same network
with random weights, whose features barely separate the synthetic classes (the first test checks the gap).

Each backbone is logged once per module (`logged`) and registered as new versions of that logged model:
what is judged is the gate's choice of alias, and logging (exporting) an EfficientNet again for every
version would take most of this file's time. The last two tests register through the stages' own code."""

import json
import shutil

import mlflow
import pytest
import torch

from metallo_core import tracking
from metallo_core.cli import main
from metallo_core.fewshot.selection_probe import SelectionTasks
from metallo_core.models.backbone_choice import BackboneChoice
from metallo_core.models.backbones import build_backbone
from metallo_core.models.sources import OFFLINE_IMAGENET, backbone_from_source, offline_imagenet_spec
from metallo_core.settings import GateSettings, RegistrySettings
from metallo_core.tracking.backbone_store import log_backbone
from metallo_core.tracking.registry import alias_version, point_alias
from metallo_core.train.gate import VERDICT_ARTIFACT, gate_and_register
from tests.fewshot_fixtures import write_tiny_fewshot

SPEC = offline_imagenet_spec(32)
REGISTRY = RegistrySettings(name="metallo-backbone", alias="current")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_fewshot(tmp_path_factory.mktemp("gate"))


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def random_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(SPEC)


def pretrained_backbone():
    backbone, spec = backbone_from_source(OFFLINE_IMAGENET, SPEC)
    assert spec.image_size == SPEC.image_size
    return backbone


BACKBONES = {"pretrained": pretrained_backbone, "random": random_backbone,
             "random, seed 1": lambda: random_backbone(seed=1)}


def new_run() -> str:
    tracking.configure()
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("test-gate"))
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


@pytest.fixture(scope="module")
def logged_store(tmp_path_factory):
    """A tracking store (METALLO_HOME) holding each backbone of BACKBONES logged once, and kind -> (the
    backbone, its logged model's models:/m-... URI)."""
    home = tmp_path_factory.mktemp("gate-home")
    backbones = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tracking.ENV_HOME, str(home))
        patch.delenv(tracking.ENV_TRACKING_URI, raising=False)
        for kind, build in BACKBONES.items():
            backbone = build()
            registered = log_backbone(new_run(), backbone, SPEC, registered_name="test-gate-logged", tags={})
            backbones[kind] = backbone, f"models:/{registered.model_id}"
    return home, backbones


@pytest.fixture
def logged(logged_store, isolated_tracking):
    """This test's own store starts as a copy of `logged_store`; kind -> (backbone, logged model URI)."""
    home, backbones = logged_store
    shutil.copytree(home, isolated_tracking, dirs_exist_ok=True)
    return backbones.__getitem__


def register_version(logged_uri: str, tags: dict[str, str]) -> str:
    """A new version of REGISTRY.name holding the logged model `logged_uri` (as log_backbone registers)."""
    tracking.configure()
    return str(mlflow.register_model(logged_uri, REGISTRY.name, tags=tags).version)


def register_at_alias(logged, kind: str) -> str:
    version = register_version(logged(kind)[1], {})
    point_alias(f"models:/{REGISTRY.name}/{version}", REGISTRY.alias)
    return version


def gate_settings(data, **changes) -> GateSettings:
    settings = dict(uri=data, split="val", way=5, shot=1, query=5, tasks=30, seed=0)
    return GateSettings(**{**settings, **changes})


def gated(logged, kind: str, gate: GateSettings, input_source: str = "scratch", run_id: str | None = None):
    """Gate the backbone of `kind` as the output of a pretraining run (`run_id` or a new one)."""
    run_id = run_id or new_run()
    candidate, logged_uri = logged(kind)

    def register(identity):
        return f"models:/{REGISTRY.name}/{register_version(logged_uri, identity)}"

    outcome = gate_and_register(stage="pretrain", gate=gate, registry=REGISTRY, run_id=run_id, epochs_done=1,
                                candidate=candidate, candidate_spec=SPEC, input_source=input_source,
                                input_spec=SPEC, trained_on="synthetic-fewshot (train split)", register=register)
    return run_id, outcome


def version_tags(version: str) -> dict[str, str]:
    return dict(tracking.client().get_model_version(REGISTRY.name, version).tags)


def test_the_probe_scores_the_same_tasks_and_separates_the_two_backbones(data):
    tasks = SelectionTasks(data, "val", way=5, shot=1, query=5, tasks=30, seed=0)
    pretrained, random = tasks.score(pretrained_backbone(), SPEC), tasks.score(random_backbone(), SPEC)
    assert len(pretrained.task_accuracies) == len(random.task_accuracies) == 30
    assert sum(pretrained.task_accuracies) / 30 > sum(random.task_accuracies) / 30 + 0.1
    assert pretrained.knn_accuracy > random.knn_accuracy + 0.1
    again = SelectionTasks(data, "val", way=5, shot=1, query=5, tasks=30, seed=0).score(random_backbone(), SPEC)
    assert again.task_accuracies == random.task_accuracies  # same tasks, same order


def test_an_output_worse_than_the_alias_is_registered_but_does_not_get_the_alias(data, logged):
    previous = register_at_alias(logged, "pretrained")
    run_id, outcome = gated(logged, "random", gate_settings(data))
    assert not outcome.verdict.kept and not outcome.alias_moved
    assert outcome.verdict.gain.mean + outcome.verdict.gain.ci95 < 0
    assert outcome.verdict.baseline == f"metallo-backbone@current (v{previous})"
    assert alias_version(REGISTRY.name, REGISTRY.alias) == previous  # the alias did not move
    new_version = outcome.model_uri.rsplit("/", 1)[1]
    assert new_version != previous
    assert version_tags(new_version)["metallo.gate.kept"] == "false"
    assert version_tags(new_version)["metallo.gate.forced"] == "false"
    run = tracking.client().get_run(run_id)
    assert run.data.tags["metallo.gate.kept"] == "false" and run.data.tags["metallo.gate.alias_moved"] == "false"
    assert run.data.metrics["gate_gain"] < 0 and run.data.metrics["gate_after"] < run.data.metrics["gate_before"]
    assert {"gate_before", "gate_gain_ci95", "gate_knn_before", "gate_knn_after"} <= set(run.data.metrics)
    verdict = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{VERDICT_ARTIFACT}"))
    assert verdict["kept"] is False and verdict["tasks"] == 30 and "the baseline stays" in verdict["reason"]


def test_force_moves_the_alias_to_an_output_that_did_not_help(data, logged):
    register_at_alias(logged, "pretrained")
    _, outcome = gated(logged, "random", gate_settings(data, force=True))
    assert not outcome.verdict.kept and outcome.alias_moved
    new_version = outcome.model_uri.rsplit("/", 1)[1]
    assert alias_version(REGISTRY.name, REGISTRY.alias) == new_version
    assert version_tags(new_version)["metallo.gate.forced"] == "true"


def test_a_finished_run_submitted_again_with_force_moves_the_alias_to_the_version_it_registered(data, logged):
    previous = register_at_alias(logged, "pretrained")
    run_id, first = gated(logged, "random", gate_settings(data))
    assert not first.alias_moved and alias_version(REGISTRY.name, REGISTRY.alias) == previous
    _, again = gated(logged, "random", gate_settings(data, force=True), run_id=run_id)
    assert again.model_uri == first.model_uri  # registered once per (run, epochs done)
    assert again.alias_moved and alias_version(REGISTRY.name, REGISTRY.alias) == first.model_uri.rsplit("/", 1)[1]


def test_an_output_better_than_the_alias_gets_the_alias(data, logged):
    register_at_alias(logged, "random")
    _, outcome = gated(logged, "pretrained", gate_settings(data))
    assert outcome.verdict.kept and outcome.alias_moved and outcome.verdict.gain.mean > 0.1
    assert alias_version(REGISTRY.name, REGISTRY.alias) == outcome.model_uri.rsplit("/", 1)[1]
    assert version_tags(outcome.model_uri.rsplit("/", 1)[1])["metallo.gate.kept"] == "true"


def test_baseline_input_compares_with_the_starting_weights_not_the_alias(data, logged):
    register_at_alias(logged, "random, seed 1")  # as bad as the candidate: the gain would include 0
    _, outcome = gated(logged, "random", gate_settings(data, baseline="input"), input_source=OFFLINE_IMAGENET)
    assert not outcome.verdict.kept and not outcome.alias_moved
    assert outcome.verdict.baseline == f"the starting weights {OFFLINE_IMAGENET}"
    assert outcome.verdict.gain.mean + outcome.verdict.gain.ci95 < 0


def test_a_scratch_start_with_no_alias_yet_has_nothing_to_compare_and_moves_the_alias(data, logged):
    _, outcome = gated(logged, "random", gate_settings(data))
    assert outcome.verdict.kept and not outcome.verdict.compared and outcome.alias_moved
    assert "no baseline to compare with" in outcome.verdict.reason
    assert "no model at metallo-backbone@current" in outcome.verdict.reason
    assert alias_version(REGISTRY.name, REGISTRY.alias) == outcome.model_uri.rsplit("/", 1)[1]


def test_without_a_gate_the_alias_moves_to_a_new_version_as_before(data, logged):
    previous = register_at_alias(logged, "pretrained")
    run_id, outcome = gated(logged, "random", GateSettings())
    assert outcome.verdict is None and outcome.alias_moved
    assert alias_version(REGISTRY.name, REGISTRY.alias) == outcome.model_uri.rsplit("/", 1)[1] != previous
    # A finished run submitted again registers nothing new and leaves the alias where it is now.
    newer = register_at_alias(logged, "pretrained")
    _, again = gated(logged, "random", GateSettings(), run_id=run_id)
    assert again.model_uri == outcome.model_uri and not again.alias_moved
    assert alias_version(REGISTRY.name, REGISTRY.alias) == newer


@pytest.mark.parametrize("stage", ["pretrain", "metatrain"])
def test_force_on_the_command_line_sets_gate_force(stage, capsys):
    config = {"pretrain": "configs/pretrain/tiny_cpu.yaml", "metatrain": None}[stage]
    arguments = [stage] + (["--config", config] if config else ["data.uri=/d"]) + ["--force", "--print-config"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "gate:" in printed and "  force: true" in printed


def test_pretraining_gates_its_teacher_backbone_against_its_starting_weights(data, caplog):
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.train.dino import PretrainResult, describe_result, register_teacher_backbone

    config = DinoConfig(backbone=BackboneChoice.of(OFFLINE_IMAGENET, SPEC), gate=gate_settings(data, baseline="input"))
    config.data.uri = data
    teacher = {f"backbone.{key}": value for key, value in random_backbone().state_dict().items()}
    run_id = new_run()
    with caplog.at_level("INFO", logger="metallo_core.train.gate"):
        registration = register_teacher_backbone(config, {"teacher": teacher}, {"epoch": 0}, run_id, {})
    verdict = registration.verdict
    assert not verdict.kept and not registration.alias_moved and registration.model_uri is not None
    assert verdict.stage == "pretrain" and verdict.trained_on == "synthetic-fewshot (train split)"
    assert alias_version("metallo-backbone", "current") is None
    assert "pretrain gate: selection accuracy" in caplog.text  # a stage's progress: on stderr, not stdout
    text = describe_result(PretrainResult(run_id, 1, {}, registration.model_uri, None, verdict,
                                          registration.alias_moved))
    assert "the baseline stays" in text and "alias moved to it: no" in text


def test_metatraining_gates_its_protonet_against_the_model_at_the_alias(data):
    from metallo_core.config import to_dict
    from metallo_core.fewshot.config import MetaTrainConfig
    from metallo_core.fewshot.protonet import ProtoNet
    from metallo_core.train.metatrain import gate_and_register_protonet

    registry = RegistrySettings(name="metallo-protonet", alias="current")
    previous = log_backbone(new_run(), random_backbone(), SPEC, registered_name=registry.name, tags={},
                            alias=registry.alias).version
    config = MetaTrainConfig(backbone=BackboneChoice.of(OFFLINE_IMAGENET, SPEC), registry=registry,
                             gate=gate_settings(data))
    config.data.uri = data
    state = {"model": ProtoNet(pretrained_backbone()).state_dict(), "best": None}
    record = {"epoch": 1, "best_epoch": 1, "best_val_accuracy": 0.5, "backbone_spec": to_dict(SPEC)}
    registration = gate_and_register_protonet(config, state, record, new_run(),
                                              {"metallo.backbone_source": OFFLINE_IMAGENET})
    assert registration.verdict.kept and registration.alias_moved
    assert registration.verdict.baseline == f"metallo-protonet@current (v{previous})"
    assert alias_version(registry.name, registry.alias) == registration.model_uri.rsplit("/", 1)[1] != previous
