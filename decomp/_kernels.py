"""Tensor kernels shared by the decompositions and the factor formats (torch tensors in and out).

Shape conventions: a mode-``n`` unfolding of ``T (I_1, ..., I_N)`` is ``(I_n, prod of the
other sizes)`` with the other modes in increasing order; ``matrix (J, I_n)`` in a mode
product replaces axis ``n`` by ``J``.
"""
from __future__ import annotations

import torch

SMALL_SVD_FLOPS = 2e7  # unfoldings below this size (m^2 c) get an exact SVD: full accuracy, cheap


def unfold(T: torch.Tensor, n: int) -> torch.Tensor:
    """Mode-n unfolding ``(I_n, prod of the other sizes)`` (other modes in increasing order)."""
    return T.movedim(n, 0).reshape(T.shape[n], -1)


def fold(M: torch.Tensor, n: int, shape) -> torch.Tensor:
    """Inverse of :func:`unfold`: ``M (I_n, rest)`` back to a tensor of ``shape``."""
    rest = [size for k, size in enumerate(shape) if k != n]
    return M.reshape([shape[n]] + rest).movedim(0, n)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor ×_mode matrix``: ``matrix (J, I_mode)`` replaces axis ``mode`` (size ``I_mode``) by ``J``."""
    moved = tensor.movedim(mode, 0)
    rest = moved.shape[1:]
    out = matrix @ moved.reshape(moved.shape[0], -1)
    return out.reshape((matrix.shape[0],) + tuple(rest)).movedim(0, mode)


def multi_mode_product(core: torch.Tensor, factors) -> torch.Tensor:
    """``core ×_1 factors[0] ×_2 ... ×_N factors[N-1]`` (``factors[n] (I_n, L_n)``, one per mode).

    The modes that grow least are expanded first, so the intermediates stay small.
    """
    X = core
    for n in sorted(range(core.ndim), key=lambda m: factors[m].shape[0] / max(factors[m].shape[1], 1)):
        X = mode_product(X, factors[n], n)
    return X


def khatri_rao(mats) -> torch.Tensor:
    """Column-wise Kronecker product of ``mats[k] (I_k, R)``: ``(prod I_k, R)``, first matrix most significant."""
    out = mats[0]
    for M in mats[1:]:
        out = (out[:, None, :] * M[None, :, :]).reshape(-1, out.shape[1])
    return out


def balanced_mode_split(shape) -> tuple:
    """Two groups of modes (each sorted) whose size products are balanced, largest modes dealt first.

    Used to keep Khatri-Rao halves at about ``sqrt(prod I) * R`` entries (CP reconstruction,
    the two-group dimension tree of CP-ALS). The second group is empty for a single mode.
    """
    groups, sizes = ([], []), [1, 1]
    for m in sorted(range(len(shape)), key=lambda m: -shape[m]):
        g = 0 if sizes[0] <= sizes[1] else 1
        groups[g].append(m)
        sizes[g] *= shape[m]
    return sorted(groups[0]), sorted(groups[1])


def prefers_gram(m: int, c: int) -> bool:
    """Whether the left basis of an ``(m, c)`` matrix is cheaper from ``eigh`` of its ``m x m`` Gram.

    True for a wide matrix above :data:`SMALL_SVD_FLOPS` (``m^2 c``); smaller or tall
    matrices get an exact SVD (full accuracy, cheap).
    """
    return m <= c and m * m * c > SMALL_SVD_FLOPS


def left_basis(X: torch.Tensor, gram: torch.Tensor | None = None):
    """Left singular basis and spectrum of ``X (m, c)``: ``(U, s)``, ``s`` descending.

    When :func:`prefers_gram` (or ``gram`` = ``X X^T`` is given for a wide ``X``): ``eigh``
    of the Gram, so ``U (m, m)`` and ``s = sqrt(max(eigenvalues, 0))`` (``m`` values),
    accurate to ``~1e-8 * s_1`` in each ``s_i`` (eigenvalues carry an absolute error
    ``~eps * s_1^2``). Otherwise an SVD of ``X``: ``U (m, min(m, c))``, ``s`` to full accuracy.
    """
    m, c = X.shape
    if prefers_gram(m, c) or (gram is not None and m <= c):
        lam, V = torch.linalg.eigh(X @ X.T if gram is None else gram)
        return V.flip(-1), lam.flip(-1).clamp_min(0).sqrt()
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U, S


def leading_left_vectors(T: torch.Tensor, n: int) -> torch.Tensor:
    """All left singular vectors of the mode-n unfolding, leading first (``eigh`` of its Gram, ``(I_n, I_n)``)."""
    X = unfold(T, n)
    _, vecs = torch.linalg.eigh(X @ X.T)
    return vecs.flip(-1)


# --------------------------------------------------------------------------- BLAS-3 kernels with structure

_BLAS = {}


def _blas():
    """``(scipy.linalg.blas module, threadpoolctl BLAS controller)`` or None when either is unavailable
    (loaded once)."""
    if "blas" not in _BLAS:
        try:
            from scipy.linalg import blas
            from threadpoolctl import ThreadpoolController
            _BLAS["blas"] = (blas, ThreadpoolController().select(user_api="blas"))
        except ImportError:  # pragma: no cover - both ship with the project's dependencies
            _BLAS["blas"] = None
    return _BLAS["blas"]


def _blas_for(*tensors):
    """The BLAS access of :func:`_blas` when every tensor is a float32/float64 CPU tensor of one dtype, else None."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.dtype != first.dtype or t.device != first.device or t.numel() == 0 for t in tensors):
        return None
    return _blas()


def symmetric_gram(R: torch.Tensor, of_rows: bool = False) -> torch.Tensor:
    """``R^T R`` of ``R (N, P)`` (``R R^T`` with ``of_rows=True``) in ``R``'s dtype, exactly symmetric.

    On the CPU (float32/float64) the symmetric rank-N update (BLAS ``syrk``: one triangle, half
    the multiplications of a general product, on ``torch.get_num_threads()`` BLAS threads);
    elsewhere a matmul; its upper triangle mirrored (:func:`gram_upper_triangle`).
    """
    return mirror_upper(gram_upper_triangle(R, of_rows))


def gram_upper_triangle(R: torch.Tensor, of_rows: bool = False) -> torch.Tensor:
    """The upper triangle of ``R^T R`` ``(P, P)`` of ``R (N, P)`` (of ``R R^T`` ``(N, N)`` with
    ``of_rows=True``) in ``R``'s dtype, its strict lower part zero.

    On the CPU (float32/float64) BLAS ``syrk`` (half the multiplications of a general product);
    elsewhere the upper triangle of a matmul. :func:`mirror_upper` makes the full Gram of it, so
    sums of several triangles are mirrored once."""
    access = _blas_for(R)
    if access is None:
        return torch.triu(R @ R.T if of_rows else R.T @ R)
    blas, threads = access
    syrk = blas.dsyrk if R.dtype == torch.float64 else blas.ssyrk
    R = R.contiguous()
    with threads.limit(limits=torch.get_num_threads()):   # (P, N) Fortran view A = R^T: A A^T, or A^T A
        return torch.from_numpy(syrk(1.0, R.numpy().T, trans=int(of_rows)))


def mirror_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``upper`` (P, P) (its strict lower part must be zero)."""
    full = upper + upper.T
    full.diagonal().mul_(0.5)         # 2 d -> d: exact in binary floating point
    return full


def times_lower_triangular(M: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``M @ L`` for ``M (.., m, n)`` and a LOWER-triangular ``L (.., n, n)`` (its upper part is not read on the CPU).

    On the CPU (float32/float64) the triangular product (BLAS ``trmm``: half the
    multiplications of a general product) per block, on ``torch.get_num_threads()`` BLAS
    threads; elsewhere a matmul. Same result as ``M @ L.tril()`` up to rounding.
    """
    access = _blas_for(M, L)
    if access is None:
        return M @ L
    blas, threads = access
    trmm = blas.dtrmm if M.dtype == torch.float64 else blas.strmm
    Mb, Lb = M.reshape(-1, *M.shape[-2:]), L.reshape(-1, *L.shape[-2:]).expand(M.shape[:-2].numel() or 1, -1, -1)
    out = []
    with threads.limit(limits=torch.get_num_threads()):
        for block, factor in zip(Mb, Lb):
            # (M L)^T = L^T M^T, with M^T the Fortran reading of C-ordered M; L as it is stored: a Fortran
            # (column-major, LAPACK's) L is read as lower and transposed, a C-ordered one read as upper L^T
            fortran = factor.mT.is_contiguous()
            a = factor.mT.numpy().T if fortran else factor.contiguous().numpy().T
            product = trmm(1.0, a, block.contiguous().numpy().T, side=0, lower=int(fortran), trans_a=int(fortran))
            out.append(torch.from_numpy(product).T)
    return torch.stack(out).reshape(M.shape)
