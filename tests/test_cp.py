"""CP decomposition: exact recovery, rank selection, degeneracy guard, determinism, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp_toolkit.decomp import CPFactors, cp
from decomp_toolkit.decomp.formats.cp import cp_reconstruct


def cp_tensor(shape, R, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, R, generator=gen, dtype=torch.float64) for n in shape]
    return cp_reconstruct(torch.ones(R, dtype=torch.float64), factors).to(dtype)


def rel_err(A, B):
    A, B = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(B, dtype=torch.float64)
    return float((A - B).norm() / A.norm())


@settings(max_examples=8)
@given(shape=st.lists(st.integers(3, 7), min_size=3, max_size=4).map(tuple), R=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_exact_recovery_of_generic_rank_r(shape, R, seed):
    T = cp_tensor(shape, R, seed)
    c = cp(T, rank=R, n_iter_max=300, convergence_tol=1e-10)
    assert isinstance(c, CPFactors)
    assert c.shape == shape and c.rank == R
    assert c.error / c.norm <= 1e-6
    assert rel_err(T, c.to_tensor()) <= 1e-6
    assert c.num_params == R * sum(shape)
    # error is the exact error of the returned model
    assert abs(c.error - float((T - c.to_tensor()).norm())) <= 1e-9 * c.norm


def test_reconstruction_layout_matches_definition():
    c = cp(cp_tensor((4, 5, 3, 2), 2, 1), rank=2)
    w, (A, B, C, D) = c.weights, c.factors
    dense = torch.einsum("r,ar,br,cr,dr->abcd", w, A, B, C, D)
    assert torch.allclose(c.to_tensor(), dense, atol=1e-12)
    assert c.factors[0].shape == (4, 2) and c.weights.shape == (2,)
    assert torch.allclose(torch.linalg.vector_norm(A, dim=0), torch.ones(2, dtype=torch.float64))


def test_rank_above_mode_sizes_and_random_init():
    T = cp_tensor((3, 4, 5), 6, 3)
    for init in ("svd", "random"):
        c = cp(T, rank=6, init=init, n_iter_max=100, random_state=1)
        assert c.rank == 6 and np.isfinite(c.error)
        assert c.error / c.norm < 0.05


def test_numpy_float32_round_trip():
    T = cp_tensor((5, 6, 4), 2, 2).numpy().astype(np.float32)
    c = cp(T, rank=2)
    assert isinstance(c.weights, np.ndarray) and c.weights.dtype == np.float32
    assert all(isinstance(F, np.ndarray) and F.dtype == np.float32 for F in c.factors)
    out = c.to_tensor()
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == T.shape
    assert rel_err(T, out) < 1e-5


def test_torch_float32_round_trip():
    T = cp_tensor((5, 6, 4), 2, 2, dtype=torch.float32)
    c = cp(T, rank=2)
    assert isinstance(c.to_tensor(), torch.Tensor) and c.to_tensor().dtype == torch.float32


def test_deterministic_for_fixed_random_state():
    T = torch.randn(6, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for init in ("svd", "random"):
        a = cp(T, rank=9, init=init, random_state=3, n_iter_max=30)
        b = cp(T, rank=9, init=init, random_state=3, n_iter_max=30)
        assert torch.equal(a.weights, b.weights)
        assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
        assert a.info["errors"] == b.info["errors"]


def test_degenerate_border_rank_tensor_never_nan():
    """a⊗a⊗b + a⊗b⊗a + b⊗a⊗a has rank 3, border rank 2: rank-2 fits diverge (Paatero 2000)."""
    gen = torch.Generator().manual_seed(0)
    vecs = [torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in (4, 5, 6)]
    (a1, b1), (a2, b2), (a3, b3) = [(v[:, 0], v[:, 1]) for v in vecs]
    outer = lambda x, y, z: torch.einsum("a,b,c->abc", x, y, z)  # noqa: E731
    T = outer(a1, a2, b3) + outer(a1, b2, a3) + outer(b1, a2, a3)
    for init in ("svd", "random"):
        c = cp(T, rank=2, init=init, n_iter_max=150, convergence_tol=0)
        assert np.isfinite(c.error)
        assert all(torch.isfinite(F).all() for F in c.factors) and torch.isfinite(c.weights).all()
        assert c.info["degenerate"] is True
        assert c.info["ridge"] > 0 and c.info["min_congruence"] < -0.5
        assert c.info["weights_ratio"] <= 10 * 1.5
        assert c.error / c.norm < 0.05


def test_tol_finds_minimal_rank_on_exact_tensor():
    T = cp_tensor((6, 7, 8), 4, 5)
    c = cp(T, tol=1e-4, n_iter_max=300)
    assert c.error <= 1e-4 * c.norm
    assert c.rank == 4
    search = c.info["rank_search"]
    assert search[3] > 1e-4 and search[4] <= 1e-4
    below = cp(T, rank=3, n_iter_max=300)
    assert below.error > 1e-4 * below.norm


def test_tol_unreachable_raises():
    T = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="not reached"):
        cp(T, tol=1e-3, max_rank=2, n_iter_max=20)


def test_ratio_picks_largest_rank_within_budget():
    T = torch.randn(8, 9, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = cp(T, ratio=0.25, n_iter_max=10)
    budget = 0.25 * 8 * 9 * 10
    assert c.num_params <= budget < (c.rank + 1) * 27


def test_energy_refused_with_message():
    with pytest.raises(ValueError, match="energy= is not supported by CP.*tol=.*ratio="):
        cp(torch.randn(3, 3, 3), energy=0.9)


@pytest.mark.parametrize("spec, named", [(dict(energy=0.9), "energy="), (dict(rank="vbmf"), "rank='vbmf'")])
def test_the_layer_refusal_names_the_spec_kind_refused(spec, named):
    from decomp_toolkit.layers import decompose

    with pytest.raises(ValueError, match=f": {named} is not supported by CP.*pass rank= \\(an int\\), tol= or ratio="):
        decompose(torch.nn.Conv2d(6, 8, 3), method="cp", **spec)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(5), ValueError, "at least 3 dimensions"),
    (torch.randn(4, 5), ValueError, "decomp.svd"),
    (torch.zeros(0, 3, 3), ValueError, "empty"),
    (torch.tensor([[[float("nan")]]]).expand(2, 2, 2).clone(), ValueError, "NaN or Inf"),
    (torch.full((2, 2, 2), float("inf")), ValueError, "NaN or Inf"),
    (torch.ones(2, 2, 2, dtype=torch.int64), TypeError, "floating-point"),
    ([[[1.0]]], TypeError, "torch.Tensor or numpy.ndarray"),
])
def test_bad_inputs(bad, exc, match):
    with pytest.raises(exc, match=match):
        cp(bad, rank=1)


def test_bad_rank_specs():
    T = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=">= 1"):
        cp(T, rank=0)
    with pytest.raises(ValueError, match="outside"):
        cp(T, rank=10_000)
    with pytest.raises(ValueError, match="exactly one"):
        cp(T, rank=2, tol=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        cp(T)
    with pytest.raises(TypeError, match="int"):
        cp(T, rank=2.5)
    with pytest.raises(ValueError, match="rank='vbmf' is not supported"):
        cp(T, rank="vbmf")
    with pytest.raises(ValueError, match="init="):
        cp(T, rank=2, init="hosvd")
    with pytest.raises(ValueError, match="n_iter_max"):
        cp(T, rank=2, n_iter_max=0)


def test_zero_tensor():
    c = cp(torch.zeros(3, 3, 3), rank=2)
    assert c.error == 0 and torch.count_nonzero(c.to_tensor()) == 0


def test_conv_kernel_shape_and_linesearch_helps():
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(16, 8, 3, 3, generator=gen, dtype=torch.float64)
    plain = cp(K, rank=12, n_iter_max=40, convergence_tol=0, linesearch=False)
    fast = cp(K, rank=12, n_iter_max=40, convergence_tol=0)
    assert [tuple(F.shape) for F in fast.factors] == [(16, 12), (8, 12), (3, 12), (3, 12)]
    assert fast.error <= plain.error * 1.001
    errs = fast.info["errors"]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:]))


def test_mixed_precision_matches_float64():
    K = torch.randn(10, 9, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = cp(K, rank=6, n_iter_max=60, convergence_tol=0, mixed_precision=True)
    b = cp(K, rank=6, n_iter_max=60, convergence_tol=0, mixed_precision=False)
    assert a.weights.dtype == torch.float64
    assert abs(a.error - b.error) <= 1e-3 * a.norm


# ---------------------------------------------------------------- identities the fast ALS loop relies on

def _cp_module():
    import importlib
    return importlib.import_module("decomp_toolkit.decomp.cp")  # the module (the package exports the function)


STATES = ["_ALSState", "_NumpyALSState"]  # the torch execution path and the numpy one of small tensors


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("shape", [(5, 4, 3), (6, 1, 4, 3), (4, 3, 2, 3, 2)])
def test_dimension_tree_mttkrp_matches_unfolding_times_khatri_rao(shape, state):
    """partial + MTTKRP kernel (padded or side-by-side transposed factors; groups of 1-3 modes) = A_(n) KR(others)."""
    from decomp_toolkit.decomp._kernels import khatri_rao, unfold
    C = _cp_module()
    gen = torch.Generator().manual_seed(3)
    T = torch.randn(*shape, generator=gen, dtype=torch.float64)
    st = getattr(C, state)(T, 4, "random", gen, False, 1e-13)
    factors = st.factors
    for gi, group in enumerate(st.groups):
        X = st.tree.partial(gi, st.rows)
        for n in group:
            want = unfold(T, n) @ khatri_rao([factors[m] for m in range(T.ndim) if m != n])
            got = torch.as_tensor(st._k_mttkrp(X, st.tree.layout[gi], st.rows, n)).T
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(T.norm()))


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("shape, R", [((7, 6, 5, 4), 5), ((9, 2, 6), 4)])
def test_cheap_residuals_equal_the_reconstruction_error(shape, R, state):
    """The sweep's error (Grams + last MTTKRP) and the extrapolation's (stacked Grams + its contraction)
    equal ||T - Â|| / ||T|| of the iterate they describe; a kept extrapolation's cached contraction is exact."""
    C = _cp_module()
    T = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def exact(st):
        weights, factors, _ = st.results()
        return rel_err(T, cp_reconstruct(weights, factors))

    st = getattr(C, state)(T, R, "svd", torch.Generator().manual_seed(0), False, 1e-13)
    st.acc_pow = 6.0  # moderate jumps (k^(1/6))
    kept = 0
    for iteration in range(1, 9):
        rel = st.sweep()
        assert abs(rel - exact(st)) <= 1e-12
        if st.previous is not None:
            ext = st.extrapolate(iteration + 3, math.inf)  # an infinite bar: the step is always kept
            assert abs(ext - exact(st)) <= 1e-12 * max(1.0, ext)
            X, M = st.cached
            group = st.groups[0]
            again = st.tree.partial(0, st.rows)
            assert torch.allclose(torch.as_tensor(X), torch.as_tensor(again), rtol=1e-13, atol=1e-13)
            first = st._k_mttkrp(X, st.tree.layout[0], st.rows, group[0])
            assert torch.allclose(torch.as_tensor(M), torch.as_tensor(first), rtol=1e-13, atol=1e-13)
            kept += 1
        st.previous = (st.P, st.weights)
    assert kept == 7
    # the public result: the last recorded error is that of the returned factors
    c = cp(T, rank=R, n_iter_max=25, convergence_tol=0, mixed_precision=False)
    assert abs(c.info["errors"][-1] - c.error / c.norm) <= 1e-12


def test_model_norm_flags_any_non_finite_entry():
    """The loop's only finiteness test: a NaN/Inf anywhere in the factors or weights reaches ||Â||^2."""
    C = _cp_module()
    gen = torch.Generator().manual_seed(5)
    rows = [C._normalize_rows(torch.randn(4, n, generator=gen, dtype=torch.float64))[0] for n in (3, 5, 2)]
    weights = torch.rand(4, generator=gen, dtype=torch.float64)
    grams = [F @ F.T for F in rows]
    assert math.isfinite(C._model_norm2(C._product(grams), weights))
    for bad in (float("nan"), float("inf")):
        broken = [F.clone() for F in rows]
        broken[1][2, 3] = bad
        broken[1] = C._normalize_rows(broken[1])[0]  # as the sweep does: Inf / Inf = NaN
        assert not math.isfinite(C._model_norm2(C._product([F @ F.T for F in broken]), weights))
        w = weights.clone()
        w[0] = bad
        assert not math.isfinite(C._model_norm2(C._product(grams), w))
        w[0] = 0.0  # a zero weight does not hide a NaN component
        broken[1][2] = float("nan")
        assert not math.isfinite(C._model_norm2(C._product([F @ F.T for F in broken]), w))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_non_finite_sweep_is_rolled_back_and_restarted(monkeypatch, backend):
    """A sweep that ends non-finite is detected (by the model norm), dropped, and redone with a larger ridge
    (on both execution paths: the torch one forced by a zero size threshold, the numpy one of small tensors)."""
    C = _cp_module()
    T = cp_tensor((6, 5, 4), 3, 7)
    calls = {"n": 0}
    name = "_mttkrp_from" if backend == "torch" else "_mttkrp_np"
    if backend == "torch":
        monkeypatch.setattr(C, "NUMPY_MAX_WORK", 0)
    real = getattr(C, name)

    def poisoned(X, modes, rows, n):  # NaN in the 3rd sweep's last solve (mode 2: groups [0], [1, 2])
        calls["n"] += n == 2
        M = real(X, modes, rows, n)
        return M * float("nan") if n == 2 and calls["n"] == 3 else M

    monkeypatch.setattr(C, name, poisoned)
    c = cp(T, rank=3, n_iter_max=200, convergence_tol=1e-12, linesearch=False)
    assert c.info["backend"] == backend
    assert c.info["restarts"] == 1 and c.info["degenerate"] is True and c.info["ridge"] >= 1e-6
    assert torch.isfinite(c.weights).all() and all(torch.isfinite(F).all() for F in c.factors)
    assert c.error / c.norm <= 1e-4


# ---------------------------------------------------------------- the numpy execution path of small tensors

def test_execution_path_follows_the_size_threshold(monkeypatch):
    """float64 CPU tensors with prod(I) * R <= NUMPY_MAX_WORK take the numpy path, others the torch one."""
    C = _cp_module()
    T = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert T.numel() * 12 <= C.NUMPY_MAX_WORK  # a small conv kernel: below the threshold
    assert cp(T, rank=12, n_iter_max=5).info["backend"] == "numpy"
    assert cp(T, rank=12, n_iter_max=5, compute_dtype=torch.float32).info["backend"] == "torch"
    monkeypatch.setattr(C, "NUMPY_MAX_WORK", T.numel() * 12 - 1)  # the same tensor just above it
    assert cp(T, rank=12, n_iter_max=5).info["backend"] == "torch"
    assert cp(T, rank=11, n_iter_max=5).info["backend"] == "numpy"


@pytest.mark.parametrize("shape, R", [((16, 8, 3, 3), 12), ((10, 9, 8), 6), ((4, 3, 2, 3, 2), 3), ((3, 4, 5), 6)])
@pytest.mark.parametrize("mixed_precision", [False, True])
def test_numpy_path_matches_torch_path(monkeypatch, shape, R, mixed_precision):
    """Same algorithm on both paths: same per-sweep errors and model (to rounding), same float32 switch;
    and on each, the reported error is the exact reconstruction error of the returned factors."""
    C = _cp_module()
    T = cp_tensor(shape, R, seed=8) + 0.05 * torch.randn(*shape, generator=torch.Generator().manual_seed(9),
                                                          dtype=torch.float64)
    options = dict(rank=R, n_iter_max=40, convergence_tol=0, mixed_precision=mixed_precision)
    fast = cp(T, **options)
    monkeypatch.setattr(C, "NUMPY_MAX_WORK", 0)
    ref = cp(T, **options)
    assert (fast.info["backend"], ref.info["backend"]) == ("numpy", "torch")
    for c in (fast, ref):
        assert abs(c.error - float((T - c.to_tensor()).norm())) <= 1e-10 * c.norm
        assert all(b <= a + 1e-9 for a, b in zip(c.info["errors"][3:], c.info["errors"][4:]))  # monotone ALS
    # float64 sweeps differ by rounding only; float32 ones by float32 rounding (the line search may then decide
    # differently on near-ties, which moves the iterate by about as much)
    rtol = 1e-3 if mixed_precision else 1e-9
    assert fast.info["float32_sweeps"] == ref.info["float32_sweeps"]
    assert np.allclose(fast.info["errors"], ref.info["errors"], rtol=rtol, atol=0)
    assert abs(fast.error - ref.error) <= rtol * fast.error
    assert rel_err(ref.to_tensor(), fast.to_tensor()) <= 10 * rtol


def test_numpy_path_is_deterministic_and_keeps_the_guard():
    """Repeated calls give bitwise-equal results; the degeneracy guard acts on the numpy path too."""
    T = torch.randn(6, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = cp(T, rank=9, random_state=3, n_iter_max=30)
    b = cp(T, rank=9, random_state=3, n_iter_max=30)
    assert a.info["backend"] == "numpy"
    assert torch.equal(a.weights, b.weights) and all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    assert a.info["errors"] == b.info["errors"]


def test_numpy_solve_matches_cholesky_and_grows_the_ridge():
    """_solve_np = (H + mu I)^{-1} M^T; a singular H gets the ridge raised until Cholesky succeeds."""
    C = _cp_module()
    rng = np.random.default_rng(0)
    B = rng.standard_normal((5, 8))
    H, Mt, eye = B @ B.T, rng.standard_normal((5, 7)), np.eye(5)
    F, mu = C._solve_np(H, Mt, 1e-13, 1e-13 * eye, eye)
    assert mu == 1e-13 and np.allclose((H + 1e-13 * eye) @ F, Mt, rtol=1e-10, atol=1e-10)
    singular = np.ones((5, 5))  # rank 1, and Cholesky fails on it without a ridge
    F, mu = C._solve_np(singular, Mt, 0.0, 0.0 * eye, eye)
    _, mu_torch = C._solve(torch.from_numpy(singular), torch.from_numpy(Mt), 0.0, torch.from_numpy(eye))
    assert mu == mu_torch > 0
    A = singular + mu * eye  # backward stable for this ill-conditioned (cond ~ 5 / mu) system
    assert np.linalg.norm(A @ F - Mt) <= 1e-10 * np.linalg.norm(A) * np.linalg.norm(F)
