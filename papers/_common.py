"""Shared helpers of the paper reproductions: checks against the paper, tables, threads.

A reproduction collects :class:`Check` objects (the paper's number, ours, and how they
are compared) and prints them beside each other. Exact arithmetic claims are *gated*:
``finish`` returns a non-zero exit status when one differs, so ``make papers`` fails.

Comparison rules (``Check.rule``):

* ``"exact"``       integers: ours == paper;
* ``"decimals=d"``  the paper printed ``d`` decimals: ``round(ours, d) == paper``;
* ``"rel=x"``       the paper gave an approximate value ("~4.0", "2x"):
                    ``|ours / paper - 1| <= x``;
* ``"info"``        not gated (a measurement of ours without an arithmetic claim, or a
                    claim we cannot reproduce; the README says why).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from decomp_toolkit.analysis.tables import Table


def setup_threads(default: int = 1) -> None:
    """Shared 2-core machines: one torch thread unless ``DECOMP_THREADS`` says otherwise."""
    torch.set_num_threads(int(os.environ.get("DECOMP_THREADS", default)))


@dataclass
class Check:
    """One number of the paper against ours."""

    name: str
    paper: float | int | str | None
    ours: float | int | None
    rule: str = "exact"
    note: str = ""

    @property
    def gated(self) -> bool:
        return self.rule != "info"

    @property
    def ok(self) -> bool:
        """True when ours reproduces the paper under ``rule`` (always True for ``info``)."""
        if not self.gated:
            return True
        if self.ours is None or self.paper is None:
            return False
        if self.rule == "exact":
            return self.ours == self.paper
        kind, _, value = self.rule.partition("=")
        if kind == "decimals":
            return round(float(self.ours), int(value)) == float(self.paper)
        if kind == "rel":
            return abs(float(self.ours) / float(self.paper) - 1) <= float(value)
        raise ValueError(f"unknown comparison rule {self.rule!r}")

    @property
    def status(self) -> str:
        if not self.gated:
            return "info"
        return "reproduced" if self.ok else "DIFFERS"

    def row(self) -> dict:
        paper = fmt(self.paper)
        if self.rule.startswith("decimals=") and isinstance(self.paper, float):
            paper = f"{self.paper:.{int(self.rule.split('=')[1])}f}"   # as the paper printed it
        return {"quantity": self.name, "paper": paper, "ours": fmt(self.ours, self.rule),
                "rule": self.rule, "status": self.status, "note": self.note}


def fmt(value, rule: str = "") -> str:
    """Numbers for the tables: ints with separators, floats with 4 significant decimals."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1e4):
        return f"{int(value):,}"
    if rule.startswith("decimals="):
        digits = int(rule.split("=")[1]) + 2
        return f"{value:,.{digits}f}"
    if abs(value) >= 100:
        return f"{value:,.2f}"
    return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"


def table(rows, columns=None, title: str = "", notes=()) -> Table:
    """An aligned text / Markdown table (:class:`analysis.tables.Table`) of row dicts."""
    return Table(rows, columns=columns, title=title, notes=notes)


def checks_table(checks, title: str = "paper vs ours") -> Table:
    return table([c.row() for c in checks], ["quantity", "paper", "ours", "rule", "status", "note"], title)


def failures(checks) -> list:
    return [c for c in checks if not c.ok]


def finish(name: str, checks, tables=()) -> int:
    """Print the tables and the checks; return the exit status (1 if a gated check differs)."""
    for t in tables:
        print(t)
        print()
    print(checks_table(checks, f"{name}: paper vs ours"))
    bad = failures(checks)
    gated = [c for c in checks if c.gated]
    print(f"\n{name}: {len(gated) - len(bad)}/{len(gated)} arithmetic claims reproduced"
          + (f"; DIFFERS: {', '.join(c.name for c in bad)}" if bad else ""))
    return 1 if bad else 0


def run_paper(name: str, checks, arithmetic=(), measured=(), argv=None) -> int:
    """A paper's ``main``: the arithmetic tables always, the real-weight ``measured`` ones unless
    ``--no-accuracy`` is given; then :func:`finish`. Each entry is a callable returning a
    table or a list of tables; ``checks`` is a callable returning the Check list."""
    setup_threads()
    wanted = list(arithmetic)
    if "--no-accuracy" not in (sys.argv[1:] if argv is None else argv):
        wanted += list(measured)
    tables = []
    for make in wanted:
        made = make()
        tables += made if isinstance(made, list) else [made]
    return finish(name, checks(), tables)


__all__ = ["Check", "setup_threads", "fmt", "table", "checks_table", "failures", "finish", "run_paper"]
