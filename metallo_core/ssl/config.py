"""Typed configuration of a DINO pretraining run (loaded from configs/pretrain/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from metallo_core.config import Renamed, require
from metallo_core.models.backbone_choice import BackboneChoice
from metallo_core.models.sources import is_offline_source, offline_imagenet_spec
from metallo_core.settings import ComputeSettings, GateSettings, RegistrySettings, RunSettings
from metallo_core.ssl.multicrop import MultiCropConfig
from metallo_core.user_paths import PathSetting


@dataclass
class DinoData:
    uri: PathSetting = ""  # dataset URI: local directory or s3://bucket/prefix
    split: str = "train"
    # Images are decoded to base_size x base_size (shorter side resized, centre crop) on CPU workers;
    # crops are then cut from that. 0 means global_size * 8/7 (256 for 224-px global crops).
    base_size: int = 0
    # stream: every Train worker reads its own contiguous share of the split's Parquet row groups and
    # decodes it in threads of its own process (on its GPU with nvJPEG when it has one): no object-store
    # copies, no task scheduling (benchmarks/read_throughput.py compares the readers). The worker's
    # cpus_per_worker must then cover the decoding.
    # ray_data: shards are decoded by Ray Data tasks on any CPU of the cluster, for workers whose own
    # CPUs cannot keep up with their GPU (CPU-only nodes then join the decoding).
    reader: Literal["stream", "ray_data"] = "stream"
    decode_threads: int = 0  # stream only: decoding threads per worker; 0 is the worker's CPUs (at least 1)

    def validate(self) -> None:
        require(bool(self.uri), "data.uri is required: the dataset to pretrain on (a directory or s3://bucket/prefix)")
        require(self.base_size == 0 or self.base_size >= 16, f"data.base_size must be 0 or >= 16, got {self.base_size}")
        require(self.decode_threads >= 0, f"data.decode_threads must be >= 0, got {self.decode_threads}")


@dataclass
class DinoHeadSettings:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn: bool = False
    norm_last_layer: bool = True

    def validate(self) -> None:
        require(self.out_dim >= 2, f"head.out_dim must be >= 2, got {self.out_dim}")


@dataclass
class DinoLossSettings:
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: float = 0
    center_momentum: float = 0.9

    def validate(self) -> None:
        require(0 < self.teacher_temperature <= 0.1,
                f"loss.teacher_temperature must be in (0, 0.1] (DINO is unstable above 0.07), "
                f"got {self.teacher_temperature}")
        require(0 < self.student_temperature, "loss.student_temperature must be positive")
        require(0 <= self.center_momentum < 1, "loss.center_momentum must be in [0, 1)")


@dataclass
class DinoOptimSettings:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    batch_size_per_worker: int = 64
    lr: float = 0.0005  # at a total batch of 256; scaled linearly with the total batch
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    sgd_momentum: float = 0.9
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0  # 0 disables clipping
    # DINO clips each parameter's gradient norm separately; "global" clips the norm of all of them.
    clip_mode: Literal["per_parameter", "global"] = "per_parameter"
    freeze_last_layer_epochs: int = 1

    def validate(self) -> None:
        require(self.batch_size_per_worker >= 2, "optim.batch_size_per_worker must be >= 2")
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(0 < self.momentum_teacher <= 1, "optim.momentum_teacher must be in (0, 1]")
        require(self.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 disables clipping)")


@dataclass
class KnnProbeSettings:
    every_epochs: int = 0  # 0 disables the probe
    uri: PathSetting | None = None  # labelled dataset; None means data.uri
    split: str = "val"
    k: int = 20
    temperature: float = 0.07
    query_fraction: float = 0.5  # per class, the rest is the bank
    max_images: int = 2000

    def validate(self) -> None:
        require(self.every_epochs >= 0, "knn.every_epochs must be >= 0")
        require(0 < self.query_fraction < 1, "knn.query_fraction must be in (0, 1)")
        require(self.k >= 1, "knn.k must be >= 1")


@dataclass
class DebugSettings:
    # Tests kill a worker process once at this global step to prove that training resumes (-1: never).
    fail_at_step: int = -1
    fail_rank: int = 0
    # Ray Train V2 commits a reported checkpoint when its controller next polls the workers (every 2 s by
    # default); a crash inside that window loses it, and the retry starts from the one before. The
    # injected crash first waits (at most this long) until the run's checkpoint snapshot names the last
    # checkpoint before it (metallo_core/train/checkpoint_commit.py), so it tests resuming, not that window.
    commit_timeout_s: float = 300.0


@dataclass
class DinoConfig:
    # The older spelling of backbone.source, read for one release.
    RENAMED_SETTINGS: ClassVar[tuple[Renamed, ...]] = (Renamed("init_weights", "backbone.source"),)

    data: DinoData = field(default_factory=DinoData)
    # The network student and teacher share, and where both start (the same weights): backbone.source is
    # scratch (random init) or any source of metallo_core.models.sources: imagenet-offline, a weights file
    # (torchvision, timm or DINO checkpoint: /path/w.pth, file:/path/checkpoint.pth#student), download[:tag]
    # (explicit opt-in), models:/metallo-backbone@alias. The architecture fields must describe that network
    # (checked before training).
    backbone: BackboneChoice = field(default_factory=BackboneChoice)
    head: DinoHeadSettings = field(default_factory=DinoHeadSettings)
    loss: DinoLossSettings = field(default_factory=DinoLossSettings)
    optim: DinoOptimSettings = field(default_factory=DinoOptimSettings)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)
    knn: KnnProbeSettings = field(default_factory=KnnProbeSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    run: RunSettings = field(default_factory=lambda: RunSettings(name="dino", experiment="metallo-pretrain"))
    registry: RegistrySettings = field(default_factory=lambda: RegistrySettings(name="metallo-backbone"))
    # Scores the new backbone against its baseline on held-apart labelled tasks before the alias moves.
    gate: GateSettings = field(default_factory=GateSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)
    epochs: int = 100
    seed: int = 0
    # BatchNorm of the student's and the teacher's backbones while training. "batch": train mode, as in DINO
    # (batch statistics, running statistics re-estimated on the augmented crops). "frozen": eval mode, the
    # running statistics of `backbone.source` are used and kept (the affine weights still train). "auto": frozen
    # when starting from pretrained weights, batch from scratch. Why: continuing DINO from the ImageNet
    # EfficientNet-Lite0 on X-SDD with batch statistics cost ProtoNet 9.8 points at 5-way 1-shot, with them
    # frozen +0.2 (README, *Benchmarks*): re-estimated statistics of crops do not match whole images.
    backbone_batchnorm: Literal["auto", "batch", "frozen"] = "auto"

    @property
    def base_size(self) -> int:
        return self.data.base_size or round(self.multicrop.global_size * 8 / 7)

    @property
    def pretrained_start(self) -> bool:
        """Whether student and teacher start from pretrained weights (backbone.source is not scratch)."""
        return self.backbone.pretrained

    @property
    def freezes_backbone_batchnorm(self) -> bool:
        """Whether backbone_batchnorm, resolved ("auto"), holds the backbones' BatchNorm in eval mode."""
        if self.backbone_batchnorm == "auto":
            return self.pretrained_start
        return self.backbone_batchnorm == "frozen"

    def validate(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.backbone.image_size == self.multicrop.global_size,
                f"backbone.image_size ({self.backbone.image_size}) must equal multicrop.global_size "
                f"({self.multicrop.global_size}): the backbone is registered for the size it was trained at")
        require(self.base_size >= self.multicrop.global_size,
                f"data.base_size ({self.base_size}) must be >= multicrop.global_size ({self.multicrop.global_size})")
        require(tuple(self.multicrop.mean) == tuple(self.backbone.mean) and
                tuple(self.multicrop.std) == tuple(self.backbone.std),
                f"multicrop.mean/std ({self.multicrop.mean}, {self.multicrop.std}) must equal backbone.mean/std "
                f"({self.backbone.mean}, {self.backbone.std}): views are normalised the way the backbone expects")
        if is_offline_source(self.backbone.source):
            offline = offline_imagenet_spec(self.backbone.image_size, self.backbone.source)
            require((self.backbone.library, self.backbone.arch, tuple(self.backbone.mean), tuple(self.backbone.std))
                    == (offline.library, offline.arch, offline.mean, offline.std),
                    f"backbone.source {self.backbone.source} is a {offline.library} {offline.arch} with mean/std "
                    f"{offline.mean}/{offline.std}: set backbone.library, backbone.arch, backbone.mean, backbone.std "
                    "(and multicrop.mean/std) to those")
        require(self.optim.freeze_last_layer_epochs < self.epochs or self.epochs == 1,
                "optim.freeze_last_layer_epochs must be smaller than epochs, or the head's last layer never trains")
