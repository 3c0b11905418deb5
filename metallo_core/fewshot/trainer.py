"""One ProtoNet meta-training process: the model, its optimiser and schedule, the episodic training step and the
scoring of fixed meta-validation tasks.

Device-agnostic and free of Ray and MLflow, like `ssl/trainer.py`'s `DinoTrainer`: the Ray Train worker
(`train/metatrain.py`) and the fast tests drive the same `ProtoNetTrainer`. Under torch.distributed the model is
wrapped in DDP (each rank trains on its own episode; gradients are averaged) and the validation accuracies of all
ranks are gathered, so every rank sees the same mean.

Source: Snell et al. 2017 (Prototypical Networks), with the cosine classifier and episodic fine-tuning of the
backbone of Hu et al. 2022 (P>M>F), seed 000.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from metallo_core.data import tensor_augment
from metallo_core.data.class_index import ClassIndexedImages
from metallo_core.errors import TrainingDiverged
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.fewshot.episodes import Episode, EpisodeSampler
from metallo_core.fewshot.metrics import mean_and_ci95
from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
from metallo_core.models.backbones import BackboneSpec
from metallo_core.precision import autocast, resolve_precision
from metallo_core.seeding import reseed
from metallo_core.ssl.schedules import cosine_schedule


@dataclass
class EpisodeBatch:
    """One task on the device: support (S, 3, H, W) and query (Q, 3, H, W) images, normalised for the
    backbone; labels (S,) and (Q,) in 0..way-1."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    way: int


def build_meta_optimizer(config: MetaTrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov, as P>M>F), Adam or AdamW over all of `model`'s parameters (backbone and logit scale)."""
    settings = config.optim
    if settings.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=True)
    if settings.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


class ProtoNetTrainer:
    """Episodic meta-training of a ProtoNet on one process (one episode per step per rank).

    Args:
        config: the stage's settings (episodes, optimiser, schedule, BN mode, augmentation, precision).
        backbone: the starting backbone (any `nn.Module` mapping (B, 3, H, W) to (B, D) features).
        spec: its `BackboneSpec` (the input normalisation is taken from it).
        steps_per_epoch: optimiser steps per epoch on this rank (episodes_per_epoch // world_size).
        world_size, rank: the torch.distributed group (1, 0 without one).
        device: where the model runs.
    """

    def __init__(self, config: MetaTrainConfig, backbone: nn.Module, spec: BackboneSpec, *, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0, device: torch.device | None = None) -> None:
        self.config = config
        self.spec = spec
        self.device = device or torch.device("cpu")
        self.steps_per_epoch = steps_per_epoch
        self.world_size, self.rank = world_size, rank
        self.distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        memory_format = torch.channels_last if config.compute.channels_last else torch.contiguous_format
        # torch's stubs omit Module.to's memory_format keyword, which it accepts.
        self.model = ProtoNet(backbone, distance=config.distance, cosine_scale=config.cosine_scale_init).to(
            self.device, memory_format=memory_format)  # type: ignore[call-overload]
        self.trained: nn.Module = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.distributed else self.model)
        self.normalize = ImageNormalizer(spec.mean, spec.std, device=self.device,
                                         channels_last=config.compute.channels_last)
        self.optimizer = build_meta_optimizer(config, self.model)
        self.schedule = cosine_schedule(config.optim.lr, config.optim.min_lr, config.epochs, steps_per_epoch,
                                        warmup_epochs=config.optim.warmup_epochs)
        self.precision = resolve_precision(config.compute.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        # Augmentation and episode draws differ per rank; both are drawn afresh every epoch from (seed, rank,
        # epoch), so a resumed run draws what the uninterrupted one would, on every rank.
        self.generator = reseed(torch.Generator(), config.seed, rank, 0)
        self.best_val_accuracy, self.best_epoch = -1.0, -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def autocast(self):
        return autocast(self.device, self.precision)

    def episode_batch(self, images: ClassIndexedImages, episode: Episode, *, augment: bool) -> EpisodeBatch:
        """The episode's images as normalised tensors on the device; flips and quarter turns when `augment`."""
        def tensor(rows: np.ndarray) -> torch.Tensor:
            return tensor_augment.to_float(torch.from_numpy(images.images[rows]).to(self.device).permute(0, 3, 1, 2))

        support, query = tensor(episode.support), tensor(episode.query)
        if augment:
            p = self.config.augment_p
            support = tensor_augment.random_flip_rot90(support, p, p, p, generator=self.generator)
            query = tensor_augment.random_flip_rot90(query, p, p, p, generator=self.generator)
        return EpisodeBatch(self.normalize.normalize(support), torch.tensor(episode.support_labels, device=self.device),
                            self.normalize.normalize(query), torch.tensor(episode.query_labels, device=self.device),
                            len(episode.classes))

    def train_step(self, batch: EpisodeBatch, step: int) -> dict[str, float]:
        """One optimiser step on one episode at the scheduled learning rate of global `step`.

        Returns {"loss": cross-entropy of the query logits, "accuracy": query accuracy in [0, 1], "lr"}.
        Raises FloatingPointError on a non-finite loss (a diverging run stops, named, instead of training on NaN).
        """
        lr = float(self.schedule[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            logits = self.trained(batch.support, batch.support_labels, batch.query, batch.way)
        loss = F.cross_entropy(logits.float(), batch.query_labels)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"meta-training loss is {loss.item()} at step {step}; lower optim.lr or "
                                     "check the data")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        accuracy = (logits.argmax(1) == batch.query_labels).float().mean().item()
        return {"loss": loss.item(), "accuracy": accuracy, "lr": lr}

    def train_epoch(self, images: ClassIndexedImages, epoch: int,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """`steps_per_epoch` episodes drawn from `images` (seeded by seed, rank and epoch, so a resumed epoch
        redraws the same tasks). `on_step(step, metrics)` sees every step. Returns the epoch's mean train_loss
        and train_accuracy and the episodes/s of all ranks together."""
        episodes = self.config.episodes
        sampler = EpisodeSampler(images.indices_by_class, episodes.way, episodes.shot, episodes.query,
                                 seed=self.config.seed, rank=self.rank, epoch=epoch, cap_query=episodes.cap_query)
        reseed(self.generator, self.config.seed, self.rank, epoch)
        self.model.train(self.config.bn_mode == "train")
        losses, accuracies, started = [], [], time.perf_counter()
        for index in range(self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + index
            metrics = self.train_step(self.episode_batch(images, sampler.sample(), augment=self.config.augment), step)
            losses.append(metrics["loss"])
            accuracies.append(metrics["accuracy"])
            if on_step is not None:
                on_step(step, metrics)
        return {
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accuracies)),
            "episodes_per_s": self.steps_per_epoch * self.world_size / (time.perf_counter() - started),
        }

    @torch.no_grad()
    def validate(self, images: ClassIndexedImages, episodes: Sequence[Episode]) -> tuple[float, float]:
        """Mean query accuracy over the fixed `episodes` and its 95% half-interval (eval mode, no augmentation).

        Each rank scores every world_size-th task; the per-task accuracies of all ranks are gathered, so all
        ranks return the same figures."""
        self.model.eval()
        own = []
        for episode in episodes[self.rank::self.world_size]:
            batch = self.episode_batch(images, episode, augment=False)
            with self.autocast():
                logits = self.model(batch.support, batch.support_labels, batch.query, batch.way)
            own.append((logits.argmax(1) == batch.query_labels).float().mean().item())
        per_task = own
        if self.distributed:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, own)
            per_task = [value for part in gathered for value in part]
        return mean_and_ci95(per_task)

    def note_validation(self, val_accuracy: float, epoch: int) -> bool:
        """Keep a CPU copy of the weights when `val_accuracy` is the best so far; True when it is."""
        if val_accuracy <= self.best_val_accuracy:
            return False
        self.best_val_accuracy, self.best_epoch = val_accuracy, epoch
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return True

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "best": self.best_state,
        }

    def load_state_dict(self, state: dict, *, best_val_accuracy: float, best_epoch: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best_state = state["best"]
        self.best_val_accuracy, self.best_epoch = best_val_accuracy, best_epoch
