"""The resolution lever on micrographs of SEM size: the whole image squeezed to the network's input vs tiles at
native resolution (`metallo classify --tile PX`), through classify's own functions.

X-SDD's 128-px photographs cannot show this lever. The data here are synthetic micrographs of the built-in
few-shot generator, rendered at 640 x 480 px with features as many pixels wide as in its 84-px renders
(`render_images(length_scale=1.0)`: a few pixels, as a large field of view at one magnification gives);
support and queries at the same magnification. Each task's 5 classes share one morphology (lamellae of
several spacings, grains of several sizes, ...): what separates them is the scale and fraction of their
features, as spacing separates fine from coarse pearlite. No network is trained, so every class may serve.

Every policy embeds each image's tiles once with the frozen offline ImageNet EfficientNet-Lite0 through
`fewshot.predict.embed_tiles`, tiles cut by `fewshot.tiles.image_tiles`, and scores each task through
`fewshot.predict.predict_from_features` (what `metallo classify` runs after embedding: per-tile logits,
probabilities averaged per image). Paired per task against the first policy with the same inference.

    uv run --frozen python benchmarks/resolution.py --tasks 300 --shots 1,5 \
        --out results/resolution.json --markdown results/resolution.md
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from result_files import print_and_write  # benchmarks/, beside this script

from metallo_core.config import from_dict
from metallo_core.data.synthetic.fewshot import fewshot_classes, render_images
from metallo_core.fewshot.episodes import fixed_episodes
from metallo_core.fewshot.folder_benchmark import pretrained_protonet
from metallo_core.fewshot.inference import InferenceSettings
from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain
from metallo_core.fewshot.predict import (
    PredictSettings,
    TiledFeatures,
    embed_tiles,
    feature_engine,
    predict_from_features,
)
from metallo_core.fewshot.protonet import ImageNormalizer
from metallo_core.fewshot.tiles import image_tiles
from metallo_core.models.sources import offline_imagenet_backbone

# (input size of the network, tile side in px of the 640 x 480 micrograph; 0: the whole image squeezed)
POLICIES = [(128, 0), (224, 0), (224, 224), (128, 128)]
INFERENCES = [{}, {"transductive": "soft_kmeans", "power": 0.5}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--classes-per-family", type=int, default=6, help="classes of each morphology used")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--query", type=int, default=5, help="queries per class")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    return parser.parse_args(argv)


def micrographs(args: argparse.Namespace) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str]]:
    """(images as (H, W, 3) uint8, labels, class names, class families) at SEM size: up to
    `classes_per_family` classes of each morphology that has at least 5."""
    by_family: dict[str, list] = {}
    for spec in fewshot_classes(100, seed=args.seed):
        by_family.setdefault(spec.family, []).append(spec)
    classes = [spec for members in by_family.values() if len(members) >= 5
               for spec in members[:args.classes_per_family]]
    side = max(args.width, args.height)
    top, left = (side - args.height) // 2, (side - args.width) // 2
    images, labels = [], []
    for label, spec in enumerate(classes):
        rendered = render_images(spec, label, args.images_per_class, size=side, seed=args.seed, length_scale=1.0)
        for grey in rendered:
            crop = grey[top:top + args.height, left:left + args.width]
            images.append(np.repeat(crop[:, :, None], 3, axis=2))
            labels.append(label)
    return images, np.asarray(labels), [spec.name for spec in classes], [spec.family for spec in classes]


def within_family_tasks(labels: np.ndarray, names: list[str], families: list[str], shot: int,
                        args: argparse.Namespace) -> list:
    """`args.tasks` 5-way tasks, spread evenly over the families, each of 5 classes of one family; rows
    index the whole image list."""
    kinds = sorted(set(families))
    tasks = []
    for number, family in enumerate(kinds):
        members = [label for label, kind in enumerate(families) if kind == family]
        count = args.tasks // len(kinds) + (1 if number < args.tasks % len(kinds) else 0)
        episodes = fixed_episodes([np.flatnonzero(labels == label) for label in members], 5, shot, args.query,
                                  count, args.seed + number, class_names=[names[label] for label in members])
        tasks.extend(episodes)
    return tasks


def policy_features(images: list[np.ndarray], size: int, tile: int, settings: PredictSettings):
    """(model, (T, D) tile features, (T,) owning image, seconds per image) for one policy."""
    backbone, spec = offline_imagenet_backbone(size)
    model = pretrained_protonet(backbone)
    engine = feature_engine(model, ImageNormalizer.for_backbone(spec))
    started = time.perf_counter()
    tiles = [image_tiles(pixels, size, tile) for pixels in images]
    owner = np.concatenate([np.full(len(t), index) for index, t in enumerate(tiles)])
    with torch.no_grad():
        features = embed_tiles(engine, np.concatenate(tiles), settings)
    return model, features, owner, (time.perf_counter() - started) / len(images)


def task_accuracy(model, features: torch.Tensor, owner: np.ndarray, episode, settings: PredictSettings) -> float:
    def gathered(rows: np.ndarray) -> TiledFeatures:
        picks = [np.flatnonzero(owner == row) for row in rows]
        local = np.concatenate([np.full(len(p), index) for index, p in enumerate(picks)])
        return TiledFeatures(features[torch.as_tensor(np.concatenate(picks))], local, len(rows))

    labels = np.repeat(np.arange(episode.way), episode.shot)
    found = predict_from_features(model, gathered(episode.support), labels, gathered(episode.query), settings)
    return float((np.asarray(found.predicted) == episode.query_labels).mean())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    images, labels, names, families = micrographs(args)
    task_sets = {shot: within_family_tasks(labels, names, families, shot, args)
                 for shot in [int(s) for s in args.shots.split(",")]}
    settings = [PredictSettings(from_dict(InferenceSettings, inference, "inference"), precision="fp32")
                for inference in INFERENCES]
    per_task, cost = {}, {}
    for size, tile in POLICIES:
        model, features, owner, cost[(size, tile)] = policy_features(images, size, tile, settings[0])
        for shot, episodes in task_sets.items():
            for index, setting in enumerate(settings):
                per_task[(size, tile, shot, index)] = [task_accuracy(model, features, owner, e, setting)
                                                       for e in episodes]
        print(f"network at {size} px, tile {tile or 'none'}: {np.bincount(owner).mean():.0f} tiles per image, "
              f"{1000 * cost[(size, tile)]:.0f} ms per image", flush=True)
    rows = []
    for (size, tile, shot, index), accuracies in per_task.items():
        mean, ci95 = mean_and_ci95(accuracies)
        gain, gain_ci95 = paired_gain(per_task[(*POLICIES[0], shot, index)], accuracies)
        rows.append({"size": size, "tile": tile, "shot": shot, "tasks": len(accuracies), "inference": INFERENCES[index],
                     "inference_words": settings[index].inference.describe(), "mean": mean, "ci95": ci95,
                     "gain_over_first": {"mean": gain, "ci95": gain_ci95}, "ms_per_image": 1000 * cost[(size, tile)]})
    lines = [f"| 5-way within one morphology, {args.width} x {args.height} px synthetic micrographs, "
             f"{len(names)} classes of {len(set(families))} morphologies | "
             "inference | accuracy (95% interval) | - whole image at 128 px, paired | ms per image |",
             "|---|---|---|---|---|"]
    for row in rows:
        what = (f"{row['tile']}-px tiles at native resolution" if row["tile"] else "whole image squeezed to "
                f"{row['size']} px") + f", {row['shot']}-shot, {row['tasks']} tasks"
        gain = row["gain_over_first"]
        lines.append(f"| {what} | {row['inference_words']} | {100 * row['mean']:.2f}% ± {100 * row['ci95']:.2f} | "
                     f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f} | {row['ms_per_image']:.0f} |")
    markdown = "\n".join(lines)
    report = {"args": vars(args), "rows": rows, "wall_s": time.perf_counter() - started}
    print_and_write(report, markdown, args.out, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
