"""Factor objects: the results of decompositions.

Every factorization implements one small protocol:

* ``shape``        shape of the approximated array (batch dimensions included);
* ``rank``         the rank(s) kept (int, or a tuple per mode / per bond);
* ``num_params``   number of stored numbers needed to apply the factorization;
* ``error_bound``  a certified upper bound on ``||A - to_tensor()||_F``, or None where
                   the method has no such guarantee;
* ``norm``         ``||A||_F`` of the input, so ``relative_error_bound`` can be formed;
* ``to_tensor()``  the reconstruction, the same array kind (numpy / torch) and dtype as
                   the input.

Factors are stored in the caller's array kind and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._backend import to_torch


def _in_kind_of(result, like):
    """The torch ``result`` in the array kind, dtype and device of ``like``."""
    if isinstance(like, np.ndarray):
        return result.detach().cpu().numpy().astype(like.dtype, copy=False)
    return result.to(device=like.device, dtype=like.dtype)


class Factorization:
    """Base class of all factor objects (see module docstring for the protocol)."""

    shape: tuple
    error_bound: float | None
    norm: float

    @property
    def num_params(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_tensor(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dense_params(self) -> int:
        """Number of entries of the dense array."""
        return math.prod(self.shape)

    @property
    def compression(self) -> float:
        """dense_params / num_params (> 1 means smaller than dense)."""
        return self.dense_params / self.num_params

    @property
    def relative_error_bound(self) -> float | None:
        """error_bound / ||A||_F, or None without a certified bound."""
        if self.error_bound is None:
            return None
        return self.error_bound / self.norm if self.norm > 0 else 0.0

    def relative_error(self, reference) -> float:
        """Measured ``||reference - to_tensor()||_F / ||reference||_F`` (float64)."""
        ref = to_torch(reference).double()
        approx = to_torch(self.to_tensor()).double().to(ref.device)
        denom = float(ref.norm())
        return float((ref - approx).norm()) / denom if denom > 0 else float((approx).norm())


@dataclass(repr=False)
class SVDFactors(Factorization):
    """Truncated SVD ``A ~= U diag(S) Vh``.

    Shapes: ``U (*batch, m, k)``, ``S (*batch, k)``, ``Vh (*batch, k, n)``; a batch
    dimension holds independent blocks (e.g. groups of a grouped conv) that share the
    rank ``k``. ``num_params = batch * k * (m + n)``: ``S`` is absorbed into the two
    factor matrices when applied as layers. ``singular_values`` is the full spectrum
    (descending, ``(*batch, min(m, n))``) as computed, for analysis.
    """

    U: object
    S: object
    Vh: object
    error_bound: float | None
    norm: float
    singular_values: np.ndarray | None = None
    method: str = "exact"
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.shape = tuple(self.U.shape[:-1]) + (self.Vh.shape[-1],)

    @property
    def rank(self) -> int:
        return int(self.S.shape[-1])

    @property
    def num_params(self) -> int:
        batch = math.prod(self.shape[:-2])
        return batch * self.rank * (self.shape[-2] + self.shape[-1])

    def to_tensor(self):
        return (self.U * self.S[..., None, :]) @ self.Vh

    def balanced_factors(self):
        """``(A, B)`` with ``A = U sqrt(S)`` (m x k) and ``B = sqrt(S) Vh`` (k x n)."""
        root = self.S ** 0.5
        return self.U * root[..., None, :], root[..., :, None] * self.Vh

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"SVDFactors(shape={self.shape}, rank={self.rank}, num_params={self.num_params}, "
                f"error_bound={bound}, method={self.method!r})")


def _split_for_reconstruction(shape):
    """Two groups of modes with balanced products (keeps the Khatri-Rao halves small)."""
    groups, sizes = ([], []), [1, 1]
    for m in sorted(range(len(shape)), key=lambda m: -shape[m]):
        g = 0 if sizes[0] <= sizes[1] else 1
        groups[g].append(m)
        sizes[g] *= shape[m]
    return sorted(groups[0]), sorted(groups[1])


def _khatri_rao(mats):
    out = mats[0]
    for M in mats[1:]:
        out = (out[:, None, :] * M[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_reconstruct(weights, factors):
    """``sum_r w_r a^(1)_r ⊗ ... ⊗ a^(N)_r`` for torch ``weights (R,)``, ``factors[n] (I_n, R)``.

    Splits the modes into two balanced groups and multiplies their Khatri-Rao products,
    so memory stays at ``(sqrt(prod I) * R)`` scale instead of ``prod(I) * R``.
    """
    shape = tuple(int(F.shape[0]) for F in factors)
    left, right = _split_for_reconstruction(shape)
    if not right:
        left, right = left[:1], left[1:]
    KL = _khatri_rao([factors[m] for m in left]) * weights
    KR = _khatri_rao([factors[m] for m in right])
    full = (KL @ KR.T).reshape([shape[m] for m in left + right])
    order = left + right
    return full.permute([order.index(m) for m in range(len(shape))]).contiguous()


@dataclass(repr=False)
class CPFactors(Factorization):
    """CP / CANDECOMP-PARAFAC ``A ~= sum_r weights[r] factors[0][:, r] ⊗ ... ⊗ factors[N-1][:, r]``.

    Shapes: ``weights (R,)``, ``factors[n] (I_n, R)`` with unit-norm columns; for a conv
    kernel ``(out, in, kh, kw)`` the factors are ``(out, R), (in, R), (kh, R), (kw, R)``.
    ``num_params = R * sum(I_n)``: the weights are absorbed into one factor when applied
    as layers. ``error_bound`` is ``||A - Â||_F`` computed exactly a posteriori (float64)
    from the reconstruction: a certified value of this fit, not an a-priori bound.
    ``info``: ALS diagnostics (iterations, converged, per-sweep relative errors,
    degeneracy detected, ridge used, ...; see :func:`decomp.cp.cp`).
    """

    weights: object
    factors: list
    error_bound: float | None
    norm: float
    info: dict = field(default_factory=dict)
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.shape = tuple(int(F.shape[0]) for F in self.factors)

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_params(self) -> int:
        return self.rank * sum(self.shape)

    @property
    def diagnostics(self) -> dict:
        """Alias of ``info``."""
        return self.info

    def to_tensor(self):
        result = cp_reconstruct(to_torch(self.weights), [to_torch(F) for F in self.factors])
        return _in_kind_of(result, self.weights)

    def absorbed_factors(self):
        """The factors with the weights multiplied into the first one (what a layer stores)."""
        first = self.factors[0] * self.weights[None, :]
        return [first] + list(self.factors[1:])

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"CPFactors(shape={self.shape}, rank={self.rank}, num_params={self.num_params}, "
                f"error_bound={bound})")


# --- Tucker and tensor-train factors (decomp/tucker.py, decomp/tt.py) -------------------------

def mode_product(tensor, matrix, mode: int):
    """``tensor ×_mode matrix`` for torch tensors: ``matrix (J, I_mode)`` replaces axis ``mode``."""
    moved = tensor.movedim(mode, 0)
    rest = moved.shape[1:]
    out = matrix @ moved.reshape(moved.shape[0], -1)
    return out.reshape((matrix.shape[0],) + tuple(rest)).movedim(0, mode)


@dataclass(repr=False)
class TuckerFactors(Factorization):
    """(Partial) Tucker ``A ~= core ×_{n in modes} factors[i]`` (``factors[i]`` for ``modes[i]``).

    Shapes: ``factors[i] (I_n, R_n)`` with orthonormal columns, one per decomposed mode
    ``n = modes[i]``; ``core`` has ``R_n`` on decomposed modes and the full size ``I_m``
    on the others (Tucker-2 of a conv kernel ``(out, in, kh, kw)`` with ``modes=(0, 1)``:
    ``core (R_out, R_in, kh, kw)``). ``rank`` is the tuple of ``R_n`` in ``modes`` order.
    ``num_params = core.numel + sum_i I_n R_n``. ``error_bound`` is the HOSVD bound
    ``sqrt(sum_n sum_{i>R_n} s_i^(n)^2)`` over the spectra of the ORIGINAL tensor's mode
    unfoldings (``mode_spectra``, aligned with ``modes``), valid for HOSVD, ST-HOSVD and
    HOOI started from ST-HOSVD (see :func:`decomp.tucker.tucker`).
    """

    core: object
    factors: list
    modes: tuple
    error_bound: float | None
    norm: float
    mode_spectra: list | None = None
    method: str = "hooi"
    info: dict = field(default_factory=dict)
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
        return math.prod(self.core.shape) + sum(math.prod(U.shape) for U in self.factors)

    def to_tensor(self):
        result = to_torch(self.core)
        for n, U in zip(self.modes, self.factors):
            result = mode_product(result, to_torch(U), n)
        return _in_kind_of(result, self.core)

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"TuckerFactors(shape={self.shape}, modes={self.modes}, rank={self.rank}, "
                f"num_params={self.num_params}, error_bound={bound}, method={self.method!r})")


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


class _TrainOfCores(Factorization):
    """What every tensor train shares: ``rank`` = all bond ranks, ``num_params`` = core sizes."""

    cores: list

    @property
    def rank(self) -> tuple:
        return (int(self.cores[0].shape[0]),) + tuple(int(c.shape[-1]) for c in self.cores)

    @property
    def num_params(self) -> int:
        return sum(math.prod(c.shape) for c in self.cores)


@dataclass(repr=False)
class TTFactors(_TrainOfCores):
    """Tensor train ``A[i_1, ..., i_d] ~= G_1[:, i_1, :] G_2[:, i_2, :] ... G_d[:, i_d, :]``.

    Shapes: ``cores[k] (r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``; ``rank`` is the
    tuple of all ``d + 1`` TT ranks ``(1, r_1, ..., r_{d-1}, 1)``;
    ``num_params = sum_k r_{k-1} n_k r_k``. ``error_bound = sqrt(sum_k eps_k^2)`` over the
    truncations actually made (Oseledets 2011), see :func:`decomp.tt.tt`.
    """

    cores: list
    error_bound: float | None
    norm: float
    method: str = "tt-svd"
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.cores = list(self.cores)
        _check_tt_chain("TTFactors", self.cores, 3)
        self.shape = tuple(int(c.shape[1]) for c in self.cores)


    def to_tensor(self):
        result = tt_contract([to_torch(c) for c in self.cores]).reshape(self.shape)
        return _in_kind_of(result, self.cores[0])

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"TTFactors(shape={self.shape}, rank={self.rank}, num_params={self.num_params}, "
                f"error_bound={bound})")


@dataclass(repr=False)
class TTMatrixFactors(_TrainOfCores):
    """TT-matrix (Novikov et al. 2015) of a matrix ``W (out, in)`` (torch ``Linear.weight`` layout).

    ``W[(i_1..i_d), (j_1..j_d)] ~= G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]`` with row index
    ``i`` split as ``out_shape = (m_1, ..., m_d)`` and column index ``j`` as
    ``in_shape = (n_1, ..., n_d)`` (row-major, first factor most significant).
    Shapes: ``cores[k] (r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``; ``shape = (prod m, prod n)``;
    ``rank = (1, r_1, ..., r_{d-1}, 1)``; ``num_params = sum_k r_{k-1} m_k n_k r_k``.
    ``error_bound`` as for :class:`TTFactors`, on the matrix's Frobenius norm.
    """

    cores: list
    error_bound: float | None
    norm: float
    method: str = "tt-svd"
    shape: tuple = field(init=False)

    def __post_init__(self):
        self.cores = list(self.cores)
        _check_tt_chain("TTMatrixFactors", self.cores, 4)
        self.shape = (math.prod(self.out_shape), math.prod(self.in_shape))

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
        return _in_kind_of(result, self.cores[0])

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"TTMatrixFactors(out_shape={self.out_shape}, in_shape={self.in_shape}, rank={self.rank}, "
                f"num_params={self.num_params}, error_bound={bound})")


# --------------------------------------------------------------------------- PQ / structured
# (product quantization: decomp/pq.py; Toeplitz / circulant / LDR: decomp/structured.py)

@dataclass(repr=False)
class ProductQuantized(Factorization):
    """Product-quantized weight: ``codebooks (n_books, k, d)`` and integer ``codes (rows, n_sub)``.

    Row ``r`` of ``W.reshape(rows, -1)`` is the concatenation over sub-spaces ``j`` of
    ``codebooks[b(j), codes[r, j]]`` with ``b(j) = 0`` (shared codebook) or ``j``; rows are
    cropped to the original length when they were zero-padded. ``codes`` use the smallest
    unsigned dtype holding ``k - 1``. ``rank`` is the number of centroids k.
    ``num_params`` counts stored numbers (codebook entries + codes); the storage in bits
    is ``size_bits`` (codes ``code_bits = ceil(log2 k)`` bits, codebook entries
    ``codebook_bits``), and ``compression_ratio`` compares it with fp32 storage.
    ``error_bound`` is the measured ``||W - to_tensor()||_F``; ``history`` the k-means
    objective after every assignment step.
    """

    codebooks: object
    codes: object
    shape: tuple
    block_size: int
    error_bound: float | None
    norm: float
    codebook_bits: int = 16
    history: list = field(default_factory=list)
    shared_codebook: bool = True

    @property
    def n_centroids(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def rank(self) -> int:
        return self.n_centroids

    @property
    def code_bits(self) -> int:
        k = self.n_centroids
        return max(0, math.ceil(math.log2(k))) if k > 1 else 0

    @property
    def row_length(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def n_sub(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_params(self) -> int:
        return math.prod(self.codebooks.shape) + math.prod(self.codes.shape)

    @property
    def size_bits(self) -> int:
        return math.prod(self.codes.shape) * self.code_bits + math.prod(self.codebooks.shape) * self.codebook_bits

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8

    @property
    def bits_per_weight(self) -> float:
        """Storage bits (codes and codebooks) per weight of the dense array."""
        return self.size_bits / self.dense_params

    @property
    def compression_ratio(self) -> float:
        """fp32 dense bits / ``size_bits``."""
        return 32 * self.dense_params / self.size_bits

    def to_tensor(self):
        C = to_torch(self.codebooks)
        codes = to_torch(self.codes).to(device=C.device).long()
        rows, n_sub, d = self.shape[0], self.n_sub, self.block_size
        blocks = C[0][codes] if C.shape[0] == 1 else C[_arange(n_sub, C.device)[None, :], codes]
        dense = blocks.reshape(rows, n_sub * d)[:, :self.row_length].reshape(self.shape)
        return _in_kind_of(dense, self.codebooks)

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"ProductQuantized(shape={self.shape}, block_size={self.block_size}, n_centroids={self.n_centroids}, "
                f"codebooks={'shared' if self.shared_codebook else 'per sub-space'}, size_bytes={self.size_bytes:.0f}, "
                f"compression_ratio={self.compression_ratio:.2f}, error_bound={bound})")


def _arange(n, device):
    import torch
    return torch.arange(n, device=device)


@dataclass(repr=False)
class ToeplitzFactors(Factorization):
    """Toeplitz matrix ``T[i, j] = diagonals[i - j + n - 1]`` of shape ``(m, n)``.

    ``num_params = m + n - 1``. ``error_bound`` is the exact residual of the projection
    ``||W - T||_F`` (the Frobenius-nearest Toeplitz matrix). ``rank`` is None (not a
    rank-truncated method; a Toeplitz matrix has displacement rank <= 2).
    """

    diagonals: object
    shape: tuple
    error_bound: float | None
    norm: float
    rank: object = None

    @property
    def num_params(self) -> int:
        return int(self.diagonals.shape[-1])

    def to_tensor(self):
        from .structured import toeplitz_index
        t = to_torch(self.diagonals)
        return _in_kind_of(t[toeplitz_index(*self.shape, device=t.device)], self.diagonals)

    def __repr__(self):
        return f"ToeplitzFactors(shape={self.shape}, num_params={self.num_params}, error_bound={self.error_bound:.4g})"


@dataclass(repr=False)
class CirculantFactors(Factorization):
    """Block-circulant matrix: ``(m, n)`` is the top-left corner of a grid of ``b x b``
    circulant blocks, block ``(I, J)`` being ``C_IJ[i, j] = blocks[I, J, (i - j) mod b]``.

    ``blocks (n_out, n_in, b)`` with ``n_out = ceil(m / b)``, ``n_in = ceil(n / b)``; one
    block ``b = max(m, n)`` (the default) is a single circulant cropped to ``(m, n)``
    (Cheng et al. 2015). ``error_bound`` is the exact projection residual.
    """

    blocks: object
    shape: tuple
    error_bound: float | None
    norm: float
    rank: object = None

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[-1])

    @property
    def num_params(self) -> int:
        return math.prod(self.blocks.shape)

    def to_tensor(self):
        from .structured import circulant_index
        c = to_torch(self.blocks).reshape(-1)
        return _in_kind_of(c[circulant_index(*self.shape, self.block_size, device=c.device)], self.blocks)

    def __repr__(self):
        return (f"CirculantFactors(shape={self.shape}, block_size={self.block_size}, num_params={self.num_params}, "
                f"error_bound={self.error_bound:.4g})")


@dataclass(repr=False)
class LDRFactors(Factorization):
    """Toeplitz-like low displacement rank matrix (Sindhwani et al. 2015), size ``N = max(m, n)``.

    ``M = 1/2 * sum_i Z_1(G[i]) @ Z_{-1}(J H[i])`` (``Z_f(v)`` the f-circulant with first
    column v, J the reversal), the unique solution of ``Z_1 M - M Z_{-1} = G^T H``;
    the ``(m, n)`` approximation is ``M[:m, :n]``. ``G, H (r, N)``, ``num_params = 2 r N``.
    ``error_bound`` is the measured residual ``||W - M[:m, :n]||_F`` (exact, a
    posteriori); ``displacement_error`` the truncated displacement tail and
    ``operator_bound = displacement_error / (2 sin(pi / 2N))``, an a-priori certificate
    (loose by up to ~N/pi).
    """

    G: object
    H: object
    shape: tuple
    error_bound: float | None
    norm: float
    displacement_error: float = 0.0
    displacement_singular_values: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.G.shape[0])

    @property
    def size(self) -> int:
        return int(self.G.shape[1])

    @property
    def num_params(self) -> int:
        return math.prod(self.G.shape) + math.prod(self.H.shape)

    @property
    def operator_bound(self) -> float:
        return self.displacement_error / (2 * math.sin(math.pi / (2 * self.size)))

    def to_tensor(self):
        from .structured import ldr_dense
        m, n = self.shape
        return _in_kind_of(ldr_dense(to_torch(self.G), to_torch(self.H), n_cols=n)[:m], self.G)

    def __repr__(self):
        return (f"LDRFactors(shape={self.shape}, rank={self.rank}, num_params={self.num_params}, "
                f"error_bound={self.error_bound:.4g})")


def tucker_block_to_tensor(core, factors):
    """``core ×_1 factors[0] ×_2 ... ×_N factors[N-1]`` for torch tensors (``factors[n] (I_n, L_n)``)."""
    import torch

    X = core
    # expand the modes that grow least first, so the intermediates stay small
    for n in sorted(range(core.ndim), key=lambda m: factors[m].shape[0] / max(factors[m].shape[1], 1)):
        X = torch.tensordot(factors[n], X, dims=([1], [n])).movedim(0, n)
    return X


@dataclass(repr=False)
class BlockTermFactors(Factorization):
    """Block-term decomposition ``A ~= sum_b core_b ×_1 U_b^(1) ×_2 ... ×_N U_b^(N)``.

    A sum of Tucker blocks (rank-(L_1, ..., L_N) terms; De Lathauwer 2008, Wang & Cheng
    2016). ``blocks[b] = (core_b (L_b1, ..., L_bN), [U_b^(n) (I_n, L_bn)])``; the factors
    have orthonormal columns as computed. ``rank`` is the tuple of the blocks'
    multilinear ranks (one tuple per block); ``n_blocks`` their number.
    ``num_params = sum_b (prod_n L_bn + sum_n I_n L_bn)``. ``error_bound`` is
    ``||A - Â||_F`` computed exactly a posteriori (float64) from the explicit residual:
    a certified value of this fit, not an a-priori bound. ``info``: iterations,
    converged, ``errors`` (the relative error after initialisation and after each sweep,
    non-increasing).
    """

    blocks: list
    error_bound: float | None
    norm: float
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
        return sum(math.prod(core.shape) + sum(int(U.shape[0] * U.shape[1]) for U in Us)
                   for core, Us in self.blocks)

    def to_tensor(self):
        total = None
        for core, Us in self.blocks:
            block = tucker_block_to_tensor(to_torch(core), [to_torch(U) for U in Us])
            total = block if total is None else total + block
        return _in_kind_of(total, self.blocks[0][0])

    def __repr__(self):
        bound = "None" if self.error_bound is None else f"{self.error_bound:.4g}"
        return (f"BlockTermFactors(shape={self.shape}, n_blocks={self.n_blocks}, rank={self.rank}, "
                f"num_params={self.num_params}, error_bound={bound})")
