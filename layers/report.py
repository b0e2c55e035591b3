"""The per-layer report returned by ``compress``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

COLUMNS = ("name", "type", "shape", "method", "rank", "params_before", "params_after", "flops_before",
           "flops_after", "rel_error", "rel_error_bound", "status")


@dataclass
class LayerRecord:
    """One layer of a model: what was done to it and what it cost.

    ``flops_*`` are multiply–accumulates for the recorded input shape (None when no
    example input was given); ``rel_error`` is ``||W - W'||_F / ||W||_F`` measured on the
    reconstructed weight, ``rel_error_bound`` the certified bound (None if the method
    has none). ``status`` is ``"replaced"`` or ``"skipped: <reason>"``.
    """

    name: str
    type: str
    shape: tuple
    method: str = ""
    rank: object = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    rel_error: float | None = None
    rel_error_bound: float | None = None
    status: str = "replaced"
    speedup: float | None = None

    @property
    def replaced(self) -> bool:
        return self.status == "replaced"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


@dataclass
class Report:
    """Per-layer records plus whole-model totals (totals are sums over the layers)."""

    layers: list = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    notes: list = field(default_factory=list)
    budget: object = None  # layers.budget.Allocation when compress was given budget=

    @property
    def replaced(self) -> list:
        return [r for r in self.layers if r.replaced]

    def totals(self) -> dict:
        """Sums over all recorded layers (skipped layers count at their dense cost)."""
        out = {"params_before": sum(r.params_before for r in self.layers),
               "params_after": sum(r.params_after for r in self.layers)}
        if all(r.flops_before is not None for r in self.layers) and self.layers:
            out["flops_before"] = sum(r.flops_before for r in self.layers)
            out["flops_after"] = sum(r.flops_after for r in self.layers)
        out["model_params_before"] = self.model_params_before
        out["model_params_after"] = self.model_params_after
        return out

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "totals": self.totals(), "notes": list(self.notes)}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def to_dataframe(self):
        import pandas as pd  # optional dependency
        return pd.DataFrame([asdict(r) for r in self.layers])

    @property
    def columns(self) -> tuple:
        """COLUMNS, plus ``speedup`` before ``status`` when any layer was timed."""
        if any(r.speedup is not None for r in self.layers):
            return COLUMNS[:-1] + ("speedup", "status")
        return COLUMNS

    def rows(self) -> list:
        return [[_fmt(getattr(r, c)) for c in self.columns] for r in self.layers]

    def _total_row(self) -> list:
        t = self.totals()
        row = {c: "" for c in self.columns}
        row.update(name="total", params_before=_fmt(t["params_before"]), params_after=_fmt(t["params_after"]),
                   flops_before=_fmt(t.get("flops_before")), flops_after=_fmt(t.get("flops_after")))
        return [row[c] for c in self.columns]

    def to_markdown(self) -> str:
        rows = self.rows() + [self._total_row()]
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines + [f"\n{note}" for note in self.notes])

    def __str__(self) -> str:
        rows = [list(self.columns)] + self.rows() + [self._total_row()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.columns))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        text.insert(1, "  ".join("-" * w for w in widths))
        t = self.totals()
        before, after = t["model_params_before"], t["model_params_after"]
        if before:
            text.append(f"model parameters: {before:,} -> {after:,} ({after / before:.1%})")
        return "\n".join(text + self.notes)
