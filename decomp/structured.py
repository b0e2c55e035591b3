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

Error reporting: for toeplitz/circulant ``error_bound`` is the exact projection residual.
For ldr a ``tol=`` bounds the *displacement* error only, not the weight error; the
weight error is amplified by at most ``||L^{-1}|| = 1 / (2 sin(pi / 2N))`` (``L`` is
normal with eigenvalues ``lambda_i - mu_j``), which is reported as ``operator_bound``;
``error_bound`` is the measured residual ``||W - M[:m, :n]||_F`` (a posteriori, exact).

Quality caveat (measured, benchmarks/bench_pq_structured.py): truncating the displacement
is not a best approximation in the weight norm — the inverse operator can amplify the
discarded displacement by up to ~N/pi — and on the trained MNISTNet Linear(3136 -> 128)
the rank-1..16 LDR reconstructions have relative weight errors above 1. Sindhwani et al.
train LDR layers; use :func:`ldr` as an initialization to fine-tune, not as a drop-in
compression of a trained layer (the Toeplitz/circulant projections are at least
Frobenius-optimal in their class).

FFT products (used by the layers): ``Z_1(c) x = irfft(rfft(c) * rfft(x))``;
``Z_{-1}(v) x = D^{-1} Z_1(D v) D x`` with ``D = diag(exp(i pi k / N))``.
"""
from __future__ import annotations

import math

import torch
from scipy.fft import next_fast_len

from ._backend import as_compute_tensor, describe
from .factors import CirculantFactors, LDRFactors, ToeplitzFactors
from .rank import parse_rank_spec, select_rank, tail_errors


# ----------------------------------------------------------------------------- index maps

def toeplitz_index(m: int, n: int, device=None) -> torch.Tensor:
    """``(m, n)`` long tensor: entry (i, j) lies on diagonal ``i - j + n - 1``."""
    i = torch.arange(m, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return i - j + (n - 1)


def circulant_index(m: int, n: int, block_size: int, device=None) -> torch.Tensor:
    """``(m, n)`` long tensor: flat index into ``blocks (n_out, n_in, b)`` of entry (i, j)."""
    b = block_size
    n_in = -(-n // b)
    i = torch.arange(m, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return ((i // b) * n_in + j // b) * b + torch.remainder(i - j, b)


def _class_means(M: torch.Tensor, index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of the entries of ``M`` per class of ``index`` (0 for empty classes)."""
    flat = index.reshape(-1)
    sums = torch.zeros(n_classes, dtype=M.dtype, device=M.device).index_add_(0, flat, M.reshape(-1))
    counts = torch.bincount(flat, minlength=n_classes).to(M.dtype)
    return sums / counts.clamp_min(1)


# ----------------------------------------------------------------------------- projections

def toeplitz(W, *, compute_dtype=None, context: str = "") -> ToeplitzFactors:
    """Frobenius-nearest Toeplitz matrix of ``W (m, n)``: every diagonal replaced by its mean.

    Returns :class:`~decomp.factors.ToeplitzFactors` (``diagonals`` of length ``m + n - 1``,
    ``error_bound`` = the exact residual ``||W - T||_F``).
    """
    context = context or "toeplitz"
    T, kind = as_compute_tensor(W, name=context, ndim=2, compute_dtype=compute_dtype)
    m, n = T.shape
    index = toeplitz_index(m, n, device=T.device)
    diagonals = _class_means(T, index, m + n - 1)
    error = float(torch.linalg.norm(T - diagonals[index]))
    return ToeplitzFactors(kind.restore(diagonals), (m, n), error_bound=error, norm=float(torch.linalg.norm(T)))


def circulant(W, *, block_size: int | None = None, compute_dtype=None, context: str = "") -> CirculantFactors:
    """Frobenius-nearest (block-)circulant matrix of ``W (m, n)`` (see module docstring).

    ``block_size=None`` is ``max(m, n)``: one circulant cropped to ``(m, n)``.
    Returns :class:`~decomp.factors.CirculantFactors` with the exact projection residual.
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
    return CirculantFactors(kind.restore(blocks.reshape(n_out, n_in, b)), (m, n), error_bound=error,
                            norm=float(torch.linalg.norm(T)))


# ----------------------------------------------------------------------------- LDR

def displacement(M: torch.Tensor) -> torch.Tensor:
    """``Z_1 M - M Z_{-1}`` of a square ``M`` (Z_f: down-shift with f in the corner)."""
    shifted_rows = torch.roll(M, 1, dims=0)                   # Z_1 M
    shifted_cols = torch.roll(M, -1, dims=1).clone()          # M Z_{-1}: columns shift left ...
    shifted_cols[:, -1] = -M[:, 0]                            # ... last column is -M[:, 0]
    return shifted_rows - shifted_cols


def _twist(N, dtype, device):
    """``exp(i pi k / N)``, k = 0..N-1 (diagonal of D in Z_{-1}(v) = D^-1 Z_1(Dv) D)."""
    real = torch.float64 if dtype == torch.float64 else torch.float32
    k = torch.arange(N, dtype=real, device=device)
    return torch.polar(torch.ones_like(k), math.pi * k / N)


def ldr_apply(G: torch.Tensor, H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M x`` for ``M = 1/2 sum_i Z_1(G[i]) Z_{-1}(J H[i])`` and ``x (..., N)``, by FFT.

    Cost per vector: one complex FFT, r complex inverse FFTs, r real FFTs and one
    inverse real FFT of length N: O(r N log N).
    """
    N = G.shape[-1]
    eta = _twist(N, x.dtype, x.device)
    Hf = torch.fft.fft(H.flip(-1) * eta, dim=-1)                       # (r, N)
    Xf = torch.fft.fft(x * eta, dim=-1)                                 # (..., N)
    U = (torch.fft.ifft(Xf.unsqueeze(-2) * Hf, dim=-1) * eta.conj()).real   # (..., r, N) = Z_{-1}(J h_i) x
    Gf = torch.fft.rfft(G, dim=-1)                                      # (r, F)
    Yf = (torch.fft.rfft(U, dim=-1) * Gf).sum(-2)
    return 0.5 * torch.fft.irfft(Yf, n=N, dim=-1)


def ldr_dense(G: torch.Tensor, H: torch.Tensor, n_cols: int | None = None) -> torch.Tensor:
    """The dense ``N x N`` matrix of the generators ``G, H (r, N)`` (its first ``n_cols`` columns)."""
    r, N = G.shape
    n_cols = N if n_cols is None else n_cols
    step = max(1, (1 << 22) // max(1, r * N))          # bounds the (chunk, r, N) complex intermediate
    columns = []
    for start in range(0, n_cols, step):
        stop = min(n_cols, start + step)
        eye = torch.zeros(stop - start, N, dtype=G.dtype, device=G.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        columns.append(ldr_apply(G, H, eye))
    return torch.cat(columns).T


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
    Returns :class:`~decomp.factors.LDRFactors` with ``error_bound`` the measured residual.
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
    return LDRFactors(kind.restore(G), kind.restore(H), (m, n), error_bound=error, norm=float(torch.linalg.norm(T)),
                      displacement_error=float(tail_errors(spectrum)[r]), displacement_singular_values=spectrum)


# ----------------------------------------------------------------------------- FFT products

def fft_size(length: int) -> int:
    """A fast real-FFT length >= ``length`` (5-smooth)."""
    return int(next_fast_len(int(length), real=True))


def toeplitz_apply(diagonals: torch.Tensor, x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """``T x`` for the Toeplitz ``T[i, j] = diagonals[i - j + n - 1]`` and ``x (..., n)``.

    ``T`` is embedded in a circulant of size ``L >= m + n - 1`` (no wrap-around), so the
    product is one rfft / irfft pair: O(L log L).
    """
    L = fft_size(m + n - 1)
    pad = diagonals.new_zeros(L - (m + n - 1))
    c = torch.cat([diagonals[n - 1:], pad, diagonals[:n - 1]])         # c[k] = t[k + n - 1], wrapped
    y = torch.fft.irfft(torch.fft.rfft(c) * torch.fft.rfft(x, n=L, dim=-1), n=L, dim=-1)
    return y[..., :m]


def circulant_apply(blocks: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """``C x`` for the block-circulant ``blocks (n_out, n_in, b)`` and ``x (..., n)``."""
    n_out, n_in, b = blocks.shape
    n = x.shape[-1]
    if n != n_in * b:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], n_in * b - n)], dim=-1)
    Xf = torch.fft.rfft(x.reshape(*x.shape[:-1], n_in, b), dim=-1)      # (..., n_in, F)
    Cf = torch.fft.rfft(blocks, dim=-1)                                 # (n_out, n_in, F)
    if n_in == 1:
        Yf = Xf * Cf[:, 0]
    else:                                                               # one complex bmm over frequencies
        lead = Xf.shape[:-2]
        Xb = Xf.reshape(-1, n_in, Xf.shape[-1]).permute(2, 0, 1)        # (F, B, n_in)
        Yf = torch.matmul(Xb, Cf.permute(2, 1, 0)).permute(1, 2, 0).reshape(*lead, n_out, -1)
    y = torch.fft.irfft(Yf, n=b, dim=-1).reshape(*x.shape[:-1], n_out * b)
    return y[..., :m]


__all__ = ["toeplitz", "circulant", "ldr", "displacement", "ldr_apply", "ldr_dense", "toeplitz_apply",
           "circulant_apply", "toeplitz_index", "circulant_index", "fft_size"]
