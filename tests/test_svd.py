"""Property tests of the truncated SVD core (decomp.svd).

* Eckart–Young: the exact rank-k error equals sqrt(sum_{i>k} s_i^2) = error_bound, the
  spectral error equals s_{k+1}, and no other rank-k matrix we construct does better.
* Randomized SVD: near-optimal on decaying spectra, error_bound is the measured error,
  deterministic per seed, and tol= is met.
* Array plumbing: numpy in -> numpy out, torch in -> torch out, dtype kept, half
  precisions accepted, bad arrays rejected.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import decaying_matrix
from decomp_toolkit.decomp import SVDFactors, randomized_svd, svd
from decomp_toolkit.decomp.svd import optimal_error

dims = st.integers(2, 32)
decays = st.floats(0.2, 0.95)
seeds = st.integers(0, 2 ** 16)


def np_singular_values(A):
    return np.linalg.svd(np.asarray(A, dtype=np.float64), compute_uv=False)


def fro(X):
    return float(torch.linalg.norm(torch.as_tensor(X, dtype=torch.float64)))


# --------------------------------------------------------------------------- Eckart–Young

@given(m=dims, n=dims, decay=decays, seed=seeds, data=st.data())
@example(m=2, n=2, decay=0.5, seed=0, data=None)
def test_eckart_young_frobenius_and_spectral(m, n, decay, seed, data):
    A = decaying_matrix(m, n, decay, seed)
    L = min(m, n)
    k = data.draw(st.integers(1, L), label="k") if data is not None else 1
    f = svd(A, rank=k)
    s = np_singular_values(A)
    norm = float(np.linalg.norm(s))
    optimum = math.sqrt(float(np.sum(s[k:] ** 2)))
    R = A - f.to_tensor()
    err = fro(R)
    # measured error = sqrt(tail) = error_bound (float64; roundoff floor ~1e-15 * ||A||)
    assert err == pytest.approx(optimum, rel=1e-8, abs=1e-12 * norm)
    assert f.error_bound == pytest.approx(optimum, rel=1e-8, abs=1e-12 * norm)
    assert f.error_bound == pytest.approx(optimal_error(A, k), rel=1e-12, abs=1e-14 * norm)
    assert f.norm == pytest.approx(norm, rel=1e-12)
    assert f.relative_error_bound == pytest.approx(f.error_bound / norm)
    assert f.relative_error_to(A) == pytest.approx(err / norm, rel=1e-10, abs=1e-14)
    # spectral norm error = s_{k+1}
    spectral = float(torch.linalg.matrix_norm(R, ord=2))
    expected = float(s[k]) if k < L else 0.0
    assert spectral == pytest.approx(expected, rel=1e-8, abs=1e-12 * norm)
    # shapes, rank, parameters, descending kept spectrum
    assert f.rank == k and f.shape == (m, n)
    assert tuple(f.U.shape) == (m, k) and tuple(f.S.shape) == (k,) and tuple(f.Vh.shape) == (k, n)
    assert f.num_params == k * (m + n) and f.dense_params == m * n
    assert np.all(np.diff(f.S.numpy()) <= 0)
    np.testing.assert_allclose(f.singular_values, s, rtol=1e-10, atol=1e-14 * norm)
    # orthonormal factors
    torch.testing.assert_close(f.U.T @ f.U, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(f.Vh @ f.Vh.T, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    # balanced factors reproduce the approximation
    P, Q = f.balanced_factors()
    torch.testing.assert_close(P @ Q, f.to_tensor(), atol=1e-12 * norm, rtol=0)


@given(m=dims, n=dims, decay=decays, seed=seeds, data=st.data())
def test_no_other_rank_k_matrix_is_better(m, n, decay, seed, data):
    A = decaying_matrix(m, n, decay, seed)
    k = data.draw(st.integers(1, min(m, n)), label="k")
    best = svd(A, rank=k).error_bound
    gen = torch.Generator().manual_seed(seed + 1)
    # a random rank-k orthogonal projection of the columns, of the rows, and of both
    Q = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    Z = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    candidates = [Q @ (Q.T @ A), (A @ Z) @ Z.T, Q @ (Q.T @ A @ Z) @ Z.T]
    # a perturbed optimum and a random rank-k product
    f = svd(A, rank=k)
    U = f.U + 1e-3 * torch.randn(f.U.shape, generator=gen, dtype=torch.float64)
    candidates.append((U * f.S) @ f.Vh)
    candidates.append(torch.randn(m, k, generator=gen, dtype=torch.float64)
                      @ torch.randn(k, n, generator=gen, dtype=torch.float64) * 0.1)
    for B in candidates:
        assert torch.linalg.matrix_rank(B) <= k
        assert fro(A - B) >= best * (1 - 1e-10)


@given(g=st.integers(1, 4), m=st.integers(2, 16), n=st.integers(2, 16), seed=seeds, data=st.data())
def test_batched_error_bound_sums_blocks(g, m, n, seed, data):
    A = torch.stack([decaying_matrix(m, n, 0.3 + 0.15 * i, seed + i) for i in range(g)])
    k = data.draw(st.integers(1, min(m, n)), label="k")
    f = svd(A, rank=k)
    tails = [np.sum(np_singular_values(A[i])[k:] ** 2) for i in range(g)]
    norm = fro(A)
    assert f.error_bound == pytest.approx(math.sqrt(sum(tails)), rel=1e-8, abs=1e-12 * norm)
    assert fro(A - f.to_tensor()) == pytest.approx(f.error_bound, rel=1e-8, abs=1e-12 * norm)
    assert f.shape == (g, m, n) and f.num_params == g * k * (m + n)
    # each block is its own best rank-k approximation
    for i in range(g):
        single = svd(A[i], rank=k)
        torch.testing.assert_close(f.to_tensor()[i], single.to_tensor(), atol=1e-10 * norm, rtol=0)


def test_rank_deficient_input_has_zero_error_at_its_rank():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 9, generator=gen,
                                                                             dtype=torch.float64)
    f = svd(A, rank=3)
    assert f.error_bound < 1e-12 * fro(A)
    assert fro(A - f.to_tensor()) < 1e-12 * fro(A)
    assert svd(A, tol=1e-9).rank == 3
    assert svd(A, energy=1.0).rank <= 4  # the roundoff components hold ~1e-30 of the energy


def test_zero_matrix():
    f = svd(torch.zeros(4, 5, dtype=torch.float64), rank=2)
    assert f.error_bound == 0.0 and f.norm == 0.0 and f.relative_error_bound == 0.0
    assert svd(np.zeros((4, 5)), energy=0.5).rank == 1


# --------------------------------------------------------------------------- randomized

@given(m=st.integers(20, 60), n=st.integers(20, 60), decay=st.floats(0.2, 0.8), seed=seeds,
       data=st.data())
@example(m=60, n=20, decay=0.8, seed=0, data=None)
def test_randomized_is_near_optimal_and_certified(m, n, decay, seed, data):
    A = decaying_matrix(m, n, decay, seed)
    L = min(m, n)
    k = data.draw(st.integers(1, L - 1), label="k") if data is not None else 12
    f = svd(A, rank=k, algorithm="randomized", oversample=10, n_iter=4, random_state=seed)
    optimum = optimal_error(A, k)
    err = fro(A - f.to_tensor())
    assert f.algorithm == "randomized" and f.rank == k
    assert err <= 1.05 * optimum + 1e-12 * f.norm
    assert err >= optimum * (1 - 1e-10)
    # error_bound is the measured error (computed from ||A||^2 - kept energy)
    assert f.error_bound == pytest.approx(err, rel=1e-6, abs=1e-10 * f.norm)


@given(m=st.integers(10, 50), n=st.integers(10, 50), seed=seeds, data=st.data())
def test_randomized_is_deterministic_per_seed(m, n, seed, data):
    A = decaying_matrix(m, n, 0.5, seed)
    k = data.draw(st.integers(1, min(m, n) - 1), label="k")
    a = svd(A, rank=k, algorithm="randomized", random_state=seed)
    b = svd(A, rank=k, algorithm="randomized", random_state=seed)
    c = svd(A, rank=k, algorithm="randomized", random_state=seed + 1)
    for x, y in ((a.U, b.U), (a.S, b.S), (a.Vh, b.Vh)):
        assert torch.equal(x, y)
    assert a.error_bound == b.error_bound
    # another seed gives other (if close) factors, when the sketch does not span everything
    if k + 10 < min(m, n):
        assert not (torch.equal(a.U, c.U) and torch.equal(a.S, c.S) and torch.equal(a.Vh, c.Vh))
    # a torch.Generator works too, and None is the fixed default seed
    d = svd(A, rank=k, algorithm="randomized", random_state=torch.Generator().manual_seed(seed))
    assert torch.equal(a.U, d.U)
    assert torch.equal(svd(A, rank=k, algorithm="randomized").U, svd(A, rank=k, algorithm="randomized").U)


@given(m=st.integers(10, 70), n=st.integers(10, 70), decay=st.floats(0.2, 0.95), seed=seeds,
       tol=st.floats(0.0, 0.9))
@example(m=70, n=70, decay=0.95, seed=0, tol=1e-3)  # needs the sketch to grow past 32
@example(m=70, n=70, decay=0.5, seed=0, tol=0.0)
def test_randomized_tol_is_met(m, n, decay, seed, tol):
    A = decaying_matrix(m, n, decay, seed)
    f = svd(A, tol=tol, algorithm="randomized", random_state=seed)
    err = fro(A - f.to_tensor())
    norm = f.norm
    assert f.error_bound <= tol * norm + 1e-10 * norm
    assert err <= tol * norm + 1e-10 * norm
    assert f.error_bound == pytest.approx(err, rel=1e-6, abs=1e-10 * norm)
    # not wasteful: within a couple of components of the exact minimal rank
    assert f.rank <= svd(A, tol=tol).rank + 2


@given(m=st.integers(10, 70), n=st.integers(10, 70), decay=st.floats(0.2, 0.95), seed=seeds,
       energy=st.floats(0.05, 1.0))
def test_randomized_energy_is_met(m, n, decay, seed, energy):
    A = decaying_matrix(m, n, decay, seed)
    f = svd(A, energy=energy, algorithm="randomized", random_state=seed)
    norm = f.norm
    captured = norm ** 2 - fro(A - f.to_tensor()) ** 2
    assert captured >= energy * norm ** 2 * (1 - 1e-9)
    assert f.rank <= svd(A, energy=energy).rank + 2


@given(m=st.integers(8, 80), n=st.integers(8, 80), decay=st.floats(0.2, 0.7), seed=seeds, data=st.data())
def test_randomized_float32_sketch_bound_holds_for_the_returned_factors(m, n, decay, seed, data):
    """A float32 input is sketched in float32: its error_bound (float32 residual + worst-case rounding)
    is >= the error of the returned factors measured in float64 and within 1e-3 of it, and the sketch
    is as accurate as the float64 one."""
    A = decaying_matrix(m, n, decay, seed, dtype=torch.float32)
    k = data.draw(st.integers(1, min(m, n)), label="k")
    n_iter = data.draw(st.integers(0, 3), label="n_iter")
    f = svd(A, rank=k, algorithm="randomized", n_iter=n_iter, random_state=seed)
    assert f.U.dtype == torch.float32 and f.rank == k
    U, S, Vh = (x.double() for x in (f.U, f.S, f.Vh))
    returned = fro(A.double() - (U * S) @ Vh)
    assert returned - 1e-12 * f.norm <= f.error_bound <= returned * (1 + 1e-3)  # 1e-12: float64 measurement
    if n_iter >= 2:
        assert returned <= 1.05 * optimal_error(A, k) + 1e-5 * f.norm


def test_randomized_float32_bound_of_a_tiny_residual_is_measured_in_float64():
    gen = torch.Generator().manual_seed(0)
    A = (torch.randn(60, 3, generator=gen) @ torch.randn(3, 50, generator=gen)).float()  # exactly rank 3
    f = svd(A, rank=5, algorithm="randomized", random_state=0)
    U, S, Vh = (x.double() for x in (f.U, f.S, f.Vh))
    returned = fro(A.double() - (U * S) @ Vh)  # float32 rounding only: the slack would dominate it
    assert f.error_bound == pytest.approx(returned, rel=1e-9) and returned < 1e-5 * f.norm


@given(decay=st.floats(0.3, 0.9), tol=st.floats(1e-4, 0.5), seed=seeds)
def test_randomized_float32_tol_is_met_by_the_returned_factors(decay, tol, seed):
    A = decaying_matrix(60, 50, decay, seed, dtype=torch.float32)
    f = svd(A, tol=tol, algorithm="randomized", random_state=seed)
    U, S, Vh = (x.double() for x in (f.U, f.S, f.Vh))
    assert fro(A.double() - (U * S) @ Vh) - 1e-12 * f.norm <= f.error_bound <= tol * f.norm
    if tol >= 3e-3:  # far above float32's noise floor (~3e-4 in the sketched tail energy)
        assert f.rank <= svd(A, tol=tol).rank + 2


def test_randomized_float32_batched():
    A = torch.stack([decaying_matrix(40, 30, 0.5, s, dtype=torch.float32) for s in range(3)])
    f = svd(A, ratio=0.25, algorithm="randomized", random_state=1)
    U, S, Vh = (x.double() for x in (f.U, f.S, f.Vh))
    returned = fro(A.double() - (U * S[..., None, :]) @ Vh)
    assert returned - 1e-12 * f.norm <= f.error_bound <= returned * (1 + 1e-3)
    assert torch.equal(f.U, svd(A, ratio=0.25, algorithm="randomized", random_state=1).U)  # deterministic


def test_randomized_batched_and_ratio():
    A = torch.stack([decaying_matrix(40, 30, 0.5, s) for s in range(3)])
    f = svd(A, ratio=0.25, algorithm="randomized", random_state=1)
    assert f.rank == int(0.25 * 40 * 30 // 70)
    assert f.error_bound == pytest.approx(fro(A - f.to_tensor()), rel=1e-6)
    exact = math.sqrt(sum(optimal_error(A[i], f.rank) ** 2 for i in range(3)))
    assert f.error_bound <= 1.05 * exact


def test_randomized_svd_function_returns_orthonormal_factors():
    A = decaying_matrix(30, 20, 0.5, 0)
    U, S, Vh = randomized_svd(A, 8, n_iter=2, random_state=torch.Generator().manual_seed(0))
    assert U.shape == (30, 8) and S.shape == (8,) and Vh.shape == (8, 20)
    torch.testing.assert_close(U.T @ U, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    U, S, Vh = randomized_svd(A, 50, n_iter=0, random_state=torch.Generator().manual_seed(0))  # capped at min(m, n)
    assert S.shape == (20,)
    torch.testing.assert_close((U * S) @ Vh, A, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- array kinds and dtypes

@pytest.mark.parametrize("algorithm", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out(algorithm, dtype):
    A = decaying_matrix(12, 9, 0.5, 0).numpy().astype(dtype)
    f = svd(A, rank=4, algorithm=algorithm)
    for x in (f.U, f.S, f.Vh, f.to_tensor()):
        assert isinstance(x, np.ndarray) and x.dtype == dtype
    assert isinstance(f.error_bound, float) and isinstance(f.norm, float)
    assert f.to_tensor().shape == A.shape
    ref = svd(A.astype(np.float64), rank=4, algorithm=algorithm)
    if algorithm == "exact" or dtype == np.float64:
        # math runs in float64: the float32 factors are the rounded float64 ones
        np.testing.assert_allclose(f.S, ref.S.astype(dtype), rtol=0, atol=0)
    else:  # the randomized sketch of a float32 input runs in float32 (its small SVD in float64)
        np.testing.assert_allclose(f.S, ref.S, rtol=1e-5, atol=0)
    # the bound holds for the factors as returned (rounded to float32), measured in float64
    U, S, Vh = (x.astype(np.float64) for x in (f.U, f.S, f.Vh))
    returned = np.linalg.norm(A.astype(np.float64) - (U * S) @ Vh)
    if algorithm == "exact" or dtype == np.float64:
        assert f.error_bound == pytest.approx(returned, rel=1e-12)
    else:  # float32 residual plus its worst-case rounding: an upper bound within 1e-3
        assert returned <= f.error_bound <= returned * (1 + 1e-3)
    assert f.error_bound == pytest.approx(ref.error_bound, rel=1e-4)


@pytest.mark.parametrize("algorithm", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_in_torch_out(algorithm, dtype):
    A = decaying_matrix(12, 9, 0.5, 0, dtype=dtype)
    f = svd(A, rank=4, algorithm=algorithm)
    for x in (f.U, f.S, f.Vh, f.to_tensor()):
        assert isinstance(x, torch.Tensor) and x.dtype == dtype and x.device == A.device
    ref = svd(A.double(), rank=4, algorithm=algorithm)  # the same float64 math on the same (rounded) input
    if algorithm == "exact" or dtype == torch.float64:
        assert torch.equal(f.S, ref.S.to(dtype))
    else:  # the randomized sketch runs in float32: S within float32 rounding, then rounded to dtype
        torch.testing.assert_close(f.S.double(), ref.S, rtol=max(1e-5, torch.finfo(dtype).eps), atol=0)
    if dtype == torch.float64:
        assert f.error_bound == ref.error_bound
    else:  # below float64: the bound holds for the factors as returned (rounded to dtype)
        U, S, Vh = (x.double() for x in (f.U, f.S, f.Vh))
        returned = float(torch.linalg.norm(A.double() - (U * S) @ Vh))
        if algorithm == "exact":
            assert f.error_bound == pytest.approx(returned, rel=1e-12)
        else:
            assert returned <= f.error_bound <= returned * (1 + 1e-3)
        assert f.error_bound >= ref.error_bound * (1 - 1e-12)
    assert f.relative_error_to(A) < 0.5


def test_input_is_not_modified_and_grad_is_not_tracked():
    A = decaying_matrix(10, 8, 0.5, 0).requires_grad_(True)
    before = A.detach().clone()
    f = svd(A, rank=3)
    assert torch.equal(A.detach(), before)
    assert not f.U.requires_grad and not f.S.requires_grad
    # the factors do not alias the input
    f.U.zero_()
    assert torch.equal(A.detach(), before)


@pytest.mark.parametrize("bad, exc, match", [
    ([[1.0, 2.0]], TypeError, r"expected a torch.Tensor or numpy.ndarray, got list"),
    (np.ones((3, 3), dtype=np.int64), TypeError, r"expected a floating-point array"),
    (torch.ones(3, 3, dtype=torch.int32), TypeError, r"expected a floating-point tensor"),
    (torch.ones(3, 3, dtype=torch.complex64), TypeError, r"expected a floating-point tensor"),
    (torch.ones(5), ValueError, r"expected a 2-D or 3-D array, got tensor of shape \(5,\)"),
    (torch.ones(2, 2, 2, 2), ValueError, r"expected a 2-D or 3-D array"),
    (torch.ones(0, 3), ValueError, r"empty tensor of shape \(0, 3\)"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, r"contains NaN or Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, r"numpy array of shape \(2, 2\) contains NaN or Inf"),
])
def test_bad_arrays(bad, exc, match):
    with pytest.raises(exc, match=match):
        svd(bad, rank=1)


def test_bad_arguments_name_the_request():
    A = torch.ones(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^svd: algorithm='qr' is not one of"):
        svd(A, rank=1, algorithm="qr")
    with pytest.raises(ValueError, match=r"^W \(shape \(4, 6\)\): rank=5 is outside \[1, 4\]"):
        svd(A, rank=5, context="W")
    with pytest.raises(ValueError, match=r"rank=5 is outside \[1, 4\]"):
        svd(A, rank=5, algorithm="randomized")
    with pytest.raises(ValueError, match=r"^svd: pass exactly one of"):
        svd(A)
    with pytest.raises(ValueError, match=r"even rank 1 needs 10 parameters, more than the budget of 2"):
        svd(A, ratio=0.1)
    with pytest.raises(TypeError, match=r"random_state must be an int"):
        svd(A, rank=1, algorithm="randomized", random_state="seed")


def test_factors_repr():
    f = svd(decaying_matrix(6, 4, 0.5, 0), rank=2)
    assert isinstance(f, SVDFactors)
    text = repr(f)
    assert "rank=2" in text and "shape=(6, 4)" in text and "algorithm='exact'" in text
    assert f.compression == pytest.approx(24 / 20)
