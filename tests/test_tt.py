"""Tensor train (TT-SVD, rounding) and TT-matrix: exact recovery, the TT-SVD bound, specs, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import decaying_matrix
from decomp_toolkit.decomp import (TTFactors, TTMatrixFactors, balanced_factorization, tt, tt_matrix, tt_matrix_num_params,
                    tt_num_params, tt_round)


def random_cores(dims, ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    full = (1,) + tuple(ranks) + (1,)
    return [torch.randn(full[k], n, full[k + 1], generator=gen, dtype=torch.float64) for k, n in enumerate(dims)]


def tt_tensor(dims, ranks, seed=0):
    return TTFactors(random_cores(dims, ranks, seed), error_bound=0.0, norm=1.0).to_tensor()


def error(A, f):
    return float(torch.linalg.norm(torch.as_tensor(A, dtype=torch.float64)
                                   - torch.as_tensor(f.to_tensor(), dtype=torch.float64)))


def realistic_tensor(seed=0):
    """Decaying spectrum (trained-weight-like), reshaped to 4 modes."""
    return decaying_matrix(48, 60, decay=0.3, seed=seed).reshape(6, 8, 6, 10)


def test_exact_tt_is_recovered():
    A = tt_tensor((4, 5, 6, 3), (3, 4, 2), seed=1)
    f = tt(A, rank=(3, 4, 2))
    assert f.rank == (1, 3, 4, 2, 1)
    assert [tuple(c.shape) for c in f.cores] == [(1, 4, 3), (3, 5, 4), (4, 6, 2), (2, 3, 1)]
    assert f.relative_error_to(A) < 1e-10 and f.error_bound < 1e-6 * f.norm
    assert tt(A, tol=1e-6).rank == (1, 3, 4, 2, 1)
    assert f.num_params == tt_num_params((4, 5, 6, 3), (3, 4, 2)) == 4 * 3 + 3 * 5 * 4 + 4 * 6 * 2 + 2 * 3


@given(eps=st.floats(0.01, 0.95), seed=st.integers(0, 10_000), d=st.integers(2, 4))
def test_tt_svd_error_within_eps(eps, seed, d):
    rng = np.random.default_rng(seed)
    dims = tuple(int(n) for n in rng.integers(2, 7, size=d))
    A = torch.as_tensor(rng.standard_normal(dims))
    f = tt(A, tol=eps)
    actual = error(A, f)
    assert actual <= eps * f.norm * (1 + 1e-12)
    assert f.error_bound <= eps * f.norm * (1 + 1e-12)
    # TT-SVD's error is exactly sqrt(sum eps_k^2) (orthonormal left cores)
    assert actual == pytest.approx(f.error_bound, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2])
def test_tt_svd_on_realistic_spectrum(eps):
    A = realistic_tensor()
    f = tt(A, tol=eps)
    assert error(A, f) <= eps * f.norm
    assert error(A, f) == pytest.approx(f.error_bound, rel=1e-6)
    if eps >= 0.05:
        assert f.num_params < A.numel()


def test_matches_tensorly_tensor_train_at_same_ranks():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train
    A = realistic_tensor(seed=2) + 0.01 * torch.randn(6, 8, 6, 10, generator=torch.Generator().manual_seed(2),
                                                      dtype=torch.float64)
    ours = tt(A, rank=(3, 5, 4))
    theirs = tensor_train(A.numpy(), rank=[1, 3, 5, 4, 1])
    their_err = np.linalg.norm(A.numpy() - tl.tt_to_tensor(theirs))
    assert error(A, ours) == pytest.approx(their_err, rel=1e-8)


def test_int_rank_is_a_cap_and_max_rank_caps():
    A = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert tt(A, rank=7).rank == (1, 3, 7, 6, 1)
    f = tt(A, tol=0.01, max_rank=4)
    assert max(f.rank) <= 4
    assert error(A, f) <= f.error_bound * (1 + 1e-9) + 1e-12


def test_energy_first_bond_met_and_minimal():
    A = realistic_tensor(seed=1)
    for energy in (0.5, 0.9, 0.99):
        f = tt(A, energy=energy)
        s2 = torch.linalg.svdvals(A.reshape(6, -1)).numpy() ** 2
        kept = np.cumsum(s2) / s2.sum()
        r = f.rank[1]
        assert kept[r - 1] >= energy - 1e-9 and (r == 1 or kept[r - 2] < energy)


@given(ratio=st.floats(0.02, 1.0))
def test_ratio_is_the_largest_uniform_cap_within_budget(ratio):
    A = realistic_tensor()
    dims = tuple(A.shape)
    budget = ratio * A.numel()
    if tt_num_params(dims, 1) > budget:
        with pytest.raises(ValueError, match="budget"):
            tt(A, ratio=ratio)
        return
    f = tt(A, ratio=ratio)
    assert f.num_params <= budget
    cap = max(f.rank)
    limits = [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, 4)]
    if cap < max(limits):
        assert tt_num_params(dims, [min(cap + 1, lim) for lim in limits]) > budget


def test_tt_round_removes_padded_ranks_and_keeps_the_tensor():
    dims, ranks = (4, 5, 6, 3), (2, 3, 2)
    cores = random_cores(dims, ranks, seed=4)
    A = TTFactors(cores, error_bound=0.0, norm=1.0).to_tensor()
    # the TT sum A + A: block cores with doubled ranks, true ranks unchanged
    doubled = [torch.cat([cores[0], cores[0]], dim=2)]
    for c in cores[1:-1]:
        block = torch.zeros(2 * c.shape[0], c.shape[1], 2 * c.shape[2], dtype=torch.float64)
        block[:c.shape[0], :, :c.shape[2]] = c
        block[c.shape[0]:, :, c.shape[2]:] = c
        doubled.append(block)
    doubled.append(torch.cat([cores[-1], cores[-1]], dim=0))
    padded = TTFactors(doubled, error_bound=0.0, norm=float(torch.linalg.norm(2 * A)))
    assert padded.rank == (1, 4, 6, 4, 1)
    rounded = tt_round(padded, tol=1e-8)
    assert rounded.rank == (1, 2, 3, 2, 1)
    assert rounded.relative_error_to(2 * A) < 1e-10
    assert rounded.error_bound < 1e-7 * rounded.norm
    capped = tt_round(padded, rank=1)
    assert capped.rank == (1, 1, 1, 1, 1)
    assert error(2 * A, capped) <= capped.error_bound * (1 + 1e-9)


def test_tt_round_of_tt_svd_output_keeps_certificate():
    A = realistic_tensor(seed=5) + 0.01 * torch.randn(6, 8, 6, 10, generator=torch.Generator().manual_seed(5),
                                                      dtype=torch.float64)
    f = tt(A, tol=0.01)
    g = tt_round(f, tol=0.2)
    assert all(a <= b for a, b in zip(g.rank, f.rank))
    assert error(A, g) <= g.error_bound * (1 + 1e-9)


def test_tt_matrix_exact_recovery_and_layout():
    out_shape, in_shape, ranks = (3, 4, 2), (2, 5, 3), (2, 3)
    gen = torch.Generator().manual_seed(6)
    full = (1,) + ranks + (1,)
    cores = [torch.randn(full[k], m, n, full[k + 1], generator=gen, dtype=torch.float64)
             for k, (m, n) in enumerate(zip(out_shape, in_shape))]
    truth = TTMatrixFactors(cores, error_bound=0.0, norm=1.0)
    W = truth.to_tensor()
    assert tuple(W.shape) == (24, 30)
    # row i = (i1, i2, i3) over out_shape, column j = (j1, j2, j3) over in_shape
    i, j = (2, 1, 1), (1, 4, 0)
    row, col = np.ravel_multi_index(i, out_shape), np.ravel_multi_index(j, in_shape)
    value = cores[0][0, i[0], j[0]] @ cores[1][:, i[1], j[1]] @ cores[2][:, i[2], j[2], 0]
    assert float(W[row, col]) == pytest.approx(float(value))
    f = tt_matrix(W, in_shape=in_shape, out_shape=out_shape, rank=ranks)
    assert f.rank == (1, 2, 3, 1) and f.in_shape == in_shape and f.out_shape == out_shape
    assert f.relative_error_to(W) < 1e-10
    assert tt_matrix(W, in_shape=in_shape, out_shape=out_shape, tol=1e-6).rank == (1, 2, 3, 1)
    assert f.num_params == tt_matrix_num_params(in_shape, out_shape, ranks)


@given(eps=st.floats(0.02, 0.9), seed=st.integers(0, 1000))
def test_tt_matrix_tol_certified(eps, seed):
    W = decaying_matrix(40, 36, decay=0.3, seed=seed)
    f = tt_matrix(W, in_shape=(6, 6), out_shape=(5, 8), tol=eps)
    assert error(W, f) <= eps * f.norm * (1 + 1e-12)
    assert error(W, f) <= f.error_bound * (1 + 1e-9) + 1e-12


def test_tt_matrix_auto_shapes():
    W = torch.randn(625, 1024, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    f = tt_matrix(W, rank=2)
    assert f.out_shape == (5, 5, 5, 5) and f.in_shape == (8, 8, 4, 4)
    assert f.rank == (1, 2, 2, 2, 1) and f.shape == (625, 1024)
    assert f.to_tensor().dtype == torch.float32
    g = tt_matrix(W, in_shape=(4, 8, 8, 4), rank=2)  # out_shape factorized with the same d
    assert g.out_shape == (5, 5, 5, 5)
    assert balanced_factorization(25088, 6) == (8, 7, 7, 4, 4, 4)
    assert balanced_factorization(6, 4) == (3, 2, 1, 1)


def test_fc6_param_counts_from_references():
    in_shape, out_shape = (2, 7, 8, 8, 7, 4), (4,) * 6
    assert [tt_matrix_num_params(in_shape, out_shape, r) for r in (1, 2, 4, 8)] == [144, 528, 2016, 7872]
    assert math.prod(in_shape) == 25088 and math.prod(out_shape) == 4096
    # the same count from a TTMatrixFactors built from random cores
    gen = torch.Generator().manual_seed(0)
    full = (1,) + (8,) * 5 + (1,)
    cores = [torch.randn(full[k], m, n, full[k + 1], generator=gen)
             for k, (m, n) in enumerate(zip(out_shape, in_shape))]
    f = TTMatrixFactors(cores, error_bound=None, norm=1.0)
    assert f.num_params == 7872 and f.shape == (4096, 25088)
    assert round(25088 * 4096 / 7872) == 13054


def test_kinds_and_dtypes_round_trip():
    A = realistic_tensor().numpy().astype(np.float32)
    f = tt(A, rank=3)
    assert all(isinstance(c, np.ndarray) and c.dtype == np.float32 for c in f.cores)
    assert isinstance(f.to_tensor(), np.ndarray) and f.to_tensor().dtype == np.float32
    g = tt_round(f, rank=2)
    assert isinstance(g.cores[0], np.ndarray) and g.cores[0].dtype == np.float32
    m = tt_matrix(A.reshape(48, 60), in_shape=(6, 10), out_shape=(8, 6), rank=4)
    assert isinstance(m.to_tensor(), np.ndarray) and m.to_tensor().shape == (48, 60)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=(2, 2)), "has 2 entries; a 4-D TT has 3 bonds"),
    (dict(rank=(2, 9, 2)), "bond rank r_2=9 exceeds"),
    (dict(rank=(3, 4, 2), max_rank=3), "conflicts with max_rank"),
    (dict(rank="vbmf"), "not supported"),
    (dict(), "exactly one of"),
    (dict(tol=0.1, max_rank=0), "max_rank=0"),
    (dict(ratio=1e-4), "budget"),
])
def test_bad_tt_arguments(kwargs, match):
    A = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        tt(A, **kwargs)


@pytest.mark.parametrize("A, match", [
    (torch.randn(7), "at least 2 dimensions"),
    (torch.empty(3, 0), "empty"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
])
def test_bad_tt_inputs(A, match):
    with pytest.raises(ValueError, match=match):
        tt(A, rank=1)


@pytest.mark.parametrize("W, kwargs, match", [
    (torch.randn(97, 64), dict(rank=2), "prime factor 97 > 16.*pass in_shape=/out_shape=.*zero-pad"),
    (torch.randn(10, 64), dict(in_shape=(4, 4, 4), out_shape=(2, 4), rank=2), "multiplies to 8"),
    (torch.randn(8, 64), dict(in_shape=(8, 8), out_shape=(2, 2, 2), rank=2), "same length"),
    (torch.randn(8, 64), dict(in_shape=(8, 8), d=3, rank=2), "d=3 disagrees"),
    (torch.randn(8, 64), dict(in_shape=(8, 0, 8), rank=2), "positive ints"),
    (torch.randn(8, 64, 2), dict(rank=2), "2-D"),
    (torch.randn(8, 64), dict(in_shape=(64,), out_shape=(8,), rank=2), "at least 2 cores"),
])
def test_bad_tt_matrix_arguments(W, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tt_matrix(W, **kwargs)


def test_factor_objects_validate_chains_and_tt_round_types():
    with pytest.raises(ValueError, match="starts with rank"):
        TTFactors([torch.ones(1, 2, 3), torch.ones(2, 2, 1)], error_bound=None, norm=1.0)
    with pytest.raises(ValueError, match="boundary ranks must be 1"):
        TTFactors([torch.ones(2, 2, 1)], error_bound=None, norm=1.0)
    with pytest.raises(TypeError, match="expected TTFactors"):
        tt_round(torch.ones(3, 3), tol=0.1)


@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.3])
def test_gram_path_on_a_larger_tensor(eps):
    # unfoldings above SMALL_SVD_FLOPS use the Gram + eigh path; eps_k are still measured exactly
    A = decaying_matrix(80, 6400, decay=0.3, seed=8).reshape(80, 80, 80)
    f = tt(A, tol=eps)
    actual = error(A, f)
    assert actual <= eps * f.norm
    assert actual == pytest.approx(f.error_bound, rel=1e-6, abs=1e-9 * f.norm)
