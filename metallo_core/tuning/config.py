"""Typed configuration of the Ray Tune searches (tuning/configs/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from metallo_core.config import require, to_dict
from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
from metallo_core.tuning.space import check_point, validate_space
from metallo_core.user_paths import OutputPathSetting, PathSetting


@dataclass
class AshaSettings:
    """Asynchronous successive halving: at each rung (grace_period * reduction_factor^k on the time axis)
    a trial goes on only if it is in the top 1/reduction_factor of the trials that reached the rung."""

    grace_period: int = 1
    reduction_factor: int = 2

    def validate(self) -> None:
        require(self.grace_period >= 1, "search.asha.grace_period must be >= 1")
        require(self.reduction_factor >= 2, "search.asha.reduction_factor must be >= 2")


@dataclass
class SearchSettings:
    # The Tune experiment's name under `storage`: running the same name again resumes the search
    # (finished trials are kept, unfinished ones go on, the searcher's state is restored). The search's
    # settings are stored with it and compared on every resume: more samples extend it, anything that
    # would change which trials count is refused (metallo_core/tuning/resume.py); a new name starts afresh.
    name: str = "search"
    experiment: str = "metallo-tune"  # MLflow experiment of the parent run and its child runs
    storage: PathSetting = ""  # local directory or s3://bucket/prefix; "" is $METALLO_HOME/tune
    num_samples: int = 8
    max_concurrent_trials: int = 2
    searcher: Literal["optuna", "random"] = "optuna"
    # Trials the searcher evaluates first (dotted keys as in `space`): e.g. the current defaults, so the
    # search starts from a known point. Each entry gives a value for every searched key.
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaSettings = field(default_factory=AshaSettings)
    cpus_per_trial: float = 1.0  # the trial's own process (a search driver for meta-training trials)
    gpus_per_trial: float = 0.0  # fractional GPUs are fine (fine-tuning trials share a GPU)
    max_failures: int = 1  # retries of a failed trial
    seed: int = 0
    ray_address: str | None = None
    # Also write the best trial's config here (it always goes to storage and MLflow); never over --config.
    best_config_out: OutputPathSetting = ""

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name,
                f"search.name must be a non-empty name without '/', got {self.name!r}")
        require(self.num_samples >= 1, "search.num_samples must be >= 1")
        require(self.max_concurrent_trials >= 1, "search.max_concurrent_trials must be >= 1")
        require(self.cpus_per_trial > 0, "search.cpus_per_trial must be positive (Tune cannot place a zero bundle)")
        require(self.gpus_per_trial >= 0, "search.gpus_per_trial must be >= 0")


@dataclass
class FinalTestSettings:
    """The best configuration's one evaluation on test tasks, logged on the parent run."""

    enabled: bool = True
    tasks: int = 200
    shot: int = 0  # 0: the meta-validation shot
    query: int = 15
    modes: list[Literal["protonet", "finetune"]] = field(default_factory=lambda: ["protonet"])
    parallelism: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        require(self.tasks >= 1, "final_test.tasks must be >= 1")
        require(bool(self.modes), "final_test.modes must name protonet and/or finetune")


# Settings each trial gets from the search itself, never from the space.
METATRAIN_FIXED = ("run", "registry", "data", "val_episodes", "val_way", "val_shot", "seed", "compute.ray_address")
FINETUNE_FIXED = ("lr_candidates", "autolr_steps")


@dataclass
class MetaTrainSearchConfig:
    """ASHA over ProtoNet meta-training runs; each trial is a Ray Train run with `base.compute` resources."""

    base: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    space: dict[str, Any] = field(default_factory=dict)
    search: SearchSettings = field(default_factory=lambda: SearchSettings(name="metatrain-search"))
    final_test: FinalTestSettings = field(default_factory=FinalTestSettings)

    def validate(self) -> None:
        base = to_dict(self.base)
        validate_space(self.space, MetaTrainConfig, forbidden=METATRAIN_FIXED, base=base)
        for point in self.search.points_to_evaluate:
            check_point(point, MetaTrainConfig, base)
        require(self.search.cpus_per_trial <= 1,
                "search.cpus_per_trial is the meta-training trial's driver; its Ray Train workers take "
                "base.compute resources (keep it <= 1, e.g. 0.25)")


@dataclass
class FinetuneSearchConfig:
    """A model-based search over meta-test fine-tuning settings, scored on fixed meta-validation tasks.

    `evaluate` holds the model, data, task shape and the default fine-tuning settings (the baseline the
    final test compares against); `evaluate.tasks` test tasks are scored once, at the end."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    val_tasks: int = 50
    # Each trial logs (and reports to Tune) its running mean after this many tasks: the curve in MLflow,
    # and the time axis an ASHA scheduler stops bad trials on.
    report_every_tasks: int = 10
    space: dict[str, Any] = field(default_factory=dict)
    search: SearchSettings = field(default_factory=lambda: SearchSettings(name="finetune-search", scheduler="fifo"))
    final_test: bool = True

    def validate(self) -> None:
        from metallo_core.fewshot.finetune import FinetuneSettings

        require(self.val_tasks >= 1, "val_tasks must be >= 1")
        require(self.report_every_tasks >= 1, "report_every_tasks must be >= 1")
        require(all(key.startswith("finetune.") for key in self.space),
                "the fine-tuning search's space holds finetune.* keys only, e.g. finetune.lr")
        base = to_dict(self.evaluate.finetune)
        validate_space({key.removeprefix("finetune."): spec for key, spec in self.space.items()},
                       FinetuneSettings, forbidden=FINETUNE_FIXED, base=base, where="finetune.")
        for point in self.search.points_to_evaluate:
            check_point(point, FinetuneSettings, base, where="finetune.")
