"""The one shape of a Ray Train stage (DINO pretraining, ProtoNet meta-training), so each stage writes only its own
training and registration code.

Worker side (runs in every Ray Train worker):
- `start_worker`: the stage's config, rank / world size, device, torch threads, and a rank-0 run logger;
- `restore`: the last committed checkpoint, if Ray Train restarted the worker group or the run resumes;
- `end_epoch`: rank 0 writes the checkpoint (state file + record, `train/checkpoints.py`), every rank reports.

Driver side (the `ray job submit` entrypoint process):
- `fit_or_reuse`: a run whose last checkpoint already holds every epoch is not trained again;
- `fit_on_ray`: one `TorchTrainer` over the stage's worker function, its final checkpoint loaded back;
- `register_once`: the trained model is registered once per (run, epochs done), however often the job reruns
  (`train/gate.py` then decides whether the registry alias moves to it);
- `log_training_curves`: the run's curves as a picture on its MLflow run page (`curves/training.png`).

Metrics are logged by rank 0 of the workers, not by a driver-side Ray Train callback: the stages log per-step
curves (loss, lr) between epochs, and a `ray.train.report` per step would add a barrier across workers at every
step and count as a Tune result (the searches' ASHA compares trials per report).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.config import from_dict, to_dict
from metallo_core.errors import MetalloError
from metallo_core.fewshot.stage_gate import StageVerdict
from metallo_core.settings import ComputeSettings, RegistrySettings, RunSettings
from metallo_core.storage import Location, locate
from metallo_core.train import ray_setup
from metallo_core.train.checkpoints import (
    latest_checkpoint_record,
    load_checkpoint,
    load_checkpoint_from,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

# Keys every stage's train_loop_config carries next to its own.
CONFIG, RUN_ID, TRACKING_URI, STORAGE = "config", "run_id", "tracking_uri", "storage"


@dataclass
class WorkerContext:
    """What a Ray Train worker knows about itself."""

    config: Any
    rank: int
    world_size: int
    device: Any  # torch.device
    run_log: Any  # tracking.RunLogger on rank 0, a NullLogger elsewhere
    storage: str  # the run's checkpoint storage (local directory or s3://)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def start_worker(loop_config: dict, config_type: type[Any]) -> WorkerContext:
    """Set up a worker: the config from `loop_config`, the tracking URI the driver uses, torch's thread count
    (`compute.torch_threads`, else the worker's CPUs) and the device Ray Train assigned."""
    import ray.train
    import ray.train.torch
    import torch

    os.environ[tracking.ENV_TRACKING_URI] = loop_config[TRACKING_URI]
    config = from_dict(config_type, loop_config[CONFIG])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(ray_setup.torch_threads(config.compute))
    return WorkerContext(config=config, rank=rank, world_size=context.get_world_size(),
                         device=ray.train.torch.get_device(),
                         run_log=tracking.logger_for(loop_config[RUN_ID] if rank == 0 else None),
                         storage=loop_config[STORAGE])


def restore(worker: WorkerContext, steps_per_epoch: int) -> tuple[dict, dict] | None:
    """The (state, record) of the checkpoint Ray Train hands this worker (after a worker-group restart or when
    a run resumes), logged as `resumed_at_epoch` / `resumed_at_step`; None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state, record = load_checkpoint(directory)
    start_epoch = record["epoch"] + 1
    worker.run_log.log_metrics({"resumed_at_step": start_epoch * steps_per_epoch, "resumed_at_epoch": start_epoch},
                               step=start_epoch * steps_per_epoch)
    print(f"[rank {worker.rank}] resumed from the checkpoint of epoch {record['epoch']} "
          f"at step {start_epoch * steps_per_epoch}", flush=True)
    return state, record


def end_epoch(worker: WorkerContext, summary: dict[str, Any], state: Callable[[], dict] | None = None,
              record: dict[str, Any] | None = None) -> None:
    """Report the epoch's `summary` from every rank (a barrier: all ranks must call it equally often). With
    `state`, rank 0 also saves `state()` and `record` as the epoch's checkpoint (`state` is called on rank 0
    only: the other ranks do not copy their weights for nothing)."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        reported = None
        if state is not None and worker.is_chief:
            save_checkpoint(directory, state(), record or {})
            reported = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(summary, checkpoint=reported)


@dataclass
class FitOutcome:
    """The final checkpoint of a stage's training: its state and record, where it is stored, and the last
    metrics reported (empty when a finished run was found instead of trained)."""

    state: dict
    record: dict[str, Any]
    checkpoint: Location
    metrics: dict[str, Any]

    @property
    def epochs_done(self) -> int:
        return self.record["epoch"] + 1


def fit_or_reuse(run: RunSettings, epochs: int, fit: Callable[[], FitOutcome]) -> FitOutcome:
    """`fit()`, unless the run's newest checkpoint already holds all `epochs`: a job submitted again after it
    finished asks the cluster for nothing and returns the same state (and so registers the same model)."""
    finished = latest_checkpoint_record(locate(ray_setup.storage_uri(run)).join(run.name))
    if finished is not None and finished[1]["epoch"] + 1 >= epochs:
        print(f"run {run.name!r} already finished {epochs} epoch(s); nothing to train", flush=True)
        location, _ = finished
        state, record = load_checkpoint_from(location)
        return FitOutcome(state, record, location, {})
    return fit()


def fit_on_ray(worker_loop: Callable[[dict], None], loop_config: dict[str, Any], *, config: Any,
               compute: ComputeSettings, run: RunSettings, run_id: str, stage: str, callbacks: tuple = (),
               **trainer_options) -> FitOutcome:
    """Fit `worker_loop` on a `TorchTrainer` (joining $RAY_ADDRESS or starting a local cluster) and load its final
    checkpoint. `loop_config` gets the config, the MLflow run id, the tracking URI and the storage added;
    `callbacks` join the run config (Tune's report bridge); `trainer_options` go to `TorchTrainer` (datasets,
    dataset_config). Raises MetalloError when the run ends
    without a checkpoint."""
    ray_setup.connect(compute.ray_address)
    from ray.train.torch import TorchTrainer

    storage = ray_setup.storage_uri(run)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={**loop_config, CONFIG: to_dict(config), RUN_ID: run_id,
                           TRACKING_URI: tracking.tracking_uri(), STORAGE: storage},
        scaling_config=ray_setup.scaling_config(compute),
        run_config=ray_setup.run_config(run, callbacks=callbacks),
        **trainer_options,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise MetalloError(f"{stage} run {run.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state, record = load_checkpoint(directory)
    location = locate(storage).join(run.name, Path(result.checkpoint.path).name)
    return FitOutcome(state, record, location, dict(result.metrics or {}))


def register_once(registry: RegistrySettings, run_id: str, epochs_done: int,
                  register: Callable[[dict[str, str]], str]) -> tuple[str, bool]:
    """The model URI of the version of `registry.name` registered for (run, epochs done), and whether it is
    new: `register(identity_tags)` (which must tag the new version with them) is called only when there is
    none yet. Registering moves no alias (`train/gate.py` decides that)."""
    from metallo_core.tracking.backbone_store import find_versions

    identity = {"metallo.run_id": run_id, "metallo.epochs_done": str(epochs_done)}
    existing = find_versions(registry.name, identity)
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        logger.info("already registered as %s v%s", registry.name, version.version)
        return f"models:/{registry.name}/{version.version}", False
    return register(identity), True


CURVES_ARTIFACT = "curves/training.png"


def log_training_curves(run_id: str, metrics: list[str], *, title: str,
                        intervals: dict[str, str] | None = None) -> None:
    """Draw the run's logged `metrics` (one panel each, over the training step) and log the figure on the run
    as `curves/training.png`. Metrics the run never logged are left out (e.g. no k-NN probe configured);
    nothing is logged when none was. `intervals` maps a metric to its 95% half-width metric (error bars)."""
    from metallo_core.report.figures import training_curves_figure
    from metallo_core.tracking.figures import log_figures

    client = tracking.client()
    keys = metrics + [width for width in (intervals or {}).values() if width not in metrics]
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}
    shown = [key for key in metrics if history[key]]
    if shown:
        figure = training_curves_figure({k: v for k, v in history.items() if v}, title=title, metrics=shown,
                                        intervals={k: w for k, w in (intervals or {}).items() if history.get(w)})
        log_figures(run_id, {CURVES_ARTIFACT: figure})


def registration_lines(model_uri: str | None, gate: StageVerdict | None, alias_moved: bool,
                       registered: str = "registered") -> list[str]:
    """The end of a training stage's summary: what it registered, its gate's verdict, whether the alias
    moved, and how to open MLflow."""
    lines = [f"  {registered}: {model_uri}"] if model_uri else []
    if gate is not None:
        lines.append(f"  {gate.line()}")
    if model_uri:
        lines.append(f"  alias moved to it: {'yes' if alias_moved else 'no'}")
    return lines + [f"  see it in MLflow: {tracking.ui_command()}"]
