"""Seed 002's tables: our grid's errors and epochs to saturation as markdown, next to the paper's numbers."""

from __future__ import annotations

from typing import Any

from metallo_core.multilabel.config import ExperimentsConfig, VariantSettings
from metallo_core.multilabel.grid import variant_properties
from metallo_core.multilabel.properties import PropertyInfo
from metallo_core.multilabel.train import CUMULATIVE

# Seed 002 (Senapati 2020), frozen ImageNet ResNet-50, 3,500 images. (test fraction) -> (error, epochs).
SEED002_SINGLE = {
    "morphology": {0.1: (0.0, 38), 0.5: (0.0, 698), 0.9: (0.003175, 1024), 0.95: (0.026466, 1024)},
    "volume_fraction_class": {0.1: (0.004011, 212), 0.5: (0.009882, 902), 0.9: (0.023556, 1024),
                              0.95: (0.062126, 1024)},
}
# Table 3: bifurcated head, fc width -> (cumulative error, saturation epochs); the split is not stated.
SEED002_BIFURCATED = {100: (0.081429, 320), 1000: (0.080119, 521)}
SEED002_PAIR = ("morphology", "volume_fraction_class")


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _variant_title(variant: VariantSettings, names: list[str], infos: dict[str, PropertyInfo]) -> str:
    encoder = "small CNN from scratch" if variant.encoder == "small_cnn" else "frozen backbone"
    heads = ", ".join(f"{name} ({'class' if infos[name].is_class else 'regression'})" for name in names)
    return f"### {variant.name}: {encoder}, shared fc {variant.fc_width}, heads: {heads}"


def render_tables(rows: list[dict[str, Any]], config: ExperimentsConfig, properties: list[PropertyInfo],
                  backbone: str, *, random_init: bool = False) -> str:
    infos = {prop.name: prop for prop in properties}
    lines = [
        "## Seed 002 reproduction: multi-label quantification on frozen features",
        "",
        f"Backbone: {backbone}." + (" **The extractor is randomly initialised: a frozen random network says "
                                    "nothing about transfer learning.**" if random_init else ""),
        f"Data: {config.data.uri}, test set carved per class (stratified by the dataset label), split seed "
        f"{config.data.split_seed}. Optimiser {config.optim.optimizer} lr {config.optim.lr:g}, batch "
        f"{config.optim.batch_size}, up to {config.optim.max_epochs} epochs (variants may cap lower)"
        + (f", early stopping on {config.optim.validation_fraction:g} of the training rows (patience "
           f"{config.optim.patience})." if config.optim.validation_fraction and config.optim.patience else "."),
        "",
        "*Error* = test error rate of the weights kept (the best validation epoch with early stopping, else the "
        "last; no model selection on the test set); for regression heads "
        "the mean absolute error in the property's units. *Cumulative* = sum of the classification error rates "
        "(seed 002's measure). *Epochs to saturation* = the first epoch whose test error (the cumulative error "
        f"for multi-head models) is within {100 * config.optim.saturation_tolerance:g} percentage points of the "
        "lowest test error the run reached.",
        "",
    ]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    for variant in config.variants:
        variant_rows = sorted(by_variant.get(variant.name, []), key=lambda row: row["test_fraction"])
        names = variant_properties(config, variant)
        seed_single = SEED002_SINGLE.get(names[0]) if len(names) == 1 and variant.encoder == "pretrained" else None
        class_names = [name for name in names if infos[name].is_class]
        header = ["test fraction", "train / test images"]
        header += [f"{name} {'error' if infos[name].is_class else 'MAE'}" for name in names]
        if len(class_names) > 1:
            header.append("cumulative error")
        header += ["epochs to saturation", "epochs run"]
        if seed_single:
            header += ["seed 002 error", "seed 002 epochs"]
        lines += [_variant_title(variant, names, infos), "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for row in variant_rows:
            cells = [f"{row['test_fraction']:g}", f"{row['num_train']} / {row['num_test']}"]
            for name in names:
                value = row[f"error/{name}"]
                cells.append(_percent(value) if infos[name].is_class else f"{value:.4f}")
            if len(class_names) > 1:
                cells.append(_percent(row[CUMULATIVE]))
            cells += [str(row["epochs_to_saturation"]), str(row["epochs_trained"])]
            if seed_single:
                reference = seed_single.get(round(row["test_fraction"], 4))
                cells += [_percent(reference[0]), str(reference[1])] if reference else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        if not variant_rows:
            lines.append("| (no finished trials) |")
        lines.append("")
    lines += _seed_table3(rows, config)
    return "\n".join(lines).rstrip() + "\n"


def _seed_table3(rows: list[dict[str, Any]], config: ExperimentsConfig) -> list[str]:
    """Seed 002's Table 3 next to ours: bifurcated (morphology + volume fraction class) models by fc width."""
    bifurcated = [variant for variant in config.variants if variant.encoder == "pretrained"
                  and sorted(variant_properties(config, variant)) == sorted(SEED002_PAIR)]
    if not bifurcated:
        return []
    lines = ["### Seed 002 Table 3 vs ours: cumulative error of the two classification heads", "",
             "| model | fc width | test fraction | ours: cumulative error | ours: epochs to saturation | "
             "seed 002: cumulative error | seed 002: saturation epochs |", "|---|---|---|---|---|---|---|"]
    for variant in bifurcated:
        reference = SEED002_BIFURCATED.get(variant.fc_width)
        for row in sorted((r for r in rows if r["variant"] == variant.name), key=lambda r: r["test_fraction"]):
            seed_cells = [_percent(reference[0]) + " (split not stated)", str(reference[1])] if reference else ["", ""]
            cells = [variant.name, str(variant.fc_width), f"{row['test_fraction']:g}", _percent(row[CUMULATIVE]),
                     str(row["epochs_to_saturation"]), *seed_cells]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
