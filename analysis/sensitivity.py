"""Per-layer sensitivity scans and whole-model trade-off curves.

``sensitivity(model, eval_fn)`` compresses ONE layer at a time (``layers.compress`` with
``include=[that layer]``) at each grid value and records ``eval_fn(compressed model)``:
which layers tolerate a low rank and which do not. ``tradeoff_curve(model, eval_fn)``
compresses every layer at each grid value and records (parameters, metric) points for
:func:`analysis.plots.plot_pareto`. Neither modifies ``model`` (compress deep-copies it).
"""
from __future__ import annotations

import glob

import numpy as np

from decomp_toolkit.layers import available_methods, compress
from decomp_toolkit.layers.kinds import kind_of

from .spectra import as_standard, named_layers
from .tables import Table

SPECS = ("energy", "ratio", "tol", "rank")
DEFAULT_GRIDS = {"energy": (0.5, 0.7, 0.9, 0.95, 0.99), "ratio": (0.1, 0.25, 0.5, 0.75),
                 "tol": (0.5, 0.3, 0.1, 0.05)}


class SensitivityTable(Table):
    """Rows ``layer, type, shape, <spec>=<value>...`` holding ``eval_fn`` of each one-layer compression.

    Attributes: ``baseline`` (``eval_fn(model)``), ``method``, ``spec``, ``grid``,
    ``layers`` (names), ``values`` (``(layers, grid)`` float array, NaN where compress
    left the layer dense), ``params`` (the layer's parameters after, ``(layers, grid)``),
    ``dense_params`` (per layer), ``status`` (compress's status per cell).
    A cell is ``-`` when compress kept the layer dense (the reason is in ``status`` / notes).
    """

    def grid_columns(self) -> list:
        return [f"{self.spec}={v:g}" for v in self.grid]


def _check_spec(spec, grid):
    if spec not in SPECS:
        raise ValueError(f"spec={spec!r} is not one of {SPECS}")
    if grid is None:
        if spec == "rank":
            raise ValueError("spec='rank' needs an explicit grid=, e.g. grid=(1, 2, 4, 8)")
        grid = DEFAULT_GRIDS[spec]
    grid = tuple(grid)
    if not grid:
        raise ValueError("grid= is empty; pass the values of the rank specification to scan")
    return grid


def _select(model, layers) -> list:
    """``[(name, module)]`` of the Linear/Conv layers named (or fnmatch-matched) by ``layers``."""
    import fnmatch

    available = [(n, m) for n, m in named_layers(model) if m is not model]
    if not available:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv sub-layer to scan")
    if layers is None:
        return available
    if isinstance(layers, str):
        layers = [layers]
    chosen = [(n, m) for n, m in available if any(fnmatch.fnmatchcase(n, p) for p in layers)]
    missing = [p for p in layers if not any(fnmatch.fnmatchcase(n, p) for n, _ in available)]
    if missing:
        raise ValueError(f"layers={missing} match no Linear/Conv layer; the model has "
                         f"{[n for n, _ in available]}")
    return chosen


def _options_for(method, layer, options) -> dict:
    """The method options the builder for this layer's kind accepts (e.g. no scheme= for Linear)."""
    entry = available_methods().get(method)
    if entry is None:
        raise ValueError(f"unknown method={method!r}; available: {sorted(available_methods())}")
    accepted = set(entry.options(kind_of(layer).key))
    return {k: v for k, v in options.items() if k in accepted}


def _check_options(method, options):
    entry = available_methods().get(method)
    if entry is None:
        raise ValueError(f"unknown method={method!r}; available: {sorted(available_methods())}")
    known = set().union(*(entry.options(kind) for kind in entry.builders))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method={method!r}; it accepts {sorted(known)}")


def _progress(total, desc, enabled):
    if enabled:  # tqdm.auto picks the notebook widget when there is one (and warns when ipywidgets is missing)
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def sensitivity(model, eval_fn, method: str = "svd", grid=None, layers=None, spec: str = "energy",
                progress: bool = True, **options) -> SensitivityTable:
    """``eval_fn`` of the model with one layer compressed, for every layer x grid value.

    ``eval_fn(model) -> float`` (accuracy, loss, ...). ``spec`` names the rank
    specification the grid values go to (``energy``, ``ratio``, ``tol`` or ``rank``);
    default grids: energy 0.5..0.99, ratio 0.1..0.75, tol 0.5..0.05 (``rank`` needs one).
    ``layers``: names or fnmatch patterns (default: every Linear/Conv layer).
    ``options`` go to ``compress`` / the method (e.g. ``scheme="spatial"``); an option a
    layer's kind does not take (``scheme`` for Linear) is not passed to that layer.
    ``progress``: a tqdm bar (``False`` for quiet). ``model`` is never modified.
    """
    grid = _check_spec(spec, grid)
    _check_options(method, options)
    chosen = _select(model, layers)
    baseline = float(eval_fn(model))
    values = np.full((len(chosen), len(grid)), np.nan)
    params = np.zeros((len(chosen), len(grid)), dtype=np.int64)
    status = [[None] * len(grid) for _ in chosen]
    dense = []
    bar = _progress(len(chosen) * len(grid), "sensitivity", progress)
    try:
        for i, (name, layer) in enumerate(chosen):
            layer_options = _options_for(method, layer, options)
            dense.append(sum(p.numel() for p in layer.parameters()))
            for j, value in enumerate(grid):
                bar.set_postfix_str(f"{name} {spec}={value:g}")
                small, report = compress(model, method=method, include=[glob.escape(name)], progress=False,
                                         **{spec: value}, **layer_options)
                record = next(r for r in report.layers if r.name == name)
                status[i][j], params[i, j] = record.status, record.params_after
                if record.replaced:
                    values[i, j] = float(eval_fn(small))
                bar.update()
    finally:
        bar.close()
    table = SensitivityTable(title=f"sensitivity: {method} {spec}, one layer at a time (baseline {baseline:.4g})")
    table.baseline, table.method, table.spec, table.grid = baseline, method, spec, grid
    table.layers, table.values, table.params, table.status = [n for n, _ in chosen], values, params, status
    table.dense_params = dense
    columns = table.grid_columns()
    table.columns = ["layer", "type", "shape"] + columns
    for i, (name, layer) in enumerate(chosen):
        row = dict(layer=name, type=type(layer).__name__, shape=tuple(as_standard(layer).weight.shape))
        row.update({c: (None if np.isnan(v) else float(v)) for c, v in zip(columns, values[i])})
        table.append(row)
        table.notes += [f"{name} {c}: {s}" for c, s in zip(columns, status[i]) if s != "replaced"]
    table.notes.insert(0, f"baseline (dense model): {baseline:.4f}")
    return table


def tradeoff_curve(model, eval_fn, method: str = "svd", grid=None, spec: str = "energy", progress: bool = True,
                   name: str | None = None, **options) -> list:
    """Compress the whole model at each grid value; ``[dict(method, spec, value, params, metric, ...)]``.

    ``params`` is the compressed model's parameter count, ``params_fraction`` its share of
    the dense model's, ``metric`` = ``eval_fn(compressed model)``. ``options`` go to
    ``compress`` (``include``, ``exclude``, ``policy``, ``scheme``, ...). ``name`` (default: the
    method) is the ``method`` entry of the points, the curve's label in
    :func:`analysis.plots.plot_pareto` (e.g. ``"svd spatial"``); feed it the lists of one or
    more runs concatenated.
    """
    grid = _check_spec(spec, grid)
    points = []
    bar = _progress(len(grid), f"{method} {spec}", progress)
    try:
        for value in grid:
            small, report = compress(model, method=method, progress=False, **{spec: value}, **options)
            totals = report.totals()
            points.append(dict(method=name or method, spec=spec, value=value, label=f"{spec}={value:g}",
                               params=totals["model_params_after"],
                               params_fraction=totals["model_params_after"] / totals["model_params_before"],
                               metric=float(eval_fn(small)), replaced=len(report.replaced)))
            bar.update()
    finally:
        bar.close()
    return points


__all__ = ["sensitivity", "tradeoff_curve", "SensitivityTable"]
