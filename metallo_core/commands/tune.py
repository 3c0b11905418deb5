"""`metallo tune metatrain|finetune`: the Ray Tune searches (stages in metallo_core.stage_table; as Ray jobs,
`python -m tuning.search_<kind>`)."""

from __future__ import annotations

import argparse

from metallo_core.stage_table import TUNE_RESUME_HELP, add_stage_parsers


def register(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser("tune", help="Ray Tune searches over meta-training or fine-tuning hyperparameters",
                                 description="Ray Tune searches. " + TUNE_RESUME_HELP)
    kinds = tune.add_subparsers(dest="tune_command", required=True, metavar="{metatrain,finetune}")
    add_stage_parsers(kinds, group="tune")
