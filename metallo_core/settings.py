"""Settings every training stage shares: compute resources, run storage and checkpoints, the registry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from metallo_core.config import require
from metallo_core.user_paths import PathSetting


@dataclass
class ComputeSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # auto: bf16 wherever the device computes it natively (GPUs; CPUs with AVX512-BF16/AMX), fp32 on CPUs
    # that would emulate it (far slower there than fp32): see precision.py.
    # fp16 uses a gradient scaler (GPU only).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    torch_threads: int = 0  # 0: as many as the worker's CPUs
    prefetch_batches: int = 4
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local cluster

    def validate(self) -> None:
        require(self.num_workers >= 1, f"compute.num_workers must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "compute.cpus_per_worker must be positive")
        require(not (self.precision == "fp16" and not self.use_gpu),
                "compute.precision fp16 needs a GPU (use_gpu: true); use auto, bf16 or fp32 on CPU")


@dataclass
class RunSettings:
    name: str = "run"  # a rerun with the same name resumes from the latest checkpoint
    experiment: str = "metallo"
    storage: PathSetting = ""  # checkpoints: local directory or s3://bucket/prefix; "" is $METALLO_HOME/ray
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    log_every_steps: int = 10

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name,
                f"run.name must be a non-empty name without '/', got {self.name!r}")
        require(self.checkpoint_every_epochs >= 1, "run.checkpoint_every_epochs must be >= 1")
        require(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        require(self.max_failures >= 0, "run.max_failures must be >= 0")


@dataclass
class RegistrySettings:
    name: str = "metallo-backbone"
    # Set on the new version only when the run succeeded; the next stage finds it as models:/<name>@<alias>.
    # ("latest" and "v<N>" are reserved by MLflow.)
    alias: str = "current"
    register: bool = True

    def validate(self) -> None:
        require(bool(self.name), "registry.name must not be empty")
        require(self.alias == "" or re.fullmatch(r"[A-Za-z0-9_-]+", self.alias) is not None,
                f"registry.alias must be letters, digits, '-' or '_', got {self.alias!r}")
        require(self.alias.lower() != "latest" and re.fullmatch(r"[vV]\d+", self.alias) is None,
                f"registry.alias {self.alias!r} is reserved by MLflow; pick another (e.g. current, champion)")


@dataclass
class GateSettings:
    """Whether a stage's output replaces its baseline at the registry alias: both are scored on the same fixed
    labelled selection tasks (cosine ProtoNet, paired per task), and the alias moves only if the lower end
    of the paired gain's 95% interval is above min_gain. The new version is registered either way."""

    # A labelled shard dataset holding the selection tasks; "" turns the gate off (the alias always moves).
    uri: str = ""
    split: str = "val"  # held apart from what the stage trains on
    way: int = 5
    shot: int = 1
    query: int = 15
    tasks: int = 100
    seed: int = 0
    # alias: the model at registry.name@registry.alias (the stage's starting weights while there is none);
    # input: the stage's starting weights (backbone.source).
    # A scratch start has no baseline: the output is kept.
    baseline: Literal["alias", "input"] = "alias"
    min_gain: float = 0.0  # a fraction of accuracy: 0.01 asks for one point
    force: bool = False  # move the alias even when the stage did not help (metallo pretrain/metatrain --force)

    @property
    def enabled(self) -> bool:
        return bool(self.uri)

    def validate(self) -> None:
        require(self.way >= 2, f"gate.way must be >= 2, got {self.way}")
        require(self.shot >= 1, f"gate.shot must be >= 1, got {self.shot}")
        require(self.query >= 1, f"gate.query must be >= 1, got {self.query}")
        require(self.tasks >= 2, f"gate.tasks must be >= 2 (a 95% interval needs them), got {self.tasks}")
        require(-1 < self.min_gain < 1, f"gate.min_gain is a fraction of accuracy in (-1, 1), got {self.min_gain}")
        require(bool(self.split), "gate.split must name a split of gate.uri")
