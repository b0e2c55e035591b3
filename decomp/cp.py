"""CP (CANDECOMP/PARAFAC) decomposition by accelerated alternating least squares.

Model and shape conventions: an N-way array ``A (I_1, ..., I_N)``, N >= 3, is
approximated by ``Â = sum_r w_r a^(1)_r ⊗ ... ⊗ a^(N)_r``; the result holds ``weights
(R,)`` and ``factors[n] (I_n, R)`` with unit-norm columns. For a conv kernel
``(out, in, kh, kw)`` the factors are ``(out, R), (in, R), (kh, R), (kw, R)``
(Lebedev et al. 2015).

Algorithm (``cp_als``):

* init ``"svd"``: leading left singular vectors of each unfolding (from the eigenvectors of
  the small Gram matrix ``A_(n) A_(n)^T``); columns beyond ``I_n`` (rank > mode size) are
  random, drawn from ``random_state``. ``init="random"``: Gaussian factors.
* ALS sweeps with normalized columns (weights kept apart). MTTKRPs use a two-level
  dimension tree: the modes are split into two groups of balanced size; one contraction
  of the full tensor with the other group's factors (a GEMM of the group's unfolding with
  their Khatri-Rao product, about ``sqrt(prod I) * R`` entries) serves every mode of the
  group, whose MTTKRPs then contract only that small intermediate; so a sweep costs two
  passes over the data whatever N is, and no full Khatri-Rao product is formed.
* The error after each sweep is not measured from a reconstruction: ``||A - Â||^2 =
  ||A||^2 - 2 <A, Â> + ||Â||^2`` with ``<A, Â>`` from the last mode's MTTKRP and
  ``||Â||^2 = w^T (∘_n G_n) w`` from the Gram matrices (measured exactly below 1e-6,
  where that difference loses its digits).
* Acceleration: extrapolation along the last sweep's step, à la Bro (1998) / tensorly's
  ``linesearch=True`` (jump ``k^(1/p)``, ``p`` grows after repeated failures), accepted only
  if it lowers the error; the accepted point's contraction (and its first MTTKRP) is reused
  by the next sweep, so a successful extrapolation costs nothing extra.
* Degeneracy guard: with unit-norm columns, ``||w||_2 <= ||A||_F`` for well-behaved fits
  (equality for orthogonal components); two or more components that cancel with huge
  norms make ``||w||_2 / ||A||_F`` explode. Above ``degeneracy_threshold`` a Tikhonov
  term ``mu ||w||^2`` (a ridge ``mu I`` in every normal equation) is switched on and grown
  tenfold per sweep while the ratio stays high, which bounds the weights. The result
  records it in ``info``. Non-finite values trigger a restart of the sweep with a larger
  ridge; if that cannot help, ``FloatingPointError`` is raised: NaN/Inf is never returned.

* Execution path: the same sweeps run on numpy float64 arrays (OpenBLAS, scipy's LAPACK
  Cholesky) for float64 CPU tensors with ``prod(I) * R <= NUMPY_MAX_WORK`` (``2**24``, e.g.
  128x128x3x3 up to rank 113, 256x256x3x3 up to rank 28): there the fixed cost of each of the ~130
  torch calls of a sweep, not the arithmetic, is most of the time, and a numpy call costs
  a few times less. Above it (and for other dtypes / devices) the sweeps run in torch. Both
  paths compute the same iterates up to rounding (``info["backend"]`` says which ran); the
  BLAS pools numpy calls are limited to ``torch.get_num_threads()``.

``error`` is the Frobenius error ``||A - Â||_F`` measured exactly a posteriori in float64
from the reconstruction (in torch, on either path). There is no ``error_bound``: CP has no Eckart–Young analogue,
and best rank-R CP approximations need not exist.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import torch
from scipy.linalg import lapack as _lapack

from ._backend import as_compute_tensor, check_iteration_options, make_generator, times_power_of_two, unit_scale
from ._kernels import _blas, balanced_mode_split, leading_left_vectors
from .formats.cp import CPFactors, cp_num_params, cp_reconstruct
from .rank import check_rank, largest_rank_within, parse_rank_spec

INITS = ("svd", "random")


def cp(A, rank=None, *, energy=None, tol=None, ratio=None, n_iter_max=100, convergence_tol=1e-8, init="svd",
       linesearch=True, random_state=None, max_rank=None, degeneracy_threshold=10.0, mixed_precision=True,
       compute_dtype=None, context="") -> CPFactors:
    """CP decomposition of an N-way array ``A (I_1, ..., I_N)``, N >= 3.

    Exactly one of

    * ``rank=R`` (int >= 1, at most ``max_rank``);
    * ``tol=t``: the smallest rank found by bisection whose fitted relative error
      ``||A - Â||_F / ||A||_F <= t``. CP approximations are not nested (the best rank-R
      fit is not contained in the rank-(R+1) one) and ALS is a local method, so the rank
      returned is the smallest one *found* by a doubling-then-bisection search, each
      candidate fitted with the same ``n_iter_max`` / ``convergence_tol`` / init; ranks are
      searched up to ``max_rank`` and ``ValueError`` is raised when even that rank misses
      ``t``. ``info["rank_search"]`` lists every rank tried with its relative error;
    * ``ratio=q``: the largest rank whose ``num_params = R * sum(I_n)`` is ``<= q * prod(I_n)``.

    ``energy=`` is refused: CP has no spectrum to read energy from.

    ``max_rank`` defaults to ``prod(I) / max(I)``, an upper bound of the CP rank of every
    tensor of this shape. ``n_iter_max`` ALS sweeps at most; stops when the relative error
    decreases by less than ``convergence_tol`` between sweeps (tensorly's ``tol``).
    ``random_state`` (int, Generator or None = seed 0, see :func:`decomp._backend.make_generator`)
    seeds the random columns, so results are deterministic. ``linesearch`` switches the extrapolation on. Math runs in
    ``compute_dtype`` (float64 by default); with ``mixed_precision`` (default) the two big
    contractions of the early sweeps run in float32 while the fit is far from converged
    (see :func:`cp_als`; every solve, norm and error stays float64, and the final sweeps
    and ``error`` are float64). The factors come back in the input's kind
    (numpy / torch) and dtype.

    Returns :class:`~decomp.formats.cp.CPFactors` whose ``error`` is the exact
    a-posteriori error ``||A - Â||_F`` (float64; ``error_bound`` is None), and ``info`` with ``iterations``,
    ``converged``, ``errors`` (relative error per sweep), ``degenerate``, ``ridge``,
    ``weights_ratio`` (``||w|| / ||A||``), ``min_congruence``, ``linesearch_accepted``,
    ``restarts``, ``float32_sweeps`` and ``backend`` (``"numpy"`` for the small-tensor path
    of the module docstring, else ``"torch"``).
    """
    context = context or "cp"
    if energy is not None:
        raise ValueError(f"{context}: energy= is not supported by CP: a CP decomposition has no spectrum "
                         f"(its components are neither orthogonal nor nested); pass tol= (relative error "
                         f"target, rank found by bisection), ratio= (parameter budget) or rank=")
    if isinstance(rank, str):
        raise ValueError(f"{context}: rank={rank!r} is not supported by CP; pass an int rank=, tol= or ratio=")
    spec = parse_rank_spec(rank, None, tol, ratio, allowed=("rank", "tol", "ratio"), context=context)
    T, kind = _validate(A, context, compute_dtype)
    shape = tuple(T.shape)
    where = f"{context} (shape {shape})"
    bound_rank = math.prod(shape) // max(shape)
    if max_rank is None:
        max_rank = bound_rank
    elif not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise ValueError(f"{where}: max_rank={max_rank!r} must be an int >= 1")
    _check_options(where, n_iter_max, convergence_tol, init, degeneracy_threshold)
    options = dict(n_iter_max=n_iter_max, convergence_tol=convergence_tol, init=init, linesearch=linesearch,
                   random_state=make_generator(random_state), degeneracy_threshold=degeneracy_threshold,
                   mixed_precision=mixed_precision, context=where)
    T, exponent = unit_scale(T)  # exact power-of-two scaling: squares stay finite for 1e-300 .. 1e300
    norm = float(torch.linalg.norm(T))

    if spec.kind == "rank":
        R = check_rank(spec.value, max_rank, where)
        weights, factors, info = cp_als(T, R, **options)
    elif spec.kind == "ratio":
        R = largest_rank_within(lambda r: cp_num_params(shape, r), spec.value * math.prod(shape), max_rank, where)
        weights, factors, info = cp_als(T, R, **options)
    else:
        weights, factors, info = _bisect_rank(T, spec.value, max_rank, norm, options, where)
    scale = math.ldexp(1.0, exponent)
    info = {k: v * scale if k == "error" else v for k, v in info.items()}
    factors = [kind.restore(f) for f in factors]
    return CPFactors(kind.restore(times_power_of_two(weights, exponent)), factors, error=info["error"],
                     norm=norm * scale, info=info)


def _validate(A, context, compute_dtype):
    T, kind = as_compute_tensor(A, name=context, compute_dtype=compute_dtype)
    if T.ndim < 3:
        raise ValueError(f"{context}: CP needs an array with at least 3 dimensions, got shape {tuple(T.shape)}; "
                         f"for a {T.ndim}-D array use decomp.svd (the CP of a matrix is a low-rank SVD)")
    return T, kind


def _check_options(where, n_iter_max, convergence_tol, init, degeneracy_threshold):
    check_iteration_options(where, n_iter_max, convergence_tol, init, INITS)
    if not isinstance(degeneracy_threshold, (int, float)) or not degeneracy_threshold > 1:
        raise ValueError(f"{where}: degeneracy_threshold={degeneracy_threshold!r} must be a number > 1")


def _bisect_rank(T, tol, max_rank, norm, options, where):
    """Doubling then bisection on the rank; returns the fit at the smallest passing rank."""
    fits = {}

    def passes(R):
        if R not in fits:
            fits[R] = cp_als(T, R, **options)
        return fits[R][2]["error"] <= tol * norm

    low, R = 0, 1  # low: largest rank known to fail
    while not passes(R):
        low = R
        if R >= max_rank:
            rel = fits[R][2]["error"] / norm if norm > 0 else 0.0
            raise ValueError(f"{where}: tol={tol} is not reached by CP up to max_rank={max_rank} "
                             f"(relative error {rel:.3g} at rank {R} after n_iter_max={options['n_iter_max']} "
                             f"sweeps); pass a larger tol=, max_rank= or n_iter_max=, or use ratio=/rank=")
        R = min(2 * R, max_rank)
    high = R
    while high - low > 1:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid
    weights, factors, info = fits[high]
    info["rank_search"] = {r: (fit[2]["error"] / norm if norm > 0 else 0.0) for r, fit in sorted(fits.items())}
    return weights, factors, info


# ----------------------------------------------------------------------------- ALS core
#
# Inside the ALS loop every factor is held transposed, as ``rows[n] (R, I_n)`` (row r is
# the column a^(n)_r): the normal equations ``F^T = (H + mu I)^{-1} M^T`` take the MTTKRP
# as ``M^T (R, I_n)``, and the big contraction is the GEMM ``KR^T (R, K) @ U^T (K, J)``,
# which MKL runs up to twice as fast in float64 as ``U @ KR`` at the sizes of conv kernels.
# On tensors of a few 10^4 entries the fixed cost of each torch call (a few µs) is most of
# the bill, so the loop issues as few calls as it can: it runs under inference_mode (no
# autograd bookkeeping), uses no einsum, never clones the iterate (sweeps and
# extrapolations build new tensors and leave the old ones alone), extrapolates all modes
# at once in one zero-padded stack, tests finiteness once per evaluation (a non-finite
# entry anywhere reaches the model norm, see :func:`_model_norm2`), and skips no-op casts.

class _Unfoldings:
    """The two-group dimension tree: ``T`` unfolded once per group, contracted by one GEMM.

    ``partial(g, rows)`` takes the factors transposed, ``rows[m] (R, I_m)``, and returns
    ``X (R, dims of layout[g]...)`` with ``X[r, ...] = T ×_{m not in g} a^(m)_r``; ``layout[g]``
    lists the group's modes smallest first, so the longest one is contiguous. ``X`` is the
    transposed Khatri-Rao product of the other group's factors, ``(R, prod I_other)``,
    times the transpose of the stored unfolding ``(prod I_g, prod I_other)``. The groups
    have balanced products, so that Khatri-Rao product has about ``sqrt(prod I) * R``
    entries, never ``prod(I) * R``.
    """

    def __init__(self, T, groups, dtype):
        self.layout, self.others, self.dims = _tree_layout(T.shape, groups)
        self.dtype = dtype
        mats = [T.permute(g + o).reshape(math.prod(d), -1).to(dtype).contiguous()
                for g, o, d in zip(self.layout, self.others, self.dims)]
        self.mats_t = [U.T for U in mats]  # (prod I_other, prod I_g) views, made once

    def partial(self, g, rows):
        """``X (R, dims of layout[g]...)`` for the factors ``rows[m] (R, I_m)``, in their dtype (see the class)."""
        R, dtype = rows[0].shape[0], rows[0].dtype
        other = [rows[m] for m in self.others[g]]
        # no other modes (every dim of the tensor is 1): the empty Khatri-Rao product is a column of ones
        krt = _khatri_rao_rows(other) if other else torch.ones(R, 1, dtype=dtype, device=rows[0].device)
        if self.dtype == dtype:  # (skipping no-op casts: on small tensors every torch call counts)
            X = krt @ self.mats_t[g]
        else:
            X = (krt.to(self.dtype) @ self.mats_t[g]).to(dtype)
        return X if len(self.dims[g]) == 1 else X.reshape([R] + self.dims[g])


def _tree_layout(shape, groups):
    """``(layout, others, dims)`` of the two-group tree: per group, its modes and the other modes, smallest first.

    Smallest modes first, the longest innermost (contiguous): the Khatri-Rao product of the
    other modes is built along it, and the MTTKRP reductions over ``X`` run along or across it,
    never along a 3-long inner axis (several times slower in torch). Sorting is stable (ties
    keep the mode order). ``dims[g]`` are the sizes of ``layout[g]``.
    """
    def by_size(modes):
        return sorted(modes, key=lambda m: shape[m])

    layout = [by_size(g) for g in groups]
    others = [by_size(m for m in range(len(shape)) if m not in g) for g in groups]
    return layout, others, [[shape[m] for m in g] for g in layout]


def _khatri_rao_rows(rows):
    """Transposed Khatri-Rao product of ``rows[k] (R, I_k)``: ``(R, prod I_k)``, first most significant."""
    out = rows[0]
    for M in rows[1:]:
        out = (out.unsqueeze(2) * M.unsqueeze(1)).reshape(out.shape[0], -1)
    return out


def _mttkrp_from(X, modes, rows, n):
    """Transposed MTTKRP of mode ``n``, ``(R, I_n)``, from ``X (R, dims of modes...)`` (see ``partial``).

    The group's other modes are contracted one at a time (last axis first, so the axes
    before keep their index), each by a broadcast product and a sum over its axis.
    """
    for axis in range(len(modes) - 1, -1, -1):
        if modes[axis] != n:
            shape = [X.shape[0]] + [1] * (X.ndim - 1)
            shape[axis + 1] = X.shape[axis + 1]
            X = (X * rows[modes[axis]].reshape(shape)).sum(axis + 1)
    return X


def _product(mats):
    """Hadamard product of a non-empty list of equal-shape matrices (the first one itself if alone)."""
    out = mats[0]
    for G in mats[1:]:
        out = out * G
    return out


def _model_norm2(hadamard, weights):
    """``||Â||_F^2 = w^T (∘_n G_n) w`` from the Hadamard product of all the Grams ``(R, R)``.

    A NaN or Inf in any factor makes this non-finite: its column's Gram diagonal is
    NaN/Inf (a unit-norm column cannot hold an Inf), which enters ``w_r^2 H_rr``; so
    does one in ``weights``. Testing this float is the loop's only finiteness check.
    """
    return float(weights @ hadamard @ weights)


def _min_congruence(grams):
    """Smallest off-diagonal Tucker congruence ``prod_n <a_r^(n), a_s^(n)>`` (unit columns).

    Close to -1 for pairs of components that cancel each other (a CP degeneracy).
    """
    congruence = _product(grams).clone()
    congruence.fill_diagonal_(float("inf"))
    return float(congruence.min())


def _normalize(factor):
    """Unit-norm columns of ``factor (I, R)`` and the norms ``(R,)``; zero columns stay zero."""
    norms = torch.linalg.vector_norm(factor, dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return factor / safe, norms


def _normalize_rows(rows, out=None):
    """Unit-norm rows of ``rows (R, I)`` (written to ``out`` if given) and the norms ``(R, 1)``.

    Zero rows stay zero (0 / tiny = 0).
    """
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return torch.div(rows, norms.clamp_min(torch.finfo(rows.dtype).tiny), out=out), norms


def _row_views(P, sizes):
    """``[P[n, :, :I_n]]``: the ``(R, I_n)`` factors held in a zero-padded stack ``P (N, R, max I_n)``."""
    return [v if v.shape[1] == size else v[:, :size] for v, size in zip(P.unbind(0), sizes)]


def _init_factors(T, R, init, generator):
    """Initial unit-norm factors ``[(I_n, R)]`` of ``T`` (``init`` "svd" or "random", see the module docstring)."""
    factors = []
    for n, size in enumerate(T.shape):
        if init == "random":
            F = torch.randn(size, R, generator=generator, dtype=T.dtype)
        else:
            F = leading_left_vectors(T, n)[:, :min(R, size)]
            if R > size:
                F = torch.cat([F, torch.randn(size, R - size, generator=generator, dtype=T.dtype)], dim=1)
        factors.append(_normalize(F)[0])
    return factors


def _solve(H, Mt, mu, eye):
    """``(H + mu I)^{-1} Mt`` for a symmetric PSD ``H (R, R)``, ``Mt (R, I)``; returns ``(F^T, mu)``.

    That is the transposed solution ``F^T`` of ``F (H + mu I) = M``. ``H`` is a Hadamard
    product of Grams of unit-norm (or zero) columns, so its diagonal holds ones (and zeros),
    and ``mu`` is a weight relative to the Gram scale; where ``H`` is all zero so is ``Mt``.
    ``eye`` is the ``(R, R)`` identity; ``H`` is left unchanged. The ridge grows (x100)
    until Cholesky succeeds.
    """
    for attempt in range(8):
        U, info = torch.linalg.cholesky_ex(torch.add(H, eye, alpha=mu), upper=True)  # H + mu I = U^T U
        if int(info) == 0:
            # F U^T U = M by two right-side triangular solves (cholesky_solve's arithmetic, less overhead);
            # their result F (I, R) is column-major, so F^T comes out row-major (fast row norms next)
            Y = torch.linalg.solve_triangular(U, Mt.T, upper=True, left=False)
            return torch.linalg.solve_triangular(U.mT, Y, upper=False, left=False).T, mu
        mu = max(mu * 100, 1e-12)
    raise FloatingPointError("normal equations stayed singular after regularization")


class _ALSState:
    """The iterate of CP-ALS and its bookkeeping (ridge, extrapolation schedule, cached contraction).

    The unit-norm factors are held transposed and zero-padded in one stack
    ``P (N, R, max I_n)``: ``rows[n] = P[n, :, :I_n]`` (a view, ``(R, I_n)``), so the
    extrapolation, its column norms and its Grams are one call each over all modes (the
    zero padding changes no norm and no Gram). ``weights (R,)``;
    ``grams[n] = rows[n] @ rows[n].T (R, R)``. No tensor of the iterate is ever edited in
    place: a sweep or an extrapolation builds a new stack, so keeping references is a copy.

    The algorithm (:meth:`sweep`, :meth:`extrapolate`, :meth:`guard`) is written once; the
    few calls that differ between torch and numpy are the ``_k_*`` kernel methods, which
    :class:`_NumpyALSState` overrides (same arithmetic, numpy arrays).
    """

    def __init__(self, T, R, init, generator, mixed_precision, ridge):
        self._setup(T, R, ridge)
        self.exact_tree = _Unfoldings(T, self.groups, T.dtype)
        fast = mixed_precision and T.dtype == torch.float64
        self.tree = _Unfoldings(T, self.groups, torch.float32) if fast else self.exact_tree
        self.P = T.new_zeros(T.ndim, R, max(self.sizes))
        self.rows = self._k_views(self.P)
        for rows, F in zip(self.rows, _init_factors(T, R, init, generator)):
            rows.copy_(F.T)
        self.weights = T.new_ones(R)
        self.grams = [F @ F.T for F in self.rows]
        self.eye = torch.eye(R, dtype=T.dtype, device=T.device)

    backend = "torch"

    def _setup(self, T, R, ridge):
        """The shape, norm, mode groups and bookkeeping shared by both backends."""
        self.T, self.R, self.sizes = T, R, tuple(T.shape)
        self.norm = float(torch.linalg.norm(T))
        self.groups = [g for g in balanced_mode_split(T.shape) if g]
        self.mu, self.degenerate, self.restarts, self.accepted = ridge, False, 0, 0
        self.acc_pow, self.acc_fail = 2.0, 0
        self.previous = None  # (P, weights) after the previous sweep (for extrapolation)
        self.cached = None  # (partial contraction of group 0, MTTKRP of its first mode), valid for the current rows

    # ---- backend kernels (torch); shapes as in the class docstring
    def _k_zeros(self):
        """A new (zero) stack like ``P``, for a sweep to write every factor into."""
        return torch.zeros_like(self.P)

    def _k_views(self, P):
        """``[P[n, :, :I_n]]`` of a stack ``P (N, R, max I_n)``."""
        return _row_views(P, self.sizes)

    def _k_mttkrp(self, X, modes, rows, n):
        """Transposed MTTKRP ``(R, I_n)`` from a partial contraction (see :func:`_mttkrp_from`)."""
        return _mttkrp_from(X, modes, rows, n)

    def _k_solve(self, H, Mt):
        """``F^T (R, I)`` solving the ridged normal equations (see :func:`_solve`); may grow ``mu``."""
        F, self.mu = _solve(H, Mt, self.mu, self.eye)
        return F

    def _k_normalize(self, F, out):
        """Unit-norm rows of ``F (R, I)`` written to ``out`` and the norms ``(R,)``."""
        rows, norms = _normalize_rows(F, out=out)
        return rows, norms.reshape(-1)

    def _k_step(self, jump):
        """The extrapolated iterate ``P_prev + jump (P - P_prev)``, normalized: ``(P, weights (R,), grams, hadamard)``.

        ``grams`` holds the N Gram matrices ``(R, R)`` (here a stacked ``(N, R, R)``), ``hadamard`` their product.
        """
        prev_P, prev_weights = self.previous
        P = torch.lerp(prev_P, self.P, jump)
        norms = torch.linalg.vector_norm(P, dim=2, keepdim=True)  # (N, R, 1)
        P = P / norms.clamp_min(torch.finfo(P.dtype).tiny)
        weights = torch.lerp(prev_weights, self.weights, jump) * norms.prod(0).reshape(-1)
        grams = P @ P.mT  # (N, R, R)
        return P, weights, grams, grams.prod(0)

    def _k_weights_ratio(self):
        """``||w||_2 / ||T||_F`` (the degeneracy guard's measure)."""
        return float(torch.linalg.vector_norm(self.weights)) / self.norm

    def _k_min_congruence(self):
        """:func:`_min_congruence` of the current Grams."""
        return _min_congruence(self.grams)

    def results(self):
        """``(weights (R,), factors [(I_n, R)], grams [(R, R)])`` as torch tensors (factors contiguous)."""
        return self.weights, [F.T.contiguous() for F in self.rows], self.grams

    @property
    def factors(self):
        """The factors in the public layout, ``factors[n] (I_n, R)`` (contiguous torch copies)."""
        return self.results()[1]

    def relative_error(self, inner, model2):
        """``||T - Â|| / ||T||`` from ``<T, Â>`` and ``||Â||^2``; None when not finite."""
        err2 = self.norm ** 2 - 2 * inner + model2
        return math.sqrt(max(err2, 0.0)) / self.norm if math.isfinite(err2) else None

    def sweep(self):
        """One ALS sweep; the relative error after it, or None (iterate unchanged) when it produced non-finite values.

        The ridge ``mu`` grown by a failing Cholesky is kept either way.
        """
        P, rows, grams, tree = self._k_zeros(), list(self.rows), list(self.grams), self.tree
        views = self._k_views(P)
        for gi, group in enumerate(self.groups):
            X, M = self.cached if gi == 0 and self.cached is not None else (tree.partial(gi, rows), None)
            outer = [_product([grams[m] for m in tree.others[gi]])] if tree.others[gi] else []
            for n in group:  # the other group's Gram product is fixed while this group is updated
                M = self._k_mttkrp(X, tree.layout[gi], rows, n) if M is None else M
                H = _product(outer + [grams[m] for m in group if m != n])
                F = self._k_solve(H, M)
                rows[n], norms = self._k_normalize(F, views[n])
                grams[n] = rows[n] @ rows[n].T
                last, M = (M, F, H, n), None
        self.cached = None
        M, F, H, n = last
        weights = norms
        # <T, Â> = sum_r w_r <M_r, a_r> = sum(M * F) for the raw solution F = diag(w) rows[n]
        rel = self.relative_error(float((M * F).sum()), _model_norm2(H * grams[n], weights))
        if rel is not None and rel < 1e-6:  # below the cancellation floor of the cheap formula: measure exactly
            exact = cp_reconstruct(torch.as_tensor(weights), [torch.as_tensor(F).T for F in rows])
            rel = float(torch.linalg.norm(self.T - exact)) / self.norm
        if rel is None or not math.isfinite(rel):
            return None
        self.P, self.rows, self.grams, self.weights = P, rows, grams, weights
        return rel

    def extrapolate(self, iteration, rel, max_fail=4):
        """Bro's line search along the last step, kept only when it lowers the error; the error after it."""
        P, weights, grams, hadamard = self._k_step(iteration ** (1.0 / self.acc_pow))
        rows = self._k_views(P)
        group = self.groups[0]
        X = self.tree.partial(0, rows)
        M = self._k_mttkrp(X, self.tree.layout[0], rows, group[0])  # reused by the next sweep if the step is kept
        ext_rel = self.relative_error(float((M * rows[group[0]]).sum(1) @ weights),
                                      _model_norm2(hadamard, weights))
        if ext_rel is not None and ext_rel < rel:
            self.P, self.rows, self.weights, self.grams = P, rows, weights, list(grams)
            self.cached, self.accepted, self.acc_fail = (X, M), self.accepted + 1, 0
            return ext_rel
        self.acc_fail += 1
        if self.acc_fail >= max_fail:
            self.acc_pow, self.acc_fail = self.acc_pow + 1, 0
        return rel

    def guard(self, degeneracy_threshold, ridge_max):
        """Grow the Tikhonov term when the weights diverge or a cancelling pair forms."""
        ratio = self._k_weights_ratio()
        if ratio > degeneracy_threshold:  # diverging weights: grow the Tikhonov term
            self.degenerate = True
            self.mu = min(max(self.mu * 10, 1e-8), ridge_max)
            self.previous, self.cached = None, None  # do not extrapolate along a diverging path
        elif ratio > 2 and self.R > 1 and self._k_min_congruence() < -0.9:  # cancelling pair forming
            self.degenerate = True
            self.mu = max(self.mu, 1e-8)


# ----------------------------------------------------------------------------- small tensors: the sweep in numpy
#
# A sweep on a conv kernel of a few 10^4 entries is ~130 small calls; torch spends ~2-5 µs
# of fixed cost on each (dispatch, allocation, MKL's small-size paths), numpy ~1 µs, and
# numpy's OpenBLAS multiplies these small contractions faster than torch's MKL, so below
# NUMPY_MAX_WORK the same algorithm runs on numpy arrays (:class:`_NumpyALSState`, float64
# tensors on the CPU): the same dimension tree, float32 switch, Cholesky ridge, line search
# and guard, and the same float64 a-posteriori error of the result, computed in torch.
# Above it the arithmetic dominates and both run at about the same speed (256x256x3x3 at rank
# 64, 3.8e7 multiply-adds a pass: within 5%, 1 thread); the torch path is kept there.

NUMPY_MAX_WORK = 2 ** 24  # prod(I) * R: the multiply-adds of one contraction of the data (a sweep makes two)


def _numpy_path(T, R):
    """Whether :func:`cp_als` runs its sweeps in numpy (a float64 CPU tensor of ``prod(I) * R <= NUMPY_MAX_WORK``)."""
    return T.device.type == "cpu" and T.dtype == torch.float64 and T.numel() * R <= NUMPY_MAX_WORK


def _blas_threads():
    """A context limiting numpy's and scipy's BLAS pools to ``torch.get_num_threads()`` (no-op without threadpoolctl)."""
    access = _blas()
    return access[1].limit(limits=torch.get_num_threads()) if access is not None else contextlib.nullcontext()


class _NumpyUnfoldings:
    """numpy twin of :class:`_Unfoldings` on ``A (I_1, ..., I_N)`` (ndarray), in ``dtype``.

    ``mats[g] (prod I_other, prod I_g)`` is the transposed unfolding stored C-contiguous
    (OpenBLAS multiplies ``KR^T @ mats[g]`` fastest that way at these sizes); ``partial``
    returns ``X (R, dims of layout[g]...)`` in float64, as :meth:`_Unfoldings.partial`.
    """

    def __init__(self, A, groups, dtype):
        self.layout, self.others, self.dims = _tree_layout(A.shape, groups)
        self.dtype = dtype
        self.mats = [np.ascontiguousarray(A.transpose(o + g).reshape(-1, math.prod(d)), dtype=dtype)
                     for g, o, d in zip(self.layout, self.others, self.dims)]

    def partial(self, g, rows):
        """``X (R, dims of layout[g]...)`` (float64) for the factors ``rows[m] (R, I_m)`` (float64 arrays)."""
        R = rows[0].shape[0]
        krt = _khatri_rao_rows_np([rows[m] for m in self.others[g]]) if self.others[g] else np.ones((R, 1))
        if self.dtype == np.float64:
            X = krt @ self.mats[g]
        else:
            X = (krt.astype(self.dtype) @ self.mats[g]).astype(np.float64)
        return X if len(self.dims[g]) == 1 else X.reshape([R] + self.dims[g])


def _khatri_rao_rows_np(rows):
    """numpy :func:`_khatri_rao_rows`: ``(R, prod I_k)`` from ``rows[k] (R, I_k)``, first most significant."""
    out = rows[0]
    for M in rows[1:]:
        out = (out[:, :, None] * M[:, None, :]).reshape(out.shape[0], -1)
    return out


def _mttkrp_np(X, modes, rows, n):
    """numpy twin of :func:`_mttkrp_from`: ``(R, I_n)`` from ``X (R, dims of modes...)``.

    Each other mode of the group is contracted (last axis first) by one batched matrix
    product over ``r``: ``X_r (pre, s) @ v_r (s, 1)`` for the last axis, else
    ``v_r (1, s) @ X_r (pre, s, post)``.
    """
    R = X.shape[0]
    for axis in range(len(modes) - 1, -1, -1):
        if modes[axis] != n:
            before, size, after = X.shape[1:axis + 1], X.shape[axis + 1], X.shape[axis + 2:]
            v = rows[modes[axis]]
            if not after:
                X = (X.reshape(R, -1, size) @ v.reshape(R, size, 1)).reshape((R,) + before)
            else:
                X = (v.reshape(R, 1, 1, size) @ X.reshape(R, -1, size, math.prod(after))).reshape((R,) + before + after)
    return X


def _solve_np(H, Mt, mu, ridge, eye):
    """numpy twin of :func:`_solve`: ``((H + mu I)^{-1} Mt, mu)`` for ``H (R, R)``, ``Mt (R, I)``.

    ``ridge`` is ``mu I`` (made by the caller once per ``mu``), ``eye`` the identity. LAPACK
    Cholesky ``H + mu I = U^T U`` (upper ``U``), then ``U^{-1}`` (``dtrtri``) and
    ``F^T = U^{-1} (U^{-T} Mt)`` by two matrix products: at these sizes OpenBLAS's small
    triangular solves cost several times the inversion of the ``R x R`` triangle. The ridge
    grows (x100) until Cholesky succeeds, as in :func:`_solve`.
    """
    for attempt in range(8):
        # H + mu I is symmetric: its transpose is the same matrix, already in LAPACK's column-major order (no copy)
        U, info = _lapack.dpotrf((H + ridge).T, lower=0, clean=1, overwrite_a=1)
        if info == 0:
            Ui, info = _lapack.dtrtri(U, lower=0, overwrite_c=1)
            if info == 0:
                return Ui @ (Ui.T @ Mt), mu
        mu = max(mu * 100, 1e-12)
        ridge = mu * eye
    raise FloatingPointError("normal equations stayed singular after regularization")


_TINY = float(np.finfo(np.float64).tiny)


class _NumpyALSState(_ALSState):
    """:class:`_ALSState` on numpy float64 arrays, the factors side by side instead of zero-padded.

    ``P (R, sum I_n)`` holds ``rows[n] = P[:, o_n:o_n + I_n]`` (views, ``o_n`` the offsets):
    no padding, so the elementwise work of an extrapolation is over ``R * sum(I_n)``
    entries, not ``N * R * max(I_n)``; its per-mode norms are one segmented sum
    (``np.add.reduceat``). ``weights (R,)``, ``grams[n] (R, R)`` as there. ``T`` is a float64
    CPU tensor; the two (float64 / float32) unfoldings are numpy copies of it. The kernel
    methods are numpy versions of the torch ones; :meth:`results` hands back torch tensors.
    """

    backend = "numpy"

    def __init__(self, T, R, init, generator, mixed_precision, ridge):
        self._setup(T, R, ridge)
        A = T.detach().numpy()
        self.exact_tree = _NumpyUnfoldings(A, self.groups, np.float64)
        self.tree = _NumpyUnfoldings(A, self.groups, np.float32) if mixed_precision else self.exact_tree
        self.offsets = [0] + list(itertools.accumulate(self.sizes))
        self.P = np.empty((R, self.offsets[-1]))
        self.rows = self._k_views(self.P)
        for rows, F in zip(self.rows, _init_factors(T, R, init, generator)):
            rows[...] = F.T.numpy()
        self.weights = np.ones(R)
        self.grams = [F @ F.T for F in self.rows]
        self.eye = np.eye(R)
        self.ridge = (None, None)  # (mu, mu * I), remade when mu changes

    def _k_zeros(self):
        return np.empty_like(self.P)  # every column is written by the sweep

    def _k_views(self, P):
        return [P[:, a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    def _k_mttkrp(self, X, modes, rows, n):
        return _mttkrp_np(X, modes, rows, n)

    def _k_solve(self, H, Mt):
        if self.ridge[0] != self.mu:
            self.ridge = (self.mu, self.mu * self.eye)
        F, self.mu = _solve_np(H, Mt, self.mu, self.ridge[1], self.eye)
        return F

    def _k_normalize(self, F, out):
        norms = np.sqrt(np.einsum("ri,ri->r", F, F))
        return np.divide(F, np.maximum(norms, _TINY)[:, None], out=out), norms

    def _k_step(self, jump):
        prev_P, prev_weights = self.previous
        P = self.P - (1.0 - jump) * (self.P - prev_P)  # torch.lerp's formula for weights >= 0.5
        norms = np.sqrt(np.add.reduceat(P * P, self.offsets[:-1], axis=1))  # (R, N)
        P /= np.repeat(np.maximum(norms, _TINY), self.sizes, axis=1)
        weights = (self.weights - (1.0 - jump) * (self.weights - prev_weights)) * norms.prod(1)
        rows = self._k_views(P)
        grams = [F @ F.T for F in rows]
        return P, weights, grams, _product(grams)

    def _k_weights_ratio(self):
        return float(np.linalg.norm(self.weights)) / self.norm

    def _k_min_congruence(self):
        return _min_congruence([torch.from_numpy(G) for G in self.grams])

    def results(self):
        return (torch.from_numpy(self.weights), [torch.from_numpy(np.ascontiguousarray(F.T)) for F in self.rows],
                [torch.from_numpy(G) for G in self.grams])


def _zero_fit(T, R):
    factors = [torch.zeros(s, R, dtype=T.dtype) for s in T.shape]
    info = dict(iterations=0, converged=True, errors=[0.0], degenerate=False, ridge=0.0, weights_ratio=0.0,
                min_congruence=None, linesearch_accepted=0, restarts=0, float32_sweeps=0, error=0.0,
                backend="numpy" if _numpy_path(T, R) else "torch")
    return torch.zeros(R, dtype=T.dtype), factors, info


def cp_als(T: torch.Tensor, R: int, *, n_iter_max=100, convergence_tol=1e-8, init="svd", linesearch=True,
           random_state=None, degeneracy_threshold=10.0, mixed_precision=True, ridge=1e-13, ridge_max=1e-2,
           context="cp"):
    """Accelerated CP-ALS on a validated compute tensor ``T``; returns ``(weights, factors, info)``.

    ``weights (R,)``, ``factors[n] (I_n, R)`` with unit-norm columns, in ``T``'s dtype.
    ``random_state`` as everywhere in :mod:`decomp` (:func:`decomp._backend.make_generator`).
    ``ridge`` is the baseline Tikhonov weight relative to the Gram scale (a numerical
    safeguard, negligible for the fit). ``mixed_precision`` (float64 ``T`` only): the two
    big contractions per sweep run in float32 while the fit is far from converged
    (relative error above 1e-3 and still dropping by more than 1e-5 per sweep), where
    their ~1e-7 relative rounding is orders of magnitude below the fit error; every
    solve, norm and error is float64, and the remaining sweeps (and the final error)
    are all float64. Small float64 CPU tensors run the sweeps in numpy (:class:`_NumpyALSState`,
    see :data:`NUMPY_MAX_WORK`). See the module docstring for the rest.
    """
    if float(torch.linalg.norm(T)) == 0:
        return _zero_fit(T, R)
    use_numpy = _numpy_path(T, R)
    state = _NumpyALSState if use_numpy else _ALSState
    # no autograd bookkeeping (inference_mode): a good part of the cost of each small torch call
    with torch.inference_mode(), _blas_threads() if use_numpy else contextlib.nullcontext():
        st = state(T, R, init, make_generator(random_state), mixed_precision, ridge)
        iteration, converged, errors, float32_sweeps = _iterate(st, n_iter_max, convergence_tol, linesearch,
                                                                degeneracy_threshold, ridge_max, context)
        weights, factors, grams = st.results()
        exact = float(torch.linalg.norm(T - cp_reconstruct(weights, factors)))
        if not math.isfinite(exact):
            raise FloatingPointError(f"{context}: CP-ALS at rank {R} produced a non-finite reconstruction")
        info = dict(iterations=iteration, converged=converged, errors=errors, degenerate=st.degenerate,
                    ridge=st.mu, weights_ratio=float(torch.linalg.vector_norm(weights)) / st.norm,
                    min_congruence=_min_congruence(grams) if R > 1 else None, linesearch_accepted=st.accepted,
                    restarts=st.restarts, float32_sweeps=float32_sweeps, error=exact, backend=st.backend)
    # tensors made under inference_mode cannot enter autograd: hand back ordinary copies
    return weights.clone(), [F.clone() for F in factors], info


def _iterate(st, n_iter_max, convergence_tol, linesearch, degeneracy_threshold, ridge_max, context):
    """The sweep loop of :func:`cp_als` on an :class:`_ALSState`.

    Returns ``(iterations, converged, errors, float32_sweeps)``.
    """
    errors, converged, iteration, float32_sweeps = [], False, 0, 0
    while iteration < n_iter_max:
        rel = st.sweep()
        if rel is None:  # the iterate is the one before the sweep
            st.restarts += 1
            if st.restarts > 5:
                raise FloatingPointError(f"{context}: CP-ALS at rank {st.R} produced non-finite values even with "
                                         f"ridge {st.mu:.3g}; the problem is too ill-conditioned (try a lower rank)")
            st.mu, st.degenerate, st.previous = max(st.mu * 100, 1e-6), True, None
            continue
        iteration += 1
        float32_sweeps += st.tree is not st.exact_tree
        if linesearch and st.previous is not None and iteration > 3:
            rel = st.extrapolate(iteration, rel)
        st.previous = (st.P, st.weights)
        st.guard(degeneracy_threshold, ridge_max)
        errors.append(rel)
        change = abs(errors[-2] - errors[-1]) if len(errors) > 1 else math.inf
        if st.tree is not st.exact_tree:
            if rel < 1e-3 or change < 1e-5:  # close to convergence: finish in float64
                st.tree, st.cached = st.exact_tree, None
            continue
        if change < convergence_tol:
            converged = True
            break
    return iteration, converged, errors, float32_sweeps

__all__ = ["cp", "cp_als", "INITS"]
