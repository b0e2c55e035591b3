"""(Partial) Tucker format ``A ~= core ×_{n in modes} U_n``; tensorly's ``TuckerTensor``.

Also the data-aware Tucker-2 of grouped conv kernels (:func:`decomp.data_aware.whitened_tucker2`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._backend import in_kind_of, to_torch
from .._kernels import mode_product
from ._tensorly import check_type, from_backend, measure_against, tensorly, to_backend
from .base import Factorization, MeasuredFactorization


def tucker_params(ranks, shape, modes) -> int:
    """Parameters of a (partial) Tucker of ``shape`` with ranks ``R_n`` on ``modes``: ``core.numel + sum_n I_n R_n``."""
    core = list(shape)
    for n, r in zip(modes, ranks):
        core[n] = r
    return math.prod(core) + sum(shape[n] * r for n, r in zip(modes, ranks))


@dataclass(repr=False)
class TuckerFactors(Factorization):
    """(Partial) Tucker ``A ~= core ×_{n in modes} factors[i]`` (``factors[i]`` for ``modes[i]``).

    Shapes: ``factors[i] (I_n, R_n)`` with orthonormal columns as computed, one per
    decomposed mode ``n = modes[i]``; ``core`` has ``R_n`` on decomposed modes and the full
    size ``I_m`` on the others (Tucker-2 of a conv kernel ``(out, in, kh, kw)`` with
    ``modes=(0, 1)``: ``core (R_out, R_in, kh, kw)``). ``rank`` is the tuple of ``R_n`` in
    ``modes`` order. ``num_params`` is :func:`tucker_params`. ``error_bound`` is the HOSVD
    bound ``sqrt(sum_n sum_{i>R_n} s_i^(n)^2)`` over the spectra of the ORIGINAL tensor's
    mode unfoldings (``mode_spectra``, aligned with ``modes``), valid for HOSVD, ST-HOSVD
    and HOOI started from ST-HOSVD (see :func:`decomp.tucker.tucker`); ``error`` the
    measured ``||A - Â||_F``; ``algorithm`` the variant that computed it.
    """

    core: object
    factors: list
    modes: tuple
    error_bound: float | None
    norm: float | None
    mode_spectra: list | None = None
    algorithm: str = "hooi"
    info: dict = field(default_factory=dict)
    error: float | None = None
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.modes = tuple(int(n) for n in self.modes)
        self.factors = list(self.factors)
        if len(self.modes) != len(self.factors):
            raise ValueError(f"TuckerFactors: {len(self.factors)} factors for modes {self.modes}")
        shape = list(self.core.shape)
        for n, U in zip(self.modes, self.factors):
            if U.ndim != 2 or U.shape[1] != shape[n]:
                raise ValueError(f"TuckerFactors: factor for mode {n} has shape {tuple(U.shape)}, "
                                 f"expected (I_{n}, {shape[n]}) to match the core {tuple(self.core.shape)}")
            shape[n] = int(U.shape[0])
        self.shape = tuple(int(s) for s in shape)

    @property
    def rank(self) -> tuple:
        return tuple(int(U.shape[1]) for U in self.factors)

    @property
    def num_params(self) -> int:
        return tucker_params(self.rank, self.shape, self.modes)

    def to_tensor(self):
        result = to_torch(self.core)
        for n, U in zip(self.modes, self.factors):
            result = mode_product(result, to_torch(U), n)
        return in_kind_of(result, self.core)

    def keeping_modes(self, modes) -> "TuckerFactors":
        """The same tensor as a Tucker on ``modes`` only: the other modes' factors multiplied into the core.

        E.g. a full Tucker of a conv kernel (tensorly's ``tucker``) becomes its Tucker-2
        ``keeping_modes((0, 1))``. ``error``, ``error_bound`` and ``norm`` carry over (the
        reconstruction is unchanged); ValueError for a mode that is not decomposed.
        """
        modes = tuple(int(n) for n in modes)
        missing = [n for n in modes if n not in self.modes]
        if missing:
            raise ValueError(f"TuckerFactors.keeping_modes: modes {missing} are not decomposed (modes={self.modes})")
        core = to_torch(self.core)
        for n, U in zip(self.modes, self.factors):
            if n not in modes:
                core = mode_product(core, to_torch(U), n)
        kept = [self.factors[self.modes.index(n)] for n in modes]
        return TuckerFactors(in_kind_of(core, self.core), kept, modes, error_bound=self.error_bound, norm=self.norm,
                             mode_spectra=None, algorithm=self.algorithm, info=dict(self.info), error=self.error)

    def full_factors(self) -> list:
        """One factor per mode of ``shape``: the decomposed modes' factors, identities elsewhere."""
        like = to_torch(self.core)
        by_mode = dict(zip(self.modes, (to_torch(U) for U in self.factors)))
        full = [by_mode[n] if n in by_mode else torch.eye(size, dtype=like.dtype, device=like.device)
                for n, size in enumerate(self.shape)]
        return [in_kind_of(U, self.core) for U in full]

    def to_tensorly(self):
        """A ``tensorly.tucker_tensor.TuckerTensor`` (identity factors on the modes left whole)."""
        tl = tensorly()
        return tl.tucker_tensor.TuckerTensor((to_backend(self.core), [to_backend(U) for U in self.full_factors()]))

    @classmethod
    def from_tensorly(cls, tucker_tensor, *, modes=None, reference=None) -> "TuckerFactors":
        """A ``TuckerTensor`` (or ``(core, factors)`` pair) as TuckerFactors; arrays kept as they are.

        ``modes``: the modes the factors belong to (default: one factor per mode, and the
        factors that are exactly identity matrices are dropped, so :meth:`to_tensorly` of a
        partial Tucker round-trips to the same partial Tucker). With ``reference`` (the array
        it approximates) ``error`` and ``norm`` are measured, otherwise both are None;
        ``error_bound`` is None (no spectra are known).
        """
        check_type(tucker_tensor, (tensorly().tucker_tensor.TuckerTensor, tuple, list),
                   "TuckerTensor or (core, factors)")
        core, factors = tucker_tensor
        factors = [from_backend(U) for U in factors]
        if modes is None:
            kept = [n for n, U in enumerate(factors) if not _is_identity(U)]
            modes, factors = tuple(kept), [factors[n] for n in kept]
        made = cls(from_backend(core), factors, tuple(modes), error_bound=None, norm=None, algorithm="imported")
        return measure_against(made, reference)

    def _repr_fields(self):
        return dict(shape=self.shape, modes=self.modes, rank=self.rank, algorithm=self.algorithm)


def _is_identity(U) -> bool:
    U = to_torch(U)
    return U.ndim == 2 and U.shape[0] == U.shape[1] and bool(torch.equal(U, torch.eye(U.shape[0], dtype=U.dtype,
                                                                                        device=U.device)))


def grouped_tucker2_matrices(U_out, core, U_in):
    """``(g, N, C*prod(k))`` weights of per-group Tucker-2 kernels (torch).

    ``U_out (g, N, R_out)``, ``core (g, R_out, R_in, *k)``, ``U_in (g, C, R_in)``; the columns
    are ordered ``(channel, *kernel offsets)`` (the im2col layout).
    """
    g, r_out, r_in = core.shape[:3]
    kk = math.prod(core.shape[3:])
    inner = torch.einsum("gosk,gcs->gock", core.reshape(g, r_out, r_in, kk), U_in)     # (g, R_out, C, kk)
    return U_out @ inner.reshape(g, r_out, -1)


@dataclass(repr=False)
class WhitenedTucker2Factors(MeasuredFactorization):
    """Data-aware Tucker-2 of grouped conv kernels ``(g, N, C, *k)`` (:func:`decomp.data_aware.whitened_tucker2`).

    Per group ``i``: ``K_i ~= core[i] ×_0 U_out[i] ×_1 U_in[i]`` with ``U_out (g, N, R_out)``,
    ``U_in (g, C, R_in)`` (orthonormal columns), ``core (g, R_out, R_in, *k)``; all float64 torch.
    Errors are on the OUTPUTS of the calibration data and MEASURED (no certified optimum
    exists, so ``error_bound`` is None): ``error = sqrt(sum_g tr(E_g G_g E_g^T))``, never
    above ``plain_error`` (the plain Tucker-2's, the start); ``norm = sqrt(sum_g tr(W_g G_g W_g^T))``;
    ``weight_error``/``weight_norm`` the Frobenius weight error and norm; ``fit`` is
    ``"data-aware"`` or ``"plain"`` (which one was kept).
    """

    U_out: torch.Tensor
    U_in: torch.Tensor
    core: torch.Tensor
    plain_error: float
    weight_error: float
    weight_norm: float
    fit: str
    shape: tuple = field(init=False)

    def __post_init__(self):
        g, N = self.U_out.shape[:2]
        self.shape = (int(g), int(N), int(self.U_in.shape[1])) + tuple(int(s) for s in self.core.shape[3:])

    @property
    def rank(self) -> tuple:
        return (int(self.U_out.shape[2]), int(self.U_in.shape[2]))

    @property
    def num_params(self) -> int:
        return self.shape[0] * tucker_params(self.rank, self.shape[1:], (0, 1))

    def to_tensor(self):
        return grouped_tucker2_matrices(self.U_out, self.core, self.U_in).reshape(self.shape)

    def _repr_fields(self):
        return dict(shape=self.shape, rank=self.rank, fit=self.fit)
