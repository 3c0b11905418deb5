"""Few-shot stages on Ray: meta-training learns (the registered model beats the untrained backbone on
fixed TEST tasks, which played no part in choosing the epoch, by more than the paired 95% interval);
registry, per-task, confusion, JSON and report output of the evaluation; and whether fine-tuning beats
plain ProtoNet on the same test tasks, which at this scale it does not (a known gap of issue 16, reported
as xfail; on real images the quickstart's selection tasks decide whether fine-tuning is used at all).

The network is a full ResNet-18 at 20 px, so each episode costs real compute on two cores: the schedule is
the smallest that still learns by a wide margin (the assertion's margin is a third of the gain seen)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metallo_core import tracking
from metallo_core.config import from_dict
from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
from metallo_core.fewshot.confusion import Confusion
from metallo_core.fewshot.episodes import episodes_from_json
from metallo_core.fewshot.evaluation import embed_images, protonet_accuracies
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.models.backbones import build_backbone
from metallo_core.report.build import write_report
from metallo_core.tracking.backbone_store import resolve_version
from metallo_core.train.evaluate import run_evaluation, summary_json
from metallo_core.train.metatrain import VAL_EPISODES_ARTIFACT, run_metatraining
from tests.fewshot_fixtures import TINY_SPEC, write_tiny_fewshot

pytestmark = pytest.mark.ray

SPEC = TINY_SPEC
TASKS = 24


@pytest.fixture(scope="module")
def fewshot_data(tmp_path_factory):
    return write_tiny_fewshot(tmp_path_factory.mktemp("fewshot"))


def untrained_accuracies(config: MetaTrainConfig, split: str, episodes_json: str) -> list[float]:
    """Per-task ProtoNet accuracies of the backbone meta-training started from (same seed, scratch)."""
    torch.manual_seed(config.seed)  # the workers build the scratch backbone from the same seed
    model = ProtoNet(build_backbone(config.backbone.spec), distance=config.distance)
    images = ClassIndexedImages.load(config.data.uri, split, image_size=20)
    episodes, _ = episodes_from_json(episodes_json, images.indices_by_class)
    normalizer = ImageNormalizer(config.backbone.spec.mean, config.backbone.spec.std)
    features = embed_images(model, images.images, normalizer, torch.device("cpu"))
    return protonet_accuracies(model, features, episodes)


def per_task_csv(client, run_id: str, mode: str) -> np.ndarray:
    lines = Path(client.download_artifacts(run_id, f"per_task/{mode}.csv")).read_text().splitlines()
    assert lines[0] == "task,accuracy"
    return np.array([float(line.split(",")[1]) for line in lines[1:]])


def paired_interval(baseline: np.ndarray, method: np.ndarray) -> tuple[float, float]:
    """Oracle for the paired gain: mean difference and 1.96 * sd(ddof=1) / sqrt(n), written out here."""
    difference = method - baseline
    return float(difference.mean()), float(1.96 * difference.std(ddof=1) / np.sqrt(len(difference)))


def test_metatraining_learns_and_evaluation_reports_finetuning_against_protonet(fewshot_data, ray_cluster, tmp_path):
    config = from_dict(MetaTrainConfig, {
        "data": {"uri": fewshot_data},
        "backbone": {"source": "scratch", **SPEC},
        "episodes": {"way": 5, "shot": 5, "query": 5},
        "episodes_per_epoch": 30,
        "val_episodes": 20,
        "val_shot": 1,
        "optim": {"name": "sgd", "lr": 0.05},
        "epochs": 2,
        "run": {"name": "protonet-test"},
    })
    trained = run_metatraining(config)
    client = tracking.client()
    assert client.download_artifacts(trained.run_id, VAL_EPISODES_ARTIFACT)  # the tasks the epoch was chosen on
    version = resolve_version("models:/metallo-protonet@current")
    assert trained.model_uri == f"models:/metallo-protonet/{version.version}"
    assert version.tags["metallo.backbone_source"] == "scratch"
    assert float(version.tags["metallo.best_val_accuracy"]) == pytest.approx(trained.best_val_accuracy, abs=1e-4)

    evaluation = run_evaluation(from_dict(EvaluateConfig, {
        "model": "models:/metallo-protonet@current",
        "data": {"uri": fewshot_data},
        "episodes": {"way": 5, "shot": 5, "query": 10},
        "tasks": TASKS,
        "modes": ["protonet", "finetune"],
        "finetune": {"steps": 5, "lr": 0.005, "bn_mode": "train"},
        "parallelism": 2,
    }))
    protonet, finetune = evaluation.modes["protonet"], evaluation.modes["finetune"]
    assert protonet.n == finetune.n == TASKS
    protonet_per_task = per_task_csv(client, evaluation.run_id, "protonet")
    finetune_per_task = per_task_csv(client, evaluation.run_id, "finetune")
    assert protonet.mean == pytest.approx(protonet_per_task.mean(), abs=1e-6)
    # The per-task accuracies the result carries are the logged ones, task by task (a gate pairs them).
    assert evaluation.per_task["finetune"] == pytest.approx(list(finetune_per_task), abs=1e-6)
    assert summary_json(evaluation)["per_task"]["protonet"] == evaluation.per_task["protonet"]

    # Learning happened, judged on the test tasks (classes never seen in training, tasks not used to
    # pick the epoch): the registered model against the untrained backbone on the very same tasks.
    test_episodes = Path(client.download_artifacts(evaluation.run_id, "episodes/test.json")).read_text()
    untrained = np.array(untrained_accuracies(config, "test", test_episodes))
    learned, learned_ci95 = paired_interval(untrained, protonet_per_task)
    assert learned - learned_ci95 > 0.05, (learned, learned_ci95)

    # The paired gain the job reports is the oracle's, over the same tasks.
    gain, gain_ci95 = evaluation.gains["finetune"]
    assert (gain, gain_ci95) == pytest.approx(paired_interval(protonet_per_task, finetune_per_task), abs=1e-6)
    summary = summary_json(evaluation)
    assert json.loads(json.dumps(summary))["modes"]["finetune"]["ci95"] == pytest.approx(finetune.ci95)
    assert (summary["way"], summary["shot"], summary["tasks"]) == (5, 5, TASKS)
    per_task = client.download_artifacts(evaluation.run_id, "per_task/finetune.csv")
    assert len(Path(per_task).read_text().splitlines()) == TASKS + 1

    # Every query of the tasks lands in the confusion matrix; with as many queries per task, its
    # diagonal share is the mean per-task accuracy.
    confusion_file = client.download_artifacts(evaluation.run_id, "confusion/finetune.json")
    confusion = Confusion.from_json(Path(confusion_file).read_text())
    assert confusion.tasks == TASKS and confusion.queries == TASKS * 5 * 10 and len(confusion.classes) == 5
    assert np.trace(confusion.counts) / confusion.queries == pytest.approx(finetune.mean)

    # The report of the evaluation's experiment shows its numbers and follows the model into metallo-metatrain.
    html = write_report("metallo-evaluate", tmp_path / "report").html.read_text()
    assert f"{100 * protonet.mean:.2f}% ± {100 * protonet.ci95:.2f}" in html
    assert f"{100 * finetune.mean:.2f}% ± {100 * finetune.ci95:.2f}" in html
    assert f"{100 * gain:+.2f} ± {100 * gain_ci95:.2f}" in html
    assert "protonet-test" in html and "none (scratch)" in html and html.count("<svg") >= 3

    # Last, and only after everything above held: does fine-tuning beat ProtoNet by more than the noise
    # (lower end of the paired interval > 2 points)? At this scale it does not (module docstring), a known
    # gap of issue 16, reported as an expected failure with the measured figure. Kept strict: once it
    # passes, the test fails so that the gap is turned back into an assertion.
    if gain - gain_ci95 > 0.02:
        pytest.fail(f"fine-tuning now beats ProtoNet ({gain:+.3f} +- {gain_ci95:.3f}): make this an assertion again")
    pytest.xfail(f"known gap (issue 16): fine-tuning - ProtoNet {gain:+.3f} +- {gain_ci95:.3f} on the test tasks, "
                 "not above 2 points")
