"""The report as a tree of plain blocks (sections, tables, figures, facts, notes) that both renderers,
HTML and markdown, walk. Text here is raw: each renderer escapes it for its own format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Link:
    text: str
    anchor: str  # an id inside the report


Cell = str | Link


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    # An optional header row above `headers`: (label, number of columns it spans); markdown folds it in.
    groups: list[tuple[str, int]] = field(default_factory=list)
    numeric_from: int = 0  # columns from this index on hold numbers (right-aligned in HTML); 0: none
    group_starts: set[int] = field(default_factory=set)  # rows that begin a new group of rows (a rule above)


@dataclass
class Figure:
    name: str  # file stem when written next to the markdown, e.g. accuracy-vs-shots-1
    svg: str
    caption: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Facts:
    """Key-value pairs, e.g. a model's lineage."""

    items: list[tuple[str, Cell]]


@dataclass
class Details:
    """Long text (a config file) folded away in HTML, fenced in markdown."""

    summary: str
    text: str


Block = Union[Table, Figure, Paragraph, Facts, Details, "Section"]


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    facts: list[tuple[str, str]]  # shown under the title: experiment, tracking store, when, how many runs
    sections: list[Section]
