"""Seed 000's experiment grid as one command: backbones x meta-training sets x (PN, PN+FT) x shots.

Each cell meta-trains a ProtoNet from a backbone (from scratch, a torchvision weights file, a registry
model, or a DINO run started here), then meta-tests it on the target set's test classes with and
without fine-tuning. The result is the paper's table (markdown and CSV) and a plot, logged to MLflow.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.config import deep_merge, from_dict, require, to_dict
from metallo_core.models.backbones import BackboneSpec

METHOD_LABELS = {"protonet": "ProtoNet (PN)", "finetune": "PN+FT", "finetune_autolr": "PN+FT (auto lr)"}


@dataclass
class GridBackbone:
    name: str  # the table's "Architecture" label, e.g. ResNet50
    pretraining: str = "-"  # the table's "Pre-training" label, e.g. DINO (miniImageNet)
    # any source of metallo_core.models.sources (scratch, imagenet-offline, a weights file, download[:tag],
    # models:/...), or pretrain (run DINO here)
    source: str = "scratch"
    spec: BackboneSpec = field(default_factory=BackboneSpec)
    pretrain: dict[str, Any] = field(default_factory=dict)  # DinoConfig settings when source == "pretrain"


@dataclass
class GridMetaTrainSet:
    name: str  # the table's "Meta-training" label
    uri: str = ""  # "" means the target dataset
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class GridConfig:
    name: str = "seed000"
    target_uri: str = ""
    target_name: str = "target"
    target_split: str = "test"
    backbones: list[GridBackbone] = field(default_factory=list)
    metatrain_sets: list[GridMetaTrainSet] = field(default_factory=lambda: [GridMetaTrainSet(name="target")])
    way: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    modes: list[str] = field(default_factory=lambda: ["protonet", "finetune"])
    metatrain: dict[str, Any] = field(default_factory=dict)  # shared MetaTrainConfig settings
    evaluate: dict[str, Any] = field(default_factory=dict)  # shared EvaluateConfig settings
    experiment: str = "metallo-grid"
    out: str = ""  # where the table files go; "" is $METALLO_HOME/grid/<name>

    def validate(self) -> None:
        require(bool(self.target_uri), "target_uri is required: the dataset whose test classes are scored")
        require(bool(self.backbones), "backbones must list at least one backbone")
        require(all(shot >= 1 for shot in self.shots) and self.shots, "shots must list shot counts >= 1")
        unknown = [mode for mode in self.modes if mode not in METHOD_LABELS]
        require(not unknown, f"modes: unknown {unknown}; choose from {list(METHOD_LABELS)}")


@dataclass
class GridRow:
    architecture: str
    pretraining: str
    metatraining: str
    method: str
    accuracies: dict[int, tuple[float, float]]  # shot -> (mean, ci95)
    model_uri: str = ""


def results_table(rows: list[GridRow], shots: list[int], way: int, target: str) -> str:
    """The paper's table as markdown: one row per (backbone, meta-training set, method)."""
    headers = ["Architecture", "Pre-training", "Meta-training", "Method"] + [f"{target} ({way}w{s}s)" for s in shots]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row.architecture, row.pretraining, row.metatraining, row.method]
        for shot in shots:
            mean, ci95 = row.accuracies.get(shot, (float("nan"), float("nan")))
            cells.append(f"{100 * mean:.2f}% ± {100 * ci95:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: list[GridRow], shots: list[int]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["architecture", "pretraining", "metatraining", "method", "shot", "accuracy", "ci95", "model"])
    for row in rows:
        for shot in shots:
            if shot in row.accuracies:
                mean, ci95 = row.accuracies[shot]
                writer.writerow([row.architecture, row.pretraining, row.metatraining, row.method, shot,
                                 f"{mean:.6f}", f"{ci95:.6f}", row.model_uri])
    return buffer.getvalue()


def results_plot(rows: list[GridRow], shots: list[int], path: Path) -> None:
    """Accuracy against shots, one line per row, with the 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        available = [s for s in shots if s in row.accuracies]
        axes.errorbar(available, [100 * row.accuracies[s][0] for s in available],
                      yerr=[100 * row.accuracies[s][1] for s in available], marker="o", capsize=3,
                      label=f"{row.architecture} {row.pretraining} / {row.metatraining} / {row.method}")
    axes.set_xlabel("shots per class")
    axes.set_ylabel("accuracy (%)")
    axes.set_xticks(shots)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_grid(config: GridConfig) -> dict[str, Any]:
    from metallo_core.fewshot.config import EvaluateConfig, MetaTrainConfig
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.train.dino import run_dino_pretraining
    from metallo_core.train.evaluate import run_evaluation
    from metallo_core.train.metatrain import run_metatraining

    out = Path(config.out or tracking.local_home() / "grid" / config.name)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[GridRow] = []
    children: list[dict[str, str]] = []
    with tracking.start_run(config.experiment, f"grid-{config.name}", config=config,
                            tags={"metallo.stage": "grid"}) as parent:
        for backbone in config.backbones:
            source, spec = backbone.source, backbone.spec
            if source == "pretrain":
                dino = from_dict(DinoConfig, deep_merge(backbone.pretrain, {
                    "backbone": to_dict(spec),
                    "run": {"name": f"{config.name}-{backbone.name}-dino".lower()},
                }))
                pretrained = run_dino_pretraining(dino)
                source = pretrained.model_uri
                children.append({"stage": "pretrain", "backbone": backbone.name, "run_id": pretrained.run_id})
            for metatrain_set in config.metatrain_sets:
                set_uri = metatrain_set.uri or config.target_uri
                run_name = f"{config.name}-{backbone.name}-{backbone.pretraining}-{metatrain_set.name}"
                metatrain = from_dict(MetaTrainConfig, deep_merge(config.metatrain, {
                    "data": {"uri": set_uri, "train_split": metatrain_set.train_split,
                             "val_split": metatrain_set.val_split, "image_size": spec.image_size},
                    "backbone": {"source": source, "spec": to_dict(spec)},
                    "run": {"name": _slug(run_name)},
                    "registry": {"alias": ""},
                }))
                trained = run_metatraining(metatrain)
                children.append({"stage": "metatrain", "backbone": backbone.name, "set": metatrain_set.name,
                                 "run_id": trained.run_id, "model": trained.model_uri or ""})
                by_mode: dict[str, dict[int, tuple[float, float]]] = {mode: {} for mode in config.modes}
                for shot in config.shots:
                    evaluation = run_evaluation(from_dict(EvaluateConfig, deep_merge(config.evaluate, {
                        "model": trained.model_uri,
                        "data": {"uri": config.target_uri, "image_size": spec.image_size},
                        "split": config.target_split,
                        "episodes": {"way": config.way, "shot": shot},
                        "modes": config.modes,
                        "run_name": _slug(f"{run_name}-{config.way}w{shot}s"),
                    })))
                    # the table's own names for this row, which `metallo report` shows for the run
                    children.append({"stage": "evaluate", "run_id": evaluation.run_id, "shot": str(shot),
                                     "backbone": backbone.name, "pretraining": backbone.pretraining,
                                     "set": metatrain_set.name, "target": config.target_name})
                    for mode, value in evaluation.modes.items():
                        by_mode[mode][shot] = (value.mean, value.ci95)
                for mode in config.modes:
                    rows.append(GridRow(backbone.name, backbone.pretraining, metatrain_set.name,
                                        METHOD_LABELS[mode], by_mode[mode], trained.model_uri or ""))
                _write(out, rows, config, parent)  # partial results survive an interrupted grid
        parent.log_dict(children, "grid/runs.json")
    return {"table": results_table(rows, config.shots, config.way, config.target_name), "out": str(out),
            "run_id": parent.run_id}


def _write(out: Path, rows: list[GridRow], config: GridConfig, run) -> None:
    (out / "results.md").write_text(results_table(rows, config.shots, config.way, config.target_name))
    (out / "results.csv").write_text(results_csv(rows, config.shots))
    results_plot(rows, config.shots, out / "accuracy_vs_shots.png")
    for name in ("results.md", "results.csv", "accuracy_vs_shots.png"):
        run.log_artifact(out / name, "grid")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower()).strip("-")
