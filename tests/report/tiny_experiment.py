"""A tiny experiment logged straight to MLflow, shaped exactly like the stages' runs (same configs, tags,
metric keys, artifacts and registry tags) but without training anything, so report tests take seconds.

Lineage to follow: the DINO run lives in another experiment (as `metallo pretrain` puts it), a ProtoNet
starts from its registered backbone, a second ProtoNet starts from scratch; each is evaluated at 1 and 5
shots, with confusion matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from metallo_core import tracking
from metallo_core.config import config_hash, from_dict
from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
from metallo_core.fewshot.confusion import CONFUSION_ARTIFACT_DIR, confusion_over_tasks
from metallo_core.fewshot.episodes import fixed_episodes
from metallo_core.ssl.config import DinoConfig
from metallo_core.train.evaluate import EvaluationResult, ModeResult, summary_json

EXPERIMENT = "tiny-report"
PRETRAIN_EXPERIMENT = "tiny-report-pretrain"
GRID_EXPERIMENT = "tiny-report-grid"
GRID_LABELS = {"backbone": "ResNet18-small", "pretraining": "DINO (miniImageNet)", "set": "synthetic",
               "target": "MEM-25"}
TRAIN_DATA = "/data/tiny-train-set"
TARGET_DATA = "/data/tiny-target"
# Class names are what MLflow hands back: the report must escape them.
CLASS_NAMES = ["ferrite", "pearlite", "martensite", "bainite", "<b>widmanstätten & co</b>", "austenite"]
DINO_LOSSES = [8.5, 7.9, 7.2, 6.8, 6.1, 5.9]
KNN = [0.31, 0.45]
# (model key, shot) -> mode -> (mean, ci95, gain, gain_ci95)
SCORES = {
    ("dino", 1): {"protonet": (0.6536, 0.0123, None, None), "finetune": (0.9072, 0.0101, 0.2536, 0.0111)},
    ("dino", 5): {"protonet": (0.8017, 0.0099, None, None), "finetune": (0.9311, 0.0067, 0.1294, 0.0088)},
    ("scratch", 1): {"protonet": (0.4123, 0.0151, None, None), "finetune": (0.4388, 0.0149, 0.0265, 0.0072)},
    ("scratch", 5): {"protonet": (0.5402, 0.0131, None, None), "finetune": (0.5977, 0.0122, 0.0575, 0.0083)},
}


@dataclass
class TinyExperiment:
    dino_run: str = ""
    backbone_uri: str = ""
    protonet_uris: dict[str, str] = field(default_factory=dict)  # "dino" / "scratch" -> models:/metallo-protonet/N
    metatrain_runs: dict[str, str] = field(default_factory=dict)
    evaluation_runs: list[str] = field(default_factory=list)


def build() -> TinyExperiment:
    made = TinyExperiment()
    made.dino_run, made.backbone_uri = log_pretraining()
    for key, source in (("dino", made.backbone_uri), ("scratch", "scratch")):
        made.metatrain_runs[key], made.protonet_uris[key] = log_metatraining(key, source)
    for (key, shot), modes in SCORES.items():
        made.evaluation_runs.append(log_evaluation(made.protonet_uris[key], shot, modes))
    log_grid(made.evaluation_runs[:2])
    return made


def log_grid(evaluation_runs: list[str]) -> str:
    """A grid's parent run in its own experiment: its children (here the DINO ProtoNet's evaluations) live
    in other experiments and carry the grid's names for the table's row."""
    with tracking.start_run(GRID_EXPERIMENT, "grid-tiny", tags={"metallo.stage": "grid"}) as parent:
        parent.log_dict([{"stage": "evaluate", "run_id": run_id, "shot": str(shot), **GRID_LABELS}
                         for run_id, shot in zip(evaluation_runs, (1, 5))], "grid/runs.json")
    return parent.run_id


def register(run_id: str, name: str, artifact: str, tags: dict[str, str], alias: str) -> str:
    """What `registry.log_backbone` leaves in the registry, without logging the weights."""
    client = tracking.client()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact}", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"


def log_pretraining() -> tuple[str, str]:
    config = from_dict(DinoConfig, {
        "data": {"uri": "/data/tiny-unlabelled"},
        "backbone": {"arch": "resnet18", "small_input": True, "image_size": 32},
        "multicrop": {"global_size": 32, "local_size": 16},
        "epochs": 2,
        "run": {"name": "tiny-dino", "experiment": PRETRAIN_EXPERIMENT},
    })
    lineage = {"metallo.stage": "pretrain", "metallo.dataset_uri": config.data.uri,
               "metallo.dataset_manifest_sha256": "ab" * 32, "metallo.config_hash": config_hash(config),
               "metallo.code_version": tracking.code_version()}
    with tracking.open_run(PRETRAIN_EXPERIMENT, config.run.name, config=config, tags=lineage) as run:
        steps = len(DINO_LOSSES) // config.epochs
        for step, loss in enumerate(DINO_LOSSES):
            run.log_metrics({"loss": loss, "lr": 0.001, "epoch": step // steps}, step=step)
        for epoch, knn in enumerate(KNN):
            epoch_loss = float(np.mean(DINO_LOSSES[epoch * steps:(epoch + 1) * steps]))
            run.log_metrics({"epoch": epoch, "epoch_loss": epoch_loss, "knn_accuracy": knn}, step=(epoch + 1) * steps)
        identity = {"metallo.run_id": run.run_id, "metallo.epochs_done": str(config.epochs)}
        uri = register(run.run_id, "metallo-backbone", "teacher_backbone",
                       {**lineage, **identity, "metallo.arch": config.backbone.arch}, "current")
    return run.run_id, uri


def log_metatraining(key: str, source: str) -> tuple[str, str]:
    config = from_dict(MetaTrainConfig, {
        "data": {"uri": TRAIN_DATA},
        "backbone": {"source": source, "arch": "resnet18", "small_input": True, "image_size": 32},
        "episodes": {"way": 5, "shot": 5, "query": 10},
        "epochs": 3,
        "run": {"name": f"tiny-protonet-{key}", "experiment": EXPERIMENT},
    })
    lineage = {"metallo.stage": "metatrain", "metallo.backbone_source": source, "metallo.dataset_uri": TRAIN_DATA,
               "metallo.dataset_manifest_sha256": "cd" * 32, "metallo.config_hash": config_hash(config),
               "metallo.code_version": tracking.code_version()}
    val = [0.52, 0.61, 0.58] if key == "dino" else [0.35, 0.38, 0.41]
    with tracking.open_run(EXPERIMENT, config.run.name, config=config, tags=lineage) as run:
        for epoch, accuracy in enumerate(val):
            run.log_metrics({"train_loss": 1.5 - 0.3 * epoch, "train_accuracy": 0.4 + 0.1 * epoch, "lr": 0.01},
                            step=epoch * 10)
            run.log_metrics({"epoch": epoch, "train_loss": 1.4 - 0.3 * epoch, "val_accuracy": accuracy,
                             "val_ci95": 0.031, "best_val_accuracy": max(val[:epoch + 1])}, step=(epoch + 1) * 10)
        best_epoch = int(np.argmax(val))
        identity = {"metallo.run_id": run.run_id, "metallo.epochs_done": str(config.epochs)}
        uri = register(run.run_id, "metallo-protonet", "protonet",
                       {**lineage, **identity, "metallo.best_val_accuracy": f"{val[best_epoch]:.4f}",
                        "metallo.best_epoch": str(best_epoch), "metallo.arch": "resnet18"}, key)
    return run.run_id, uri


def log_evaluation(model_uri: str, shot: int, modes: dict[str, tuple]) -> str:
    config = from_dict(EvaluateConfig, {
        "model": model_uri,
        "data": {"uri": TARGET_DATA},
        "episodes": {"way": 5, "shot": shot, "query": 4},
        "tasks": 12,
        "modes": list(modes),
        "experiment": EXPERIMENT,
    })
    lineage = {"metallo.stage": "evaluate", "metallo.model_uri": model_uri, "metallo.dataset_uri": TARGET_DATA,
               "metallo.dataset_manifest_sha256": "ef" * 32, "metallo.split": config.split,
               "metallo.task": f"{config.episodes.way}-way {config.episodes.shot}-shot",
               "metallo.config_hash": config_hash(config)}
    result = EvaluationResult(model=model_uri, dataset=TARGET_DATA, split=config.split, way=5, shot=shot, query=4,
                              tasks=config.tasks)
    members = [np.arange(index * 20, (index + 1) * 20) for index in range(len(CLASS_NAMES))]
    tasks = fixed_episodes(members, 5, shot, 4, config.tasks, seed=shot)
    rng = np.random.default_rng(shot)
    with tracking.start_run(EXPERIMENT, f"eval-{model_uri.rsplit('/', 1)[-1]}-5w{shot}s", config=config,
                            tags=lineage) as run:
        for mode, (mean, ci95, _gain, _gain_ci95) in modes.items():
            run.log_metrics({f"{mode}_accuracy": mean, f"{mode}_ci95": ci95, f"{mode}_episodes_per_s": 3.0})
            result.modes[mode] = ModeResult(mean=mean, ci95=ci95, n=config.tasks, episodes_per_s=3.0)
            # predictions right with probability `mean`, otherwise a random other class of the task
            predictions = []
            for task in tasks:
                right = rng.random(len(task.query_labels)) < mean
                wrong = (task.query_labels + rng.integers(1, task.way, len(task.query_labels))) % task.way
                predictions.append(np.where(right, task.query_labels, wrong))
            run.log_dict(confusion_over_tasks(tasks, predictions, CLASS_NAMES).to_json(),
                         f"{CONFUSION_ARTIFACT_DIR}/{mode}.json")
        for mode, (_, _, gain, gain_ci95) in modes.items():
            if gain is not None:
                run.log_metrics({f"{mode}_gain_over_protonet": gain, f"{mode}_gain_ci95": gain_ci95})
                result.gains[mode] = (gain, gain_ci95)
        result.run_id = run.run_id
        run.log_dict(summary_json(result), "summary.json")
    return run.run_id
