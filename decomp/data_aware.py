"""Data-aware Tucker-2 and product quantization: fits that target the OUTPUT error.

Both take the Gram ``G = X^T X`` (or the centered covariance) of the layer's inputs as
its weight matrix sees them (:func:`layers.calibrate`: per group, im2col patch entries
ordered ``(channel, *kernel offsets)``) and measure ``||(W - W') X^T||_F^2 = tr(E G E^T)``
with ``E = W - W'``. Neither has a closed-form optimum, so both are *refinements* started
from the plain (weight-space) decomposition, and the plain one is kept when the
refinement does not lower the output error on the calibration statistics: the returned
``error`` (the output error) is never above the plain fit's ``plain_error`` (``fit`` says
which one was kept). It is MEASURED on the given Gram, not a theorem bound, so the
results (:class:`~decomp.formats.tucker.WhitenedTucker2Factors`,
:class:`~decomp.formats.pq.WeightedPQFactors`) have no ``error_bound``.

Tucker-2 of a conv kernel ``W (N, C, *k)`` (:func:`whitened_tucker2`). In matrix form
``W' = U_out M (U_in ⊗ I_k)^T`` with ``M (R_out, R_in*prod(k))`` the core. With
``B = U_in ⊗ I_k``:

* core given both factors: the least-squares optimum ``M = U_out^T W G B (B^T G B)^{-1}``;
* ``U_out`` given ``U_in``: the output error with that optimal core is
  ``tr(W G W^T) - tr(U_out^T S U_out)`` with ``S = W G B (B^T G B)^{-1} B^T G W^T``, so the
  top-``R_out`` eigenvectors of ``S`` are the exact optimum (with ``U_in = I`` this is the
  output covariance ``W G W^T``);
* ``U_in`` given ``U_out``: no closed form; with the Kronecker model
  ``G ~= G_c ⊗ G_k`` (``G_c``, ``G_k`` the channel and kernel-offset marginals of ``G``)
  the optimum is ``U_in = L_c^{-T} V`` with ``G_c = L_c L_c^T`` and ``V`` the top
  eigenvectors of ``L_c^T (sum_r Y_r G_k Y_r^T) L_c``, ``Y = U_out^T W`` (HOOI on the
  whitened input mode), orthonormalized.

Alternating sweeps (``U_in``, ``U_out``, core), started from the plain HOOI factors with
their least-squares core; the best iterate (measured error) wins, the plain Tucker-2
included. A tiny ridge ``ridge * tr(G)/P * I`` keeps the solves defined for singular Grams
(directions the data never excites then keep the weight-space fit).

Product quantization (:func:`weighted_pq`, Stock et al. 2020's objective): sub-space ``J``
(a column block) costs ``sum_rows (w_J - c)^T G_JJ (w_J - c)`` (the block-diagonal part
of the output error). Weighted Lloyd iterations, started from the plain k-means
codebook: assignment by the ``G_JJ``-metric (points and centroids mapped by the Cholesky
factor ``L_J^T``), centroid update the weighted mean ``(sum n_J G_JJ)^{-1} sum G_JJ s_J``
over every sub-space sharing the codebook (the plain mean for per-sub-space codebooks).
The weighted objective never increases; the full output error (cross-block terms
included) decides between the result and the plain PQ.
"""
from __future__ import annotations

import math

import torch

from .formats.pq import WeightedPQFactors, code_dtype, pq_decode
from .formats.tucker import WhitenedTucker2Factors, grouped_tucker2_matrices
from .pq import assign_nearest

DEFAULT_RIDGE = 1e-8


def _check_grams(G, g, P, context):
    G = torch.as_tensor(G, dtype=torch.float64)
    if G.ndim == 2:
        G = G[None]
    if G.shape[-2:] != (P, P) or G.shape[0] not in (1, g):
        raise ValueError(f"{context}: gram of shape {tuple(G.shape)} does not match the layer; expected "
                         f"({P}, {P}) or ({g}, {P}, {P}) (X^T X of the layer's im2col inputs, per group)")
    G = 0.5 * (G + G.transpose(-2, -1))
    trace = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    if (trace <= 0).any():
        raise ValueError(f"{context}: gram is zero for at least one group: the calibration inputs were all zero, "
                         f"so the output error does not depend on the weight; use the plain method for this layer")
    return G.expand(g, P, P)


def output_sq_error(E, G):
    """``sum_g tr(E_g G_g E_g^T)`` for ``E (g, m, P)``, ``G (g, P, P)`` (float64, clamped at 0)."""
    return max(float(((E @ G) * E).sum()), 0.0)


# ----------------------------------------------------------------------------- Tucker-2

def _ridged(G, ridge):
    P = G.shape[-1]
    return G + (ridge * float(torch.diagonal(G).sum()) / P) * torch.eye(P, dtype=G.dtype, device=G.device)


def _tucker_pieces(W0, Gr4, U_in):
    """``H = W G B`` (N, R_in*kk) and ``B^T G B`` for ``B = U_in ⊗ I_kk`` (ridged G)."""
    C, kk = Gr4.shape[0], Gr4.shape[1]
    r_in = U_in.shape[1]
    GB = torch.einsum("akcl,cr->akrl", Gr4, U_in)                           # (C, kk, R_in, kk)
    BtGB = torch.einsum("as,amrl->smrl", U_in, GB).reshape(r_in * kk, r_in * kk)
    H = W0 @ GB.reshape(C * kk, r_in * kk)
    return H, 0.5 * (BtGB + BtGB.T)


def _core(U_out, H, chol):
    """Least-squares core ``M = U_out^T H (B^T G B)^{-1}`` (R_out, R_in*kk)."""
    return torch.cholesky_solve((U_out.T @ H).T, chol).T


def _best_out(H, chol, r_out):
    """Top-``r_out`` eigenvectors of ``S = H (B^T G B)^{-1} H^T`` (the exact U_out given U_in)."""
    S = H @ torch.cholesky_solve(H.T, chol)
    _, vecs = torch.linalg.eigh(0.5 * (S + S.T))
    return vecs[:, -r_out:].flip(-1)


def _best_in(W4, U_out, Gc_chol, Gk, r_in):
    """Input factor on the whitened input mode (Kronecker model of G), orthonormal (C, R_in)."""
    Y = torch.einsum("no,nck->ock", U_out, W4)                              # (R_out, C, kk)
    Z = torch.einsum("ock,kl,odl->cd", Y, Gk, Y)                             # sum_r Y_r G_k Y_r^T
    A = Gc_chol.T @ Z @ Gc_chol
    _, vecs = torch.linalg.eigh(0.5 * (A + A.T))
    V = vecs[:, -r_in:].flip(-1)
    U = torch.linalg.solve_triangular(Gc_chol.T, V, upper=True)
    Q, _ = torch.linalg.qr(U)
    return Q


def _reconstruct(U_out, M, U_in, kk):
    """The weight ``(N, C*kk)`` of one group's Tucker-2 with core matrix ``M (R_out, R_in*kk)``."""
    core = M.reshape(M.shape[0], U_in.shape[1], kk)
    return grouped_tucker2_matrices(U_out[None], core[None], U_in[None])[0]


def _refit_group(W4, G, factors, n_iter_max, ridge):
    """One group's data-aware Tucker-2 from the plain ``factors``.

    Returns ``(best error^2, plain error^2, U_out, M, U_in, refined)``.
    """
    N, C, kk = W4.shape
    W0 = W4.reshape(N, C * kk)
    Gr4 = _ridged(G, ridge).reshape(C, kk, C, kk)
    Gc = torch.einsum("akck->ac", Gr4)
    Gk = torch.einsum("akal->kl", Gr4)
    Gc_chol = torch.linalg.cholesky(_ridged(Gc, ridge))
    U_out0, U_in0, core0 = (torch.as_tensor(t, dtype=torch.float64) for t in factors)
    r_out, r_in = U_out0.shape[1], U_in0.shape[1]
    M0 = core0.reshape(r_out, r_in * kk)

    def err(U_out, M, U_in):
        return output_sq_error((W0 - _reconstruct(U_out, M, U_in, kk))[None], G[None])

    plain = err(U_out0, M0, U_in0)
    best = (plain, U_out0, M0, U_in0, False)
    U_in, U_out = U_in0, U_out0
    for sweep in range(n_iter_max + 1):
        if sweep > 0:
            U_in = _best_in(W4, U_out, Gc_chol, Gk, r_in)
        H, BtGB = _tucker_pieces(W0, Gr4, U_in)
        chol = torch.linalg.cholesky(BtGB)
        if sweep == 0:  # plain factors with their least-squares core first
            M = _core(U_out0, H, chol)
            e = err(U_out0, M, U_in)
            if e < best[0]:
                best = (e, U_out0, M, U_in, True)
        U_out = _best_out(H, chol, r_out)
        M = _core(U_out, H, chol)
        e = err(U_out, M, U_in)
        previous = best[0]
        if e < best[0]:
            best = (e, U_out, M, U_in, True)
        if sweep > 0 and previous - e <= 1e-6 * previous:
            break
    return (best[0], plain) + best[1:]


def whitened_tucker2(kernels, gram, factors, *, n_iter_max=5, ridge=DEFAULT_RIDGE,
                     context="whitened_tucker2") -> WhitenedTucker2Factors:
    """Data-aware Tucker-2 of per-group kernels at the ranks of the given plain factors.

    ``kernels (g, N, C, *k)``; ``gram (P, P)`` or ``(g, P, P)`` with ``P = C*prod(k)``;
    ``factors``: per group ``(U_out (N, R_out), U_in (C, R_in), core (R_out, R_in, *k))`` of
    the plain Tucker-2 (the start, and the fallback). At most ``n_iter_max`` alternating
    sweeps. Returns :class:`~decomp.formats.tucker.WhitenedTucker2Factors` (float64):
    ``U_out (g, N, R_out)``, ``U_in (g, C, R_in)``, ``core (g, R_out, R_in, *k)``, ``error``
    (measured ``sqrt(sum_g tr(E G E^T))``, never above ``plain_error``), ``norm``
    (``sqrt(sum_g tr(W G W^T))``), ``weight_error``, ``weight_norm`` and ``fit``
    (``"data-aware"`` or ``"plain"``: which one was kept).
    """
    K = torch.as_tensor(kernels, dtype=torch.float64)
    g, N, C = K.shape[:3]
    ks = tuple(K.shape[3:])
    kk = math.prod(ks)
    G = _check_grams(gram, g, C * kk, context)
    out = dict(U_out=[], U_in=[], core=[])
    total = plain_total = norm_sq = weight_sq = 0.0
    improved = False
    for i in range(g):
        W4 = K[i].reshape(N, C, kk)
        e, plain, U_out, M, U_in, refined = _refit_group(W4, G[i], factors[i], n_iter_max, ridge)
        improved |= refined
        total += e
        plain_total += plain
        W0 = W4.reshape(N, -1)
        norm_sq += output_sq_error(W0[None], G[i][None])
        weight_sq += float(((W0 - _reconstruct(U_out, M, U_in, kk)) ** 2).sum())
        out["U_out"].append(U_out)
        out["U_in"].append(U_in)
        out["core"].append(M.reshape(U_out.shape[1], U_in.shape[1], *ks))
    stacked = {k: torch.stack(v) for k, v in out.items()}
    return WhitenedTucker2Factors(**stacked, error=math.sqrt(total), norm=math.sqrt(norm_sq),
                                  plain_error=math.sqrt(plain_total), weight_error=math.sqrt(weight_sq),
                                  weight_norm=float(torch.linalg.norm(K)), fit="data-aware" if improved else "plain")


# ----------------------------------------------------------------------------- PQ

def _padded_grams(gram, g, padded, context):
    """Validated per-group Grams ``(g, padded, padded)``; the padding columns are never excited (zero)."""
    G0 = torch.as_tensor(gram, dtype=torch.float64)
    P = G0.shape[-1]
    if P > padded:
        raise ValueError(f"{context}: gram of size {P} exceeds the row length {padded}")
    G = _check_grams(G0, g, P, context)
    if P < padded:
        grown = G.new_zeros(*G.shape[:-2], padded, padded)
        grown[..., :P, :P] = G
        G = grown
    return G, P


def _sub_space_metrics(G, n_sub, d, ridge):
    """Diagonal blocks ``G_JJ`` of every group and sub-space, ridged: ``(Gb (g*n_sub, d, d), its Cholesky L, prox)``."""
    g, padded = G.shape[0], G.shape[-1]
    idx = torch.arange(n_sub)
    blocks = G.reshape(g, n_sub, d, n_sub, d)[:, idx, :, idx].transpose(0, 1)          # (g, n_sub, d, d)
    scale = (torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / padded)[:, None, None, None]
    Gb = (blocks + ridge * scale * torch.eye(d, dtype=torch.float64)).reshape(g * n_sub, d, d)
    return Gb, torch.linalg.cholesky(Gb), ridge * float(scale.mean())


def _weighted_centroids(C, X, codes_b, Gb, g, n_sub, prox):
    """Weighted means: ``(sum_b n_bk G_b + prox I) c = sum_b G_b S_bk + prox c_old``, per codebook."""
    n_books, k, d = C.shape
    offsets = (torch.arange(g * n_sub) * k)[:, None]
    flat = (codes_b + offsets).reshape(-1)
    counts = torch.bincount(flat, minlength=g * n_sub * k).reshape(g, n_sub, k).double()
    sums = torch.zeros(g * n_sub * k, d, dtype=torch.float64).index_add_(0, flat, X.reshape(-1, d))
    sums = sums.reshape(g, n_sub, k, d)
    Gq = Gb.reshape(g, n_sub, d, d)
    if n_books == 1:
        A = torch.einsum("gjk,gjde->kde", counts, Gq)[None]
        rhs = torch.einsum("gjde,gjke->kd", Gq, sums)[None]
    else:
        A = torch.einsum("gjk,gjde->jkde", counts, Gq)
        rhs = torch.einsum("gjde,gjke->jkd", Gq, sums)
    A = A + prox * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(A, (rhs + prox * C)[..., None])[..., 0]


def weighted_pq(M, gram, codebooks, codes, block_size, *, groups=1, n_iter=50, convergence_tol=1e-6,
                ridge=DEFAULT_RIDGE, codebook_bits=16, context="weighted_pq") -> WeightedPQFactors:
    """Refine a PQ of ``M (rows, n_sub*d)`` (padded rows) under the input metric of ``gram``.

    ``gram (P, P)`` or ``(groups, P, P)`` with ``P <= n_sub*d`` (the un-padded row length;
    rows ``[i*rows/groups, (i+1)*rows/groups)`` see group ``i``'s Gram); ``codebooks
    (n_books, k, d)`` (``n_books`` 1 = shared, else one per sub-space) and ``codes (rows, n_sub)``
    the plain PQ (the start and the fallback). At most ``n_iter`` weighted Lloyd steps,
    stopped when the objective drops by at most ``convergence_tol`` relative. Returns
    :class:`~decomp.formats.pq.WeightedPQFactors` of shape ``(rows, P)`` (float64 codebooks):
    ``error`` and ``plain_error`` the measured output errors (sqrt of ``sum tr(E G E^T)``),
    ``norm`` the output norm, ``history`` the weighted objective per assignment
    (non-increasing) and ``fit`` (``"data-aware"`` or ``"plain"``).
    """
    Mf = torch.as_tensor(M, dtype=torch.float64)
    rows, padded = Mf.shape
    d, g = int(block_size), int(groups)
    n_sub = padded // d
    if rows % g:
        raise ValueError(f"{context}: {rows} rows do not split into {g} groups")
    G, P = _padded_grams(gram, g, padded, context)
    m = rows // g
    C0 = torch.as_tensor(codebooks, dtype=torch.float64)
    codes0 = torch.as_tensor(codes).long()
    Gb, L, prox = _sub_space_metrics(G, n_sub, d, ridge)
    X = Mf.reshape(g, m, n_sub, d).transpose(1, 2).reshape(g * n_sub, m, d)               # (B, m, d)
    Y = X @ L                                                                             # whitened points
    idx = torch.arange(n_sub)
    book = (idx if C0.shape[0] > 1 else torch.zeros_like(idx)).repeat(g)                 # codebook of batch b

    def full_error(C, codes):
        return output_sq_error((Mf - pq_decode(C, codes)).reshape(g, m, padded), G)

    C = C0.clone()
    codes_b = codes0.reshape(g, m, n_sub).permute(0, 2, 1).reshape(g * n_sub, m)
    history = []
    for it in range(n_iter + 1):
        if it > 0:
            codes_b, dist = assign_nearest(Y, C[book] @ L)
            obj = float(dist.sum())
        else:
            chosen = torch.gather(C[book], 1, codes_b[..., None].expand(-1, -1, d))
            obj = float((((X - chosen) @ L) ** 2).sum())
        history.append(obj)
        if it == n_iter or (it > 1 and history[-2] - history[-1] <= convergence_tol * history[-2]):
            break
        C = _weighted_centroids(C, X, codes_b, Gb, g, n_sub, prox)
    codes_new = codes_b.reshape(g, n_sub, m).permute(0, 2, 1).reshape(rows, n_sub)
    plain, refined = full_error(C0, codes0), full_error(C, codes_new)
    keep_new = refined < plain
    C, codes_kept = (C, codes_new) if keep_new else (C0, codes0)
    return WeightedPQFactors(codebooks=C, codes=codes_kept.to(code_dtype(C.shape[1])), shape=(rows, P), block_size=d,
                             error=math.sqrt(refined if keep_new else plain),
                             norm=math.sqrt(output_sq_error(Mf.reshape(g, m, padded), G)),
                             codebook_bits=int(codebook_bits), history=history, shared_codebook=C0.shape[0] == 1,
                             plain_error=math.sqrt(plain), fit="data-aware" if keep_new else "plain")


__all__ = ["whitened_tucker2", "weighted_pq", "output_sq_error"]
