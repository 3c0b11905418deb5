"""Where a benchmark's figures go: its JSON report (`--out`) and its markdown tables (`--markdown`), each
written only when asked, with the folders they need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(report: dict[str, Any], markdown: str, out: str | None, markdown_out: str | None) -> None:
    """Write `report` as indented JSON to `out` and `markdown` (plus a final newline) to `markdown_out`;
    a path that is None or empty is not written."""
    for path, text in ((out, json.dumps(report, indent=2)), (markdown_out, markdown + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


def print_and_write(report: dict[str, Any], markdown: str, out: str | None, markdown_out: str | None) -> None:
    """Print the tables and the report's wall time (`wall_s`), then `write_results`."""
    print(markdown)
    print(f"wall time {report['wall_s']:.0f} s")
    write_results(report, markdown, out, markdown_out)
