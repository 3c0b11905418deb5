"""Typed configuration of ProtoNet meta-training and of meta-testing (configs/metatrain, configs/evaluate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from metallo_core.config import Renamed, require
from metallo_core.fewshot.finetune import FinetuneSettings, MetaTestMode
from metallo_core.fewshot.inference import InferenceSettings
from metallo_core.models.backbone_choice import SPEC_SECTION_RENAMED, BackboneChoice
from metallo_core.settings import ComputeSettings, GateSettings, RegistrySettings, RunSettings
from metallo_core.user_paths import PathSetting


@dataclass
class EpisodeSettings:
    way: int = 5
    shot: int = 1
    query: int = 15
    # Small sets (MEM-25 has ~13 images per class) cannot give 15 queries per class: cap Q instead of failing.
    cap_query: bool = False

    def validate(self) -> None:
        require(self.way >= 2, f"episodes.way must be >= 2, got {self.way}")
        require(self.shot >= 1, f"episodes.shot must be >= 1, got {self.shot}")
        require(self.query >= 1, f"episodes.query must be >= 1, got {self.query}")


@dataclass
class FewShotData:
    uri: PathSetting = ""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # 0: the backbone's own input size (from its spec); otherwise images are decoded at this size.
    image_size: int = 0

    def validate(self) -> None:
        require(bool(self.uri), "data.uri is required: the few-shot dataset (a directory or s3://bucket/prefix)")


@dataclass
class MetaOptimSettings:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0005
    warmup_epochs: float = 0

    def validate(self) -> None:
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")


@dataclass
class MetaTrainConfig:
    # The older spelling of the architecture (backbone.spec.*), read for one release.
    RENAMED_SETTINGS: ClassVar[tuple[Renamed, ...]] = (SPEC_SECTION_RENAMED,)

    data: FewShotData = field(default_factory=FewShotData)
    # Where meta-training starts: backbone.source is any source of metallo_core.models.sources (scratch,
    # imagenet-offline, a weights file, download[:tag], models:/metallo-backbone@current); the architecture
    # fields serve scratch, file and download sources; imagenet-offline and registry models bring their own
    # (then data.image_size: 0 runs them at their own size).
    backbone: BackboneChoice = field(default_factory=BackboneChoice)
    episodes: EpisodeSettings = field(default_factory=lambda: EpisodeSettings(way=5, shot=5, query=15))
    episodes_per_epoch: int = 100  # across all workers; each worker takes one episode per step (DDP)
    val_episodes: int = 30  # fixed, serialised meta-validation tasks, scored after every epoch
    val_shot: int = 0  # 0: the training shot
    val_way: int = 0  # 0: the training way (a search over the training way pins it, so trials stay comparable)
    distance: Literal["cosine", "euclidean"] = "cosine"
    cosine_scale_init: float = 10.0  # the learnable logit scale's start (P>M>F: 10); searched by tuning/
    # Explicit on purpose: "train" updates BatchNorm statistics per episode; "eval" freezes them (P>M>F).
    bn_mode: Literal["train", "eval"] = "train"
    augment: bool = True  # flips and quarter turns of episode images (valid symmetries of micrographs)
    augment_p: float = 0.5  # augmentation strength: the chance of each flip and of a quarter turn per image
    optim: MetaOptimSettings = field(default_factory=MetaOptimSettings)
    epochs: int = 20
    seed: int = 0
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    run: RunSettings = field(default_factory=lambda: RunSettings(name="protonet", experiment="metallo-metatrain"))
    registry: RegistrySettings = field(default_factory=lambda: RegistrySettings(name="metallo-protonet"))
    # Scores the meta-trained backbone against its baseline on held-apart labelled tasks before the alias moves.
    gate: GateSettings = field(default_factory=GateSettings)

    def validate(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.episodes_per_epoch >= self.compute.num_workers,
                "episodes_per_epoch must be >= compute.num_workers (one episode per worker per step)")
        require(self.val_episodes >= 1, "val_episodes must be >= 1")
        require(0 <= self.augment_p <= 1, f"augment_p must be in [0, 1], got {self.augment_p}")
        require(self.cosine_scale_init > 0, f"cosine_scale_init must be positive, got {self.cosine_scale_init}")


@dataclass
class EvaluateConfig:
    model: str = ""  # models:/metallo-protonet@current, models:/name/3, runs:/<id>/protonet
    data: FewShotData = field(default_factory=FewShotData)
    split: str = "test"
    episodes: EpisodeSettings = field(default_factory=EpisodeSettings)
    tasks: int = 600  # 100 to match seed 000
    modes: list[MetaTestMode] = field(default_factory=lambda: ["protonet", "finetune"])
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    # Fine-tuning lr and steps are picked on meta-validation tasks, never on test tasks.
    select_on_val: bool = False
    # lr 0 is plain ProtoNet (P>M>F's lr search has it too): fine-tuning has to beat it on meta-val to be used.
    select_lrs: list[float] = field(default_factory=lambda: [0.0, 1e-4, 5e-4, 1e-3, 5e-3])
    select_steps: list[int] = field(default_factory=lambda: [])  # empty: keep finetune.steps
    select_tasks: int = 50
    # How features become query logits (fewshot.inference): used as given, or, with select_on_val, the best of
    # `inference` and `select_inference` on the same meta-validation tasks (each candidate on every lr's
    # adapted features). Plain ProtoNet (every lever off) is always the gate's baseline.
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    select_inference: list[InferenceSettings] = field(default_factory=list)
    seed: int = 0
    parallelism: int = 2  # Ray actors scoring tasks in parallel
    gpus_per_actor: float = 0.0  # fractional GPUs (e.g. 0.25) when the cluster has GPUs
    cpus_per_actor: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: see metallo_core/precision.py
    experiment: str = "metallo-evaluate"
    run_name: str = ""
    ray_address: str | None = None

    def validate(self) -> None:
        require(bool(self.model), "model is required: a model URI such as models:/metallo-protonet@current")
        require(self.tasks >= 1, "tasks must be >= 1")
        require(bool(self.modes), "modes must name at least one of protonet, finetune, finetune_autolr")
        require(self.parallelism >= 1, "parallelism must be >= 1")
        require(self.select_tasks >= 1, "select_tasks must be >= 1")
        for candidate in [self.inference, *self.select_inference]:
            candidate.validate()
