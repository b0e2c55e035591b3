"""Block-term format: a sum of Tucker blocks ``A ~= sum_b core_b ×_1 U_b^(1) ×_2 ... ×_N U_b^(N)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._backend import in_kind_of, to_torch
from .._kernels import multi_mode_product
from .base import MeasuredFactorization


def btd_num_params(shape, ranks) -> int:
    """Parameters of blocks of multilinear ranks ``ranks`` (one tuple per block) of ``shape``:
    ``sum_b (prod_n L_bn + sum_n I_n L_bn)``."""
    return sum(math.prod(r) + sum(int(I) * int(L) for I, L in zip(shape, r)) for r in ranks)


@dataclass(repr=False)
class BlockTermFactors(MeasuredFactorization):
    """Block-term decomposition ``A ~= sum_b core_b ×_1 U_b^(1) ×_2 ... ×_N U_b^(N)``.

    A sum of Tucker blocks (rank-(L_1, ..., L_N) terms; De Lathauwer 2008, Wang & Cheng
    2016). ``blocks[b] = (core_b (L_b1, ..., L_bN), [U_b^(n) (I_n, L_bn)])``; the factors
    have orthonormal columns as computed. ``rank`` is the tuple of the blocks'
    multilinear ranks (one tuple per block); ``n_blocks`` their number. ``num_params`` is
    :func:`btd_num_params`. ``error`` is ``||A - Â||_F`` measured exactly a posteriori
    (float64) from the explicit residual; there is no certified bound (``error_bound`` is
    None). ``info``: iterations, converged, ``errors`` (the relative error after
    initialisation and after each sweep, non-increasing).
    """

    blocks: list
    info: dict = field(default_factory=dict)
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.shape = tuple(int(U.shape[0]) for U in self.blocks[0][1])

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def rank(self) -> tuple:
        return tuple(tuple(int(d) for d in core.shape) for core, _ in self.blocks)

    @property
    def num_params(self) -> int:
        return btd_num_params(self.shape, self.rank)

    def to_tensor(self):
        total = None
        for core, Us in self.blocks:
            block = multi_mode_product(to_torch(core), [to_torch(U) for U in Us])
            total = block if total is None else total + block
        return in_kind_of(total, self.blocks[0][0])

    def _repr_fields(self):
        return dict(shape=self.shape, n_blocks=self.n_blocks, rank=self.rank)
