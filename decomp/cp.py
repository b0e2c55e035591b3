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
  of the full tensor with the other group's factors serves every mode of a group, so a
  sweep costs two passes over the data whatever N is, and no full Khatri-Rao product is
  formed (the first contraction is a tensordot with one factor, the next ones shrink the
  intermediate).
* Acceleration: extrapolation along the last sweep's step, à la Bro (1998) / tensorly's
  ``linesearch=True`` (jump ``k^(1/p)``, ``p`` grows after repeated failures), accepted only
  if it lowers the error; the accepted point's contraction is reused by the next sweep,
  so a successful extrapolation costs nothing extra.
* Degeneracy guard: with unit-norm columns, ``||w||_2 <= ||A||_F`` for well-behaved fits
  (equality for orthogonal components); two or more components that cancel with huge
  norms make ``||w||_2 / ||A||_F`` explode. Above ``degeneracy_threshold`` a Tikhonov
  term ``mu ||w||^2`` (a ridge ``mu I`` in every normal equation) is switched on and grown
  tenfold per sweep while the ratio stays high, which bounds the weights. The result
  records it in ``info``. Non-finite values trigger a restart of the sweep with a larger
  ridge; if that cannot help, ``FloatingPointError`` is raised: NaN/Inf is never returned.

``error`` is the Frobenius error ``||A - Â||_F`` measured exactly a posteriori in float64
from the reconstruction. There is no ``error_bound``: CP has no Eckart–Young analogue,
and best rank-R CP approximations need not exist.
"""
from __future__ import annotations

import math
import string

import torch

from ._backend import as_compute_tensor, check_iteration_options, make_generator, times_power_of_two, unit_scale
from ._kernels import balanced_mode_split, khatri_rao, leading_left_vectors
from .formats.cp import CPFactors, cp_num_params, cp_reconstruct
from .rank import check_rank, largest_rank_within, parse_rank_spec

INITS = ("svd", "random")
_LETTERS = string.ascii_lowercase.replace("z", "")  # 'z' is the rank index


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
    ``weights_ratio`` (``||w|| / ||A||``), ``min_congruence``, ``linesearch_accepted``.
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

class _Unfoldings:
    """The two-group dimension tree: ``T`` unfolded once per group, contracted by one GEMM.

    ``partial(g, factors)`` returns ``X (dims of group g..., R)`` with
    ``X[..., r] = T ×_{m not in g} factors[m][:, r]``: one matmul of the stored unfolding
    ``(prod I_g, prod I_other)`` with the Khatri-Rao product of the other group's
    factors, ``(prod I_other, R)``; the groups have balanced products, so that
    Khatri-Rao product has about ``sqrt(prod I) * R`` entries, never ``prod(I) * R``.
    """

    def __init__(self, T, groups, dtype):
        self.groups = groups
        self.others = [[m for m in range(T.ndim) if m not in g] for g in groups]
        self.dims = [[T.shape[m] for m in g] for g in groups]
        self.dtype = dtype
        self.mats = [T.permute(g + o).reshape(math.prod(d), -1).to(dtype).contiguous()
                     for g, o, d in zip(groups, self.others, self.dims)]

    def partial(self, g, factors):
        R = factors[0].shape[1]
        other = [factors[m] for m in self.others[g]]
        # no other modes (every dim of the tensor is 1): the empty Khatri-Rao product is a row of ones
        kr = khatri_rao(other) if other else torch.ones(1, R, dtype=factors[0].dtype, device=factors[0].device)
        X = self.mats[g] @ kr.to(self.dtype)
        return X.to(factors[0].dtype).reshape(self.dims[g] + [R])


def _mttkrp_from(X, modes, factors, n):
    """MTTKRP of mode ``n`` from a partial contraction ``X (dims of modes..., R)``."""
    if len(modes) == 1:
        return X
    letters = _LETTERS[:len(modes)]
    operands, terms = [X], [letters + "z"]
    for i, m in enumerate(modes):
        if m != n:
            operands.append(factors[m])
            terms.append(letters[i] + "z")
    return torch.einsum(",".join(terms) + f"->{letters[modes.index(n)]}z", *operands)


def _inner_from(X, modes, factors, weights):
    """``<T, Â>`` from a partial contraction ``X`` over the other group."""
    letters = _LETTERS[:len(modes)]
    terms = [letters + "z"] + [letters[i] + "z" for i in range(len(modes))] + ["z"]
    return float(torch.einsum(",".join(terms) + "->", X, *[factors[m] for m in modes], weights))


def _hadamard(grams, skip=None):
    out = None
    for m, G in enumerate(grams):
        if m != skip:
            out = G.clone() if out is None else out * G
    return out


def _model_norm2(grams, weights):
    return float(weights @ _hadamard(grams) @ weights)


def _min_congruence(grams):
    """Smallest off-diagonal Tucker congruence ``prod_n <a_r^(n), a_s^(n)>`` (unit columns).

    Close to -1 for pairs of components that cancel each other (a CP degeneracy).
    """
    congruence = _hadamard(grams)
    congruence.fill_diagonal_(float("inf"))
    return float(congruence.min())


def _normalize(factor):
    norms = torch.linalg.vector_norm(factor, dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return factor / safe, norms


def _init_factors(T, R, init, generator):
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


def _solve(H, M, mu):
    """``M (H + mu I)^{-1}`` for a symmetric PSD ``H``; the ridge grows until Cholesky succeeds."""
    scale = max(float(H.diagonal().max()), 1e-300)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(8):
        L, info = torch.linalg.cholesky_ex(H + (mu * scale) * eye)
        if int(info) == 0:
            return torch.cholesky_solve(M.T, L).T, mu
        mu = max(mu * 100, 1e-12)
    raise FloatingPointError("normal equations stayed singular after regularization")


class _ALSState:
    """The iterate of CP-ALS and its bookkeeping (ridge, extrapolation schedule, cached contraction)."""

    def __init__(self, T, R, init, generator, mixed_precision, ridge):
        self.T, self.R = T, R
        self.norm = float(torch.linalg.norm(T))
        self.groups = [g for g in balanced_mode_split(T.shape) if g]
        self.exact_tree = _Unfoldings(T, self.groups, T.dtype)
        fast = mixed_precision and T.dtype == torch.float64
        self.tree = _Unfoldings(T, self.groups, torch.float32) if fast else self.exact_tree
        self.factors = _init_factors(T, R, init, generator)
        self.weights = torch.ones(R, dtype=T.dtype)
        self.grams = [F.T @ F for F in self.factors]
        self.mu, self.degenerate, self.restarts, self.accepted = ridge, False, 0, 0
        self.acc_pow, self.acc_fail = 2.0, 0
        self.previous = None  # factors/weights after the previous sweep (for extrapolation)
        self.cached = None  # partial contraction of group 0, valid for the current factors

    def sweep(self):
        """One ALS sweep; the relative error after it, or None when it produced non-finite values."""
        factors, grams = self.factors, self.grams
        for gi, group in enumerate(self.groups):
            X = self.cached if (gi == 0 and self.cached is not None) else self.tree.partial(gi, factors)
            for n in group:
                M = _mttkrp_from(X, group, factors, n)
                F, self.mu = _solve(_hadamard(grams, skip=n), M, self.mu)
                factors[n], self.weights = _normalize(F)
                grams[n] = factors[n].T @ factors[n]
                last_M, last_n = M, n
        self.cached = None
        if not (all(bool(torch.isfinite(F).all()) for F in factors) and bool(torch.isfinite(self.weights).all())):
            return None
        inner = float((last_M * factors[last_n] * self.weights).sum())
        err2 = self.norm ** 2 - 2 * inner + _model_norm2(grams, self.weights)
        rel = math.sqrt(max(err2, 0.0)) / self.norm
        if rel < 1e-6:  # below the cancellation floor of the cheap formula: measure exactly
            rel = float(torch.linalg.norm(self.T - cp_reconstruct(self.weights, factors))) / self.norm
        return rel if math.isfinite(rel) else None

    def extrapolate(self, iteration, rel, max_fail=4):
        """Bro's line search along the last step, kept only when it lowers the error; the error after it."""
        jump = iteration ** (1.0 / self.acc_pow)
        pf, pw = self.previous
        ext = [_normalize(p + jump * (F - p)) for p, F in zip(pf, self.factors)]
        ext_factors = [e[0] for e in ext]
        ext_weights = pw + jump * (self.weights - pw)
        for _, scale in ext:
            ext_weights = ext_weights * scale
        ext_grams = [F.T @ F for F in ext_factors]
        X_ext = self.tree.partial(0, ext_factors)
        ext_err2 = self.norm ** 2 - 2 * _inner_from(X_ext, self.groups[0], ext_factors, ext_weights) + \
            _model_norm2(ext_grams, ext_weights)
        ext_rel = math.sqrt(max(ext_err2, 0.0)) / self.norm
        if math.isfinite(ext_rel) and ext_rel < rel and bool(torch.isfinite(ext_weights).all()):
            self.factors, self.weights, self.grams, self.cached = ext_factors, ext_weights, ext_grams, X_ext
            self.accepted, self.acc_fail = self.accepted + 1, 0
            return ext_rel
        self.acc_fail += 1
        if self.acc_fail >= max_fail:
            self.acc_pow, self.acc_fail = self.acc_pow + 1, 0
        return rel

    def guard(self, degeneracy_threshold, ridge_max):
        """Grow the Tikhonov term when the weights diverge or a cancelling pair forms."""
        ratio = float(torch.linalg.vector_norm(self.weights)) / self.norm
        if ratio > degeneracy_threshold:  # diverging weights: grow the Tikhonov term
            self.degenerate = True
            self.mu = min(max(self.mu * 10, 1e-8), ridge_max)
            self.previous, self.cached = None, None  # do not extrapolate along a diverging path
        elif ratio > 2 and self.R > 1 and _min_congruence(self.grams) < -0.9:  # cancelling pair forming
            self.degenerate = True
            self.mu = max(self.mu, 1e-8)


def _zero_fit(T, R):
    factors = [torch.zeros(s, R, dtype=T.dtype) for s in T.shape]
    info = dict(iterations=0, converged=True, errors=[0.0], degenerate=False, ridge=0.0, weights_ratio=0.0,
                min_congruence=None, linesearch_accepted=0, restarts=0, float32_sweeps=0, error=0.0)
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
    are all float64. See the module docstring for the rest.
    """
    if float(torch.linalg.norm(T)) == 0:
        return _zero_fit(T, R)
    st = _ALSState(T, R, init, make_generator(random_state), mixed_precision, ridge)
    errors, converged, iteration, float32_sweeps = [], False, 0, 0
    while iteration < n_iter_max:
        saved = ([F.clone() for F in st.factors], st.weights.clone(), [G.clone() for G in st.grams])
        rel = st.sweep()
        if rel is None:
            st.restarts += 1
            if st.restarts > 5:
                raise FloatingPointError(f"{context}: CP-ALS at rank {R} produced non-finite values even with "
                                         f"ridge {st.mu:.3g}; the problem is too ill-conditioned (try a lower rank)")
            st.factors, st.weights, st.grams = saved
            st.mu, st.degenerate, st.previous = max(st.mu * 100, 1e-6), True, None
            continue
        iteration += 1
        float32_sweeps += st.tree is not st.exact_tree
        if linesearch and st.previous is not None and iteration > 3:
            rel = st.extrapolate(iteration, rel)
        st.previous = ([F.clone() for F in st.factors], st.weights.clone())
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
    exact = float(torch.linalg.norm(T - cp_reconstruct(st.weights, st.factors)))
    if not math.isfinite(exact):
        raise FloatingPointError(f"{context}: CP-ALS at rank {R} produced a non-finite reconstruction")
    info = dict(iterations=iteration, converged=converged, errors=errors, degenerate=st.degenerate,
                ridge=st.mu, weights_ratio=float(torch.linalg.vector_norm(st.weights)) / st.norm,
                min_congruence=_min_congruence(st.grams) if R > 1 else None, linesearch_accepted=st.accepted,
                restarts=st.restarts, float32_sweeps=float32_sweeps, error=exact)
    return st.weights, st.factors, info


__all__ = ["cp", "cp_als", "INITS"]
