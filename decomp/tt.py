"""Tensor-train (TT-SVD, TT rounding) and TT-matrix decompositions with certified bounds.

TT-SVD (Oseledets 2011, SIAM J. Sci. Comput. 33(5), doi 10.1137/090752286) sweeps left to
right over the unfoldings ``C_k (r_{k-1} n_k, n_{k+1} ... n_d)``, keeps ``r_k`` left
singular vectors and carries ``U_k^T C_k`` on. Because every kept basis is orthonormal,

    ||A - B||_F^2 = sum_k eps_k^2,   eps_k = ||C_k - U_k U_k^T C_k||_F,

so ``error_bound = sqrt(sum_k eps_k^2)``, with each ``eps_k`` measured on the truncation
actually made. ``tol=eps`` truncates every bond at ``delta = eps / sqrt(d-1) * ||A||_F``,
which guarantees ``||A - B||_F <= eps * ||A||_F``.

Speed: each step takes ``eigh`` of the Gram of the (wide) unfolding, or an SVD when
the unfolding is tall; nothing forms an SVD of a long wide matrix.
TT-matrix (Novikov et al. 2015): ``W (out, in)`` reshaped to ``(m_1..m_d, n_1..n_d)``,
permuted to ``(m_1, n_1, ..., m_d, n_d)`` and TT-SVD'ed on the merged modes ``m_k n_k``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import as_compute_tensor, times_power_of_two, unit_scale
from ._kernels import left_basis
from .formats.tt import TTFactors, TTMatrixFactors, tt_num_params
from .rank import InfeasibleRankError, largest_rank_within, parse_rank_spec, rank_for_energy, tail_errors

TT_SPEC_KINDS = ("rank", "energy", "tol", "ratio")


def tt(A, rank=None, *, energy=None, tol=None, ratio=None, max_rank=None, compute_dtype=None,
       context="") -> TTFactors:
    """TT-SVD of ``A (n_1, ..., n_d)``, d >= 2, into cores ``(r_{k-1}, n_k, r_k)``, ``r_0 = r_d = 1``.

    Rank: exactly one of (parsed by :func:`decomp.rank.parse_rank_spec`; ``"vbmf"`` is not
    offered: TT bonds are unfoldings of already-truncated tensors, not noisy matrices)

    * ``rank=`` an int: a cap on every bond (``r_k = min(rank, largest possible)``), or a
      tuple of the ``d - 1`` bond ranks (each must satisfy ``r_k <= r_{k-1} n_k`` and
      ``r_k <= n_{k+1} r_{k+1}``, otherwise ValueError);
    * ``energy=`` per unfolding: ``r_k`` is the smallest rank keeping that fraction of the
      current unfolding's squared singular values;
    * ``tol=eps``: delta-truncation, certified ``||A - B||_F <= eps * ||A||_F``;
    * ``ratio=``: the largest uniform cap whose TT has ``<= ratio * A.numel`` parameters
      (bisection on the cap).

    ``max_rank`` additionally caps every bond (with ``tol=`` the tolerance may then be
    missed; ``error_bound`` always reports the truth). Math in ``compute_dtype`` (float64
    default); cores come back in ``A``'s kind and dtype.

    Returns :class:`~decomp.formats.tt.TTFactors`; ``error_bound = sqrt(sum_k eps_k^2)``
    (attained: ``error`` is the same number).
    """
    context = context or "tt"
    spec = parse_rank_spec(rank, energy, tol, ratio, allowed=TT_SPEC_KINDS, allow_tuple=True, context=context)
    T, kind = as_compute_tensor(A, name=context, compute_dtype=compute_dtype)
    if T.ndim < 2:
        raise ValueError(f"{context}: TT needs an array with at least 2 dimensions, got shape {tuple(T.shape)}")
    dims = tuple(T.shape)
    T, exponent = unit_scale(T)  # exact power-of-two scaling: squares stay finite for 1e-300 .. 1e300
    cores, errors, norm = tt_svd(T, dims, spec, max_rank, f"{context} (shape {dims})")
    scale = math.ldexp(1.0, exponent)
    bound = math.sqrt(sum(e * e for e in errors)) * scale
    cores[0] = times_power_of_two(cores[0], exponent)
    return TTFactors([kind.restore(c) for c in cores], error_bound=bound, norm=norm * scale, error=bound)


def max_tt_ranks(dims) -> tuple:
    """Largest possible bond ranks ``min(n_1...n_k, n_{k+1}...n_d)``, k = 1..d-1."""
    return tuple(min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims)))


def _bond_plan(spec, dims, max_rank, context):
    """Per-bond caps (None = chosen from the spectrum) and the delta of ``tol=``."""
    d = len(dims)
    limits = max_tt_ranks(dims)
    if max_rank is not None:
        if not isinstance(max_rank, (int, np.integer)) or isinstance(max_rank, bool) or max_rank < 1:
            raise ValueError(f"{context}: max_rank={max_rank!r} must be an int >= 1")
    caps = list(limits)
    if spec.kind == "rank" and isinstance(spec.value, tuple):
        ranks = spec.value
        if len(ranks) != d - 1:
            raise ValueError(f"{context}: rank={ranks!r} has {len(ranks)} entries; a {d}-D TT has {d - 1} bonds "
                             f"(pass one rank per bond, or an int cap)")
        full = (1,) + ranks + (1,)
        for k in range(1, d):
            left, right = full[k - 1] * dims[k - 1], dims[k] * full[k + 1]
            if full[k] > min(left, right):
                reason = (f"bond rank r_{k}={full[k]} exceeds min(r_{k - 1}*n_{k}, n_{k + 1}*r_{k + 1}) = "
                          f"min({left}, {right}), the largest TT rank possible there")
                raise InfeasibleRankError(f"{context}: {reason}", reason)
        if max_rank is not None and max(ranks) > max_rank:
            raise ValueError(f"{context}: rank={ranks!r} conflicts with max_rank={max_rank}; pass one of them")
        caps = list(ranks)
    elif spec.kind == "rank":
        caps = [min(spec.value, lim) for lim in limits]
    elif spec.kind == "ratio":
        top = max(limits)
        cap = largest_rank_within(lambda c: tt_num_params(dims, [min(c, lim) for lim in limits]),
                                  spec.value * math.prod(dims), top, context)
        caps = [min(cap, lim) for lim in limits]
    if max_rank is not None:
        caps = [min(c, max_rank) for c in caps]
    return caps


def tt_svd(T: torch.Tensor, dims, spec, max_rank=None, context="tt"):
    """TT-SVD of a compute tensor viewed as ``dims``; returns ``(cores, eps_k list, ||T||_F)``."""
    d = len(dims)
    caps = _bond_plan(spec, dims, max_rank, context)
    norm = float(torch.linalg.norm(T))
    delta = spec.value / math.sqrt(d - 1) * norm if spec.kind == "tol" else None
    cores, errors = [], []
    C = T.reshape(1, -1)
    r_prev = 1
    for k in range(d - 1):
        C = C.reshape(r_prev * dims[k], -1)
        U, B, r, err = _truncate(C, spec, caps[k], delta)
        cores.append(U.reshape(r_prev, dims[k], r))
        errors.append(err)
        C, r_prev = B, r
    cores.append(C.reshape(r_prev, dims[-1], 1))
    return cores, errors, norm


def _truncate(C, spec, cap, delta):
    """Truncate ``C (m, c)`` to rank r: ``(U (m, r), U^T C (r, c), r, eps = ||C - U U^T C||_F)``.

    The rank comes from the spectrum (Gram eigenvalues when ``C`` is large and wide, an
    SVD otherwise); ``eps`` is then measured on the truncation actually made, and for ``tol=``
    the rank is raised until the measured ``eps <= delta`` (only ever needed below the
    Gram's rounding floor, ~1e-7 relative).
    """
    limit = min(C.shape)
    V, S = left_basis(C)
    s = S.cpu().numpy()
    if spec.kind == "energy":
        r = rank_for_energy(s, spec.value)
    elif spec.kind == "tol":
        errs = tail_errors(s)
        ok = np.nonzero(errs <= delta)[0]
        r = max(1, int(ok[0])) if ok.size else limit
    else:
        r = cap
    r = min(r, cap, limit)
    while True:
        U = V[:, :r]
        B = U.T @ C
        err = _residual(C, U, B)
        if spec.kind != "tol" or err <= delta or r >= min(cap, limit):
            return U, B, r, err
        r += 1


def _residual(C, U, B) -> float:
    """``||C - U B||_F`` for orthonormal U and ``B = U^T C``: from ``||C||^2 - ||B||^2`` when
    that is far above rounding, else explicitly (no cancellation)."""
    c2, b2 = float(torch.linalg.norm(C)) ** 2, float(torch.linalg.norm(B)) ** 2
    if c2 - b2 > 1e-8 * c2:
        return math.sqrt(c2 - b2)
    return float(torch.linalg.norm(C - U @ B))


def tt_round(factors, rank=None, *, energy=None, tol=None, ratio=None, max_rank=None, context=""):
    """TT rounding (Oseledets 2011, Alg. 2) of :class:`TTFactors` or :class:`TTMatrixFactors`.

    Orthogonalizes right-to-left by QR, then truncates left-to-right by SVDs of the small
    cores. Rank spec as in :func:`tt` (``tol=eps`` relative to the norm of the TT being
    rounded: the rounding adds at most ``eps * ||B||_F``). The result's ``error_bound``
    is ``factors.error_bound`` + the rounding error (triangle inequality; None if the
    input had no bound), its ``norm`` is ``factors.norm``. Same type, kind and dtype out.
    """
    context = context or "tt_round"
    if not isinstance(factors, (TTFactors, TTMatrixFactors)):
        raise TypeError(f"{context}: expected TTFactors or TTMatrixFactors, got {type(factors).__name__}")
    spec = parse_rank_spec(rank, energy, tol, ratio, allowed=TT_SPEC_KINDS, allow_tuple=True, context=context)
    is_matrix = isinstance(factors, TTMatrixFactors)
    tensors, kinds = zip(*(as_compute_tensor(c, name=f"{context} core {k}") for k, c in enumerate(factors.cores)))
    kind = kinds[0]
    dims = tuple(math.prod(c.shape[1:-1]) for c in tensors)
    cores = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in tensors]
    d = len(cores)
    # right-to-left orthogonalization: cores 2..d become right-orthonormal
    for k in range(d - 1, 0, -1):
        r0, n, r1 = cores[k].shape
        Q, R = torch.linalg.qr(cores[k].reshape(r0, n * r1).T)
        cores[k] = Q.T.reshape(-1, n, r1)
        cores[k - 1] = torch.tensordot(cores[k - 1], R.T, dims=([2], [0]))
    norm_b = float(torch.linalg.norm(cores[0]))
    where = f"{context} (dims {dims}, ranks {factors.rank})"
    caps = _bond_plan(spec, dims, max_rank, where) if d > 1 else []
    delta = spec.value / math.sqrt(d - 1) * norm_b if spec.kind == "tol" and d > 1 else None
    errors = []
    for k in range(d - 1):
        r0, n, r1 = cores[k].shape
        U, B, r, err = _truncate(cores[k].reshape(r0 * n, r1), spec, caps[k], delta)
        cores[k] = U.reshape(r0, n, r)
        cores[k + 1] = torch.tensordot(B, cores[k + 1], dims=([1], [0]))
        errors.append(err)
    rounding = math.sqrt(sum(e * e for e in errors))
    bound = None if factors.error_bound is None else factors.error_bound + rounding
    if is_matrix:
        shapes = [(c.shape[1], c.shape[2]) for c in factors.cores]
        out = [c.reshape(c.shape[0], m, n, c.shape[-1]) for c, (m, n) in zip(cores, shapes)]
        return TTMatrixFactors([kind.restore(c) for c in out], error_bound=bound, norm=factors.norm,
                               algorithm="tt-round")
    return TTFactors([kind.restore(c) for c in cores], error_bound=bound, norm=factors.norm, algorithm="tt-round")


# --- TT-matrix -------------------------------------------------------------------------------

MAX_AUTO_PRIME = 16


def _prime_factors(n: int) -> list:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def _smooth_above(n: int, largest: int = 7) -> int:
    """Smallest m >= n whose prime factors are all <= ``largest``."""
    m = n
    while max(_prime_factors(m), default=1) > largest:
        m += 1
    return m


def balanced_factorization(n: int, d: int, *, max_prime: int = MAX_AUTO_PRIME, what: str = "dimension") -> tuple:
    """Split ``n`` into ``d`` factors as equal as possible (descending, padded with 1s).

    Greedy: prime factors, largest first, each multiplied into the currently smallest
    factor. Raises :class:`decomp.rank.InfeasibleRankError` (a ValueError) when ``n`` has a prime
    factor above ``max_prime`` (no balanced split exists): pass the shapes explicitly or zero-pad
    the dimension.
    """
    n, d = int(n), int(d)
    if n < 1 or d < 1:
        raise ValueError(f"cannot factorize {what} {n} into {d} factors")
    primes = sorted(_prime_factors(n), reverse=True)
    if primes and primes[0] > max_prime:
        smooth = _smooth_above(n)
        reason = (f"{what.rpartition(': ')[2]} {n} has the prime factor {primes[0]} > {max_prime}, so it has no "
                  f"balanced factorization; pass in_shape=/out_shape= explicitly, or zero-pad it to e.g. "
                  f"{smooth} = {'*'.join(map(str, sorted(_prime_factors(smooth))))}")
        prefix = what.rpartition(': ')[0]
        raise InfeasibleRankError(f"{prefix}: {reason}" if prefix else reason, reason)
    factors = [1] * d
    for p in primes:
        i = min(range(d), key=lambda j: factors[j])
        factors[i] *= p
    return tuple(sorted(factors, reverse=True))


def default_tt_order(out_dim: int, in_dim: int) -> int:
    """Default number of TT-matrix cores: ``ceil(log_8(max(out, in)))`` clipped to [2, 6]
    (factors of about 8: 4096 -> 4 cores of 8, 1024 -> 4, 25088 -> 5)."""
    return int(min(6, max(2, math.ceil(math.log(max(out_dim, in_dim, 2)) / math.log(8) - 1e-9))))


def _check_shape(name, shape, dim, context):
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{context}: {name}= must be a tuple of ints, got {shape!r}") from None
    if not shape or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{context}: {name}={shape!r} must be a non-empty tuple of positive ints")
    if math.prod(shape) != dim:
        raise ValueError(f"{context}: {name}={shape} multiplies to {math.prod(shape)}, but the weight's "
                         f"{'input' if name == 'in_shape' else 'output'} dimension is {dim}")
    return tuple(int(s) for s in shape)


def tt_matrix(W, rank=None, *, in_shape=None, out_shape=None, energy=None, tol=None, ratio=None, max_rank=None,
              d=None, compute_dtype=None, context="") -> TTMatrixFactors:
    """TT-matrix of ``W (out, in)`` — the torch ``Linear.weight`` layout, rows = outputs.

    ``out = prod(out_shape) = m_1...m_d`` and ``in = prod(in_shape) = n_1...n_d``; cores
    ``(r_{k-1}, m_k, n_k, r_k)``, params ``sum_k r_{k-1} m_k n_k r_k`` (Novikov et al.
    2015). Built by TT-SVD of ``W`` reshaped to ``(m_1..m_d, n_1..n_d)`` and permuted to
    ``(m_1 n_1, ..., m_d n_d)``. Omitted shapes are factorized automatically into ``d``
    balanced factors (``d`` given, or the other shape's length, or
    :func:`default_tt_order`), padded with 1s; a dimension with a prime factor > 16
    raises ValueError (pass the shapes or pad the dimension).

    Rank spec and guarantee as in :func:`tt` (``rank=`` int cap or ``d - 1`` bond ranks,
    ``energy=``, ``tol=`` with ``||W - Ŵ||_F <= tol * ||W||_F`` certified, ``ratio=`` of
    ``out * in``), plus ``max_rank``. Cores come back in ``W``'s kind and dtype.
    """
    context = context or "tt_matrix"
    spec = parse_rank_spec(rank, energy, tol, ratio, allowed=TT_SPEC_KINDS, allow_tuple=True, context=context)
    T, kind = as_compute_tensor(W, name=context, ndim=2, compute_dtype=compute_dtype)
    M, N = T.shape
    where = f"{context} (weight (out, in) = {(M, N)})"
    if d is not None and (not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1):
        raise ValueError(f"{where}: d={d!r} must be a positive int")
    if in_shape is not None:
        in_shape = _check_shape("in_shape", in_shape, N, where)
    if out_shape is not None:
        out_shape = _check_shape("out_shape", out_shape, M, where)
    order = len(in_shape) if in_shape is not None else len(out_shape) if out_shape is not None else d
    order = order if order is not None else default_tt_order(M, N)
    if d is not None and d != order:
        raise ValueError(f"{where}: d={d} disagrees with the given shape(s) of length {order}")
    if out_shape is None:
        out_shape = balanced_factorization(M, order, what=f"{where}: output dimension")
    if in_shape is None:
        in_shape = balanced_factorization(N, order, what=f"{where}: input dimension")
    if len(in_shape) != len(out_shape):
        raise ValueError(f"{where}: in_shape={in_shape} and out_shape={out_shape} need the same length")
    order = len(in_shape)
    if order < 2:
        raise ValueError(f"{where}: a TT-matrix needs at least 2 cores (in_shape={in_shape}); use svd for d=1")
    perm = [i for k in range(order) for i in (k, order + k)]
    dims = tuple(m * n for m, n in zip(out_shape, in_shape))
    merged = T.reshape(out_shape + in_shape).permute(perm).reshape(dims)
    cores, errors, norm = tt_svd(merged, dims, spec, max_rank, f"{where}, dims {dims}")
    cores = [c.reshape(c.shape[0], m, n, c.shape[-1]) for c, m, n in zip(cores, out_shape, in_shape)]
    bound = math.sqrt(sum(e * e for e in errors))
    return TTMatrixFactors([kind.restore(c) for c in cores], error_bound=bound, norm=norm, error=bound)


__all__ = ["tt", "tt_round", "tt_matrix", "tt_svd", "max_tt_ranks", "balanced_factorization", "default_tt_order",
           "TT_SPEC_KINDS"]
