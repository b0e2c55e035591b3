"""Asymmetric (sequential) low-rank fit: match the ORIGINAL outputs from the inputs a layer really gets.

In a partly compressed network a layer no longer sees the original inputs ``X (N, n)`` but
``X' (N, n)`` (the same samples after the already compressed upstream layers). The rank-k
weight that best reproduces the original outputs is

    W' = argmin_{rank W' <= k} ||W X^T - W' X'^T||_F                                   (1)

(Zhang et al. 2016, "asymmetric reconstruction"; it includes SVD-LLM's truncation-aware
whitening, X' = X, and its sequential update of the kept factors as special cases). With
``G' = X'^T X' = L L^T`` and the cross-Gram ``C = X'^T X``:

    ||W X^T - W' X'^T||_F^2 = ||W X^T||_F^2 - ||M||_F^2 + ||W' L - M||_F^2,   M = W C^T L^{-T}

so the optimum of (1) is the truncated SVD ``M_k = U_k S_k V_k^T`` mapped back,
``W' = M_k L^{-1}``, with factors ``A = U_k S_k^{1/2}`` (m, k) and ``B = S_k^{1/2} V_k^T L^{-1}``
(k, n), and the certified error

    ||W X^T - W' X'^T||_F^2 = ||W X^T||_F^2 - ||M||_F^2 + sum_{i>k} s_i(M)^2.          (2)

The first two terms are the error of the best unconstrained refit (what no rank can remove);
the last is the truncation. Both factors are optimal jointly, so re-fitting either one by
least squares afterwards cannot lower (1): the closed form is already the "truncation-aware
refit of the kept factors". When ``G'`` is singular a jitter ``d`` is added (``L L^T = G' + d I``,
a ridge fit); then (2) is the ridge objective at ``W'`` and so an upper bound of the true error.
The error measured a posteriori from the statistics is reported as well.

Means (layers with a bias): pass the centered statistics and correct the bias by
``b' = b + W mean(X) - W' mean(X')`` (see :func:`centered_statistics`); the error is then the
whole output error, bias included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .formats.base import Factorization
from .rank import check_rank
from .formats.svd import svd_num_params
from .whitened import leading_svd, whitening_factor


@dataclass(repr=False)
class AsymmetricFit(Factorization):
    """``W' = A @ B`` minimizing ``||W X^T - W' X'^T||_F`` at ``rank`` (see module docstring).

    Errors are on the OUTPUTS: ``error_bound`` is the certified value of (2) (exact when
    ``jitter == 0``, an upper bound otherwise); ``error`` the same error measured from the
    statistics; ``norm`` ``||W X^T||_F``; ``refit_floor`` ``sqrt(||W X^T||^2 - ||M||^2)``, the
    error of the best full-rank refit; ``singular_values`` the spectrum of ``M``.
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    error_bound: float
    error: float
    norm: float
    refit_floor: float
    singular_values: np.ndarray
    jitter: float = 0.0
    whitening: str = "cholesky"

    @property
    def shape(self) -> tuple:
        return (self.A.shape[0], self.B.shape[1])

    @property
    def num_params(self) -> int:
        return svd_num_params(self.shape[0], self.shape[1], self.rank)

    def to_tensor(self) -> torch.Tensor:
        return self.A @ self.B

    def _repr_fields(self) -> dict:
        return dict(shape=self.shape, rank=self.rank, jitter=self.jitter)


def sequential_objective(W, W_approx, gram, gram_in, cross) -> float:
    """``||W X^T - W' X'^T||_F`` from ``gram = X^T X``, ``gram_in = X'^T X'``, ``cross = X'^T X`` (float64)."""
    W, Wa = W.double(), W_approx.double()
    value = float(((W @ gram) * W).sum() - 2 * ((Wa @ cross) * W).sum() + ((Wa @ gram_in) * Wa).sum())
    return math.sqrt(max(value, 0.0))


def centered_statistics(gram, gram_in, cross, mean, mean_in, count):
    """``(gram, gram_in, cross)`` of the centered rows ``X - mean``, ``X' - mean_in`` (``count`` rows)."""
    return (gram - count * torch.outer(mean, mean), gram_in - count * torch.outer(mean_in, mean_in),
            cross - count * torch.outer(mean_in, mean))


def asymmetric_svd(W, gram, gram_in, cross, rank: int, *, whitening="cholesky", context="") -> AsymmetricFit:
    """The rank-``rank`` optimum of ``||W X^T - W' X'^T||_F`` for ``W (m, n)`` (see module docstring).

    ``gram = X^T X``, ``gram_in = X'^T X'``, ``cross = X'^T X``: ``(n, n)`` float tensors of the
    original inputs ``X`` and the inputs ``X'`` the layer receives (same samples, same order).
    ``rank`` in ``[1, min(m, n)]`` (InfeasibleRankError otherwise). Computed in float64; ``A``, ``B``
    come back in ``W``'s dtype.
    """
    context = context or "asymmetric_svd"
    m, n = W.shape
    check_rank(rank, min(m, n), context=f"{context} (weight of shape {(m, n)})")
    for label, stat in (("gram", gram), ("gram_in", gram_in), ("cross", cross)):
        if tuple(stat.shape) != (n, n):
            raise ValueError(f"{context}: {label} of shape {tuple(stat.shape)} does not match the weight of "
                             f"shape {(m, n)}; expected ({n}, {n})")
    Wd, G, Gi, C = W.detach().double(), gram.double(), gram_in.double(), cross.double().to(W.device)
    G, Gi = G.to(W.device), Gi.to(W.device)
    if float(torch.diagonal(Gi).sum()) <= 0:
        raise ValueError(f"{context}: the layer's inputs were all zero on the calibration data; nothing to fit")
    L, used, jitter = whitening_factor(Gi, whitening=whitening, context=context)
    target = C @ Wd.T                                  # X'^T X W^T  (n, m)
    M = _solve_left(L, used, target).T                 # W C^T L^{-T}  (m, n)
    U, S, Vh = leading_svd(M, rank)                    # U_k, all of M's singular values, V_k^T
    root = S[:rank].sqrt()
    A = U * root
    B = _solve_left(L, used, (root[:, None] * Vh).T, transpose=True).T   # S^{1/2} V^T L^{-1}
    total = float(((Wd @ G) * Wd).sum())
    floor_sq = max(total - float((S ** 2).sum()), 0.0)
    bound = math.sqrt(floor_sq + float((S[rank:] ** 2).sum()))
    measured = sequential_objective(Wd, A @ B, G, Gi, C)
    return AsymmetricFit(A.to(W.dtype), B.to(W.dtype), rank, bound, measured, math.sqrt(max(total, 0.0)),
                         math.sqrt(floor_sq), S.cpu().numpy(), jitter, used)


def _solve_left(L, used, rhs, transpose=False):
    """``L^{-1} rhs`` (``L^{-T} rhs`` with ``transpose``): triangular solves for the Cholesky factor, the
    pseudo-inverse for the eigh square root (which may be singular)."""
    if used == "cholesky":
        return torch.linalg.solve_triangular(L.T if transpose else L, rhs, upper=transpose)
    inverse = torch.linalg.pinv(L)
    return (inverse.T if transpose else inverse) @ rhs


__all__ = ["asymmetric_svd", "AsymmetricFit", "sequential_objective", "centered_statistics"]
