"""Seed 000's experiment grid: its config (backbones x meta-training sets x (PN, PN+FT) x shots), its rows,
and the paper's table as markdown and CSV. Pure; `metallo_core.train.grid` runs the grid on Ray.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar

from metallo_core.config import Renamed, require
from metallo_core.models.backbone_choice import BackboneChoice
from metallo_core.user_paths import PathSetting

METHOD_LABELS = {"protonet": "ProtoNet (PN)", "finetune": "PN+FT", "finetune_autolr": "PN+FT (auto lr)"}


PRETRAIN_HERE = "pretrain"


@dataclass
class GridBackbone:
    # The older spelling (source and spec beside name), read as the backbone block for one release.
    RENAMED_SETTINGS: ClassVar[tuple[Renamed, ...]] = (Renamed("source", "backbone.source"),
                                                       Renamed("spec", "backbone"))

    name: str  # the table's "Architecture" label, e.g. ResNet50
    pretraining: str = "-"  # the table's "Pre-training" label, e.g. DINO (miniImageNet)
    # backbone.source: any source of metallo_core.models.sources (scratch, imagenet-offline, a weights file,
    # download[:tag], models:/...), or pretrain (run DINO here on this architecture, from
    # pretrain.backbone.source: scratch by default); the architecture fields as in every stage's backbone block.
    backbone: BackboneChoice = field(default_factory=BackboneChoice)
    pretrain: dict[str, Any] = field(default_factory=dict)  # DinoConfig settings when backbone.source is pretrain

@dataclass
class GridMetaTrainSet:
    name: str  # the table's "Meta-training" label
    uri: PathSetting = ""  # "" means the target dataset
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class GridConfig:
    name: str = "seed000"
    target_uri: PathSetting = ""
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
    out: PathSetting = ""  # where the table files go; "" is $METALLO_HOME/grid/<name>

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
