"""DINO on in-memory images with a k-NN probe after every epoch: the learning curve, free of Ray.

What the learning test and `benchmarks/dino_knn_curve.py` run. The probe is the one the Ray worker
logs (`metallo_core.train.dino`): the teacher backbone in eval mode embeds labelled probe images,
a per-class split of them makes the bank and the queries, and a weighted k-NN (k, T from the config)
classifies the queries. Epoch 0 of the curve is the untrained network, probed the same way.

The untrained network's BatchNorm running statistics are those of initialisation (mean 0, variance 1),
which leaves its features poorly scaled; so the curve also probes the untrained network with statistics
measured on the (unlabelled) training images, a fairer baseline that DINO must beat by learning weights.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metallo_core.ssl.config import DinoConfig
from metallo_core.ssl.knn import knn_accuracy, split_bank_and_queries
from metallo_core.ssl.trainer import DinoTrainer, steps_per_epoch


@dataclass
class CurvePoint:
    epoch: int  # epochs trained; 0 is the untrained network
    knn_accuracy: float
    loss: float | None  # mean training loss of the epoch; None before training
    seconds: float  # wall time since training started


@dataclass
class LearningCurve:
    points: list[CurvePoint] = field(default_factory=list)
    # k-NN accuracy of the untrained network with BatchNorm statistics of the training images
    untrained_calibrated_accuracy: float = float("nan")
    teacher_backbone: nn.Module | None = field(default=None, repr=False)  # the trained teacher's backbone

    @property
    def untrained_accuracy(self) -> float:
        return self.points[0].knn_accuracy

    @property
    def final_accuracy(self) -> float:
        return self.points[-1].knn_accuracy

    @property
    def losses(self) -> list[float]:
        return [point.loss for point in self.points if point.loss is not None]

    def to_dict(self) -> dict:
        return {"untrained_calibrated_accuracy": self.untrained_calibrated_accuracy,
                "points": [asdict(point) for point in self.points]}


@torch.no_grad()
def calibrated_copy(trainer: DinoTrainer, images_uint8: np.ndarray, batch_size: int = 128) -> nn.Module:
    """A copy of the teacher backbone whose BatchNorm statistics are the exact averages over `images_uint8`
    ((N, S, S, 3) uint8, resized to the global crop size and normalised as the probe does); weights unchanged."""
    backbone = copy.deepcopy(trainer.teacher.backbone)
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all batches
    backbone.train()
    spec, size = trainer.config.backbone.spec, trainer.config.multicrop.global_size
    mean = torch.tensor(spec.mean, device=trainer.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=trainer.device).view(1, 3, 1, 1)
    for start in range(0, len(images_uint8), batch_size):
        chunk = torch.from_numpy(images_uint8[start:start + batch_size]).to(trainer.device).permute(0, 3, 1, 2)
        chunk = F.interpolate(chunk.float() / 255.0, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        backbone((chunk - mean) / std)
    return backbone.eval()


def probe_accuracy(trainer: DinoTrainer, images: np.ndarray, labels: np.ndarray, *, seed: int,
                   backbone: nn.Module | None = None) -> float:
    """k-NN accuracy of the teacher's backbone features (or `backbone`'s) on (N, S, S, 3) uint8 labelled images."""
    config = trainer.config
    labels_tensor = torch.as_tensor(labels, dtype=torch.long)
    bank, queries = split_bank_and_queries(labels_tensor, config.knn.query_fraction, seed=seed)
    features = trainer.embed(images, backbone=backbone).cpu()
    return knn_accuracy(features[bank], labels_tensor[bank], features[queries], labels_tensor[queries],
                        int(labels_tensor.max()) + 1, k=config.knn.k, temperature=config.knn.temperature)


def dino_learning_curve(
    config: DinoConfig,
    train_images: np.ndarray,
    probe_images: np.ndarray,
    probe_labels: np.ndarray,
    *,
    probe_every: int = 1,
    device: torch.device | str = "cpu",
    on_point=None,
) -> LearningCurve:
    """Pretrain `config.epochs` epochs on `train_images` ((N, B, B, 3) uint8 at config.base_size) and
    probe on `probe_images` ((M, G, G, 3) uint8 at the global crop size) every `probe_every` epochs.

    Batches are drawn without replacement each epoch (drop_last), shuffled by `config.seed`, as in the
    Ray worker. `on_point(point)` is called after each probe (the benchmark prints from it).
    """
    device = torch.device(device)
    base = config.base_size
    if train_images.shape[1:] != (base, base, 3):
        raise ValueError(f"train images must be (N, {base}, {base}, 3) uint8 (config.base_size), "
                         f"got {train_images.shape}")
    size = config.multicrop.global_size
    if probe_images.shape[1:] != (size, size, 3):
        raise ValueError(f"probe images must be (M, {size}, {size}, 3) uint8 (multicrop.global_size), "
                         f"got {probe_images.shape}")
    batch = config.optim.batch_size_per_worker
    steps = steps_per_epoch(len(train_images), batch, 1)
    trainer = DinoTrainer(config, steps_per_epoch=steps, world_size=1, rank=0, device=device)
    order_generator = torch.Generator().manual_seed(config.seed)
    data = torch.from_numpy(train_images)
    curve = LearningCurve()
    started = time.perf_counter()

    def record(epoch: int, loss: float | None) -> None:
        point = CurvePoint(epoch, probe_accuracy(trainer, probe_images, probe_labels, seed=config.seed), loss,
                           time.perf_counter() - started)
        curve.points.append(point)
        if on_point is not None:
            on_point(point)

    curve.untrained_calibrated_accuracy = probe_accuracy(
        trainer, probe_images, probe_labels, seed=config.seed, backbone=calibrated_copy(trainer, train_images))
    record(0, None)
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=order_generator)
        losses = [
            trainer.train_step(data[order[index * batch:(index + 1) * batch]], epoch * steps + index, epoch)["loss"]
            for index in range(steps)
        ]
        if (epoch + 1) % probe_every == 0 or epoch == config.epochs - 1:
            record(epoch + 1, float(np.mean(losses)))
    curve.teacher_backbone = trainer.teacher.backbone
    return curve
