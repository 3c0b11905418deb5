"""The report as markdown: the same tables as the HTML page (a table's group header row is folded into
its column names), plots as SVG files next to it, configs in folded fenced blocks."""

from __future__ import annotations

import re
from html import escape

from metallo_core.report.document import Block, Cell, Details, Document, Facts, Figure, Link, Paragraph, Section, Table

MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]<>|#])")


def render_markdown(document: Document, figure_dir: str = "figures") -> str:
    lines = [f"# {text(document.title)}", ""]
    lines += [f"- {text(key)}: {text(value)}" for key, value in document.facts]
    lines.append("")
    for section in document.sections:
        lines += _section(section, 2, figure_dir)
    return "\n".join(lines).rstrip() + "\n"


def text(value: str) -> str:
    """Plain text safe inside markdown (and on one line, as table cells need)."""
    return MARKDOWN_SPECIALS.sub(r"\\\1", " ".join(str(value).split()))


def _section(section: Section, level: int, figure_dir: str) -> list[str]:
    # The explicit anchor keeps the HTML page's in-report links valid in the markdown too.
    lines = [f'{"#" * level} <a id="{escape(section.anchor)}"></a>{text(section.title)}', ""]
    for block in section.blocks:
        lines += _block(block, level, figure_dir)
    return lines


def _block(block: Block, level: int, figure_dir: str) -> list[str]:
    if isinstance(block, Section):
        return _section(block, min(level + 1, 6), figure_dir)
    if isinstance(block, Table):
        return _table(block) + [""]
    if isinstance(block, Figure):
        return [f"![{text(block.caption)}]({figure_dir}/{block.name}.svg)", "", f"*{text(block.caption)}*", ""]
    if isinstance(block, Paragraph):
        return [text(block.text), ""]
    if isinstance(block, Facts):
        return [f"- {text(key)}: {_cell(value)}" for key, value in block.items] + [""]
    if isinstance(block, Details):
        fence = "`" * max(3, _longest_backtick_run(block.text) + 1)
        return [f"<details><summary>{escape(block.summary)}</summary>", "", f"{fence}yaml", block.text.rstrip("\n"),
                fence, "", "</details>", ""]
    raise TypeError(f"no markdown for report block {type(block).__name__}")


def _table(table: Table) -> list[str]:
    headers = list(table.headers)
    if table.groups:
        position = 0
        for label, span in table.groups:
            for index in range(position, position + span):
                headers[index] = f"{label} {headers[index]}".strip()
            position += span
    alignments = ["---:" if table.numeric_from and index >= table.numeric_from else "---"
                  for index in range(len(headers))]
    lines = ["| " + " | ".join(text(header) for header in headers) + " |", "|" + "|".join(alignments) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in table.rows]
    return lines


def _cell(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f"[{text(cell.text)}](#{cell.anchor})"
    return text(cell)


def _longest_backtick_run(value: str) -> int:
    return max((len(run) for run in re.findall(r"`+", value)), default=0)
