"""The proof of the quickstart's chain, stage by stage, on its real test pool: each stage's registered model
scored by `metallo evaluate`'s own code path (`train.evaluate.run_evaluation`: Ray actors, the one
fine-tuning engine), over many tasks, 1- and 5-shot, paired against the frozen ImageNet backbone.

    uv run --frozen metallo quickstart                       # registers every stage's output (kept or not)
    uv run --frozen python benchmarks/chain_stages.py --tasks 600 --shots 1,5 \
        --out results/chain_stages.json --markdown results/chain_stages.md

Rows (the same tasks in every row of a shot; fine-tuning settings chosen on the selection pool only, lr 0
among the candidates, exactly as the quickstart chooses them):
(a) the frozen ImageNet EfficientNet-Lite0, ProtoNet;
(b) + domain-adaptive DINO (the quickstart's DINO output, kept or not), ProtoNet;
(c) + meta-training (the quickstart's meta-trained ProtoNet, kept or not), ProtoNet;
(d) (a) + fine-tuning;
(e) the full chain: `models:/metallo-protonet@quickstart` (only the stages its gates kept), + fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from result_files import write_results  # benchmarks/, beside this script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart-run", default="latest",
                        help="the quickstart's MLflow run id (its quickstart.json names every model), or latest")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--parallelism", type=int, default=2, help="Ray actors scoring tasks")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the table as markdown here")
    return parser.parse_args(argv)


def quickstart_record(run: str) -> dict:
    """The quickstart.json artifact of the given (or the latest finished) quickstart run."""
    import mlflow

    from metallo_core import tracking
    from metallo_core.quickstart import EXPERIMENT

    tracking.configure(create=False)
    client = tracking.client()
    if run == "latest":
        experiment = client.get_experiment_by_name(EXPERIMENT)
        finished = "tags.`metallo.stage` = 'quickstart' and attributes.status = 'FINISHED'"
        runs = client.search_runs([experiment.experiment_id] if experiment else [], filter_string=finished,
                                  order_by=["start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"no finished quickstart run in experiment {EXPERIMENT!r}: run `metallo quickstart` first")
        run = runs[0].info.run_id
    return mlflow.artifacts.load_dict(f"runs:/{run}/quickstart.json") | {"run_id": run}


def evaluate(record: dict, model: str, shot: int, tasks: int, parallelism: int, finetune: bool, name: str):
    from metallo_core.config import deep_merge, from_dict
    from metallo_core.fewshot.config import EvaluateConfig
    from metallo_core.quickstart import DEFAULTS, EXPERIMENT
    from metallo_core.train.evaluate import run_evaluation

    settings = record["settings"]
    config = deep_merge(DEFAULTS["evaluate"], {
        "model": model, "tasks": tasks, "parallelism": parallelism, "split": "test",
        "data": {"uri": record["real_uri"], "image_size": settings["image_size"], "val_split": "val"},
        "episodes": {"shot": shot}, "experiment": EXPERIMENT, "run_name": f"chain-stages-{name}-{shot}shot",
        **({} if finetune else {"modes": ["protonet"], "select_on_val": False}),
    })
    return run_evaluation(from_dict(EvaluateConfig, config))


ROWS = [
    ("a", "frozen ImageNet EfficientNet-Lite0, ProtoNet", "start", False),
    ("b", "+ domain-adaptive DINO, ProtoNet", "dino", False),
    ("c", "+ meta-training, ProtoNet", "metatrained", False),
    ("d", "frozen ImageNet + fine-tuning", "start", True),
    ("e", "full chain (models:/metallo-protonet@quickstart) + fine-tuning", "protonet", True),
]


def same_weights(first_uri: str, second_uri: str) -> bool:
    """Whether two registered models hold the same backbone weights, tensor for tensor."""
    import torch

    from metallo_core.tracking.backbone_store import load_backbone

    first, second = load_backbone(first_uri)[0].state_dict(), load_backbone(second_uri)[0].state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def main(argv: list[str] | None = None) -> int:
    from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain

    args = parse_args(argv)
    record = quickstart_record(args.quickstart_run)
    models = record["models"]
    print(f"quickstart run {record['run_id']}: {json.dumps(models)}", flush=True)
    results: dict = {"quickstart_run": record["run_id"], "models": models, "stages": record["stages"], "shots": {}}
    # The full chain is the frozen start when its gates kept no stage: then row (e) is row (d), scored once.
    chain_is_start = same_weights(models["start"], models["protonet"])
    results["full_chain_is_the_start"] = chain_is_start
    for shot in [int(s) for s in args.shots.split(",")]:
        per_task: dict[str, list[float]] = {}
        rows = []
        for key, label, model_key, finetune in ROWS:
            if not models.get(model_key):
                print(f"  ({key}) {label}: no model recorded, skipped", flush=True)
                continue
            started = time.perf_counter()
            if key == "e" and chain_is_start and "d" in per_task:
                per_task[key] = per_task["d"]
                row = {**next(r for r in rows if r["row"] == "d"), "row": key, "method": label,
                       "model": models[model_key], "same_as": "d", "seconds": 0.0}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            result = evaluate(record, models[model_key], shot, args.tasks, args.parallelism, finetune, key)
            per_task[key] = result.per_task["finetune" if finetune else "protonet"]
            mean, ci95 = mean_and_ci95(per_task[key])
            row = {"row": key, "method": label, "model": result.model, "mean": mean, "ci95": ci95,
                   "lr": result.selection.get("best", {}).get("lr") if finetune else None,
                   "seconds": time.perf_counter() - started, "run_id": result.run_id}
            if key != "a" and "a" in per_task:
                gain, gain_ci95 = paired_gain(per_task["a"], per_task[key])
                row["gain_vs_a"] = {"mean": gain, "ci95": gain_ci95}
            rows.append(row)
            print(json.dumps(row), flush=True)
        results["shots"][shot] = {"tasks": args.tasks, "rows": rows}
    table = markdown_table(results)
    print(table)
    write_results(results, table, args.out, args.markdown)
    return 0


def markdown_table(results: dict) -> str:
    shots = list(results["shots"])
    header = "| row | " + " | ".join(f"5-way {shot}-shot, {results['shots'][shot]['tasks']} tasks | paired vs (a)"
                                     for shot in shots) + " |"
    lines = [header, "|---|" + "---|---|" * len(shots)]
    labels = {key: label for key, label, _, _ in ROWS}
    for key in labels:
        cells = []
        for shot in shots:
            row = next((r for r in results["shots"][shot]["rows"] if r["row"] == key), None)
            if row is None:
                cells += ["-", "-"]
                continue
            lr = f" (lr {row['lr']:g})" if row.get("lr") is not None else ""
            lr += f", the same network as ({row['same_as']})" if row.get("same_as") else ""
            gain = row.get("gain_vs_a")
            cells += [f"{100 * row['mean']:.2f}% ± {100 * row['ci95']:.2f}{lr}",
                      f"{100 * gain['mean']:+.2f} ± {100 * gain['ci95']:.2f}" if gain else ""]
        lines.append(f"| ({key}) {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
