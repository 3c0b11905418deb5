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
from metallo_core.config import config_hash, from_dict, to_dict
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
from metallo_core.fewshot.inference import InferenceSettings
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
    # The inference settings every mode was scored with (fewshot.inference, as a dict); with any lever on,
    # `<mode>_plain` entries hold the same modes scored plain
    inference: dict[str, Any] = field(default_factory=dict)


class TaskScorer:
    """A Ray actor holding one model and one split in memory; scores chunks of tasks on request."""

    def __init__(self, model_uri: str, data_uri: str, split: str, image_size: int, precision: str,
                 tracking_uri: str, threads: int):
        import torch

        from metallo_core.data.class_index import ClassIndexedImages
        from metallo_core.fewshot.protonet import ImageNormalizer
        from metallo_core.tracking.protonet_store import load_protonet

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
                first_task: int = 0, inferences: list[dict] | None = None) -> list[list[list[int]]]:
        """Per inference settings (`inferences`, as dicts; default: plain ProtoNet), per task, the
        episode-local label predicted for each query; the tasks are the slice of the evaluation's list that
        starts at task `first_task` (which seeds each task's fine-tuning). Each task is adapted once for all
        the inference settings."""
        from metallo_core.config import from_dict
        from metallo_core.fewshot.evaluation import engine_predictions_by_inference
        from metallo_core.fewshot.finetune import FinetuneEngine, FinetuneSettings
        from metallo_core.fewshot.inference import InferenceSettings

        episodes, _ = episodes_from_json(episodes_json)
        engine = FinetuneEngine(self.model, from_dict(FinetuneSettings, settings, "finetune"), self.normalizer)
        chosen = [from_dict(InferenceSettings, inference, "inference") for inference in inferences or [{}]]
        predictions = engine_predictions_by_inference(engine, self._prepared(engine), episodes, mode, chosen,
                                                      seed=seed, lr=lr, precision=self.precision,
                                                      first_task=first_task)
        return [[predicted.tolist() for predicted in per_task] for per_task in predictions]

    def _prepared(self, engine):
        """The split prepared for the engine's settings: once per actor (per cache stage), not per task."""
        from metallo_core.fewshot.evaluation import PreparedImages, cache_key

        key = cache_key(engine.settings)
        if key not in self.prepared:
            self.prepared.clear()  # one split's trunk maps at a time: a search may try several cache stages
            self.prepared[key] = PreparedImages(engine, self.images.images, self.precision)
        return self.prepared[key]

    def predict_chunk(self, first_task: int, mode: str, episodes_json: str, settings: dict, seed: int,
                      lr: float | None, inferences: list[dict] | None = None) -> tuple[int, list[list[list[int]]]]:
        """(first_task, `predict` of the chunk): the pool hands results back in completion order, and the
        chunk's first task index puts them back in task order."""
        return first_task, self.predict(mode, episodes_json, settings, seed, lr, first_task, inferences)


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

    def predict(self, mode: str, episodes: list[Episode], settings: dict, seed: int, lr: float | None = None,
                inference: dict | None = None) -> tuple[list[np.ndarray], float]:
        """(per task, the episode-local label predicted for each query, in task order; episodes/s), under
        one inference settings (default: plain ProtoNet); see `predict_by_inference`."""
        predictions, rate = self.predict_by_inference(mode, episodes, settings, seed, lr, [inference or {}])
        return predictions[0], rate

    def predict_by_inference(self, mode: str, episodes: list[Episode], settings: dict, seed: int,
                             lr: float | None, inferences: list[dict]) -> tuple[list[list[np.ndarray]], float]:
        """(per inference settings, per task, the episode-local label predicted for each query, in task
        order; episodes/s). Each task is adapted once and scored under every inference settings.

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
        by_start: dict[int, list[list[list[int]]]] = {}
        for start, predicted in pool.map_unordered(
                lambda scorer, chunk: scorer.predict_chunk.remote(chunk[0], mode, chunk[1], settings, seed, lr,
                                                                  inferences),
                chunks):
            by_start[start] = predicted
            progress.advance(len(predicted[0]))
        rate = progress.finish()
        predictions = [[np.asarray(task, dtype=np.int64) for start, _ in bounds for task in by_start[start][which]]
                       for which in range(len(inferences))]
        return predictions, rate

    def score(self, mode: str, episodes: list[Episode], settings: dict, seed: int, lr: float | None = None,
              inference: dict | None = None) -> tuple[list[float], float]:
        """(per-task accuracies in task order, episodes/s)."""
        predictions, rate = self.predict(mode, episodes, settings, seed, lr, inference)
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
    """Pick the fine-tuning lr (and steps) and the inference settings by accuracy on meta-validation tasks
    (`choose_on_selection`); each (steps, lr) adapts every task once and scores it under every inference
    candidate. Returns (lr, steps, the selection record: tasks, grid, best row, verdict)."""
    tasks, tasks_json = plan_tasks(config.data.uri, config.data.val_split, config, config.select_tasks,
                                   seed=config.seed + 7)
    run.log_text(tasks_json, "episodes/meta_val_selection.json")
    candidates = inference_candidates(config)
    scorer = ParallelScorer(config, config.data.val_split)
    table = []
    try:
        for steps in config.select_steps or [config.finetune.steps]:
            settings = to_dict(config.finetune) | {"steps": steps}
            for lr in config.select_lrs:
                # lr 0 is plain ProtoNet (the engine adapts nothing): embed each image once, not per task.
                mode, mode_lr = ("protonet", None) if lr == 0 else ("finetune", lr)
                predictions, _ = scorer.predict_by_inference(mode, tasks, settings, config.seed, mode_lr, candidates)
                for inference, predicted in zip(candidates, predictions):
                    accuracies = [task_accuracy(labels, task) for labels, task in zip(predicted, tasks)]
                    mean, ci95 = mean_and_ci95(accuracies)
                    # per_task: each meta-val task's accuracy, in task order, to compare candidates paired
                    table.append({"lr": lr, "steps": steps, "inference": inference, "val_accuracy": mean,
                                  "val_ci95": ci95, "per_task": accuracies})
                    print(f"  meta-val selection: lr {lr:g}, steps {steps}, "
                          f"{from_dict(InferenceSettings, inference, 'inference').describe()}: {mean:.4f} ± {ci95:.4f}",
                          file=sys.stderr, flush=True)
    finally:
        scorer.close()
    best, verdict = choose_on_selection(table)
    run.log_dict(table, "selection/finetune_on_meta_val.json")
    run.log_metrics({"selected_lr": best["lr"], "selected_steps": best["steps"],
                     "selected_val_accuracy": best["val_accuracy"]})
    run.set_tags({"metallo.inference": from_dict(InferenceSettings, best["inference"], "inference").describe()})
    if verdict is not None:
        print(f"  {verdict.line()}", file=sys.stderr, flush=True)
    return best["lr"], best["steps"], {"on": config.data.val_split, "tasks": config.select_tasks, "grid": table,
                                       "best": best, "verdict": verdict.to_dict() if verdict else None}


def inference_candidates(config: EvaluateConfig) -> list[dict[str, Any]]:
    """Plain ProtoNet first (the selection's baseline), then `inference` and `select_inference`, each once."""
    candidates: list[dict[str, Any]] = []
    for candidate in [InferenceSettings(), config.inference, *config.select_inference]:
        if to_dict(candidate) not in candidates:
            candidates.append(to_dict(candidate))
    return candidates


def choose_on_selection(table: list[dict[str, Any]]) -> tuple[dict[str, Any], StageVerdict | None]:
    """The selection row the test tasks run with (its lr, steps and inference settings), and the verdict on
    it against plain ProtoNet.

    Every change is gated like every other stage (fewshot.stage_gate): the most accurate row that is not
    plain ProtoNet (lr 0 with every inference lever off; ties: the smaller lr) is used only if its paired
    gain over the plain row (P>M>F's lr search has lr 0 too) on the same selection tasks has a 95% interval
    above 0; otherwise the plain row. Without a plain row there is nothing to gate against: the most
    accurate row, and no verdict. Rows without an `inference` entry are plain inference."""
    plain_inference = to_dict(InferenceSettings())

    def is_plain(row: dict[str, Any]) -> bool:
        return row["lr"] == 0 and row.get("inference", plain_inference) == plain_inference

    def most_accurate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda row: (row["val_accuracy"], -row["lr"]))

    plain = next((row for row in table if is_plain(row)), None)
    others = [row for row in table if not is_plain(row)]
    if plain is None or not others:
        return most_accurate(table), None
    contender = most_accurate(others)
    verdict = judge_finetune(plain, contender)
    return (contender if verdict.kept else plain), verdict


def judge_finetune(plain: dict[str, Any], chosen: dict[str, Any]) -> StageVerdict:
    inference = from_dict(InferenceSettings, chosen.get("inference", {}), "inference")
    what = f"fine-tuning lr {chosen['lr']:g}" if chosen["lr"] > 0 else "no fine-tuning"
    return judge("finetune", f"each task's support set ({what}, {inference.describe()})", "plain ProtoNet (lr 0)",
                 plain["per_task"], chosen["per_task"])


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
        inference = to_dict(config.inference)
        if config.select_on_val and (any(mode != "protonet" for mode in config.modes) or config.select_inference):
            lr, steps, result.selection = select_finetune_on_val(config, run)
            inference = result.selection["best"]["inference"]
        result.inference = inference
        settings = to_dict(config.finetune) | {"steps": steps}
        # With any inference lever on, each mode is also scored plain (every lever off, inductive) on the
        # same adaptation of each task: `<mode>_plain`, so the levers' gain is reported paired and the
        # transductive figure never stands alone.
        scored = [inference] if inference == to_dict(InferenceSettings()) else [inference, to_dict(InferenceSettings())]
        scorer = ParallelScorer(config, config.split)
        per_task = result.per_task
        try:
            for mode in config.modes:
                by_inference, rate = scorer.predict_by_inference(mode, tasks, settings, config.seed,
                                                                 lr if mode == "finetune" else None, scored)
                for name, predictions in zip((mode, f"{mode}_plain"), by_inference):
                    accuracies = [task_accuracy(predicted, task) for predicted, task in zip(predictions, tasks)]
                    per_task[name] = accuracies
                    mean, ci95 = mean_and_ci95(accuracies)
                    result.modes[name] = ModeResult(mean=mean, ci95=ci95, n=len(accuracies), episodes_per_s=rate,
                                                    lr=lr if mode == "finetune" else None,
                                                    steps=steps if mode != "protonet" else None)
                    run.log_metrics({f"{name}_accuracy": mean, f"{name}_ci95": ci95, f"{name}_episodes_per_s": rate})
                    run.log_text(_per_task_csv(accuracies), f"per_task/{name}.csv")
                    confusion = confusion_over_tasks(tasks, predictions, class_names)
                    run.log_dict(confusion.to_json(), f"{CONFUSION_ARTIFACT_DIR}/{name}.json")
                    log_figures(run.run_id, {f"{CONFUSION_ARTIFACT_DIR}/{name}.png": confusion_heatmap(
                        confusion, title=f"{name}, {config.split}, {config.episodes.way}w{config.episodes.shot}s")})
                    how = (from_dict(InferenceSettings, inference, "inference").describe() if name == mode
                           else "plain, inductive")
                    print(f"  {name} ({how}): {mean:.4f} ± {ci95:.4f} over {len(accuracies)} tasks "
                          f"({rate:.2f} episodes/s)", file=sys.stderr, flush=True)
        finally:
            scorer.close()
        # Paired gains: each adapted mode over protonet (same inference), each mode over its plain self.
        pairs = [(mode, "protonet") for mode in config.modes if mode != "protonet" and "protonet" in per_task]
        pairs += [(name, f"{name}_plain") for name in config.modes if f"{name}_plain" in per_task]
        for after, before in pairs:
            key = after if before == "protonet" else f"{after} - {before}"
            gain, gain_ci95 = result.gains[key] = paired_gain(per_task[before], per_task[after])
            if before == "protonet":
                run.log_metrics({f"{after}_gain_over_protonet": gain, f"{after}_gain_ci95": gain_ci95})
            else:
                run.log_metrics({f"{after}_gain_over_plain": gain, f"{after}_gain_ci95_over_plain": gain_ci95})
            print(f"  {after} - {before}, paired over the same tasks: {gain:+.4f} ± {gain_ci95:.4f}",
                  file=sys.stderr, flush=True)
        run.log_dict(summary_json(result), "summary.json")
        if "finetune" in config.modes:  # what classify --finetune uses for this model (finetune_choice)
            import dataclasses

            from metallo_core.tracking.finetune_choice import record_chosen_settings

            chosen_by = (f"evaluation {run_name!r}, lr and steps chosen on {config.select_tasks} meta-validation tasks"
                         if result.selection else f"evaluation {run_name!r} (settings as configured, not selected)")
            record_chosen_settings(run.run_id, model_uri, dataclasses.replace(config.finetune, lr=lr, steps=steps),
                                   chosen_by, tag_model=bool(result.selection))
        if result.selection:  # what classify scores this model's queries with (finetune_choice)
            from metallo_core.tracking.finetune_choice import record_chosen_inference

            record_chosen_inference(run.run_id, model_uri, from_dict(InferenceSettings, inference, "inference"),
                                    f"evaluation {run_name!r}, chosen on {config.select_tasks} meta-validation tasks")
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
        "inference": result.inference,
        "gain_over_protonet": {mode: {"mean": mean, "ci95": ci95} for mode, (mean, ci95) in result.gains.items()},
        "per_task": result.per_task,
        "run_id": result.run_id,
    }


def describe_result(result: EvaluationResult) -> str:
    lines = [f"{result.way}-way {result.shot}-shot, {result.tasks} tasks of {result.split!r}, model {result.model}"]
    for mode, value in result.modes.items():
        extra = f" (lr {value.lr:g}, {value.steps} steps)" if value.lr is not None else ""
        lines.append(f"  {mode:<16} {100 * value.mean:6.2f}% ± {100 * value.ci95:.2f}{extra}")
    if result.inference and result.inference != to_dict(InferenceSettings()):
        lines.append(f"  inference: {from_dict(InferenceSettings, result.inference, 'inference').describe()} "
                     "(<mode>_plain: the same mode with every inference lever off)")
    for mode, (gain, gain_ci95) in result.gains.items():
        label = mode if " - " in mode else f"{mode} - protonet"
        lines.append(f"  {label} (paired, same tasks): {100 * gain:+.2f} ± {100 * gain_ci95:.2f} points")
    lines.append(f"  see it in MLflow: {tracking.ui_command()}")
    return "\n".join(lines)
