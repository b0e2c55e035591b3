"""Tucker (HOSVD / ST-HOSVD / HOOI): exact recovery, the HOSVD bound, rank specs, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import decaying_matrix
from decomp_toolkit.decomp import TuckerFactors, tucker, tucker_params
from decomp_toolkit.decomp._kernels import mode_product


def tucker_tensor(shape, ranks, seed=0, decay=None):
    """A tensor of exact multilinear rank ``ranks`` (all modes)."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, generator=gen, dtype=torch.float64)
    if decay is not None:
        for n, r in enumerate(ranks):
            scale = torch.tensor([decay ** i for i in range(r)], dtype=torch.float64)
            core = core * scale.reshape([-1 if m == n else 1 for m in range(len(ranks))])
    T = core
    for n, (size, r) in enumerate(zip(shape, ranks)):
        U = torch.linalg.qr(torch.randn(size, r, generator=gen, dtype=torch.float64)).Q
        T = mode_product(T, U, n)
    return T


def realistic_kernel(out=48, inp=32, k=3, seed=0):
    """A conv-like kernel whose mode unfoldings have decaying spectra (not flat noise)."""
    W = decaying_matrix(out, inp * k * k, decay=0.3, seed=seed).reshape(out, inp, k, k)
    mixer = decaying_matrix(inp, inp, decay=0.5, seed=seed + 1)
    return mode_product(W, mixer, 1)


def unfolding_spectrum(T, n):
    X = torch.as_tensor(T, dtype=torch.float64).movedim(n, 0).reshape(T.shape[n], -1)
    return torch.linalg.svdvals(X).numpy()


def hosvd_formula(T, modes, ranks):
    total = 0.0
    for n, r in zip(modes, ranks):
        s = unfolding_spectrum(T, n)
        total += float(np.sum(s[r:] ** 2))
    return math.sqrt(total)


def error(T, f):
    return float(torch.linalg.norm(torch.as_tensor(T, dtype=torch.float64)
                                   - torch.as_tensor(f.to_tensor(), dtype=torch.float64)))


@pytest.mark.parametrize("algorithm", ["hosvd", "sthosvd", "hooi"])
def test_exact_multilinear_rank_is_recovered(algorithm):
    T = tucker_tensor((8, 9, 6), (3, 4, 2), seed=1)
    f = tucker(T, rank=(3, 4, 2), algorithm=algorithm)
    assert f.rank == (3, 4, 2)
    assert tuple(f.core.shape) == (3, 4, 2)
    assert f.relative_error_to(T) < 1e-10
    assert f.error_bound < 1e-6 * f.norm
    assert f.num_params == 3 * 4 * 2 + 8 * 3 + 9 * 4 + 6 * 2
    # tol finds the true ranks (the tail beyond them is rounding noise)
    assert tucker(T, tol=1e-5, algorithm=algorithm).rank == (3, 4, 2)


def test_partial_tucker2_exact_on_channel_modes():
    T = tucker_tensor((12, 10, 3, 3), (4, 5, 3, 3), seed=2)
    f = tucker(T, rank=(4, 5), modes=(0, 1))
    assert f.modes == (0, 1) and f.shape == (12, 10, 3, 3)
    assert tuple(f.core.shape) == (4, 5, 3, 3)
    assert [tuple(U.shape) for U in f.factors] == [(12, 4), (10, 5)]
    assert f.relative_error_to(T) < 1e-10
    assert len(f.mode_spectra) == 2


@given(seed=st.integers(0, 10_000), ndim=st.integers(2, 4), algorithm=st.sampled_from(["hosvd", "sthosvd", "hooi"]),
       data=st.data())
def test_hosvd_bound_holds_and_equals_formula(seed, ndim, algorithm, data):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(2, 7, size=ndim))
    T = torch.as_tensor(rng.standard_normal(shape))
    modes = tuple(sorted(rng.choice(ndim, size=data.draw(st.integers(1, ndim)), replace=False).tolist()))
    ranks = tuple(data.draw(st.integers(1, shape[n])) for n in modes)
    f = tucker(T, rank=ranks, modes=modes, algorithm=algorithm)
    actual = error(T, f)
    assert actual <= f.error_bound * (1 + 1e-9) + 1e-12
    assert f.error_bound == pytest.approx(hosvd_formula(T, modes, ranks), rel=1e-6, abs=1e-7 * f.norm)
    for s, n in zip(f.mode_spectra, modes):
        assert np.allclose(s[: min(shape[n], T.numel() // shape[n])], unfolding_spectrum(T, n)[: len(s)],
                           atol=1e-7 * f.norm)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hooi_never_worse_than_sthosvd_and_within_sqrt_n(seed):
    T = realistic_kernel(seed=seed) + 0.01 * torch.randn(48, 32, 3, 3, generator=torch.Generator().manual_seed(seed),
                                                         dtype=torch.float64)
    kwargs = dict(rank=(6, 5, 2, 2))
    hosvd, st_, hooi = (tucker(T, algorithm=m, **kwargs) for m in ("hosvd", "sthosvd", "hooi"))
    e_hosvd, e_st, e_hooi = error(T, hosvd), error(T, st_), error(T, hooi)
    assert e_hooi <= e_st * (1 + 1e-9)
    assert e_st <= st_.error_bound * (1 + 1e-9) and e_hosvd <= hosvd.error_bound * (1 + 1e-9)
    assert hooi.error_bound == pytest.approx(hosvd.error_bound, rel=1e-12)
    # the HOSVD bound is within sqrt(N) of the best Tucker error, hence of any Tucker error
    assert hooi.error_bound <= math.sqrt(4) * e_hooi * (1 + 1e-9)
    errors = hooi.info["errors"]
    assert errors[0] == pytest.approx(hooi.info["sthosvd_error"])
    assert hooi.info["error"] == pytest.approx(min(errors), rel=1e-9)


def test_tucker2_on_realistic_kernel_matches_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker
    T = realistic_kernel(seed=3)
    ours = tucker(T, rank=(8, 6), modes=(0, 1), n_iter_max=50, convergence_tol=1e-10)
    (core, factors), _ = partial_tucker(T.numpy(), rank=(8, 6), modes=(0, 1), n_iter_max=50, tol=1e-10, init="svd")
    theirs = np.linalg.norm(T.numpy() - tl.tenalg.multi_mode_dot(core, factors, modes=(0, 1)))
    assert error(T, ours) <= theirs * (1 + 1e-6)


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_energy_is_met_per_mode_and_minimal(energy):
    T = realistic_kernel(seed=4)
    f = tucker(T, energy=energy, modes=(0, 1))
    for n, r in zip((0, 1), f.rank):
        s2 = unfolding_spectrum(T, n) ** 2
        kept = np.cumsum(s2) / s2.sum()
        assert kept[r - 1] >= energy - 1e-9
        if r > 1:
            assert kept[r - 2] < energy


@given(tol=st.floats(0.01, 0.9), seed=st.integers(0, 1000), algorithm=st.sampled_from(["hosvd", "sthosvd", "hooi"]))
def test_tol_is_certified(tol, seed, algorithm):
    T = realistic_kernel(out=16, inp=12, seed=seed) + 0.05 * torch.randn(
        16, 12, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = tucker(T, tol=tol, algorithm=algorithm)
    assert f.error_bound <= tol * f.norm * (1 + 1e-12)
    assert error(T, f) <= f.error_bound * (1 + 1e-9)
    # minimal-ish: lowering any one rank breaks the HOSVD budget of the chosen split
    assert f.error_bound == pytest.approx(hosvd_formula(T, f.modes, f.rank), rel=1e-6, abs=1e-9)


@given(ratio=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_ratio_respects_the_budget(ratio, seed):
    T = realistic_kernel(out=24, inp=16, seed=seed)
    budget = ratio * T.numel()
    if tucker_params((1, 1), T.shape, (0, 1)) > budget:
        with pytest.raises(ValueError, match="budget"):
            tucker(T, ratio=ratio, modes=(0, 1))
        return
    f = tucker(T, ratio=ratio, modes=(0, 1))
    assert f.num_params <= budget
    assert f.num_params == tucker_params(f.rank, T.shape, (0, 1))


def test_vbmf_finds_planted_channel_ranks():
    gen = torch.Generator().manual_seed(5)
    T = tucker_tensor((64, 48, 3, 3), (6, 5, 3, 3), seed=5, decay=0.9) * 10
    T = T + 0.01 * torch.randn(T.shape, generator=gen, dtype=torch.float64)
    f = tucker(T, rank="vbmf", modes=(0, 1))
    assert f.rank == (6, 5)


def test_int_rank_and_negative_modes():
    T = realistic_kernel(out=10, inp=8)
    f = tucker(T, rank=3, modes=(-4, -3))
    assert f.modes == (0, 1) and f.rank == (3, 3)


def test_tall_unfolding_with_rank_above_the_other_sizes():
    # mode-0 unfolding is 40 x 6: rank 10 needs basis completion; still exact and orthonormal
    T = tucker_tensor((40, 3, 2), (6, 3, 2), seed=6)
    f = tucker(T, rank=(10, 3, 2))
    U = f.factors[0]
    assert torch.allclose(U.T @ U, torch.eye(10, dtype=torch.float64), atol=1e-12)
    assert f.relative_error_to(T) < 1e-10


def test_kinds_and_dtypes_round_trip():
    T = realistic_kernel(out=12, inp=10).numpy().astype(np.float32)
    f = tucker(T, rank=(4, 4), modes=(0, 1))
    assert isinstance(f.core, np.ndarray) and f.core.dtype == np.float32
    assert isinstance(f.to_tensor(), np.ndarray) and f.to_tensor().dtype == np.float32
    g = tucker(torch.from_numpy(T), rank=(4, 4), modes=(0, 1))
    assert isinstance(g.to_tensor(), torch.Tensor) and g.to_tensor().dtype == torch.float32
    assert np.allclose(f.to_tensor(), g.to_tensor().numpy(), atol=1e-5)
    assert isinstance(f, TuckerFactors) and "TuckerFactors" in repr(f)


def test_512_kernel_tucker2_smoke():
    K = torch.randn(128, 128, 3, 3, generator=torch.Generator().manual_seed(0))
    f = tucker(K, energy=0.9, modes=(0, 1))
    assert f.error_bound >= error(K, f) - 1e-4


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rank=(2, 2)), ValueError, "has 2 entries but modes"),
    (dict(rank=9, modes=(0,)), ValueError, "outside \\[1, 6\\]"),
    (dict(rank=(2, 9), modes=(0, 1)), ValueError, "rank for mode 1=9"),
    (dict(rank=2, modes=(0, 3)), ValueError, "out of range"),
    (dict(rank=2, modes=(0, -3)), ValueError, "names a mode twice"),
    (dict(rank=2, modes=()), ValueError, "modes= is empty"),
    (dict(rank=2, modes=(0.5,)), TypeError, "must hold ints"),
    (dict(rank=2, algorithm="tt"), ValueError, "algorithm='tt'"),
    (dict(), ValueError, "exactly one of"),
    (dict(rank=2, energy=0.9), ValueError, "exactly one of"),
    (dict(rank="auto"), ValueError, "not understood"),
    (dict(energy=1.5), ValueError, "outside"),
])
def test_bad_arguments(kwargs, exc, match):
    T = torch.randn(6, 5, 4, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        tucker(T, **kwargs)


@pytest.mark.parametrize("A, match", [
    (torch.randn(7), "at least 2 dimensions"),
    (torch.empty(0, 3, 3), "empty"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or Inf"),
])
def test_bad_inputs(A, match):
    with pytest.raises(ValueError, match=match):
        tucker(A, rank=1)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        tucker(np.ones((3, 3), dtype=np.int64), rank=1)


@pytest.mark.parametrize("ranks", [(120, 130), (20, 30)])
def test_gram_path_on_a_large_kernel(ranks):
    # unfoldings above SMALL_SVD_FLOPS use the Gram + eigh path; high ranks use the complement trick
    K = realistic_kernel(out=160, inp=160, seed=7) + 1e-3 * torch.randn(
        160, 160, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    st_ = tucker(K, rank=ranks, modes=(0, 1), algorithm="sthosvd")
    hooi = tucker(K, rank=ranks, modes=(0, 1))
    e_st, e_hooi = error(K, st_), error(K, hooi)
    assert e_hooi <= e_st * (1 + 1e-9)
    assert e_st <= st_.error_bound * (1 + 1e-9)
    assert hooi.error_bound == pytest.approx(hosvd_formula(K, (0, 1), ranks), rel=1e-6, abs=1e-7 * hooi.norm)
    for U in hooi.factors:
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-10)
    energy = tucker(K, energy=0.9, modes=(0, 1))
    for n, r in zip((0, 1), energy.rank):
        s2 = unfolding_spectrum(K, n) ** 2
        kept = np.cumsum(s2) / s2.sum()
        assert kept[r - 1] >= 0.9 - 1e-7 and (r == 1 or kept[r - 2] < 0.9 + 1e-7)
