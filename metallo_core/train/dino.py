"""DINO pretraining on Ray Train: each worker runs a `DinoTrainer` on its share of the shards.

Workers read their share straight from the Parquet row groups (`data.reader: stream`, the default) or
through Ray Data (`ray_data`); `training_batches` hides which.

The driver (`run_dino_pretraining`) validates inputs, opens (or reopens) the MLflow run, fits a
`TorchTrainer`, and registers the teacher backbone of the final checkpoint as `metallo-backbone`; with a gate
(`gate.uri`), its alias moves only if the backbone beat its baseline on the gate's selection tasks.
A rerun with the same run name resumes from the latest checkpoint; a finished run is not redone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from metallo_core import tracking
from metallo_core.config import config_hash, to_dict
from metallo_core.data.manifest import read_manifest
from metallo_core.data.stream import decoded_split
from metallo_core.errors import MetalloError
from metallo_core.fewshot.stage_gate import StageVerdict
from metallo_core.progress import EpochProgress
from metallo_core.ssl.config import DinoConfig
from metallo_core.storage import locate, with_absolute_uris
from metallo_core.train import gate as stage_gate
from metallo_core.train import ray_setup, skeleton
from metallo_core.train.checkpoint_commit import wait_for_committed_checkpoint

FAILURE_MARKER = "_injected_failure"


@dataclass
class PretrainResult:
    run_id: str
    epochs_done: int
    final_metrics: dict[str, Any]
    model_uri: str | None  # models:/metallo-backbone/<version>
    checkpoint_path: str | None
    gate: StageVerdict | None = None  # None: no gate (gate.uri empty)
    alias_moved: bool = False  # whether registry.alias now points at model_uri


def dino_train_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: a `DinoTrainer` on this worker's split of the shards."""
    import numpy as np

    from metallo_core.data.class_index import ClassIndexedImages
    from metallo_core.ssl.health import collapse_warning
    from metallo_core.ssl.knn import knn_accuracy, split_bank_and_queries
    from metallo_core.ssl.trainer import DinoTrainer, steps_per_epoch
    from metallo_core.tracking.backbone_store import load_backbone

    worker = skeleton.start_worker(loop_config, DinoConfig)
    config: DinoConfig = worker.config
    rank, world_size, run_log = worker.rank, worker.world_size, worker.run_log
    steps = steps_per_epoch(loop_config["num_images"], config.optim.batch_size_per_worker, world_size)
    trainer = DinoTrainer(config, steps_per_epoch=steps, world_size=world_size, rank=rank, device=worker.device,
                          load_registered=load_backbone)

    start_epoch = 0
    restored = skeleton.restore(worker, steps)
    if restored is not None:
        state, record = restored
        trainer.load_state_dict(state)
        start_epoch = record["epoch"] + 1

    probe = None
    if rank == 0 and config.knn.every_epochs:
        probe = ClassIndexedImages.load(config.knn.uri or config.data.uri, config.knn.split,
                                        image_size=config.backbone.image_size, max_images=config.knn.max_images)
    epoch_batches = training_batches(config, rank, world_size, worker.device)
    progress = EpochProgress("pretrain", config.epochs, first_epoch=start_epoch)
    for epoch in range(start_epoch, config.epochs):
        epoch_losses, started = [], time.perf_counter()
        last_step_time = time.perf_counter()
        for index, batch in enumerate(epoch_batches(epoch)):
            if index >= steps:
                continue  # every rank drains its share, so the next epoch's Ray Data split starts cleanly
            step = epoch * steps + index
            _maybe_inject_failure(config, step, rank, worker.storage, steps)
            log_now = step % config.run.log_every_steps == 0 or index == steps - 1
            metrics = trainer.train_step(batch["image"], step, epoch, with_health=log_now)
            epoch_losses.append(metrics["loss"])
            now = time.perf_counter()
            if log_now:
                images_per_s = config.optim.batch_size_per_worker * world_size / max(now - last_step_time, 1e-9)
                run_log.log_metrics({**metrics, "images_per_s": images_per_s, "epoch": epoch}, step=step)
            last_step_time = now
        if len(epoch_losses) < steps:
            raise MetalloError(
                f"worker {rank} got {len(epoch_losses)} batches in epoch {epoch}, expected {steps}; "
                "the dataset shrank since the manifest was written?"
            )
        summary = {
            "epoch": epoch,
            "global_step": (epoch + 1) * steps,
            "epoch_loss": float(np.mean(epoch_losses)),
            "epoch_images_per_s": steps * config.optim.batch_size_per_worker * world_size
            / (time.perf_counter() - started),
        }
        if rank == 0:
            warning = collapse_warning(summary["epoch_loss"], trainer.last_metrics.get("teacher_entropy", 0.0),
                                       trainer.last_metrics.get("teacher_batch_entropy", 1e9), config.head.out_dim)
            if warning and epoch >= config.optim.freeze_last_layer_epochs:
                print(f"WARNING: {warning}")
                run_log.set_tags({"metallo.collapse_warning": warning[:500]})
            summary["collapse_suspected"] = float(warning is not None)
            if probe is not None and ((epoch + 1) % config.knn.every_epochs == 0 or epoch == config.epochs - 1):
                summary["knn_accuracy"] = _knn_probe(trainer, probe, config, knn_accuracy, split_bank_and_queries)
            run_log.log_metrics(summary, step=(epoch + 1) * steps)
            progress.epoch_done(epoch, {key: summary[key] for key in ("epoch_loss", "knn_accuracy") if key in summary})
        is_checkpoint_epoch = (epoch + 1) % config.run.checkpoint_every_epochs == 0 or epoch == config.epochs - 1
        skeleton.end_epoch(worker, summary, trainer.state_dict if is_checkpoint_epoch else None, {
            "epoch": epoch,
            "global_step": (epoch + 1) * steps,
            "config_hash": config_hash(config),
            "backbone_spec": to_dict(config.backbone.spec),
        })


def training_batches(config: DinoConfig, rank: int, world_size: int,
                     device: Any) -> Callable[[int], Iterable[dict[str, Any]]]:
    """This worker's batches of one epoch, by epoch: {"image": (B, S, S, 3) uint8} with B =
    optim.batch_size_per_worker and S = base_size, at least `steps_per_epoch` of them.

    With `data.reader: stream` the worker reads rows [rank * N / world, (rank + 1) * N / world) of the
    epoch's shuffled row-group order itself and decodes them in its own threads, on its GPU when it has
    one; with `ray_data` it iterates the shard Ray Train split off the dataset `_fit` passed in."""
    import torch

    if config.data.reader == "ray_data":
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: shard.iter_torch_batches(
            batch_size=config.optim.batch_size_per_worker,
            drop_last=True,
            prefetch_batches=config.compute.prefetch_batches,
            dtypes={"image": torch.uint8},
        )
    from metallo_core.data.local_stream import LocalBatchStream

    stream = LocalBatchStream(
        config.data.uri, config.data.split,
        batch_size=config.optim.batch_size_per_worker,
        image_size=config.base_size,
        seed=config.seed,
        prefetch_batches=config.compute.prefetch_batches,
        decode_threads=config.data.decode_threads or max(1, round(config.compute.cpus_per_worker)),
        rank=rank,
        world_size=world_size,
        device=device if torch.device(device).type == "cuda" else "cpu",  # nvJPEG where the crops are cut
        label_column=None,  # DINO needs no labels (and an unlabelled set has none)
    )

    def epoch_batches(epoch: int) -> Iterable[dict[str, Any]]:
        stream.set_epoch(epoch)
        return stream

    return epoch_batches


def _knn_probe(trainer, probe, config: DinoConfig, knn_accuracy, split_bank_and_queries) -> float:
    import torch

    labels = torch.from_numpy(probe.labels)
    bank, queries = split_bank_and_queries(labels, config.knn.query_fraction, seed=config.seed)
    features = trainer.embed(probe.images).cpu()
    return knn_accuracy(features[bank], labels[bank], features[queries], labels[queries], probe.num_classes,
                        k=config.knn.k, temperature=config.knn.temperature)


def _maybe_inject_failure(config: DinoConfig, step: int, rank: int, storage: str, steps_per_epoch: int) -> None:
    """Kill this worker process once (a marker in the run's storage remembers it), as a real crash would."""
    if step != config.debug.fail_at_step or rank != config.debug.fail_rank:
        return
    marker = locate(storage).join(config.run.name, FAILURE_MARKER)
    if marker.exists():
        return
    marker.write_bytes(b"a test killed a worker here once\n")
    # Crash only once the last checkpoint before this epoch is committed (not after a fixed sleep that a
    # loaded machine can outlast): the test is about resuming from it, not about losing it.
    every = config.run.checkpoint_every_epochs
    # The last epoch e before this one that checkpointed, i.e. with (e + 1) % every == 0; -1 if none.
    last_checkpointed = (step // steps_per_epoch) // every * every - 1
    if last_checkpointed >= 0:
        wait_for_committed_checkpoint(storage, config.run.name, last_checkpointed,
                                      timeout_s=config.debug.commit_timeout_s)
    print(f"[rank {rank}] injected failure at step {step}: exiting the worker process", flush=True)
    os._exit(1)


def validate_inputs(config: DinoConfig) -> int:
    """Everything that can fail before asking the cluster for resources; returns the split's image count."""
    tracking.configure()  # fails fast on an unreachable tracking server
    manifest = read_manifest(config.data.uri)
    num_images = manifest.split(config.data.split).num_images
    if config.knn.every_epochs:
        read_manifest(config.knn.uri or config.data.uri).split(config.knn.split)
    locate(ray_setup.storage_uri(config.run)).check_access()
    check_start_weights(config)
    stage_gate.check_selection_split(config.gate)
    from metallo_core.ssl.trainer import steps_per_epoch

    try:
        steps_per_epoch(num_images, config.optim.batch_size_per_worker, config.compute.num_workers)
    except ValueError as exc:
        raise MetalloError(str(exc)) from exc
    return num_images


def check_start_weights(config: DinoConfig) -> None:
    """Build the starting backbone once on the driver: a weights file that does not fit `config.backbone`'s
    (or a registry backbone of another architecture) fails here, named, before any cluster time is spent."""
    from metallo_core.tracking.backbone_store import backbone_from_any_source

    if not config.pretrained_start:
        return
    _, spec = backbone_from_any_source(config.backbone.source, config.backbone.spec)
    mine, theirs = config.backbone.spec, spec
    if (mine.library, mine.arch, mine.small_input) != (theirs.library, theirs.arch, theirs.small_input):
        raise MetalloError(
            f"backbone.source {config.backbone.source} is a {theirs.library} {theirs.arch}"
            f"{' (small-input stem)' if theirs.small_input else ''}, but backbone is a {mine.library} {mine.arch}"
            f"{' (small-input stem)' if mine.small_input else ''}; set backbone.library/arch/small_input to match "
            "the weights")
    if (tuple(mine.mean), tuple(mine.std)) != (tuple(theirs.mean), tuple(theirs.std)):
        raise MetalloError(
            f"backbone.source {config.backbone.source} expects inputs normalised with mean {theirs.mean}, std "
            f"{theirs.std}; set backbone.mean/std and multicrop.mean/std to those (they are {mine.mean}, {mine.std})")


def pinned_start_weights(config: DinoConfig) -> str:
    """The exact starting point for lineage: a registry alias resolved to its version, a file made absolute."""
    from metallo_core.tracking.protonet_store import pin_backbone_source

    return pin_backbone_source(config.backbone)


def describe_result(result: PretrainResult) -> str:
    lines = [f"DINO pretraining done: {result.epochs_done} epoch(s), MLflow run {result.run_id}"]
    for key in ("epoch_loss", "knn_accuracy", "epoch_images_per_s"):
        if key in result.final_metrics:
            lines.append(f"  {key}: {result.final_metrics[key]:.4f}")
    lines += skeleton.registration_lines(result.model_uri, result.gate, result.alias_moved, "registered backbone")
    return "\n".join(lines)


def pinned_inputs(config: DinoConfig) -> DinoConfig:
    """Resolve local paths now (Ray workers run in other working directories) and pin the start weights."""
    config = with_absolute_uris(config, ("data.uri", "knn.uri", "gate.uri", "run.storage"))
    if config.pretrained_start:
        # Workers start from exactly what the driver checked: an alias cannot move under a running job.
        config.backbone.source = pinned_start_weights(config)
    return config


def run_dino_pretraining(config: DinoConfig) -> PretrainResult:
    config = pinned_inputs(config)
    num_images = validate_inputs(config)
    lineage = {
        "metallo.stage": "pretrain",
        **tracking.dataset_tags(config.data.uri, split=config.data.split),
        "metallo.config_hash": config_hash(config),
        "metallo.code_version": tracking.code_version(),
        "metallo.backbone_source": config.backbone.source,  # where DINO started
    }
    with tracking.open_run(config.run.experiment, config.run.name, config=config, tags=lineage) as run:
        outcome = skeleton.fit_or_reuse(config.run, config.epochs, lambda: _fit(config, num_images, run.run_id))
        skeleton.log_training_curves(run.run_id, ["loss", "epoch_loss", "knn_accuracy"],
                                     title=f"DINO pretraining: {config.run.name}")
        registration = register_teacher_backbone(config, outcome.state, outcome.record, run.run_id, lineage)
        return PretrainResult(
            run_id=run.run_id,
            epochs_done=outcome.epochs_done,
            final_metrics=outcome.metrics,
            model_uri=registration.model_uri,
            checkpoint_path=outcome.checkpoint.uri,
            gate=registration.verdict,
            alias_moved=registration.alias_moved,
        )


def _fit(config: DinoConfig, num_images: int, run_id: str) -> skeleton.FitOutcome:
    ray_setup.connect(config.compute.ray_address)  # Ray Data plans the dataset on the cluster it joins
    from ray.train import DataConfig

    data_options: dict[str, Any] = {}
    if config.data.reader == "ray_data":
        dataset = decoded_split(config.data.uri, config.data.split, config.base_size, columns=("image",))
        data_options = {"datasets": {"train": dataset}, "dataset_config": DataConfig(datasets_to_split="all")}
    return skeleton.fit_on_ray(dino_train_worker, {"num_images": num_images}, config=config,
                               compute=config.compute, run=config.run, run_id=run_id, stage="DINO",
                               **data_options)


def teacher_backbone(config: DinoConfig, state: dict):
    """The teacher's backbone of a DINO checkpoint state (the network DINO hands on)."""
    from metallo_core.models.backbones import build_backbone

    backbone = build_backbone(config.backbone.spec)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state["teacher"].items() if k.startswith(prefix)})
    return backbone


def register_teacher_backbone(config: DinoConfig, state: dict, record: dict, run_id: str,
                              lineage: dict[str, str]) -> stage_gate.GatedRegistration:
    """Register the final teacher backbone once per (run, epoch) (a rerun of a finished run reuses it) and
    point registry.alias at it unless the gate (gate.uri) found it no better than its baseline."""
    backbone = teacher_backbone(config, state)
    origin = config.backbone.source  # where DINO started
    registered_spec = replace(config.backbone.spec, weights=origin)

    def register(identity: dict[str, str]) -> str:
        from metallo_core.tracking.backbone_store import log_backbone

        registered = log_backbone(
            run_id,
            backbone,
            registered_spec,
            registered_name=config.registry.name,
            tags={**lineage, **identity, "metallo.arch": config.backbone.arch},
            artifact_name="teacher_backbone",
        )
        assert registered is not None
        return registered.uri

    return stage_gate.gate_and_register(
        stage="pretrain", gate=config.gate, registry=config.registry, run_id=run_id, epochs_done=record["epoch"] + 1,
        candidate=backbone, candidate_spec=registered_spec, input_source=origin, input_spec=config.backbone.spec,
        trained_on=stage_gate.data_in_words(config.data.uri, config.data.split), register=register)
