"""Low-rank matrix format: truncated SVD ``A ~= U diag(S) Vh`` (plain and data-aware)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import Factorization


def svd_num_params(m: int, n: int, rank: int, batch: int = 1) -> int:
    """Parameters of ``batch`` rank-``rank`` factorizations of ``(m, n)`` blocks: ``batch * rank * (m + n)``.

    ``S`` is absorbed into the two factor matrices when applied as layers.
    """
    return batch * rank * (m + n)


@dataclass(repr=False)
class SVDFactors(Factorization):
    """Truncated SVD ``A ~= U diag(S) Vh``.

    Shapes: ``U (*batch, m, k)``, ``S (*batch, k)``, ``Vh (*batch, k, n)``; a batch
    dimension holds independent blocks (e.g. groups of a grouped conv) that share the
    rank ``k``. ``num_params = batch * k * (m + n)`` (:func:`svd_num_params`).
    ``error_bound`` is the Frobenius error of the reconstruction, certified (see
    :func:`decomp.svd.svd`); it is attained (within 1e-3 for the float32 randomized sketch of a
    float32 input), so ``error`` is the same number.
    ``singular_values`` is the full spectrum (descending, ``(*batch, min(m, n))``) as
    computed, for analysis; ``algorithm`` the SVD variant (``"exact"``/``"randomized"``).
    """

    U: object
    S: object
    Vh: object
    error_bound: float | None
    norm: float | None
    singular_values: np.ndarray | None = None
    algorithm: str = "exact"
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.shape = tuple(self.U.shape[:-1]) + (self.Vh.shape[-1],)

    @property
    def error(self) -> float | None:
        """The measured error: the SVD's certified bound is attained (Eckart–Young / a-posteriori; within 1e-3 for a
        float32 randomized sketch)."""
        return self.error_bound

    @property
    def rank(self) -> int:
        return int(self.S.shape[-1])

    @property
    def num_params(self) -> int:
        return svd_num_params(self.shape[-2], self.shape[-1], self.rank, math.prod(self.shape[:-2]))

    def to_tensor(self):
        return (self.U * self.S[..., None, :]) @ self.Vh

    def balanced_factors(self):
        """``(A, B)`` with ``A = U sqrt(S)`` (m x k) and ``B = sqrt(S) Vh`` (k x n)."""
        root = self.S ** 0.5
        return self.U * root[..., None, :], root[..., :, None] * self.Vh

    def _repr_fields(self):
        return dict(shape=self.shape, rank=self.rank, algorithm=self.algorithm)


@dataclass(repr=False)
class WhitenedSVDFactors(SVDFactors):
    """Data-aware truncated SVD ``W' = U diag(S) Vh`` (an exact SVD of ``W'``), see :mod:`decomp.whitened`.

    Inherits ``to_tensor``, ``balanced_factors``, ``num_params`` and ``rank`` from
    :class:`SVDFactors`. Unlike plain SVD, the errors are measured on the OUTPUTS of the
    calibration data ``X``:

    * ``error_bound``   certified ``||(W - W') X^T||_F`` = ``sqrt(sum_{i>k} s_i(W L)^2)``
                        (exact when ``jitter == 0``, an upper bound otherwise);
    * ``norm``          ``||W X^T||_F`` (so ``relative_error_bound`` is the relative OUTPUT error);
    * ``error`` = ``output_error``  ``||(W - W') X^T||_F`` measured a posteriori with the given Gram;
    * ``weight_error``  ``||W - W'||_F``; ``weight_norm`` ``||W||_F``;
    * ``singular_values`` the spectrum of ``W L`` (the output spectrum used for rank selection);
    * ``whitening``     ``"cholesky"`` or ``"eigh"``; ``jitter`` the absolute diagonal shift
                        added to ``G`` (the largest over groups; 0.0 when none was needed).
    """

    output_error: float = 0.0
    weight_error: float = 0.0
    weight_norm: float = 0.0
    whitening: str = "cholesky"
    jitter: float = 0.0

    @property
    def error(self) -> float:
        """The measured OUTPUT error (``output_error``)."""
        return self.output_error

    @property
    def relative_output_error(self) -> float:
        return self.output_error / self.norm if self.norm > 0 else 0.0

    @property
    def relative_weight_error(self) -> float:
        return self.weight_error / self.weight_norm if self.weight_norm > 0 else 0.0

    def _repr_fields(self):
        return dict(shape=self.shape, rank=self.rank, weight_error=round(self.weight_error, 6),
                    whitening=self.whitening, jitter=self.jitter)
