"""The one table of metallo's stages: what each is called, its config type, the function that runs it,
how its result reads, and its help text.

`metallo <stage>`, `python -m metallo_core <stage>` and the Ray job entrypoints (`python -m jobs.<module>`,
`python -m tuning.search_<kind>`) all run a stage from here. Targets are "module:attribute" strings,
imported only when a stage runs, so `metallo --help` stays fast (no torch, no Ray).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metallo_core.entrypoint import add_stage_arguments, run_stage

TUNE_RESUME_HELP = (
    "Running a search again under the same search.name resumes it: finished trials are kept, unfinished ones go "
    "on. Its settings are stored with it (<storage>/<name>/metallo_search_spec.json) and compared first: a "
    "larger search.num_samples extends it (searcher optuna); resources and concurrency may change; any other "
    "change (a range or key in space:, the model, data, task or trial template, fewer samples) is refused "
    "before anything runs, naming the setting: give the new search a new search.name.")


@dataclass(frozen=True)
class Shortcut:
    """A flag that stands for one config override, e.g. `--data URI` for `data.uri=URI`; with `value`, a
    switch that takes no argument, e.g. `--force` for `gate.force=true`."""

    flag: str
    key: str
    help: str
    value: str | None = None


@dataclass(frozen=True)
class Stage:
    """One stage. `name` is what follows `metallo` ("pretrain", "tune metatrain"); `job` is the module
    `ray job submit -- python -m ...` runs, and `job_args` the words after it that pick this stage when
    one module serves several ("experiments")."""

    name: str
    job: str
    config: str  # "module:ConfigDataclass"
    runner: str  # "module:function": config -> result
    describe: str | None  # "module:function": result -> text for people; None: the result as indented JSON
    help: str
    description: str | None = None
    job_args: tuple[str, ...] = ()
    shortcuts: tuple[Shortcut, ...] = ()
    to_json: str | None = None  # "module:function": result -> what `--json` prints (default: the whole result)

    @property
    def group(self) -> str | None:
        """The `metallo` subcommand group this stage sits in ("tune"), or None at the top level."""
        words = self.name.split()
        return words[0] if len(words) > 1 else None

    @property
    def command(self) -> str:
        return self.name.split()[-1]

    def config_type(self) -> type:
        return _resolve(self.config)

    def runner_function(self) -> Callable[[Any], Any]:
        return _resolve(self.runner)

    def describe_function(self) -> Callable[[Any], str] | None:
        return _resolve(self.describe) if self.describe else None

    def _resolve_to_json(self) -> Callable[[Any], Any]:
        if self.to_json is None:
            raise ValueError(f"stage {self.name!r} has no to_json function")
        return _resolve(self.to_json)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for shortcut in self.shortcuts:
            if shortcut.value is None:
                parser.add_argument(shortcut.flag, default=None, help=shortcut.help)
            else:
                parser.add_argument(shortcut.flag, action="store_true", help=shortcut.help)
        add_stage_arguments(parser)
        parser.set_defaults(func=self.run_from_arguments, stage=self.name)

    def run_from_arguments(self, args: argparse.Namespace) -> int:
        """Run this stage on parsed `add_arguments` arguments; prints the result on stdout."""
        for shortcut in self.shortcuts:
            value = getattr(args, _dest(shortcut.flag))
            if value:
                args.overrides = [*args.overrides, f"{shortcut.key}={shortcut.value or value}"]
        runner = self.runner_function()
        if self.to_json and args.json:
            to_json = self._resolve_to_json()

            def runner(config, run=runner):
                return to_json(run(config))

        return run_stage(args, self.config_type(), runner, self.describe_function())


_DATA_URI = Shortcut("--data", "data.uri", "dataset URI (sets data.uri; a directory or s3://bucket/prefix)")
_FORCE = Shortcut("--force", "gate.force", "move the registry alias to the new model even if the gate (gate.uri) "
                  "finds it no better than its baseline (sets gate.force=true)", value="true")

STAGES: tuple[Stage, ...] = (
    Stage("pretrain", "jobs.pretrain_dino", "metallo_core.ssl.config:DinoConfig",
          "metallo_core.train.dino:run_dino_pretraining", "metallo_core.train.dino:describe_result",
          shortcuts=(_FORCE,),
          help="DINO self-supervised pretraining of a backbone on Ray Train, from scratch or from pretrained "
               "weights (backbone.source)"),
    Stage("metatrain", "jobs.metatrain", "metallo_core.fewshot.config:MetaTrainConfig",
          "metallo_core.train.metatrain:run_metatraining", "metallo_core.train.metatrain:describe_result",
          shortcuts=(_FORCE,), help="ProtoNet meta-training on N-way K-shot episodes (Ray Train)"),
    Stage("evaluate", "jobs.evaluate", "metallo_core.fewshot.config:EvaluateConfig",
          "metallo_core.train.evaluate:run_evaluation", "metallo_core.train.evaluate:describe_result",
          help="meta-test a model over many fixed tasks: ProtoNet and/or fine-tuning, mean and 95%% interval"),
    Stage("grid", "jobs.grid", "metallo_core.fewshot.grid:GridConfig", "metallo_core.train.grid:run_grid",
          "metallo_core.stage_table:describe_grid",
          help="seed 000's experiment grid: backbones x meta-training sets x (PN, PN+FT) x shots, as a table"),
    Stage("multilabel train", "jobs.multilabel", "metallo_core.multilabel.config:MultilabelConfig",
          "metallo_core.train.multilabel:run_multilabel_training",
          "metallo_core.train.multilabel:describe_result", shortcuts=(_DATA_URI,),
          help="train and register an n-furcated model on a dataset's label columns"),
    Stage("multilabel experiments", "jobs.multilabel", "metallo_core.multilabel.config:ExperimentsConfig",
          "metallo_core.tuning.multilabel_grid:run_experiments",
          "metallo_core.tuning.multilabel_grid:describe_experiments", job_args=("experiments",),
          shortcuts=(_DATA_URI,), to_json="metallo_core.tuning.multilabel_grid:summary_for_json",
          help="seed 002's grid (single-property, bifurcated fc 100/1000, test-fraction sweep, CNN baseline) as "
               "parallel Ray Tune trials; prints the tables"),
    Stage("tune metatrain", "tuning.search_metatrain", "metallo_core.tuning.config:MetaTrainSearchConfig",
          "metallo_core.tuning.metatrain_search:run_metatrain_search",
          "metallo_core.tuning.metatrain_search:describe_result",
          help="ASHA over ProtoNet meta-training runs (each trial a Ray Train run); resumable by name",
          description="ASHA over ProtoNet meta-training runs (each trial a Ray Train run). " + TUNE_RESUME_HELP),
    Stage("tune finetune", "tuning.search_finetune", "metallo_core.tuning.config:FinetuneSearchConfig",
          "metallo_core.tuning.finetune_search:run_finetune_search",
          "metallo_core.tuning.finetune_search:describe_result",
          help="Optuna over meta-test fine-tuning settings on fixed meta-val tasks; resumable by name",
          description="Optuna over meta-test fine-tuning settings on fixed meta-val tasks. The best settings are "
                      "recorded whole on the model version, where `metallo classify --finetune` finds them. "
                      + TUNE_RESUME_HELP),
)


def stage_named(name: str) -> Stage:
    """The stage a user names: its `metallo` name ("tune metatrain", or "tune.metatrain") or its job module
    ("jobs.pretrain_dino", "pretrain_dino"). Raises KeyError listing the known names."""
    wanted = " ".join(name.replace(".", " ").split())
    for stage in STAGES:
        job = " ".join((stage.job, *stage.job_args))
        if wanted in (stage.name, job.replace(".", " "), job.split(".", 1)[1].replace(".", " ")):
            return stage
    raise KeyError(f"no stage {name!r}; the stages are: {', '.join(stage.name for stage in STAGES)}")


def add_stage_parsers(subparsers: argparse._SubParsersAction, group: str | None = None) -> None:
    """Add a subcommand for every stage of `group` (None: the top-level stages) to `subparsers`."""
    for stage in STAGES:
        if stage.group == group:
            parser = subparsers.add_parser(stage.command, help=stage.help, description=stage.description)
            stage.add_arguments(parser)


def job_stage(module: str, argv: list[str]) -> tuple[Stage, list[str]]:
    """The stage `python -m <module> <argv>` runs, and the arguments left for it; longest `job_args` first."""
    candidates = sorted((stage for stage in STAGES if stage.job == module), key=lambda stage: -len(stage.job_args))
    for stage in candidates:
        if tuple(argv[:len(stage.job_args)]) == stage.job_args:
            return stage, argv[len(stage.job_args):]
    raise KeyError(f"no stage runs as {module}")


def describe_grid(result: dict) -> str:
    return f"{result['table']}\nfiles: {result['out']}"


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
