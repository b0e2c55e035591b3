"""Structured matrices: Toeplitz and circulant projections, Toeplitz-like low displacement rank.

References: Sindhwani, Sainath, Kumar 2015 (structured transforms / low displacement
rank), Cheng et al. 2015 (circulant projections), Ding et al. 2017 (block-circulant).

* :func:`toeplitz` — the Frobenius-nearest Toeplitz matrix of any ``m x n`` ``W``: the
  Toeplitz matrices form a linear subspace spanned by the (disjoint) diagonals, so the
  orthogonal projection replaces every diagonal by its mean. ``m + n - 1`` numbers.
* :func:`circulant` — the Frobenius-nearest (block-)circulant matrix: ``W`` is the top-left
  corner of a grid of ``b x b`` circulant blocks and every block's wrapped diagonal
  ``(i - j) mod b`` is replaced by its mean over the entries of ``W`` it covers
  (classes that cover no entry of ``W`` are 0). The default ``block_size = max(m, n)`` is
  one circulant cropped to ``(m, n)`` (Cheng et al.): ``max(m, n)`` numbers. A smaller
  ``block_size`` gives block-circulant with ``ceil(m/b) * ceil(n/b) * b`` numbers
  (``W`` is conceptually zero-padded to whole blocks; padding never enters the averages).
* :func:`ldr` — Toeplitz-like low displacement rank: with ``Z_f`` the f-unit-circulant
  shift, the displacement ``L(M) = Z_1 M - M Z_{-1}`` is invertible (the spectra of
  ``Z_1`` and ``Z_{-1}`` are disjoint), a Toeplitz matrix has ``rank L(M) <= 2``, and
  ``L(M) = G^T H`` (``G, H (r, N)``) gives back

      M = 1/2 * sum_{i<r} Z_1(g_i) @ Z_{-1}(J h_i)

  (``Z_f(v)`` the f-circulant with first column v, ``J`` the reversal; Pan 2001,
  Sindhwani et al. 2015 Thm. 3.2). The displacement of ``W`` is truncated to rank r by
  SVD (``rank=`` / ``energy=`` / ``tol=`` / ``ratio=`` act on the displacement spectrum)
  and ``M`` is rebuilt from the generators. A rectangular ``W`` is completed to
  ``N x N``, ``N = max(m, n)``, by the Toeplitz projection's diagonals (missing diagonals
  0), so rectangular Toeplitz matrices stay exactly representable at r = 2; the
  approximation is ``M[:m, :n]``.

Error reporting: for toeplitz/circulant ``error`` is the exact projection residual
(measured; no ``error_bound``). For ldr a ``tol=`` bounds the *displacement* error only,
not the weight error; the weight error is amplified by at most
``||L^{-1}|| = 1 / (2 sin(pi / 2N))`` (``L`` is normal with eigenvalues ``lambda_i - mu_j``),
which gives the certified ``error_bound`` (= ``operator_bound``); ``error`` is the
measured residual ``||W - M[:m, :n]||_F`` (a posteriori, exact).

Quality caveat (measured, benchmarks/bench_pq_structured.py): truncating the displacement
is not a best approximation in the weight norm — the inverse operator can amplify the
discarded displacement by up to ~N/pi — and on trained layers the low-rank LDR
reconstructions can have relative weight errors above 1. Sindhwani et al.
train LDR layers; use :func:`ldr` as an initialization to fine-tune, not as a drop-in
compression of a trained layer (the Toeplitz/circulant projections are at least
Frobenius-optimal in their class).

The factor objects, index maps, dense reconstruction and the FFT products the layers use
are in :mod:`decomp.formats.structured`.
"""
from __future__ import annotations

import torch

from ._backend import as_compute_tensor, describe
from .formats.structured import (CirculantFactors, LDRFactors, ToeplitzFactors, circulant_index, ldr_dense,
                                 toeplitz_index)
from .rank import parse_rank_spec, select_rank, tail_errors


# ----------------------------------------------------------------------------- projections

def _class_means(M: torch.Tensor, index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of the entries of ``M`` per class of ``index`` (0 for empty classes)."""
    flat = index.reshape(-1)
    sums = torch.zeros(n_classes, dtype=M.dtype, device=M.device).index_add_(0, flat, M.reshape(-1))
    counts = torch.bincount(flat, minlength=n_classes).to(M.dtype)
    return sums / counts.clamp_min(1)


def toeplitz(W, *, compute_dtype=None, context: str = "") -> ToeplitzFactors:
    """Frobenius-nearest Toeplitz matrix of ``W (m, n)``: every diagonal replaced by its mean.

    Returns :class:`~decomp.formats.structured.ToeplitzFactors` (``diagonals`` of length
    ``m + n - 1``, ``error`` = the exact residual ``||W - T||_F``).
    """
    context = context or "toeplitz"
    T, kind = as_compute_tensor(W, name=context, ndim=2, compute_dtype=compute_dtype)
    m, n = T.shape
    index = toeplitz_index(m, n, device=T.device)
    diagonals = _class_means(T, index, m + n - 1)
    error = float(torch.linalg.norm(T - diagonals[index]))
    return ToeplitzFactors(kind.restore(diagonals), (m, n), error=error, norm=float(torch.linalg.norm(T)))


def circulant(W, *, block_size: int | None = None, compute_dtype=None, context: str = "") -> CirculantFactors:
    """Frobenius-nearest (block-)circulant matrix of ``W (m, n)`` (see module docstring).

    ``block_size=None`` is ``max(m, n)``: one circulant cropped to ``(m, n)``.
    Returns :class:`~decomp.formats.structured.CirculantFactors` with ``error`` the exact projection residual.
    """
    context = context or "circulant"
    T, kind = as_compute_tensor(W, name=context, ndim=2, compute_dtype=compute_dtype)
    m, n = T.shape
    b = max(m, n) if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"{context}: block_size={block_size!r} must be a positive int")
    n_out, n_in = -(-m // b), -(-n // b)
    index = circulant_index(m, n, b, device=T.device)
    blocks = _class_means(T, index, n_out * n_in * b)
    error = float(torch.linalg.norm(T - blocks[index]))
    return CirculantFactors(kind.restore(blocks.reshape(n_out, n_in, b)), (m, n), error=error,
                            norm=float(torch.linalg.norm(T)))


# ----------------------------------------------------------------------------- LDR

def displacement(M: torch.Tensor) -> torch.Tensor:
    """``Z_1 M - M Z_{-1}`` of a square ``M`` (Z_f: down-shift with f in the corner)."""
    shifted_rows = torch.roll(M, 1, dims=0)                   # Z_1 M
    shifted_cols = torch.roll(M, -1, dims=1).clone()          # M Z_{-1}: columns shift left ...
    shifted_cols[:, -1] = -M[:, 0]                            # ... last column is -M[:, 0]
    return shifted_rows - shifted_cols


def _displacement_svd(D: torch.Tensor):
    """Thin SVD of a displacement, exploiting the sparsity left by a Toeplitz completion.

    For a wide ``W`` the completed matrix's displacement is nonzero only in rows ``0..m``
    and the last column, for a tall one only in columns ``0..n-1``, the last column and
    row 0; the SVD is then taken in that small column (row) space — exact, and only the
    nonzero part of the spectrum is returned. Square / dense cases: plain SVD.
    """
    N = D.shape[0]
    rows = (D[:, :-1] != 0).any(1).nonzero().flatten()
    cols = (D[1:, :] != 0).any(0).nonzero().flatten()
    if rows.numel() + 1 <= N // 2:
        basis = torch.zeros(N, rows.numel() + 1, dtype=D.dtype, device=D.device)
        basis[rows, torch.arange(rows.numel())] = 1
        basis[:, -1] = D[:, -1]
        Q = torch.linalg.qr(basis).Q
        Ub, S, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)
        return Q @ Ub, S, Vh
    if cols.numel() + 1 <= N // 2:
        basis = torch.zeros(N, cols.numel() + 1, dtype=D.dtype, device=D.device)
        basis[cols, torch.arange(cols.numel())] = 1
        basis[:, -1] = D[0, :]
        P = torch.linalg.qr(basis).Q
        U, S, Vbh = torch.linalg.svd(D @ P, full_matrices=False)
        return U, S, Vbh @ P.T
    return torch.linalg.svd(D, full_matrices=False)


def _toeplitz_completion(T: torch.Tensor) -> torch.Tensor:
    """``W`` in the top-left of an ``N x N`` matrix, the rest from W's Toeplitz projection."""
    m, n = T.shape
    N = max(m, n)
    if m == n:
        return T
    diagonals = _class_means(T, toeplitz_index(m, n, device=T.device), m + n - 1)
    # offsets i - j in [-(N-1), N-1]; W's projection covers [-(n-1), m-1]
    extended = torch.zeros(2 * N - 1, dtype=T.dtype, device=T.device)
    extended[N - n:N - n + m + n - 1] = diagonals
    full = extended[toeplitz_index(N, N, device=T.device)].clone()
    full[:m, :n] = T
    return full


def ldr(W, rank=None, *, energy=None, tol=None, ratio=None, compute_dtype=None, context: str = "") -> LDRFactors:
    """Toeplitz-like low displacement rank approximation of ``W (m, n)`` (module docstring).

    Exactly one of ``rank`` (displacement rank r), ``energy``, ``tol`` (relative error
    of the *displacement*, not of W), ``ratio`` (``2 r N <= ratio * m n``) picks r.
    Returns :class:`~decomp.formats.structured.LDRFactors` with ``error`` the measured residual and
    ``error_bound`` the certified operator bound.
    """
    context = context or "ldr"
    spec = parse_rank_spec(rank, energy, tol, ratio, allowed=("rank", "energy", "tol", "ratio"), context=context)
    T, kind = as_compute_tensor(W, name=context, ndim=2, compute_dtype=compute_dtype)
    m, n = T.shape
    N = max(m, n)
    full = _toeplitz_completion(T)
    D = displacement(full)
    U, S, Vh = _displacement_svd(D)
    spectrum = S.cpu().numpy()
    r = select_rank(spec, spectrum, max_rank=N, params_of_rank=lambda k: 2 * k * N, dense_params=m * n,
                    context=f"{context} ({describe(W)})")
    if r > S.shape[0]:                       # more than the compact SVD's components: full SVD
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        spectrum = S.cpu().numpy()
    root = S[:r].sqrt()
    G = (U[:, :r] * root).T.contiguous()
    H = (root[:, None] * Vh[:r]).contiguous()
    approx = ldr_dense(G, H, n_cols=n)[:m]
    error = float(torch.linalg.norm(T - approx))
    return LDRFactors(kind.restore(G), kind.restore(H), (m, n), error=error, norm=float(torch.linalg.norm(T)),
                      displacement_error=float(tail_errors(spectrum)[r]), displacement_singular_values=spectrum)


__all__ = ["toeplitz", "circulant", "ldr", "displacement"]
