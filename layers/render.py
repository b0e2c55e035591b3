"""Tables as text cells, Markdown and HTML: the one formatting used by reports and analysis tables.

Cells: ints with thousands separators, floats with 4 decimals, tuples (shapes, ranks) as
``64x32x3x3``, ``None`` as ``-``. In HTML, numbers are right-aligned and every cell is escaped.
"""
from __future__ import annotations

import html
import numbers


def format_value(value) -> str:
    """One table cell as text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def markdown_table(columns, rows, title: str = "", notes=()) -> str:
    """A Markdown table of text ``rows`` (lists of cells), with an optional bold title and notes below."""
    lines = [f"**{title}**\n"] if title else []
    lines += ["| " + " | ".join(str(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines + [f"\n{note}" for note in notes])


def html_table(columns, rows, title: str = "", notes=(), right=None, bold_last=False) -> str:
    """An HTML table of text ``rows``; ``right[i]`` right-aligns column ``i`` (numbers)."""
    right = list(right) if right is not None else [False] * len(columns)
    style = ' style="text-align: right"'
    head = "".join(f"<th{style if r else ''}>{html.escape(str(c))}</th>" for c, r in zip(columns, right))
    body = []
    for i, row in enumerate(rows):
        tag = "th" if bold_last and i == len(rows) - 1 else "td"
        body.append("<tr>" + "".join(f"<{tag}{style if r else ''}>{html.escape(str(cell))}</{tag}>"
                                     for cell, r in zip(row, right)) + "</tr>")
    caption = f"<caption style=\"text-align: left\"><b>{html.escape(title)}</b></caption>" if title else ""
    table = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return table + "".join(f"<p>{html.escape(note)}</p>" for note in notes)


__all__ = ["format_value", "is_number", "markdown_table", "html_table"]
