"""Few-shot accuracy on real images (X-SDD by default) with the offline ImageNet EfficientNet-Lite0:
plain ProtoNet (PN) and PN + per-task fine-tuning (PN+FT), N-way K-shot, mean ± 95% interval over fixed
tasks and FT - PN paired per task; plus the cost of a fine-tuning step (--cost).

    uv run --frozen python benchmarks/real_fewshot.py --data ../shared/data/x-sdd --tasks 600 --shots 1,5 \
        --methods pn,ft --out results/real_fewshot.json --markdown results/real_fewshot.md
    uv run --frozen python benchmarks/real_fewshot.py --data ../shared/data/x-sdd --select   # the choice
    uv run --frozen python benchmarks/real_fewshot.py --cost --cost-backbones efficientnet_lite0,resnet50

Protocol (metallo_core/fewshot/folder_benchmark.py): each class's images are split once (seeded) into a
selection pool (--selection-fraction) and a test pool. `--select` scores fine-tuning settings on tasks
of the selection pool; the reported tasks come from the test pool only. Fine-tuning updates the last
stages on cached trunk features (metallo_core/fewshot/tail_finetune.py); defaults are the selected ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/x-sdd", help="<root>/<class>/<image> folder")
    parser.add_argument("--size", type=int, default=128, help="input side in px (X-SDD's own 128; 224 native)")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shots", default="1,5", help="comma-separated shots")
    parser.add_argument("--query", type=int, default=15, help="queries per class")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--methods", default="pn,ft", help="pn (frozen ProtoNet), ft (PN + fine-tuning)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the task draws and the fine-tuning draws")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the selection/test split of each class")
    parser.add_argument("--selection-fraction", type=float, default=0.3)
    parser.add_argument("--finetune", nargs="*", default=[], metavar="key=value",
                        help="TailFinetuneSettings overrides, e.g. lr=0.001 steps=20 tune_stage=5 bn_mode=eval")
    parser.add_argument("--select", action="store_true", help="score a grid of fine-tuning settings on selection tasks")
    parser.add_argument("--select-tasks", type=int, default=100)
    parser.add_argument("--select-query", type=int, default=10)
    parser.add_argument("--cost", action="store_true", help="time fine-tuning steps per backbone at 224 px")
    parser.add_argument("--cost-backbones", default="efficientnet_lite0,resnet18,resnet50")
    parser.add_argument("--cost-supports", default="1,5,10,25")
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--markdown", help="write the tables as markdown here")
    return parser.parse_args(argv)


def finetune_settings(overrides: list[str]):
    from metallo_core.config import apply_overrides, from_dict
    from metallo_core.fewshot.tail_finetune import TailFinetuneSettings

    values = apply_overrides(dataclasses.asdict(TailFinetuneSettings()), overrides)
    settings = from_dict(TailFinetuneSettings, values)
    settings.validate()
    return settings


def percent(summary: dict) -> str:
    return f"{100 * summary['mean']:.2f}% ± {100 * summary['ci95']:.2f}"


def accuracy_table(results: list[dict], title: str) -> str:
    lines = [f"| {title} | method | accuracy (95% interval) | FT - PN, paired (points) | wall s |", "|---|---|---|---|---|"]
    for result in results:
        task = f"{result['way']}-way {result['shot']}-shot, {result['tasks']} tasks"
        for name, summary in result["methods"].items():
            gain = result["gains"].get(f"{name} - pn")
            gain_text = f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f}" if gain else ""
            label = {"pn": "ProtoNet (frozen)", "ft": "PN + fine-tuning"}.get(name, name)
            lines.append(f"| {task} | {label} | {percent(summary)} | {gain_text} | {summary['seconds']:.0f} |")
    return "\n".join(lines)


def load(args: argparse.Namespace, cache_stage: int):
    from metallo_core.fewshot.folder_benchmark import (
        folder_trunk,
        read_labelled_folder,
        split_pools,
    )
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.fewshot.tail_finetune import split_backbone
    from metallo_core.models.sources import offline_imagenet_backbone

    started = time.perf_counter()
    folder = read_labelled_folder(args.data, args.size)
    backbone, spec = offline_imagenet_backbone(args.size)
    staged = split_backbone(backbone)
    trunk = folder_trunk(folder, staged, ImageNormalizer.for_backbone(spec), cache_stage)
    selection, test = split_pools(folder.labels, args.selection_fraction, args.split_seed)
    print(f"{len(folder.images)} images of {len(folder.classes)} classes from {folder.root} at {args.size} px; "
          f"trunk features in {time.perf_counter() - started:.0f} s; selection pool {sum(map(len, selection))}, "
          f"test pool {sum(map(len, test))} images", flush=True)
    return folder, staged, trunk, selection, test


def run_tasks(args: argparse.Namespace, settings) -> list[dict]:
    from metallo_core.fewshot.folder_benchmark import (
        as_dict,
        draw_tasks,
        score_task_set,
    )

    folder, staged, trunk, _, test = load(args, settings.cache_stage)
    methods = [m for m in args.methods.split(",") if m]
    results = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(test, args.way, shot, args.query, args.tasks, args.seed, folder.classes)
        result, _ = score_task_set(staged, trunk, episodes, methods, settings, args.seed,
                                   on_task=lambda i, shot=shot: (i + 1) % 100 == 0 and print(
                                       f"  {shot}-shot: {i + 1} tasks fine-tuned", flush=True))
        results.append(as_dict(result))
        print(accuracy_table([results[-1]], "X-SDD test pool"), flush=True)
    return results


# Grid scored by --select: every combination, on the same selection tasks, FT - PN paired.
SELECTION_GRID = {"lr": [1e-4, 1e-3, 3e-3], "tune_stage": [5, 6], "bn_mode": ["eval", "train"]}


def run_selection(args: argparse.Namespace, base) -> list[dict]:
    from metallo_core.fewshot.folder_benchmark import draw_tasks, score_task_set

    folder, staged, trunk, selection, _ = load(args, base.cache_stage)
    rows = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(selection, args.way, shot, args.select_query, args.select_tasks, args.seed + 1000,
                              folder.classes)
        for values in itertools.product(*SELECTION_GRID.values()):
            settings = dataclasses.replace(base, **dict(zip(SELECTION_GRID, values)))
            result, _ = score_task_set(staged, trunk, episodes, ["pn", "ft"], settings, args.seed)
            gain = result.gains["ft - pn"]
            rows.append({"shot": shot, **dict(zip(SELECTION_GRID, values)), "pn": result.methods["pn"]["mean"],
                         "ft": result.methods["ft"]["mean"], "gain": gain["mean"], "gain_ci95": gain["ci95"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_cost(args: argparse.Namespace) -> list[dict]:
    """Seconds per fine-tuning step at 224 px, whole backbone (pixels) and last stages (cached trunk)."""
    from metallo_core.fewshot.finetune import FinetuneSettings, adapt_to_support
    from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
    from metallo_core.fewshot.tail_finetune import (
        TailFinetuner,
        split_backbone,
        trunk_features,
    )
    from metallo_core.models.backbones import BackboneSpec, build_backbone
    from metallo_core.models.sources import offline_imagenet_backbone

    rows = []
    for name in args.cost_backbones.split(","):
        if name == "efficientnet_lite0":
            backbone, spec = offline_imagenet_backbone(224)
        else:  # random weights: the cost does not depend on them
            spec = BackboneSpec(arch=name, image_size=224)
            backbone = build_backbone(spec)
        tail_settings = finetune_settings(args.finetune + ([] if name == "efficientnet_lite0" else
                                                           ["cache_stage=2", "tune_stage=3"]))
        normalizer = ImageNormalizer.for_backbone(spec)
        for support_count in [int(s) for s in args.cost_supports.split(",")]:
            way = min(5, support_count) if support_count > 1 else 1
            labels = torch.arange(support_count) % max(way, 1)
            way = int(labels.max()) + 1
            images = torch.rand(support_count, 3, 224, 224)
            model = ProtoNet(backbone)
            timings = {}
            for update in ("all",):
                started = time.perf_counter()
                adapt_to_support(model, images, labels, way, FinetuneSettings(steps=args.cost_steps, update=update),
                                 normalizer=normalizer, generator=torch.Generator().manual_seed(0), lr=1e-4)
                timings["whole backbone, s/step"] = (time.perf_counter() - started) / args.cost_steps
            staged = split_backbone(backbone)
            started = time.perf_counter()
            trunk = trunk_features(staged, normalizer.normalize(images), tail_settings.cache_stage)
            timings["last stages: trunk once, s"] = time.perf_counter() - started
            finetuner = TailFinetuner(staged, dataclasses.replace(tail_settings, steps=args.cost_steps))
            started = time.perf_counter()
            finetuner.adapt(trunk, labels, way, torch.Generator().manual_seed(0))
            timings["last stages, s/step"] = (time.perf_counter() - started) / args.cost_steps
            finetuner.restore()
            rows.append({"backbone": name, "support_images": support_count, **timings,
                         "tuned": f"stages {tail_settings.tune_stage}+ and head"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def cost_table(rows: list[dict]) -> str:
    lines = ["| backbone (224 px) | support images | whole backbone s/step | last stages s/step | trunk once s |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backbone']} | {row['support_images']} | {row['whole backbone, s/step']:.3f} | "
                     f"{row['last stages, s/step']:.3f} | {row['last stages: trunk once, s']:.3f} |")
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
    elif args.cost:
        report["cost"] = run_cost(args)
        markdown.append(cost_table(report["cost"]))
    else:
        if not Path(args.data).is_dir():
            print(f"--data {args.data} is not a directory (X-SDD lives in ../shared/data/x-sdd)", file=sys.stderr)
            return 2
        report["results"] = run_tasks(args, settings)
        markdown.append(accuracy_table(report["results"], "X-SDD test pool"))
    report["wall_s"] = time.perf_counter() - started
    print("\n\n".join(markdown))
    print(f"wall time {report['wall_s']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n\n".join(markdown) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
