"""`metallo metatrain`, `metallo evaluate` and `metallo grid`: the few-shot stages (`python -m jobs.<stage>`)."""

from __future__ import annotations

import argparse

from metallo_core.entrypoint import add_stage_arguments, run_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    metatrain = subparsers.add_parser("metatrain", help="ProtoNet meta-training on N-way K-shot episodes (Ray Train)")
    add_stage_arguments(metatrain)
    metatrain.set_defaults(func=_metatrain)
    evaluate = subparsers.add_parser(
        "evaluate", help="meta-test a model over many fixed tasks: ProtoNet and/or fine-tuning, mean and 95%% interval"
    )
    add_stage_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)
    grid = subparsers.add_parser(
        "grid", help="seed 000's experiment grid: backbones x meta-training sets x (PN, PN+FT) x shots, as a table"
    )
    add_stage_arguments(grid)
    grid.set_defaults(func=_grid)


def _metatrain(args: argparse.Namespace) -> int:
    from metallo_core.fewshot.config import MetaTrainConfig
    from metallo_core.train.metatrain import describe_result, run_metatraining

    return run_stage(args, MetaTrainConfig, run_metatraining, describe_result)


def _grid(args: argparse.Namespace) -> int:
    from metallo_core.fewshot.grid import GridConfig
    from metallo_core.train.grid import run_grid

    return run_stage(args, GridConfig, run_grid, lambda result: f"{result['table']}\nfiles: {result['out']}")


def _evaluate(args: argparse.Namespace) -> int:
    from metallo_core.fewshot.config import EvaluateConfig
    from metallo_core.train.evaluate import describe_result, run_evaluation

    return run_stage(args, EvaluateConfig, run_evaluation, describe_result)
