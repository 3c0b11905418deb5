"""ProtoNet meta-training on Ray Train: one episode per worker per step, gradients averaged by DDP.

The driver plans the fixed meta-validation episodes (stored with the run so every epoch and every run
is scored on the same tasks), pins the starting backbone (registry alias -> version), fits a
`TorchTrainer`, and registers the best meta-trained backbone as `metallo-protonet` with lineage tags
pointing at the backbone it started from.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from metallo_core import tracking
from metallo_core.config import config_hash, from_dict, to_dict
from metallo_core.data.class_index import indices_by_class, load_split_labels
from metallo_core.data.manifest import manifest_sha256, read_manifest
from metallo_core.errors import DataError, MetalloError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.fewshot.episodes import (
    episode_meta,
    episodes_from_json,
    episodes_to_json,
    fixed_episodes,
)
from metallo_core.progress import EpochProgress
from metallo_core.storage import locate
from metallo_core.train import ray_setup
from metallo_core.train.checkpoints import (
    latest_checkpoint_record,
    load_checkpoint,
    load_checkpoint_from,
    save_checkpoint,
)

VAL_EPISODES_ARTIFACT = "episodes/meta_val_episodes.json"


@dataclass
class MetaTrainResult:
    run_id: str
    epochs_done: int
    best_val_accuracy: float
    best_epoch: int
    model_uri: str | None
    backbone_source: str


def metatrain_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs."""
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from ray.train import Checkpoint

    from metallo_core.data import tensor_augment
    from metallo_core.data.class_index import ClassIndexedImages
    from metallo_core.fewshot.episodes import EpisodeSampler
    from metallo_core.fewshot.metrics import mean_and_ci95
    from metallo_core.fewshot.model_io import initial_backbone
    from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
    from metallo_core.precision import autocast as precision_autocast
    from metallo_core.precision import resolve_precision
    from metallo_core.ssl.schedules import cosine_schedule

    os.environ[tracking.ENV_TRACKING_URI] = loop_config["tracking_uri"]
    config = from_dict(MetaTrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(ray_setup.torch_threads(config.compute))
    device = ray.train.torch.get_device()
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1

    torch.manual_seed(config.seed)
    backbone, spec = initial_backbone(config.backbone, loop_config["backbone_source"])
    image_size = config.data.image_size or spec.image_size
    train_images = ClassIndexedImages.load(config.data.uri, config.data.train_split, image_size=image_size)
    val_images = ClassIndexedImages.load(config.data.uri, config.data.val_split, image_size=image_size)
    val_episodes, _ = episodes_from_json(loop_config["val_episodes"], val_images.indices_by_class,
                                         "the meta-validation episodes")
    normalize = ImageNormalizer(spec.mean, spec.std, device=device, channels_last=config.compute.channels_last)

    memory_format = torch.channels_last if config.compute.channels_last else torch.contiguous_format
    model = ProtoNet(backbone, distance=config.distance, cosine_scale=config.cosine_scale_init).to(
        device, memory_format=memory_format)
    trained = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None) if distributed else model)
    optimizer = _optimizer(config, model)
    steps = config.episodes_per_epoch // world_size
    schedule = cosine_schedule(config.optim.lr, config.optim.min_lr, config.epochs, steps,
                               warmup_epochs=config.optim.warmup_epochs)
    precision = resolve_precision(config.compute.precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    run_log = tracking.logger_for(loop_config["run_id"] if rank == 0 else None)

    start_epoch, best = 0, {"val_accuracy": -1.0, "epoch": -1, "state": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, record = load_checkpoint(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        best = {"val_accuracy": record["best_val_accuracy"], "epoch": record["best_epoch"], "state": state["best"]}
        start_epoch = record["epoch"] + 1
        run_log.log_metrics({"resumed_at_epoch": start_epoch}, step=start_epoch * steps)

    def autocast():
        return precision_autocast(device, precision)

    def episode_tensors(images: ClassIndexedImages, episode, augment: bool):
        support = tensor_augment.to_float(torch.from_numpy(images.images[episode.support]).to(device).permute(0, 3, 1, 2))
        query = tensor_augment.to_float(torch.from_numpy(images.images[episode.query]).to(device).permute(0, 3, 1, 2))
        if augment:
            p = config.augment_p
            support = tensor_augment.random_flip_rot90(support, p, p, p, generator=generator)
            query = tensor_augment.random_flip_rot90(query, p, p, p, generator=generator)
        return (normalize.normalize(support), torch.tensor(episode.support_labels, device=device),
                normalize.normalize(query), torch.tensor(episode.query_labels, device=device))

    progress = EpochProgress("metatrain", config.epochs, first_epoch=start_epoch)
    for epoch in range(start_epoch, config.epochs):
        sampler = EpisodeSampler(train_images.indices_by_class, config.episodes.way, config.episodes.shot,
                                 config.episodes.query, seed=config.seed, rank=rank, epoch=epoch,
                                 cap_query=config.episodes.cap_query)
        model.train(config.bn_mode == "train")
        losses, accuracies, started = [], [], time.perf_counter()
        for index in range(steps):
            step = epoch * steps + index
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[step])
            support, support_labels, query, query_labels = episode_tensors(train_images, sampler.sample(),
                                                                           config.augment)
            with autocast():
                logits = trained(support, support_labels, query, config.episodes.way)
            loss = F.cross_entropy(logits.float(), query_labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"meta-training loss is {loss.item()} at step {step} (epoch {epoch}); "
                                         "lower optim.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            accuracies.append((logits.argmax(1) == query_labels).float().mean().item())
            if rank == 0 and step % config.run.log_every_steps == 0:
                run_log.log_metrics({"train_loss": losses[-1], "train_accuracy": accuracies[-1],
                                     "lr": float(schedule[step])}, step=step)

        # Fixed meta-validation tasks, split over the workers, gathered for the mean and its interval.
        model.eval()
        own = []
        with torch.no_grad():
            for episode in val_episodes[rank::world_size]:
                support, support_labels, query, query_labels = episode_tensors(val_images, episode, augment=False)
                with autocast():
                    logits = model(support, support_labels, query, len(episode.classes))
                own.append((logits.argmax(1) == query_labels).float().mean().item())
        per_task = own
        if distributed:
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, own)
            per_task = [value for part in gathered for value in part]
        val_accuracy, val_ci95 = mean_and_ci95(per_task)
        if val_accuracy > best["val_accuracy"]:
            best = {"val_accuracy": val_accuracy, "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        summary = {
            "epoch": epoch,
            "epochs_done": epoch + 1,  # the time axis of Tune's ASHA (survives a resumed trial, unlike iterations)
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accuracies)),
            "val_accuracy": val_accuracy,
            "val_ci95": val_ci95,
            "best_val_accuracy": best["val_accuracy"],
            "episodes_per_s": steps * world_size / (time.perf_counter() - started),
        }
        run_log.log_metrics(summary, step=(epoch + 1) * steps)
        if rank == 0:
            progress.epoch_done(epoch, {key: summary[key] for key in ("train_loss", "val_accuracy")})
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(directory, {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "best": best["state"],
                }, {
                    "epoch": epoch,
                    "val_accuracy": val_accuracy,
                    "best_val_accuracy": best["val_accuracy"],
                    "best_epoch": best["epoch"],
                    "backbone_spec": to_dict(spec),
                    "config_hash": config_hash(config),
                })
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(summary, checkpoint=checkpoint)


def _optimizer(config: MetaTrainConfig, model):
    import torch

    settings = config.optim
    if settings.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=True)
    if settings.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def plan_validation_episodes(config: MetaTrainConfig) -> str:
    """Fixed meta-val tasks as JSON; also fails fast, before any cluster resource, when classes are too small."""
    labels, class_names = load_split_labels(config.data.uri, config.data.val_split)
    way = config.val_way or config.episodes.way
    if len(class_names) < way:
        raise DataError(
            f"split {config.data.val_split!r} has {len(class_names)} classes, fewer than the meta-validation way "
            f"{way}; lower the way or use a split with more classes"
        )
    shot = config.val_shot or config.episodes.shot
    members = indices_by_class(labels, len(class_names))
    episodes = fixed_episodes(members, way, shot, config.episodes.query, config.val_episodes,
                              seed=config.seed + 1, cap_query=config.episodes.cap_query)
    meta = episode_meta(members, seed=config.seed + 1, cap_query=config.episodes.cap_query,
                        split=config.data.val_split, dataset=config.data.uri)
    return episodes_to_json(episodes, meta)


def check_training_split(config: MetaTrainConfig) -> None:
    from metallo_core.fewshot.episodes import EpisodeSampler

    labels, class_names = load_split_labels(config.data.uri, config.data.train_split)
    if len(class_names) < config.episodes.way:
        raise DataError(
            f"split {config.data.train_split!r} has {len(class_names)} classes, fewer than episodes.way = "
            f"{config.episodes.way}"
        )
    # Draws one episode with the real class sizes: a class too small for shot + query fails here, named.
    EpisodeSampler(indices_by_class(labels, len(class_names)), config.episodes.way, config.episodes.shot,
                   config.episodes.query, seed=config.seed, cap_query=config.episodes.cap_query).sample()


def with_absolute_uris(config: MetaTrainConfig) -> MetaTrainConfig:
    config = copy.deepcopy(config)
    config.data.uri = locate(config.data.uri).uri
    if config.backbone.kind == "file":
        from metallo_core.fewshot.model_io import pin_backbone_source

        config.backbone.source = pin_backbone_source(config.backbone)
    if config.run.storage:
        config.run.storage = locate(config.run.storage).uri
    return config


def run_metatraining(config: MetaTrainConfig, *, parent_run_id: str | None = None,
                     extra_tags: dict[str, str] | None = None, train_callbacks: tuple = ()) -> MetaTrainResult:
    """Meta-train (or resume, or find finished) the run `config.run.name`, then register its best state.

    `parent_run_id`, `extra_tags` and `train_callbacks` are for searches (tuning/): the run becomes a
    child of the search's MLflow run, and Ray Train callbacks (Tune's report bridge) join the trainer."""
    from metallo_core.fewshot.model_io import check_backbone_source, pin_backbone_source

    config = with_absolute_uris(config)
    tracking.configure()
    manifest = read_manifest(config.data.uri)
    for split in (config.data.train_split, config.data.val_split):
        manifest.split(split)
    check_training_split(config)
    val_episodes = plan_validation_episodes(config)
    backbone_source = pin_backbone_source(config.backbone)
    check_backbone_source(config.backbone, backbone_source)  # a file that does not fit fails here, named
    locate(ray_setup.storage_uri(config.run)).check_access()
    lineage = {
        "metallo.stage": "metatrain",
        "metallo.backbone_source": backbone_source,
        "metallo.dataset_uri": config.data.uri,
        "metallo.dataset_manifest_sha256": manifest_sha256(config.data.uri),
        "metallo.config_hash": config_hash(config),
        "metallo.code_version": tracking.code_version(),
    }
    with tracking.open_run(config.run.experiment, config.run.name, config=config, tags={**lineage, **(extra_tags or {})},
                           parent_run_id=parent_run_id) as run:
        run.log_text(val_episodes, VAL_EPISODES_ARTIFACT)
        finished = latest_checkpoint_record(locate(ray_setup.storage_uri(config.run)).join(config.run.name))
        if finished is not None and finished[1]["epoch"] + 1 >= config.epochs:
            print(f"run {config.run.name!r} already finished {config.epochs} epoch(s); nothing to train")
            state, record = load_checkpoint_from(finished[0])
        else:
            state, record = _fit(config, run.run_id, backbone_source, val_episodes, train_callbacks)
        model_uri = None
        if config.registry.register:
            model_uri = register_protonet(config, state, record, run.run_id, lineage)
        return MetaTrainResult(
            run_id=run.run_id,
            epochs_done=record["epoch"] + 1,
            best_val_accuracy=record["best_val_accuracy"],
            best_epoch=record["best_epoch"],
            model_uri=model_uri,
            backbone_source=backbone_source,
        )


def _fit(config: MetaTrainConfig, run_id: str, backbone_source: str, val_episodes: str, callbacks: tuple = ()):
    ray_setup.connect(config.compute.ray_address)
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        metatrain_worker,
        train_loop_config={
            "config": to_dict(config),
            "run_id": run_id,
            "tracking_uri": tracking.tracking_uri(),
            "backbone_source": backbone_source,
            "val_episodes": val_episodes,
        },
        scaling_config=ray_setup.scaling_config(config.compute),
        run_config=ray_setup.run_config(config.run, callbacks=callbacks),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise MetalloError(f"meta-training run {config.run.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(directory)


def register_protonet(config: MetaTrainConfig, state: dict, record: dict, run_id: str,
                      lineage: dict[str, str]) -> str:
    """Register the best meta-trained ProtoNet once per (run, epochs done)."""
    from metallo_core.fewshot.model_io import protonet_metadata
    from metallo_core.fewshot.protonet import ProtoNet
    from metallo_core.models.backbones import BackboneSpec, build_backbone
    from metallo_core.models.registry import find_versions, log_backbone

    identity = {"metallo.run_id": run_id, "metallo.epochs_done": str(record["epoch"] + 1)}
    existing = find_versions(config.registry.name, identity)
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        return f"models:/{config.registry.name}/{version.version}"
    spec = from_dict(BackboneSpec, record["backbone_spec"])
    model = ProtoNet(build_backbone(spec), distance=config.distance)
    model.load_state_dict(state["best"] if state.get("best") is not None else state["model"])
    registered = log_backbone(
        run_id,
        model.backbone,
        spec,
        registered_name=config.registry.name,
        tags={**lineage, **identity, "metallo.best_val_accuracy": f"{record['best_val_accuracy']:.4f}",
              "metallo.best_epoch": str(record["best_epoch"]), "metallo.arch": spec.arch},
        alias=config.registry.alias,
        artifact_name="protonet",
        metadata=protonet_metadata(model, trained_way=config.episodes.way, trained_shot=config.episodes.shot,
                                   bn_mode=config.bn_mode),
    )
    return registered.uri


def describe_result(result: MetaTrainResult) -> str:
    lines = [
        f"ProtoNet meta-training done: {result.epochs_done} epoch(s), MLflow run {result.run_id}",
        f"  started from: {result.backbone_source}",
        f"  best meta-val accuracy: {result.best_val_accuracy:.4f} (epoch {result.best_epoch})",
    ]
    if result.model_uri:
        lines.append(f"  registered: {result.model_uri}")
    lines.append(f"  see it in MLflow: {tracking.ui_command()}")
    return "\n".join(lines)
