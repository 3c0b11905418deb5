"""`metallo quickstart --from-scratch`: the whole pipeline from random weights, at small scale, on synthetic data.

Synthetic few-shot shards -> DINO pretraining -> ProtoNet meta-training -> meta-testing with and without
fine-tuning -> both models registered. Local Ray, the sqlite MLflow store, data generated on the fly;
sized to finish in under 10 minutes on a 2-core CPU. Every default can be overridden (`key=value`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from metallo_core import tracking
from metallo_core.config import apply_overrides, deep_merge, from_dict, migrate_section_overrides
from metallo_core.data.manifest import read_manifest
from metallo_core.errors import DataError

logger = logging.getLogger(__name__)

# The embedded defaults: every stage's config in one place, small enough for a laptop CPU.
DEFAULTS: dict[str, Any] = {
    "data": {"classes": 40, "images_per_class": 40, "size": 40, "seed": 0},
    "pretrain": {
        "backbone": {"arch": "resnet18", "small_input": True, "image_size": 32},
        "data": {"base_size": 36},
        "head": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128},
        "multicrop": {"global_size": 32, "local_size": 16, "local_crops": 2, "global_scale": [0.5, 1.0],
                      "local_scale": [0.15, 0.5], "micrograph": True},
        "optim": {"batch_size_per_worker": 32, "warmup_epochs": 1, "freeze_last_layer_epochs": 1},
        "knn": {"every_epochs": 1, "split": "val", "max_images": 400},
        # Two epochs: on this little data DINO's k-NN accuracy does not improve within the budget (it needs
        # hundreds of epochs); the stage is here to show the pipeline, the meta-training does the learning.
        "epochs": 2,
        "run": {"log_every_steps": 5},
    },
    "metatrain": {
        "episodes": {"way": 5, "shot": 5, "query": 10},
        "episodes_per_epoch": 50,
        "val_episodes": 30,
        "val_shot": 1,
        "optim": {"name": "sgd", "lr": 0.01},
        "epochs": 3,
        "run": {"log_every_steps": 10},
    },
    # 5-way 5-shot, fine-tuning layer4 (the frozen trunk is embedded once per task, far cheaper than
    # updating the whole backbone, which keeps the run within its 10-minute budget).
    # The lr is chosen on meta-validation tasks, never on the test tasks, and lr 0 (plain ProtoNet) is a
    # candidate: on these in-domain synthetic classes fine-tuning need not beat ProtoNet; P>M>F sees its
    # gains under domain shift, which the real-image quickstart shows.
    "evaluate": {
        "episodes": {"way": 5, "shot": 5, "query": 10},
        "tasks": 80,
        "modes": ["protonet", "finetune"],
        "finetune": {"steps": 10, "lr": 0.003, "update": "last_stage", "bn_mode": "train"},
        "select_on_val": True,
        "select_lrs": [0.0, 0.003, 0.01],
        "select_tasks": 16,
        "parallelism": 2,
    },
}


@dataclass
class QuickstartResult:
    protonet: dict[str, float]
    finetune: dict[str, float]
    models: dict[str, str]
    dataset: str
    way: int = 0
    shot: int = 0
    tasks: int = 0
    finetune_lr: float | None = None  # chosen on meta-validation tasks
    # fine-tuning minus ProtoNet, per task over the same tasks: mean and 95% interval
    gain: dict[str, float] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    minutes: float = 0.0


def run_quickstart(overrides: Sequence[str] = (), *, tag: str | None = None) -> QuickstartResult:
    from metallo_core.data.synth_dataset import write_fewshot
    from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.train.dino import run_dino_pretraining
    from metallo_core.train.evaluate import run_evaluation
    from metallo_core.train.metatrain import run_metatraining

    started = time.perf_counter()
    settings = apply_overrides(DEFAULTS, migrate_section_overrides(
        {"pretrain": DinoConfig, "metatrain": MetaTrainConfig}, overrides))
    tag = tag or time.strftime("%Y%m%d-%H%M%S")
    tracking.configure()
    home = tracking.local_home() / "quickstart"
    data = settings["data"]
    uri = str(home / f"fewshot-c{data['classes']}-n{data['images_per_class']}-s{data['size']}-seed{data['seed']}")

    _step(1, "synthetic few-shot shards", uri)
    try:
        read_manifest(uri)
    except DataError:
        write_fewshot(uri, num_classes=data["classes"], images_per_class=data["images_per_class"], size=data["size"],
                      seed=data["seed"], overwrite=True)

    _step(2, "DINO pretraining", f"run quickstart-dino-{tag}")
    dino = from_dict(DinoConfig, deep_merge(settings["pretrain"], {
        "data": {"uri": uri},
        "run": {"name": f"quickstart-dino-{tag}", "experiment": "metallo-quickstart"},
        "registry": {"name": "metallo-backbone", "alias": "quickstart"},
    }))
    pretrained = run_dino_pretraining(dino)

    _step(3, "ProtoNet meta-training", f"from {pretrained.model_uri}")
    metatrain = from_dict(MetaTrainConfig, deep_merge(settings["metatrain"], {
        "data": {"uri": uri, "image_size": dino.backbone.image_size},
        "backbone": {"source": pretrained.model_uri},
        "run": {"name": f"quickstart-protonet-{tag}", "experiment": "metallo-quickstart"},
        "registry": {"name": "metallo-protonet", "alias": "quickstart"},
    }))
    metatrained = run_metatraining(metatrain)

    _step(4, "meta-testing: ProtoNet and fine-tuning",
          f"on the {len(read_manifest(uri).splits['test'].classes)} test classes")
    evaluation = run_evaluation(from_dict(EvaluateConfig, deep_merge(settings["evaluate"], {
        "model": metatrained.model_uri,
        "data": {"uri": uri, "image_size": dino.backbone.image_size},
        "experiment": "metallo-quickstart",
        "run_name": f"quickstart-eval-{tag}",
    })))
    modes = {mode: {"mean": value.mean, "ci95": value.ci95} for mode, value in evaluation.modes.items()}
    return QuickstartResult(
        protonet=modes.get("protonet", {}),
        finetune=modes.get("finetune", {}),
        models={"backbone": pretrained.model_uri or "", "protonet": metatrained.model_uri or ""},
        dataset=uri,
        way=evaluation.way,
        shot=evaluation.shot,
        tasks=evaluation.tasks,
        finetune_lr=evaluation.selection.get("best", {}).get("lr"),
        gain=dict(zip(("mean", "ci95"), evaluation.gains.get("finetune", ()))),
        runs={"pretrain": pretrained.run_id, "metatrain": metatrained.run_id, "evaluate": evaluation.run_id},
        minutes=(time.perf_counter() - started) / 60,
    )


def describe(result: QuickstartResult) -> str:
    rows = [
        "",
        f"metallo quickstart finished in {result.minutes:.1f} min",
        "",
        f"| method | {result.way}-way {result.shot}-shot accuracy over {result.tasks} test tasks (95% interval) |",
        "|---|---|",
        f"| ProtoNet (PN) | {100 * result.protonet['mean']:.2f}% ± {100 * result.protonet['ci95']:.2f} |",
        f"| PN + fine-tuning (PN+FT) | {100 * result.finetune['mean']:.2f}% ± {100 * result.finetune['ci95']:.2f} |",
        "",
        (f"PN+FT - PN, paired over the same tasks: {100 * result.gain['mean']:+.2f} "
         f"± {100 * result.gain['ci95']:.2f} points"
         if result.gain else ""),
        finetune_choice_line(result.finetune_lr),
        f"registered backbone: {result.models['backbone']}",
        f"registered ProtoNet: {result.models['protonet']}",
        f"MLflow experiment 'metallo-quickstart'; open the UI with: {tracking.ui_command()}",
    ]
    return "\n".join(rows)


def _step(number: int, title: str, detail: str) -> None:
    """A stage line: progress, so on stderr with the other progress lines (the result table is on stdout)."""
    logger.info("[quickstart %d/4] %s: %s", number, title, detail)


def finetune_choice_line(lr: float | None) -> str:
    """What the meta-val selection chose, in words; lr 0 means fine-tuning did not beat ProtoNet there."""
    if lr is None:
        return ""
    if lr == 0:
        return ("fine-tuning lr 0 chosen on meta-validation tasks: no lr tried beat plain ProtoNet there, "
                "so PN+FT is ProtoNet")
    return f"fine-tuning lr {lr:g}, chosen on meta-validation tasks"
