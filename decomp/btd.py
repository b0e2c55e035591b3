"""Block-term decomposition: a sum of Tucker blocks, fitted by monotone ALS.

Model and shape conventions: an N-way array ``A (I_1, ..., I_N)``, N >= 3, is
approximated by ``Â = sum_b G_b ×_1 U_b^(1) ×_2 ... ×_N U_b^(N)`` with cores
``G_b (L_b1, ..., L_bN)`` and factors ``U_b^(n) (I_n, L_bn)`` (orthonormal columns).
This is the rank-(L, M, N, ...) block-term decomposition of De Lathauwer (2008), used
for conv kernels ``(out, in, kh, kw)`` by Wang & Cheng (2016); Tensorlab calls it BTD.
One block is a Tucker decomposition; rank-1 blocks give CP.

Algorithm (alternating least squares, De Lathauwer & Nion 2008, with block-wise cores):

* init ``"hosvd"`` (deterministic): per mode, the leading left singular vectors of the
  unfolding are dealt out to the blocks in turn (block 1 gets the first ``L_1n``, block 2
  the next ``L_2n``, ..., wrapping around when the blocks need more than ``I_n``);
  ``"random"``: random orthonormal factors from ``random_state``. The cores are then fitted
  block by block to the residual (the same step as below), starting from zero blocks.
* one sweep = for each mode n, the exact least-squares update of all blocks' mode-n
  factors at once (stacked ``[U_1^(n) ... U_B^(n)]``, normal equations built from small
  Gram products, no large Kronecker product; pseudo-inverse on the spectrum of the
  normal matrix), re-orthonormalised by QR with ``R`` pushed into the cores (the model
  is unchanged); then each core in turn is replaced by its exact least-squares value
  against the residual of the other blocks, ``G_b = (E + block_b) ×_n U_b^(n)T``.
  Every step minimises the error over a subset of the variables, so the error never
  increases; a sweep that increases it numerically is rolled back and the fit stops
  (``info["stalled"]``). The error history is ``info["errors"]``.

``error`` is ``||A - Â||_F`` measured exactly a posteriori in float64 from the explicit
residual; there is no a-priori bound (``error_bound`` is None).
"""
from __future__ import annotations

import math

import torch

from ._backend import as_compute_tensor, check_iteration_options, make_generator
from ._kernels import leading_left_vectors, mode_product, multi_mode_product, unfold
from .formats.btd import BlockTermFactors, btd_num_params
from .rank import InfeasibleRankError, largest_rank_within

INITS = ("hosvd", "random")


def btd(A, rank=None, *, n_blocks=None, ratio=None, energy=None, tol=None, n_iter_max=100, convergence_tol=1e-8,
        init="hosvd", n_init=4, random_state=None, compute_dtype=None, context="") -> BlockTermFactors:
    """Block-term decomposition of an N-way array ``A (I_1, ..., I_N)``, N >= 3.

    ``n_blocks`` (int >= 1; implied by a per-block ``rank`` sequence) Tucker blocks and
    exactly one of

    * ``rank=(L_1, ..., L_N)``: the multilinear rank of every block (``1 <= L_n <= I_n``),
      or a sequence of ``n_blocks`` such tuples, one per block;
    * ``ratio=q``: uniform blocks of multilinear rank ``(min(L, I_1), ..., min(L, I_N))``
      with the largest integer L whose ``num_params`` stays ``<= q * prod(I_n)``
      (the modes smaller than L are kept whole, e.g. the 3x3 of a conv kernel).

    ``energy=`` and ``tol=`` are refused: a block-term decomposition has no spectrum and
    no nested ranks to read them from.

    ``n_iter_max`` ALS sweeps at most; stops when the relative error decreases by less
    than ``convergence_tol`` in a sweep. ``init`` in ``("hosvd", "random")`` (see module doc).
    ALS on block terms has local minima and swamps: ``n_init`` starts (the first from
    ``init``, the others random) are screened for a few sweeps and the best is continued
    (see :func:`btd_als`). ``random_state`` (int, Generator or None = seed 0, see
    :func:`decomp._backend.make_generator`) seeds the random starts, so results are deterministic.
    Math runs in ``compute_dtype`` (float64 by default); the factors come back in the
    input's kind (numpy / torch) and dtype.

    Returns :class:`~decomp.formats.btd.BlockTermFactors`; ``error`` is the exact
    a-posteriori error ``||A - Â||_F`` (``error_bound`` is None); ``info["errors"]`` the relative error after the
    initialisation and after every sweep (non-increasing).
    """
    context = context or "btd"
    if energy is not None or tol is not None:
        what = "energy=" if energy is not None else "tol="
        raise ValueError(f"{context}: {what} is not supported by the block-term decomposition: it has no spectrum "
                         f"and its ranks are not nested; pass rank=(L_1, ..., L_N) with n_blocks=, or ratio= "
                         f"(or use decomp.tucker, which supports energy=/tol=)")
    if (rank is None) == (ratio is None):
        raise ValueError(f"{context}: pass exactly one of rank=(L_1, ..., L_N) (with n_blocks=) or ratio= "
                         f"(got rank={rank!r}, ratio={ratio!r})")
    per_block = isinstance(rank, (tuple, list)) and rank and all(isinstance(r, (tuple, list)) for r in rank)
    if n_blocks is None and per_block:
        n_blocks = len(rank)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int):
        raise TypeError(f"{context}: n_blocks= must be an int >= 1, got {n_blocks!r}")
    if n_blocks < 1:
        raise ValueError(f"{context}: n_blocks={n_blocks} must be >= 1")
    T, kind = as_compute_tensor(A, name=context, compute_dtype=compute_dtype)
    shape = tuple(T.shape)
    if T.ndim < 3:
        raise ValueError(f"{context}: the block-term decomposition needs an array with at least 3 dimensions, "
                         f"got shape {shape}; for a matrix use decomp.svd")
    where = f"{context} (shape {shape})"
    check_iteration_options(where, n_iter_max, convergence_tol, init, INITS)
    if rank is not None:
        ranks = _block_ranks(rank, n_blocks, shape, where)
    else:
        ranks = _ranks_for_ratio(ratio, n_blocks, shape, where)
    blocks, info = btd_als(T, ranks, n_iter_max=n_iter_max, convergence_tol=convergence_tol, init=init,
                           n_init=n_init, random_state=random_state)
    norm = float(torch.linalg.norm(T))
    blocks = [(kind.restore(G), [kind.restore(U) for U in Us]) for G, Us in blocks]
    return BlockTermFactors(blocks, error=info["error"], norm=norm, info=info)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _block_ranks(rank, n_blocks, shape, where):
    """Normalise ``rank`` to a list of ``n_blocks`` tuples of length ``ndim``, validated."""
    if not isinstance(rank, (tuple, list)) or not rank:
        raise TypeError(f"{where}: rank= must be a tuple (L_1, ..., L_N) of ints, one per mode, or a sequence "
                        f"of n_blocks such tuples; got {rank!r}")
    if all(isinstance(r, (tuple, list)) for r in rank):
        if len(rank) != n_blocks:
            raise ValueError(f"{where}: rank= gives {len(rank)} block ranks for n_blocks={n_blocks}")
        ranks = [tuple(r) for r in rank]
    else:
        ranks = [tuple(rank)] * n_blocks
    for r in ranks:
        if not all(_is_int(v) for v in r):
            raise TypeError(f"{where}: rank= entries must be ints, got {r!r}")
        if len(r) != len(shape):
            raise ValueError(f"{where}: rank={r!r} has {len(r)} entries for a {len(shape)}-D array; "
                             f"pass one rank per mode")
        if any(v < 1 for v in r):
            raise ValueError(f"{where}: rank={r!r}: every block rank must be >= 1")
        bad = [n for n, (v, s) in enumerate(zip(r, shape)) if v > s]
        if bad:
            n = bad[0]
            reason = f"block rank {r!r} exceeds the mode sizes (mode {n}: {r[n]} > {shape[n]})"
            raise InfeasibleRankError(f"{where}: {reason}", reason)
    return ranks


def _ranks_for_ratio(ratio, n_blocks, shape, where):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{where}: ratio= must be a number, got {type(ratio).__name__}")
    if not 0 < ratio <= 1:
        raise ValueError(f"{where}: ratio={ratio!r} is outside (0, 1]")

    def uniform(L):
        return tuple(min(L, I) for I in shape)

    L = largest_rank_within(lambda L: btd_num_params(shape, [uniform(L)] * n_blocks), ratio * math.prod(shape),
                            max(shape), where)
    return [uniform(L)] * n_blocks


# ----------------------------------------------------------------------------- ALS core

def _project(T, Us, skip=None):
    """``T ×_m U_m^T`` for every mode m except ``skip`` (largest reduction first)."""
    modes = [m for m in range(T.ndim) if m != skip]
    X = T
    for m in sorted(modes, key=lambda m: Us[m].shape[1] / Us[m].shape[0]):
        X = mode_product(X, Us[m].T, m)
    return X


def _init(T, ranks, init, generator):
    N = T.ndim
    factors = [[None] * N for _ in ranks]
    for n in range(N):
        size = T.shape[n]
        if init == "hosvd":
            vecs = leading_left_vectors(T, n)
            start = 0
            for b, r in enumerate(ranks):
                idx = torch.arange(start, start + r[n]) % size
                factors[b][n] = vecs[:, idx].contiguous()
                start += r[n]
        else:
            for b, r in enumerate(ranks):
                G = torch.randn(size, r[n], generator=generator, dtype=T.dtype)
                factors[b][n] = torch.linalg.qr(G).Q
    return factors


def _update_cores(T, E, cores, factors, blocks):
    """Gauss-Seidel over blocks: each core becomes its LS value for the residual of the others."""
    for b in range(len(cores)):
        Rb = E + blocks[b]
        cores[b] = _project(Rb, factors[b])
        blocks[b] = multi_mode_product(cores[b], factors[b])
        E = Rb - blocks[b]
    return E


def _pinv_solve(normal, rhs):
    """Minimum-norm solution of ``normal x = rhs`` (symmetric PSD ``normal``) via its spectrum."""
    evals, evecs = torch.linalg.eigh(normal)
    keep = evals > evals.max().clamp_min(0) * 1e-13
    if not bool(keep.any()):
        return None
    return (evecs[:, keep] / evals[keep]) @ (evecs[:, keep].T @ rhs)


def _update_mode(T, n, cores, factors):
    """Exact LS update of every block's mode-n factor at once; QR with R pushed into the cores."""
    B, N = len(cores), T.ndim
    rhs, unfolded = [], [unfold(G, n) for G in cores]
    for b in range(B):
        Y = _project(T, factors[b], skip=n)
        rhs.append(unfold(Y, n) @ unfolded[b].T)
    sizes = [G.shape[n] for G in cores]
    normal = torch.zeros(sum(sizes), sum(sizes), dtype=T.dtype)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    for b in range(B):
        for c in range(b, B):
            W = cores[c]
            for m in range(N):
                if m != n:
                    W = mode_product(W, factors[b][m].T @ factors[c][m], m)
            block = unfolded[b] @ unfold(W, n).T
            normal[offsets[b]:offsets[b + 1], offsets[c]:offsets[c + 1]] = block
            if c != b:
                normal[offsets[c]:offsets[c + 1], offsets[b]:offsets[b + 1]] = block.T
    solved = _pinv_solve(normal, torch.cat(rhs, dim=1).T)
    if solved is None:
        return  # all blocks are zero: nothing to update
    stacked = solved.T
    for b in range(B):
        U = stacked[:, offsets[b]:offsets[b + 1]]
        Q, Rq = torch.linalg.qr(U)
        factors[b][n] = Q
        cores[b] = mode_product(cores[b], Rq, n)


def _als_loop(T, cores, factors, n_iter, convergence_tol, scale, offset2=0.0):
    """ALS sweeps from fitted cores; returns ``(cores, factors, errors, sweeps, converged, stalled)``.

    ``errors`` are ``sqrt(offset2 + ||T - Â||^2) / scale`` (``offset2``: the squared error
    already lost by a compression), starting with the error of the starting point.
    """
    blocks = [multi_mode_product(G, Us) for G, Us in zip(cores, factors)]
    E = T - sum(blocks)
    err = float(torch.linalg.norm(E))
    errors = [math.sqrt(offset2 + err ** 2) / scale]
    converged = stalled = False
    sweeps = 0
    while sweeps < n_iter and err > 0:
        saved = ([G.clone() for G in cores], [list(Us) for Us in factors])
        for n in range(T.ndim):
            _update_mode(T, n, cores, factors)
        blocks = [multi_mode_product(G, Us) for G, Us in zip(cores, factors)]
        E = _update_cores(T, T - sum(blocks), cores, factors, blocks)
        new = float(torch.linalg.norm(E))
        sweeps += 1
        if not math.isfinite(new) or new > err:  # rounding (or worse): roll the sweep back and stop
            cores, factors = saved
            stalled = True
            break
        err = new
        errors.append(math.sqrt(offset2 + err ** 2) / scale)
        if errors[-2] - errors[-1] < convergence_tol:
            converged = True
            break
    return cores, factors, errors, sweeps, converged or err == 0, stalled


def _start(T, ranks, init, generator):
    factors = _init(T, ranks, init, generator)
    cores = [torch.zeros(r, dtype=T.dtype) for r in ranks]
    _update_cores(T, T.clone(), cores, factors, [torch.zeros_like(T) for _ in ranks])
    return cores, factors


def btd_als(T: torch.Tensor, ranks, *, n_iter_max=100, convergence_tol=1e-8, init="hosvd", n_init=4,
            screen_iter=10, random_state=None):
    """Monotone ALS for a block-term decomposition of a validated compute tensor ``T``.

    ``ranks``: one multilinear-rank tuple per block. When the blocks' summed ranks
    ``P_n = sum_b L_bn`` are below a mode size, ``T`` is first compressed to its
    ``(P_1, ..., P_N)`` HOSVD core (lossless for an exact block-term tensor: every block
    lies in those subspaces), ALS runs on the core, and the expanded fit is refined by
    sweeps on ``T`` itself. ALS on block terms has local minima, so ``n_init`` starts are
    screened for ``screen_iter`` sweeps on the (compressed) tensor, the first from
    ``init`` and the others random (from ``random_state``: deterministic), and the best is
    continued. Returns ``(blocks, info)`` with ``blocks = [(core, [U_n])]`` in ``T``'s
    dtype; ``info`` has ``iterations`` (sweeps of the kept start), ``converged``,
    ``stalled``, ``errors`` (relative, non-increasing), ``compressed_to`` and ``error``
    (``||T - Â||_F``, exact).
    """
    generator = make_generator(random_state)
    norm = float(torch.linalg.norm(T))
    scale = norm if norm > 0 else 1.0
    P = [min(I, sum(r[n] for r in ranks)) for n, I in enumerate(T.shape)]
    compressed = any(p < I for p, I in zip(P, T.shape))
    if compressed:
        Q = [leading_left_vectors(T, n)[:, :p] for n, p in enumerate(P)]
        S = _project(T, Q)
        lost2 = max(norm ** 2 - float(torch.linalg.norm(S)) ** 2, 0.0)
    else:
        S, lost2 = T, 0.0
    starts = [init] + ["random"] * (max(1, n_init) - 1)
    best = None
    for start in starts:
        cores, factors = _start(S, ranks, start, generator)
        run = _als_loop(S, cores, factors, min(screen_iter, n_iter_max), convergence_tol, scale, lost2)
        if best is None or run[2][-1] < best[2][-1]:
            best = run
        if best[2][-1] * scale <= 1e-10 * scale + math.sqrt(lost2):
            break  # exact on the core: no need to screen further
    cores, factors, errors, sweeps, converged, stalled = best
    if not (converged or stalled) and sweeps < n_iter_max:
        cores, factors, more, extra, converged, stalled = _als_loop(S, cores, factors, n_iter_max - sweeps,
                                                                    convergence_tol, scale, lost2)
        errors, sweeps = errors + more[1:], sweeps + extra
    if compressed:
        factors = [[Qn @ U for Qn, U in zip(Q, Us)] for Us in factors]
        if lost2 > 0 and sweeps < n_iter_max:
            cores, factors, more, extra, converged_full, stalled = _als_loop(T, cores, factors, n_iter_max - sweeps,
                                                                             convergence_tol, scale)
            # the refinement starts from the expanded fit, whose error is errors[-1] up to rounding
            errors, sweeps = errors + [min(e, errors[-1]) for e in more[1:]], sweeps + extra
            converged = converged_full
    error = float(torch.linalg.norm(T - sum(multi_mode_product(G, Us) for G, Us in zip(cores, factors))))
    info = dict(iterations=sweeps, converged=converged, stalled=stalled, errors=errors, n_init=len(starts),
                compressed_to=tuple(P) if compressed else None, error=error)
    return [(G, Us) for G, Us in zip(cores, factors)], info


__all__ = ["btd", "btd_als", "INITS"]
