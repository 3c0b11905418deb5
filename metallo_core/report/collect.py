"""Everything a report shows, read from MLflow: the experiment's runs, and the runs and registered models
its evaluations came from, followed through the registry even into other experiments (the DINO run behind
a ProtoNet's backbone usually lives in `metallo-pretrain`), with metric histories, confusion matrices and
configs. Nothing here formats anything; a link that cannot be followed becomes a note, not a failure.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metallo_core import tracking
from metallo_core.errors import MetalloError
from metallo_core.fewshot.confusion import CONFUSION_ARTIFACT_DIR, Confusion
from metallo_core.tracking.registry import parse_model_uri, resolve_version

STAGE_TAG = "metallo.stage"
REPORT_STAGE = "report"  # runs that hold logged reports; never reported on themselves
GRID_RUNS_ARTIFACT = "grid/runs.json"
CONFIG_ARTIFACT = "config.yaml"
EVALUATION_MODES = ("protonet", "finetune", "finetune_autolr")
# The histories plotted per training stage (keys as the stages log them).
CURVE_METRICS = {
    "pretrain": ("loss", "knn_accuracy"),
    "metatrain": ("train_loss", "val_accuracy", "val_ci95"),
}
RUNS_PAGE = 1000
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class RunRecord:
    run_id: str
    name: str
    experiment: str
    status: str
    start_time: int  # ms since the epoch
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each
    in_experiment: bool  # False when reached only through lineage or a grid's child list

    @property
    def stage(self) -> str:
        return self.tags.get(STAGE_TAG, "")


@dataclass
class ModelRecord:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class ModeScore:
    mean: float
    ci95: float
    gain: float | None = None  # paired, over the same tasks, against ProtoNet
    gain_ci95: float | None = None


@dataclass
class EvaluationRecord:
    run_id: str
    model_uri: str
    dataset_uri: str
    split: str
    way: int
    shot: int
    tasks: int | None
    modes: dict[str, ModeScore]
    confusions: dict[str, Confusion] = field(default_factory=dict)
    grid_labels: dict[str, str] = field(default_factory=dict)  # a grid's own names for the table's row


@dataclass
class ReportData:
    experiment: str
    tracking_uri: str
    runs: dict[str, RunRecord]
    evaluations: list[EvaluationRecord]
    models: dict[str, ModelRecord]  # by models:/name/version
    curves: dict[str, dict[str, list[tuple[int, float]]]]  # run id -> metric -> (step, value) in step order
    configs: dict[str, str]  # run id -> its config.yaml, for runs that registered a model
    problems: list[str]  # links that could not be followed, shown in the report


def collect(experiment_name: str) -> ReportData:
    """Read experiment `experiment_name` and everything its evaluated models came from."""
    client = tracking.client()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments())
        raise MetalloError(f"no MLflow experiment named {experiment_name!r} at {_shown_uri()}; "
                           f"experiments there: {', '.join(known) or 'none'}")
    with tempfile.TemporaryDirectory(prefix="metallo-report-") as scratch, _quiet_downloads():
        collector = _Collector(client, Path(scratch), experiment_name)
        collector.read_experiment(experiment.experiment_id)
        if not collector.runs:
            raise MetalloError(f"MLflow experiment {experiment_name!r} at {_shown_uri()} has no runs "
                               "to report on; run a stage with this experiment first")
        collector.follow_grids()
        collector.follow_evaluations()
        collector.follow_registrations()
        collector.read_curves_and_configs()
        return ReportData(
            experiment=experiment_name,
            tracking_uri=_shown_uri(),
            runs=collector.runs,
            evaluations=collector.evaluations,
            models=collector.models,
            curves=collector.curves,
            configs=collector.configs,
            problems=collector.problems,
        )


class _Collector:
    """One pass over MLflow with caches, so a run or model shared by many evaluations is read once."""

    def __init__(self, client, scratch: Path, experiment_name: str):
        self.client = client
        self.scratch = scratch
        self.experiment_name = experiment_name
        self.runs: dict[str, RunRecord] = {}
        self.evaluations: list[EvaluationRecord] = []
        self.models: dict[str, ModelRecord] = {}
        self.curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
        self.configs: dict[str, str] = {}
        self.problems: list[str] = []
        self._experiment_names: dict[str, str] = {}
        self._grid_labels: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------------------------------ runs

    def read_experiment(self, experiment_id: str) -> None:
        self._experiment_names[experiment_id] = self.experiment_name
        token = None
        while True:
            page = self.client.search_runs([experiment_id], max_results=RUNS_PAGE, page_token=token,
                                           order_by=["attributes.start_time ASC"])
            for run in page:
                record = self._record(run, in_experiment=True)
                if record.stage != REPORT_STAGE:
                    self.runs[record.run_id] = record
            token = page.token
            if not token:
                return

    def run(self, run_id: str, why: str) -> RunRecord | None:
        """The run `run_id`, read once; None (and a note) when it is gone."""
        if run_id in self.runs:
            return self.runs[run_id]
        try:
            record = self._record(self.client.get_run(run_id), in_experiment=False)
        except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException and HTTP errors alike
            self.problems.append(f"run {run_id} ({why}) cannot be read: {_first_line(exc)}")
            return None
        self.runs[run_id] = record
        return record

    def _record(self, run, *, in_experiment: bool) -> RunRecord:
        experiment_id = run.info.experiment_id
        if experiment_id not in self._experiment_names:
            self._experiment_names[experiment_id] = self.client.get_experiment(experiment_id).name
        return RunRecord(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id,
            experiment=self._experiment_names[experiment_id],
            status=run.info.status,
            start_time=int(run.info.start_time or 0),
            tags=dict(run.data.tags),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            in_experiment=in_experiment,
        )

    # ------------------------------------------------------------------------------------- lineage

    def follow_grids(self) -> None:
        """A grid's parent run lists its children, which live in the stages' own experiments."""
        for parent in [run for run in self.runs.values() if run.stage == "grid"]:
            children = self._artifact_json(parent.run_id, GRID_RUNS_ARTIFACT)
            for child in children if isinstance(children, list) else []:
                if not isinstance(child, dict) or "run_id" not in child:
                    continue
                if self.run(str(child["run_id"]), f"child of grid run {parent.name}") is None:
                    continue
                labels = {key: str(child[key]) for key in ("backbone", "pretraining", "set", "target") if key in child}
                if child.get("stage") == "evaluate" and labels:
                    self._grid_labels[str(child["run_id"])] = labels

    def follow_evaluations(self) -> None:
        for run in sorted(self.runs.values(), key=lambda r: r.start_time):
            if run.stage != "evaluate":
                continue
            evaluation = self._evaluation(run)
            if evaluation is None:
                continue
            self.evaluations.append(evaluation)
            self.follow_model(evaluation.model_uri, f"evaluated by run {run.name}")

    def follow_model(self, model_uri: str, why: str) -> ModelRecord | None:
        """The model behind `model_uri`, its source run, and (recursively) the backbone it started from."""
        model = self.model(model_uri, why)
        run_id = model.run_id if model else _run_id_of(model_uri)
        if not run_id:
            return model
        source_run = self.run(run_id, f"source of {model_uri}")
        backbone_source = (model.tags if model else {}).get("metallo.backbone_source") or (
            source_run.tags.get("metallo.backbone_source", "") if source_run else "")
        if backbone_source.startswith(("models:/", "runs:/")) and backbone_source != model_uri:
            self.follow_model(backbone_source, f"backbone of {model_uri}")
        return model

    def model(self, model_uri: str, why: str) -> ModelRecord | None:
        if parse_model_uri(model_uri) is None:
            return None  # runs:/... and other URIs name a run, not a registry entry
        try:
            version = resolve_version(model_uri)
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"model {model_uri} ({why}) is not in the registry: {_first_line(exc)}")
            return None
        return self._model_record(version)

    def _model_record(self, version) -> ModelRecord:
        tags = dict(version.tags or {})
        record = ModelRecord(name=version.name, version=str(version.version),
                             run_id=tags.get("metallo.run_id") or version.run_id or "",
                             aliases=sorted(version.aliases or []), tags=tags)
        return self.models.setdefault(record.uri, record)

    def follow_registrations(self) -> None:
        """Models registered by the training runs in view, also those never evaluated."""
        for run in [run for run in self.runs.values() if run.stage in CURVE_METRICS]:
            try:
                versions = self.client.search_model_versions(f"run_id = '{run.run_id}'")
            except Exception as exc:  # noqa: BLE001
                self.problems.append(f"the registry cannot be searched for run {run.name}: {_first_line(exc)}")
                return
            for version in versions:
                if f"models:/{version.name}/{version.version}" not in self.models:
                    self.follow_model(f"models:/{version.name}/{version.version}", f"registered by run {run.name}")

    # -------------------------------------------------------------------------------- evaluations

    def _evaluation(self, run: RunRecord) -> EvaluationRecord | None:
        way, shot = _task_shape(run)
        modes = {}
        for mode in EVALUATION_MODES:
            if f"{mode}_accuracy" not in run.metrics:
                continue
            modes[mode] = ModeScore(mean=run.metrics[f"{mode}_accuracy"], ci95=run.metrics.get(f"{mode}_ci95", 0.0),
                                    gain=run.metrics.get(f"{mode}_gain_over_protonet"),
                                    gain_ci95=run.metrics.get(f"{mode}_gain_ci95"))
        if not modes or way is None or shot is None:
            if run.status == "FINISHED":
                self.problems.append(f"evaluation run {run.name} logged no accuracies or no task shape; left out")
            return None
        tasks = run.params.get("tasks")
        return EvaluationRecord(
            run_id=run.run_id,
            model_uri=run.tags.get("metallo.model_uri", ""),
            dataset_uri=run.tags.get("metallo.dataset_uri", run.params.get("data.uri", "")),
            split=run.tags.get("metallo.split", run.params.get("split", "")),
            way=way,
            shot=shot,
            tasks=int(tasks) if tasks and tasks.isdigit() else None,
            modes=modes,
            confusions=self._confusions(run, modes),
            grid_labels=self._grid_labels.get(run.run_id, {}),
        )

    def _confusions(self, run: RunRecord, modes: Iterable[str]) -> dict[str, Confusion]:
        try:
            names = {Path(item.path).name for item in self.client.list_artifacts(run.run_id, CONFUSION_ARTIFACT_DIR)}
        except Exception:  # noqa: BLE001 - runs from before confusion matrices were logged have none
            return {}
        confusions = {}
        for mode in modes:
            if f"{mode}.json" not in names:
                continue
            payload = self._artifact_json(run.run_id, f"{CONFUSION_ARTIFACT_DIR}/{mode}.json")
            try:
                confusions[mode] = Confusion.from_json(payload, f"{CONFUSION_ARTIFACT_DIR}/{mode}.json of {run.name}")
            except (MetalloError, KeyError, TypeError, ValueError) as exc:
                self.problems.append(str(exc))
        return confusions

    # ------------------------------------------------------------------------------ histories, files

    def read_curves_and_configs(self) -> None:
        sources = {model.run_id for model in self.models.values()}
        for run in self.runs.values():
            for metric in CURVE_METRICS.get(run.stage, ()):
                if metric not in run.metrics:
                    continue
                history = self.client.get_metric_history(run.run_id, metric)
                points = sorted((int(entry.step), float(entry.value)) for entry in history)
                self.curves.setdefault(run.run_id, {})[metric] = points
            if run.run_id in sources:
                text = self._artifact_text(run.run_id, CONFIG_ARTIFACT)
                if text is not None:
                    self.configs[run.run_id] = text

    def _artifact_text(self, run_id: str, path: str) -> str | None:
        try:
            local = self.client.download_artifacts(run_id, path, str(self.scratch))
            return Path(local).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - an absent artifact is normal for older or foreign runs
            return None

    def _artifact_json(self, run_id: str, path: str) -> Any:
        text = self._artifact_text(run_id, path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            self.problems.append(f"artifact {path} of run {run_id} is not valid JSON")
            return None


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded artifact; a report downloads dozens of tiny ones."""
    previous = os.environ.get(PROGRESS_BAR_VARIABLE)
    os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_BAR_VARIABLE, None)
        else:
            os.environ[PROGRESS_BAR_VARIABLE] = previous


def _shown_uri() -> str:
    """The tracking URI without any user:password@ part, since the report may travel."""
    return tracking.shown_uri()


def _task_shape(run: RunRecord) -> tuple[int | None, int | None]:
    """(way, shot) from the logged config, else from the `metallo.task` tag ("5-way 1-shot")."""
    way, shot = run.params.get("episodes.way", ""), run.params.get("episodes.shot", "")
    if way.isdigit() and shot.isdigit():
        return int(way), int(shot)
    parts = run.tags.get("metallo.task", "").replace("-", " ").split()
    if len(parts) == 4 and parts[0].isdigit() and parts[2].isdigit():
        return int(parts[0]), int(parts[2])
    return None, None


def _run_id_of(model_uri: str) -> str:
    """The run of a `runs:/<id>/path` URI, else ""."""
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/", 1)[0]
    return ""


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
