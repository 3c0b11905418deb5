"""Meta-testing over many fixed tasks on Ray: tasks are scored in parallel actors (fractional GPUs on GPU).

Reports, per mode, the mean accuracy and its 95% interval (1.96 sd / sqrt(n) over per-task
accuracies), stores per-task accuracies and the exact task list as MLflow artifacts, and logs
episodes/s. Fine-tuning hyperparameters can be chosen on meta-validation tasks first (never on test).
"""

from __future__ import annotations

import copy
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metallo_core import tracking
from metallo_core.config import config_hash, to_dict
from metallo_core.data.class_index import indices_by_class, load_split_labels
from metallo_core.data.manifest import read_manifest
from metallo_core.errors import DataError
from metallo_core.fewshot.config import EvaluateConfig
from metallo_core.fewshot.confusion import CONFUSION_ARTIFACT_DIR, confusion_over_tasks
from metallo_core.fewshot.episodes import (
    Episode,
    episode_meta,
    episodes_from_json,
    episodes_to_json,
    fixed_episodes,
)
from metallo_core.fewshot.evaluation import task_accuracy
from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain
from metallo_core.fewshot.stage_gate import StageVerdict, judge
from metallo_core.progress import Progress
from metallo_core.report.figures import confusion_heatmap
from metallo_core.storage import locate
from metallo_core.tracking.figures import log_figures
from metallo_core.train import ray_setup


@dataclass
class ModeResult:
    mean: float
    ci95: float
    n: int
    episodes_per_s: float
    lr: float | None = None
    steps: int | None = None


@dataclass
class EvaluationResult:
    model: str
    dataset: str
    split: str
    way: int
    shot: int
    query: int
    tasks: int
    modes: dict[str, ModeResult] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    # mode -> (mean, ci95) of its per-task accuracy minus ProtoNet's on the same tasks
    gains: dict[str, tuple[float, float]] = field(default_factory=dict)
    # mode -> accuracy of each test task, in task order (the same tasks for every mode: compare them paired)
    per_task: dict[str, list[float]] = field(default_factory=dict)
    run_id: str = ""


class TaskScorer:
    """A Ray actor holding one model and one split in memory; scores chunks of tasks on request."""

    def __init__(self, model_uri: str, data_uri: str, split: str, image_size: int, precision: str,
                 tracking_uri: str, threads: int):
        import torch

        from metallo_core.data.class_index import ClassIndexedImages
        from metallo_core.fewshot.protonet import ImageNormalizer
        from metallo_core.models.protonet_store import load_protonet

        os.environ[tracking.ENV_TRACKING_URI] = tracking_uri
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, spec, _ = load_protonet(model_uri)
        self.model.to(self.device)
        self.images = ClassIndexedImages.load(data_uri, split, image_size=image_size or spec.image_size)
        self.normalizer = ImageNormalizer(spec.mean, spec.std, device=self.device)
        self.precision = precision
        self.prepared: dict = {}  # cache_key -> PreparedImages of the whole split

    def predict(self, mode: str, episodes_json: str, settings: dict, seed: int, lr: float | None,
                first_task: int = 0) -> list[list[int]]:
        """Per task, the episode-local label predicted for each query; the tasks are the slice of the
        evaluation's list that starts at task `first_task` (which seeds each task's fine-tuning)."""
        from metallo_core.config import from_dict
        from metallo_core.fewshot.evaluation import engine_predictions
        from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings

        episodes, _ = episodes_from_json(episodes_json)
        engine = FinetuneEngine(self.model, from_dict(FinetuneSettings, settings, "finetune"), self.normalizer)
        predictions = engine_predictions(engine, self._prepared(engine), episodes, mode, seed=seed, lr=lr,
                                         precision=self.precision, first_task=first_task)
        return [predicted.tolist() for predicted in predictions]

    def _prepared(self, engine):
        """The split prepared for the engine's settings: once per actor (per cache stage), not per task."""
        from metallo_core.fewshot.evaluation import PreparedImages, cache_key

        key = cache_key(engine.settings)
        if key not in self.prepared:
            self.prepared.clear()  # one split's trunk maps at a time: a search may try several cache stages
            self.prepared[key] = PreparedImages(engine, self.images.images, self.precision)
        return self.prepared[key]

    def predict_chunk(self, first_task: int, mode: str, episodes_json: str, settings: dict, seed: int,
                      lr: float | None) -> tuple[int, list[list[int]]]:
        """(first_task, `predict` of the chunk): the pool hands results back in completion order, and the
        chunk's first task index puts them back in task order."""
        return first_task, self.predict(mode, episodes_json, settings, seed, lr, first_task)

    def score(self, mode: str, episodes_json: str, settings: dict, seed: int, lr: float | None) -> list[float]:
        """Per-task accuracies."""
        episodes, _ = episodes_from_json(episodes_json)
        predictions = self.predict(mode, episodes_json, settings, seed, lr)
        return [task_accuracy(np.asarray(predicted), episode) for predicted, episode in zip(predictions, episodes)]


def plan_tasks(data_uri: str, split: str, config: EvaluateConfig, count: int, seed: int) -> tuple[list[Episode], str]:
    """The fixed task list (and its JSON, tied to the split's class membership) for a split."""
    labels, class_names = load_split_labels(data_uri, split)
    if len(class_names) < config.episodes.way:
        raise DataError(f"split {split!r} has {len(class_names)} classes, fewer than episodes.way = "
                        f"{config.episodes.way}; lower the way or evaluate another split")
    members = indices_by_class(labels, len(class_names))
    episodes = fixed_episodes(members, config.episodes.way, config.episodes.shot, config.episodes.query, count,
                              seed=seed, cap_query=config.episodes.cap_query)
    meta = episode_meta(members, seed=seed, cap_query=config.episodes.cap_query, split=split, dataset=data_uri)
    return episodes, episodes_to_json(episodes, meta)


# Fine-tuning chunks: at most this many tasks each (a 600-task evaluation reports progress every few tasks),
# and at least this many chunks per actor when there are enough tasks (a slow chunk at the end idles
# the other actors for less).
MAX_TASKS_PER_CHUNK = 8
CHUNKS_PER_ACTOR = 8


def chunk_bounds(tasks: int, actors: int) -> list[tuple[int, int]]:
    """[start, stop) of each fine-tuning chunk of `tasks` tasks spread over `actors` actors."""
    size = max(1, min(MAX_TASKS_PER_CHUNK, -(-tasks // (CHUNKS_PER_ACTOR * actors))))
    return [(start, min(start + size, tasks)) for start in range(0, tasks, size)]


class ParallelScorer:
    """Spreads task chunks over a `ray.util.ActorPool` of TaskScorer actors (an idle actor takes the next
    chunk) and returns per-task results in task order, printing progress on stderr as chunks finish."""

    def __init__(self, config: EvaluateConfig, split: str, progress_every_s: float = 30.0):
        import ray

        actor = ray.remote(num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor)(TaskScorer)
        threads = max(1, int(round(config.cpus_per_actor)))
        self.actors = [
            actor.remote(config.model, config.data.uri, split, config.data.image_size, config.precision,
                         tracking.tracking_uri(), threads)
            for _ in range(config.parallelism)
        ]
        self.progress_every_s = progress_every_s

    def predict(self, mode: str, episodes: list[Episode], settings: dict, seed: int,
                lr: float | None = None) -> tuple[list[np.ndarray], float]:
        """(per task, the episode-local label predicted for each query, in task order; episodes/s).

        Each task's prediction depends only on the task, its index and `seed`, never on how the tasks were
        chunked or which actor scored them, so the same seed gives the same predictions at any parallelism."""
        from ray.util import ActorPool

        if mode == "protonet":  # one embedding pass serves every task: no point in splitting it
            bounds = [(0, len(episodes))]
        else:
            bounds = chunk_bounds(len(episodes), len(self.actors))
        progress = Progress(f"evaluate {mode}", total=len(episodes), every_s=self.progress_every_s)
        pool = ActorPool(self.actors)
        chunks = [(start, episodes_to_json(episodes[start:stop], {})) for start, stop in bounds]
        by_start: dict[int, list[list[int]]] = {}
        for start, predicted in pool.map_unordered(
                lambda scorer, chunk: scorer.predict_chunk.remote(chunk[0], mode, chunk[1], settings, seed, lr),
                chunks):
            by_start[start] = predicted
            progress.advance(len(predicted))
        rate = progress.finish()
        predictions = [np.asarray(task, dtype=np.int64) for start, _ in bounds for task in by_start[start]]
        return predictions, rate

    def score(self, mode: str, episodes: list[Episode], settings: dict, seed: int,
              lr: float | None = None) -> tuple[list[float], float]:
        """(per-task accuracies in task order, episodes/s)."""
        predictions, rate = self.predict(mode, episodes, settings, seed, lr)
        return [task_accuracy(predicted, episode) for predicted, episode in zip(predictions, episodes)], rate

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def _per_task_csv(accuracies: list[float]) -> str:
    buffer = io.StringIO()
    buffer.write("task,accuracy\n")
    for index, value in enumerate(accuracies):
        buffer.write(f"{index},{value:.6f}\n")
    return buffer.getvalue()


def select_finetune_on_val(config: EvaluateConfig, run) -> tuple[float, int, dict[str, Any]]:
    """Pick the fine-tuning lr (and steps) by mean accuracy on meta-validation tasks."""
    tasks, tasks_json = plan_tasks(config.data.uri, config.data.val_split, config, config.select_tasks,
                                   seed=config.seed + 7)
    run.log_text(tasks_json, "episodes/meta_val_selection.json")
    scorer = ParallelScorer(config, config.data.val_split)
    table = []
    try:
        for steps in config.select_steps or [config.finetune.steps]:
            settings = to_dict(config.finetune) | {"steps": steps}
            for lr in config.select_lrs:
                # lr 0 is plain ProtoNet (the engine adapts nothing): embed each image once, not per task.
                mode, mode_lr = ("protonet", None) if lr == 0 else ("finetune", lr)
                accuracies, _ = scorer.score(mode, tasks, settings, config.seed, mode_lr)
                mean, ci95 = mean_and_ci95(accuracies)
                # per_task: each meta-val task's accuracy, in task order, to compare candidates paired
                table.append({"lr": lr, "steps": steps, "val_accuracy": mean, "val_ci95": ci95,
                              "per_task": accuracies})
                print(f"  meta-val selection: lr {lr:g}, steps {steps}: {mean:.4f} ± {ci95:.4f}",
                      file=sys.stderr, flush=True)
    finally:
        scorer.close()
    best, verdict = choose_on_selection(table)
    run.log_dict(table, "selection/finetune_on_meta_val.json")
    run.log_metrics({"selected_lr": best["lr"], "selected_steps": best["steps"],
                     "selected_val_accuracy": best["val_accuracy"]})
    if verdict is not None:
        print(f"  {verdict.line()}", file=sys.stderr, flush=True)
    return best["lr"], best["steps"], {"on": config.data.val_split, "tasks": config.select_tasks, "grid": table,
                                       "best": best, "verdict": verdict.to_dict() if verdict else None}


def choose_on_selection(table: list[dict[str, Any]]) -> tuple[dict[str, Any], StageVerdict | None]:
    """The selection row fine-tuning runs with, and the verdict on fine-tuning against plain ProtoNet.

    Fine-tuning is gated like every other stage (fewshot.stage_gate): its most accurate row with lr > 0 (ties:
    the smaller lr) is used only if the paired gain over the lr 0 row (plain ProtoNet; P>M>F's lr search has
    it too) on the same selection tasks has a 95% interval above 0; otherwise the lr 0 row. Without an lr 0
    row there is nothing to gate against: the most accurate row, and no verdict."""
    def most_accurate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda row: (row["val_accuracy"], -row["lr"]))

    plain = next((row for row in table if row["lr"] == 0), None)
    finetuned = [row for row in table if row["lr"] > 0]
    if plain is None or not finetuned:
        return most_accurate(table), None
    contender = most_accurate(finetuned)
    verdict = judge_finetune(plain, contender)
    return (contender if verdict.kept else plain), verdict


def judge_finetune(plain: dict[str, Any], chosen: dict[str, Any]) -> StageVerdict:
    return judge("finetune", "each task's support set, per task", "plain ProtoNet (lr 0)", plain["per_task"],
                 chosen["per_task"])


def run_evaluation(config: EvaluateConfig) -> EvaluationResult:
    from metallo_core.tracking.registry import pin_model_uri

    config = copy.deepcopy(config)
    config.data.uri = locate(config.data.uri).uri
    tracking.configure()
    read_manifest(config.data.uri).split(config.split)
    tasks, tasks_json = plan_tasks(config.data.uri, config.split, config, config.tasks, seed=config.seed)
    _, class_names = load_split_labels(config.data.uri, config.split)
    # Pinned before Ray starts: a clear error for a wrong name or alias, and one version for every task.
    model_uri = config.model = pin_model_uri(config.model)
    ray_setup.connect(config.ray_address, "ray_address")
    lineage = {
        "metallo.stage": "evaluate",
        "metallo.model_uri": model_uri,
        **tracking.dataset_tags(config.data.uri, split=config.split),
        "metallo.task": f"{config.episodes.way}-way {config.episodes.shot}-shot",
        "metallo.config_hash": config_hash(config),
    }
    run_name = config.run_name or f"eval-{config.episodes.way}w{config.episodes.shot}s"
    result = EvaluationResult(model=model_uri, dataset=config.data.uri, split=config.split, way=config.episodes.way,
                              shot=config.episodes.shot, query=config.episodes.query, tasks=len(tasks))
    with tracking.start_run(config.experiment, run_name, config=config, tags=lineage) as run:
        result.run_id = run.run_id
        run.log_text(tasks_json, f"episodes/{config.split}.json")
        lr, steps = config.finetune.lr, config.finetune.steps
        if config.select_on_val and any(mode != "protonet" for mode in config.modes):
            lr, steps, result.selection = select_finetune_on_val(config, run)
        settings = to_dict(config.finetune) | {"steps": steps}
        scorer = ParallelScorer(config, config.split)
        per_task = result.per_task
        try:
            for mode in config.modes:
                predictions, rate = scorer.predict(mode, tasks, settings, config.seed,
                                                   lr if mode == "finetune" else None)
                accuracies = [task_accuracy(predicted, task) for predicted, task in zip(predictions, tasks)]
                per_task[mode] = accuracies
                mean, ci95 = mean_and_ci95(accuracies)
                result.modes[mode] = ModeResult(mean=mean, ci95=ci95, n=len(accuracies), episodes_per_s=rate,
                                                lr=lr if mode == "finetune" else None,
                                                steps=steps if mode != "protonet" else None)
                run.log_metrics({f"{mode}_accuracy": mean, f"{mode}_ci95": ci95, f"{mode}_episodes_per_s": rate})
                run.log_text(_per_task_csv(accuracies), f"per_task/{mode}.csv")
                confusion = confusion_over_tasks(tasks, predictions, class_names)
                run.log_dict(confusion.to_json(), f"{CONFUSION_ARTIFACT_DIR}/{mode}.json")
                log_figures(run.run_id, {f"{CONFUSION_ARTIFACT_DIR}/{mode}.png": confusion_heatmap(
                    confusion, title=f"{mode}, {config.split}, {config.episodes.way}w{config.episodes.shot}s")})
                print(f"  {mode}: {mean:.4f} ± {ci95:.4f} over {len(accuracies)} tasks ({rate:.2f} episodes/s)",
                      file=sys.stderr, flush=True)
        finally:
            scorer.close()
        adapted = [mode for mode in per_task if mode != "protonet"] if "protonet" in per_task else []
        for mode in adapted:
            gain, gain_ci95 = result.gains[mode] = paired_gain(per_task["protonet"], per_task[mode])
            run.log_metrics({f"{mode}_gain_over_protonet": gain, f"{mode}_gain_ci95": gain_ci95})
            print(f"  {mode} - protonet, paired over the same tasks: {gain:+.4f} ± {gain_ci95:.4f}",
                  file=sys.stderr, flush=True)
        run.log_dict(summary_json(result), "summary.json")
        if "finetune" in config.modes:  # what classify --finetune uses for this model (finetune_choice)
            import dataclasses

            from metallo_core.models.finetune_choice import record_chosen_settings

            chosen_by = (f"evaluation {run_name!r}, lr and steps chosen on {config.select_tasks} meta-validation tasks"
                         if result.selection else f"evaluation {run_name!r} (settings as configured, not selected)")
            record_chosen_settings(run.run_id, model_uri, dataclasses.replace(config.finetune, lr=lr, steps=steps),
                                   chosen_by, tag_model=bool(result.selection))
    return result


def summary_json(result: EvaluationResult) -> dict[str, Any]:
    """The one JSON object `metallo evaluate --json` prints."""
    return {
        "model": result.model,
        "dataset": result.dataset,
        "split": result.split,
        "way": result.way,
        "shot": result.shot,
        "query": result.query,
        "tasks": result.tasks,
        "modes": {mode: vars(value) for mode, value in result.modes.items()},
        "selection": result.selection.get("best", {}),
        "gain_over_protonet": {mode: {"mean": mean, "ci95": ci95} for mode, (mean, ci95) in result.gains.items()},
        "per_task": result.per_task,
        "run_id": result.run_id,
    }


def describe_result(result: EvaluationResult) -> str:
    lines = [f"{result.way}-way {result.shot}-shot, {result.tasks} tasks of {result.split!r}, model {result.model}"]
    for mode, value in result.modes.items():
        extra = f" (lr {value.lr:g}, {value.steps} steps)" if value.lr is not None else ""
        lines.append(f"  {mode:<16} {100 * value.mean:6.2f}% ± {100 * value.ci95:.2f}{extra}")
    for mode, (gain, gain_ci95) in result.gains.items():
        lines.append(f"  {mode} - protonet (paired, same tasks): {100 * gain:+.2f} ± {100 * gain_ci95:.2f} points")
    lines.append(f"  see it in MLflow: {tracking.ui_command()}")
    return "\n".join(lines)
