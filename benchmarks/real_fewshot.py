"""Few-shot accuracy on real images (X-SDD by default) with the offline ImageNet EfficientNet-Lite0:
plain ProtoNet (PN) and PN + per-task fine-tuning (PN+FT), N-way K-shot, mean ± 95% interval over fixed
tasks and FT - PN paired per task; plus the cost of a fine-tuning step (--cost).

    uv run --frozen python benchmarks/real_fewshot.py --data ../shared/data/x-sdd --tasks 600 --shots 1,5 \
        --methods pn,ft --out results/real_fewshot.json --markdown results/real_fewshot.md
    uv run --frozen python benchmarks/real_fewshot.py --data ../shared/data/x-sdd --select   # the choice
    uv run --frozen python benchmarks/real_fewshot.py --cost --cost-backbones efficientnet_lite0,resnet50
    uv run --frozen python benchmarks/real_fewshot.py --data ../shared/data/x-sdd --adapt --adapt-epochs 10 \
        --adapt-out results/xsdd_adapted.pth --tasks 600 --methods pn   # row (d), paired vs row (a)

Protocol (metallo_core/fewshot/folder_benchmark.py): each class's images are split once (seeded) into a
selection pool (--selection-fraction) and a test pool. `--select` scores fine-tuning settings on tasks
of the selection pool; the reported tasks come from the test pool only. Fine-tuning updates the last
stages on cached trunk features (metallo_core/fewshot/tail_finetune.py); defaults are the selected ones.
`--adapt` runs domain-adaptive DINO (configs/pretrain/domain_adapt_efficientnet_lite0.yaml at the benchmark's
image size, Ray-free) on the selection pool's images without their labels, and scores the adapted teacher
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

import torch

REPO = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--grid", nargs="*", default=[], metavar="key=v1,v2",
                        help="the --select grid, e.g. lr=0.003,0.01 steps=10,25 (default: SELECTION_GRID)")
    parser.add_argument("--classify-path", action="store_true",
                        help="score PN and PN+FT the way `metallo classify --finetune` runs them with "
                             "models:/metallo-protonet@pretrained: whole images at --size, pixel crops, the "
                             "quickstart's recorded FinetuneSettings (+ --classify-finetune overrides)")
    parser.add_argument("--classify-finetune", nargs="*", default=[], metavar="key=value",
                        help="FinetuneSettings overrides for --classify-path, e.g. update=last_stage")
    parser.add_argument("--cost", action="store_true", help="time fine-tuning steps per backbone at 224 px")
    parser.add_argument("--cost-backbones", default="efficientnet_lite0,resnet18,resnet50")
    parser.add_argument("--cost-supports", default="1,5,10,25")
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--backbone", default="imagenet-offline",
                        help="backbone source: imagenet-offline, or an EfficientNet-Lite0 weights file (a DINO "
                             "checkpoint's teacher, e.g. one --adapt-out wrote, or a metallo pretrain export)")
    parser.add_argument("--adapt", action="store_true",
                        help="row (d): domain-adaptive DINO from --backbone on the selection pool's images (labels "
                             "unused), then score the adapted backbone, paired against the ImageNet one")
    parser.add_argument("--adapt-config", default=str(REPO / "configs/pretrain/domain_adapt_efficientnet_lite0.yaml"))
    parser.add_argument("--adapt-epochs", type=int, default=10)
    parser.add_argument("--adapt-out", help="write the adapted teacher backbone's state dict here")
    parser.add_argument("--adapt-set", nargs="*", default=[], metavar="key=value",
                        help="DinoConfig overrides for --adapt, e.g. head.use_bn=true")
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


def load(args: argparse.Namespace, cache_stage: int):
    from metallo_core.fewshot.folder_benchmark import (
        folder_trunk,
        read_labelled_folder,
        split_pools,
    )
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.fewshot.tail_finetune import split_backbone
    from metallo_core.models.sources import backbone_from_source, offline_imagenet_spec

    started = time.perf_counter()
    folder = read_labelled_folder(args.data, args.size)
    selection, test = split_pools(folder.labels, args.selection_fraction, args.split_seed)
    backbone, spec = backbone_from_source(args.backbone, offline_imagenet_spec(args.size))
    if args.adapt:
        backbone = domain_adapted(args, folder, selection)
    staged = split_backbone(backbone.eval())
    trunk = folder_trunk(folder, staged, ImageNormalizer.for_backbone(spec), cache_stage)
    print(f"{len(folder.images)} images of {len(folder.classes)} classes from {folder.root} at {args.size} px; "
          f"trunk features in {time.perf_counter() - started:.0f} s; selection pool {sum(map(len, selection))}, "
          f"test pool {sum(map(len, test))} images", flush=True)
    return folder, staged, trunk, selection, test


def domain_adapted(args: argparse.Namespace, folder, selection):
    """Continue DINO from `--backbone` (teacher and student both start from it) on the selection pool's
    images, labels unused, with the domain-adaptive recipe at the benchmark's image size; returns the
    teacher backbone. The k-NN probe printed per epoch uses the selection pool's labels (monitoring only:
    nothing is chosen on it)."""
    import numpy as np

    from metallo_core.config import apply_overrides, from_dict, read_yaml
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.ssl.learning_curve import dino_learning_curve

    local = max(32, round(args.size * 96 / 224 / 8) * 8)  # DINO's 96/224 local-to-global ratio
    raw = apply_overrides(read_yaml(args.adapt_config), [
        f"epochs={args.adapt_epochs}", f"seed={args.seed}", f"data.base_size={args.size}",
        f"backbone.image_size={args.size}", f"multicrop.global_size={args.size}", f"multicrop.local_size={local}",
        *args.adapt_set])
    raw.setdefault("data", {})["uri"] = "memory:x-sdd-selection-pool"
    raw["init_weights"] = args.backbone  # student and teacher both start from it
    config = from_dict(DinoConfig, raw)
    config.validate()
    rows = np.concatenate(selection)
    images, labels = folder.images[rows], folder.labels[rows]
    print(f"domain-adaptive DINO: {len(rows)} selection-pool images at {args.size} px (labels unused), "
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


def imagenet_features(args: argparse.Namespace, folder, settings) -> torch.Tensor:
    """(N, 1280) pooled features of every image with the offline ImageNet backbone: the (a) baseline."""
    from metallo_core.fewshot.folder_benchmark import folder_trunk
    from metallo_core.fewshot.protonet import ImageNormalizer
    from metallo_core.fewshot.tail_finetune import TailFinetuner, split_backbone
    from metallo_core.models.sources import offline_imagenet_backbone

    backbone, spec = offline_imagenet_backbone(args.size)
    staged = split_backbone(backbone)
    trunk = folder_trunk(folder, staged, ImageNormalizer.for_backbone(spec), settings.cache_stage)
    return TailFinetuner(staged, settings).embed(trunk)


def run_tasks(args: argparse.Namespace, settings) -> list[dict]:
    from metallo_core.fewshot.folder_benchmark import (
        MethodScores,
        as_dict,
        cosine_accuracies,
        draw_tasks,
        score_task_set,
    )
    from metallo_core.fewshot.metrics import paired_gain

    folder, staged, trunk, _, test = load(args, settings.cache_stage)
    methods = [m for m in args.methods.split(",") if m]
    reference = imagenet_features(args, folder, settings) if args.adapt or args.backbone != "imagenet-offline" else None
    results = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(test, args.way, shot, args.query, args.tasks, args.seed, folder.classes)
        result, scores = score_task_set(staged, trunk, episodes, methods, settings, args.seed,
                                        on_task=lambda i, shot=shot: (i + 1) % 100 == 0 and print(
                                            f"  {shot}-shot: {i + 1} tasks fine-tuned", flush=True))
        if reference is not None:  # the same tasks with the ImageNet backbone's ProtoNet, paired per task
            baseline = cosine_accuracies(reference, episodes)
            result.methods["imagenet_pn"] = MethodScores("imagenet_pn", baseline, 0.0).summary()
            for name, score in scores.items():
                mean, ci95 = paired_gain(baseline, score.accuracies)
                result.gains[f"{name} - imagenet_pn"] = {"mean": mean, "ci95": ci95}
        results.append(as_dict(result))
        print(accuracy_table([results[-1]], "X-SDD test pool"), flush=True)
    return results


# Grid scored by --select: every combination, on the same selection tasks, FT - PN paired.
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
    from metallo_core.fewshot.folder_benchmark import draw_tasks, score_task_set

    folder, staged, trunk, selection, _ = load(args, base.cache_stage)
    grid = selection_grid(args.grid)
    rows = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(selection, args.way, shot, args.select_query, args.select_tasks, args.seed + 1000,
                              folder.classes)
        for values in itertools.product(*grid.values()):
            settings = dataclasses.replace(base, **dict(zip(grid, values)))
            settings.validate()
            result, _ = score_task_set(staged, trunk, episodes, ["pn", "ft"], settings, args.seed)
            gain = result.gains["ft - pn"]
            rows.append({"shot": shot, **dict(zip(grid, values)), "pn": result.methods["pn"]["mean"],
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


def run_classify_path(args: argparse.Namespace, tail_settings) -> list[dict]:
    """PN and PN+FT on the test pool as `metallo classify --finetune` computes them for the pretrained
    quickstart's model (ProtoNet head at the tail's cosine scale, its recorded FinetuneSettings): every
    step runs the frozen trunk on freshly cropped pixels, so it costs far more than the cached-trunk tail."""
    from metallo_core.config import apply_overrides, from_dict
    from metallo_core.fewshot.finetune import (
        FinetuneSettings,
        finetune_task,
        protonet_task,
    )
    from metallo_core.fewshot.folder_benchmark import (
        MethodScores,
        TaskSetResult,
        as_dict,
        draw_tasks,
        read_labelled_folder,
        split_pools,
    )
    from metallo_core.fewshot.metrics import paired_gain
    from metallo_core.fewshot.protonet import ImageNormalizer, ProtoNet
    from metallo_core.models.sources import backbone_from_source, offline_imagenet_spec
    from metallo_core.quickstart_pretrained import PRETRAINED_DEFAULTS

    values = apply_overrides(dict(PRETRAINED_DEFAULTS["finetune"]), args.classify_finetune)
    settings = from_dict(FinetuneSettings, {**dataclasses.asdict(FinetuneSettings()), **values})
    folder = read_labelled_folder(args.data, args.size)
    _, test = split_pools(folder.labels, args.selection_fraction, args.split_seed)
    backbone, spec = backbone_from_source(args.backbone, offline_imagenet_spec(args.size))
    model = ProtoNet(backbone.eval(), cosine_scale=tail_settings.cosine_scale)
    normalizer = ImageNormalizer.for_backbone(spec)
    images = torch.from_numpy(folder.images).permute(0, 3, 1, 2).float().div(255)
    print(f"classify path: {len(folder.images)} images at {args.size} px, fine-tuning {settings}", flush=True)
    results = []
    for shot in [int(s) for s in args.shots.split(",")]:
        episodes = draw_tasks(test, args.way, shot, args.query, args.tasks, args.seed, folder.classes)
        scores = {"pn": MethodScores("pn", [], 0.0), "ft": MethodScores("ft", [], 0.0)}
        for index, episode in enumerate(episodes):
            support, query = images[torch.tensor(episode.support)], images[torch.tensor(episode.query)]
            labels = torch.tensor(episode.support_labels)
            for name, score in scores.items():
                started = time.perf_counter()
                logits = (protonet_task(model, support, labels, query, episode.way, normalizer=normalizer)
                          if name == "pn" else
                          finetune_task(model, support, labels, query, episode.way, settings, normalizer=normalizer,
                                        generator=torch.Generator().manual_seed(args.seed * 1_000_003 + index)))
                score.accuracies.append(float((logits.argmax(1).numpy() == episode.query_labels).mean()))
                score.seconds += time.perf_counter() - started
            if (index + 1) % 25 == 0:
                print(f"  {shot}-shot: {index + 1} tasks", flush=True)
        first = episodes[0]
        result = TaskSetResult(first.way, first.shot, first.query_n, len(episodes), args.seed,
                               {name: score.summary() for name, score in scores.items()})
        mean, ci95 = paired_gain(scores["pn"].accuracies, scores["ft"].accuracies)
        result.gains["ft - pn"] = {"mean": mean, "ci95": ci95}
        results.append(as_dict(result))
        print(accuracy_table([results[-1]], "X-SDD test pool, classify path"), flush=True)
    return results


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
    elif args.classify_path:
        report["results"] = run_classify_path(args, settings)
        markdown.append(accuracy_table(report["results"], "X-SDD test pool, classify path"))
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
