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
