"""Tucker decomposition (HOSVD, ST-HOSVD, HOOI), full or partial, with a certified bound.

A tensor ``A (I_1, ..., I_N)`` is approximated by ``core ×_{n in modes} U_n`` with
orthonormal ``U_n (I_n, R_n)``; modes not in ``modes`` are left whole (partial Tucker;
Tucker-2 of a conv kernel ``(out, in, kh, kw)`` is ``modes=(0, 1)``, Kim et al. 2016).

Guarantee (De Lathauwer, De Moor, Vandewalle 2000; Vannieuwenhoven et al. 2012):
with ``s^(n)`` the singular values of the mode-n unfolding of the ORIGINAL tensor,

    ||A - Â||_F^2 <= sum_{n in modes} sum_{i > R_n} (s_i^(n))^2

for HOSVD and ST-HOSVD, hence ``||A - Â||_F <= sqrt(N) * (best Tucker error)``. HOOI is
started from ST-HOSVD and keeps its best iterate, so it never does worse than ST-HOSVD
and the same bound holds. ``error_bound`` is this bound (or the measured error if
floating-point rounding ever put that above it).

Speed: the mode spectra come from ``eigh`` of the Gram matrix of each unfolding
(``I_n x I_n``), never from an SVD of the long unfolding (timings:
benchmarks/bench_decomp.py). The Gram's eigenvalues carry an absolute error of about
``eps * ||A||^2``, so spectrum tails below ~1e-7 of ``||A||_F`` are noise: the error is
therefore also measured a posteriori (exactly, by reconstruction, when it is small) and
``error_bound`` is the larger of the two, which keeps it certified in floating point.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import as_compute_tensor, make_generator, times_power_of_two, unit_scale
from ._kernels import fold, left_basis, mode_product, prefers_gram, unfold
from .formats.tucker import TuckerFactors, tucker_params
from .rank import InfeasibleRankError, check_rank, parse_rank_spec, rank_for_energy, rank_for_tol, tail_errors, vbmf_rank

ALGORITHMS = ("hooi", "sthosvd", "hosvd")


def tucker(A, rank=None, *, energy=None, tol=None, ratio=None, modes=None, algorithm="hooi", n_iter_max=10,
           convergence_tol=1e-3, compute_dtype=None, context="") -> TuckerFactors:
    """Tucker decomposition of ``A`` (N >= 2 dimensions) on the modes ``modes`` (default: all).

    Shapes: ``A (I_1, ..., I_N)``; result ``factors[i] (I_n, R_n)`` for ``n = modes[i]``
    with orthonormal columns and ``core`` of shape ``I`` with ``I_n`` replaced by ``R_n``.

    Rank: exactly one of (parsed by :func:`decomp.rank.parse_rank_spec`)

    * ``rank=`` an int (the same ``R_n`` for every chosen mode; above a mode's size is an
      error), or a tuple with one int per chosen mode, or ``"vbmf"`` (analytic VBMF on
      each mode unfolding, the rank selector of Kim et al. 2016);
    * ``energy=`` per mode: the smallest ``R_n`` whose kept squared singular values of the
      mode-n unfolding reach ``energy`` of ``||A||_F^2``;
    * ``tol=`` relative Frobenius error, certified: the squared budget ``tol^2 ||A||^2`` is
      split evenly (``tol^2/N`` per mode), then ranks are greedily lowered, smallest
      dropped ``s_i^2`` first, while the HOSVD bound stays within the budget; so
      ``error_bound <= tol * ||A||_F`` always;
    * ``ratio=`` parameters ``core + factors <= ratio * A.numel``: every chosen mode keeps
      the same fraction ``e`` of its unfolding's energy, with ``e`` the largest that fits
      (bisection); the leftover budget then raises, greedily, the rank whose next
      singular value buys the most energy per added parameter.

    ``algorithm``: ``"hooi"`` (default; ``n_iter_max`` sweeps of higher-order orthogonal
    iteration from ST-HOSVD, stopped when a sweep lowers the error by less than
    ``convergence_tol`` relative; the best iterate is kept), ``"sthosvd"`` (sequentially
    truncated HOSVD, modes processed in ``modes`` order), ``"hosvd"``. Math runs in
    ``compute_dtype`` (float64 default); results come back in ``A``'s kind and dtype.

    Returns :class:`~decomp.formats.tucker.TuckerFactors` with ``error_bound`` the HOSVD
    bound (see module docstring; the measured error if rounding ever put that higher),
    ``error`` the measured ``||A - Â||_F``, ``mode_spectra`` the per-mode spectra of ``A``
    (``modes`` order) and ``info``: ``error`` (the same), ``sthosvd_error``, ``errors`` (per
    HOOI sweep, starting with ST-HOSVD's) and ``n_iter``. HOOI costs a few ST-HOSVDs; pass
    ``algorithm="sthosvd"`` or a small ``n_iter_max`` when speed matters (timings:
    benchmarks/bench_decomp.py).
    """
    context = context or "tucker"
    spec = parse_rank_spec(rank, energy, tol, ratio, allow_tuple=True, context=context)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{context}: algorithm={algorithm!r} is not one of {ALGORITHMS}")
    if not isinstance(n_iter_max, (int, np.integer)) or n_iter_max < 0:
        raise ValueError(f"{context}: n_iter_max={n_iter_max!r} must be an int >= 0")
    T, kind = as_compute_tensor(A, name=context, compute_dtype=compute_dtype)
    if T.ndim < 2:
        raise ValueError(f"{context}: Tucker needs an array with at least 2 dimensions, got shape {tuple(T.shape)}")
    shape = tuple(T.shape)
    where = f"{context} (shape {shape})"
    modes = normalize_modes(modes, T.ndim, where)
    T, exponent = unit_scale(T)  # exact power-of-two scaling: squares stay finite for 1e-300 .. 1e300
    norm = float(torch.linalg.norm(T))

    bases, spectra, grams, unfoldings = _mode_spectra(T, modes, algorithm)
    T = _Unfolded(T, unfoldings)
    ranks = select_tucker_ranks(spec, spectra, shape, modes, norm, where)

    def hosvd_bound(rks):
        return math.sqrt(sum(float(tail_errors(s)[min(r, s.size)]) ** 2 for s, r in zip(spectra, rks)))

    while True:
        factors, core, info = _decompose(T, modes, ranks, bases, grams, algorithm, n_iter_max, convergence_tol)
        info["error"] = _measured_error(T.tensor, core, factors, modes, norm)
        bound = max(hosvd_bound(ranks), info["error"])
        full = all(r >= shape[n] for r, n in zip(ranks, modes))
        if spec.kind != "tol" or bound <= spec.value * norm or full:
            break
        # Only reachable when tol is below the Gram's rounding floor (~1e-7): raise the ranks.
        ranks = tuple(min(shape[n], r + max(1, r // 8)) for r, n in zip(ranks, modes))
    scale = math.ldexp(1.0, exponent)
    info = {k: ([e * scale for e in v] if k == "errors" else v * scale if k.endswith("error") else v)
            for k, v in info.items()}
    return TuckerFactors(kind.restore(times_power_of_two(core, exponent)), [kind.restore(U) for U in factors], modes,
                         error_bound=bound * scale, norm=norm * scale, mode_spectra=[s * scale for s in spectra],
                         algorithm=algorithm, info=info, error=info["error"])


def _mode_spectra(T, modes, algorithm):
    """Per mode (``modes`` order): left basis (None where only the values are needed), spectrum, Gram, unfolding."""
    bases, spectra, grams, unfoldings = [], [], [], {}
    for i, n in enumerate(modes):
        X = unfoldings[n] = unfold(T, n)
        gram = X @ X.T if prefers_gram(*X.shape) else None
        if gram is not None and i > 0 and algorithm != "hosvd":  # ST-HOSVD/HOOI need only the values here
            U, s = None, torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()
        else:
            U, s = left_basis(X, gram)
        bases.append(U)
        grams.append(gram)
        spectra.append(s.cpu().numpy())
    return bases, spectra, grams, unfoldings


def normalize_modes(modes, ndim: int, context: str) -> tuple:
    """Validate ``modes`` (None = all) and return them as non-negative ints, order kept."""
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, (int, np.integer)) and not isinstance(modes, bool):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"{context}: modes= must be a tuple of ints, got {modes!r}") from None
    if not modes:
        raise ValueError(f"{context}: modes= is empty; pass the modes to decompose, e.g. modes=(0, 1), or None for all")
    out = []
    for n in modes:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"{context}: modes= must hold ints, got {n!r}")
        if not -ndim <= n < ndim:
            raise ValueError(f"{context}: mode {n} is out of range for a {ndim}-D array")
        out.append(int(n) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{context}: modes={modes!r} names a mode twice")
    return tuple(out)


def complete_basis(U: torch.Tensor, r: int) -> torch.Tensor:
    """Extend orthonormal ``U (m, k)`` to ``r <= m`` orthonormal columns (deterministic)."""
    m, k = U.shape
    if k >= r:
        return U[:, :r]
    gen = make_generator(0)
    E = torch.randn(m, r - k, generator=gen, dtype=U.dtype).to(U.device)
    for _ in range(2):  # twice is enough (Kahan)
        E = E - U @ (U.T @ E)
    Q = torch.linalg.qr(E).Q
    return torch.cat([U, Q], dim=1)


def select_tucker_ranks(spec, spectra, shape, modes, norm, context="") -> tuple:
    """Per-mode ranks ``R_n`` (``modes`` order) for a RankSpec, from the mode ``spectra``."""
    sizes = [shape[n] for n in modes]
    numel = math.prod(shape)
    if spec.kind == "rank":
        values = spec.value
        if isinstance(values, tuple):
            if len(values) != len(modes):
                raise ValueError(f"{context}: rank={values!r} has {len(values)} entries but modes={modes} "
                                 f"has {len(modes)}; pass one rank per decomposed mode")
        else:
            values = (values,) * len(modes)
        return tuple(check_rank(r, size, context, what=f"rank for mode {n}")
                     for r, size, n in zip(values, sizes, modes))
    if spec.kind == "energy":
        return tuple(min(rank_for_energy(s, spec.value), size) for s, size in zip(spectra, sizes))
    if spec.kind == "vbmf":
        return tuple(min(vbmf_rank(s, (size, numel // size)), size) for s, size in zip(spectra, sizes))
    if spec.kind == "tol":
        return _tol_ranks(spectra, sizes, spec.value, norm)
    if spec.kind == "ratio":
        return _ratio_ranks(spectra, shape, modes, spec.value * numel, context)
    raise ValueError(f"{context}: unknown rank specification {spec}")


def _tol_ranks(spectra, sizes, tol, norm):
    budget = (tol * norm) ** 2
    share = tol / math.sqrt(len(spectra))
    ranks = [min(rank_for_tol(s, share, norm), size) for s, size in zip(spectra, sizes)]
    energy2 = [np.square(np.asarray(s, dtype=np.float64)) for s in spectra]
    used = sum(float(e[r:].sum()) for e, r in zip(energy2, ranks))
    while True:  # drop the cheapest kept component while the bound stays within budget
        costs = [(float(e[r - 1]), i) for i, (e, r) in enumerate(zip(energy2, ranks)) if 1 < r <= e.size]
        if not costs:
            break
        cost, i = min(costs)
        if used + cost > budget:
            break
        used += cost
        ranks[i] -= 1
    return tuple(ranks)


def _ratio_ranks(spectra, shape, modes, budget, context):
    """Same kept-energy fraction ``e`` on every mode, ``e`` as large as the budget allows
    (bisection), then the leftover budget is filled greedily by energy gained per parameter."""
    sizes = [shape[n] for n in modes]
    ones = [1] * len(modes)
    if tucker_params(ones, shape, modes) > budget:
        reason = (f"even ranks {tuple(ones)} need {tucker_params(ones, shape, modes)} parameters, more than the "
                  f"budget of {budget:.0f}; pass a larger ratio=")
        raise InfeasibleRankError(f"{context}: {reason}", reason)
    energy2 = [np.square(np.asarray(s, dtype=np.float64)) for s in spectra]

    def ranks_at(level):
        return [min(rank_for_energy(s, level), size) for s, size in zip(spectra, sizes)]

    low, high = 0.0, 1.0
    if tucker_params(ranks_at(1.0), shape, modes) <= budget:
        low = 1.0
    for _ in range(60):
        if high - low < 1e-12:
            break
        mid = 0.5 * (low + high)
        if tucker_params(ranks_at(mid), shape, modes) <= budget:
            low = mid
        else:
            high = mid
    ranks = [max(1, r) for r in ranks_at(low)] if low > 0 else ones
    current = tucker_params(ranks, shape, modes)
    while True:
        best = None
        for i in range(len(modes)):
            if ranks[i] >= min(sizes[i], energy2[i].size) or energy2[i][ranks[i]] <= 0:
                continue
            trial = ranks.copy()
            trial[i] += 1
            cost = tucker_params(trial, shape, modes)
            if cost > budget:
                continue
            score = energy2[i][ranks[i]] / max(cost - current, 1)
            if best is None or score > best[0]:
                best = (score, i, cost)
        if best is None:
            return tuple(ranks)
        ranks[best[1]] += 1
        current = best[2]


class _Unfolded:
    """A tensor with cached mode unfoldings, so products ``T ×_m M`` skip the transpose copy."""

    def __init__(self, tensor, unfoldings):
        self.tensor, self.unfoldings = tensor, unfoldings
        self.shape, self.ndim = tuple(tensor.shape), tensor.ndim


def _apply(T, pairs):
    """``T ×_{(m, M) in pairs} M`` in order; ``T`` a tensor or :class:`_Unfolded`."""
    if isinstance(T, _Unfolded):
        if not pairs:
            return T.tensor
        (m, M), pairs = pairs[0], pairs[1:]
        shape = T.shape[:m] + (M.shape[0],) + T.shape[m + 1:]
        Y = fold(M @ T.unfoldings[m], m, shape) if m in T.unfoldings else mode_product(T.tensor, M, m)
    else:
        Y = T
    for m, M in pairs:
        Y = mode_product(Y, M, m)
    return Y


def _decompose(T, modes, ranks, bases, grams, algorithm, n_iter_max, convergence_tol):
    """Factors and core for the chosen algorithm; ``bases``/``grams`` come from the spectra."""
    info = {"n_iter": 0}
    if algorithm == "hosvd":
        factors = [complete_basis(U, r) for U, r in zip(bases, ranks)]
        return factors, _core(T, modes, factors), info
    norm2 = float(torch.linalg.norm(T.tensor)) ** 2
    factors, comps = _sthosvd(T, modes, ranks, bases, grams, info)
    err = math.sqrt(max(norm2 - info.pop("kept"), 0.0))
    info["sthosvd_error"] = err
    if algorithm == "sthosvd" or len(modes) == 1:  # one mode: ST-HOSVD is already optimal
        return factors, _core(T, modes, factors), info
    best = (err, list(factors))
    info["errors"] = [err]
    for it in range(n_iter_max):
        for i, n in enumerate(modes):
            others = [(modes[j], factors[j], comps[j]) for j in range(len(modes)) if j != i]
            factors[i], comps[i], kept = _leading(_projected_gram(T, n, others, grams[i]), ranks[i])
        new_err = math.sqrt(max(norm2 - kept, 0.0))  # kept = ||core||^2 of this sweep's factors
        info["n_iter"] = it + 1
        info["errors"].append(new_err)
        improved = best[0] - new_err
        if new_err < best[0]:
            best = (new_err, list(factors))
        if improved <= convergence_tol * best[0]:
            break
    return best[1], _core(T, modes, best[1]), info


def _sthosvd(T, modes, ranks, bases, grams, info):
    """ST-HOSVD factors (``modes`` order) and their orthogonal complements where known."""
    full = bases[0].shape[1] == T.shape[modes[0]]
    factors = [complete_basis(bases[0], ranks[0])]
    comps = [bases[0][:, ranks[0]:] if full else None]
    kept = float(torch.linalg.norm(_apply(T, [(modes[0], factors[0].T)]))) ** 2 if len(modes) == 1 else 0.0
    Y, applied = T, 0  # Y = T ×_{j < applied} U_j^T
    for i in range(1, len(modes)):
        n = modes[i]
        if i == 1 and len(modes) == 2:
            gram = _projected_gram(T, n, [(modes[0], factors[0], comps[0])], grams[1])
        else:
            Y = _apply(Y, [(modes[j], factors[j].T) for j in range(applied, i)])
            applied = i
            gram = _projected_gram(Y, n, [], None)
        U, Q, kept = _leading(gram, ranks[i])
        factors.append(U)
        comps.append(Q)
    info["kept"] = kept
    return factors, comps


def _projected_gram(T, n, others, gram_n):
    """Gram of the mode-n unfolding of ``Y = T ×_{(m, U, Q) in others} U^T``.

    Returns ``("gram", M)`` or, when that unfolding is tall, ``("tall", Y_(n))``. With one
    other mode whose complement ``Q`` is thinner than ``U`` (ranks above half the mode
    size) and the Gram ``gram_n`` of ``T``'s unfolding known, uses
    ``M = gram_n - Gram((T ×_m Q^T)_(n))``, since ``U U^T = I - Q Q^T``: the cost scales
    with ``min(R_m, I_m - R_m)``.
    """
    if gram_n is not None and len(others) == 1:
        m, U, Q = others[0]
        if Q is not None and Q.shape[1] < U.shape[1]:
            if Q.shape[1] == 0:
                return "gram", gram_n
            X = unfold(_apply(T, [(m, Q.T)]), n)
            return "gram", gram_n - X @ X.T
    X = unfold(_apply(T, [(m, U.T) for m, U, _ in others]), n)
    return ("gram", X @ X.T) if X.shape[0] <= X.shape[1] else ("tall", X)


def _leading(kind_and_matrix, r):
    """``(U (I, r), complement (I, I - r) or None, sum of the r largest squared singular values)``."""
    kind, M = kind_and_matrix
    if kind == "gram":
        lam, V = torch.linalg.eigh(M)
        V, lam = V.flip(-1), lam.flip(-1)
        return V[:, :r], V[:, r:], float(lam[:r].clamp_min(0).sum())
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    return complete_basis(U, r), None, float(S[:r].square().sum())


def _core(T, modes, factors):
    """``T ×_n U_n^T``, the most shrinking modes first (cheapest order)."""
    order = sorted(range(len(modes)), key=lambda i: factors[i].shape[1] / factors[i].shape[0])
    return _apply(T, [(modes[i], factors[i].T) for i in order])


def _measured_error(T, core, factors, modes, norm) -> float:
    """``||T - core ×_n U_n||_F``: from ``||T||^2 - ||core||^2`` when that is far above rounding
    (orthonormal factors), else by explicit reconstruction (no cancellation)."""
    fast2 = norm ** 2 - float(torch.linalg.norm(core)) ** 2
    if fast2 > 1e-8 * norm ** 2:
        return math.sqrt(fast2)
    approx = core
    for n, U in zip(modes, factors):
        approx = mode_product(approx, U, n)
    return float(torch.linalg.norm(T - approx))


__all__ = ["tucker", "select_tucker_ranks", "normalize_modes", "complete_basis", "ALGORITHMS"]
