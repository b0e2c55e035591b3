"""Tensor-train formats: TT (``TTFactors``, tensorly's ``TTTensor``) and TT-matrix
(``TTMatrixFactors``, tensorly's ``TTMatrix``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._backend import in_kind_of, to_torch
from ._tensorly import check_type, from_backend, measure_against, tensorly, to_backend
from .base import Factorization


def _full_ranks(ranks, d):
    if isinstance(ranks, (int, np.integer)):
        return (1,) + (int(ranks),) * (d - 1) + (1,)
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) == d - 1:
        return (1,) + ranks + (1,)
    if len(ranks) == d + 1:
        return ranks
    raise ValueError(f"expected {d - 1} bond ranks (or {d + 1} with the boundary 1s), got {ranks}")


def tt_num_params(dims, ranks) -> int:
    """``sum_k r_{k-1} n_k r_k`` for bond ranks ``ranks`` (an int for every bond, d-1 bonds, or all d+1 ranks)."""
    ranks = _full_ranks(ranks, len(dims))
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(dims))


def tt_matrix_num_params(in_shape, out_shape, ranks) -> int:
    """TT-matrix parameters ``sum_k r_{k-1} m_k n_k r_k`` (Novikov et al. 2015).

    ``ranks``: an int (every bond), the ``d - 1`` bond ranks or all ``d + 1`` ranks.
    E.g. VGG FC6 ``in_shape=(2, 7, 8, 8, 7, 4)``, ``out_shape=(4,) * 6``, rank 8: 7,872.
    """
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape {tuple(in_shape)} and out_shape {tuple(out_shape)} need the same length")
    return tt_num_params([m * n for m, n in zip(out_shape, in_shape)], ranks)


def _check_tt_chain(name, cores, core_ndim):
    if not cores:
        raise ValueError(f"{name}: needs at least one core")
    for k, core in enumerate(cores):
        if core.ndim != core_ndim:
            raise ValueError(f"{name}: core {k} has shape {tuple(core.shape)}, expected {core_ndim} dimensions")
        if k and cores[k - 1].shape[-1] != core.shape[0]:
            raise ValueError(f"{name}: core {k - 1} ends with rank {cores[k - 1].shape[-1]} but core {k} "
                             f"starts with rank {core.shape[0]}")
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise ValueError(f"{name}: the boundary ranks must be 1, got {cores[0].shape[0]} and {cores[-1].shape[-1]}")


def tt_contract(cores):
    """Contract torch TT cores ``(r_{k-1}, *mode_k, r_k)`` into ``(prod of all mode entries,)`` order."""
    result = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        result = (result @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    return result.reshape(-1)


@dataclass(repr=False)
class _TrainOfCores(Factorization):
    """What every tensor train shares: the fields, ``rank`` = all bond ranks, ``num_params`` = core sizes,
    the tensorly conversions."""

    cores: list
    error_bound: float | None = field(kw_only=True)
    norm: float | None = field(kw_only=True)
    algorithm: str = field(default="tt-svd", kw_only=True)
    error: float | None = field(default=None, kw_only=True)
    shape: tuple = field(init=False)
    _CORE_NDIM = 3
    _TENSORLY_CLASS = ("tt_tensor", "TTTensor")

    def __post_init__(self):
        self.cores = list(self.cores)
        _check_tt_chain(type(self).__name__, self.cores, self._CORE_NDIM)
        self.shape = self._shape_of_cores()

    @property
    def rank(self) -> tuple:
        return (int(self.cores[0].shape[0]),) + tuple(int(c.shape[-1]) for c in self.cores)

    @property
    def num_params(self) -> int:
        return sum(math.prod(c.shape) for c in self.cores)

    def to_tensorly(self):
        """The same train as tensorly's ``TTTensor`` / ``TTMatrix`` (the cores' layouts agree)."""
        return self._tensorly_class()([to_backend(c) for c in self.cores])

    @classmethod
    def _tensorly_class(cls):
        module, name = cls._TENSORLY_CLASS
        return getattr(getattr(tensorly(), module), name)

    @classmethod
    def from_tensorly(cls, train, *, reference=None):
        """A tensorly ``TTTensor`` / ``TTMatrix`` (or a list of cores) as this format; arrays kept as they are.

        With ``reference`` (the array it approximates) ``error`` and ``norm`` are measured,
        otherwise both are None; ``error_bound`` is None.
        """
        check_type(train, (cls._tensorly_class(), tuple, list), f"{cls._TENSORLY_CLASS[1]} or list of cores")
        cores = [from_backend(c) for c in train]
        return measure_against(cls(cores, error_bound=None, norm=None, algorithm="imported"), reference)

    def _repr_fields(self):
        return dict(shape=self.shape, rank=self.rank, algorithm=self.algorithm)


@dataclass(repr=False)
class TTFactors(_TrainOfCores):
    """Tensor train ``A[i_1, ..., i_d] ~= G_1[:, i_1, :] G_2[:, i_2, :] ... G_d[:, i_d, :]``.

    Shapes: ``cores[k] (r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``; ``rank`` is the
    tuple of all ``d + 1`` TT ranks ``(1, r_1, ..., r_{d-1}, 1)``;
    ``num_params = sum_k r_{k-1} n_k r_k``. ``error_bound = sqrt(sum_k eps_k^2)`` over the
    truncations actually made (Oseledets 2011), see :func:`decomp.tt.tt`; ``error`` the
    measured error (for TT-SVD the bound is attained), None where unknown (TT rounding).
    """

    def _shape_of_cores(self):
        return tuple(int(c.shape[1]) for c in self.cores)

    def to_tensor(self):
        result = tt_contract([to_torch(c) for c in self.cores]).reshape(self.shape)
        return in_kind_of(result, self.cores[0])


@dataclass(repr=False)
class TTMatrixFactors(_TrainOfCores):
    """TT-matrix (Novikov et al. 2015) of a matrix ``W (out, in)`` (torch ``Linear.weight`` layout).

    ``W[(i_1..i_d), (j_1..j_d)] ~= G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]`` with row index
    ``i`` split as ``out_shape = (m_1, ..., m_d)`` and column index ``j`` as
    ``in_shape = (n_1, ..., n_d)`` (row-major, first factor most significant).
    Shapes: ``cores[k] (r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``; ``shape = (prod m, prod n)``;
    ``rank = (1, r_1, ..., r_{d-1}, 1)``; ``num_params = sum_k r_{k-1} m_k n_k r_k``.
    ``error_bound`` and ``error`` as for :class:`TTFactors`, on the matrix's Frobenius norm.
    """

    _CORE_NDIM = 4
    _TENSORLY_CLASS = ("tt_matrix", "TTMatrix")

    def _shape_of_cores(self):
        return (math.prod(self.out_shape), math.prod(self.in_shape))

    @property
    def out_shape(self) -> tuple:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_shape(self) -> tuple:
        return tuple(int(c.shape[2]) for c in self.cores)

    def to_tensor(self):
        d = len(self.cores)
        full = tt_contract([to_torch(c) for c in self.cores])
        interleaved = [s for pair in zip(self.out_shape, self.in_shape) for s in pair]
        order = list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2))
        result = full.reshape(interleaved).permute(order).reshape(self.shape)
        return in_kind_of(result, self.cores[0])

    def _repr_fields(self):
        return dict(out_shape=self.out_shape, in_shape=self.in_shape, rank=self.rank, algorithm=self.algorithm)
