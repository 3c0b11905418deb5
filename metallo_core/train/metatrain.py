"""ProtoNet meta-training on Ray Train: one episode per worker per step, gradients averaged by DDP.

The driver plans the fixed meta-validation episodes (stored with the run so every epoch and every run
is scored on the same tasks), pins the starting backbone (registry alias -> version), fits a
`TorchTrainer`, and registers the best meta-trained backbone as `metallo-protonet` with lineage tags
pointing at the backbone it started from; with a gate (`gate.uri`), its alias moves only if the backbone beat
its baseline on the gate's selection tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from metallo_core import tracking
from metallo_core.config import config_hash, from_dict, to_dict
from metallo_core.data.class_index import indices_by_class, load_split_labels
from metallo_core.data.manifest import read_manifest
from metallo_core.errors import DataError
from metallo_core.fewshot.config import MetaTrainConfig
from metallo_core.fewshot.episodes import (
    episode_meta,
    episodes_from_json,
    episodes_to_json,
    fixed_episodes,
)
from metallo_core.fewshot.stage_gate import StageVerdict
from metallo_core.progress import EpochProgress
from metallo_core.storage import locate, with_absolute_uris
from metallo_core.train import gate as stage_gate
from metallo_core.train import ray_setup, skeleton

VAL_EPISODES_ARTIFACT = "episodes/meta_val_episodes.json"


@dataclass
class MetaTrainResult:
    run_id: str
    epochs_done: int
    best_val_accuracy: float
    best_epoch: int
    model_uri: str | None
    backbone_source: str
    gate: StageVerdict | None = None  # None: no gate (gate.uri empty)
    alias_moved: bool = False  # whether registry.alias now points at model_uri


def metatrain_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: a `ProtoNetTrainer` on this worker's episodes, the fixed meta-validation
    tasks after every epoch, a checkpoint (with the best state so far) per epoch."""
    import torch

    from metallo_core.data.class_index import ClassIndexedImages
    from metallo_core.fewshot.trainer import ProtoNetTrainer
    from metallo_core.tracking.protonet_store import initial_backbone

    worker = skeleton.start_worker(loop_config, MetaTrainConfig)
    config: MetaTrainConfig = worker.config
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    backbone, spec = initial_backbone(config.backbone, loop_config["backbone_source"])
    image_size = config.data.image_size or spec.image_size
    train_images = ClassIndexedImages.load(config.data.uri, config.data.train_split, image_size=image_size)
    val_images = ClassIndexedImages.load(config.data.uri, config.data.val_split, image_size=image_size)
    val_episodes, _ = episodes_from_json(loop_config["val_episodes"], val_images.indices_by_class,
                                         "the meta-validation episodes")
    steps = config.episodes_per_epoch // worker.world_size
    trainer = ProtoNetTrainer(config, backbone, spec, steps_per_epoch=steps, world_size=worker.world_size,
                              rank=worker.rank, device=worker.device)

    start_epoch = 0
    restored = skeleton.restore(worker, steps)
    if restored is not None:
        state, record = restored
        trainer.load_state_dict(state, best_val_accuracy=record["best_val_accuracy"], best_epoch=record["best_epoch"])
        start_epoch = record["epoch"] + 1

    def log_step(step: int, metrics: dict[str, float]) -> None:
        if step % config.run.log_every_steps == 0:
            worker.run_log.log_metrics({"train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
                                        "lr": metrics["lr"]}, step=step)

    progress = EpochProgress("metatrain", config.epochs, first_epoch=start_epoch)
    for epoch in range(start_epoch, config.epochs):
        trained = trainer.train_epoch(train_images, epoch, on_step=log_step)
        val_accuracy, val_ci95 = trainer.validate(val_images, val_episodes)
        trainer.note_validation(val_accuracy, epoch)
        summary = {
            "epoch": epoch,
            "epochs_done": epoch + 1,  # the time axis of Tune's ASHA (survives a resumed trial, unlike iterations)
            "train_loss": trained["train_loss"],
            "train_accuracy": trained["train_accuracy"],
            "val_accuracy": val_accuracy,
            "val_ci95": val_ci95,
            "best_val_accuracy": trainer.best_val_accuracy,
            "episodes_per_s": trained["episodes_per_s"],
        }
        worker.run_log.log_metrics(summary, step=(epoch + 1) * steps)
        if worker.is_chief:
            progress.epoch_done(epoch, {key: summary[key] for key in ("train_loss", "val_accuracy")})
        skeleton.end_epoch(worker, summary, trainer.state_dict, {
            "epoch": epoch,
            "val_accuracy": val_accuracy,
            "best_val_accuracy": trainer.best_val_accuracy,
            "best_epoch": trainer.best_epoch,
            "backbone_spec": to_dict(spec),
            "config_hash": config_hash(config),
        })


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


def pinned_inputs(config: MetaTrainConfig) -> MetaTrainConfig:
    """Resolve local paths now (Ray workers run in other working directories); a weights file's path too."""
    config = with_absolute_uris(config, ("data.uri", "run.storage", "gate.uri"))
    if config.backbone.kind == "file":
        from metallo_core.tracking.protonet_store import pin_backbone_source

        config.backbone.source = pin_backbone_source(config.backbone)
    return config


def run_metatraining(config: MetaTrainConfig, *, parent_run_id: str | None = None,
                     extra_tags: dict[str, str] | None = None, train_callbacks: tuple = ()) -> MetaTrainResult:
    """Meta-train (or resume, or find finished) the run `config.run.name`, then register its best state.

    `parent_run_id`, `extra_tags` and `train_callbacks` are for searches (tuning/): the run becomes a
    child of the search's MLflow run, and Ray Train callbacks (Tune's report bridge) join the trainer."""
    from metallo_core.tracking.protonet_store import check_backbone_source, pin_backbone_source

    config = pinned_inputs(config)
    tracking.configure()
    manifest = read_manifest(config.data.uri)
    for split in (config.data.train_split, config.data.val_split):
        manifest.split(split)
    check_training_split(config)
    val_episodes = plan_validation_episodes(config)
    backbone_source = pin_backbone_source(config.backbone)
    check_backbone_source(config.backbone, backbone_source)  # a file that does not fit fails here, named
    stage_gate.check_selection_split(config.gate)
    locate(ray_setup.storage_uri(config.run)).check_access()
    lineage = {
        "metallo.stage": "metatrain",
        "metallo.backbone_source": backbone_source,
        **tracking.dataset_tags(config.data.uri, split=config.data.train_split),
        "metallo.config_hash": config_hash(config),
        "metallo.code_version": tracking.code_version(),
    }
    with tracking.open_run(config.run.experiment, config.run.name, config=config,
                           tags={**lineage, **(extra_tags or {})}, parent_run_id=parent_run_id) as run:
        run.log_text(val_episodes, VAL_EPISODES_ARTIFACT)
        outcome = skeleton.fit_or_reuse(config.run, config.epochs, lambda: skeleton.fit_on_ray(
            metatrain_worker, {"backbone_source": backbone_source, "val_episodes": val_episodes},
            config=config, compute=config.compute, run=config.run, run_id=run.run_id, stage="meta-training",
            callbacks=train_callbacks))
        record = outcome.record
        skeleton.log_training_curves(run.run_id, ["train_loss", "val_accuracy"], intervals={"val_accuracy": "val_ci95"},
                                     title=f"ProtoNet meta-training: {config.run.name}")
        registration = gate_and_register_protonet(config, outcome.state, record, run.run_id, lineage)
        return MetaTrainResult(
            run_id=run.run_id,
            epochs_done=outcome.epochs_done,
            best_val_accuracy=record["best_val_accuracy"],
            best_epoch=record["best_epoch"],
            model_uri=registration.model_uri,
            backbone_source=backbone_source,
            gate=registration.verdict,
            alias_moved=registration.alias_moved,
        )


def register_protonet(config: MetaTrainConfig, state: dict, record: dict, run_id: str,
                      lineage: dict[str, str]) -> str | None:
    """Register the best meta-trained ProtoNet once per (run, epochs done), gated as `gate_and_register_protonet`;
    its models:/name/N URI (None when registry.register is off)."""
    return gate_and_register_protonet(config, state, record, run_id, lineage).model_uri


def best_protonet(config: MetaTrainConfig, state: dict, record: dict):
    """The ProtoNet of a meta-training checkpoint's best epoch (its last when none was noted), and its spec."""
    from metallo_core.fewshot.protonet import ProtoNet
    from metallo_core.models.backbones import BackboneSpec, build_backbone

    spec = from_dict(BackboneSpec, record["backbone_spec"])
    model = ProtoNet(build_backbone(spec), distance=config.distance)
    model.load_state_dict(state["best"] if state.get("best") is not None else state["model"])
    return model, spec


def gate_and_register_protonet(config: MetaTrainConfig, state: dict, record: dict, run_id: str,
                               lineage: dict[str, str]) -> stage_gate.GatedRegistration:
    """Register the best meta-trained ProtoNet once per (run, epochs done) and point registry.alias at it
    unless the gate (gate.uri) found its backbone no better than its baseline."""
    from metallo_core.tracking.backbone_store import log_backbone
    from metallo_core.tracking.protonet_store import pin_backbone_source, protonet_metadata

    model, spec = best_protonet(config, state, record)
    input_source = lineage.get("metallo.backbone_source") or pin_backbone_source(config.backbone)

    def register(identity: dict[str, str]) -> str:
        registered = log_backbone(
            run_id,
            model.backbone,
            spec,
            registered_name=config.registry.name,
            tags={**lineage, **identity, "metallo.best_val_accuracy": f"{record['best_val_accuracy']:.4f}",
                  "metallo.best_epoch": str(record["best_epoch"]), "metallo.arch": spec.arch},
            artifact_name="protonet",
            metadata=protonet_metadata(model, trained_way=config.episodes.way, trained_shot=config.episodes.shot,
                                       bn_mode=config.bn_mode),
        )
        assert registered is not None
        return registered.uri

    return stage_gate.gate_and_register(
        stage="metatrain", gate=config.gate, registry=config.registry, run_id=run_id,
        epochs_done=record["epoch"] + 1, candidate=model.backbone, candidate_spec=spec, input_source=input_source,
        input_spec=config.backbone.spec,
        trained_on=stage_gate.data_in_words(config.data.uri, config.data.train_split), register=register)


def describe_result(result: MetaTrainResult) -> str:
    lines = [
        f"ProtoNet meta-training done: {result.epochs_done} epoch(s), MLflow run {result.run_id}",
        f"  started from: {result.backbone_source}",
        f"  best meta-val accuracy: {result.best_val_accuracy:.4f} (epoch {result.best_epoch})",
    ]
    lines += skeleton.registration_lines(result.model_uri, result.gate, result.alias_moved)
    return "\n".join(lines)
