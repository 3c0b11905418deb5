"""Few-shot accuracy on real images (X-SDD by default) with the offline ImageNet EfficientNet-Lite0:
plain ProtoNet (PN) and PN + per-task fine-tuning (PN+FT), N-way K-shot, mean ± 95% interval over fixed
tasks and FT - PN paired per task; plus the cost of a fine-tuning step (--cost).

    uv run --frozen python benchmarks/real_fewshot.py --tasks 600 --shots 1,5 \
        --methods pn,ft --out results/real_fewshot.json --markdown results/real_fewshot.md
    uv run --frozen python benchmarks/real_fewshot.py --select   # the choice
    uv run --frozen python benchmarks/real_fewshot.py --cost --cost-backbones efficientnet_lite0,resnet50
    uv run --frozen python benchmarks/real_fewshot.py --levers --tasks 600 --shots 1,5 \
        --out results/levers.json --markdown results/levers.md   # each inference lever, PN and PN+FT
    uv run --frozen python benchmarks/real_fewshot.py --networks --tasks 600 --shots 1,5 \
        --out results/networks.json --markdown results/networks.md   # Lite0 / Lite1 / Lite2, frozen
    uv run --frozen python benchmarks/real_fewshot.py --adapt --adapt-epochs 10 \
        --adapt-out results/xsdd_adapted.pth --tasks 600 --methods pn   # row (d), paired vs row (a)
    uv run --frozen python benchmarks/real_fewshot.py --through-classify \
        --model models:/metallo-protonet@quickstart --tasks 100 --shots 1   # classify agrees with the engine

Protocol (metallo_core/fewshot/folder_benchmark.py): each class's images are cut once (seeded) into the
pools `metallo quickstart` uses (--pools, --pool-seed: DINO's unlabelled `train` pool, the selection pool
`val`, the `test` pool). `--select` scores fine-tuning settings on tasks of the selection pool; the
reported tasks come from the test pool only. Fine-tuning is the one engine of
metallo_core/fewshot/finetune.py (`--finetune key=value` overrides its FinetuneSettings, whose defaults are
the selected ones). `--through-classify` scores test-pool tasks through `metallo classify --finetune` on the
real files and, beside it, the engine called directly on the same tasks, paired.
`--adapt` runs domain-adaptive DINO (configs/pretrain/domain_adapt_efficientnet_lite0.yaml at the benchmark's
image size, Ray-free) on the `train` pool's images without their labels, and scores the adapted teacher
on the same test tasks as the ImageNet backbone, paired per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from result_files import print_and_write  # benchmarks/, beside this script

from metallo_core.datasets import xsdd_images
from metallo_core.quickstart import DEFAULTS as QUICKSTART

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_POOLS = QUICKSTART["pools"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(xsdd_images()),
                        help="<root>/<class>/<image> folder (default: the built-in X-SDD)")
    parser.add_argument("--size", type=int, default=128, help="input side in px (X-SDD's own 128; 224 native)")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shots", default="1,5", help="comma-separated shots")
    parser.add_argument("--query", type=int, default=15, help="queries per class")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--methods", default="pn,ft", help="pn (frozen ProtoNet), ft (PN + fine-tuning)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the task draws and the fine-tuning draws")
    parser.add_argument("--pools", default=",".join(map(str, QUICKSTART_POOLS["fractions"])),
                        help="fractions of each class for the pools train (DINO's, unlabelled), val (selection) "
                             "and test; the quickstart's by default")
    parser.add_argument("--pool-seed", type=int, default=QUICKSTART_POOLS["seed"], help="seed of the pools' cut")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="key=value",
                        help="FinetuneSettings overrides, e.g. lr=0.001 steps=20 cache_stage=4 bn_mode=eval")
    parser.add_argument("--select", action="store_true", help="score a grid of fine-tuning settings on selection tasks")
    parser.add_argument("--select-tasks", type=int, default=100)
    parser.add_argument("--select-query", type=int, default=10)
    parser.add_argument("--grid", nargs="*", default=[], metavar="key=v1,v2",
                        help="the --select grid, e.g. lr=0.003,0.01 steps=10,25 (default: SELECTION_GRID)")
    parser.add_argument("--through-classify", action="store_true",
                        help="score --tasks test-pool tasks through the classify API on the real files (support "
                             "as <class>/<file> links, queries as a folder), and the engine directly on the same "
                             "tasks, paired")
    parser.add_argument("--model", default="models:/metallo-protonet@quickstart",
                        help="the registered ProtoNet --through-classify classifies with")
    parser.add_argument("--cost", action="store_true", help="time fine-tuning steps per backbone at 224 px")
    parser.add_argument("--cost-backbones", default="efficientnet_lite0,resnet18,resnet50")
    parser.add_argument("--cost-supports", default="1,5,10,25")
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--backbone", default="imagenet-offline",
                        help="backbone source: imagenet-offline, or an EfficientNet-Lite0 weights file (a DINO "
                             "checkpoint's teacher, e.g. one --adapt-out wrote, or a metallo pretrain export)")
    parser.add_argument("--adapt", action="store_true",
                        help="row (d): domain-adaptive DINO from --backbone on the train pool's images (labels "
                             "unused), then score the adapted backbone, paired against the ImageNet one")
    parser.add_argument("--adapt-config", default=str(REPO / "configs/pretrain/domain_adapt_efficientnet_lite0.yaml"))
    parser.add_argument("--adapt-epochs", type=int, default=10)
    parser.add_argument("--adapt-out", help="write the adapted teacher backbone's state dict here")
    parser.add_argument("--adapt-set", nargs="*", default=[], metavar="key=value",
                        help="DinoConfig overrides for --adapt, e.g. head.use_bn=true")
    parser.add_argument("--levers", action="store_true",
                        help="score each inference setting of --lever-set (fewshot.inference) on PN and PN+FT on "
                             "the same test-pool tasks (one adaptation per task, the evaluation's own scoring "
                             "path), paired against plain PN and against the same mode with plain inference")
    parser.add_argument("--lever-set", nargs="*", metavar="key=value[,key=value]",
                        default=["power=0.5", "transductive=soft_kmeans", "transductive=soft_kmeans,power=0.5",
                                 "transductive=bd_cspn", "transductive=bd_cspn,power=0.5"],
                        help="inference settings to score beside plain, each as comma-separated key=value")
    parser.add_argument("--networks", action="store_true",
                        help="score each offline ImageNet network of --network-set, frozen, with plain inference and "
                             "each --lever-set entry, on the same selection-pool and test-pool tasks, paired against "
                             "the first network (what the quickstart's start choice weighs, and what it would give)")
    parser.add_argument("--network-set", default="imagenet-offline,imagenet-offline:lite1,imagenet-offline:lite2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--markdown", help="write the tables as markdown here")
    return parser.parse_args(argv)


def pool_fractions(args: argparse.Namespace) -> tuple[float, ...]:
    return tuple(float(value) for value in args.pools.split(","))


def finetune_settings(overrides: list[str], base=None):
    """FinetuneSettings: `base` (default: the defaults) with key=value overrides, validated."""
    from metallo_core.config import apply_overrides, from_dict, to_dict
    from metallo_core.fewshot.finetune import FinetuneSettings

    values = apply_overrides(to_dict(base or FinetuneSettings()), overrides)
    return from_dict(FinetuneSettings, values, "finetune")


def percent(summary: dict) -> str:
    return f"{100 * summary['mean']:.2f}% ± {100 * summary['ci95']:.2f}"


def accuracy_table(results: list[dict], title: str) -> str:
    def points(gain: dict | None) -> str:
        return f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f}" if gain else ""

    versus_imagenet = any(name.endswith("- imagenet_pn") for result in results for name in result["gains"])
    lines = [f"| {title} | method | accuracy (95% interval) | FT - PN, paired (points) | wall s |"
             + (" vs ImageNet PN, paired (points) |" if versus_imagenet else ""),
             "|---|---|---|---|---|" + ("---|" if versus_imagenet else "")]
    for result in results:
        task = f"{result['way']}-way {result['shot']}-shot, {result['tasks']} tasks"
        for name, summary in result["methods"].items():
            label = {"pn": "ProtoNet (frozen)", "ft": "PN + fine-tuning",
                     "imagenet_pn": "ProtoNet, ImageNet backbone (a)"}.get(name, name)
            line = f"| {task} | {label} | {percent(summary)} | {points(result['gains'].get(f'{name} - pn'))} | " \
                   f"{summary['seconds']:.0f} |"
            if versus_imagenet:
                line += f" {points(result['gains'].get(f'{name} - imagenet_pn'))} |"
            lines.append(line)
    return "\n".join(lines)


def load(args: argparse.Namespace, settings):
    """(folder, engine on the benchmark's ProtoNet, cache of every image, selection pools, test pools)."""
    from metallo_core.fewshot.folder_benchmark import benchmark_engine, folder_cache, read_labelled_folder, split_pools
    from metallo_core.models.sources import offline_imagenet_spec
    from metallo_core.tracking.backbone_store import backbone_from_any_source

    started = time.perf_counter()
    folder = read_labelled_folder(args.data, args.size)
    pools = split_pools(folder, pool_fractions(args), args.pool_seed)
    selection, test = pools["val"], pools["test"]
    backbone, spec = backbone_from_any_source(args.backbone, offline_imagenet_spec(args.size))
    if args.adapt:
        backbone = domain_adapted(args, folder, pools["train"])
    engine = benchmark_engine(backbone, spec, settings)
    cache = folder_cache(folder, engine)
    print(f"{len(folder.images)} images of {len(folder.classes)} classes from {folder.root} at {args.size} px; "
          f"cache ({settings.pseudo_queries}) in {time.perf_counter() - started:.0f} s; selection pool "
          f"{sum(map(len, selection))}, test pool {sum(map(len, test))} images", flush=True)
    return folder, engine, cache, selection, test


def domain_adapted(args: argparse.Namespace, folder, unlabelled):
    """Continue DINO from `--backbone` (teacher and student both start from it) on the `train` pool's
    images, labels unused, with the domain-adaptive recipe at the benchmark's image size; returns the
    teacher backbone. The k-NN probe printed per epoch uses that pool's labels (monitoring only:
    nothing is chosen on it)."""
    import numpy as np

    from metallo_core.config import apply_overrides, from_dict, migrate_overrides, migrate_settings, read_yaml
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.ssl.learning_curve import dino_learning_curve

    local = max(32, round(args.size * 96 / 224 / 8) * 8)  # DINO's 96/224 local-to-global ratio
    overrides = [f"epochs={args.adapt_epochs}", f"seed={args.seed}", f"data.base_size={args.size}",
                 f"backbone.image_size={args.size}", f"multicrop.global_size={args.size}",
                 f"multicrop.local_size={local}", *args.adapt_set]
    # The config's and the overrides' older spellings first, so the start below replaces either one.
    raw = apply_overrides(migrate_settings(DinoConfig, read_yaml(args.adapt_config)),
                          migrate_overrides(DinoConfig, overrides))
    raw.setdefault("data", {})["uri"] = "memory:train-pool"
    raw.setdefault("backbone", {})["source"] = args.backbone  # student and teacher both start from it
    config = from_dict(DinoConfig, raw)
    config.validate()
    rows = np.concatenate(unlabelled)
    images, labels = folder.images[rows], folder.labels[rows]
    print(f"domain-adaptive DINO: {len(rows)} train-pool images at {args.size} px (labels unused), "
          f"{args.adapt_epochs} epochs, config {args.adapt_config}", flush=True)
    print(f"{'epoch':>5} {'loss':>8} {'knn_acc':>8} {'seconds':>8}", flush=True)

    def show(point):
        loss = "-" if point.loss is None else f"{point.loss:.4f}"
        print(f"{point.epoch:>5} {loss:>8} {point.knn_accuracy:>8.3f} {point.seconds:>8.0f}", flush=True)

    curve = dino_learning_curve(config, images, images, labels, probe_every=1, on_point=show)
    adapted = curve.teacher_backbone
    if args.adapt_out:
        Path(args.adapt_out).parent.mkdir(parents=True, exist_ok=True)
        torch.save({key: value.detach().cpu() for key, value in adapted.state_dict().items()}, args.adapt_out)
        print(f"wrote the adapted teacher backbone to {args.adapt_out}", flush=True)
    return adapted


def imagenet_features(args: argparse.Namespace, folder, settings):
    """(model, (N, D) features of every image) with the offline ImageNet backbone: the (a) baseline."""
    from metallo_core.fewshot.folder_benchmark import benchmark_engine, folder_cache
    from metallo_core.models.sources import offline_imagenet_backbone

    backbone, spec = offline_imagenet_backbone(args.size)
    engine = benchmark_engine(backbone, spec, settings)
    return engine.model, engine.embed(folder_cache(folder, engine))


def run_tasks(args: argparse.Namespace, settings) -> list[dict]:
    from metallo_core.fewshot.folder_benchmark import (
        MethodScores,
        as_dict,
        draw_tasks,
        features_accuracies,
        score_task_set,
    )
    from metallo_core.fewshot.metrics import paired_gain

    folder, engine, cache, _, test = load(args, settings)
    methods = [m for m in args.methods.split(",") if m]
    reference = imagenet_features(args, folder, settings) if args.adapt or args.backbone != "imagenet-offline" else None
    results = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(test, args.way, shot, args.query, args.tasks, args.seed, folder.classes)
        result, scores = score_task_set(engine, cache, episodes, methods, args.seed,
                                        on_task=lambda i, shot=shot: (i + 1) % 100 == 0 and print(
                                            f"  {shot}-shot: {i + 1} tasks fine-tuned", flush=True))
        if reference is not None:  # the same tasks with the ImageNet backbone's ProtoNet, paired per task
            baseline = features_accuracies(*reference, episodes)
            result.methods["imagenet_pn"] = MethodScores("imagenet_pn", baseline, 0.0).summary()
            for name, score in scores.items():
                mean, ci95 = paired_gain(baseline, score.accuracies)
                result.gains[f"{name} - imagenet_pn"] = {"mean": mean, "ci95": ci95}
        results.append(as_dict(result))
        print(accuracy_table([results[-1]], "X-SDD test pool"), flush=True)
    return results


def lever_settings(entries: list[str]) -> list[dict]:
    """Plain inference first, then each --lever-set entry as a validated InferenceSettings dict."""
    from metallo_core.config import apply_overrides, from_dict, to_dict
    from metallo_core.fewshot.inference import InferenceSettings

    settings = [to_dict(InferenceSettings())]
    for entry in entries:
        chosen = from_dict(InferenceSettings, apply_overrides(to_dict(InferenceSettings()), entry.split(",")),
                           "inference")
        chosen.validate()
        settings.append(to_dict(chosen))
    return settings


def run_levers(args: argparse.Namespace, settings) -> list[dict]:
    """Per shot and meta-test mode, every inference setting's per-task accuracy on the same test-pool tasks,
    through `evaluation.engine_predictions_by_inference` (what `metallo evaluate` runs), with paired gains."""
    from metallo_core.config import from_dict
    from metallo_core.fewshot.evaluation import PreparedImages, engine_predictions_by_inference, task_accuracy
    from metallo_core.fewshot.folder_benchmark import draw_tasks
    from metallo_core.fewshot.inference import InferenceSettings
    from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain

    folder, engine, _, _, test = load(args, settings)
    prepared = PreparedImages(engine, folder.images, precision="fp32")
    candidates = lever_settings(args.lever_set)
    rows = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(test, args.way, shot, args.query, args.tasks, args.seed, folder.classes)
        per_task: dict[tuple[str, int], list[float]] = {}
        seconds = {}
        for mode in ("protonet", "finetune"):
            started = time.perf_counter()
            predictions = engine_predictions_by_inference(engine, prepared, episodes, mode,
                                                          [from_dict(InferenceSettings, c, "inference")
                                                           for c in candidates], seed=args.seed, precision="fp32")
            seconds[mode] = (time.perf_counter() - started) / len(episodes)
            for index, predicted in enumerate(predictions):
                per_task[(mode, index)] = [task_accuracy(p, e) for p, e in zip(predicted, episodes)]
        plain_pn = per_task[("protonet", 0)]
        for (mode, index), accuracies in per_task.items():
            inference = from_dict(InferenceSettings, candidates[index], "inference")
            mean, ci95 = mean_and_ci95(accuracies)
            over_pn, over_pn_ci = paired_gain(plain_pn, accuracies)
            over_plain, over_plain_ci = paired_gain(per_task[(mode, 0)], accuracies)
            rows.append({"shot": shot, "tasks": len(episodes), "mode": mode, "inference": candidates[index],
                         "inference_words": inference.describe(), "mean": mean, "ci95": ci95,
                         "gain_over_plain_pn": {"mean": over_pn, "ci95": over_pn_ci},
                         "gain_over_plain_inference": {"mean": over_plain, "ci95": over_plain_ci},
                         "seconds_per_task": seconds[mode]})
        print(levers_table([row for row in rows if row["shot"] == shot]), flush=True)
    return rows


def run_networks(args: argparse.Namespace, settings) -> list[dict]:
    """Per pool (selection, test), shot, network and inference: per-task accuracy of the frozen network's
    ProtoNet through `evaluation.engine_predictions_by_inference` (what `metallo evaluate` and classify run),
    paired against the first network with the same inference; and each network's embedding cost."""
    from metallo_core.config import from_dict
    from metallo_core.fewshot.evaluation import PreparedImages, engine_predictions_by_inference, task_accuracy
    from metallo_core.fewshot.folder_benchmark import benchmark_engine, draw_tasks, read_labelled_folder, split_pools
    from metallo_core.fewshot.inference import InferenceSettings
    from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain
    from metallo_core.models.sources import offline_imagenet_backbone

    folder = read_labelled_folder(args.data, args.size)
    pools = split_pools(folder, pool_fractions(args), args.pool_seed)
    candidates = lever_settings(args.lever_set)
    inferences = [from_dict(InferenceSettings, c, "inference") for c in candidates]
    networks = args.network_set.split(",")
    # The selection pool's smallest class bounds its queries (as the quickstart's selection tasks are bounded).
    task_sets = {(pool, shot): draw_tasks(pools[pool], args.way, shot,
                                          min(args.query, min(map(len, pools[pool])) - shot) if pool == "val"
                                          else args.query, args.tasks, args.seed, folder.classes)
                 for pool in ("val", "test") for shot in [int(s) for s in args.shots.split(",")]}
    per_task: dict[tuple, list[float]] = {}
    embed_seconds = {}
    for network in networks:
        backbone, spec = offline_imagenet_backbone(args.size, network)
        engine = benchmark_engine(backbone, spec, settings)
        started = time.perf_counter()
        prepared = PreparedImages(engine, folder.images, precision="fp32")
        prepared.features(engine, precision="fp32")
        embed_seconds[network] = (time.perf_counter() - started) / len(folder.images)
        for (pool, shot), episodes in task_sets.items():
            predictions = engine_predictions_by_inference(engine, prepared, episodes, "protonet", inferences,
                                                          seed=args.seed, precision="fp32")
            for index, predicted in enumerate(predictions):
                per_task[(pool, shot, network, index)] = [task_accuracy(p, e) for p, e in zip(predicted, episodes)]
        print(f"{network}: {1000 * embed_seconds[network]:.1f} ms per image at {args.size} px", flush=True)
    rows = []
    for (pool, shot, network, index), accuracies in per_task.items():
        mean, ci95 = mean_and_ci95(accuracies)
        gain, gain_ci95 = paired_gain(per_task[(pool, shot, networks[0], index)], accuracies)
        rows.append({"pool": pool, "shot": shot, "tasks": len(accuracies), "network": network,
                     "inference": candidates[index], "inference_words": inferences[index].describe(),
                     "mean": mean, "ci95": ci95, "gain_over_first": {"mean": gain, "ci95": gain_ci95},
                     "ms_per_image": 1000 * embed_seconds[network], "size": args.size})
    return rows


def networks_table(rows: list[dict]) -> str:
    lines = ["| pool | task | network | inference | accuracy (95% interval) | - first network, same inference, "
             "paired | ms per image |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        gain = row["gain_over_first"]
        lines.append(f"| {'selection' if row['pool'] == 'val' else 'test'} | 5-way {row['shot']}-shot, "
                     f"{row['tasks']} tasks | {row['network']} at {row['size']} px | {row['inference_words']} | "
                     f"{percent(row)} | {100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f} | "
                     f"{row['ms_per_image']:.1f} |")
    return "\n".join(lines)


def levers_table(rows: list[dict]) -> str:
    def points(gain: dict) -> str:
        return f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f}"

    lines = ["| task | mode | inference | accuracy (95% interval) | - plain PN, paired | - same mode plain, paired "
             "| s per task (mode, all inferences) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        mode = {"protonet": "PN", "finetune": "PN + fine-tuning"}[row["mode"]]
        lines.append(f"| 5-way {row['shot']}-shot, {row['tasks']} tasks | {mode} | {row['inference_words']} | "
                     f"{percent(row)} | {points(row['gain_over_plain_pn'])} | "
                     f"{points(row['gain_over_plain_inference'])} | {row['seconds_per_task']:.2f} |")
    return "\n".join(lines)


# Grid scored by --select: every combination, on the same selection tasks, FT - PN paired.
# Keys: any FinetuneSettings field, and cosine_scale (the ProtoNet's scale, folder_benchmark.PRETRAINED_COSINE_SCALE).
SELECTION_GRID = {"lr": [1e-3, 3e-3, 1e-2], "steps": [10, 25], "crop_scale": [0.35, 0.6]}


def selection_grid(entries: list[str]) -> dict[str, list]:
    """{field: values} from key=v1,v2 entries (values parsed as YAML scalars), or SELECTION_GRID."""
    import yaml

    grid = {}
    for entry in entries:
        key, _, values = entry.partition("=")
        if not values:
            raise SystemExit(f"--grid {entry!r}: expected key=v1,v2")
        grid[key] = [yaml.safe_load(value) for value in values.split(",")]
    return grid or SELECTION_GRID


def run_selection(args: argparse.Namespace, base) -> list[dict]:
    from metallo_core.fewshot.evaluation import cache_key
    from metallo_core.fewshot.folder_benchmark import (
        PRETRAINED_COSINE_SCALE,
        draw_tasks,
        folder_cache,
        score_task_set,
    )

    folder, engine, cache, selection, _ = load(args, base)
    caches = {cache_key(base): cache}  # a grid over cache_stage or pseudo_queries prepares each cache once
    grid = selection_grid(args.grid)
    rows = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(selection, args.way, shot, args.select_query, args.select_tasks, args.seed + 1000,
                              folder.classes)
        for values in itertools.product(*grid.values()):
            changes = dict(zip(grid, values))
            # cosine_scale is the ProtoNet's own (the fine-tuning loss's logits), not a FinetuneSettings field
            scale = changes.pop("cosine_scale", PRETRAINED_COSINE_SCALE)
            with torch.no_grad():
                engine.model.classifier.scale.fill_(scale)
            candidate = engine.with_settings(**changes)
            key = cache_key(candidate.settings)
            if key not in caches:
                caches[key] = folder_cache(folder, candidate)
            result, _ = score_task_set(candidate, caches[key], episodes, ["pn", "ft"], args.seed)
            gain = result.gains["ft - pn"]
            rows.append({"shot": shot, **dict(zip(grid, values)), "pn": result.methods["pn"]["mean"],
                         "ft": result.methods["ft"]["mean"], "gain": gain["mean"], "gain_ci95": gain["ci95"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_cost(args: argparse.Namespace, settings) -> list[dict]:
    """Seconds per fine-tuning step at 224 px: the whole backbone on pixels, and the configured trunk-maps
    settings (cache_stage 2 for the ResNets, whose 4 stages end sooner) on their cache."""
    from metallo_core.fewshot.finetune import FinetuneEngine
    from metallo_core.fewshot.folder_benchmark import pretrained_protonet
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.fewshot.task import FewShotTask, SupportSet
    from metallo_core.models.backbones import BackboneSpec, build_backbone
    from metallo_core.models.sources import offline_imagenet_backbone

    rows = []
    for name in args.cost_backbones.split(","):
        if name == "efficientnet_lite0":
            backbone, spec = offline_imagenet_backbone(224)
        else:  # random weights: the cost does not depend on them
            spec = BackboneSpec(arch=name, image_size=224)
            backbone = build_backbone(spec)
        trunk_settings = finetune_settings(["pseudo_queries=trunk_maps", f"steps={args.cost_steps}"]
                                           + ([] if name == "efficientnet_lite0" else ["cache_stage=2"]), settings)
        normalizer = ImageNormalizer.for_backbone(spec)
        model = pretrained_protonet(backbone)
        whole = FinetuneEngine(model, finetune_settings(["pseudo_queries=pixels", "update=all", "lr=0.0001",
                                                         f"steps={args.cost_steps}"], settings), normalizer)
        cached = FinetuneEngine(model, trunk_settings, normalizer)
        for support_count in [int(s) for s in args.cost_supports.split(",")]:
            labels = torch.arange(support_count) % min(5, support_count)
            way = int(labels.max()) + 1
            images = torch.rand(support_count, 3, 224, 224)
            timings = {}
            for label, engine in (("whole backbone", whole), ("trunk maps", cached)):
                started = time.perf_counter()
                cache = engine.prepare(images)
                prepared = time.perf_counter()
                engine.task_logits(FewShotTask(SupportSet(cache, labels, way), cache[:1]),
                                   torch.Generator().manual_seed(0))
                timings[f"{label}: prepare once, s"] = prepared - started
                timings[f"{label}, s/step"] = (time.perf_counter() - prepared) / args.cost_steps
            rows.append({"backbone": name, "support_images": support_count, **timings,
                         "tuned": f"{trunk_settings.update} after stage {trunk_settings.cache_stage}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_through_classify(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    """Per test-pool task, `classify.classify` (with `--finetune` where the model's recorded lr is above 0, and
    its recorded inference settings) on the task's real files (support as
    <label>_<class>/<nn>_<file> links, so classify sees the classes and images in the task's own order, and
    the queries as one folder), and the engine called directly on the same images with the same settings
    and draws (task 0 of seed 0, as classify draws them); the two paired per task."""
    import tempfile

    from metallo_core.commands.classify_app import ClassifySettings, classify
    from metallo_core.config import to_dict, to_yaml
    from metallo_core.fewshot.evaluation import PreparedImages, engine_predictions
    from metallo_core.fewshot.finetune import FinetuneEngine
    from metallo_core.fewshot.folder_benchmark import (
        MethodScores,
        TaskSetResult,
        as_dict,
        benchmark_engine,
        draw_tasks,
        read_labelled_folder,
        split_pools,
    )
    from metallo_core.fewshot.metrics import paired_gain
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.models.sources import offline_imagenet_backbone
    from metallo_core.tracking.finetune_choice import choose, recorded_inference
    from metallo_core.tracking.protonet_store import load_protonet

    chosen = choose(args.model)
    settings = finetune_settings(overrides, chosen.settings)
    # classify scores with the inference settings recorded on the model: the engine here uses the same ones.
    inference, inference_source = recorded_inference(args.model)
    model, spec, _ = load_protonet(args.model)
    engine = FinetuneEngine(model.eval(), settings, ImageNormalizer.for_backbone(spec), inference=inference)
    # The frozen ImageNet start at the model's size: what the classifier must beat, on the same tasks.
    imagenet_backbone, imagenet_spec = offline_imagenet_backbone(spec.image_size)
    imagenet = benchmark_engine(imagenet_backbone, imagenet_spec, settings)
    folder = read_labelled_folder(args.data, spec.image_size)  # as classify reads the files: at the model's size
    test = split_pools(folder, pool_fractions(args), args.pool_seed)["test"]
    print(f"through classify: {args.model} at {spec.image_size} px, settings {settings} (from {chosen.source}"
          f"{'; overridden: ' + ' '.join(overrides) if overrides else ''}); inference {inference.describe()} "
          f"(from {inference_source}); the frozen ImageNet ProtoNet is scored plain", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="through-classify-") as scratch:
        settings_file = Path(scratch) / "finetune.yaml"
        settings_file.write_text(to_yaml({"finetune": to_dict(settings)}))
        for shot in [int(s) for s in args.shots.split(",")]:
            episodes = draw_tasks(test, args.way, shot, args.query, args.tasks, args.seed, folder.classes)
            scores = {name: MethodScores(name, [], 0.0) for name in ("classify", "engine", "imagenet_pn")}
            for index, episode in enumerate(episodes):
                task_dir = Path(scratch) / f"{shot}-shot-task-{index}"
                truth = link_task(folder, episode, task_dir)
                started = time.perf_counter()
                # As the quickstart's command line runs it: --finetune only where an lr above 0 was chosen.
                outcome = classify(args.model, task_dir / "support", task_dir / "query",
                                   settings=ClassifySettings(finetune=settings.lr > 0,
                                                             finetune_from=str(settings_file) if settings.lr else ""))
                scores["classify"].seconds += time.perf_counter() - started
                scores["classify"].accuracies.append(
                    sum(int(p.predicted.split("_", 1)[0]) == truth[p.file] for p in outcome.predictions)
                    / len(outcome.predictions))
                # The evaluation's own path (fewshot.evaluation, what `metallo evaluate` and the quickstart run)
                # on the task's images, support first: task 0 of seed 0, precision auto, as classify runs it.
                local = dataclasses.replace(episode, support=np.arange(len(episode.support)),
                                            query=len(episode.support) + np.arange(len(episode.query)))
                rows = np.concatenate([episode.support, episode.query])
                for name, scorer, mode in (("engine", engine, "finetune" if settings.lr > 0 else "protonet"),
                                           ("imagenet_pn", imagenet, "protonet")):
                    started = time.perf_counter()
                    (predicted,) = engine_predictions(scorer, PreparedImages(scorer, folder.images[rows]), [local],
                                                      mode, seed=0, lr=settings.lr)
                    scores[name].seconds += time.perf_counter() - started
                    scores[name].accuracies.append(float((predicted == episode.query_labels).mean()))
                if (index + 1) % 10 == 0:
                    print(f"  {shot}-shot: {index + 1} tasks", flush=True)
            first = episodes[0]
            result = TaskSetResult(first.way, first.shot, first.query_n, len(episodes), args.seed,
                                   {name: score.summary() for name, score in scores.items()})
            mean, ci95 = paired_gain(scores["engine"].accuracies, scores["classify"].accuracies)
            result.gains["classify - engine"] = {"mean": mean, "ci95": ci95}
            mean, ci95 = paired_gain(scores["imagenet_pn"].accuracies, scores["classify"].accuracies)
            result.gains["classify - imagenet_pn"] = {"mean": mean, "ci95": ci95}
            results.append(as_dict(result) | {"inference": to_dict(inference), "inference_source": inference_source})
            print(through_classify_table([results[-1]]), flush=True)
    return results


def link_task(folder, episode, task_dir: Path) -> dict[str, int]:
    """Symbolic links to a task's files: support/<label>_<class>/<nn>_<name>, query/<nn>_<name>; returns
    {query file name: its episode-local label}. The prefixes make classify's sorted listing the task's order."""
    truth = {}
    for position, (row, label) in enumerate(zip(episode.support, episode.support_labels)):
        link = task_dir / "support" / f"{label}_{folder.classes[folder.labels[row]]}" / \
            f"{position:03d}_{Path(folder.paths[row]).name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(folder.root, folder.paths[row]).resolve())
    for position, (row, label) in enumerate(zip(episode.query, episode.query_labels)):
        name = f"{position:03d}_{Path(folder.paths[row]).name}"
        link = task_dir / "query" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(folder.root, folder.paths[row]).resolve())
        truth[name] = int(label)
    return truth


def through_classify_table(results: list[dict]) -> str:
    lines = ["| task | classify (real files) | engine directly | classify - engine, paired (points) "
             "| frozen ImageNet ProtoNet | classify - frozen ImageNet PN, paired (points) |",
             "|---|---|---|---|---|---|"]
    for result in results:
        gain, over = result["gains"]["classify - engine"], result["gains"]["classify - imagenet_pn"]
        lines.append(f"| {result['way']}-way {result['shot']}-shot, {result['tasks']} tasks | "
                     f"{percent(result['methods']['classify'])} | {percent(result['methods']['engine'])} | "
                     f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f} | "
                     f"{percent(result['methods']['imagenet_pn'])} | "
                     f"{100 * over['mean']:+.2f} ± {100 * over['ci95']:.2f} |")
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    lines = ["| backbone (224 px) | support images | whole backbone s/step | trunk maps s/step | trunk once s |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backbone']} | {row['support_images']} | {row['whole backbone, s/step']:.3f} | "
                     f"{row['trunk maps, s/step']:.3f} | {row['trunk maps: prepare once, s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = finetune_settings(args.finetune)
    report: dict = {"args": vars(args), "finetune": dataclasses.asdict(settings)}
    markdown = []
    started = time.perf_counter()
    if args.select:
        report["selection"] = run_selection(args, settings)
    elif args.through_classify:
        report["results"] = run_through_classify(args, args.finetune)
        markdown.append(through_classify_table(report["results"]))
    elif args.levers:
        report["levers"] = run_levers(args, settings)
        markdown.append(levers_table(report["levers"]))
    elif args.networks:
        report["networks"] = run_networks(args, settings)
        markdown.append(networks_table(report["networks"]))
    elif args.cost:
        report["cost"] = run_cost(args, settings)
        markdown.append(cost_table(report["cost"]))
    else:
        if not Path(args.data).is_dir():
            print(f"--data {args.data} is not a directory (the built-in X-SDD is {xsdd_images()})", file=sys.stderr)
            return 2
        report["results"] = run_tasks(args, settings)
        markdown.append(accuracy_table(report["results"], "X-SDD test pool"))
    report["wall_s"] = time.perf_counter() - started
    print_and_write(report, "\n\n".join(markdown), args.out, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
