"""DINO on Ray Train with 2 CPU workers: checkpoints, a killed worker survived, registry, no rework on rerun
(workers reading their own row groups, the default). The Ray Data reader's full epoch on two workers is checked
by tests/test_console.py's stage on Ray (one Train run for both)."""

import pytest
import torch

from metallo_core import tracking
from metallo_core.config import from_dict
from metallo_core.data.synth_dataset import write_fewshot
from metallo_core.ssl.config import DinoConfig
from metallo_core.tracking.backbone_store import load_backbone, resolve_version
from metallo_core.train import ray_setup, skeleton
from metallo_core.train.dino import run_dino_pretraining

pytestmark = pytest.mark.ray


TINY_DINO = {
    "backbone": {"arch": "resnet18", "small_input": True, "image_size": 16},
    "head": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
    "multicrop": {"global_size": 16, "local_size": 8, "local_crops": 2, "micrograph": True},
    "optim": {"batch_size_per_worker": 8, "warmup_epochs": 1},
    "compute": {"num_workers": 2},
}
STEPS = (80 // 2) // 8  # the train split's 80 images shared by 2 workers in batches of 8: 5 steps per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    uri = tmp_path_factory.mktemp("dino") / "fewshot"
    write_fewshot(str(uri), num_classes=15, images_per_class=16, size=20)  # train split: 5 classes, 80 images
    return uri


def test_pretraining_resumes_after_a_worker_dies_and_registers_the_backbone(data, ray_cluster, monkeypatch):
    steps = STEPS
    config = from_dict(DinoConfig, {
        **TINY_DINO,
        "data": {"uri": str(data), "base_size": 20},
        "knn": {"every_epochs": 1, "split": "val"},
        "run": {"name": "dino-test", "max_failures": 1, "log_every_steps": 1},
        "debug": {"fail_at_step": steps + 3, "fail_rank": 1},  # mid-way through epoch 1
        "epochs": 2,
    })
    result = run_dino_pretraining(config)

    assert result.epochs_done == 2
    client = tracking.client()
    resumed = client.get_metric_history(result.run_id, "resumed_at_step")
    assert [m.value for m in resumed] == [steps]  # restarted once, from the end of epoch 0
    losses = client.get_metric_history(result.run_id, "loss")
    logged_steps = sorted({m.step for m in losses})
    assert logged_steps == list(range(2 * steps))
    # The first steps of epoch 1 ran twice: before the worker died and again after the resume. A resume that
    # restored the weights, optimiser state, centre and every rank's augmentation computes the same losses
    # again (one that only restored the step counter would not). Step steps + 2 may or may not have been logged
    # before the kill (rank 0 logs it while rank 1 dies); steps and steps + 1 were.
    by_step: dict[int, list[float]] = {}
    for metric in sorted(losses, key=lambda m: m.timestamp):
        by_step.setdefault(metric.step, []).append(metric.value)
    twice = {step: values for step, values in by_step.items() if len(values) > 1}
    assert {steps, steps + 1} <= set(twice) <= {steps, steps + 1, steps + 2}, by_step
    for step, (before_kill, after_resume) in twice.items():
        assert after_resume == pytest.approx(before_kill, rel=1e-5, abs=1e-6), (step, before_kill, after_resume)
    knn = client.get_metric_history(result.run_id, "knn_accuracy")
    assert len(knn) >= 2 and all(0.0 <= m.value <= 1.0 for m in knn)
    # The curves as a picture on the run page: a real PNG, three panels wide (loss, epoch loss, k-NN).
    from PIL import Image

    curves = Image.open(client.download_artifacts(result.run_id, skeleton.CURVES_ARTIFACT))
    assert curves.format == "PNG" and curves.width > 2 * curves.height

    version = resolve_version("models:/metallo-backbone@current")
    assert result.model_uri == f"models:/metallo-backbone/{version.version}"
    assert version.tags["metallo.dataset_uri"] == str(data)
    assert len(version.tags["metallo.dataset_manifest_sha256"]) == 64
    assert version.tags["metallo.run_id"] == result.run_id
    backbone, spec = load_backbone("models:/metallo-backbone@current")
    assert spec.arch == "resnet18" and spec.small_input and spec.image_size == 16
    assert backbone.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 512)

    # Submitting the finished run again asks for no cluster resources, trains nothing, registers nothing new.
    def no_cluster(*args):
        raise AssertionError("a finished run must not ask Ray for resources")

    monkeypatch.setattr(ray_setup, "connect", no_cluster)
    again = run_dino_pretraining(config)
    assert again.model_uri == result.model_uri and again.run_id == result.run_id
    assert sorted({m.step for m in client.get_metric_history(result.run_id, "loss")}) == logged_steps
