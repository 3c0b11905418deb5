"""One DINO training process: student and teacher networks, the optimiser, and the training step.

Device-agnostic and free of Ray: a Ray Train worker, the throughput benchmark and the tests all drive
the same `DinoTrainer`. Under torch.distributed the student is wrapped in DDP, the teacher is not
(it gets no gradients), and on CUDA both use SyncBatchNorm.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from metallo_core.errors import TrainingDiverged
from metallo_core.models.backbones import build_backbone, convert_sync_batchnorm
from metallo_core.models.sources import RegisteredBackboneLoader, backbone_from_source
from metallo_core.precision import autocast, resolve_precision
from metallo_core.seeding import reseed
from metallo_core.ssl.config import DinoConfig
from metallo_core.ssl.ema import update_teacher
from metallo_core.ssl.head import DINOHead
from metallo_core.ssl.health import teacher_output_stats
from metallo_core.ssl.loss import TeacherCenter, dino_loss
from metallo_core.ssl.multicrop import MultiCropAugment
from metallo_core.ssl.optim import build_optimizer, clip_gradients, parameter_groups
from metallo_core.ssl.schedules import DinoSchedules, dino_schedules, short_run_warnings


class MultiCropNetwork(nn.Module):
    """Backbone + head. The backbone runs once per crop resolution (BatchNorm statistics stay per
    resolution, as in DINO); the head runs once on all features."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        features = torch.cat([self.backbone(v) for v in views if v.shape[0] > 0])
        return self.head(features)


def build_network(config: DinoConfig) -> MultiCropNetwork:
    head = DINOHead(
        config.backbone.spec.feature_dim,
        config.head.out_dim,
        hidden_dim=config.head.hidden_dim,
        bottleneck_dim=config.head.bottleneck_dim,
        use_bn=config.head.use_bn,
        norm_last_layer=config.head.norm_last_layer,
    )
    return MultiCropNetwork(build_backbone(config.backbone.spec), head)


def hold_batchnorm_in_eval(*networks: nn.Module) -> None:
    """Put every BatchNorm layer of `networks` in eval mode: forward passes normalise with the running
    statistics and leave them unchanged; the affine weight and bias still receive gradients."""
    for network in networks:
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def steps_per_epoch(num_images: int, batch_size_per_worker: int, world_size: int) -> int:
    """Steps every worker takes per epoch: its equal share of the split, in whole batches (drop_last)."""
    steps = (num_images // world_size) // batch_size_per_worker
    if steps < 1:
        raise ValueError(
            f"the split has {num_images} images, fewer than one batch of {batch_size_per_worker} per worker "
            f"on {world_size} worker(s); lower optim.batch_size_per_worker or compute.num_workers"
        )
    return steps


class DinoTrainer:
    def __init__(self, config: DinoConfig, *, steps_per_epoch: int, world_size: int, rank: int,
                 device: torch.device, load_registered: RegisteredBackboneLoader | None = None):
        self.config = config
        self.device = device
        self.steps_per_epoch = steps_per_epoch
        self.distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        self.channels_last = config.compute.channels_last
        precision = resolve_precision(config.compute.precision, device)
        self.autocast = lambda: autocast(device, precision)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        student = build_network(config)
        if config.pretrained_start:
            # The teacher copies the student below: both start from the same pretrained weights.
            # A registry source (models:/...) needs the caller's registry loader: this package knows no MLflow.
            pretrained, _ = backbone_from_source(config.backbone.source, config.backbone.spec, load_registered)
            student.backbone.load_state_dict(pretrained.state_dict())
        teacher = build_network(config)
        if self.distributed and device.type == "cuda":
            # Ray's prepare_model does not convert BatchNorm; DINO needs statistics over the global batch.
            student = convert_sync_batchnorm(student, config.backbone.spec)  # keeps timm's BatchNormAct activations
            teacher = convert_sync_batchnorm(teacher, config.backbone.spec)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        student = student.to(device, memory_format=memory_format)
        teacher = teacher.to(device, memory_format=memory_format)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        self.student_module = student
        self.teacher = teacher
        self.student = (
            nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
            if self.distributed else student
        )
        self.center = TeacherCenter(config.head.out_dim, config.loss.center_momentum).to(device)
        self.optimizer = build_optimizer(config.optim.name, parameter_groups(student), config.optim.sgd_momentum)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.schedules: DinoSchedules = dino_schedules(
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            total_batch_size=config.optim.batch_size_per_worker * world_size,
            base_lr=config.optim.lr,
            min_lr=config.optim.min_lr,
            warmup_epochs=config.optim.warmup_epochs,
            weight_decay=config.optim.weight_decay,
            weight_decay_end=config.optim.weight_decay_end,
            momentum_teacher=config.optim.momentum_teacher,
            teacher_temperature=config.loss.teacher_temperature,
            warmup_teacher_temperature=config.loss.warmup_teacher_temperature,
            warmup_teacher_temperature_epochs=config.loss.warmup_teacher_temperature_epochs,
        )
        for message in short_run_warnings(
            self.schedules, epochs=config.epochs, warmup_epochs=config.optim.warmup_epochs,
            warmup_teacher_temperature_epochs=config.loss.warmup_teacher_temperature_epochs,
            pretrained_start=config.pretrained_start,
        ):
            warnings.warn(f"DINO schedules: {message}", stacklevel=2)
        self.augment = MultiCropAugment(config.multicrop)
        # Augmentation randomness differs per rank (different images) and is drawn afresh at every step from
        # (seed, rank, step): a resumed run augments as the uninterrupted one would, on every rank.
        self.rank = rank
        self.generator = torch.Generator()
        self.last_metrics: dict[str, float] = {}

    def train_step(self, base_images: torch.Tensor, step: int, epoch: int, *,
                   with_health: bool = False) -> dict[str, float]:
        """One optimisation step on a batch of uint8 base images, (B, S, S, 3) or (B, 3, S, S)."""
        scheduled = self.schedules.at(step)
        if self.config.freezes_backbone_batchnorm:  # again every step: probes and workers toggle train/eval
            hold_batchnorm_in_eval(self.student_module.backbone, self.teacher.backbone)
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = scheduled["lr"]
            if index == 0:  # only the regularised group decays
                group["weight_decay"] = scheduled["weight_decay"]
        images = base_images.to(self.device, non_blocking=True)
        if images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: already channels-last
        with torch.no_grad():
            global_views, local_views = self.augment(images, reseed(self.generator, self.config.seed, self.rank, step))
        if self.channels_last:
            global_views = global_views.contiguous(memory_format=torch.channels_last)
            local_views = local_views.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher([global_views])
            student_output = self.student([global_views, local_views])
        loss = dino_loss(
            student_output,
            teacher_output,
            self.center.center,
            student_temperature=self.config.loss.student_temperature,
            teacher_temperature=scheduled["teacher_temperature"],
        )
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(
                f"DINO loss is {loss.item()} at step {step} (epoch {epoch}); last metrics: {self.last_metrics}. "
                "Lower optim.lr, use compute.precision bf16 or fp32 instead of fp16, or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = clip_gradients(self.student_module.parameters(), self.config.optim.clip_grad,
                                   self.config.optim.clip_mode)
        if epoch < self.config.optim.freeze_last_layer_epochs:
            self.student_module.head.cancel_last_layer_gradients()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        update_teacher(self.student_module, self.teacher, scheduled["teacher_momentum"])
        self.center.update(teacher_output)
        metrics = {"loss": loss.item(), "grad_norm": grad_norm, **scheduled}
        if with_health:
            metrics.update(teacher_output_stats(teacher_output, self.center.center, scheduled["teacher_temperature"]))
        self.last_metrics = metrics
        return metrics

    def teacher_backbone(self) -> nn.Module:
        return self.teacher.backbone

    @torch.no_grad()
    def embed(self, images_uint8: np.ndarray, batch_size: int = 128, backbone: nn.Module | None = None) -> torch.Tensor:
        """Teacher backbone features (eval mode) of (N, S, S, 3) uint8 images, for the k-NN probe.

        `backbone` embeds with another network of the same spec instead (the learning curve's untrained baseline).
        """
        backbone = self.teacher.backbone if backbone is None else backbone
        was_training = backbone.training
        backbone.eval()
        spec = self.config.backbone.spec
        mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        features = []
        for start in range(0, len(images_uint8), batch_size):
            chunk = torch.from_numpy(images_uint8[start:start + batch_size]).to(self.device).permute(0, 3, 1, 2)
            chunk = (chunk.float() / 255.0 - mean) / std
            with self.autocast():
                features.append(backbone(chunk).float())
        backbone.train(was_training)
        return torch.cat(features)

    def state_dict(self) -> dict:
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "center": self.center.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.center.load_state_dict(state["center"])
