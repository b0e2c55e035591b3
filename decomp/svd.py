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

import torch

from ._backend import as_compute_tensor, make_generator
from .factors import SVDFactors
from .rank import check_rank, parse_rank_spec, select_rank, tail_errors

METHODS = ("exact", "randomized")


def svd(A, rank=None, *, energy=None, tol=None, ratio=None, method="exact", oversample=10, n_iter=4,
        random_state=None, compute_dtype=None, context="") -> SVDFactors:
    """Truncated SVD of a matrix ``A (m, n)`` or of a batch ``A (g, m, n)`` sharing one rank.

    Exactly one of ``rank`` (int or ``"vbmf"``), ``energy``, ``tol``, ``ratio`` picks the
    rank k (see :mod:`decomp.rank`); for a batch, energy and error are summed over
    blocks. ``method="randomized"`` sketches ``k + oversample`` directions with
    ``n_iter`` power iterations, seeded by ``random_state``; for energy/tol it grows the
    sketch until the target is certified. Math runs in ``compute_dtype`` (float64 by
    default); factors come back in the input's kind (numpy/torch) and dtype.

    Returns :class:`~decomp.factors.SVDFactors` with ``U (.., m, k)``, ``S (.., k)``,
    ``Vh (.., k, n)`` and ``error_bound`` = the Frobenius error of the reconstruction.
    """
    context = context or "svd"
    spec = parse_rank_spec(rank, energy, tol, ratio, context=context)
    if method not in METHODS:
        raise ValueError(f"{context}: method={method!r} is not one of {METHODS}")
    T, kind = as_compute_tensor(A, name=context, ndim=(2, 3), compute_dtype=compute_dtype)
    m, n = T.shape[-2:]
    groups = T.shape[0] if T.ndim == 3 else 1
    max_rank = min(m, n)
    norm = float(torch.linalg.norm(T))

    def params_of_rank(k):
        return groups * k * (m + n)

    select = dict(max_rank=max_rank, params_of_rank=params_of_rank, dense_params=groups * m * n,
                  matrix_shape=(m, n), context=f"{context} ({_shape_text(A)})")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
        spectrum = S.cpu().numpy()
        k = select_rank(spec, spectrum, **select)
        bound = float(tail_errors(spectrum)[k])
    else:
        generator = make_generator(random_state)
        U, S, Vh, k = _randomized_with_spec(T, spec, select, norm, oversample, n_iter, generator)
        spectrum = S.cpu().numpy()
        # ||A - P A||_F^2 measured directly (not as ||A||^2 - sum s~^2, which cancels to
        # ~sqrt(eps) * ||A|| when the error is tiny), plus the truncated sketch tail.
        residual = float(torch.linalg.norm(T - U @ (U.transpose(-2, -1) @ T))) ** 2
        bound = (float(tail_errors(spectrum[..., k:])[0]) ** 2 + residual) ** 0.5
    U, S, Vh = U[..., :, :k], S[..., :k], Vh[..., :k, :]
    return SVDFactors(kind.restore(U), kind.restore(S), kind.restore(Vh), error_bound=bound, norm=norm,
                      singular_values=spectrum, method=method)


def _shape_text(A) -> str:
    return f"shape {tuple(A.shape)}"


def _randomized_with_spec(T, spec, select, norm, oversample, n_iter, generator):
    """Randomized SVD whose sketch is large enough to certify the spec; returns (U, S, Vh, k)."""
    max_rank = select["max_rank"]
    if spec.kind in ("rank", "ratio"):
        k = select_rank(spec, None, **select) if spec.kind == "ratio" else check_rank(
            spec.value, max_rank, select["context"])
        U, S, Vh = randomized_svd(T, k + oversample, n_iter, generator)
        return U, S, Vh, k
    size = min(max_rank, max(32, 2 * oversample))
    while True:
        U, S, Vh = randomized_svd(T, size, n_iter, generator)
        spectrum = S.cpu().numpy()
        k = select_rank(spec, spectrum, **{**select, "norm": norm, "max_rank": size})
        target_met = spec.kind != "tol" or tail_errors(spectrum, norm)[k] <= spec.value * norm
        if (target_met and k + oversample <= size) or size >= max_rank:
            return U, S, Vh, k
        size = min(max_rank, 2 * size)


def randomized_svd(T: torch.Tensor, size: int, n_iter: int, generator: torch.Generator):
    """Rank-``size`` randomized SVD of ``T (.., m, n)`` (Halko et al. 2011, Alg. 4.4 + 5.1).

    Gaussian sketch, ``n_iter`` QR-stabilised power (subspace) iterations, then an exact
    SVD of the small projected matrix. Returns ``(U, S, Vh)`` with ``min(size, m, n)``
    components.
    """
    m, n = T.shape[-2:]
    size = min(size, m, n)
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


__all__ = ["svd", "randomized_svd", "optimal_error", "METHODS"]
