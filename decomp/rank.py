"""One rank specification for every method.

A caller passes exactly one of

* ``rank=``   an int (or a tuple, one per mode, for multi-mode methods), or ``"vbmf"``
              (analytic empirical variational Bayesian matrix factorization,
              Nakajima et al. 2013, the rank selector of Kim et al. 2016);
* ``energy=`` in (0, 1]: the smallest k with ``sum_{i<=k} s_i^2 >= energy * sum_i s_i^2``;
* ``tol=``    in [0, 1): the smallest k whose certified relative Frobenius error
              ``sqrt(sum_{i>k} s_i^2) / ||A||_F`` is <= tol;
* ``ratio=``  in (0, 1]: the largest k whose factors hold <= ratio * dense parameters.

Spectra may be batched, ``s`` of shape ``(g, L)``, for ``g`` blocks sharing one rank
(groups of a grouped conv): energy and error are then summed over the blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize_scalar

SPEC_KINDS = ("rank", "energy", "tol", "ratio")


class InfeasibleRankError(ValueError):
    """A valid request this array's shape cannot meet (a rank above the maximum, a ratio below rank 1, ...).

    ``reason`` is the message without its context prefix. Layer adapters turn it into "kept dense: reason".
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class RankSpec:
    """A parsed rank specification: ``kind`` in rank/energy/tol/ratio/vbmf, and its value."""

    kind: str
    value: object

    def __str__(self):
        return "rank='vbmf'" if self.kind == "vbmf" else f"{self.kind}={self.value!r}"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_rank_spec(rank=None, energy=None, tol=None, ratio=None, *, allowed=SPEC_KINDS + ("vbmf",),
                    allow_tuple=False, context="") -> RankSpec:
    """Validate that exactly one of rank/energy/tol/ratio is given and return a RankSpec.

    ``allowed`` names the kinds the calling method supports (``"vbmf"`` for
    ``rank="vbmf"``); ``allow_tuple`` admits a per-mode tuple of ints for ``rank``.
    ``context`` (e.g. the layer name and shape) starts every error message.
    Raises ValueError for missing, multiple or out-of-range specs and TypeError for
    values of the wrong type.
    """
    prefix = f"{context}: " if context else ""
    given = {k: v for k, v in dict(rank=rank, energy=energy, tol=tol, ratio=ratio).items() if v is not None}
    offered = ", ".join(f"{k}=" for k in SPEC_KINDS if k in allowed)
    if len(given) != 1:
        what = "none" if not given else " and ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"{prefix}pass exactly one of {offered} (got {what})")
    kind, value = next(iter(given.items()))
    if kind == "rank" and isinstance(value, str):
        if value != "vbmf":
            raise ValueError(f"{prefix}rank={value!r} is not understood; pass an int or rank='vbmf'")
        kind = "vbmf"
    if kind not in allowed:
        raise ValueError(f"{prefix}{kind}= is not supported by this method; pass one of {offered}")
    if kind == "rank":
        _check_rank_value(value, allow_tuple, prefix)
        value = tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else int(value)
    elif kind in ("energy", "tol", "ratio"):
        if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{prefix}{kind}= must be a number, got {type(value).__name__}")
        value = float(value)
        ranges = {"energy": (0.0, 1.0, False), "tol": (0.0, 1.0, True), "ratio": (0.0, 1.0, False)}
        low, high, tol_like = ranges[kind]
        ok = (low <= value < high) if tol_like else (low < value <= high)
        if not math.isfinite(value) or not ok:
            interval = "[0, 1)" if tol_like else "(0, 1]"
            raise ValueError(f"{prefix}{kind}={value!r} is outside {interval}")
    return RankSpec(kind, value)


def _check_rank_value(value, allow_tuple, prefix):
    if isinstance(value, (tuple, list)):
        if not allow_tuple:
            raise TypeError(f"{prefix}rank= must be an int for this method, got {value!r}")
        if not value or not all(_is_int(v) for v in value):
            raise TypeError(f"{prefix}rank= must be a tuple of ints, got {value!r}")
        if any(v < 1 for v in value):
            raise ValueError(f"{prefix}rank={tuple(value)!r}: every rank must be >= 1")
    elif not _is_int(value):
        raise TypeError(f"{prefix}rank= must be an int or 'vbmf', got {type(value).__name__} {value!r}")
    elif value < 1:
        raise ValueError(f"{prefix}rank={value} must be >= 1")


def check_rank(rank: int, max_rank: int, context: str = "", what: str = "rank") -> int:
    """Return ``rank`` if ``1 <= rank <= max_rank``; otherwise raise ValueError."""
    if not 1 <= rank <= max_rank:
        prefix = f"{context}: " if context else ""
        reason = f"{what}={rank} is outside [1, {max_rank}] (the maximum for this shape)"
        raise InfeasibleRankError(prefix + reason, reason)
    return rank


def _energy_curve(s) -> np.ndarray:
    """Cumulative kept energy e[k] = sum_{i<k} s_i^2 summed over blocks, e[0] = 0."""
    s2 = np.square(np.atleast_2d(np.asarray(s, dtype=np.float64)))
    return np.concatenate([[0.0], np.cumsum(s2.sum(axis=0))])


def rank_for_energy(s, energy: float, norm: float | None = None) -> int:
    """Smallest k >= 1 with ``sum_{i<=k} s_i^2 >= energy * sum_i s_i^2`` (s descending).

    With ``norm`` (a partial spectrum), the total energy is ``norm**2``; if the partial
    spectrum cannot reach the target, ``len(s) + 1`` is returned so the caller can grow it.
    """
    curve = _energy_curve(s)
    total = curve[-1] if norm is None else max(norm ** 2, curve[-1])
    k = int(np.searchsorted(curve, energy * total, side="left"))
    return max(1, k)


def tail_errors(s, norm: float | None = None) -> np.ndarray:
    """``err[k] = sqrt(||A||_F^2 - sum_{i<=k} s_i^2)`` for k = 0..L, the truncation error.

    Computed from the tail sums (no cancellation) when the spectrum is complete; when
    ``norm`` exceeds the spectrum's energy (a partial spectrum), the missing energy is
    added to every tail.
    """
    s2 = np.square(np.atleast_2d(np.asarray(s, dtype=np.float64))).sum(axis=0)
    tails = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    missing = 0.0 if norm is None else max(norm ** 2 - tails[0], 0.0)
    return np.sqrt(tails + missing)


def rank_for_tol(s, tol: float, norm: float | None = None) -> int:
    """Smallest k >= 1 with truncation error ``<= tol * ||A||_F``."""
    errors = tail_errors(s, norm)
    total = errors[0] if norm is None else norm
    ok = np.nonzero(errors <= tol * total)[0]
    return max(1, int(ok[0])) if ok.size else errors.size


def largest_rank_within(params_of_rank: Callable[[int], int], budget: float, max_rank: int, context="") -> int:
    """Largest k in [1, max_rank] with ``params_of_rank(k) <= budget``.

    ``params_of_rank`` must be non-decreasing. Raises ValueError when even k = 1 is over.
    """
    if params_of_rank(1) > budget:
        prefix = f"{context}: " if context else ""
        reason = (f"even rank 1 needs {params_of_rank(1)} parameters, more than the budget of {budget:.0f}; "
                  f"pass a larger ratio= or use another method")
        raise InfeasibleRankError(prefix + reason, reason)
    low, high = 1, max_rank
    while low < high:
        mid = (low + high + 1) // 2
        if params_of_rank(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def vbmf_rank(s, shape) -> int:
    """Rank chosen by analytic empirical VBMF (Nakajima, Sugiyama, Babacan, Tomioka 2013).

    ``s``: singular values (descending) of one matrix of ``shape`` (m, n); the noise
    variance is estimated by minimizing the empirical VB free energy over its bounded
    interval, then components above the VB threshold are kept. Returns at least 1.
    """
    s = np.asarray(s, dtype=np.float64)
    small, large = sorted(int(d) for d in shape)
    alpha = small / large
    s = s[:small]
    if s.size < 2 or s[0] <= 0:
        return 1
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0
    h_cap = s.size
    upper = (np.sum(s ** 2) + residual) / (small * large)
    eh_ub = int(min(math.ceil(small / (1 + alpha)) - 1, h_cap)) - 1
    eh_ub = min(max(eh_ub, 0), s.size - 2)
    lower = max(s[eh_ub + 1] ** 2 / (large * x_bar), np.mean(s[eh_ub + 1:] ** 2) / large)
    if not lower < upper:
        lower = upper * 1e-6
    result = minimize_scalar(lambda v: _vb_free_energy(v, small, large, s, residual, x_bar),
                             bounds=(lower, upper), method="bounded")
    threshold = math.sqrt(large * result.x * x_bar)
    return max(1, int(np.sum(s > threshold)))


def _vb_free_energy(sigma2, small, large, s, residual, x_bar):
    alpha = small / large
    x = s ** 2 / (large * sigma2)
    above, below = x[x > x_bar], x[x <= x_bar]
    shifted = above - (1 + alpha)
    tau = 0.5 * (shifted + np.sqrt(np.maximum(shifted ** 2 - 4 * alpha, 0.0)))
    value = np.sum(below - np.log(below))
    value += np.sum(above - tau) + np.sum(np.log((tau + 1) / above)) + alpha * np.sum(np.log(tau / alpha + 1))
    return value + residual / (large * sigma2) + (small - s.size) * math.log(sigma2)


def select_rank(spec: RankSpec, s, *, max_rank: int, params_of_rank: Callable[[int], int] | None = None,
                dense_params: int | None = None, norm: float | None = None, matrix_shape=None,
                context: str = "") -> int:
    """Resolve a RankSpec against a spectrum ``s`` ((L,) or (g, L), descending).

    ``params_of_rank`` and ``dense_params`` serve ``ratio=``; ``matrix_shape`` serves
    ``rank='vbmf'`` (each block's (m, n)); ``norm`` is ``||A||_F`` when ``s`` is partial.
    """
    if spec.kind == "rank":
        return check_rank(spec.value, max_rank, context)
    if spec.kind == "energy":
        return min(rank_for_energy(s, spec.value, norm), max_rank)
    if spec.kind == "tol":
        return min(rank_for_tol(s, spec.value, norm), max_rank)
    if spec.kind == "ratio":
        return largest_rank_within(params_of_rank, spec.value * dense_params, max_rank, context)
    if spec.kind == "vbmf":
        blocks = np.atleast_2d(np.asarray(s, dtype=np.float64))
        return min(max(vbmf_rank(row, matrix_shape) for row in blocks), max_rank)
    raise ValueError(f"unknown rank specification {spec}")
