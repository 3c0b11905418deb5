"""Open set on real images (X-SDD): some classes held out of the support as unknowns; how well the
`unknown` flag of `metallo classify --unknown` (metallo_core/fewshot/open_set.py) tells them from the known
classes, and what it costs the known ones.

    nice -n 19 uv run --frozen python benchmarks/open_set.py --tasks 300 --shots 1,5 \
        --out benchmarks/results/open_set.json --markdown benchmarks/results/open_set.md

Protocol. The pools are the quickstart's (`fewshot/folder_benchmark.split_pools`). Each task draws 7 classes
(`--known` + `--unknown`) from a pool: the first `--known` of them (in the task's random order) give the
support (`shot` images each) and the 5-way predictions; the others give only queries, which should be flagged.
Every class gives `--query` queries, and transductive inference sees them all (unknowns included), as
classify would. Selection tasks (the `val` pool) compare the candidate scores and fit the margin
(`youden_margin`, 1- and 5-shot pooled); the reported tasks come from the `test` pool only and use the
margin stored in `open_set.SELECTED_MARGIN` (or `--margin`). Features: the frozen ImageNet EfficientNet-Lite0
(the network `metallo-protonet@quickstart` registers, its chain's gates having kept no other stage), every
image embedded once and reused by every task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from result_files import print_and_write  # benchmarks/, beside this script

from metallo_core.datasets import xsdd_images
from metallo_core.quickstart import DEFAULTS as QUICKSTART

CANDIDATES = {  # the scores compared on selection tasks; higher: more like a known class
    "cosine - mean separation": "the flag's score: cosine to the nearest prototype minus the mean separation",
    "cosine - class separation": "cosine to the nearest prototype minus that class's separation",
    "cosine, scaled": "(cosine - mean separation) / (1 - mean separation)",
    "cosine": "cosine to the nearest prototype, no calibration",
    "max probability": "the largest class probability of the prediction (inference as chosen)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(xsdd_images()), help="<root>/<class>/<image> (default: X-SDD)")
    parser.add_argument("--size", type=int, default=128, help="input side in px (the quickstart's 128)")
    parser.add_argument("--known", type=int, default=5, help="classes in the support")
    parser.add_argument("--unknown", type=int, default=2, help="classes held out of the support (queries only)")
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--query", type=int, default=15, help="queries per class, test tasks")
    parser.add_argument("--tasks", type=int, default=300, help="test tasks per shot")
    parser.add_argument("--select-tasks", type=int, default=300, help="selection tasks per shot")
    # The selection pool's smallest X-SDD class has 12 images: 5 shots + 6 queries fit.
    parser.add_argument("--select-query", type=int, default=6, help="queries per class, selection tasks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pools", default=",".join(map(str, QUICKSTART["pools"]["fractions"])))
    parser.add_argument("--pool-seed", type=int, default=QUICKSTART["pools"]["seed"])
    parser.add_argument("--inference", nargs="*", default=["transductive=soft_kmeans,power=0.5", "plain"],
                        metavar="key=value[,key=value]|plain",
                        help="inference settings scored (the first: the quickstart's choice for this network)")
    parser.add_argument("--margin", type=float, default=None, help="test tasks' margin (default: SELECTED_MARGIN)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--markdown", help="write the tables as markdown here")
    return parser.parse_args(argv)


def inference_settings(text: str):
    from metallo_core.config import from_dict
    from metallo_core.fewshot.inference import InferenceSettings

    values = {} if text == "plain" else dict(pair.split("=", 1) for pair in text.split(","))
    settings = from_dict(InferenceSettings, {key: (float(value) if key in ("power", "temperature") else value)
                                             for key, value in values.items()}, "inference")
    settings.validate()
    return settings


def embedded_folder(args: argparse.Namespace):
    """(folder, pools, ProtoNet, (N, D) features of every image): each image embedded once."""
    from metallo_core.fewshot.folder_benchmark import benchmark_engine, folder_cache, read_labelled_folder, split_pools
    from metallo_core.models.sources import offline_imagenet_backbone

    started = time.perf_counter()
    folder = read_labelled_folder(args.data, args.size)
    pools = split_pools(folder, tuple(float(value) for value in args.pools.split(",")), args.pool_seed)
    backbone, spec = offline_imagenet_backbone(args.size)
    # The engine `predict` embeds with (fewshot.predict.feature_engine): the features classify scores.
    engine = benchmark_engine(backbone, spec)
    with torch.no_grad():
        features = engine.embed(folder_cache(folder, engine)).float()
    print(f"{len(folder.images)} images of {len(folder.classes)} classes embedded at {args.size} px in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return folder, pools, engine.model, features


def score_tasks(model, features: torch.Tensor, episodes, known: int, inference, margin: float) -> dict:
    """Per task: known-class accuracy without and with the flag, unknown recall, known flagged, each candidate's
    AUROC; and every query's candidate scores pooled over the tasks (for the pooled AUROC and the margin fit)."""
    from metallo_core.fewshot.inference import query_logits
    from metallo_core.fewshot.metrics import auroc
    from metallo_core.fewshot.open_set import OpenSetSettings, open_set_flags

    per_task: dict[str, list[float]] = {name: [] for name in (
        "known accuracy", "known accuracy, flag on", "unknown recall", "known flagged")}
    aurocs: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    pooled: dict[str, dict[str, list[torch.Tensor]]] = {name: {"known": [], "unknown": []} for name in CANDIDATES}
    settings = OpenSetSettings(margin)
    for episode in episodes:
        in_support = episode.support_labels < known
        support = features[torch.from_numpy(episode.support[in_support])]
        support_labels = torch.as_tensor(episode.support_labels[in_support])
        query = features[torch.from_numpy(episode.query.copy())]
        labels = torch.as_tensor(episode.query_labels)
        is_known = labels < known
        probabilities = query_logits(model.classifier, support, support_labels, query, known, inference).softmax(1)
        flags = open_set_flags(support, support_labels, query, known, inference.power, settings)
        correct = probabilities.argmax(1) == labels
        per_task["known accuracy"].append(float(correct[is_known].float().mean()))
        per_task["known accuracy, flag on"].append(float((correct & ~flags.unknown)[is_known].float().mean()))
        per_task["unknown recall"].append(float(flags.unknown[~is_known].float().mean()))
        per_task["known flagged"].append(float(flags.unknown[is_known].float().mean()))
        similarity = flags.similarity
        candidates = {"cosine - mean separation": flags.scores,
                      "cosine - class separation": similarity - flags.separation[flags.nearest],
                      "cosine, scaled": (similarity - flags.separation.mean()) / (1 - flags.separation.mean()),
                      "cosine": similarity, "max probability": probabilities.max(1).values}
        for name, scores in candidates.items():
            aurocs[name].append(auroc(scores[is_known].numpy(), scores[~is_known].numpy()))
            pooled[name]["known"].append(scores[is_known])
            pooled[name]["unknown"].append(scores[~is_known])
    return {"per_task": per_task, "auroc": aurocs,
            "pooled": {name: {side: torch.cat(parts) for side, parts in sides.items()}
                       for name, sides in pooled.items()}}


def interval(values: list[float]) -> dict[str, float]:
    from metallo_core.fewshot.metrics import mean_and_ci95

    mean, ci95 = mean_and_ci95(values)
    return {"mean": mean, "ci95": ci95}


def run(args: argparse.Namespace) -> dict:
    from metallo_core.config import to_dict
    from metallo_core.fewshot.folder_benchmark import draw_tasks
    from metallo_core.fewshot.metrics import auroc, paired_gain
    from metallo_core.fewshot.open_set import SELECTED_MARGIN, youden_margin

    folder, pools, model, features = embedded_folder(args)
    way = args.known + args.unknown
    shots = [int(shot) for shot in args.shots.split(",")]
    stored = SELECTED_MARGIN if args.margin is None else args.margin
    report: dict = {"selection": [], "test": []}
    for text in args.inference:
        inference = inference_settings(text)
        pooled_known: dict[str, list[torch.Tensor]] = {name: [] for name in CANDIDATES}
        pooled_unknown: dict[str, list[torch.Tensor]] = {name: [] for name in CANDIDATES}
        for shot in shots:
            episodes = draw_tasks(pools["val"], way, shot, args.select_query, args.select_tasks, args.seed + 1000,
                                  folder.classes)
            scored = score_tasks(model, features, episodes, args.known, inference, stored)
            row = {"inference": inference.describe(), "settings": to_dict(inference), "shot": shot,
                   "tasks": len(episodes), "candidates": {}}
            for name in CANDIDATES:
                known, unknown = scored["pooled"][name]["known"], scored["pooled"][name]["unknown"]
                pooled_known[name].append(known)
                pooled_unknown[name].append(unknown)
                fitted, youden = youden_margin(known, unknown)
                row["candidates"][name] = {"auroc per task": interval(scored["auroc"][name]),
                                           "auroc pooled": auroc(known.numpy(), unknown.numpy()),
                                           "youden margin": fitted, "youden J": youden,
                                           "kept95 margin": float(torch.quantile(known.double(), 0.05)),
                                           "unknown recall at kept95": float(
                                               (unknown < torch.quantile(known, 0.05)).float().mean())}
            report["selection"].append(row)
            print(json.dumps(row), flush=True)
        for name in CANDIDATES:
            known = torch.cat(pooled_known[name])
            fitted, youden = youden_margin(known, torch.cat(pooled_unknown[name]))
            report["selection"].append({"inference": inference.describe(), "shot": "pooled", "candidate": name,
                                        "youden margin": fitted, "youden J": youden,
                                        "kept95 margin": float(torch.quantile(known.double(), 0.05))})
            print(json.dumps(report["selection"][-1]), flush=True)
        # The test tasks at the stored margin, and at the one that kept 95% of known selection queries (the
        # flag's score, both shots pooled): the two ends of what --unknown-margin trades.
        kept95 = report["selection"][-len(CANDIDATES)]["kept95 margin"]
        for shot, (rule, margin) in itertools.product(shots, (("stored", stored), ("keeps 95% known", kept95))):
            episodes = draw_tasks(pools["test"], way, shot, args.query, args.tasks, args.seed, folder.classes)
            started = time.perf_counter()
            scored = score_tasks(model, features, episodes, args.known, inference, margin)
            per_task = scored["per_task"]
            cost, cost_ci95 = paired_gain(per_task["known accuracy"], per_task["known accuracy, flag on"])
            row = {"inference": inference.describe(), "settings": to_dict(inference), "shot": shot,
                   "tasks": len(episodes), "margin": margin, "margin rule": rule,
                   "auroc": interval(scored["auroc"]["cosine - mean separation"]),
                   "auroc max probability": interval(scored["auroc"]["max probability"]),
                   **{name: interval(values) for name, values in per_task.items()},
                   "flag cost (points)": {"mean": 100 * cost, "ci95": 100 * cost_ci95},
                   "seconds": time.perf_counter() - started}
            report["test"].append(row)
            print(json.dumps(row), flush=True)
    return report


def percent(summary: dict) -> str:
    return f"{100 * summary['mean']:.2f}% ± {100 * summary['ci95']:.2f}"


def tables(report: dict, args: argparse.Namespace) -> str:
    lines = [f"Selection tasks (`val` pool, {args.select_tasks} per shot, {args.known} known + {args.unknown} "
             f"unknown classes, {args.select_query} queries per class): AUROC of each candidate score",
             "", "| inference | shot | score | AUROC per task (95% interval) | AUROC pooled over tasks | "
             "Youden margin |", "|---|---|---|---|---|---|"]
    for row in report["selection"]:
        if row["shot"] == "pooled":
            continue
        for name, values in row["candidates"].items():
            lines.append(f"| {row['inference']} | {row['shot']} | {name} | {percent(values['auroc per task'])} | "
                         f"{100 * values['auroc pooled']:.2f}% | {values['youden margin']:+.4f} |")
    lines += ["", "Margins fitted on 1- and 5-shot selection tasks pooled (Youden's J):", ""]
    lines += [f"- {row['inference']}, {row['candidate']}: {row['youden margin']:+.4f} (J {row['youden J']:.3f}); "
              f"keeping 95% of known queries: {row['kept95 margin']:+.4f}"
              for row in report["selection"] if row["shot"] == "pooled"]
    lines += ["", f"Test tasks (`test` pool, {args.tasks} per shot, {args.known} known + {args.unknown} unknown "
              f"classes, {args.query} queries per class), the flag's score (cosine - mean separation):", "",
              "| inference | shot | margin | AUROC (95% interval) | known-class accuracy, no flag | known-class "
              "accuracy, flag on | cost, paired (points) | unknown recall | known flagged | AUROC of max probability |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["test"]:
        cost = row["flag cost (points)"]
        lines.append(f"| {row['inference']} | {row['shot']} | {row['margin']:+.3f} ({row['margin rule']}) | "
                     f"{percent(row['auroc'])} | "
                     f"{percent(row['known accuracy'])} | {percent(row['known accuracy, flag on'])} | "
                     f"{cost['mean']:+.2f} ± {cost['ci95']:.2f} | {percent(row['unknown recall'])} | "
                     f"{percent(row['known flagged'])} | {percent(row['auroc max probability'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = run(args)
    report["args"] = vars(args)
    report["wall_s"] = time.perf_counter() - started
    markdown = tables(report, args)
    print_and_write(report, markdown, args.out, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
