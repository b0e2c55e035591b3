"""A small table type for the analysis functions: a list of row dicts that prints well.

Cells are formatted like :class:`layers.Report` (ints with thousands separators, floats
with 4 decimals, shapes as ``64x32x3x3``, ``None`` as ``-``); numbers are right-aligned.
In a notebook the table renders as HTML (and as Markdown where HTML is not shown).
"""
from __future__ import annotations

from decomp_toolkit.layers.render import format_value, html_table, is_number, markdown_table


class Table(list):
    """``list`` of row dicts with ``columns`` (their order), a ``title`` and ``notes``.

    ``str(table)`` is an aligned text table, ``to_markdown()`` a Markdown table,
    ``to_dataframe()`` a pandas DataFrame (pandas is optional), ``column(name)`` one
    column as a list.
    """

    def __init__(self, rows=(), columns=None, title: str = "", notes=()):
        super().__init__(dict(r) for r in rows)
        if columns is None:
            columns = []
            for row in self:
                columns += [c for c in row if c not in columns]
        self.columns = list(columns)
        self.title = title
        self.notes = list(notes)

    def column(self, name) -> list:
        return [row.get(name) for row in self]

    def _cells(self) -> list:
        return [[format_value(row.get(c)) for c in self.columns] for row in self]

    def __str__(self) -> str:
        header = [str(c) for c in self.columns]
        cells = self._cells()
        widths = [max([len(header[i])] + [len(r[i]) for r in cells]) for i in range(len(header))]

        def line(row, raw=None):
            out = []
            for i, (cell, width) in enumerate(zip(row, widths)):
                right = raw is not None and is_number(raw.get(self.columns[i]))
                out.append(cell.rjust(width) if right else cell.ljust(width))
            return "  ".join(out).rstrip()

        text = ([self.title] if self.title else []) + [line(header), "  ".join("-" * w for w in widths)]
        text += [line(cells[i], raw) for i, raw in enumerate(self)]
        return "\n".join(text + self.notes)

    __repr__ = __str__

    def to_markdown(self) -> str:
        return markdown_table(self.columns, self._cells(), title=self.title, notes=self.notes)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        right = [any(is_number(row.get(c)) for row in self) for c in self.columns]
        return html_table(self.columns, self._cells(), title=self.title, notes=self.notes, right=right)

    def to_dataframe(self):
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Table.to_dataframe() needs pandas: pip install pandas "
                              "(or pip install 'decomp-toolkit[notebook]')") from err
        return pd.DataFrame([{c: row.get(c) for c in self.columns} for row in self], columns=self.columns)


__all__ = ["Table"]
