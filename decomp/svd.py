"""Truncated SVD, exact or randomized, with rank selection and certified error.

Guarantees (Eckart–Young): for the exact method, ``svd(A, rank=k)`` returns the best
rank-k approximation in Frobenius and spectral norm, and
``error_bound = ||A - A_k||_F = sqrt(sum_{i>k} s_i^2)``.
For the randomized method (Halko, Martinsson, Tropp 2011) the approximation is
``P A`` with ``P`` an orthogonal projector, so its error is known exactly a posteriori:
``error_bound = sqrt(||A - P A||_F^2 + sum_{i>k} s~_i^2)`` (= ``sqrt(||A||_F^2 - sum_{i<=k} s~_i^2)``,
evaluated without cancellation); it exceeds the optimum by a factor
that shrinks quickly with oversampling and power iterations on decaying spectra.
A float32 (or lower) input is sketched in float32 (faster; its small SVD in float64), and its
``error_bound`` is certified for the returned factors (their float32 residual plus its
worst-case rounding, see :func:`svd`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import as_compute_tensor, make_generator, times_power_of_two, unit_scale
from .formats.svd import SVDFactors, svd_num_params
from .rank import check_rank, parse_rank_spec, select_rank, tail_errors

ALGORITHMS = ("exact", "randomized")
_BLOCK_ELEMENTS = 1 << 18  # row blocks of 2 MiB in float64: converted and reduced in cache


def svd(A, rank=None, *, energy=None, tol=None, ratio=None, algorithm="exact", oversample=10, n_iter=4,
        random_state=None, compute_dtype=None, context="") -> SVDFactors:
    """Truncated SVD of a matrix ``A (m, n)`` or of a batch ``A (g, m, n)`` sharing one rank.

    Exactly one of ``rank`` (int or ``"vbmf"``), ``energy``, ``tol``, ``ratio`` picks the
    rank k (see :mod:`decomp.rank`); for a batch, energy and error are summed over
    blocks. ``algorithm="randomized"`` sketches ``k + oversample`` directions with
    ``n_iter`` power iterations, seeded by ``random_state``; for energy/tol it grows the
    sketch until the target is certified. Math runs in ``compute_dtype``: float64 by default,
    except the randomized sketch of an input below float64 (float32, float16, bfloat16), whose
    products and power iterations run in float32 with the small final SVD in float64 (pass
    ``compute_dtype=torch.float64`` for an all-float64 sketch); factors come back in the
    input's kind (numpy/torch) and dtype.

    Returns :class:`~decomp.formats.svd.SVDFactors` with ``U (.., m, k)``, ``S (.., k)``,
    ``Vh (.., k, n)`` and ``error_bound`` >= the Frobenius error of the reconstruction. The
    matrix is scaled by a power of two before any square is formed, so ranks and bounds are
    right for data anywhere in float64's range. For inputs below float64 precision the bound
    holds for the factors as returned, rounded to that dtype: the exact algorithm measures
    their error in float64; the randomized one forms their residual in float32 and adds its
    worst-case rounding (:func:`_returned_error_bound`: within 1e-3 of the error, else it is
    measured in float64 too). ``oversample`` / ``n_iter``: ints >= 0.
    """
    context = context or "svd"
    spec = parse_rank_spec(rank, energy, tol, ratio, context=context)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{context}: algorithm={algorithm!r} is not one of {ALGORITHMS}")
    _check_sketch_options(oversample, n_iter, context)
    T, kind = as_compute_tensor(A, name=context, ndim=(2, 3), compute_dtype=compute_dtype or _sketch_dtype(
        A, algorithm))
    T, exponent, norm = _scaled(T)
    m, n = T.shape[-2:]
    groups = T.shape[0] if T.ndim == 3 else 1
    max_rank = min(m, n)

    def params_of_rank(k):
        return svd_num_params(m, n, k, groups)

    select = dict(max_rank=max_rank, params_of_rank=params_of_rank, dense_params=groups * m * n,
                  matrix_shape=(m, n), context=f"{context} ({_shape_text(A)})")
    if algorithm == "exact":
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
        spectrum = S.cpu().numpy()
        k = select_rank(spec, spectrum, **select)
        bound = float(tail_errors(spectrum)[k])
    else:
        U, S, Vh, k = _randomized_with_spec(T, spec, select, norm, oversample, n_iter, make_generator(random_state))
        spectrum = S.double().cpu().numpy()
        bound = math.nan  # a sketch below float64: measured on the returned factors below instead
        if T.dtype == torch.float64:
            # ||A - P A||_F^2 measured directly (not as ||A||^2 - sum s~^2, which cancels to
            # ~sqrt(eps) * ||A|| when the error is tiny), plus the truncated sketch tail.
            residual = float(torch.linalg.norm(T - U @ (U.transpose(-2, -1) @ T))) ** 2
            bound = (float(tail_errors(spectrum[..., k:])[0]) ** 2 + residual) ** 0.5
    sketch = dict(A=A, T=T, kind=kind, exponent=exponent, norm=norm, spectrum=spectrum, algorithm=algorithm)
    factors = _returned_factors(U, S, Vh, k, bound, **sketch)
    rounded = not (_is_float64(kind) and T.dtype == torch.float64)
    while rounded and spec.kind == "tol" and factors.error_bound > spec.value * factors.norm and k < S.shape[-1]:
        k += 1  # rounding the factors to a lower precision pushed a tol= fit past its target: keep one more
        factors = _returned_factors(U, S, Vh, k, bound, **sketch)
    return factors


def _returned_factors(U, S, Vh, k, bound, *, A, T, kind, exponent, norm, spectrum, algorithm):
    """The rank-``k`` :class:`SVDFactors` in the input's kind, with the bound of the factors as returned."""
    U, S, Vh = U[..., :, :k], S[..., :k], Vh[..., :k, :]
    scale = math.ldexp(1.0, exponent)
    factors = SVDFactors(kind.restore(U), kind.restore(times_power_of_two(S, exponent)), kind.restore(Vh),
                         error_bound=bound * scale, norm=norm * scale, singular_values=spectrum * scale,
                         algorithm=algorithm)
    if not (_is_float64(kind) and T.dtype == torch.float64):  # the bound must hold for the factors as returned
        factors.error_bound = _returned_error_bound(A, factors, T, exponent, norm) if algorithm == "randomized" \
            else _returned_error(A, factors)
    return factors


def _check_sketch_options(oversample, n_iter, context):
    for name, value in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{context}: {name}={value!r} must be an int >= 0")


def _is_float64(kind) -> bool:
    return kind.dtype in (torch.float64, np.float64) or (kind.is_numpy and np.dtype(kind.dtype) == np.float64)


def _sketch_dtype(A, algorithm):
    """The default compute dtype: float32 for the randomized sketch of an input below float64, else float64."""
    below_float64 = A.dtype in (torch.float32, torch.float16, torch.bfloat16) if isinstance(A, torch.Tensor) else \
        isinstance(A, np.ndarray) and A.dtype in (np.float32, np.float16)
    return torch.float32 if algorithm == "randomized" and below_float64 else None


def _scaled(T):
    """``(T / 2**e, e, ||T / 2**e||_F)``, exact scaling: float64 always to unit magnitude (see
    :func:`unit_scale`); a float32 sketch only when its magnitudes may leave [2**-40, 2**40], where
    float32 products could over/underflow (``||T||_F``, accumulated in float64, bounds the peak)."""
    if T.dtype == torch.float64:
        T, exponent = unit_scale(T)
        return T, exponent, float(torch.linalg.norm(T))
    norm = _frobenius_norm(T)
    if norm == 0 or 2.0 ** -40 * math.sqrt(T.numel()) <= norm <= 2.0 ** 40:
        return T, 0, norm
    T, exponent = unit_scale(T)
    return T, exponent, math.ldexp(norm, -exponent)


def _row_blocks(T):
    """``(group, rows)`` slices of ``T (.., m, n)`` holding about ``_BLOCK_ELEMENTS`` entries each."""
    m, n = T.shape[-2:]
    step = max(1, _BLOCK_ELEMENTS // n)
    for g in range(T.shape[0] if T.ndim == 3 else 1):
        for start in range(0, m, step):
            yield g, slice(start, min(m, start + step))


def _frobenius_norm(T) -> float:
    """``||T||_F`` of a float32 (or lower) ``T``, accumulated in float64 one row block at a time."""
    T3 = T.reshape(-1, *T.shape[-2:])
    total = sum(float(torch.linalg.vector_norm(T3[g, rows], dtype=torch.float64)) ** 2 for g, rows in _row_blocks(T))
    return math.sqrt(total)


def _returned_error(A, factors) -> float:
    """``||A - U diag(S) Vh||_F`` of the returned (rounded) factors, computed in float64 with scaling.

    Row block by row block: each block of ``A`` is converted to float64 once (in cache) and
    ``U_block (S Vh)`` subtracted in place; ``S Vh`` of float32 (or lower) factors is exact in float64.
    """
    T = torch.as_tensor(A).detach()
    T, exponent, _ = _scaled(T)
    U, S, Vh = (torch.as_tensor(f).detach().to(T.device, torch.float64) for f in (factors.U, factors.S, factors.Vh))
    U3, T3 = U.reshape(-1, *U.shape[-2:]), T.reshape(-1, *T.shape[-2:])
    SVh = (times_power_of_two(S, -exponent)[..., :, None] * Vh).reshape(-1, *Vh.shape[-2:])
    total = 0.0
    for g, rows in _row_blocks(T):
        block = T3[g, rows].to(torch.float64, copy=True).addmm_(U3[g, rows], SVh[g], alpha=-1)
        total += float(torch.linalg.vector_norm(block)) ** 2
    return math.sqrt(total) * math.ldexp(1.0, exponent)


def _shape_text(A) -> str:
    return f"shape {tuple(A.shape)}"


def _returned_error_bound(A, factors, T, exponent, norm) -> float:
    """A certified upper bound of ``||A - U diag(S) Vh||_F`` for the returned factors, cheaper than measuring it.

    For factors of at most float32 precision (and float32 matmuls in IEEE precision on the CPU):
    the residual ``E^ = A - U (S Vh)`` formed in float32, one row block at a time, whose norm is
    accumulated in float64, plus a rigorous bound of its rounding: every entry is a sum of
    ``k + 1`` products (``S Vh`` rounded once more), so
    ``|E^ - E| <= g (|A| + |U| |S Vh|)`` elementwise with ``g = (k + 3) u / (1 - (k + 3) u)``,
    ``u = 2**-24``, and ``||E^ - E||_F <= g (||A||_F + ||U||_F ||S Vh||_F)`` (plus the underflow
    floor). When that slack exceeds 1e-3 of the residual, or the conditions do not hold, the
    exact float64 measurement (:func:`_returned_error`) is returned instead. ``T = A / 2**exponent`` in
    float32 (exact) and ``norm = ||T||_F`` as :func:`svd` computed them.
    """
    U, S, Vh = (torch.as_tensor(f).detach() for f in (factors.U, factors.S, factors.Vh))
    small = (torch.float32, torch.float16, torch.bfloat16)
    if not (_float32_matmul_is_ieee(T.device) and T.dtype == torch.float32 and U.dtype in small):
        return _returned_error(A, factors)
    k, (m, n) = S.shape[-1], T.shape[-2:]
    U3, T3 = U.float().reshape(-1, m, k), T.reshape(-1, m, n)
    SVh = (times_power_of_two(S.float(), -exponent)[..., :, None] * Vh.float()).reshape(-1, k, n)
    residual2, buffer = 0.0, torch.empty(min(m, max(1, _BLOCK_ELEMENTS // n)), n, device=T.device)
    for g, rows in _row_blocks(T):
        block = torch.addmm(T3[g, rows], U3[g, rows], SVh[g], alpha=-1, out=buffer[:rows.stop - rows.start])
        residual2 += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    residual = math.sqrt(residual2) * (1 + 1e-12)  # float64 accumulation of float32 squares
    unit = (k + 3) * 2.0 ** -24
    slack = unit / (1 - unit) * (norm * (1 + 1e-12) + float(torch.linalg.vector_norm(U3.double())) * float(
        torch.linalg.vector_norm(SVh.double()))) + (k + 3) * 2.0 ** -149 * math.sqrt(T.numel())
    if slack > 1e-3 * residual:
        return _returned_error(A, factors)
    return (residual + slack) * math.ldexp(1.0, exponent)


def _float32_matmul_is_ieee(device) -> bool:
    """Whether float32 matmuls on ``device`` round as IEEE float32 (no TF32/bfloat16 shortcuts)."""
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return device.type == "cpu" and torch.get_float32_matmul_precision() == "highest" and getattr(
        mkldnn, "fp32_precision", "none") in ("none", "ieee")


def _randomized_with_spec(T, spec, select, norm, oversample, n_iter, generator):
    """Randomized SVD whose sketch is large enough to certify the spec; returns (U, S, Vh, k)."""
    max_rank = select["max_rank"]
    if spec.kind in ("rank", "ratio"):
        k = select_rank(spec, None, **select) if spec.kind == "ratio" else check_rank(
            spec.value, max_rank, select["context"])
        U, S, Vh = _randomized(T, k + oversample, n_iter, generator)
        return U, S, Vh, k
    size = min(max_rank, max(32, 2 * oversample))
    while True:
        U, S, Vh = _randomized(T, size, n_iter, generator)
        spectrum = S.cpu().numpy()
        k = select_rank(spec, spectrum, **{**select, "norm": norm, "max_rank": size})
        target_met = spec.kind != "tol" or tail_errors(spectrum, norm)[k] <= spec.value * norm
        if (target_met and k + oversample <= size) or size >= max_rank:
            return U, S, Vh, k
        size = min(max_rank, 2 * size)


def randomized_svd(T: torch.Tensor, rank: int, *, n_iter: int = 4, random_state=None):
    """Rank-``rank`` randomized SVD of a float torch tensor ``T (.., m, n)`` (Halko et al. 2011, Alg. 4.4 + 5.1).

    Gaussian sketch of ``rank`` columns (include any oversampling in ``rank``), ``n_iter``
    stabilised power (subspace) iterations, then an exact SVD of the small projected
    matrix: the basis holds ``2 * n_iter + 1`` applications of ``T``, as in Halko et al.
    A float64 ``T`` runs in float64 with QR-stabilised iterations; a float32 (or lower) ``T``
    runs its sketch and iterations in float32 and its small SVD in float64 (see
    :func:`_sketch_float32`). ``random_state`` as everywhere in :mod:`decomp` (see
    :func:`decomp._backend.make_generator`). Returns ``(U, S, Vh)`` in ``T``'s dtype with
    ``min(rank, m, n)`` components.
    """
    U, S, Vh = _randomized(T, rank, n_iter, make_generator(random_state))
    return U.to(T.dtype), S.to(T.dtype), Vh.to(T.dtype)


def _randomized(T, rank, n_iter, generator):
    """:func:`randomized_svd` without the final cast: float64 factors for a float32 ``T``."""
    if T.dtype == torch.float64:
        return _sketch_float64(T, rank, n_iter, generator)
    T32 = T.float()
    if T32.ndim == 2:
        return _sketch_float32_oriented(T32, rank, n_iter, generator)
    parts = [_sketch_float32_oriented(block, rank, n_iter, generator) for block in T32]
    return tuple(torch.stack(factor) for factor in zip(*parts))


def _sketch_float32_oriented(T, rank, n_iter, generator):
    """:func:`_sketch_float32` of ``T`` or, for a tall ``T``, of ``T^T`` (its small SVD is then the smaller one)."""
    if T.shape[0] <= T.shape[1]:
        return _sketch_float32(T, rank, n_iter, generator)
    U, S, Vh = _sketch_float32(T.T, rank, n_iter, generator)
    return Vh.T, S, U.T


def _sketch_float64(T, rank, n_iter, generator):
    m, n = T.shape[-2:]
    size = min(rank, m, n)
    omega = torch.randn(*T.shape[:-2], n, size, generator=generator, dtype=T.dtype).to(T.device)
    Q = torch.linalg.qr(T @ omega).Q
    Tt = T.transpose(-2, -1)
    for _ in range(n_iter):
        Z = torch.linalg.qr(Tt @ Q).Q
        Q = torch.linalg.qr(T @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.transpose(-2, -1) @ T, full_matrices=False)
    return Q @ Ub, S, Vh


def _sketch_float32(T, rank, n_iter, generator):
    """Float32 randomized SVD of ``T (m, n)``; ``(U, S, Vh)`` in float64.

    The sketch starts on the row side, ``Z = T^T Omega`` with ``Omega (m, size)`` Gaussian, and
    each power iteration applies ``T`` then ``T^T``, so the row basis ``Z`` holds the same
    ``2 * n_iter + 1`` applications of ``T`` as the float64 path's column basis; the
    approximation is ``T Z Z^T`` (``Z`` orthonormalised by Householder QR), whose SVD comes
    from the small float64 SVD of ``Y = T Z (m, size)``: ``U S (Z W)^T``. The intermediate bases
    are the unit lower-triangular LU factors (same span, entries <= 1, cheaper than QR).
    Every product is (size, .) @ (., .), the orientation BLAS runs fastest.
    """
    m, n = T.shape
    size = min(rank, m, n)
    Zt = torch.randn(size, m, generator=generator, dtype=T.dtype).to(T.device) @ T     # (size, n)
    for _ in range(n_iter):
        Yt = _lu_basis(Zt) @ T.T                                                        # (size, m)
        Zt = _lu_basis(Yt) @ T
    Zt = torch.linalg.qr(Zt.T).Q.T                                                      # orthonormal rows
    U, S, Wh = _tall_svd((Zt @ T.T).T.double())                                        # of T Z, (m, size)
    return U, S, Wh @ Zt.double()


def _tall_svd(Y):
    """SVD of a tall float64 ``Y (m, size)`` from ``eigh`` of its Gram, or LAPACK's SVD when ill-conditioned.

    ``U = Y W / s`` loses orthogonality like ``eps * (s_1 / s_i)^2``: below 1e-8 while every
    ``s_i >= 1e-4 s_1``; a wider spread (a rank-deficient sketch) takes the SVD.
    """
    lam, W = torch.linalg.eigh(Y.T @ Y)
    lam, W = lam.flip(-1), W.flip(-1)
    if not float(lam[-1]) >= 1e-8 * float(lam[0]) > 0:
        return torch.linalg.svd(Y, full_matrices=False)
    S = lam.sqrt()
    return (Y @ W) / S, S, W.T


def _lu_basis(Xt):
    """Rows spanning the row space of ``Xt (size, d)``: ``(P L)^T`` of the LU factorisation ``Xt^T = P L U``."""
    LU, pivots = torch.linalg.lu_factor(Xt.T)
    _, L, _ = torch.lu_unpack(LU, pivots, unpack_pivots=False)
    order = np.arange(L.shape[0])
    for i, p in enumerate(pivots.tolist()):  # LAPACK's row swaps, applied in turn
        order[[i, p - 1]] = order[[p - 1, i]]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return L.T[:, torch.from_numpy(inverse).to(Xt.device)]  # contiguous rows: BLAS's fast orientation next


def optimal_error(A, k: int) -> float:
    """The Eckart–Young optimum ``sqrt(sum_{i>k} s_i^2)`` of a 2-D array (for tests/benchmarks)."""
    T, _ = as_compute_tensor(A, ndim=(2, 3))
    s = torch.linalg.svdvals(T).cpu().numpy()
    return float(tail_errors(s)[min(k, s.shape[-1])])


__all__ = ["svd", "randomized_svd", "optimal_error", "ALGORITHMS"]
