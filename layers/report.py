"""The per-layer report returned by ``compress``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .render import format_value, html_table

COLUMNS = ("name", "type", "shape", "method", "rank", "params_before", "params_after", "flops_before",
           "flops_after", "rel_error", "rel_error_bound", "status")


@dataclass
class LayerRecord:
    """One layer of a model: what was done to it and what it cost.

    ``flops_*`` are multiply–accumulates for the recorded input shape (None when no
    example input was given); ``rel_error`` is ``||W - W'||_F / ||W||_F`` measured on the
    reconstructed weight, ``rel_error_bound`` the certified relative bound of the fit's
    error kind (weight, or output for data-aware fits; None if the method certifies none),
    ``rel_output_error`` the relative OUTPUT error measured on the calibration data
    (data-aware fits only). ``status`` is ``"replaced"`` or ``"skipped: <reason>"``. ``type`` reads
    ``"Linear -> LowRankLinear"`` for a replaced layer. ``names``: every name the module is
    reached by (a shared module is one record). ``bits_*``: stored bits (parameters at their
    dtype; PQ counts its codes and codebooks). ``error_on``: ``"weights"``, or
    ``"calibration outputs"`` when ``rel_error_bound`` is the relative output error measured
    on the calibration data; ``held_out_error``: the relative output error on held-out data (for a fit
    centered at the calibration mean, of the inputs minus that mean: the bias absorbs the rest).
    Calibrated layers: ``samples`` (Gram rows), ``effective_samples`` (what the correlated rows are
    worth as independent ones, :mod:`layers.sample_size`), ``input_dim`` (the Gram's dimension),
    ``shrinkage`` (the weight of :func:`layers.calibrate.shrink_gram` applied; None: none) and, when
    that weight was chosen by held-out error, ``shrinkage_errors`` ``{candidate: held-out error}``.
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
    rel_output_error: float | None = None
    status: str = "replaced"
    speedup: float | None = None
    names: tuple = ()
    bits_before: int = 0
    bits_after: int = 0
    error_on: str = ""
    held_out_error: float | None = None
    samples: int | None = None
    effective_samples: int | None = None
    input_dim: int | None = None
    shrinkage: float | None = None
    shrinkage_errors: dict | None = None

    @property
    def replaced(self) -> bool:
        return self.status == "replaced"

    @property
    def theoretical_speedup(self) -> float | None:
        """``flops_before / flops_after``: the speedup the MACs promise (beside the measured ``speedup``)."""
        if self.speedup is None or not self.flops_before or not self.flops_after:
            return None
        return self.flops_before / self.flops_after


_fmt = format_value


def _cell(record, column) -> str:
    if column == "name" and len(record.names) > 1:
        return " = ".join(record.names)
    return _fmt(getattr(record, column))


@dataclass
class Report:
    """Per-layer records plus whole-model totals (totals are sums over the layers)."""

    layers: list = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    notes: list = field(default_factory=list)
    budget: object = None  # layers.budget.Allocation when compress was given budget=
    model_bits_before: int = 0
    model_bits_after: int = 0
    budget_request: dict = field(default_factory=dict)  # kind, fraction, scope, names of the targeted layers
    budget_met: bool | None = None
    # budget=dict(latency=...): dense_seconds and, per layer, dense_seconds and rank_seconds (layers.latency;
    # the predicted time is budget.cost)
    latency: dict = field(default_factory=dict)

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
        out["model_bits_before"], out["model_bits_after"] = self.model_bits_before, self.model_bits_after
        return out

    def targeted_totals(self, what: str = "params") -> tuple:
        """``(before, after)`` params (or FLOPs) summed over the layers the budget targeted (all layers
        without a budget)."""
        names = self.budget_request.get("names")
        chosen = [r for r in self.layers if names is None or r.name in names]
        if what == "params":
            return sum(r.params_before for r in chosen), sum(r.params_after for r in chosen)
        return sum(r.flops_before or 0 for r in chosen), sum(r.flops_after or 0 for r in chosen)

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "totals": self.totals(), "notes": list(self.notes)}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def to_dataframe(self):
        """One row per layer, every :class:`LayerRecord` field a column (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("Report.to_dataframe() needs pandas: pip install pandas "
                              "(or pip install 'decomp-toolkit[notebook]')") from err
        return pd.DataFrame([asdict(r) for r in self.layers])

    def _summary(self) -> list:
        """The totals lines printed under the table."""
        t, lines = self.totals(), []
        before, after = t["model_params_before"], t["model_params_after"]
        if before:
            lines.append(f"model parameters: {before:,} -> {after:,} ({after / before:.1%})")
        return lines + list(self.notes)

    def _repr_html_(self) -> str:
        rows = self.rows() + [self._total_row()]
        numeric = [c.startswith(("params", "flops", "rel_error", "speedup", "held_out", "samples", "effective",
                                 "input_dim", "shrinkage")) or c == "rank"
                   for c in self.columns]
        title = f"compressed {len(self.replaced)} of {len(self.layers)} layers"
        return html_table(self.columns, rows, title=title, notes=self._summary(), right=numeric, bold_last=True)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def plot(self, ax=None, save=None):
        """Horizontal bars, one per layer: the fraction of its parameters kept, labelled with its rank.

        Replaced layers are blue, layers kept dense grey (labelled with the reason); the
        figure grows with the number of layers so that 50 names stay readable. Returns
        the matplotlib Axes; ``save=path`` also writes the figure.
        """
        try:
            import matplotlib
            if ax is None and save is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("Report.plot() needs matplotlib: pip install matplotlib") from err
        if ax is None:
            _, ax = plt.subplots(figsize=(8, 1.2 + 0.24 * max(len(self.layers), 4)), layout="constrained")
        names = [" = ".join(r.names) if len(r.names) > 1 else r.name for r in self.layers]
        kept = [r.params_after / r.params_before if r.params_before else 1.0 for r in self.layers]
        colors = ["tab:blue" if r.replaced else "0.7" for r in self.layers]
        y = list(range(len(self.layers)))
        ax.barh(y, kept, color=colors, height=0.7)
        for i, r in enumerate(self.layers):
            label = f"rank {format_value(r.rank)}" if r.replaced else r.status.replace("skipped: ", "dense: ")[:48]
            ax.text(min(kept[i], 1.0) + 0.01, i, label, va="center", fontsize=7)
        ax.set_yticks(y, names, fontsize=7 if len(y) > 20 else 9)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.45)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.axvline(1.0, color="0.4", lw=0.8, ls="--")
        ax.set_xlabel("parameters kept (after / before)")
        t = self.totals()
        if t["model_params_before"]:
            ax.set_title(f"model parameters: {t['model_params_after'] / t['model_params_before']:.1%} kept; "
                         f"blue: factorized, grey: kept dense", fontsize=9)
        if save is not None:
            ax.figure.savefig(save, dpi=120)
        return ax

    @property
    def columns(self) -> tuple:
        """COLUMNS, plus the calibration columns (``samples``, ``effective_samples``, ``input_dim``,
        ``shrinkage``), ``held_out_error`` and ``speedup`` before ``status`` when any layer has one."""
        extra = tuple(c for c in ("samples", "effective_samples", "input_dim", "shrinkage", "held_out_error",
                                  "speedup", "theoretical_speedup")
                      if any(getattr(r, c) is not None for r in self.layers))
        return COLUMNS[:-1] + extra + ("status",)

    def rows(self) -> list:
        return [[_cell(r, c) for c in self.columns] for r in self.layers]

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
            text.append(f"model parameters: {before:,} -> {after:,} ({after / before:.1%}) "
                        f"[sum(p.numel() for p in model.parameters()), shared parameters counted once]")
        layers_before, layers_after = t["params_before"], t["params_after"]
        if layers_before:
            text.append(f"listed layers' parameters: {layers_before:,} -> {layers_after:,} "
                        f"({layers_after / layers_before:.1%})")
        if self.model_bits_before:
            text.append(f"stored size: {self.model_bits_before / 8e6:,.3f} MB -> {self.model_bits_after / 8e6:,.3f} MB "
                        f"({self.model_bits_after / self.model_bits_before:.1%}"
                        f"{'; PQ codes counted at their bits' if any('PQ' in r.type for r in self.layers) else ''})")
        return "\n".join(text + self.notes)
