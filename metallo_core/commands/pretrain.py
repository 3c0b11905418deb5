"""`metallo pretrain --config FILE [key=value ...]`: DINO pretraining (same as `python -m jobs.pretrain_dino`)."""

from __future__ import annotations

import argparse

from metallo_core.entrypoint import add_stage_arguments, run_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="DINO self-supervised pretraining of a backbone on Ray Train, "
                                   "from scratch or from pretrained weights (init_weights)")
    add_stage_arguments(parser)
    parser.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from metallo_core.ssl.config import DinoConfig
    from metallo_core.train.dino import describe_result, run_dino_pretraining

    return run_stage(args, DinoConfig, run_dino_pretraining, describe_result)
