"""Product quantization of weight matrices and conv kernels (k-means on sub-vectors).

References: Gong et al. 2014 (k-means / PQ of dense layers), Wu et al. 2016 (Q-CNN),
Stock et al. 2020 ("And the bit goes down"); ``block_size=1`` is the scalar weight
sharing of Deep Compression (Han et al. 2016).

Layout (Stock et al.): a weight ``W`` of shape ``(rows, *rest)`` (a Linear weight
``(out, in)``, or a conv weight ``(N, C/groups, *kernel)``) is viewed as the matrix
``W.reshape(rows, -1)``; each row is cut into ``n_sub = row_length / block_size``
contiguous sub-vectors. For a k x k conv this order is ``(channel, ky, kx)``, so
``block_size = k*k`` makes one sub-vector per (filter, input channel) kernel slice, and
``block_size = 2*k*k`` two consecutive channels' slices; for a 1x1 conv a block is
``block_size`` consecutive input channels. Sub-space ``j`` is column block ``j``.

* ``shared_codebook=True`` (default, Stock et al.): one k-means over all
  ``rows * n_sub`` sub-vectors, one codebook ``(1, k, d)`` per layer;
* ``shared_codebook=False`` (Gong/Jegou PQ): one k-means per sub-space over its
  ``rows`` sub-vectors, codebooks ``(n_sub, k, d)``.

K-means: k-means++ seeding, Lloyd iterations vectorized in torch (batched over sub-spaces,
chunked distances), seeded by ``random_state``, empty clusters re-seeded at the points
with the largest residual (which lowers the objective). The objective
``sum ||x - c(x)||^2`` is recorded after every assignment step (``history``) and never
increases. ``error`` is the measured residual ``||W - to_tensor()||_F`` (exact, a
posteriori: it is the square root of the final k-means objective, recomputed in float64);
PQ has no certified bound.

The result's format, decoding and size accounting live in :mod:`decomp.formats.pq`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import as_compute_tensor, describe, make_generator
from .formats.pq import ProductQuantized, code_dtype, pq_decode
from .rank import InfeasibleRankError

DEFAULT_MAX_CENTROIDS = 256
_CHUNK_ELEMENTS = 1 << 18  # point-centroid distances per chunk of the assignment step (1 MiB in float32: in cache)
_KEY_DTYPES = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}  # same width, mantissa bits


# ----------------------------------------------------------------------------- k-means

def _sq_norms(X):
    return X[..., 0] ** 2 if X.shape[-1] == 1 else (X * X).sum(-1)


def assign_nearest(X, C):
    """Nearest centroid of every point: X (B, n, d), C (B, k, d) -> (codes (B, n), dist2 (B, n)).

    Ties go to the lowest index (as ``argmin``). The returned squared distances are
    recomputed exactly from the chosen centroids.
    """
    if X.shape[-1] == 1:
        return _assign_scalar(X, C)
    return _assign(_lifted_points(X), X, C)


def _lifted_points(X):
    """``[x, 1, ||x||^2]`` per point, so that one batched GEMM with ``[-2c, ||c||^2, 1]`` gives ``||x - c||^2``."""
    return torch.cat([X, torch.ones_like(X[..., :1]), _sq_norms(X)[..., None]], dim=-1)


def _assign(Xl, X, C):
    """:func:`assign_nearest` with the lifted points ``Xl`` (:func:`_lifted_points`) computed once.

    Chunks of ``_CHUNK_ELEMENTS`` point-centroid distances stay in cache. The argmin of a
    chunk is found as the minimum of integer keys: a non-negative float's bit pattern orders
    like its value, so ``(bits with the low b bits cleared) | index`` (``k <= 2**b``) has its
    minimum at the smallest distance up to a relative ``2**(b - mantissa)``; rows whose chosen
    distance is not exactly the row minimum (near-ties, rounding below zero) are redone with
    ``argmin``, so the result is exactly the argmin's.
    """
    B, n, d = X.shape
    k = C.shape[1]
    Cl = torch.cat([-2 * C, _sq_norms(C)[..., None], torch.ones_like(C[..., :1])], dim=-1).transpose(1, 2)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * k))
    codes = torch.empty(B, n, dtype=torch.long, device=X.device)
    keys = _index_keys(X.dtype, B, min(step, n), k, X.device)
    for start in range(0, n, step):
        dist = torch.bmm(Xl[:, start:start + step], Cl)
        codes[:, start:start + step] = _chunk_argmin(dist, keys)
    # exact squared distances of the chosen centroids (the expansion above loses digits)
    chosen = torch.gather(C, 1, codes[..., None].expand(B, n, d))
    return codes, _sq_norms(X - chosen)


def _index_keys(dtype, B, rows, k, device):
    """``(mask of the kept high bits, index column, key buffer (B, rows, k))`` for :func:`_chunk_argmin`,
    or None (plain argmin)."""
    if dtype not in _KEY_DTYPES:
        return None
    key_dtype, mantissa = _KEY_DTYPES[dtype]
    bits = max(1, (k - 1).bit_length())
    if bits > mantissa - 13:  # keys would be too coarse: most rows would be redone
        return None
    return -(1 << bits), torch.arange(k, dtype=key_dtype, device=device), torch.empty(B, rows, k, dtype=key_dtype,
                                                                                      device=device)


def _chunk_argmin(dist, keys):
    """Row-wise argmin of ``dist (B, rows, k)`` (first index on ties), via integer keys when ``keys``."""
    if keys is None:
        return dist.argmin(-1)
    minimum = dist.amin(-1)
    high, index, buffer = keys
    key = torch.bitwise_and(dist.view(index.dtype), high, out=buffer[:, :dist.shape[1]]).bitwise_or_(index)
    codes = key.amin(-1).bitwise_and_(~high).long()
    exact = torch.gather(dist, -1, codes[..., None])[..., 0] == minimum
    if not bool(exact.all()):
        redo = ~exact
        codes[redo] = dist[redo].argmin(-1)
    return codes


def _assign_scalar(X, C):
    """1-D assignment by binary search between sorted centroids: O(n log k) instead of O(n k)."""
    B, n, _ = X.shape
    values, order = C[..., 0].sort(dim=1)                        # (B, k)
    mids = (values[:, 1:] + values[:, :-1]) / 2                  # decision boundaries
    pos = torch.searchsorted(mids.contiguous(), X[..., 0].contiguous())   # (B, n) in sorted order
    codes = torch.gather(order, 1, pos)
    chosen = torch.gather(C[..., 0], 1, codes)
    return codes, (X[..., 0] - chosen) ** 2


def _kmeans_pp(X, k, generator):
    """k-means++ seeding (Arthur & Vassilvitskii 2007), batched over B independent sets."""
    B, n, d = X.shape
    rows = torch.arange(B, device=X.device)
    first = torch.randint(n, (B,), generator=generator).to(X.device)
    C = torch.empty(B, k, d, dtype=X.dtype, device=X.device)
    C[:, 0] = X[rows, first]
    d2 = _sq_norms(X - C[:, :1])
    diff, cum, new = torch.empty_like(X), torch.empty_like(d2), torch.empty_like(d2)  # reused: no allocation per step
    for j in range(1, k):
        # sample with probability d2 / sum(d2) by inverse CDF (torch.multinomial is slow for large n)
        torch.cumsum(d2, -1, out=cum)
        total = cum[:, -1:]
        u = torch.rand(B, 1, generator=generator, dtype=X.dtype).to(X.device) * total
        pick = torch.searchsorted(cum, u, right=True)[:, 0].clamp_max(n - 1)
        flat = total[:, 0] <= 0              # every point already a centroid: pick uniformly
        if flat.any():
            pick[flat] = torch.randint(n, (int(flat.sum()),), generator=generator).to(X.device)
        C[:, j] = X[rows, pick]
        torch.sub(X, C[:, j:j + 1], out=diff)
        torch.minimum(d2, torch.sum(diff.square_(), -1, out=new), out=d2)
    return C


def kmeans(X, n_centroids: int, *, n_iter: int = 50, convergence_tol: float = 1e-6, random_state=None):
    """Batched k-means on ``X (B, n, d)`` (a float tensor); returns ``(C, codes, history)``.

    ``C (B, k, d)`` centroids, ``codes (B, n)`` int64, ``history`` the objective
    ``sum_b sum_i ||x_bi - C_b[codes_bi]||^2`` after every assignment step (non-increasing;
    the last entry is the objective of the returned pair). Stops after ``n_iter`` Lloyd
    steps or when the relative decrease is <= ``convergence_tol``. ``random_state`` as
    everywhere in :mod:`decomp` (:func:`decomp._backend.make_generator`).
    """
    B, n, d = X.shape
    k = int(n_centroids)
    generator = make_generator(random_state)
    C = _kmeans_pp(X, k, generator)
    history = []
    offsets = (torch.arange(B, device=X.device) * k)[:, None]
    lifted = _lifted_points(X) if d > 1 else None
    for it in range(n_iter + 1):
        codes, dist = _assign(lifted, X, C) if d > 1 else _assign_scalar(X, C)
        history.append(float(dist.sum()))
        if it == n_iter or (it > 0 and history[-2] - history[-1] <= convergence_tol * history[-2]):
            break
        counts = torch.bincount((codes + offsets).reshape(-1), minlength=B * k).reshape(B, k)
        _repair_empty(codes, dist, counts)
        flat = (codes + offsets).reshape(-1)
        sums = torch.zeros(B * k, d, dtype=X.dtype, device=X.device).index_add_(0, flat, X.reshape(-1, d))
        counts = torch.bincount(flat, minlength=B * k).reshape(B, k)
        means = sums.reshape(B, k, d) / counts.clamp_min(1)[..., None]
        C = torch.where(counts[..., None] > 0, means, C)
    return C, codes, history


def _repair_empty(codes, dist, counts):
    """Move every empty cluster to the point of largest residual (in place on codes/dist)."""
    for b, j in (counts == 0).nonzero().tolist():
        worst = int(dist[b].argmax())
        if dist[b, worst] <= 0:
            return  # every point already sits on a centroid: nothing to gain
        codes[b, worst] = j
        dist[b, worst] = 0.0


# ----------------------------------------------------------------------------- PQ

def default_block_size(shape) -> int:
    """Stock et al.'s small-block default: the kernel area for k x k convs, else 4."""
    area = math.prod(int(s) for s in shape[2:]) if len(shape) > 2 else 1
    return area if area > 1 else 4


def block_for_bits(row_length: int, rows: int, bits: float, *, max_centroids=DEFAULT_MAX_CENTROIDS, pad=False):
    """``(block_size, k)`` with ``log2(k) / block_size == bits`` code bits per weight.

    Takes the largest block size ``d`` (a divisor of the row length unless ``pad``) for
    which ``k = 2**(bits*d)`` is an integer, ``<= max_centroids`` and ``<= rows * n_sub``
    (the number of sub-vectors). Raises :class:`decomp.rank.InfeasibleRankError` (a ValueError: a valid
    request this shape cannot meet) if no block size fits.
    """
    best = None
    for d in range(1, row_length + 1):
        if row_length % d and not pad:
            continue
        exponent = bits * d
        if abs(exponent - round(exponent)) > 1e-9:
            continue
        k = 2 ** int(round(exponent))
        if k > max_centroids or k > rows * -(-row_length // d):
            continue
        best = (d, k)
    if best is None:
        reason = (f"bits={bits!r}: no block size d with 2**(bits*d) an integer number of centroids <= {max_centroids} "
                  f"and <= the number of sub-vectors ({rows} rows) fits rows of length {row_length}; pass block_size= "
                  f"and n_centroids= explicitly, or fewer bits=")
        raise InfeasibleRankError(reason, reason)
    return best


def _sub_vectors(M, d, shared):
    """M (rows, n_sub*d) -> X (B, n, d): one set per sub-space, or one shared set."""
    rows, length = M.shape
    n_sub = length // d
    blocks = M.reshape(rows, n_sub, d)
    return blocks.reshape(1, rows * n_sub, d) if shared else blocks.transpose(0, 1).contiguous()


def pq(W, n_centroids: int | None = None, *, block_size: int | None = None, bits: float | None = None,
       tol: float | None = None, shared_codebook: bool = True, pad: bool = False, n_iter: int = 50,
       max_centroids: int = DEFAULT_MAX_CENTROIDS, codebook_bits: int = 16, random_state=None,
       compute_dtype=None, context: str = "") -> ProductQuantized:
    """Product-quantize ``W`` (rows, *rest) with k-means on sub-vectors (see module docstring).

    Exactly one of ``n_centroids`` (k), ``bits`` (code bits per weight,
    ``log2(k) / block_size``) or ``tol`` (relative Frobenius error target) sets k:

    * ``n_centroids=k``: ``block_size`` defaults to :func:`default_block_size`;
    * ``bits=b``: with ``block_size`` given, ``k = 2**(b * block_size)``; without it,
      :func:`block_for_bits` picks the largest block size whose k fits ``max_centroids``;
    * ``tol=t``: the smallest ``k = 2**j`` (or k = the number of sub-vectors, which is
      exact) whose measured relative error ``||W - W^||_F / ||W||_F <= t``.

    ``pad=True`` zero-pads rows to a multiple of ``block_size`` (padding is dropped on
    decoding); otherwise a non-dividing block size is an error. ``n_iter`` k-means steps
    at most; ``random_state`` seeds k-means (same seed, same codes).
    Returns :class:`~decomp.formats.pq.ProductQuantized` (``error`` measured).
    """
    context = context or "pq"
    given = {k: v for k, v in dict(n_centroids=n_centroids, bits=bits, tol=tol).items() if v is not None}
    if len(given) != 1:
        what = "none" if not given else " and ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"{context}: pass exactly one of n_centroids=, bits=, tol= (got {what})")
    T, kind = as_compute_tensor(W, name=context, compute_dtype=compute_dtype)
    if T.ndim < 2:
        raise ValueError(f"{context}: expected a weight with >= 2 dims (rows, ...), got {describe(W)}")
    shape = tuple(T.shape)
    rows, row_length = shape[0], math.prod(shape[1:])
    block_size, n_centroids = _codebook_size(shape, block_size, n_centroids, bits, tol, pad, max_centroids,
                                             f"{context}: ", describe(W))
    n_sub = -(-row_length // block_size)
    M = T.reshape(rows, row_length)
    if n_sub * block_size != row_length:
        M = torch.cat([M, M.new_zeros(rows, n_sub * block_size - row_length)], dim=1)
    X = _sub_vectors(M, block_size, shared_codebook)
    where = f"{'the layer' if shared_codebook else 'each sub-space'} ({describe(W)}, block_size={block_size})"
    norm = float(torch.linalg.norm(T))
    k, C, codes, history = _fit_codebook(X, n_centroids, tol, norm, n_iter, random_state, f"{context}: ", where)
    # codes back to (rows, n_sub), codebooks (n_books, k, d)
    codes = codes.reshape(rows, n_sub) if shared_codebook else codes.transpose(0, 1)
    error = float(torch.linalg.norm(M[:, :row_length] - pq_decode(C, codes, row_length)))
    dtype = code_dtype(k, numpy=kind.is_numpy)
    codes_out = codes.cpu().numpy().astype(dtype) if kind.is_numpy else codes.to(dtype=dtype, device=kind.device)
    return ProductQuantized(codebooks=kind.restore(C), codes=codes_out, shape=shape, block_size=int(block_size),
                            error=error, norm=norm, codebook_bits=int(codebook_bits),
                            history=history, shared_codebook=bool(shared_codebook))


def _codebook_size(shape, block_size, n_centroids, bits, tol, pad, max_centroids, prefix, what):
    """Validated ``(block_size, n_centroids)``; ``n_centroids`` stays None for ``tol=``."""
    rows, row_length = shape[0], math.prod(shape[1:])
    if block_size is not None:
        _check_positive_int(block_size, "block_size", prefix)
    if n_centroids is not None:
        _check_positive_int(n_centroids, "n_centroids", prefix)
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or not bits > 0):
        raise ValueError(f"{prefix}bits={bits!r} must be a positive number of code bits per weight")
    if tol is not None and not 0 <= tol < 1:
        raise ValueError(f"{prefix}tol={tol!r} is outside [0, 1)")
    if bits is not None and block_size is None:
        try:
            block_size, n_centroids = block_for_bits(row_length, rows, bits, max_centroids=max_centroids, pad=pad)
        except InfeasibleRankError as err:
            _infeasible(prefix, f"{err.reason} (weight {what})")
    if block_size is None:
        block_size = default_block_size(shape)
    if block_size > row_length:
        _infeasible(prefix, f"block_size={block_size} exceeds the row length {row_length} of {what}")
    if row_length % block_size and not pad:
        _infeasible(prefix, f"block_size={block_size} does not divide the row length {row_length} of {what}; "
                            f"pass a divisor or pad=True to zero-pad the rows")
    if bits is not None and n_centroids is None:
        exponent = bits * block_size
        if abs(exponent - round(exponent)) > 1e-9:
            raise ValueError(f"{prefix}bits={bits!r} * block_size={block_size} is not an integer number of "
                             f"code bits; pick them so that 2**(bits*block_size) is an integer")
        n_centroids = 2 ** int(round(exponent))
    return block_size, n_centroids


def _fit_codebook(X, n_centroids, tol, norm, n_iter, random_state, prefix, where):
    """k-means at ``n_centroids``, or at the smallest power of two meeting ``tol``: ``(k, C, codes, history)``."""
    n_points = X.shape[1]
    if tol is None:
        if n_centroids > n_points:
            _infeasible(prefix, f"n_centroids={n_centroids} exceeds the {n_points} sub-vectors of {where}; "
                                f"pass at most {n_points}")
        candidates = [int(n_centroids)]
    else:
        candidates = sorted({min(2 ** j, n_points) for j in range(0, math.ceil(math.log2(n_points)) + 1)})
    for k in candidates:
        C, codes, history = kmeans(X, k, n_iter=n_iter, random_state=random_state)
        if tol is None or math.sqrt(max(history[-1], 0.0)) <= tol * norm or k == n_points:
            break
    return k, C, codes, history


def _infeasible(prefix, reason):
    """A valid request this weight's shape cannot meet (compress keeps such a layer dense)."""
    raise InfeasibleRankError(prefix + reason, reason)


def _check_positive_int(value, name, prefix):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{prefix}{name}= must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{prefix}{name}={value} must be >= 1")


__all__ = ["pq", "kmeans", "block_for_bits", "default_block_size"]
