"""Structured matrix formats: Toeplitz, (block-)circulant, Toeplitz-like low displacement rank.

Index maps, dense reconstruction and the FFT products the layers use live here with the
factor objects; the projections and the LDR fit are in :mod:`decomp.structured`.

FFT products: ``Z_1(c) x = irfft(rfft(c) * rfft(x))``;
``Z_{-1}(v) x = D^{-1} Z_1(D v) D x`` with ``D = diag(exp(i pi k / N))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.fft import next_fast_len

from .._backend import in_kind_of, to_torch
from .base import Factorization, MeasuredFactorization


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


# ----------------------------------------------------------------------------- LDR

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


# ----------------------------------------------------------------------------- factor objects

class _GatheredMatrix(MeasuredFactorization):
    """A structured ``(m, n)`` matrix whose entries are gathered from its parameters by an index map."""

    def _parameters(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _index(self, device):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return math.prod(self._parameters().shape)

    def to_tensor(self):
        values = to_torch(self._parameters())
        return in_kind_of(values.reshape(-1)[self._index(values.device)], self._parameters())


@dataclass(repr=False)
class ToeplitzFactors(_GatheredMatrix):
    """Toeplitz matrix ``T[i, j] = diagonals[i - j + n - 1]`` of shape ``(m, n)``.

    ``num_params = m + n - 1``. ``error`` is the exact residual of the projection
    ``||W - T||_F`` (the Frobenius-nearest Toeplitz matrix), measured; ``error_bound`` is
    None. ``rank`` is None (not a rank-truncated method; a Toeplitz matrix has
    displacement rank <= 2).
    """

    diagonals: object
    shape: tuple
    rank: object = None

    def _parameters(self):
        return self.diagonals

    def _index(self, device):
        return toeplitz_index(*self.shape, device=device)

    def _repr_fields(self):
        return dict(shape=self.shape)


@dataclass(repr=False)
class CirculantFactors(_GatheredMatrix):
    """Block-circulant matrix: ``(m, n)`` is the top-left corner of a grid of ``b x b``
    circulant blocks, block ``(I, J)`` being ``C_IJ[i, j] = blocks[I, J, (i - j) mod b]``.

    ``blocks (n_out, n_in, b)`` with ``n_out = ceil(m / b)``, ``n_in = ceil(n / b)``; one
    block ``b = max(m, n)`` (the default) is a single circulant cropped to ``(m, n)``
    (Cheng et al. 2015). ``num_params = blocks.numel``. ``error`` is the exact projection
    residual, measured; ``error_bound`` is None.
    """

    blocks: object
    shape: tuple
    rank: object = None

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[-1])

    def _parameters(self):
        return self.blocks

    def _index(self, device):
        return circulant_index(*self.shape, self.block_size, device=device)

    def _repr_fields(self):
        return dict(shape=self.shape, block_size=self.block_size)


@dataclass(repr=False)
class LDRFactors(Factorization):
    """Toeplitz-like low displacement rank matrix (Sindhwani et al. 2015), size ``N = max(m, n)``.

    ``M = 1/2 * sum_i Z_1(G[i]) @ Z_{-1}(J H[i])`` (``Z_f(v)`` the f-circulant with first
    column v, J the reversal), the unique solution of ``Z_1 M - M Z_{-1} = G^T H``;
    the ``(m, n)`` approximation is ``M[:m, :n]``. ``G, H (r, N)``, ``num_params = 2 r N``.
    ``error`` is the measured residual ``||W - M[:m, :n]||_F`` (exact, a posteriori);
    ``displacement_error`` the truncated displacement tail and ``error_bound`` =
    ``operator_bound = displacement_error / (2 sin(pi / 2N))``, the certified a-priori
    bound (loose by up to ~N/pi).
    """

    G: object
    H: object
    shape: tuple
    error: float | None = field(kw_only=True)
    norm: float | None = field(kw_only=True)
    displacement_error: float = 0.0
    displacement_singular_values: np.ndarray | None = None

    @property
    def rank(self) -> int:
        """The displacement rank r (rows of the generators)."""
        return int(self.G.shape[0])

    @property
    def size(self) -> int:
        """``N = max(m, n)``, the side of the square LDR matrix."""
        return int(self.G.shape[1])

    @property
    def num_params(self) -> int:
        return 2 * self.rank * self.size  # G and H, (r, N) each

    @property
    def operator_bound(self) -> float:
        """``displacement_error * ||L^{-1}||`` with ``||L^{-1}|| = 1 / (2 sin(pi / 2N))``."""
        return self.displacement_error / (2 * math.sin(math.pi / (2 * self.size)))

    @property
    def error_bound(self) -> float:
        """The certified bound ``operator_bound`` on ``||W - M[:m, :n]||_F``."""
        return self.operator_bound

    def to_tensor(self):
        m, n = self.shape
        return in_kind_of(ldr_dense(to_torch(self.G), to_torch(self.H), n_cols=n)[:m], self.G)


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
    if n_in == 1:   # the block column selected before the FFT: ONNX has no indexing of complex tensors
        Yf = Xf * torch.fft.rfft(blocks[:, 0], dim=-1)
    else:                                                               # one complex bmm over frequencies
        Cf = torch.fft.rfft(blocks, dim=-1)                             # (n_out, n_in, F)
        lead = Xf.shape[:-2]
        Xb = Xf.reshape(-1, n_in, Xf.shape[-1]).permute(2, 0, 1)        # (F, B, n_in)
        Yf = torch.matmul(Xb, Cf.permute(2, 1, 0)).permute(1, 2, 0).reshape(*lead, n_out, -1)
    y = torch.fft.irfft(Yf, n=b, dim=-1).reshape(*x.shape[:-1], n_out * b)
    return y[..., :m]
