"""The report as one self-contained HTML page: inline CSS and SVG, no scripts, no external resources, so it
can be mailed, archived as an MLflow artifact or opened offline. Every text from MLflow is escaped."""

from __future__ import annotations

from html import escape

from metallo_core.report.document import Block, Cell, Details, Document, Facts, Figure, Link, Paragraph, Section, Table

CSS = """
:root { color-scheme: light; }
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d1d1f; background: #fafafa;
       margin: 0; line-height: 1.45; font-size: 14px; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e3e3; }
h3 { font-size: 16px; margin: 22px 0 8px; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 8px 0 16px; }
dl.facts dt { color: #666; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
nav ol { columns: 2; margin: 4px 0 0; padding-left: 20px; }
.scroll { overflow-x: auto; margin: 10px 0 14px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e8e8e8; text-align: left; vertical-align: top; }
th { white-space: nowrap; }
thead th { background: #f3f4f6; border-bottom: 2px solid #cfd3d8; }
thead tr.groups th { text-align: center; border-left: 1px solid #cfd3d8; }
thead tr.groups th:first-child { border-left: none; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.group-start td { border-top: 2px solid #b9bec5; }
tbody tr:hover td { background: #f7f9fc; }
figure { display: inline-table; vertical-align: top; margin: 12px 24px 18px 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { display: table-caption; caption-side: bottom; color: #555; font-size: 12.5px; margin-top: 4px; }
details { margin: 6px 0 16px; }
details pre { background: #f6f8fa; padding: 10px; font-size: 12px; overflow-x: auto; border: 1px solid #e5e5e5; }
a { color: #0b5cad; }
p { max-width: 980px; }
"""


def render_html(document: Document) -> str:
    body = [f"<h1>{escape(document.title)}</h1>", _facts(document.facts)]
    body.append("<nav><ol>" + "".join(f'<li><a href="#{escape(section.anchor)}">{escape(section.title)}</a></li>'
                                      for section in document.sections) + "</ol></nav>")
    body += [_section(section, level=2) for section in document.sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(document.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def _section(section: Section, level: int) -> str:
    parts = [f'<section id="{escape(section.anchor)}">', f"<h{level}>{escape(section.title)}</h{level}>"]
    parts += [_block(block, level) for block in section.blocks]
    parts.append("</section>")
    return "\n".join(parts)


def _block(block: Block, level: int) -> str:
    if isinstance(block, Section):
        return _section(block, min(level + 1, 6))
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return (f'<figure id="figure-{escape(block.name)}">{block.svg}'
                f"<figcaption>{escape(block.caption)}</figcaption></figure>")
    if isinstance(block, Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Facts):
        return '<dl class="facts">' + "".join(f"<dt>{escape(key)}</dt><dd>{_cell(value)}</dd>"
                                              for key, value in block.items) + "</dl>"
    if isinstance(block, Details):
        return f"<details><summary>{escape(block.summary)}</summary><pre>{escape(block.text)}</pre></details>"
    raise TypeError(f"no HTML for report block {type(block).__name__}")


def _table(table: Table) -> str:
    def numeric(index: int) -> str:
        return ' class="num"' if table.numeric_from and index >= table.numeric_from else ""

    head = []
    if table.groups:
        head.append('<tr class="groups">' + "".join(f'<th colspan="{span}">{escape(label)}</th>'
                                                    for label, span in table.groups) + "</tr>")
    head.append("<tr>" + "".join(f"<th{numeric(i)}>{escape(header)}</th>" for i, header in enumerate(table.headers))
                + "</tr>")
    rows = []
    for index, row in enumerate(table.rows):
        start = ' class="group-start"' if index in table.group_starts and index > 0 else ""
        rows.append(f"<tr{start}>" + "".join(f"<td{numeric(i)}>{_cell(cell)}</td>" for i, cell in enumerate(row))
                    + "</tr>")
    return ('<div class="scroll"><table><thead>' + "".join(head) + "</thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


def _cell(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f'<a href="#{escape(cell.anchor)}">{escape(cell.text)}</a>'
    return escape(cell)


def _facts(facts: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{escape(key)}</dt><dd>{escape(value)}</dd>"
                                          for key, value in facts) + "</dl>"
