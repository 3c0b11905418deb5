"""Few-shot stages on Ray: meta-training learns (beats the untrained backbone on the fixed meta-val
tasks), and on the same fixed test tasks fine-tuning beats plain ProtoNet; registry and JSON output."""

import json

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
from metallo_core.fewshot.metrics import mean_and_ci95
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.models.backbones import build_backbone
from metallo_core.models.registry import resolve_version
from metallo_core.report.build import write_report
from metallo_core.train.evaluate import run_evaluation, summary_json
from metallo_core.train.metatrain import VAL_EPISODES_ARTIFACT, run_metatraining
from tests.fewshot_fixtures import TINY_SPEC, write_tiny_fewshot

pytestmark = pytest.mark.ray

SPEC = TINY_SPEC


@pytest.fixture(scope="module")
def fewshot_data(tmp_path_factory):
    return write_tiny_fewshot(tmp_path_factory.mktemp("fewshot"))


def untrained_val_accuracy(config: MetaTrainConfig, episodes_json: str) -> float:
    torch.manual_seed(config.seed)  # the workers build the scratch backbone from the same seed
    model = ProtoNet(build_backbone(config.backbone.spec), distance=config.distance)
    images = ClassIndexedImages.load(config.data.uri, config.data.val_split, image_size=20)
    episodes, _ = episodes_from_json(episodes_json, images.indices_by_class)
    normalizer = ImageNormalizer(config.backbone.spec.mean, config.backbone.spec.std)
    features = embed_images(model, images.images, normalizer, torch.device("cpu"))
    return mean_and_ci95(protonet_accuracies(model, features, episodes))[0]


def test_metatraining_learns_and_finetuning_beats_protonet(fewshot_data, ray_cluster, tmp_path):
    config = from_dict(MetaTrainConfig, {
        "data": {"uri": fewshot_data},
        "backbone": {"source": "scratch", "spec": SPEC},
        "episodes": {"way": 5, "shot": 5, "query": 5},
        "episodes_per_epoch": 40,
        "val_episodes": 40,
        "val_shot": 1,
        "optim": {"name": "sgd", "lr": 0.05},
        "epochs": 3,
        "run": {"name": "protonet-test"},
    })
    trained = run_metatraining(config)
    client = tracking.client()
    episodes_json = client.download_artifacts(trained.run_id, VAL_EPISODES_ARTIFACT)
    baseline = untrained_val_accuracy(config, open(episodes_json).read())
    # Chance is 0.2 for 5-way; meta-training must add a clear margin over the untrained backbone.
    assert trained.best_val_accuracy >= baseline + 0.05, (trained.best_val_accuracy, baseline)
    assert trained.best_val_accuracy >= 0.35
    version = resolve_version("models:/metallo-protonet@current")
    assert trained.model_uri == f"models:/metallo-protonet/{version.version}"
    assert version.tags["metallo.backbone_source"] == "scratch"
    assert float(version.tags["metallo.best_val_accuracy"]) == pytest.approx(trained.best_val_accuracy, abs=1e-4)

    evaluation = run_evaluation(from_dict(EvaluateConfig, {
        "model": "models:/metallo-protonet@current",
        "data": {"uri": fewshot_data},
        "episodes": {"way": 5, "shot": 5, "query": 10},
        "tasks": 40,
        "modes": ["protonet", "finetune"],
        "finetune": {"steps": 15, "lr": 0.001},
        "parallelism": 2,
    }))
    protonet, finetune = evaluation.modes["protonet"], evaluation.modes["finetune"]
    assert protonet.n == finetune.n == 40
    assert finetune.mean > protonet.mean, (finetune.mean, protonet.mean)
    gain, gain_ci95 = evaluation.gains["finetune"]
    assert gain == pytest.approx(finetune.mean - protonet.mean) and gain_ci95 > 0
    summary = summary_json(evaluation)
    assert json.loads(json.dumps(summary))["modes"]["finetune"]["ci95"] == pytest.approx(finetune.ci95)
    assert (summary["way"], summary["shot"], summary["tasks"]) == (5, 5, 40)
    per_task = client.download_artifacts(evaluation.run_id, "per_task/finetune.csv")
    assert len(open(per_task).read().splitlines()) == 41

    # Every query of the 40 tasks lands in the confusion matrix; with as many queries per task, its
    # diagonal share is the mean per-task accuracy.
    confusion_file = client.download_artifacts(evaluation.run_id, "confusion/finetune.json")
    confusion = Confusion.from_json(open(confusion_file).read())
    assert confusion.tasks == 40 and confusion.queries == 40 * 5 * 10 and len(confusion.classes) == 5
    assert np.trace(confusion.counts) / confusion.queries == pytest.approx(finetune.mean)

    # The report of the evaluation's experiment shows its numbers and follows the model into metallo-metatrain.
    html = write_report("metallo-evaluate", tmp_path / "report").html.read_text()
    assert f"{100 * protonet.mean:.2f}% ± {100 * protonet.ci95:.2f}" in html
    assert f"{100 * finetune.mean:.2f}% ± {100 * finetune.ci95:.2f}" in html
    assert f"{100 * gain:+.2f} ± {100 * gain_ci95:.2f}" in html
    assert "protonet-test" in html and "none (scratch)" in html and html.count("<svg") >= 3
