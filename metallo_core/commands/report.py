"""`metallo report`: a self-contained HTML (and markdown) report of an MLflow experiment.

    metallo report --experiment metallo-quickstart --out reports/quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metallo_core.user_paths import cli_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="HTML and markdown report of an MLflow experiment: accuracy tables, plots, confusion matrices, lineage",
        description="Reads the experiment's runs (and the runs and registered models its evaluations came from, "
                    "in any experiment) and writes report.html (one self-contained file), report.md and "
                    "figures/*.svg into the output folder.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name, e.g. metallo-quickstart")
    parser.add_argument("--out", required=True, type=cli_path,
                        help="folder to write report.html, report.md and figures/ into")
    parser.add_argument("--title", default=None, help="the report's title (default: metallo report: EXPERIMENT)")
    parser.add_argument("--log", action="store_true",
                        help="also log the files as artifacts of a new run in the experiment (stage 'report')")
    parser.add_argument("--json", action="store_true", help="print the written paths as one JSON object")
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from metallo_core import tracking
    from metallo_core.output_guard import refuse_output_over_inputs
    from metallo_core.report.build import FIGURE_DIR, HTML_FILE, MARKDOWN_FILE, write_report

    out = Path(args.out)
    refuse_output_over_inputs({f"--out {name}": out / name for name in (HTML_FILE, MARKDOWN_FILE, FIGURE_DIR)},
                              {"the tracking store": tracking.local_store_path(tracking.tracking_uri())})
    files = write_report(args.experiment, args.out, title=args.title, log_to_mlflow=args.log)
    if args.json:
        print(json.dumps({"html": str(files.html), "markdown": str(files.markdown),
                          "figures": [str(path) for path in files.figures], "run_id": files.run_id}))
        return 0
    print(f"report of experiment {args.experiment!r}:")
    print(f"  html:     {files.html}")
    print(f"  markdown: {files.markdown} (+ {len(files.figures)} figure(s) in {files.markdown.parent / 'figures'})")
    if files.run_id:
        print(f"  logged to MLflow run {files.run_id}")
    return 0
