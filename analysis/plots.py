"""Plots for notebooks and reports (matplotlib, the optional ``plots`` extra).

Every function returns a :class:`matplotlib.figure.Figure` and accepts ``save=path`` to
write it (PNG, or any format matplotlib knows from the suffix) and ``ax=`` to draw into
existing axes. Figures are created without pyplot (no GUI backend, no global state), so
a notebook shows a returned figure once; in a script use ``save=`` or pass an ``ax``
from ``plt.subplots()`` and call ``plt.show()``.

* ``plot_energy(model or spectra)``      kept energy fraction vs rank fraction, per layer
* ``plot_spectrum(model or spectra)``    singular-value decay (log scale), per layer
* ``plot_pareto(results)``               metric vs parameters, one curve per method, the dense model marked
* ``plot_sensitivity(table)``            heat map of a :func:`analysis.sensitivity` table

Legends sit outside the axes. Up to 10 curves each get their own colour, marker and line
style; more layers (a transformer's 36, a CNN's 50) are drawn in one colour per layer role
(the name with its block index replaced by ``*``), or, when every layer is its own role, in a
depth colormap with a colorbar.
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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", ":", "-.")
MAX_SERIES = 10   # more curves than this are grouped (by layer role) or coloured by depth


def series_style(i: int) -> dict:
    """A style no other index below 40 shares: colour, marker and line style cycle at different rates."""
    import matplotlib

    return dict(color=matplotlib.colormaps["tab10"](i % 10), marker=MARKERS[(i + i // 10) % len(MARKERS)],
                linestyle=LINESTYLES[(i // 10) % len(LINESTYLES)])


def _legend(ax, count):
    """The legend outside the axes (right), so that it never covers a curve."""
    if count:
        ax.legend(fontsize="small" if count <= 8 else "x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, frameon=False)


def layer_role(name: str) -> str:
    """The name with its first numeric component replaced by ``*``: the role a layer plays in every block
    (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1:])
    return name


def _draw_series(ax, fig, curves, marker_limit=40):
    """Plot ``{label: (x, y)}``: distinct styles up to MAX_SERIES, else one colour per layer role (legend
    of roles), else a depth colormap with a colorbar."""
    import matplotlib

    if len(curves) <= MAX_SERIES:
        for i, (name, (xs, ys)) in enumerate(curves.items()):
            style = series_style(i)
            style["marker"] = style["marker"] if len(xs) <= marker_limit else None
            ax.plot(xs, ys, label=name, markersize=3, linewidth=1.2, **style)
        _legend(ax, len(curves))
        return
    roles = {}
    for name in curves:
        roles.setdefault(layer_role(name), []).append(name)
    if len(roles) <= MAX_SERIES:
        for i, (role, names) in enumerate(roles.items()):
            color, style = matplotlib.colormaps["tab10"](i % 10), LINESTYLES[i // 10 % len(LINESTYLES)]
            for j, name in enumerate(names):
                xs, ys = curves[name]
                ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.0, alpha=0.75,
                        label=f"{role} ({len(names)} layer{'s' if len(names) > 1 else ''})" if j == 0 else None)
        _legend(ax, len(roles))
        return
    cmap = matplotlib.colormaps["viridis"]
    for i, (xs, ys) in enumerate(curves.values()):
        ax.plot(xs, ys, color=cmap(i / max(1, len(curves) - 1)), linewidth=1.0)
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, len(curves) - 1), cmap=cmap)
    fig.colorbar(mappable, ax=ax, label=f"layer index in model order (0: {next(iter(curves))})")


def plot_energy(source, *, scheme: str = "channel", thresholds=DEFAULT_THRESHOLDS, ax=None, save=None,
                title: str | None = None):
    """Kept energy fraction vs rank / max rank, one curve per layer (or per spectrum).

    ``source``: a model or layer (its svd spectra for ``scheme``), a dict ``{name: spectrum}``
    (e.g. from :func:`analysis.spectra`), or one weight array. Dashed lines mark
    ``thresholds``; where a curve crosses one is the rank :func:`energy_table` reports.
    """
    data = _as_spectra(source, scheme)
    fig, ax = _figure(ax, figsize=_series_figsize(len(data)))
    curves = {}
    for name, s in data.items():
        curve = energy_curve(s)
        rank = len(curve) - 1
        label = f"{name} (max rank {rank})" if len(data) <= MAX_SERIES else name
        curves[label] = (np.arange(rank + 1) / rank, curve)
    _draw_series(ax, fig, curves)
    for t in thresholds or ():
        ax.axhline(t, color="0.6", linestyle="--", linewidth=0.8)
        ax.annotate(f"{t:g}", (0.0, t), xytext=(3, 1), textcoords="offset points", va="bottom",
                    fontsize="x-small", color="0.4")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="rank / max rank", ylabel="kept energy fraction",
           title=title if title is not None else "energy kept by a rank-k truncation")
    ax.grid(alpha=0.3)
    return _finish(fig, save)


def _series_figsize(count):
    """Wider figures leave room for the legend (or colorbar) beside the axes."""
    return (9.0, 4.5) if count > 1 else (7.0, 4.5)


def plot_spectrum(source, *, scheme: str = "channel", normalize: bool = True, rank_fraction: bool = False,
                  ax=None, save=None, title: str | None = None):
    """Singular-value decay on a log scale, one curve per layer.

    Grouped spectra ``(g, L)`` are combined as ``sqrt(sum_g s_gi^2)`` (the energy the
    shared rank i carries). ``normalize`` divides by the largest value; ``rank_fraction``
    puts ``i / max rank`` on the x-axis instead of the index ``i``.
    """
    data = _as_spectra(source, scheme)
    fig, ax = _figure(ax, figsize=_series_figsize(len(data)))
    curves = {}
    for name, s in data.items():
        values = np.sqrt(np.square(np.atleast_2d(s)).sum(axis=0))
        if normalize and values.size and values[0] > 0:
            values = values / values[0]
        values = np.where(values > 0, values, np.nan)  # zeros have no log
        index = np.arange(1, values.size + 1)
        curves[name] = (index / values.size if rank_fraction else index, values)
    _draw_series(ax, fig, curves)
    ax.set_yscale("log")
    ax.set(xlabel="rank / max rank" if rank_fraction else "index i",
           ylabel="s_i / s_1" if normalize else "singular value s_i",
           title=title if title is not None else "singular value spectrum")
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, save)


def _point(baseline, x, y):
    if isinstance(baseline, Mapping):
        return baseline.get(x), baseline.get(y)
    return tuple(baseline)


def plot_pareto(results, *, x: str = "params", y: str = "metric", baseline=None, xlabel: str | None = None,
                ylabel: str | None = None, annotate: bool = True, logx: bool = False, logy: bool = False, ax=None,
                save=None, title: str | None = None):
    """Metric vs size, one curve per method (e.g. accuracy vs parameters).

    ``results``: dicts with ``method``, ``x`` (default ``params``) and ``y`` (default
    ``metric``) keys, optionally ``label`` (written next to the point), e.g. the output of
    :func:`analysis.tradeoff_curve` for one or more methods. ``baseline``: the dense model,
    a dict with the same keys or an ``(x, y)`` pair, drawn as a star.
    """
    results = list(results)
    fig, ax = _figure(ax, figsize=(9.0, 5.0))
    if not results:
        raise ValueError("plot_pareto needs at least one result dict (method, params, metric)")
    missing = [k for k in ("method", x, y) if any(k not in r for r in results)]
    if missing:
        raise ValueError(f"every result needs the keys 'method', {x!r} and {y!r}; some lack {missing}")
    methods = list(dict.fromkeys(r["method"] for r in results))
    for i, method in enumerate(methods):
        points = sorted((r for r in results if r["method"] == method), key=lambda r: r[x])
        xs, ys = [r[x] for r in points], [r[y] for r in points]
        ax.plot(xs, ys, label=str(method), markersize=6, linewidth=1.2, **series_style(i))
        if annotate:
            for r in points:
                if r.get("label"):
                    ax.annotate(str(r["label"]), (r[x], r[y]), xytext=(4, 4), textcoords="offset points",
                                fontsize="x-small")
    if baseline is not None:
        bx, by = _point(baseline, x, y)
        ax.hlines(by, 0, 1, transform=ax.get_yaxis_transform(), color="black", linewidth=0.8,
                  linestyle=(0, (1, 3)), zorder=1)
        ax.plot([bx], [by], marker="*", markersize=16, color="black", linestyle="none", zorder=5, label="dense")
        ax.annotate(f"dense model: {by:.4g}", (bx, by), xytext=(-6, 8), textcoords="offset points", ha="right",
                    fontsize="small")
    if logx:
        ax.set_xscale("log")
    if logy:   # e.g. error rates from 0.1% to 90%: every decade readable
        ax.set_yscale("log")
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


__all__ = ["plot_energy", "plot_spectrum", "plot_pareto", "plot_sensitivity", "series_style", "layer_role",
           "PLOTS_HINT"]
