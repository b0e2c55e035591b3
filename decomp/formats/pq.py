"""Product-quantized format: codebooks + integer codes (Gong et al. 2014, Stock et al. 2020).

Size accounting (:func:`pq_size_bits`, used by REFERENCES.md's Stock et al. sizes):
codes cost ``ceil(log2 k)`` bits each, codebook entries ``codebook_bits`` (16 = fp16 by
default) bits each; the dense reference is fp32. MB in Stock et al. are MiB (2**20 bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .._backend import in_kind_of, to_torch
from .base import MeasuredFactorization


def code_bits_for(n_centroids: int) -> int:
    """Bits of one code: ``ceil(log2 k)`` (0 for k = 1)."""
    return max(0, math.ceil(math.log2(n_centroids))) if n_centroids > 1 else 0


def code_dtype(n_centroids: int, numpy: bool = False):
    """The smallest unsigned integer dtype that holds codes ``0 .. k-1``."""
    for bits, tdt, ndt in ((8, torch.uint8, np.uint8), (16, torch.uint16, np.uint16), (32, torch.uint32, np.uint32)):
        if n_centroids <= 1 << bits:
            return ndt if numpy else tdt
    raise ValueError(f"n_centroids={n_centroids} needs more than 32-bit codes")


def pq_size_bits(shape, block_size: int, n_centroids: int, *, code_bits: int | None = None,
                 codebook_bits: int = 16, shared_codebook: bool = True, pad: bool = False) -> int:
    """Storage in bits of a product-quantized weight of ``shape`` (codes + codebooks).

    ``shape`` is ``(rows, *rest)``; the row length ``prod(rest)`` is cut into blocks of
    ``block_size`` (rounded up when ``pad``). Codes take ``code_bits`` bits each
    (default ``ceil(log2 n_centroids)``), codebooks ``n_books * k * block_size`` entries of
    ``codebook_bits`` bits, ``n_books`` = 1 if shared else the number of sub-spaces.
    Bias and other parameters are not included.
    """
    rows, row_length = int(shape[0]), math.prod(int(s) for s in shape[1:])
    if row_length % block_size and not pad:
        raise ValueError(f"block_size={block_size} does not divide the row length {row_length} of shape "
                         f"{tuple(shape)}; pass pad=True or a divisor")
    n_sub = -(-row_length // block_size)
    bits = code_bits_for(n_centroids) if code_bits is None else int(code_bits)
    n_books = 1 if shared_codebook else n_sub
    return rows * n_sub * bits + n_books * n_centroids * block_size * codebook_bits


def pq_decode(codebooks: torch.Tensor, codes: torch.Tensor, row_length: int | None = None) -> torch.Tensor:
    """The matrix ``(rows, row_length)`` of torch ``codebooks (n_books, k, d)`` and ``codes (rows, n_sub)``.

    Row ``r`` is the concatenation over sub-spaces ``j`` of ``codebooks[b(j), codes[r, j]]``
    with ``b(j) = 0`` (one shared codebook) or ``j``; the zero padding beyond ``row_length``
    (default: none, ``n_sub * d``) is cropped. Differentiable w.r.t. the codebooks.
    """
    codes = codes.to(device=codebooks.device).long()
    rows, n_sub = codes.shape
    if codebooks.shape[0] == 1:
        blocks = codebooks[0][codes]
    else:
        blocks = codebooks[torch.arange(n_sub, device=codes.device)[None, :], codes]
    flat = blocks.reshape(rows, -1)
    return flat if row_length is None else flat[:, :row_length]


class CodeAccounting:
    """What every product-quantized object derives from ``n_centroids`` and ``codes (rows, n_sub)``:
    the factor object below and the PQ layers share these, so the counting exists once."""

    @property
    def rank(self) -> int:
        return self.n_centroids

    @property
    def code_bits(self) -> int:
        return code_bits_for(self.n_centroids)

    @property
    def n_sub(self) -> int:
        """Sub-vectors (sub-spaces) per row."""
        return int(self.codes.shape[1])

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8


@dataclass(repr=False)
class ProductQuantized(CodeAccounting, MeasuredFactorization):
    """Product-quantized weight: ``codebooks (n_books, k, d)`` and integer ``codes (rows, n_sub)``.

    Row ``r`` of ``W.reshape(rows, -1)`` is decoded by :func:`pq_decode`; rows are cropped
    to the original length when they were zero-padded. ``codes`` use the smallest
    unsigned dtype holding ``k - 1``. ``rank`` is the number of centroids k.
    ``num_params`` counts stored numbers (codebook entries + codes); the storage in bits
    is ``size_bits`` (:func:`pq_size_bits`: codes ``code_bits = ceil(log2 k)`` bits,
    codebook entries ``codebook_bits``), and ``compression_ratio`` compares it with fp32
    storage. ``error`` is the measured ``||W - to_tensor()||_F`` (no certified bound:
    ``error_bound`` is None); ``history`` the k-means objective after every assignment step.
    """

    codebooks: object
    codes: object
    shape: tuple
    block_size: int
    codebook_bits: int = 16
    history: list = field(default_factory=list)
    shared_codebook: bool = True

    @property
    def n_centroids(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def row_length(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def num_params(self) -> int:
        """Stored numbers: codebook entries + codes."""
        return math.prod(self.codebooks.shape) + math.prod(self.codes.shape)

    @property
    def size_bits(self) -> int:
        """Storage in bits (:func:`pq_size_bits`)."""
        return pq_size_bits(self.shape, self.block_size, self.n_centroids, codebook_bits=self.codebook_bits,
                            shared_codebook=self.shared_codebook, pad=True)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits (codes and codebooks) per weight of the dense array."""
        return self.size_bits / self.dense_params

    @property
    def compression_ratio(self) -> float:
        """fp32 dense bits / ``size_bits``."""
        return 32 * self.dense_params / self.size_bits

    def to_tensor(self):
        dense = pq_decode(to_torch(self.codebooks), to_torch(self.codes), self.row_length).reshape(self.shape)
        return in_kind_of(dense, self.codebooks)

    def _repr_fields(self):
        return dict(shape=self.shape, block_size=self.block_size, n_centroids=self.n_centroids,
                    codebooks="shared" if self.shared_codebook else "per sub-space",
                    size_bytes=round(self.size_bytes), compression_ratio=round(self.compression_ratio, 2))


@dataclass(repr=False)
class WeightedPQFactors(ProductQuantized):
    """Data-aware product quantization (:func:`decomp.data_aware.weighted_pq`), float64 torch.

    The codebooks and codes of :class:`ProductQuantized`; errors are on the OUTPUTS of the
    calibration data and MEASURED (``error_bound`` is None): ``error`` the output error
    ``sqrt(sum tr(E G E^T))``, never above ``plain_error`` (the plain PQ's, the start);
    ``norm = ||W X^T||_F``; ``history`` the weighted objective per assignment step
    (non-increasing); ``fit`` is ``"data-aware"`` or ``"plain"`` (which one was kept).
    """

    plain_error: float = 0.0
    fit: str = "plain"

    def _repr_fields(self):
        return {**super()._repr_fields(), "fit": self.fit}
