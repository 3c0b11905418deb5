"""The DINO Ray Train worker resumed from a checkpoint continues the uninterrupted run exactly (Ray-free).

`dino_train_worker` runs in this process against a stand-in for the four calls it makes to Ray Train (its
context, the checkpoint it resumes from, report, and the device). An uninterrupted two-epoch run and a run
resumed from that run's epoch-0 checkpoint must agree on the epoch-1 loss and on the final teacher weights:
the resumed worker loaded the checkpoint's weights, optimiser, centre and step, not just its epoch number.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from metallo_core.config import to_dict
from metallo_core.data.synth_dataset import write_fewshot
from metallo_core.ssl.config import DinoConfig
from metallo_core.train import skeleton
from metallo_core.train.checkpoints import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # deterministic reductions: the runs match bit for bit


class FakeTrainSession:
    """What `ray.train` tells one worker of a one-worker run: rank 0 of 1, on the CPU, resuming from `resume_from`
    (a checkpoint directory) or starting fresh; each report is kept, its checkpoint copied under `root`."""

    def __init__(self, root: Path, resume_from: Path | None = None):
        self.root, self.resume_from = root, resume_from
        self.reports: list[tuple[dict, Path | None]] = []

    def get_context(self):
        session = self

        class Context:
            def get_world_rank(self):
                return 0

            def get_world_size(self):
                return 1

            def get_local_rank(self):
                return 0

        session.context = Context()
        return session.context

    def get_checkpoint(self):
        import ray.train

        return ray.train.Checkpoint.from_directory(str(self.resume_from)) if self.resume_from else None

    def report(self, metrics: dict, checkpoint=None) -> None:
        kept = None
        if checkpoint is not None:  # the worker deletes its directory once report returns
            kept = self.root / f"report-{len(self.reports)}"
            shutil.copytree(checkpoint.path, kept)
        self.reports.append((dict(metrics), kept))


def run_worker(monkeypatch, config: DinoConfig, num_images: int, session: FakeTrainSession) -> FakeTrainSession:
    import ray.train
    import ray.train.torch

    from metallo_core.train.dino import dino_train_worker

    with monkeypatch.context() as patched:
        patched.setattr(ray.train, "get_context", session.get_context)
        patched.setattr(ray.train, "get_checkpoint", session.get_checkpoint)
        patched.setattr(ray.train, "report", session.report)
        patched.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        dino_train_worker({"num_images": num_images, skeleton.CONFIG: to_dict(config), skeleton.RUN_ID: None,
                           skeleton.TRACKING_URI: "", skeleton.STORAGE: str(session.root)})
    return session


def test_a_worker_resumed_from_a_checkpoint_continues_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    from metallo_core.config import from_dict

    data = tmp_path / "fewshot"
    write_fewshot(str(data), num_classes=15, images_per_class=5, size=20)  # train split: 5 classes, 25 images
    config = from_dict(DinoConfig, {
        "data": {"uri": str(data), "base_size": 20, "decode_threads": 1},
        # timm's test_resnet: a few thousand weights, so 9 steps cost little.
        "backbone": {"library": "timm", "arch": "test_resnet", "small_input": False, "image_size": 16},
        "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "multicrop": {"global_size": 16, "local_size": 8, "local_crops": 1, "micrograph": True},
        "optim": {"batch_size_per_worker": 8, "warmup_epochs": 0, "lr": 0.005, "momentum_teacher": 0.9,
                  "freeze_last_layer_epochs": 0},
        "compute": {"num_workers": 1, "torch_threads": 1, "precision": "fp32", "prefetch_batches": 1},
        "knn": {"every_epochs": 0},
        "epochs": 2,
    })
    num_images = 25  # 3 steps per epoch

    straight = run_worker(monkeypatch, config, num_images, FakeTrainSession(tmp_path / "straight"))
    assert [metrics["epoch"] for metrics, _ in straight.reports] == [0, 1]
    epoch_0_checkpoint = straight.reports[0][1]
    assert epoch_0_checkpoint is not None

    resumed = run_worker(monkeypatch, config, num_images,
                         FakeTrainSession(tmp_path / "resumed", resume_from=epoch_0_checkpoint))
    # The resumed worker trains epoch 1 only, from where the checkpoint left off ...
    assert [metrics["epoch"] for metrics, _ in resumed.reports] == [1]
    assert resumed.reports[0][0]["global_step"] == straight.reports[1][0]["global_step"] == 6
    # ... and gets there as the uninterrupted run did: the same losses on the way, the same weights at the end.
    assert resumed.reports[0][0]["epoch_loss"] == straight.reports[1][0]["epoch_loss"]
    straight_state, _ = load_checkpoint(straight.reports[1][1])
    resumed_state, _ = load_checkpoint(resumed.reports[0][1])
    for network in ("teacher", "student"):
        for name, value in straight_state[network].items():
            assert torch.equal(resumed_state[network][name], value), f"{network}.{name}"
    torch.testing.assert_close(resumed_state["center"], straight_state["center"], rtol=0, atol=0)
    # Epoch 1 moved the teacher: the runs agree on trained weights, not on two copies of the checkpoint's.
    epoch_0_state, _ = load_checkpoint(epoch_0_checkpoint)
    assert not all(torch.equal(epoch_0_state["teacher"][name], value) for name, value in
                   straight_state["teacher"].items())
