"""Data-aware (whitened) truncated SVD: SVD-LLM's truncation-aware whitening.

Given a weight ``W (m, n)`` and the Gram matrix ``G = X^T X (n, n)`` of calibration
inputs ``X`` (one row per sample / token / im2col patch), factor ``G = L L^T`` and take the
SVD ``W L = U S V^T``. The rank-k weight

    W' = U_k S_k V_k^T L^{-1} = U_k U_k^T W

minimizes the OUTPUT error ``||(W - W') X^T||_F`` over all weights of rank <= k, with

    ||(W - W') X^T||_F = ||(W - W') L||_F = sqrt(sum_{i>k} s_i(W L)^2)

(Wang et al. 2024, "SVD-LLM"; it is the Eckart–Young optimum of ``W X^T`` whose rank-k
approximations ``U_k U_k^T W X^T`` all have the form ``W' X^T``). We use the second form
``W' = U_k U_k^T W``: it needs no ``L^{-1}``, so it stays finite and exact when ``G`` is
singular (fewer samples than features, duplicated or dead input channels); the null space
of ``G`` (directions the data never excites) keeps ``W``'s own projection onto ``U_k``.

Robustness: the Cholesky factor is tried without jitter first, then with
``jitter = 1e-10 * trace(G)/n``, growing x10 until it succeeds (``whitening="cholesky"``;
the jitter used is reported). With jitter ``d > 0``, ``L L^T = G + d I``, so
``error_bound = sqrt(sum_{i>k} s_i(W L)^2)`` is still a certified upper bound of the true
output error (it exceeds it by ``d ||W - W'||_F^2`` under the square root). When even
``jitter = trace(G)/n`` fails, or on request (``whitening="eigh"``), ``L = Q diag(sqrt(max(l, 0)))``
from the eigendecomposition ``G = Q diag(l) Q^T`` is used instead (no jitter).
The output error measured a posteriori with the un-jittered ``G`` is reported as well.

Cost: the spectrum of ``W L`` and the SVD of ``U_k^T W`` come from eigendecompositions of the
smaller Grams (:func:`output_subspace`, :func:`leading_svd`), 2-3x cheaper than SVDs; when a kept
singular value is below ``sqrt(GRAM_ROUTE_FLOOR)`` of the largest, where squaring would cost
accuracy, the SVD itself is used.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import all_finite, as_compute_tensor, times_power_of_two, unit_scale
from ._kernels import symmetric_gram, times_lower_triangular
from .formats.svd import WhitenedSVDFactors, svd_num_params
from .rank import parse_rank_spec, select_rank, tail_errors

WHITENINGS = ("cholesky", "eigh")
_JITTER_START, _JITTER_STEPS = 1e-10, 11  # 1e-10 ... 1e0 times trace(G)/n


def whitening_factor(gram, *, whitening="cholesky", jitter=None, context="whitening"):
    """``(L, method, jitter)`` with ``L L^T = G (+ jitter I)`` for a PSD ``gram (.., n, n)`` (float64 torch).

    ``whitening="cholesky"``: Cholesky with adaptive jitter (``jitter=None``: try 0, then
    ``1e-10 * trace/n`` growing x10; a float: start there), falling back to ``"eigh"`` when
    ``trace/n`` is not enough. ``"eigh"``: the square root ``Q sqrt(max(l, 0))``. ``jitter``
    returned is the largest absolute shift used over the batch.
    """
    if whitening not in WHITENINGS:
        raise ValueError(f"{context}: whitening={whitening!r} is not one of {WHITENINGS}")
    G = 0.5 * (gram + gram.transpose(-2, -1))
    if whitening == "cholesky":
        factors, used = [], 0.0
        for block in G.reshape(-1, *G.shape[-2:]):
            L, shift = _cholesky_with_jitter(block, jitter)
            if L is None:
                break
            factors.append(L)
            used = max(used, shift)
        else:
            return torch.stack(factors).reshape(G.shape), "cholesky", used
    vals, vecs = torch.linalg.eigh(G)
    return vecs * vals.clamp_min(0.0).sqrt()[..., None, :], "eigh", 0.0


def _cholesky_with_jitter(G, jitter):
    n = G.shape[-1]
    scale = float(torch.diagonal(G).sum()) / n
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    shifts = [0.0] + [scale * _JITTER_START * 10 ** i for i in range(_JITTER_STEPS)]
    if jitter is not None:
        shifts = [float(jitter) * 10 ** i for i in range(_JITTER_STEPS)] if jitter > 0 else shifts
    for shift in shifts:
        L, info = torch.linalg.cholesky_ex(G + shift * eye if shift else G)
        if int(info) == 0 and all_finite(L):
            return L, shift
    return None, None


def whitened_svd(W, gram, rank=None, *, energy=None, tol=None, ratio=None, whitening="cholesky", jitter=None,
                 compute_dtype=None, context="") -> WhitenedSVDFactors:
    """Data-aware truncated SVD of ``W (m, n)`` or a batch ``W (g, m, n)`` (SVD-LLM whitening).

    ``gram``: ``X^T X`` of the calibration inputs, ``(n, n)`` (shared by all blocks) or
    ``(g, n, n)`` (one per block, e.g. per group of a grouped conv); it must be symmetric
    positive semi-definite (it is symmetrized; an eigenvalue below ``-PSD_TOLERANCE`` times
    the largest |eigenvalue| (rounding of a float32-accumulated Gram stays far below) raises
    ValueError; scale is irrelevant for the factors: ``W`` and ``gram`` are
    scaled by powers of two before any square is formed).
    Exactly one of ``rank`` (int or ``"vbmf"``), ``energy``, ``tol``, ``ratio``: energy and
    tol are measured on the OUTPUT spectrum ``s_i(W L)`` summed over blocks (``tol`` bounds
    the relative output error ``||(W - W')X^T||_F / ||W X^T||_F``); ``ratio`` keeps that
    fraction of the ``g*m*n`` parameters (``g*k*(m+n)``).

    Returns :class:`~decomp.formats.svd.WhitenedSVDFactors`; its ``error_bound`` is the certified OUTPUT error
    (see the module docstring), ``weight_error`` the weight error. Factors come back in
    ``W``'s array kind and dtype.
    """
    context = context or "whitened_svd"
    spec = parse_rank_spec(rank, energy, tol, ratio, context=context)
    T, kind = as_compute_tensor(W, name=context, ndim=(2, 3), compute_dtype=compute_dtype)
    G, _ = as_compute_tensor(gram, name=f"{context}: gram", ndim=(2, 3), compute_dtype=T.dtype)
    G = G.to(T.device)
    batched = T.ndim == 3
    Tb = T if batched else T[None]
    g, m, n = Tb.shape
    if G.shape[-2:] != (n, n) or (G.ndim == 3 and G.shape[0] not in (1, g)):
        want = f"({n}, {n})" + (f" or ({g}, {n}, {n})" if batched else "")
        raise ValueError(f"{context}: gram of shape {tuple(G.shape)} does not match the weight of shape "
                         f"{tuple(T.shape)}; expected {want} (X^T X of the layer's inputs)")
    Gb = G.expand(g, n, n) if G.ndim == 2 or G.shape[0] == 1 else G
    Gb = Gb.reshape(g, n, n)
    diag = torch.diagonal(Gb, dim1=-2, dim2=-1)
    if (diag.sum(-1) == 0).any():
        raise ValueError(f"{context}: gram is zero for at least one block: the calibration inputs carry no signal "
                         f"for this layer (all zero, or constant after centering), so the output error does not "
                         f"depend on the weight; use plain svd for this layer")
    # exact power-of-two scalings (W by 2^ew, G by 4^(eg/2)): squares stay finite for 1e-300 .. 1e300
    Tb, ew = unit_scale(Tb)
    Gb, eg = unit_scale(0.5 * (Gb + Gb.transpose(-2, -1)), even=True)
    cholesky = check_psd(Gb, context)
    output_scale = math.ldexp(1.0, ew + eg // 2)
    if cholesky is not None and whitening == "cholesky" and jitter is None:   # no jitter needed: reuse it
        L, used, shift = cholesky, "cholesky", 0.0
    else:
        jitter = None if jitter is None else float(jitter) * math.ldexp(1.0, -eg)
        L, used, shift = whitening_factor(Gb, whitening=whitening, jitter=jitter, context=context)
    shift = shift * math.ldexp(1.0, eg)
    triangular = used == "cholesky"   # L is lower triangular (the eigh square root is not)
    WL = times_lower_triangular(Tb, L) if triangular else Tb @ L

    def rank_of(spectrum):
        return select_rank(spec, spectrum, max_rank=min(m, n), params_of_rank=lambda r: svd_num_params(m, n, r, g),
                           dense_params=g * m * n, matrix_shape=(m, n), context=f"{context} (shape {tuple(T.shape)})")

    spectrum, Uk = output_subspace(WL, rank_of)
    k = Uk.shape[-1]
    bound = float(tail_errors(spectrum)[k]) * output_scale
    P, Sk, Vh = leading_svd(Uk.transpose(-2, -1) @ Tb, k)  # U_k^T W = P S Vh (k x n: all k triplets)
    Uw = Uk @ P
    E = Tb - (Uw * Sk[..., None, :]) @ Vh
    # ||W X^T||_F^2 = tr(W G W^T) = ||W L||_F^2 when L L^T = G (an exact Cholesky factor): for E and W alike
    exact_factor = triangular and shift == 0.0
    output_error = (float(torch.linalg.norm(times_lower_triangular(E, L))) if exact_factor else
                    math.sqrt(max(float(((E @ Gb) * E).sum()), 0.0))) * output_scale
    output_norm = (float(torch.linalg.norm(WL)) if exact_factor else
                   math.sqrt(max(float(((Tb @ Gb) * Tb).sum()), 0.0))) * output_scale
    Sk, weight_scale = times_power_of_two(Sk, ew), math.ldexp(1.0, ew)
    if not batched:
        Uw, Sk, Vh, spectrum = Uw[0], Sk[0], Vh[0], spectrum[0]
    return WhitenedSVDFactors(kind.restore(Uw), kind.restore(Sk), kind.restore(Vh), error_bound=bound,
                              norm=output_norm, singular_values=np.asarray(spectrum) * output_scale,
                              algorithm="whitened", output_error=output_error,
                              weight_error=float(torch.linalg.norm(E)) * weight_scale,
                              weight_norm=float(torch.linalg.norm(Tb)) * weight_scale, whitening=used, jitter=shift)


# the Gram route resolves a kept direction when its eigenvalue is at least this fraction of the largest:
# eigh's absolute eigenvalue error is ~ n eps lambda_max, so s_k keeps >= ~6 correct digits above it
GRAM_ROUTE_FLOOR = 1e-7


def output_subspace(WL, rank_of):
    """``(spectrum, U_k)``: the singular values ``(g, min(m, n))`` of ``WL (g, m, n)`` (numpy, descending)
    and an orthonormal basis ``U_k (g, m, k)`` of its leading ``k = rank_of(spectrum)`` left singular vectors.

    Fast route (:func:`gram_route`): the eigendecomposition of the smaller Gram, 2-3x cheaper than
    an SVD. When a kept ``s_k`` is not resolved by it (:func:`resolved`), the exact, backward-stable
    SVD route (:func:`left_singular_vectors`) decides the spectrum and the rank instead.
    Only ``span(U_k)`` matters to ``W' = U_k U_k^T W``.
    """
    route = gram_route(WL)
    if route is not None:
        spectrum = route[0].sqrt().cpu().numpy()
        k = rank_of(spectrum)
        if resolved(route[0], k):
            return spectrum, leading_pairs(WL, route, k)[0]
    U, S = left_singular_vectors(WL)
    spectrum = S.cpu().numpy()
    return spectrum, U[..., :rank_of(spectrum)]


def leading_svd(M, k):
    """``(U_k, S, Vh_k)``: the leading ``k`` singular vectors of ``M (.., m, n)`` and ALL its singular
    values ``S (.., min(m, n))``, descending. From :func:`gram_route` when it resolves rank ``k``
    (:func:`resolved`), else from the SVD itself. ``U_k S_k Vh_k`` is ``M``'s best rank-``k``
    approximation up to rounding either way."""
    route = gram_route(M)
    if route is not None and resolved(route[0], k):
        U, _, Vh = leading_pairs(M, route, k)
        return U, route[0].sqrt(), Vh
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :k], S, Vh[..., :k, :]


def gram_route(M):
    """``(values, vectors, wide)``: the eigendecomposition, eigenvalues descending (``s_i^2``, clamped at
    0), of the smaller Gram of ``M (.., m, n)`` (``M M^T`` when ``wide = m <= n``, else ``M^T M``);
    None when ``M`` is not float64 or empty (the SVD is then used). Its eigenvalue errors are
    ~ ``n eps s_1^2``: see :func:`resolved`."""
    if M.dtype != torch.float64 or min(M.shape[-2:]) == 0:
        return None
    wide = M.shape[-2] <= M.shape[-1]
    H = torch.stack([symmetric_gram(block, of_rows=wide) for block in M.reshape(-1, *M.shape[-2:])])
    values, vectors = torch.linalg.eigh(H.reshape(*M.shape[:-2], *H.shape[-2:]))
    return values.flip(-1).clamp_min(0.0), vectors.flip(-1), wide


def resolved(values, k) -> bool:
    """Whether the Gram route resolves the leading ``k`` singular pairs of every block: ``s_k^2 >=
    GRAM_ROUTE_FLOOR * s_1^2`` (``s_k`` then has ~6 correct digits and the singular vectors computed
    from it lose at most ~ ``eps / GRAM_ROUTE_FLOOR`` of orthogonality)."""
    if k == 0:
        return True
    top = values[..., :1]
    return bool((top > 0).all()) and bool((values[..., k - 1:k] >= GRAM_ROUTE_FLOOR * top).all())


def leading_pairs(M, route, k):
    """``(U_k (.., m, k), S_k (.., k), Vh_k (.., k, n))``, the leading singular triplets of ``M`` from its
    :func:`gram_route` ``route`` (resolved at ``k``): the Gram's eigenvectors give one side, ``M``
    times them over ``S_k`` the other."""
    values, vectors, wide = route
    S = values[..., :k].sqrt()
    Q = vectors[..., :k]
    if wide:
        return Q, S, (Q.transpose(-2, -1) @ M) / S[..., :, None]
    return (M @ Q) / S[..., None, :], S, Q.transpose(-2, -1)


def left_singular_vectors(M):
    """``(U, S)`` of the thin SVD ``M = U diag(S) V^T`` of ``M (.., m, n)``, without computing ``V``.

    A wide ``M`` (``n > m``) is first reduced to the square ``R^T`` of ``M^T = Q R`` (Householder
    QR, ``Q`` never formed): ``M M^T = R^T R``, so ``R^T`` has the same ``U`` and ``S``. Both steps
    are backward stable: the result is as accurate as the SVD of ``M`` itself.
    """
    if M.shape[-1] > M.shape[-2]:
        M = torch.linalg.qr(M.transpose(-2, -1), mode="r")[1].transpose(-2, -1)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    return U, S


# a Gram accumulated in float32 over many rows has eigenvalue errors ~ sqrt(rows) * 1.2e-7 of the largest;
# an indefinite matrix passed by mistake has negative eigenvalues of the order of the largest
PSD_TOLERANCE = 1e-4


def check_psd(gram, context="gram"):
    """Raise ValueError unless each block of the symmetric ``gram (g, n, n)`` is positive semi-definite
    up to rounding: no eigenvalue below ``-PSD_TOLERANCE`` times the block's largest |eigenvalue|.

    Returns the Cholesky factor ``L (g, n, n)``, ``L L^T = gram``, when every block is positive
    definite (and the factor is finite), else None."""
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info.max()) == 0 and all_finite(L):
        return L  # positive definite
    values = torch.linalg.eigvalsh(gram)
    low, high = values.min(-1).values, values.abs().max(-1).values
    bad = low < -PSD_TOLERANCE * high
    if bad.any():
        block = int(torch.nonzero(bad)[0])
        raise ValueError(f"{context}: gram is not positive semi-definite (block {block}: smallest eigenvalue "
                         f"{float(low[block]):.3g}, largest |eigenvalue| {float(high[block]):.3g}); it must be "
                         f"X^T X of the layer's inputs (a covariance), not an arbitrary symmetric matrix")


def output_error(W, W_approx, gram) -> float:
    """``||(W - W') X^T||_F`` from the Gram ``X^T X`` (for tests and benchmarks; float64)."""
    E = (torch.as_tensor(W) - torch.as_tensor(W_approx)).double()
    G = torch.as_tensor(gram).double()
    return math.sqrt(max(float(((E @ G) * E).sum()), 0.0))


__all__ = ["whitened_svd", "whitening_factor", "output_error", "leading_svd", "WHITENINGS"]
