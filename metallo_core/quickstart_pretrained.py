"""`metallo quickstart --pretrained`: a real start from the offline ImageNet EfficientNet-Lite0.

Registers the pretrained backbone (`models:/metallo-backbone@pretrained`) and a ProtoNet on it
(`models:/metallo-protonet@pretrained`, cosine head at the fine-tuning's chosen scale) together with the
fine-tuning settings chosen on held-apart X-SDD selection tasks (so `metallo classify --finetune` uses them),
then scores PN and PN+FT on real images: X-SDD's test pool when the folder is there (`--eval-images`, default
`../shared/data/x-sdd`), else the synthetic benchmark's test classes (said plainly). Offline, no Ray,
no meta-training: the numbers are the pretrained network's, measured honestly
(metallo_core/fewshot/folder_benchmark.py explains the selection/test split).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.config import apply_overrides

logger = logging.getLogger(__name__)

DEFAULT_EVAL_IMAGES = "../shared/data/x-sdd"
BACKBONE_NAME, PROTONET_NAME, ALIAS = "metallo-backbone", "metallo-protonet", "pretrained"

PRETRAINED_DEFAULTS: dict[str, Any] = {
    # The registered spec runs at the network's native 224 px (classify resizes or tiles to it).
    "image_size": 224,
    "evaluate": {
        # X-SDD images are 128 px: scored at their own scale (224 was within 0.5 points on selection tasks,
        # at 3.5x the cost; see benchmarks/real_fewshot.py).
        "size": 128,
        "way": 5,
        "shots": [1, 5],
        "query": 15,
        "tasks": 200,
        "seed": 1,
        "split_seed": 0,
        "selection_fraction": 0.3,
        "synthetic": {"classes": 40, "images_per_class": 30, "size": 128, "seed": 0},
    },
    # Fine-tuning (finetune.FinetuneSettings, the rest at its defaults, chosen on X-SDD selection tasks): the
    # one engine scores the tasks below and `metallo classify --finetune` runs it, as recorded on the
    # registered ProtoNet version.
    "finetune": {"steps": 10, "lr": 0.003, "update": "last_block", "bn_mode": "eval",
                 "pseudo_queries_per_class": 8},
}


@dataclass
class PretrainedQuickstartResult:
    models: dict[str, str]
    evaluated_on: str  # where the tasks came from, in words
    results: list[dict] = field(default_factory=list)  # folder_benchmark.TaskSetResult as dicts
    run_id: str = ""
    minutes: float = 0.0


def resolve_eval_images(eval_images: str | None, repo_root: Path | None = None) -> Path | None:
    """The X-SDD (or other labelled) folder to score on: the flag's value (must exist), else the default
    relative to the repository if it is there, else None (the synthetic benchmark is used)."""
    from metallo_core.errors import ConfigError

    if eval_images:
        path = Path(eval_images).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--eval-images {path} is not a directory of class folders (<dir>/<class>/<image>)")
        return path
    root = repo_root or Path(__file__).resolve().parent.parent
    default = (root / DEFAULT_EVAL_IMAGES).resolve()
    return default if default.is_dir() else None


def run_pretrained_quickstart(overrides: list[str] = (), eval_images: str | None = None) -> PretrainedQuickstartResult:
    from metallo_core.fewshot.finetune import FinetuneSettings
    from metallo_core.fewshot.folder_benchmark import PRETRAINED_COSINE_SCALE
    from metallo_core.fewshot.protonet import ProtoNet
    from metallo_core.models.finetune_choice import record_chosen_settings
    from metallo_core.models.protonet_store import protonet_metadata
    from metallo_core.models.registry import log_backbone
    from metallo_core.models.sources import offline_imagenet_backbone

    started = time.perf_counter()
    settings = apply_overrides(PRETRAINED_DEFAULTS, list(overrides))
    finetune = FinetuneSettings(**settings["finetune"])
    finetune.validate()
    folder_path = resolve_eval_images(eval_images)
    tracking.configure()
    _step(1, "offline ImageNet EfficientNet-Lite0", "from the installed wheel (nothing downloaded)")
    backbone, spec = offline_imagenet_backbone(settings["image_size"])
    with tracking.start_run("metallo-quickstart", f"quickstart-pretrained-{time.strftime('%Y%m%d-%H%M%S')}",
                            config=settings, tags={"metallo.stage": "quickstart-pretrained"}) as run:
        _step(2, "registering", f"{BACKBONE_NAME}@{ALIAS} and {PROTONET_NAME}@{ALIAS}")
        lineage = {"metallo.source": spec.weights, "metallo.arch": spec.arch}
        registered_backbone = log_backbone(run.run_id, backbone, spec, registered_name=BACKBONE_NAME, alias=ALIAS,
                                           tags=lineage)
        # No meta-training: the head's scale only shapes the fine-tuning loss (ranking prototypes ignores it),
        # so it is the one chosen for fine-tuning on the selection tasks.
        protonet = ProtoNet(backbone, cosine_scale=PRETRAINED_COSINE_SCALE)
        registered_protonet = log_backbone(
            run.run_id, protonet.backbone, spec, registered_name=PROTONET_NAME, alias=ALIAS, artifact_name="protonet",
            tags={**lineage, "metallo.backbone_model": registered_backbone.uri, "metallo.meta_training": "none"},
            metadata=protonet_metadata(protonet))
        record_chosen_settings(run.run_id, registered_protonet.uri, finetune,
                               "quickstart --pretrained defaults, chosen on held-apart X-SDD selection tasks")
        _step(3, "meta-testing: ProtoNet and fine-tuning",
              str(folder_path) if folder_path else "X-SDD not found: the synthetic benchmark's test classes")
        results, evaluated_on = evaluate(settings, folder_path)
        for result in results:
            tag = f"{result['way']}w{result['shot']}s"
            run.log_metrics({f"{tag}/{name}_accuracy": s["mean"] for name, s in result["methods"].items()})
            run.log_metrics({f"{tag}/{name}_ci95": s["ci95"] for name, s in result["methods"].items()})
        run.log_dict({"evaluated_on": evaluated_on, "results": results}, "quickstart_pretrained.json")
        run_id = run.run_id
    return PretrainedQuickstartResult(
        models={"backbone": registered_backbone.uri, "protonet": registered_protonet.uri,
                "backbone_alias": f"models:/{BACKBONE_NAME}@{ALIAS}",
                "protonet_alias": f"models:/{PROTONET_NAME}@{ALIAS}"},
        evaluated_on=evaluated_on, results=results, run_id=run_id, minutes=(time.perf_counter() - started) / 60)


def evaluate(settings: dict[str, Any], folder_path: Path | None) -> tuple[list[dict], str]:
    """PN and PN+FT on the test pool of a labelled folder, or on synthetic test classes."""
    from metallo_core.config import from_dict
    from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
    from metallo_core.fewshot.folder_benchmark import (
        as_dict,
        draw_tasks,
        folder_cache,
        pretrained_protonet,
        read_labelled_folder,
        score_task_set,
        split_pools,
    )
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.models.sources import offline_imagenet_backbone

    evaluation = settings["evaluate"]
    finetune = from_dict(FinetuneSettings, settings["finetune"], "finetune")
    if folder_path is not None:
        folder = read_labelled_folder(folder_path, evaluation["size"])
        _, pools = split_pools(folder.labels, evaluation["selection_fraction"], evaluation["split_seed"])
        evaluated_on = (f"{folder_path}: test pool ({sum(map(len, pools))} of {len(folder.images)} images; "
                        f"{evaluation['selection_fraction']:.0%} per class held apart for choosing settings)")
    else:
        folder = synthetic_test_folder(**evaluation["synthetic"])
        pools = [list_rows for list_rows in _rows_by_class(folder.labels)]
        evaluated_on = (f"the synthetic benchmark's {len(folder.classes)} test classes (no X-SDD folder found: "
                        "pass --eval-images DIR for real images)")
    backbone, spec = offline_imagenet_backbone(evaluation["size"])
    engine = FinetuneEngine(pretrained_protonet(backbone), finetune, ImageNormalizer.for_backbone(spec))
    cache = folder_cache(folder, engine)
    results = []
    for shot in evaluation["shots"]:
        episodes = draw_tasks(pools, evaluation["way"], shot, evaluation["query"], evaluation["tasks"],
                              evaluation["seed"], folder.classes)
        result, _ = score_task_set(engine, cache, episodes, ["pn", "ft"], evaluation["seed"])
        results.append(as_dict(result))
    return results, evaluated_on


def synthetic_test_folder(classes: int, images_per_class: int, size: int, seed: int):
    """The synthetic few-shot benchmark's test classes rendered in memory, as a LabelledFolder."""
    import numpy as np

    from metallo_core.data.synthetic.fewshot import (
        fewshot_classes,
        render_images,
        split_classes,
    )
    from metallo_core.fewshot.folder_benchmark import LabelledFolder

    all_classes = fewshot_classes(classes, seed=seed)
    index = {spec.name: i for i, spec in enumerate(all_classes)}
    test = split_classes(all_classes, seed=seed)["test"]
    images = [render_images(spec, index[spec.name], images_per_class, size=size, seed=seed) for spec in test]
    grey = np.concatenate(images)
    return LabelledFolder(np.repeat(grey[..., None], 3, axis=-1), np.repeat(np.arange(len(test)), images_per_class),
                          [spec.name for spec in test], "synthetic")


def _rows_by_class(labels):
    import numpy as np

    return [np.flatnonzero(labels == label) for label in np.unique(labels)]


def describe(result: PretrainedQuickstartResult) -> str:
    lines = ["", f"metallo quickstart --pretrained finished in {result.minutes:.1f} min",
             f"evaluated on {result.evaluated_on}", "",
             "| task | ProtoNet (PN), frozen ImageNet backbone | PN + fine-tuning (PN+FT) "
             "| PN+FT - PN, paired (points) |",
             "|---|---|---|---|"]
    for r in result.results:
        pn, ft, gain = r["methods"]["pn"], r["methods"]["ft"], r["gains"]["ft - pn"]
        lines.append(f"| {r['way']}-way {r['shot']}-shot, {r['tasks']} tasks | {100 * pn['mean']:.2f}% ± "
                     f"{100 * pn['ci95']:.2f} | {100 * ft['mean']:.2f}% ± {100 * ft['ci95']:.2f} | "
                     f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f} |")
    lines += ["", f"registered backbone: {result.models['backbone_alias']} ({result.models['backbone']})",
              f"registered ProtoNet: {result.models['protonet_alias']} ({result.models['protonet']})",
              (f"classify with it: metallo classify --model {result.models['protonet_alias']} --support S --query Q "
               "[--finetune]"),
              f"MLflow experiment 'metallo-quickstart'; open the UI with: {tracking.ui_command()}"]
    return "\n".join(lines)


def _step(number: int, title: str, detail: str) -> None:
    """A stage line: progress, so on stderr with the other progress lines (the result table is on stdout)."""
    logger.info("[quickstart --pretrained %d/3] %s: %s", number, title, detail)
