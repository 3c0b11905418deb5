"""`metallo config show STAGE [--json-schema]`: a stage's settings, defaults and documentation."""

from __future__ import annotations

import argparse
import json

from metallo_core.stage_table import STAGES, Stage


def stages_by_word() -> dict[str, Stage]:
    """The stages of the one stage table, named as one word ("tune metatrain" -> "tune-metatrain")."""
    return {stage.name.replace(" ", "-"): stage for stage in STAGES}


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="show a stage's settings: defaults, types and documentation")
    commands = config.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = commands.add_parser(
        "show", help="print a stage's default config as commented YAML (a starting point for --config FILE)",
        description="Print a stage's default settings as YAML, each with its type and documentation; "
                    "--json-schema prints the JSON schema instead. A stage's --print-config prints the "
                    "config it would run with (after --config and overrides) without running it.")
    show.add_argument("stage", choices=sorted(stages_by_word()), help="the stage whose settings to show")
    show.add_argument("--json-schema", action="store_true", help="print the JSON schema of the stage's config")
    show.set_defaults(func=_show)


def config_show(stage_name: str, config_type: type, json_schema: bool = False) -> str:
    """The text `metallo config show` prints for a stage whose settings are the dataclass `config_type`:
    its defaults as commented YAML, or its JSON schema (indented JSON) when `json_schema`."""
    from metallo_core.config import renamed_settings
    from metallo_core.config_docs import defaults_yaml, described_json_schema

    if json_schema:
        return json.dumps(described_json_schema(config_type), indent=2)
    header = (f"# metallo {stage_name}: the default settings ({config_type.__name__});\n"
              "# set any of them in --config FILE or as key.sub=value")
    renamed = [f"#   {old} -> {new}" for old, new in renamed_settings(config_type)]
    if renamed:
        header += "\n".join(["", "# older spellings, read for this release only (each with a deprecation line):",
                              *renamed])
    return f"{header}\n{defaults_yaml(config_type).rstrip()}"


def _show(args: argparse.Namespace) -> int:
    config_type = stages_by_word()[args.stage].config_type()  # imported only now: the CLI starts without torch
    print(config_show(args.stage, config_type, args.json_schema))
    return 0
