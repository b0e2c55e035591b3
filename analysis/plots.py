"""Plots for notebooks and reports (matplotlib, the optional ``plots`` extra).

Every function returns a :class:`matplotlib.figure.Figure` and accepts ``save=path`` to
write it (PNG, or any format matplotlib knows from the suffix) and ``ax=`` to draw into
existing axes. Figures are created without pyplot (no GUI backend, no global state), so
a notebook shows a returned figure once; in a script use ``save=`` or pass an ``ax``
from ``plt.subplots()`` and call ``plt.show()``.

* ``plot_energy(model or spectra)``      kept energy fraction vs rank fraction, per layer
* ``plot_spectrum(model or spectra)``    singular-value decay (log scale), per layer
* ``plot_pareto(results)``               metric vs parameters, one curve per method
* ``plot_sensitivity(table)``            heat map of a :func:`analysis.sensitivity` table
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch.nn as nn

from .spectra import DEFAULT_THRESHOLDS, energy_curve, spectra, spectrum

PLOTS_HINT = "pip install decomp-toolkit[plots]"


def _figure(ax=None, figsize=(7.0, 4.5)):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib, which is not installed; install it with: "
                          f"{PLOTS_HINT}") from err
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, save, dpi=120):
    if save is not None:
        fig.savefig(save, dpi=dpi)
    return fig


def _as_spectra(source, scheme) -> dict:
    """``{label: spectrum}`` from a model / layer, a dict of spectra, or one weight array."""
    if isinstance(source, nn.Module):
        out = spectra(source, scheme)
    elif isinstance(source, Mapping):
        out = {}
        for name, value in source.items():
            if isinstance(value, Mapping):  # e.g. {layer: spectrum(layer, modes=True)}
                out.update({f"{name} mode {mode}": s for mode, s in value.items()})
            else:
                out[str(name) if not isinstance(name, int) else f"mode {name}"] = value
    else:
        out = {"weight": spectrum(source, scheme)}
    out = {name: np.asarray(s, dtype=np.float64) for name, s in out.items()}
    if not out:
        raise ValueError("nothing to plot: no Linear/Conv layer or spectrum was given")
    return out


def _legend(ax, count):
    ax.legend(fontsize="small" if count <= 8 else "x-small", ncol=1 if count <= 10 else 2)


def plot_energy(source, *, scheme: str = "channel", thresholds=DEFAULT_THRESHOLDS, ax=None, save=None,
                title: str | None = None):
    """Kept energy fraction vs rank / max rank, one curve per layer (or per spectrum).

    ``source``: a model or layer (its svd spectra for ``scheme``), a dict ``{name: spectrum}``
    (e.g. from :func:`analysis.spectra`), or one weight array. Dashed lines mark
    ``thresholds``; where a curve crosses one is the rank :func:`energy_table` reports.
    """
    fig, ax = _figure(ax)
    data = _as_spectra(source, scheme)
    for name, s in data.items():
        curve = energy_curve(s)
        rank = len(curve) - 1
        ax.plot(np.arange(rank + 1) / rank, curve, marker="." if rank <= 40 else None,
                label=f"{name} (max rank {rank})")
    for t in thresholds or ():
        ax.axhline(t, color="0.6", linestyle="--", linewidth=0.8)
        ax.annotate(f"{t:g}", (1.0, t), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize="x-small", color="0.4", annotation_clip=False)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="rank / max rank", ylabel="kept energy fraction",
           title=title if title is not None else "energy kept by a rank-k truncation")
    ax.grid(alpha=0.3)
    _legend(ax, len(data))
    return _finish(fig, save)


def plot_spectrum(source, *, scheme: str = "channel", normalize: bool = True, rank_fraction: bool = False,
                  ax=None, save=None, title: str | None = None):
    """Singular-value decay on a log scale, one curve per layer.

    Grouped spectra ``(g, L)`` are combined as ``sqrt(sum_g s_gi^2)`` (the energy the
    shared rank i carries). ``normalize`` divides by the largest value; ``rank_fraction``
    puts ``i / max rank`` on the x-axis instead of the index ``i``.
    """
    fig, ax = _figure(ax)
    data = _as_spectra(source, scheme)
    for name, s in data.items():
        values = np.sqrt(np.square(np.atleast_2d(s)).sum(axis=0))
        if normalize and values.size and values[0] > 0:
            values = values / values[0]
        values = np.where(values > 0, values, np.nan)  # zeros have no log
        index = np.arange(1, values.size + 1)
        x = index / values.size if rank_fraction else index
        ax.plot(x, values, marker="." if values.size <= 40 else None, label=name)
    ax.set_yscale("log")
    ax.set(xlabel="rank / max rank" if rank_fraction else "index i",
           ylabel="s_i / s_1" if normalize else "singular value s_i",
           title=title if title is not None else "singular value spectrum")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(data))
    return _finish(fig, save)


def _point(baseline, x, y):
    if isinstance(baseline, Mapping):
        return baseline.get(x), baseline.get(y)
    return tuple(baseline)


def plot_pareto(results, *, x: str = "params", y: str = "metric", baseline=None, xlabel: str | None = None,
                ylabel: str | None = None, annotate: bool = True, logx: bool = False, ax=None, save=None,
                title: str | None = None):
    """Metric vs size, one curve per method (e.g. accuracy vs parameters).

    ``results``: dicts with ``method``, ``x`` (default ``params``) and ``y`` (default
    ``metric``) keys, optionally ``label`` (written next to the point), e.g. the output of
    :func:`analysis.tradeoff_curve` for one or more methods. ``baseline``: the dense model,
    a dict with the same keys or an ``(x, y)`` pair, drawn as a star.
    """
    fig, ax = _figure(ax)
    results = list(results)
    if not results:
        raise ValueError("plot_pareto needs at least one result dict (method, params, metric)")
    missing = [k for k in ("method", x, y) if any(k not in r for r in results)]
    if missing:
        raise ValueError(f"every result needs the keys 'method', {x!r} and {y!r}; some lack {missing}")
    methods = list(dict.fromkeys(r["method"] for r in results))
    for method in methods:
        points = sorted((r for r in results if r["method"] == method), key=lambda r: r[x])
        xs, ys = [r[x] for r in points], [r[y] for r in points]
        ax.plot(xs, ys, marker="o", label=str(method))
        if annotate:
            for r in points:
                if r.get("label"):
                    ax.annotate(str(r["label"]), (r[x], r[y]), xytext=(4, 4), textcoords="offset points",
                                fontsize="x-small")
    if baseline is not None:
        bx, by = _point(baseline, x, y)
        ax.plot([bx], [by], marker="*", markersize=14, color="black", linestyle="none", label="dense")
    if logx:
        ax.set_xscale("log")
    if x == "params":
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    xlabel, ylabel = xlabel or ("parameters" if x == "params" else x), ylabel or y
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title if title is not None else f"{ylabel} vs {xlabel}")
    ax.grid(alpha=0.3)
    _legend(ax, len(methods) + (baseline is not None))
    return _finish(fig, save)


def plot_sensitivity(table, *, relative: bool = False, annotate: bool = True, cmap: str = "viridis", ax=None,
                     save=None, title: str | None = None):
    """Heat map (layers x grid values) of a :func:`analysis.sensitivity` table.

    ``relative``: show ``metric - baseline`` instead of the metric. Grey cells: compress
    kept that layer dense at that setting.
    """
    for attr in ("values", "layers", "grid", "spec", "baseline"):
        if not hasattr(table, attr):
            raise TypeError(f"plot_sensitivity takes the table returned by analysis.sensitivity(); "
                            f"{type(table).__name__} has no {attr!r}")
    import matplotlib

    values = np.asarray(table.values, dtype=np.float64)
    data = values - table.baseline if relative else values
    height = max(2.5, 0.45 * len(table.layers) + 1.5)
    width = max(5.0, 1.0 * len(table.grid) + 3.0)
    fig, ax = _figure(ax, figsize=(width, height))
    colors = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colors, aspect="auto")
    ax.set_xticks(range(len(table.grid)), [f"{v:g}" for v in table.grid])
    ax.set_yticks(range(len(table.layers)), table.layers)
    label = "metric - baseline" if relative else "metric"
    fig.colorbar(image, ax=ax, label=label)
    if annotate:
        finite = data[np.isfinite(data)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        middle = (low + high) / 2
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                text = "dense" if not np.isfinite(v) else f"{v:+.3f}" if relative else f"{v:.3f}"
                dark = np.isfinite(v) and v < middle
                ax.text(j, i, text, ha="center", va="center", fontsize="small",
                        color="white" if dark else "black")
    ax.set(xlabel=f"{table.spec}", ylabel="layer",
           title=title if title is not None else
           f"{getattr(table, 'method', '')} sensitivity, one layer at a time (baseline {table.baseline:.4g})")
    return _finish(fig, save)


__all__ = ["plot_energy", "plot_spectrum", "plot_pareto", "plot_sensitivity", "PLOTS_HINT"]
