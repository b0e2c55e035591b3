"""Effective sample size of a layer's calibration rows (tokens of a sequence, patches of an image).

The rows ``calibrate`` accumulates into a layer's Gram are not independent: neighbouring
tokens of one sentence, or neighbouring patches of one image, look alike. ``N`` correlated
rows then estimate the Gram as well as fewer independent rows would; that number is the
effective sample size (ESS), and it is what decides whether a Gram is fitted to noise.

Estimator. Along every sequence / spatial axis ``a`` of the layer's input, the lag-1
autocorrelation of the centered rows (the inner product over all features, i.e. the
variance-weighted average of the per-feature autocorrelations)::

    rho_a = mean over adjacent pairs <x_t - mu, x_{t+s} - mu>  /  mean over rows ||x - mu||^2

(``s`` = 1 token for a Linear on ``(B, T, ..., D)`` inputs, the conv's stride for a conv,
measured on its input map: adjacent patches are windows ``s`` apart, so their centered inner
product is the map's autocovariance at lag ``s`` summed over the kernel offsets). For rows that
follow a Gaussian AR(1) process with coefficient ``rho`` along a line of ``L`` rows, every entry
of ``x_t x_t^T`` has autocorrelation ``rho^(2k)`` at lag ``k``, so the Gram of the line has the
variance of ``L / f(rho, L)`` independent rows, with the inflation

    f(rho, L) = 1 + 2 sum_{k=1}^{L-1} (1 - k/L) rho^(2k)        (1 <= f <= L)

and the axes multiply (a separable AR(1) grid): ``ESS = N / prod_a f(rho_a, L_a)``, ``L_a`` the
mean line length along axis ``a`` (tokens per sequence; the conv's output size), clipped to
``[1, N]``; an estimate within two standard errors of zero (``|rho| < 2 / sqrt(pairs)``, the
standard error of a white-noise lag-1 autocorrelation) counts as 0. For i.i.d. rows
``ESS = N``; for identical rows along a line (``rho = 1``) each line counts as one sample. It is
``rho^2``, not ``rho``: the Gram is a second moment, whose estimate is less affected by
correlation than a mean's (``N (1 - rho)/(1 + rho)``). Correlation at longer range than AR(1)
predicts (e.g. a per-sentence topic shared by all its tokens) is not seen: the ESS is then too
high.
Rows of a 2-D input ``(B, D)`` (one per batch item) are taken as independent. Batch-first
layouts are assumed (axis 0 is the batch).

Cost: a few passes over the layer's input (``O(N D)``, against the Gram's ``O(N D^2)``), in
the input's dtype (float32: about each input's own mean, so no cancellation; ESS needs no more
than a few digits); the sums of the calls are combined in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class RowCorrelation:
    """Sums over one layer's calibration inputs, about ``shift`` (``(D,)``, near the mean: no cancellation).

    ``rows``, ``total`` ``(D,)`` = sum of ``y = x - shift``, ``squares`` = sum of ``||y||^2``; per axis
    ``a``: ``products[a]`` = sum over adjacent pairs of ``<y_t, y_{t+s}>``, ``heads[a]`` / ``tails[a]``
    ``(D,)`` the sums of the pairs' first / second rows, ``pairs[a]``, and ``lines[a]`` /
    ``line_rows[a]``: the lines of Gram rows along that axis and the rows they hold.
    """

    shift: torch.Tensor
    rows: float = 0.0
    total: torch.Tensor = None
    squares: float = 0.0
    products: list = field(default_factory=list)
    heads: list = field(default_factory=list)
    tails: list = field(default_factory=list)
    pairs: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    line_rows: list = field(default_factory=list)

    def add(self, other: "RowCorrelation") -> None:
        """Add the sums of ``other`` (re-expressed about this ``shift``); axes beyond the shorter list are dropped."""
        other = other.about(self.shift)
        if self.total is None:
            self.total = torch.zeros_like(other.total)
        axes = len(other.products) if self.rows == 0 else min(len(self.products), len(other.products))
        for store in ("products", "heads", "tails", "pairs", "lines", "line_rows"):
            mine, theirs = getattr(self, store), getattr(other, store)
            setattr(self, store, list(theirs[:axes]) if self.rows == 0 else [a + b for a, b in zip(mine, theirs)])
        self.rows += other.rows
        self.squares += other.squares
        self.total = self.total + other.total

    def about(self, shift: torch.Tensor) -> "RowCorrelation":
        """The same sums taken about ``shift`` instead (exact: ``y' = y + d`` with ``d = self.shift - shift``)."""
        d = self.shift - shift
        if not bool(d.any()):
            return self
        dd = float(d @ d)
        return RowCorrelation(
            shift=shift, rows=self.rows, total=self.total + self.rows * d,
            squares=self.squares + 2 * float(d @ self.total) + self.rows * dd,
            products=[p + float(d @ (h + t)) + n * dd for p, h, t, n in zip(self.products, self.heads, self.tails,
                                                                            self.pairs)],
            heads=[h + n * d for h, n in zip(self.heads, self.pairs)],
            tails=[t + n * d for t, n in zip(self.tails, self.pairs)],
            pairs=list(self.pairs), lines=list(self.lines), line_rows=list(self.line_rows))

    def autocorrelation(self) -> list:
        """``[rho_a]``: the lag-1 autocorrelation of the centered rows along each axis (module docstring)."""
        if self.rows < 2:
            return [0.0 for _ in self.products]
        mu = self.total / self.rows
        variance = (self.squares - self.rows * float(mu @ mu)) / self.rows
        out = []
        for product, head, tail, pairs in zip(self.products, self.heads, self.tails, self.pairs):
            if pairs < 1 or variance <= 0:
                out.append(0.0)
                continue
            lagged = (product - float(mu @ (head + tail)) + pairs * float(mu @ mu)) / pairs
            out.append(max(-1.0, min(1.0, lagged / variance)))
        return out

    def effective_samples(self, samples: int) -> float:
        """The ESS of ``samples`` Gram rows: ``samples / prod_a f(rho_a, L_a)`` clipped to ``[1, samples]``."""
        inflation = 1.0
        for rho, pairs, lines, line_rows in zip(self.autocorrelation(), self.pairs, self.lines, self.line_rows):
            if abs(rho) < 2.0 / math.sqrt(max(pairs, 1.0)):   # within noise of 0 (white noise: s.e. 1/sqrt(pairs))
                continue
            inflation *= variance_inflation(rho, line_rows / lines if lines else 1.0)
        return float(min(max(samples / inflation, 1.0), samples)) if samples > 0 else 0.0


def variance_inflation(rho: float, length: float) -> float:
    """``f(rho, L) = 1 + 2 sum_{k=1}^{L-1} (1 - k/L) rho^(2k)``: how many correlated rows of a line of
    ``L`` (rounded; at least 1) rows are worth one independent row for a second moment (AR(1) rows)."""
    L = max(int(round(length)), 1)
    if L == 1 or rho == 0.0:
        return 1.0
    k = torch.arange(1, L, dtype=torch.float64)
    return float(1.0 + 2.0 * ((1.0 - k / L) * (rho * rho) ** k).sum())


def row_correlation(layer, x, mask=None) -> RowCorrelation:
    """The :class:`RowCorrelation` sums of one input ``x`` of ``layer`` (a plain Linear / ConvNd).

    Linear: ``x (B, T, D)`` (one sequence axis; ``mask (B, T)`` leaves the padding rows (0) out,
    the kept rows of a sequence counting as consecutive), ``(B, *S, D)`` (every axis of ``S`` a
    sequence axis, lag 1) or ``(N, D)`` (independent rows: no axis). ConvNd: ``x (B, C, *spatial)``
    (or unbatched), lag = the stride along each spatial axis, lines as long as the output grid.
    The sums are taken about this input's mean (:meth:`RowCorrelation.add` re-expresses them).
    """
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if isinstance(layer, nn.Linear):
        if x.ndim <= 2:
            rows = x.reshape(-1, x.shape[-1])
            return _sequence_sums(rows, None)
        if x.ndim == 3:
            if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
                keep = mask.to(x.device).bool()
                return _sequence_sums(x[keep], keep.sum(1))
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
            return _sequence_sums(x.reshape(-1, x.shape[-1]), lengths)
        return _grid_sums(x.movedim(-1, 1), [1] * (x.ndim - 2), list(x.shape[1:-1]))
    y = x if x.ndim == len(layer.kernel_size) + 2 else x[None]
    return _grid_sums(y, list(layer.stride), list(_output_size(layer, y.shape[2:])))


def _output_size(conv, spatial) -> tuple:
    """The conv's output grid for an input grid ``spatial`` (padding as the conv pads)."""
    from .calibrate import explicit_padding
    out = []
    for size, (left, right), k, s, d in zip(spatial, explicit_padding(conv), conv.kernel_size, conv.stride,
                                            conv.dilation):
        out.append(max((size + left + right - d * (k - 1) - 1) // s + 1, 0))
    return tuple(out)


def _centered(y, dims):
    """``(y - mean, RowCorrelation with rows / shift / total / squares)``; the mean over ``dims``."""
    D = y.shape[1]   # (N, D) rows, or (B, D, *axes)
    shift = y.mean(dims)   # reductions in the rows' dtype (a float64 one would convert every entry first)
    y = y - shift.reshape([1, D] + [1] * (y.ndim - 2))
    stats = RowCorrelation(shift=shift.to("cpu", torch.float64), rows=float(y.numel() // max(D, 1)))
    stats.total = y.sum(dims).to("cpu", torch.float64)
    flat = y.reshape(-1)
    stats.squares = float(torch.dot(flat, flat))
    return y, stats


def _sequence_sums(rows, lengths) -> RowCorrelation:
    """Sums of ``rows (N, D)``: consecutive runs of ``lengths`` rows are sequences (None: independent rows).

    Adjacent-pair products come from one dot product of the rows with the rows one step on,
    minus the pairs that straddle two sequences; the pairs' head / tail sums are the total
    minus the last / first rows of each sequence."""
    y, stats = _centered(rows, [0])
    if lengths is None or y.shape[0] == 0:
        return stats
    lengths = lengths[lengths > 0]
    D, flat = y.shape[1], y.reshape(-1)
    ends = lengths.cumsum(0) - 1
    last, first = y[ends], y[ends - lengths + 1]
    straddling = float(torch.dot(last[:-1].reshape(-1), first[1:].reshape(-1))) if len(lengths) > 1 else 0.0
    stats.products = [float(torch.dot(flat[:-D], flat[D:])) - straddling if y.shape[0] > 1 else 0.0]
    stats.heads = [stats.total - last.sum(0).to("cpu", torch.float64)]
    stats.tails = [stats.total - first.sum(0).to("cpu", torch.float64)]
    stats.pairs = [float(y.shape[0] - len(lengths))]
    stats.lines, stats.line_rows = [float(len(lengths))], [stats.rows]
    return stats


def _grid_sums(y, lags, lengths) -> RowCorrelation:
    """Sums of ``y (B, D, *axes)`` (no padding rows) along each axis at its lag; Gram-row lines of ``lengths``."""
    dims = [0] + list(range(2, y.ndim))
    y, stats = _centered(y, dims)
    rows = float(y.shape[0] * math.prod(lengths))   # the Gram's rows (output grid positions)
    for axis, (lag, length) in enumerate(zip(lags, lengths), start=2):
        size = y.shape[axis]
        lag = min(lag, size)   # a line shorter than the lag has no pairs (sums of empty views: 0)
        head, tail = y.narrow(axis, 0, size - lag), y.narrow(axis, lag, size - lag)
        stats.products.append(float((head * tail).sum()))
        stats.heads.append(head.sum(dims).to("cpu", torch.float64))
        stats.tails.append(tail.sum(dims).to("cpu", torch.float64))
        stats.pairs.append(float(head.numel() // max(y.shape[1], 1)))
        stats.lines.append(rows / max(length, 1))
        stats.line_rows.append(rows)
    return stats


__all__ = ["RowCorrelation", "row_correlation", "variance_inflation"]
