"""Property tests of rank selection (decomp.rank) and of svd()'s use of it.

energy=/tol= ranks are minimal (k meets the target, k-1 does not), ratio= ranks are
maximal (k fits the budget, k+1 does not); batched spectra share one rank with energy
and error summed over the blocks; rank='vbmf' recovers the rank of a noisy low-rank
matrix. Targets are compared against spectra computed independently with numpy.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import decaying_matrix
from decomp_toolkit.decomp import parse_rank_spec, rank_for_energy, rank_for_tol, select_rank, svd, vbmf_rank
from decomp_toolkit.decomp.rank import RankSpec, check_rank, largest_rank_within, tail_errors

# Relative slack for comparisons of float64 sums computed along different paths.
SLACK = 1e-12

dims = st.integers(2, 24)
decays = st.floats(0.05, 0.95)
seeds = st.integers(0, 2 ** 16)
fractions = st.floats(0.01, 1.0, exclude_min=False)


def np_spectrum(A):
    """Singular values of A (m, n) or (g, m, n) as (g, L), computed by numpy."""
    arr = np.asarray(A, dtype=np.float64)
    return np.atleast_2d(np.linalg.svd(arr, compute_uv=False))


def kept_energy(s2d, k):
    return float(np.square(s2d[:, :k]).sum())


def tail_error(s2d, k):
    return math.sqrt(float(np.square(s2d[:, k:]).sum()))


def batched_matrix(g, m, n, decay, seed):
    if g == 0:
        return decaying_matrix(m, n, decay, seed)
    return torch.stack([decaying_matrix(m, n, decay * (0.8 + 0.2 * i / g), seed + i) for i in range(g)])


# --------------------------------------------------------------------------- energy

@given(g=st.integers(0, 3), m=dims, n=dims, decay=decays, seed=seeds, energy=st.floats(0.01, 1.0))
@example(g=0, m=5, n=3, decay=0.5, seed=0, energy=1.0)
@example(g=2, m=2, n=2, decay=0.05, seed=1, energy=0.999999)
def test_energy_rank_is_minimal(g, m, n, decay, seed, energy):
    A = batched_matrix(g, m, n, decay, seed)
    f = svd(A, energy=energy)
    s = np_spectrum(A)
    total = kept_energy(s, s.shape[1])
    k = f.rank
    assert 1 <= k <= min(m, n)
    assert kept_energy(s, k) >= energy * total * (1 - SLACK)
    if k > 1:
        assert kept_energy(s, k - 1) < energy * total * (1 + SLACK)
    # the function on its own agrees
    assert rank_for_energy(s, energy) == k


@given(s=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), energy=st.floats(0.001, 1.0))
def test_rank_for_energy_on_raw_spectra(s, energy):
    s = np.sort(np.asarray(s))[::-1]
    k = rank_for_energy(s, energy)
    total = float(np.sum(s ** 2))
    assert 1 <= k <= s.size
    if total > 0:
        assert np.sum(s[:k] ** 2) >= energy * total * (1 - SLACK)
        if k > 1:
            assert np.sum(s[:k - 1] ** 2) < energy * total * (1 + SLACK)


def test_energy_one_keeps_every_nonzero_component():
    s = np.array([3.0, 2.0, 1.0, 0.0, 0.0])
    assert rank_for_energy(s, 1.0) == 3


def test_rank_for_energy_partial_spectrum_asks_to_grow():
    s = np.array([3.0, 2.0])  # energy 13 of a total of 100
    assert rank_for_energy(s, 0.5, norm=10.0) == 3
    assert rank_for_energy(s, 0.09, norm=10.0) == 1
    assert rank_for_energy(s, 0.13, norm=10.0) == 2


# --------------------------------------------------------------------------- tol

@given(g=st.integers(0, 3), m=dims, n=dims, decay=decays, seed=seeds, tol=st.floats(0.0, 0.99))
@example(g=0, m=4, n=6, decay=0.5, seed=0, tol=0.0)
@example(g=3, m=8, n=8, decay=0.9, seed=3, tol=0.5)
def test_tol_rank_is_minimal(g, m, n, decay, seed, tol):
    A = batched_matrix(g, m, n, decay, seed)
    f = svd(A, tol=tol)
    s = np_spectrum(A)
    norm = float(np.linalg.norm(np.asarray(A)))
    k = f.rank
    assert 1 <= k <= min(m, n)
    # k meets the target (up to roundoff of the zero tail at full rank)
    assert tail_error(s, k) <= tol * norm * (1 + SLACK) + 1e-13 * norm
    assert f.error_bound <= tol * norm * (1 + SLACK) + 1e-13 * norm
    if k > 1:
        assert tail_error(s, k - 1) > tol * norm * (1 - SLACK)
    # the certified error is the measured one
    err = float(torch.linalg.norm(A - torch.as_tensor(f.to_tensor())))
    assert err == pytest.approx(f.error_bound, rel=1e-8, abs=1e-12 * norm)


@given(s=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), tol=st.floats(0.0, 0.999))
def test_rank_for_tol_on_raw_spectra(s, tol):
    s = np.sort(np.asarray(s))[::-1]
    k = rank_for_tol(s, tol)
    errors = tail_errors(s)
    assert 1 <= k <= s.size
    assert errors[k] <= tol * errors[0] * (1 + SLACK)
    if k > 1:
        assert errors[k - 1] > tol * errors[0] * (1 - SLACK)


@given(s=st.lists(st.floats(0.001, 100.0), min_size=1, max_size=30))
def test_tail_errors_are_the_tail_sums(s):
    s = np.sort(np.asarray(s))[::-1]
    errors = tail_errors(s)
    assert errors.shape == (s.size + 1,)
    for k in range(s.size + 1):
        assert errors[k] == pytest.approx(math.sqrt(np.sum(s[k:] ** 2)), rel=1e-12, abs=1e-300)
    assert np.all(np.diff(errors) <= 0)
    # a partial spectrum of a larger matrix: the missing energy is added to every tail
    norm = math.sqrt(np.sum(s ** 2) + 4.0)
    partial = tail_errors(s, norm)
    assert partial[-1] == pytest.approx(2.0)
    assert partial[0] == pytest.approx(norm)


# --------------------------------------------------------------------------- ratio

@given(g=st.integers(0, 3), m=dims, n=dims, decay=decays, seed=seeds, ratio=st.floats(0.01, 1.0))
@example(g=0, m=24, n=24, decay=0.5, seed=0, ratio=1.0)
@example(g=0, m=10, n=10, decay=0.5, seed=0, ratio=0.1)  # exactly one rank fits: 20 <= 10
def test_ratio_rank_is_maximal(g, m, n, decay, seed, ratio):
    A = batched_matrix(g, m, n, decay, seed)
    blocks = max(g, 1)
    budget = ratio * blocks * m * n

    def params(k):
        return blocks * k * (m + n)

    if params(1) > budget:
        with pytest.raises(ValueError, match=r"even rank 1 needs .* parameters"):
            svd(A, ratio=ratio)
        return
    f = svd(A, ratio=ratio)
    k = f.rank
    assert f.num_params == params(k) <= budget
    assert 1 <= k <= min(m, n)
    if k < min(m, n):
        assert params(k + 1) > budget


@given(max_rank=st.integers(1, 200), cost=st.integers(1, 50), budget=st.floats(1, 10000))
def test_largest_rank_within(max_rank, cost, budget):
    def params(k):
        return cost * k

    if cost > budget:
        with pytest.raises(ValueError, match="even rank 1"):
            largest_rank_within(params, budget, max_rank, context="ctx")
        return
    k = largest_rank_within(params, budget, max_rank)
    assert 1 <= k <= max_rank
    assert params(k) <= budget
    assert k == max_rank or params(k + 1) > budget


# --------------------------------------------------------------------------- batched share one rank

@given(g=st.integers(2, 4), m=st.integers(2, 12), n=st.integers(2, 12), seed=seeds,
       energy=st.floats(0.05, 0.999))
def test_batched_energy_is_summed_over_blocks(g, m, n, seed, energy):
    # blocks with very different scales: the shared rank follows the summed energy
    A = torch.stack([decaying_matrix(m, n, 0.5, seed + i) * (10.0 ** -i) for i in range(g)])
    f = svd(A, energy=energy)
    s = np_spectrum(A)
    assert s.shape == (g, min(m, n))
    total = kept_energy(s, s.shape[1])
    k = f.rank
    assert kept_energy(s, k) >= energy * total * (1 - SLACK)
    if k > 1:
        assert kept_energy(s, k - 1) < energy * total * (1 + SLACK)
    assert tuple(f.U.shape) == (g, m, k) and tuple(f.S.shape) == (g, k) and tuple(f.Vh.shape) == (g, k, n)
    assert f.error_bound == pytest.approx(tail_error(s, k), rel=1e-8, abs=1e-13)


def test_batched_rank_uses_summed_not_per_block_energy():
    # block 0 is rank 1, block 1 has a flat spectrum of tiny energy: 99% of the summed
    # energy is reached at rank 1 even though block 1 alone would need every component
    block0 = torch.zeros(6, 6, dtype=torch.float64)
    block0[0, 0] = 100.0
    block1 = torch.eye(6, dtype=torch.float64) * 0.01
    f = svd(torch.stack([block0, block1]), energy=0.99)
    assert f.rank == 1


# --------------------------------------------------------------------------- vbmf

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_vbmf_recovers_the_rank_of_noisy_low_rank(seed, transpose):
    gen = torch.Generator().manual_seed(seed)
    m, n, R = 200, 100, 10
    signal = torch.randn(m, R, generator=gen, dtype=torch.float64) @ torch.randn(R, n, generator=gen,
                                                                                 dtype=torch.float64)
    A = signal + 0.1 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    if transpose:
        A = A.T
    assert svd(A, rank="vbmf").rank == R
    s = np.linalg.svd(A.numpy(), compute_uv=False)
    assert vbmf_rank(s, A.shape) == R


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vbmf_on_pure_noise_gives_a_small_rank(seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(200, 100, generator=gen, dtype=torch.float64)
    assert svd(A, rank="vbmf").rank <= 3


@given(m=st.integers(2, 30), n=st.integers(2, 30), decay=decays, seed=seeds)
def test_vbmf_rank_is_in_range(m, n, decay, seed):
    A = decaying_matrix(m, n, decay, seed)
    assert 1 <= svd(A, rank="vbmf").rank <= min(m, n)


def test_vbmf_degenerate_spectra():
    assert vbmf_rank(np.array([1.0]), (1, 5)) == 1
    assert vbmf_rank(np.zeros(4), (4, 4)) == 1


# --------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"pass exactly one of rank=, energy=, tol=, ratio= \(got none\)"),
    (dict(rank=2, energy=0.9), r"pass exactly one of .*got rank=2 and energy=0.9"),
    (dict(rank=0), r"rank=0 must be >= 1"),
    (dict(rank=-3), r"rank=-3 must be >= 1"),
    (dict(energy=0.0), r"energy=0.0 is outside \(0, 1\]"),
    (dict(energy=1.5), r"energy=1.5 is outside \(0, 1\]"),
    (dict(energy=float("nan")), r"energy=nan is outside"),
    (dict(tol=-0.1), r"tol=-0.1 is outside \[0, 1\)"),
    (dict(tol=1.0), r"tol=1.0 is outside \[0, 1\)"),
    (dict(ratio=0), r"ratio=0.0 is outside \(0, 1\]"),
    (dict(ratio=2), r"ratio=2.0 is outside \(0, 1\]"),
    (dict(rank="auto"), r"rank='auto' is not understood"),
])
def test_parse_rank_spec_rejects_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match="^layer X: " + match):
        parse_rank_spec(**kwargs, context="layer X")


@pytest.mark.parametrize("kwargs", [dict(rank=2.0), dict(rank=True), dict(energy="0.5"), dict(tol=True),
                                    dict(rank=(2, 3))])
def test_parse_rank_spec_type_errors(kwargs):
    with pytest.raises(TypeError, match="^ctx: "):
        parse_rank_spec(**kwargs, context="ctx")


def test_parse_rank_spec_values():
    assert parse_rank_spec(rank=np.int64(3)) == RankSpec("rank", 3)
    assert parse_rank_spec(rank="vbmf") == RankSpec("vbmf", "vbmf")
    assert parse_rank_spec(energy=1) == RankSpec("energy", 1.0)
    assert parse_rank_spec(tol=0) == RankSpec("tol", 0.0)
    assert parse_rank_spec(rank=[2, 3], allow_tuple=True) == RankSpec("rank", (2, 3))
    with pytest.raises(ValueError, match=r"every rank must be >= 1"):
        parse_rank_spec(rank=(2, 0), allow_tuple=True)
    with pytest.raises(ValueError, match=r"ratio= is not supported by this method"):
        parse_rank_spec(ratio=0.5, allowed=("rank",))
    assert str(parse_rank_spec(energy=0.5)) == "energy=0.5"
    assert str(parse_rank_spec(rank="vbmf")) == "rank='vbmf'"


def test_check_rank_and_select_rank_bounds():
    assert check_rank(3, 3) == 3
    with pytest.raises(ValueError, match=r"^c: rank=4 is outside \[1, 3\]"):
        check_rank(4, 3, "c")
    with pytest.raises(ValueError, match=r"rank=7 is outside \[1, 5\]"):
        select_rank(RankSpec("rank", 7), np.ones(5), max_rank=5)
    # energy/tol ranks are capped at max_rank
    assert select_rank(RankSpec("tol", 0.0), np.ones(8), max_rank=5, norm=100.0) == 5
