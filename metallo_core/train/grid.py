"""Seed 000's experiment grid as one command, on Ray: backbones x meta-training sets x (PN, PN+FT) x shots.

Each cell meta-trains a ProtoNet from a backbone (from scratch, a torchvision weights file, a registry
model, or a DINO run started here), then meta-tests it on the target set's test classes with and
without fine-tuning. The result is the paper's table (markdown and CSV) and its accuracy-vs-shots chart,
written to a folder and logged to the grid's MLflow run; the config and the tables are `fewshot.grid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from metallo_core import tracking
from metallo_core.config import deep_merge, from_dict, migrate_settings, to_dict
from metallo_core.errors import MetalloError
from metallo_core.fewshot.grid import METHOD_LABELS, PRETRAIN_HERE, GridConfig, GridRow, results_csv, results_table
from metallo_core.report.figures import ShotSeries, accuracy_vs_shots
from metallo_core.tracking.figures import FIGURE_DPI, log_figures


def results_figure(rows: list[GridRow], way: int, target: str) -> Figure:
    """Accuracy against shots on `target`, one line per row with its 95% intervals as error bars: one colour
    per (architecture, pre-training, meta-training set), dashed for the fine-tuned methods."""
    identities = list(dict.fromkeys((row.architecture, row.pretraining, row.metatraining) for row in rows))
    series = [
        ShotSeries(
            label=f"{row.architecture} {row.pretraining} / {row.metatraining} / {row.method}",
            accuracies=row.accuracies,
            color=f"C{identities.index((row.architecture, row.pretraining, row.metatraining)) % 10}",
            dashed=row.method != METHOD_LABELS["protonet"],
        )
        for row in rows
    ]
    return accuracy_vs_shots(series, title=f"{target}, {way}-way")


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
            source, spec = backbone.backbone.source, backbone.backbone.spec
            if source == PRETRAIN_HERE:
                # The grid's architecture; DINO's own start (pretrain.backbone.source) stays scratch by default.
                architecture = {key: value for key, value in to_dict(backbone.backbone).items() if key != "source"}
                dino = from_dict(DinoConfig, deep_merge(migrate_settings(DinoConfig, backbone.pretrain), {
                    "backbone": architecture,
                    "run": {"name": f"{config.name}-{backbone.name}-dino".lower()},
                }))
                pretrained = run_dino_pretraining(dino)
                if pretrained.model_uri is None:
                    raise MetalloError(f"the grid's DINO run {dino.run.name!r} registered no backbone; "
                                       "set registry.register: true in its pretrain settings")
                source = pretrained.model_uri
                children.append({"stage": "pretrain", "backbone": backbone.name, "run_id": pretrained.run_id})
            for metatrain_set in config.metatrain_sets:
                set_uri = metatrain_set.uri or config.target_uri
                run_name = f"{config.name}-{backbone.name}-{backbone.pretraining}-{metatrain_set.name}"
                metatrain = from_dict(MetaTrainConfig, deep_merge(config.metatrain, {
                    "data": {"uri": set_uri, "train_split": metatrain_set.train_split,
                             "val_split": metatrain_set.val_split, "image_size": spec.image_size},
                    "backbone": {**to_dict(backbone.backbone), "source": source},
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
    figure = results_figure(rows, config.way, config.target_name)
    figure.savefig(out / "accuracy_vs_shots.png", dpi=FIGURE_DPI)
    for name in ("results.md", "results.csv"):
        run.log_artifact(out / name, "grid")
    log_figures(run.run_id, {"grid/accuracy_vs_shots.png": figure})


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower()).strip("-")
