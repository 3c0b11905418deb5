"""`metallo tune metatrain|finetune`: the Ray Tune searches (`python -m tuning.search_<kind>`)."""

from __future__ import annotations

import argparse

from metallo_core.entrypoint import add_stage_arguments, run_stage

RESUME_HELP = (
    "Running a search again under the same search.name resumes it: finished trials are kept, unfinished ones go "
    "on. Its settings are stored with it (<storage>/<name>/metallo_search_spec.json) and compared first: a "
    "larger search.num_samples extends it (searcher optuna); resources and concurrency may change; any other "
    "change (a range or key in space:, the model, data, task or trial template, fewer samples) is refused "
    "before anything runs, naming the setting: give the new search a new search.name.")


def register(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser("tune", help="Ray Tune searches over meta-training or fine-tuning hyperparameters",
                                 description="Ray Tune searches. " + RESUME_HELP)
    kinds = tune.add_subparsers(dest="tune_command", required=True, metavar="{metatrain,finetune}")
    metatrain = kinds.add_parser(
        "metatrain", help="ASHA over ProtoNet meta-training runs (each trial a Ray Train run); resumable by name",
        description="ASHA over ProtoNet meta-training runs (each trial a Ray Train run). " + RESUME_HELP)
    add_stage_arguments(metatrain)
    metatrain.set_defaults(func=_metatrain)
    finetune = kinds.add_parser(
        "finetune", help="Optuna over meta-test fine-tuning settings on fixed meta-val tasks; resumable by name",
        description="Optuna over meta-test fine-tuning settings on fixed meta-val tasks. The best settings are "
                    "recorded whole on the model version, where `metallo classify --finetune` finds them. "
                    + RESUME_HELP)
    add_stage_arguments(finetune)
    finetune.set_defaults(func=_finetune)


def _metatrain(args: argparse.Namespace) -> int:
    from metallo_core.tuning.config import MetaTrainSearchConfig
    from metallo_core.tuning.metatrain_search import describe_result, run_metatrain_search

    return run_stage(args, MetaTrainSearchConfig, run_metatrain_search, describe_result)


def _finetune(args: argparse.Namespace) -> int:
    from metallo_core.tuning.config import FinetuneSearchConfig
    from metallo_core.tuning.finetune_search import describe_result, run_finetune_search

    return run_stage(args, FinetuneSearchConfig, run_finetune_search, describe_result)
