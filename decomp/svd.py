"""Truncated SVD, exact or randomized, with rank selection and certified error.

Guarantees (Eckart–Young): for the exact method, ``svd(A, rank=k)`` returns the best
rank-k approximation in Frobenius and spectral norm, and
``error_bound = ||A - A_k||_F = sqrt(sum_{i>k} s_i^2)``.
For the randomized method (Halko, Martinsson, Tropp 2011) the approximation is
``P A`` with ``P`` an orthogonal projector, so its error is known exactly a posteriori:
``error_bound = sqrt(||A - P A||_F^2 + sum_{i>k} s~_i^2)`` (= ``sqrt(||A||_F^2 - sum_{i<=k} s~_i^2)``,
evaluated without cancellation); it exceeds the optimum by a factor
that shrinks quickly with oversampling and power iterations on decaying spectra.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import as_compute_tensor, make_generator, times_power_of_two, unit_scale
from .formats.svd import SVDFactors, svd_num_params
from .rank import check_rank, parse_rank_spec, select_rank, tail_errors

ALGORITHMS = ("exact", "randomized")


def svd(A, rank=None, *, energy=None, tol=None, ratio=None, algorithm="exact", oversample=10, n_iter=4,
        random_state=None, compute_dtype=None, context="") -> SVDFactors:
    """Truncated SVD of a matrix ``A (m, n)`` or of a batch ``A (g, m, n)`` sharing one rank.

    Exactly one of ``rank`` (int or ``"vbmf"``), ``energy``, ``tol``, ``ratio`` picks the
    rank k (see :mod:`decomp.rank`); for a batch, energy and error are summed over
    blocks. ``algorithm="randomized"`` sketches ``k + oversample`` directions with
    ``n_iter`` power iterations, seeded by ``random_state``; for energy/tol it grows the
    sketch until the target is certified. Math runs in ``compute_dtype`` (float64 by
    default); factors come back in the input's kind (numpy/torch) and dtype.

    Returns :class:`~decomp.formats.svd.SVDFactors` with ``U (.., m, k)``, ``S (.., k)``,
    ``Vh (.., k, n)`` and ``error_bound`` = the Frobenius error of the reconstruction. The
    matrix is scaled by a power of two before any square is formed, so ranks and bounds are
    right for data anywhere in float64's range; for inputs below float64 precision (float32,
    float16, bfloat16) ``error_bound`` is the error of the factors as returned, rounded to that
    dtype, measured in float64. ``oversample`` / ``n_iter``: ints >= 0.
    """
    context = context or "svd"
    spec = parse_rank_spec(rank, energy, tol, ratio, context=context)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{context}: algorithm={algorithm!r} is not one of {ALGORITHMS}")
    _check_sketch_options(oversample, n_iter, context)
    T, kind = as_compute_tensor(A, name=context, ndim=(2, 3), compute_dtype=compute_dtype)
    T, exponent = unit_scale(T)  # exact power-of-two scaling: squares stay finite for 1e-300 .. 1e300
    m, n = T.shape[-2:]
    groups = T.shape[0] if T.ndim == 3 else 1
    max_rank = min(m, n)
    norm = float(torch.linalg.norm(T))

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
        bound = math.nan  # inputs below float64: measured on the returned factors below instead
        if _is_float64(kind):
            # ||A - P A||_F^2 measured directly (not as ||A||^2 - sum s~^2, which cancels to
            # ~sqrt(eps) * ||A|| when the error is tiny), plus the truncated sketch tail.
            residual = float(torch.linalg.norm(T - U @ (U.transpose(-2, -1) @ T))) ** 2
            bound = (float(tail_errors(spectrum[..., k:])[0]) ** 2 + residual) ** 0.5
    U, S, Vh = U[..., :, :k], S[..., :k], Vh[..., :k, :]
    scale = math.ldexp(1.0, exponent)
    factors = SVDFactors(kind.restore(U), kind.restore(times_power_of_two(S, exponent)), kind.restore(Vh),
                         error_bound=bound * scale, norm=norm * scale, singular_values=spectrum * scale,
                         algorithm=algorithm)
    if not _is_float64(kind):  # the bound must hold for the factors actually returned, rounded to kind.dtype
        factors.error_bound = _returned_error(A, factors)
    return factors


def _check_sketch_options(oversample, n_iter, context):
    for name, value in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{context}: {name}={value!r} must be an int >= 0")


def _is_float64(kind) -> bool:
    return kind.dtype in (torch.float64, np.float64) or (kind.is_numpy and np.dtype(kind.dtype) == np.float64)


def _returned_error(A, factors) -> float:
    """``||A - U diag(S) Vh||_F`` of the returned (rounded) factors, computed in float64 with scaling."""
    A64, exponent = unit_scale(torch.as_tensor(A).detach().double())
    U, S, Vh = (torch.as_tensor(f).detach().double() for f in (factors.U, factors.S, factors.Vh))
    approx = (U * times_power_of_two(S, -exponent)[..., None, :]) @ Vh
    return float(torch.linalg.norm(A64 - approx.to(A64.device))) * math.ldexp(1.0, exponent)


def _shape_text(A) -> str:
    return f"shape {tuple(A.shape)}"


def _randomized_with_spec(T, spec, select, norm, oversample, n_iter, generator):
    """Randomized SVD whose sketch is large enough to certify the spec; returns (U, S, Vh, k)."""
    max_rank = select["max_rank"]
    if spec.kind in ("rank", "ratio"):
        k = select_rank(spec, None, **select) if spec.kind == "ratio" else check_rank(
            spec.value, max_rank, select["context"])
        U, S, Vh = randomized_svd(T, k + oversample, n_iter=n_iter, random_state=generator)
        return U, S, Vh, k
    size = min(max_rank, max(32, 2 * oversample))
    while True:
        U, S, Vh = randomized_svd(T, size, n_iter=n_iter, random_state=generator)
        spectrum = S.cpu().numpy()
        k = select_rank(spec, spectrum, **{**select, "norm": norm, "max_rank": size})
        target_met = spec.kind != "tol" or tail_errors(spectrum, norm)[k] <= spec.value * norm
        if (target_met and k + oversample <= size) or size >= max_rank:
            return U, S, Vh, k
        size = min(max_rank, 2 * size)


def randomized_svd(T: torch.Tensor, rank: int, *, n_iter: int = 4, random_state=None):
    """Rank-``rank`` randomized SVD of a float torch tensor ``T (.., m, n)`` (Halko et al. 2011, Alg. 4.4 + 5.1).

    Gaussian sketch of ``rank`` columns (include any oversampling in ``rank``), ``n_iter``
    QR-stabilised power (subspace) iterations, then an exact SVD of the small projected
    matrix. ``random_state`` as everywhere in :mod:`decomp` (see
    :func:`decomp._backend.make_generator`). Returns ``(U, S, Vh)`` with
    ``min(rank, m, n)`` components.
    """
    generator = make_generator(random_state)
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


def optimal_error(A, k: int) -> float:
    """The Eckart–Young optimum ``sqrt(sum_{i>k} s_i^2)`` of a 2-D array (for tests/benchmarks)."""
    T, _ = as_compute_tensor(A, ndim=(2, 3))
    s = torch.linalg.svdvals(T).cpu().numpy()
    return float(tail_errors(s)[min(k, s.shape[-1])])


__all__ = ["svd", "randomized_svd", "optimal_error", "ALGORITHMS"]
