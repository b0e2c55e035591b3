"""CP (CANDECOMP/PARAFAC) format: ``A ~= sum_r w_r a^(1)_r ⊗ ... ⊗ a^(N)_r``; tensorly's ``CPTensor``."""
from __future__ import annotations

from dataclasses import dataclass, field

from .._backend import in_kind_of, to_torch
from .._kernels import balanced_mode_split, khatri_rao
from ._tensorly import check_type, from_backend, measure_against, tensorly, to_backend
from .base import MeasuredFactorization


def cp_num_params(shape, rank: int) -> int:
    """Parameters of a rank-``rank`` CP of ``shape``: ``R * sum(I_n)`` (weights absorbed into one factor)."""
    return rank * sum(int(s) for s in shape)


def cp_reconstruct(weights, factors):
    """``sum_r w_r a^(1)_r ⊗ ... ⊗ a^(N)_r`` for torch ``weights (R,)``, ``factors[n] (I_n, R)``.

    Splits the modes into two balanced groups and multiplies their Khatri-Rao products,
    so memory stays at ``(sqrt(prod I) * R)`` scale instead of ``prod(I) * R``.
    """
    shape = tuple(int(F.shape[0]) for F in factors)
    left, right = balanced_mode_split(shape)
    if not right:
        left, right = left[:1], left[1:]
    KL = khatri_rao([factors[m] for m in left]) * weights
    KR = khatri_rao([factors[m] for m in right])
    full = (KL @ KR.T).reshape([shape[m] for m in left + right])
    order = left + right
    return full.permute([order.index(m) for m in range(len(shape))]).contiguous()


@dataclass(repr=False)
class CPFactors(MeasuredFactorization):
    """CP / CANDECOMP-PARAFAC ``A ~= sum_r weights[r] factors[0][:, r] ⊗ ... ⊗ factors[N-1][:, r]``.

    Shapes: ``weights (R,)``, ``factors[n] (I_n, R)`` with unit-norm columns as computed;
    for a conv kernel ``(out, in, kh, kw)`` the factors are ``(out, R), (in, R), (kh, R), (kw, R)``.
    ``num_params = R * sum(I_n)`` (:func:`cp_num_params`). ``error`` is ``||A - Â||_F``
    measured exactly a posteriori (float64) from the reconstruction; CP has no certified
    bound (no Eckart–Young analogue), so ``error_bound`` is None. ``info``: ALS
    diagnostics (iterations, converged, per-sweep relative errors, degeneracy detected,
    ridge used, ...; see :func:`decomp.cp.cp`).
    """

    weights: object
    factors: list
    info: dict = field(default_factory=dict)
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.factors = list(self.factors)
        self.shape = tuple(int(F.shape[0]) for F in self.factors)

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_params(self) -> int:
        return cp_num_params(self.shape, self.rank)

    @property
    def diagnostics(self) -> dict:
        """Alias of ``info``."""
        return self.info

    def to_tensor(self):
        result = cp_reconstruct(to_torch(self.weights), [to_torch(F) for F in self.factors])
        return in_kind_of(result, self.weights)

    def absorbed_factors(self):
        """The factors with the weights multiplied into the first one (what a layer stores)."""
        first = self.factors[0] * self.weights[None, :]
        return [first] + list(self.factors[1:])

    def to_tensorly(self):
        """The same decomposition as a ``tensorly.cp_tensor.CPTensor`` (tensorly's active backend)."""
        tl = tensorly()
        return tl.cp_tensor.CPTensor((to_backend(self.weights), [to_backend(F) for F in self.factors]))

    @classmethod
    def from_tensorly(cls, cp_tensor, *, reference=None) -> "CPFactors":
        """A ``CPTensor`` (or ``(weights, factors)`` pair) as CPFactors; arrays kept as they are.

        With ``reference`` (the array it approximates) ``error`` and ``norm`` are measured,
        otherwise both are None.
        """
        check_type(cp_tensor, (tensorly().cp_tensor.CPTensor, tuple, list), "CPTensor or (weights, factors)")
        weights, factors = cp_tensor
        return measure_against(cls(from_backend(weights), [from_backend(F) for F in factors], error=None, norm=None),
                               reference)
